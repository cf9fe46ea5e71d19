//! Generated wire types, and the one place they are converted to and from our own types.

use bytes::Bytes;
use prost::Message;

use crate::jobs::{
    ChunkState, Compression, Granularity, Incremental, JobRecord, JobSpec, JobState, LoadSpec,
    OutputOptions, PartitionBy, Split, Submission,
};
use crate::pg::ConnInfo;
use crate::workers::{DrainOrder, WorkerRecord};
use crate::{ChunkId, ChunkRange, JobId};

/// Code generated from `proto/haul/v1/haul.proto`.
#[allow(unreachable_pub, clippy::all, clippy::clone_on_ref_ptr)]
pub mod wire {
    include!(concat!(env!("OUT_DIR"), "/haul.v1.rs"));
}

/// The encoded descriptor set of haul's protos, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/haul_descriptor.bin"));

use wire::{AllRows, ChunkTask, CtidRange, KeyRange, NullKeys, chunk_range};

/// The wire version this build writes and accepts.
pub const TASK_VERSION: u32 = 1;

/// A chunk task as the rest of haul sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    pub job_id: JobId,
    pub chunk_id: ChunkId,
    pub range: ChunkRange,
    /// The chunk's transient failures before this attempt.
    pub retry: crate::jobs::Retry,
    /// The run of the job it belongs to (its record's `submitted_at`); empty from a
    /// build that did not say.
    pub run: String,
}

/// Why a message body is not a task this build can run. Always permanent: the message
/// goes to the dead-letter queue.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed chunk task: {0}")]
    Malformed(#[from] prost::DecodeError),
    #[error("chunk task has wire version {0}, this build understands {TASK_VERSION}")]
    UnknownVersion(u32),
    #[error("chunk task is missing its {0}")]
    Missing(&'static str),
    #[error("chunk task has an invalid job id: {0}")]
    BadJobId(String),
}

/// A chunk range on the wire.
pub fn range_to_wire(range: &ChunkRange) -> wire::ChunkRange {
    let kind = match range {
        ChunkRange::All => chunk_range::Kind::All(AllRows {}),
        ChunkRange::NullKeys => chunk_range::Kind::NullKeys(NullKeys {}),
        ChunkRange::Key { lower, upper } => chunk_range::Kind::Key(KeyRange {
            lower: lower.clone().unwrap_or_default(),
            upper: upper.clone().unwrap_or_default(),
        }),
        ChunkRange::Ctid {
            first_page,
            end_page,
        } => chunk_range::Kind::Ctid(CtidRange {
            first_page: *first_page,
            end_page: end_page.unwrap_or(0),
        }),
    };
    wire::ChunkRange { kind: Some(kind) }
}

/// A chunk range from the wire; `None` when it is missing.
pub fn range_from_wire(range: Option<wire::ChunkRange>) -> Option<ChunkRange> {
    let non_empty = |v: Vec<String>| (!v.is_empty()).then_some(v);
    Some(match range?.kind? {
        chunk_range::Kind::All(_) => ChunkRange::All,
        chunk_range::Kind::NullKeys(_) => ChunkRange::NullKeys,
        chunk_range::Kind::Key(k) => ChunkRange::Key {
            lower: non_empty(k.lower),
            upper: non_empty(k.upper),
        },
        chunk_range::Kind::Ctid(c) => ChunkRange::Ctid {
            first_page: c.first_page,
            end_page: (c.end_page != 0).then_some(c.end_page),
        },
    })
}

/// A key column on the wire.
pub fn key_to_wire(k: &crate::range::KeyColumn) -> wire::KeyColumn {
    use crate::range::KeyOrdering as O;
    let (ordering, collation) = match &k.ordering {
        O::Unknown => (wire::KeyOrdering::Unknown, ""),
        O::Natural => (wire::KeyOrdering::Natural, ""),
        O::Bytes => (wire::KeyOrdering::Bytes, ""),
        O::Collation(c) => (wire::KeyOrdering::Collation, c.as_str()),
    };
    wire::KeyColumn {
        name: k.name.clone(),
        pg_type: k.pg_type.clone(),
        ordering: ordering as i32,
        collation: collation.to_owned(),
    }
}

/// A key column from the wire (an ordering this build does not know is `Unknown`).
pub fn key_from_wire(k: wire::KeyColumn) -> crate::range::KeyColumn {
    use crate::range::KeyOrdering as O;
    let ordering = match wire::KeyOrdering::try_from(k.ordering) {
        Ok(wire::KeyOrdering::Natural) => O::Natural,
        Ok(wire::KeyOrdering::Bytes) => O::Bytes,
        Ok(wire::KeyOrdering::Collation) => O::Collation(k.collation),
        Ok(wire::KeyOrdering::Unknown) | Err(_) => O::Unknown,
    };
    crate::range::KeyColumn {
        name: k.name,
        pg_type: k.pg_type,
        ordering,
    }
}

/// The wire version of the loader messages (`LoadChunk`, `PrepareLoad`) this build
/// writes and accepts.
pub const LOAD_VERSION: u32 = 2;

impl Task {
    pub fn encode(&self) -> Bytes {
        ChunkTask {
            version: TASK_VERSION,
            job_id: self.job_id.to_string(),
            chunk_id: self.chunk_id.0,
            range: Some(range_to_wire(&self.range)),
            failures: self.retry.failures,
            failing_since_ms: self.retry.since_ms,
            run: self.run.clone(),
        }
        .encode_to_vec()
        .into()
    }

    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let t = ChunkTask::decode(body)?;
        if t.version != TASK_VERSION {
            return Err(DecodeError::UnknownVersion(t.version));
        }
        let range = range_from_wire(t.range).ok_or(DecodeError::Missing("range"))?;
        Ok(Task {
            job_id: JobId::parse(&t.job_id).map_err(DecodeError::BadJobId)?,
            chunk_id: ChunkId(t.chunk_id),
            range,
            retry: crate::jobs::Retry {
                failures: t.failures,
                since_ms: t.failing_since_ms,
            },
            run: t.run,
        })
    }
}

/// A job's dead letters on the wire.
pub fn dead_letters_to_wire(job: &JobId, dead: &[crate::jobs::DeadLetter]) -> wire::DeadLetters {
    wire::DeadLetters {
        job_id: job.to_string(),
        dead_letters: dead
            .iter()
            .map(|d| wire::DeadLetter {
                chunk_id: d.chunk.0,
                reason: d.reason.clone(),
                at_ms: d.at_ms as i64,
            })
            .collect(),
    }
}

/// A submitted job on the wire. The source's connection string travels without a password:
/// the coordinator and workers log in with their own credentials.
pub fn submission_to_wire(s: &Submission) -> wire::SubmitRequest {
    let spec = &s.spec;
    let load = spec.load.as_ref();
    wire::SubmitRequest {
        source: spec.source.to_string(),
        table: spec.table.clone(),
        dest: spec.dest.clone(),
        columns: spec.columns.clone(),
        key: spec.key.clone(),
        split: match spec.split {
            Split::Key => wire::Split::Key,
            Split::Ctid => wire::Split::Ctid,
        }
        .into(),
        casts: spec
            .casts
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        chunk_rows: spec.chunk_rows,
        output: Some(output_to_wire(&spec.output)),
        no_snapshot: !spec.use_snapshot,
        job_id: s.job_id.as_ref().map(JobId::to_string).unwrap_or_default(),
        resume: s.resume,
        fresh_snapshot: s.fresh_snapshot,
        overwrite: s.overwrite,
        load: load.map(|l| l.endpoints.clone()).unwrap_or_default(),
        target_table: load.map(|l| l.target_table.clone()).unwrap_or_default(),
        create_table: load.is_some_and(|l| l.create_table),
        truncate_first: load.is_some_and(|l| l.truncate_first),
        incremental_column: spec
            .incremental
            .as_ref()
            .map(|i| i.column.clone())
            .unwrap_or_default(),
        lag_secs: spec.incremental.as_ref().map_or(0, |i| i.lag_secs),
        retry_for_secs: spec.retry_for_secs,
    }
}

/// Why `haul submit` refuses a connection string with a password in it.
pub const PASSWORD_NOT_CARRIED: &str = "--source holds a password, and the cluster never carries one (it would be stored with the job): give it to the coordinator and the workers (PGPASSWORD, ~/.pgpass, or --source-password-file) and submit the connection string without it";

/// A submitted job from the wire, checked: what is wrong with it, in one line naming the
/// flag to fix.
pub fn submission_from_wire(r: wire::SubmitRequest) -> Result<Submission, String> {
    let source = match ConnInfo::parse(&r.source) {
        Ok((info, None)) => info,
        Ok((_, Some(_))) => return Err(PASSWORD_NOT_CARRIED.into()),
        Err(e) => return Err(format!("--source: {e}")),
    };
    if r.table.is_empty() && !r.resume {
        return Err("a table is required (--table schema.table)".into());
    }
    // a resume may leave out what the coordinator knows of the job
    if r.dest.is_empty() && !r.resume {
        return Err("a destination is required (--dest)".into());
    }
    if source.is_empty() && !r.resume {
        return Err("a source is required (--source)".into());
    }
    let job_id = (!r.job_id.is_empty())
        .then(|| JobId::parse(&r.job_id))
        .transpose()?;
    if r.resume && job_id.is_none() {
        return Err("resume needs the job id".into());
    }
    let split = match wire::Split::try_from(r.split) {
        Ok(wire::Split::Key) => Split::Key,
        Ok(wire::Split::Ctid) => Split::Ctid,
        Err(_) => return Err(format!("unknown split {}", r.split)),
    };
    let endpoints = r
        .load
        .iter()
        .map(|e| crate::rpc::flight_url(e).map_err(|m| format!("--load {m}")))
        .collect::<Result<Vec<_>, _>>()?;
    let load =
        (!endpoints.is_empty() || !r.target_table.is_empty() || r.create_table || r.truncate_first)
            .then_some(LoadSpec {
                endpoints,
                target_table: r.target_table,
                create_table: r.create_table,
                truncate_first: r.truncate_first,
            });
    let spec = JobSpec {
        source,
        table: r.table,
        columns: r.columns,
        key: r.key,
        split,
        casts: r.casts.into_iter().collect(),
        dest: r.dest,
        chunk_rows: if r.chunk_rows == 0 {
            1_000_000
        } else {
            r.chunk_rows
        },
        output: output_from_wire(r.output)?,
        use_snapshot: !r.no_snapshot,
        load,
        incremental: (!r.incremental_column.is_empty()).then_some(Incremental {
            column: r.incremental_column,
            lag_secs: r.lag_secs,
        }),
        retry_for_secs: if r.retry_for_secs == 0 {
            crate::jobs::DEFAULT_RETRY_FOR_SECS
        } else {
            r.retry_for_secs
        },
    };
    spec.check_load()?;
    Ok(Submission {
        spec,
        job_id,
        resume: r.resume,
        fresh_snapshot: r.fresh_snapshot,
        overwrite: r.overwrite,
    })
}

/// The output's shape on the wire.
pub fn output_to_wire(o: &OutputOptions) -> wire::OutputOptions {
    let (compression, zstd_level) = match o.compression {
        Compression::Snappy => (wire::Compression::Snappy, 0),
        Compression::Zstd { level } => (wire::Compression::Zstd, level),
        Compression::None => (wire::Compression::None, 0),
    };
    wire::OutputOptions {
        compression: compression.into(),
        zstd_level,
        batch_rows: o.batch_rows as u64,
        row_group_rows: o.row_group_rows as u64,
        max_file_rows: o.max_file_rows,
        max_file_bytes: o.max_file_bytes,
        partition_by: o.partition_by.as_ref().map(|p| wire::PartitionBy {
            column: p.column.clone(),
            field: p.field.clone(),
            granularity: match p.granularity {
                Granularity::Day => wire::Granularity::Day,
                Granularity::Month => wire::Granularity::Month,
                Granularity::Year => wire::Granularity::Year,
            }
            .into(),
        }),
        fsync: o.fsync,
        no_parquet: !o.parquet,
        lineage_columns: o.lineage,
    }
}

/// The output's shape from the wire; `haul run`'s defaults when absent.
pub fn output_from_wire(o: Option<wire::OutputOptions>) -> Result<OutputOptions, String> {
    let Some(o) = o else {
        return Ok(OutputOptions::default());
    };
    let positive = |n: u64, what: &str| {
        if n == 0 {
            Err(format!("{what} must be positive"))
        } else {
            Ok(n)
        }
    };
    Ok(OutputOptions {
        compression: match wire::Compression::try_from(o.compression) {
            Ok(wire::Compression::Snappy) => Compression::Snappy,
            Ok(wire::Compression::Zstd) => Compression::Zstd {
                level: o.zstd_level,
            },
            Ok(wire::Compression::None) => Compression::None,
            Err(_) => return Err(format!("unknown compression {}", o.compression)),
        },
        batch_rows: crate::jobs::bounded(o.batch_rows, crate::jobs::MAX_BATCH_ROWS, "--batch-rows")?
            as usize,
        row_group_rows: crate::jobs::bounded(
            o.row_group_rows,
            crate::jobs::MAX_ROW_GROUP_ROWS,
            "--row-group-rows",
        )? as usize,
        max_file_rows: positive(o.max_file_rows, "--max-file-rows")?,
        max_file_bytes: positive(o.max_file_bytes, "--max-file-bytes")?,
        partition_by: o
            .partition_by
            .map(|p| {
                let granularity = match wire::Granularity::try_from(p.granularity) {
                    Ok(wire::Granularity::Day) => Granularity::Day,
                    Ok(wire::Granularity::Month) => Granularity::Month,
                    Ok(wire::Granularity::Year) => Granularity::Year,
                    Err(_) => return Err(format!("unknown granularity {}", p.granularity)),
                };
                let mut by = PartitionBy::new(p.column, granularity);
                if !p.field.is_empty() {
                    by.field = p.field;
                }
                Ok(by)
            })
            .transpose()?,
        fsync: o.fsync,
        parquet: !o.no_parquet,
        lineage: o.lineage_columns,
    })
}

/// A job's state on the wire.
pub fn state_to_wire(s: &JobState) -> wire::JobState {
    match s {
        JobState::Planning => wire::JobState::Planning,
        JobState::Running => wire::JobState::Running,
        JobState::Paused => wire::JobState::Paused,
        JobState::Succeeded => wire::JobState::Succeeded,
        JobState::Failed { .. } => wire::JobState::Failed,
        JobState::Cancelled => wire::JobState::Cancelled,
    }
}

/// A wire job state as users read it (`running`, `succeeded`, ...).
pub fn state_name(s: wire::JobState) -> &'static str {
    match s {
        wire::JobState::Unspecified => "unknown",
        wire::JobState::Planning => "planning",
        wire::JobState::Running => "running",
        wire::JobState::Paused => "paused",
        wire::JobState::Succeeded => "succeeded",
        wire::JobState::Failed => "failed",
        wire::JobState::Cancelled => "cancelled",
    }
}

/// Whether a job in this state has ended.
pub fn state_is_terminal(s: wire::JobState) -> bool {
    matches!(
        s,
        wire::JobState::Succeeded | wire::JobState::Failed | wire::JobState::Cancelled
    )
}

/// The API's view of a job: counts, not the chunk list, and never the source password.
pub fn job_status_to_wire(
    rec: &JobRecord,
    chunks: &std::collections::BTreeMap<ChunkId, ChunkState>,
) -> wire::JobStatus {
    let mut s = wire::JobStatus {
        job_id: rec.id.to_string(),
        state: state_to_wire(&rec.state).into(),
        reason: match &rec.state {
            JobState::Failed { reason } => reason.clone(),
            _ => String::new(),
        },
        table: rec.spec.table.clone(),
        dest: rec.spec.dest.clone(),
        source: rec.spec.source.to_string(),
        chunks_total: rec
            .plan
            .as_ref()
            .map(|p| p.chunks.len() as u32)
            .unwrap_or(0),
        estimated_rows: rec.plan.as_ref().map(|p| p.estimated_rows).unwrap_or(0),
        snapshot: rec
            .plan
            .as_ref()
            .and_then(|p| p.snapshot.clone())
            .unwrap_or_default(),
        submitted_at_ms: chrono::DateTime::parse_from_rfc3339(&rec.submitted_at)
            .map(|t| t.timestamp_millis())
            .unwrap_or(0),
        ..wire::JobStatus::default()
    };
    for c in chunks.values() {
        match c {
            ChunkState::Committed { rows, bytes } => {
                s.chunks_done += 1;
                s.rows_done += rows;
                s.bytes_done += bytes;
            }
            ChunkState::Running { .. } => s.chunks_running += 1,
            ChunkState::Failed { .. } => s.chunks_failed += 1,
            ChunkState::Waiting {
                retry_at_ms,
                reason,
                ..
            } => {
                s.chunks_waiting += 1;
                let at = i64::try_from(*retry_at_ms).unwrap_or(i64::MAX);
                if s.next_retry_at_ms == 0 || at < s.next_retry_at_ms {
                    s.next_retry_at_ms = at;
                    s.waiting_reason = reason.clone();
                }
            }
            ChunkState::Pending | ChunkState::Parked => {}
        }
    }
    if rec.state.is_terminal() {
        // an ended job runs nothing and retries nothing, whatever its chunks' last states
        // say (a cancel stops their attempts without recording each one's end)
        s.chunks_running = 0;
        s.chunks_waiting = 0;
        s.next_retry_at_ms = 0;
        s.waiting_reason.clear();
    }
    if let Some(l) = &rec.spec.load {
        s.load_target = l.target_table.clone();
        s.loaders = l.endpoints.clone();
    }
    if rec.state == JobState::Succeeded
        && rec.spec.output.parquet
        && let Some(p) = &rec.plan
    {
        s.manifest = format!(
            "{}/{}/_manifest.json",
            rec.spec.dest.trim_end_matches('/'),
            p.table_dir()
        );
    }
    s
}

/// A worker as `haul workers` shows it, at time `now_ms`.
pub fn worker_to_wire(
    rec: &WorkerRecord,
    order: Option<DrainOrder>,
    now_ms: i64,
) -> wire::WorkerInfo {
    wire::WorkerInfo {
        worker_id: rec.id.to_string(),
        host: rec.host.clone(),
        slots: rec.slots,
        in_flight: rec.in_flight,
        last_heartbeat_ms: rec.last_heartbeat_ms,
        state: crate::workers::worker_state(rec, order, now_ms).into(),
        chunks_done: rec.chunks_done,
        rows_done: rec.rows_done,
        pid: rec.pid,
    }
}

/// The registry's record of a worker from its heartbeat, received at `now_ms`.
pub fn worker_from_heartbeat(
    r: wire::HeartbeatRequest,
    now_ms: i64,
) -> Result<WorkerRecord, String> {
    if r.worker_id.is_empty() {
        return Err("a heartbeat needs the worker id".into());
    }
    Ok(WorkerRecord {
        id: crate::WorkerId(r.worker_id),
        host: r.host,
        pid: r.pid,
        slots: r.slots,
        in_flight: r.in_flight,
        last_heartbeat_ms: now_ms,
        draining: r.draining,
        chunks_done: r.chunks_done,
        rows_done: r.rows_done,
    })
}

/// The heartbeat's answer: whether (and how) the worker must drain.
pub fn drain_order_to_wire(order: Option<DrainOrder>) -> wire::HeartbeatReply {
    wire::HeartbeatReply {
        drain: order.is_some(),
        requeue_in_flight: order == Some(DrainOrder::RequeueInFlight),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_round_trips() {
        for range in [
            ChunkRange::All,
            ChunkRange::NullKeys,
            ChunkRange::Key {
                lower: None,
                upper: Some(vec!["10".into(), "x'y".into()]),
            },
            ChunkRange::Key {
                lower: Some(vec!["10".into()]),
                upper: None,
            },
            ChunkRange::Ctid {
                first_page: 7,
                end_page: None,
            },
        ] {
            let t = Task {
                job_id: JobId::parse("j-1").unwrap(),
                chunk_id: ChunkId(3),
                range,
                retry: crate::jobs::Retry {
                    failures: 2,
                    since_ms: 1_700_000_000_000,
                },
                run: "2026-12-07T22:00:00.123456789+00:00".into(),
            };
            assert_eq!(Task::decode(&t.encode()).unwrap(), t);
        }
    }

    /// A submitted job's sizes are bounded as the CLI's are (a worker that took a chunk
    /// of a job with `--batch-rows 1000000000000` aborted at every attempt).
    #[test]
    fn submitted_sizes_are_bounded() {
        let o = wire::OutputOptions {
            batch_rows: 1_000_000_000_000,
            row_group_rows: 1024,
            max_file_rows: 1,
            max_file_bytes: 1,
            ..Default::default()
        };
        let e = output_from_wire(Some(o)).unwrap_err();
        assert_eq!(
            e,
            "--batch-rows 1000000000000 is above its limit of 1048576"
        );
    }

    #[test]
    fn rejects_garbage_and_unknown_versions() {
        assert!(matches!(
            Task::decode(b"\xff\xff\xff"),
            Err(DecodeError::Malformed(_))
        ));
        let future = ChunkTask {
            version: 99,
            job_id: "j".into(),
            chunk_id: 0,
            range: None,
            ..Default::default()
        }
        .encode_to_vec();
        assert!(matches!(
            Task::decode(&future),
            Err(DecodeError::UnknownVersion(99))
        ));
    }

    #[test]
    fn submissions_round_trip() {
        let mut spec = JobSpec {
            source: "host=h dbname=db user=u sslmode=require".parse().unwrap(),
            table: "public.t".into(),
            columns: vec!["a".into()],
            key: vec!["a".into(), "b".into()],
            split: Split::Ctid,
            casts: [("a".to_owned(), "text".to_owned())].into(),
            dest: "s3://b/p".into(),
            chunk_rows: 5000,
            output: OutputOptions {
                compression: Compression::Zstd { level: 7 },
                partition_by: Some(PartitionBy {
                    column: "at".into(),
                    granularity: Granularity::Month,
                    field: "load_month".into(),
                }),
                fsync: true,
                ..OutputOptions::default()
            },
            use_snapshot: false,
            load: Some(LoadSpec {
                endpoints: vec!["http://l:1".into()],
                target_table: "x.y".into(),
                create_table: true,
                truncate_first: true,
            }),
            incremental: Some(Incremental {
                column: "updated_at".into(),
                lag_secs: 3,
            }),
            retry_for_secs: 90,
        };
        let s = Submission {
            spec: spec.clone(),
            job_id: Some(JobId::parse("j-1").unwrap()),
            resume: true,
            fresh_snapshot: true,
            overwrite: true,
        };
        let back = submission_from_wire(submission_to_wire(&s)).unwrap();
        assert_eq!(back.spec.source, spec.source);
        assert_eq!(back.spec.output, spec.output);
        assert_eq!(back.spec.load, spec.load);
        assert_eq!(back.spec.incremental, spec.incremental);
        assert_eq!(
            (
                back.spec.split,
                back.spec.chunk_rows,
                back.spec.use_snapshot
            ),
            (Split::Ctid, 5000, false)
        );
        assert_eq!(
            (back.job_id.as_ref(), back.resume, back.overwrite),
            (s.job_id.as_ref(), true, true)
        );

        // loading options without loaders are refused, as the CLI refuses them
        spec.load = None;
        spec.output.parquet = false;
        let err = submission_from_wire(submission_to_wire(&Submission { spec, ..s })).unwrap_err();
        assert!(err.contains("need loaders"), "{err}");
    }

    #[test]
    fn a_submitted_password_is_refused_not_stored() {
        for source in [
            "postgresql://u:pw@h/db",
            "postgresql://u@h/db?password=pw",
            "host=h password = 'p w'",
        ] {
            let req = wire::SubmitRequest {
                source: source.into(),
                table: "t".into(),
                dest: "file:///x".into(),
                ..Default::default()
            };
            assert_eq!(submission_from_wire(req).unwrap_err(), PASSWORD_NOT_CARRIED);
        }
    }
}
