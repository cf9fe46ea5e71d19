//! `haul run`: one job, whole, in this process — the coordinator's logic plus N worker
//! tasks over the in-process queue, lease store and job store. The distributed mode runs
//! the same chunk executor behind the same traits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use haul_shared::error::Classify;
use haul_shared::jobs::{
    ChunkState, JobPlan, JobRecord, JobSpec, JobState, JobStore, MemoryJobStore,
};
use haul_shared::lease::MemoryLeaseStore;
use haul_shared::pg::{self, SourceError, quote_ident};
use haul_shared::proto::Task;
use haul_shared::queue::{ChunkQueue, MemoryQueue};
use haul_shared::{ChunkId, JobId, WorkerId};
use haul_worker::executor::{Progress, table_dir};
use haul_worker::layout::{ChunkManifest, Dest, DestError, PartFile};
use haul_worker::worker::{Control, Services, WorkerConfig, run_worker};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::planner;
use crate::progress::{ProgressMode, Reporter};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Dest(#[from] DestError),
    #[error(
        "job {job} was already started in this destination; pass --resume {job} to finish it, or choose another --job-id"
    )]
    AlreadyStarted { job: JobId },
    #[error("no job {job} in {dest} (no plan at _haul/jobs/{job}/plan.json)")]
    NoSuchJob { job: JobId, dest: String },
    #[error(
        "job {job} read from snapshot {snapshot}, which ended with the process that held it; pass --fresh-snapshot to finish the remaining chunks under a new snapshot (rows changed in between may then differ between chunks)"
    )]
    NeedsFreshSnapshot { job: JobId, snapshot: String },
    #[error(
        "job {job} was split into ctid (page) ranges, which are only valid in its original snapshot; rerun it as a new job"
    )]
    CannotResumeCtid { job: JobId },
    #[error("the columns of {table} changed since job {job} was planned; rerun it as a new job")]
    TableChanged { job: JobId, table: String },
    #[error(
        "{table_dir}/_manifest.json in {dest} belongs to job {other}; pass --overwrite to replace that export, or choose another --dest"
    )]
    DestinationTaken {
        dest: String,
        table_dir: String,
        other: JobId,
    },
    #[error("chunk {chunk} failed: {reason}")]
    ChunkFailed { chunk: ChunkId, reason: String },
    #[error(
        "interrupted; committed chunks are kept: run again with --resume {job} --fresh-snapshot to finish"
    )]
    Interrupted { job: JobId },
    #[error(transparent)]
    Load(#[from] haul_worker::load_client::LoadClientError),
    #[error(transparent)]
    Loader(#[from] haul_worker::loader::LoadError),
    #[error("--load needs at least one loader address")]
    NoLoaders,
    #[error(
        "--incremental {column}: {table_dir}/_manifest.json in {dest} is a full export, not a series of increments; start the increments in another --dest (the first one reads everything up to its high mark)"
    )]
    NotIncremental {
        column: String,
        dest: String,
        table_dir: String,
    },
    #[error(
        "--incremental {column}: the increments in {dest} follow column {other:?}; keep that column, or choose another --dest"
    )]
    OtherWatermark {
        column: String,
        other: String,
        dest: String,
    },
    #[error(
        "--incremental {column}: the column has type {pg_type}; the watermark must be a timestamptz or timestamp column set to the time of each change"
    )]
    BadWatermark { column: String, pg_type: String },
    #[error(
        "--incremental cannot be combined with --load yet: an increment's changed rows must be merged into the target, which the loaders do not do"
    )]
    IncrementalLoad,
    #[error(
        "job {job}: another increment ({other}) was committed to {dest} while this one ran; its window no longer follows on, so it was not recorded. Run again"
    )]
    IncrementRaced {
        job: JobId,
        other: JobId,
        dest: String,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

/// Options of one `haul run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub spec: JobSpec,
    pub job_id: Option<JobId>,
    pub resume: bool,
    pub fresh_snapshot: bool,
    pub overwrite: bool,
    pub workers: usize,
    pub max_attempts: u32,
    pub lease_ttl: Duration,
    pub progress: ProgressMode,
    /// Load into this Postgres through an in-process loader (`--load-target`).
    pub load_target: Option<pg::Secret>,
    /// Schema of the in-process loader's ledger tables.
    pub ledger_schema: String,
}

/// What `plan.json` holds: enough to resume a job (the source DSN is not stored; the
/// user passes it again).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlanFile {
    pub job: JobId,
    pub table: String,
    pub dest: String,
    pub columns: Vec<String>,
    pub key: Vec<String>,
    #[serde(default)]
    pub split: haul_shared::jobs::Split,
    pub casts: std::collections::BTreeMap<String, String>,
    pub chunk_rows: u64,
    pub output: haul_shared::jobs::OutputOptions,
    pub use_snapshot: bool,
    #[serde(default)]
    pub incremental: Option<haul_shared::jobs::Incremental>,
    pub plan: JobPlan,
    pub created_at: String,
}

/// A column of the job manifest's schema.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ManifestColumn {
    pub name: String,
    pub pg_type: String,
    pub arrow_type: String,
    pub nullable: bool,
}

/// The commit point of a job, written last. Readers trust it, not a directory listing.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobManifest {
    pub job: JobId,
    pub table: String,
    pub source: String,
    pub snapshot: Option<String>,
    pub columns: Vec<ManifestColumn>,
    pub partition_by: Option<haul_shared::jobs::PartitionBy>,
    pub chunks: usize,
    pub rows: u64,
    pub bytes: u64,
    pub files: Vec<PartFile>,
    pub started_at: String,
    pub finished_at: String,
    /// An incremental job's window. In the table's `_manifest.json` of a series of
    /// increments: the last one's, whose `high` the next increment starts after, while
    /// `files`, `rows`, `bytes` and `chunks` count every increment so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<haul_shared::jobs::Window>,
    /// In the table's `_manifest.json` of a series of increments: their job ids, oldest
    /// first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub increments: Vec<JobId>,
}

/// The end-of-run summary.
#[derive(Clone, Debug)]
pub struct JobSummary {
    pub job: JobId,
    pub rows: u64,
    pub bytes: u64,
    pub files: usize,
    pub chunks: usize,
    pub wall: Duration,
    /// The job had already succeeded; nothing was done.
    pub already_done: bool,
    pub manifest: String,
    /// The table the rows were loaded into, with `--load`/`--load-target`.
    pub loaded_into: Option<String>,
}

impl std::fmt::Display for JobSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.already_done {
            return write!(
                f,
                "job {} had already succeeded: {} rows, {} files ({})",
                self.job, self.rows, self.files, self.manifest
            );
        }
        let secs = self.wall.as_secs_f64().max(1e-6);
        if let (0, Some(t)) = (self.files, &self.loaded_into) {
            // a load-only job
            return write!(
                f,
                "job {} succeeded: {} rows loaded into {t} from {} chunks, {:.2}s wall, {:.0} rows/s\nmanifest: {}",
                self.job,
                self.rows,
                self.chunks,
                secs,
                self.rows as f64 / secs,
                self.manifest
            );
        }
        write!(
            f,
            "job {} succeeded: {} rows, {:.1} MiB in {} files from {} chunks, {:.2}s wall, {:.0} rows/s\nmanifest: {}",
            self.job,
            self.rows,
            self.bytes as f64 / (1024.0 * 1024.0),
            self.files,
            self.chunks,
            secs,
            self.rows as f64 / secs,
            self.manifest
        )?;
        if let Some(t) = &self.loaded_into {
            write!(f, "\nloaded: {} rows into {t}", self.rows)?;
        }
        Ok(())
    }
}

/// How a job is prepared: which job, and what to do about an earlier attempt of it.
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    pub job_id: Option<JobId>,
    pub resume: bool,
    pub fresh_snapshot: bool,
    pub overwrite: bool,
    /// Workers (times slots) expected to extract at once; the planner makes at least
    /// twice as many chunks when the table is big enough.
    pub parallelism: usize,
}

/// A planned job, ready for its chunks to be queued.
pub struct Prepared {
    pub job: JobId,
    /// The spec as planned (a resumed job keeps its original shape).
    pub spec: JobSpec,
    pub plan: JobPlan,
    pub dest: Dest,
    /// The session holding the exported snapshot open (its transaction is already
    /// committed when the job reads without one).
    pub holder: pg::Session,
    /// Chunks an earlier attempt committed, (re)published already.
    pub committed: std::collections::BTreeMap<ChunkId, ChunkManifest>,
    pub table_dir: String,
    pub started_at: String,
    /// This call planned the job (it is not a resume).
    pub planned_now: bool,
}

/// The outcome of preparing a job.
pub enum Preparation {
    /// The job had already succeeded; nothing to do.
    AlreadyDone(Box<JobManifest>),
    Ready(Box<Prepared>),
}

/// Checks the destination, opens the snapshot, plans (or reloads the plan of a resumed
/// job), writes `plan.json`, and republishes chunks committed earlier. Shared by
/// `haul run` and the cluster coordinator.
pub async fn prepare(spec: &JobSpec, opts: &PrepareOptions) -> Result<Preparation, RunError> {
    let started_at = chrono::Utc::now().to_rfc3339();
    if spec.incremental.is_some() && spec.load.is_some() {
        return Err(RunError::IncrementalLoad);
    }
    let mut spec = spec.clone();
    let dest = Dest::open(&spec.dest, spec.output.fsync)?;
    dest.check_writable().await?;
    let job = opts.job_id.clone().unwrap_or_else(JobId::generate);

    if let Some(m) = dest
        .get_json::<JobManifest>(&dest.job_manifest_path(&job))
        .await?
    {
        return Ok(Preparation::AlreadyDone(Box::new(m)));
    }
    let previous: Option<PlanFile> = dest.get_json(&dest.plan_path(&job)).await?;
    match (&previous, opts.resume) {
        (Some(_), false) => return Err(RunError::AlreadyStarted { job }),
        (None, true) => {
            return Err(RunError::NoSuchJob {
                job,
                dest: dest.url.clone(),
            });
        }
        _ => {}
    }
    if let Some(p) = &previous {
        // a resumed job keeps its original shape; only the source comes from the caller
        spec.table = p.table.clone();
        spec.columns = p.columns.clone();
        spec.key = p.key.clone();
        spec.split = p.split;
        spec.casts = p.casts.clone();
        spec.chunk_rows = p.chunk_rows;
        spec.output = p.output.clone();
        spec.use_snapshot = p.use_snapshot;
        spec.incremental = p.incremental.clone();
        if let Some(s) = &p.plan.snapshot
            && !opts.fresh_snapshot
        {
            return Err(RunError::NeedsFreshSnapshot {
                job,
                snapshot: s.clone(),
            });
        }
        if p.plan.chunks.iter().any(|c| !c.survives_new_snapshot()) {
            return Err(RunError::CannotResumeCtid { job });
        }
    }

    // The planning session holds the snapshot open until the job ends. A source that is
    // restarting or briefly unreachable gets a few tries; a wrong DSN fails at once.
    let holder = (|| pg::connect(&spec.source))
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_times(4),
        )
        .when(|e| e.class().is_retryable())
        .notify(|e, wait| warn!(error = %e, ?wait, "connecting to the source failed; retrying"))
        .await?;
    // named, so operators can tell it apart in pg_stat_activity (it holds back vacuum)
    holder
        .client
        .batch_execute(&format!(
            "SET application_name = {}",
            pg::quote_literal(&format!("haul:snapshot:{job}"))
        ))
        .await
        .map_err(|e| SourceError::query("naming the snapshot session", e))?;
    holder
        .client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(|e| SourceError::query("beginning the snapshot transaction", e))?;
    let snapshot = if spec.use_snapshot {
        let row = holder
            .client
            .query_one("SELECT pg_export_snapshot()", &[])
            .await
            .map_err(|e| SourceError::SnapshotUnsupported {
                reason: pg::pg_reason(&e),
            })?;
        Some(row.get::<_, String>(0))
    } else {
        None
    };
    let table = pg::resolve_table(&holder.client, &spec.table, &spec.columns, &spec.casts).await?;
    if let Some(p) = &spec.output.partition_by
        && table.column(&p.column).is_none()
    {
        return Err(SourceError::ColumnNotFound {
            table: table.quoted(),
            column: p.column.clone(),
        }
        .into());
    }
    let tdir = table_dir(&table.name);

    let plan = match &previous {
        Some(p) => {
            if p.plan.table.columns != table.columns {
                return Err(RunError::TableChanged {
                    job,
                    table: table.quoted(),
                });
            }
            JobPlan {
                snapshot: snapshot.clone(),
                ..p.plan.clone()
            }
        }
        None => {
            let existing: Option<JobManifest> =
                dest.get_json(&dest.table_manifest_path(&tdir)).await?;
            let window = match &spec.incremental {
                Some(inc) => Some(
                    window(&holder.client, &table, inc, existing.as_ref(), &dest, &tdir).await?,
                ),
                None => {
                    if !opts.overwrite
                        && spec.output.parquet
                        && let Some(m) = existing
                    {
                        return Err(RunError::DestinationTaken {
                            dest: dest.url.clone(),
                            table_dir: tdir,
                            other: m.job,
                        });
                    }
                    None
                }
            };
            let filter = window.as_ref().map(|w| w.predicate());
            let t0 = Instant::now();
            let planned = planner::plan(
                &holder.client,
                &table,
                &spec.key,
                spec.chunk_rows,
                opts.parallelism.max(1) as u64,
                spec.split,
                filter.as_deref(),
            )
            .await?;
            info!(
                chunks = planned.chunks.len(),
                estimated_rows = planned.estimated_rows,
                key = ?planned.key.iter().map(|k| quote_ident(&k.name)).collect::<Vec<_>>(),
                planning_ms = t0.elapsed().as_millis() as u64,
                "planned"
            );
            JobPlan {
                table: table.clone(),
                key: planned.key,
                chunks: planned.chunks,
                estimated_rows: planned.estimated_rows,
                snapshot: snapshot.clone(),
                window,
            }
        }
    };
    if snapshot.is_none() {
        // without a snapshot to hold, the planning transaction need not stay open (it
        // would only hold back vacuum)
        holder
            .client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| SourceError::query("ending the planning transaction", e))?;
    }
    let plan_file = PlanFile {
        job: job.clone(),
        table: spec.table.clone(),
        dest: spec.dest.clone(),
        columns: spec.columns.clone(),
        key: spec.key.clone(),
        split: spec.split,
        casts: spec.casts.clone(),
        chunk_rows: spec.chunk_rows,
        output: spec.output.clone(),
        use_snapshot: spec.use_snapshot,
        incremental: spec.incremental.clone(),
        plan: plan.clone(),
        created_at: started_at.clone(),
    };
    if !dest
        .put_json(&dest.plan_path(&job), &plan_file, previous.is_none())
        .await?
    {
        // another process planned the same job id between our check and now
        return Err(RunError::AlreadyStarted { job });
    }

    // Chunks committed by an earlier run are (re)published and skipped.
    let mut committed = std::collections::BTreeMap::new();
    for m in dest.chunk_manifests(&job).await? {
        dest.publish(&m).await?;
        committed.insert(m.chunk, m);
    }

    Ok(Preparation::Ready(Box::new(Prepared {
        job,
        spec,
        plan,
        dest,
        holder,
        committed,
        table_dir: tdir,
        started_at,
        planned_now: previous.is_none(),
    })))
}

/// An incremental job's window, computed in the planning transaction (the job's
/// snapshot): `low` is the high mark of the destination's last increment, `high` the
/// snapshot's time less the lag, and earlier than the start of every transaction that
/// was writing in the database at that moment, so a row committed after the snapshot
/// (its watermark no earlier than its transaction's start) always falls in a later
/// window.
async fn window(
    client: &tokio_postgres::Client,
    table: &pg::TableInfo,
    inc: &haul_shared::jobs::Incremental,
    existing: Option<&JobManifest>,
    dest: &Dest,
    tdir: &str,
) -> Result<haul_shared::jobs::Window, RunError> {
    let low = match existing {
        None => None,
        Some(m) => match &m.watermark {
            None => {
                return Err(RunError::NotIncremental {
                    column: inc.column.clone(),
                    dest: dest.url.clone(),
                    table_dir: tdir.to_owned(),
                });
            }
            Some(w) if w.column != inc.column => {
                return Err(RunError::OtherWatermark {
                    column: inc.column.clone(),
                    other: w.column.clone(),
                    dest: dest.url.clone(),
                });
            }
            Some(w) => Some(w.high.clone()),
        },
    };
    let row = client
        .query_opt(
            "SELECT atttypid::regtype::text FROM pg_attribute \
             WHERE attrelid = $1::oid AND attname = $2 AND attnum > 0 AND NOT attisdropped",
            &[&table.oid, &inc.column],
        )
        .await
        .map_err(|e| SourceError::query("looking up the watermark column", e))?
        .ok_or_else(|| SourceError::ColumnNotFound {
            table: table.quoted(),
            column: inc.column.clone(),
        })?;
    let pg_type: String = row.get(0);
    // the window's type, and the cast that turns `now()` into it
    let (window_type, as_type) = match pg_type.as_str() {
        "timestamp with time zone" => ("timestamptz", ""),
        // the session's time zone is UTC
        "timestamp without time zone" => ("timestamp", "::timestamp"),
        _ => {
            return Err(RunError::BadWatermark {
                column: inc.column.clone(),
                pg_type,
            });
        }
    };
    // Who can see other sessions' transactions: without that, only the lag protects
    // rows that commit late.
    let sees_all: bool = client
        .query_one(
            "SELECT pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') \
             OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
            &[],
        )
        .await
        .map_err(|e| SourceError::query("checking the role's privileges", e))?
        .get(0);
    if !sees_all {
        warn!(
            "the source user cannot see other sessions' transactions (grant it pg_read_all_stats): \
             only --lag-secs guards rows committed after the snapshot"
        );
    }
    let high: String = client
        .query_one(
            &format!(
                "SELECT (LEAST(now() - make_interval(secs => $1::float8), \
                   (SELECT min(xact_start) - interval '1 microsecond' FROM pg_stat_activity \
                    WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() \
                      AND datname = current_database())){as_type})::text"
            ),
            &[&(inc.lag_secs as f64)],
        )
        .await
        .map_err(|e| SourceError::query("computing the window's high mark", e))?
        .get(0);
    Ok(haul_shared::jobs::Window {
        column: inc.column.clone(),
        pg_type: window_type.into(),
        low,
        high,
    })
}

/// Runs a job to its end in this process.
pub async fn run(
    mut opts: RunOptions,
    interrupt: CancellationToken,
) -> Result<JobSummary, RunError> {
    let started = Instant::now();
    let loader_stop = CancellationToken::new();
    let _stop_loader = loader_stop.clone().drop_guard();
    if let Some(target) = &opts.load_target {
        let url = start_local_loader(target, &opts.ledger_schema, loader_stop).await?;
        if let Some(l) = opts.spec.load.as_mut() {
            l.endpoints = vec![url];
        }
    }
    let prepare_opts = PrepareOptions {
        job_id: opts.job_id.clone(),
        resume: opts.resume,
        fresh_snapshot: opts.fresh_snapshot,
        overwrite: opts.overwrite,
        parallelism: opts.workers,
    };
    let mut p = match prepare(&opts.spec, &prepare_opts).await? {
        Preparation::AlreadyDone(m) => {
            let dest = Dest::open(&opts.spec.dest, false)?;
            return Ok(JobSummary {
                job: m.job.clone(),
                rows: m.rows,
                bytes: m.bytes,
                files: m.files.len(),
                chunks: m.chunks,
                wall: started.elapsed(),
                already_done: true,
                manifest: format!("{}/_haul/jobs/{}/_manifest.json", dest.url, m.job),
                loaded_into: None,
            });
        }
        Preparation::Ready(p) => *p,
    };
    prepare_load(&mut p, &haul_worker::load_client::LoadAuth::default()).await?;
    let Prepared {
        job,
        spec,
        plan,
        dest,
        holder,
        committed,
        table_dir: tdir,
        started_at,
        ..
    } = p;
    let snapshot = plan.snapshot.clone();

    let queue = MemoryQueue::new(opts.max_attempts);
    let jobs = MemoryJobStore::default();
    let record = JobRecord {
        id: job.clone(),
        spec: spec.clone(),
        plan: Some(plan.clone()),
        state: JobState::Running,
        submitted_at: started_at.clone(),
    };
    jobs.put_job(&record).await.map_err(internal)?;
    queue_chunks(&record, &committed, &jobs, &queue).await?;

    let svc = Services {
        queue: Arc::new(queue),
        leases: Arc::new(MemoryLeaseStore::default()),
        jobs: Arc::new(jobs.clone()),
    };
    let progress = Arc::new(Progress::default());
    let ctl = Control::default();
    let workers: Vec<_> = (0..opts.workers.max(1))
        .map(|i| {
            let cfg = WorkerConfig {
                id: WorkerId(format!("local-{i}")),
                slots: 1,
                lease_ttl: opts.lease_ttl,
                max_attempts: opts.max_attempts,
                load_auth: Default::default(),
            };
            tokio::spawn(run_worker(
                cfg,
                svc.clone(),
                Arc::clone(&progress),
                ctl.clone(),
            ))
        })
        .collect();

    let mut reporter = Reporter::new(opts.progress, &job, plan.estimated_rows, plan.chunks.len());
    let committed_rows_before: u64 = committed.values().map(|m| m.rows).sum();
    reporter.set_base(committed_rows_before);
    let mut closed = holder.closed.clone();
    let outcome: Result<(), RunError> = loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = interrupt.cancelled() => break Err(RunError::Interrupted { job: job.clone() }),
            // only a snapshot-holding session matters once planning is done
            _ = closed.changed(), if snapshot.is_some() => {
                let s = snapshot.clone().unwrap_or_default();
                break Err(SourceError::SnapshotLost { snapshot: s }.into());
            }
        }
        let states = jobs.chunk_states(&job).await.map_err(internal)?;
        let done = states
            .values()
            .filter(|s| matches!(s, ChunkState::Committed { .. }))
            .count();
        reporter.update(&progress, done);
        if let Some((chunk, ChunkState::Failed { reason })) = states
            .iter()
            .find(|(_, s)| matches!(s, ChunkState::Failed { .. }))
        {
            break Err(RunError::ChunkFailed {
                chunk: *chunk,
                reason: reason.clone(),
            });
        }
        if done == plan.chunks.len() {
            break Ok(());
        }
    };
    ctl.stop();
    for w in workers {
        if let Ok(Err(e)) = w.await {
            warn!(error = %e, "worker ended with an error");
        }
    }
    reporter.finish();
    let staging = format!("_haul/staging/{job}");
    if let Err(e) = outcome {
        let _ = jobs
            .set_job_state(
                &job,
                &JobState::Failed {
                    reason: e.to_string(),
                },
            )
            .await;
        if let Err(e) = dest.delete_prefix(&staging).await {
            warn!(error = %e, "could not clean the staging area");
        }
        return Err(e);
    }

    let manifest = commit_job(&dest, &job, &spec, &plan, &tdir, started_at).await?;
    let _ = holder.client.batch_execute("COMMIT").await;
    Ok(JobSummary {
        job: job.clone(),
        rows: manifest.rows,
        bytes: manifest.bytes,
        files: manifest.files.len(),
        chunks: manifest.chunks,
        wall: started.elapsed(),
        already_done: false,
        manifest: if spec.output.parquet {
            format!("{}/{tdir}/_manifest.json", dest.url)
        } else {
            format!("{}/_haul/jobs/{job}/_manifest.json", dest.url)
        },
        loaded_into: spec.load.as_ref().map(|l| l.target_table.clone()),
    })
}

/// Starts an in-process loader on a loopback port (`haul run --load-target`); it serves
/// until `stop` fires. Returns its address.
async fn start_local_loader(
    target: &pg::Secret,
    ledger_schema: &str,
    stop: CancellationToken,
) -> Result<String, RunError> {
    use haul_worker::loader::{Loader, LoaderOptions, serve};
    // fail here, before any work, if the target cannot take the ledger
    Loader::new(target.clone(), ledger_schema)
        .ensure_ledger()
        .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| RunError::Internal(format!("binding the in-process loader: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| RunError::Internal(e.to_string()))?;
    let opts = LoaderOptions {
        target: target.clone(),
        ledger_schema: ledger_schema.to_owned(),
        token: None,
        tls: None,
        metrics_listen: None,
    };
    tokio::spawn(async move {
        if let Err(e) = serve(listener, opts, stop).await {
            warn!(error = %e, "the in-process loader stopped");
        }
    });
    Ok(format!("http://{addr}"))
}

/// With `--load`: names the target table (the source table's name unless given) and
/// prepares the job on it through a loader — created, checked against the columns, and
/// emptied if asked, once per job — before any chunk is queued.
pub async fn prepare_load(
    p: &mut Prepared,
    auth: &haul_worker::load_client::LoadAuth,
) -> Result<(), RunError> {
    let Some(load) = p.spec.load.as_mut() else {
        return Ok(());
    };
    if load.endpoints.is_empty() {
        return Err(RunError::NoLoaders);
    }
    if load.target_table.is_empty() {
        load.target_table = p.plan.table.quoted();
    }
    let schema = std::sync::Arc::new(p.plan.table.arrow_schema());
    let req = haul_shared::proto::wire::PrepareLoad {
        version: haul_shared::proto::LOAD_VERSION,
        job_id: p.job.to_string(),
        target_table: load.target_table.clone(),
        arrow_schema: haul_worker::loader::schema_to_ipc(&schema)
            .map_err(|e| RunError::Internal(format!("encoding the schema: {e}")))?
            .to_vec(),
        create_table: load.create_table,
        truncate_first: load.truncate_first,
    };
    let client = haul_worker::load_client::LoadClient::new(load, auth);
    let reply = match client.prepare(req).await {
        Ok(r) => r,
        Err(e) => {
            // nothing was queued: let the same job id be submitted again once fixed
            if p.planned_now {
                let _ = p.dest.delete_if_exists(&p.dest.plan_path(&p.job)).await;
            }
            return Err(e.into());
        }
    };
    info!(
        target = %reply.target_table,
        created = reply.created,
        truncated = reply.truncated,
        resumed = reply.already_prepared,
        "load target ready"
    );
    load.target_table = reply.target_table;
    Ok(())
}

/// Records every chunk's state (committed ones as committed) and queues the rest.
pub async fn queue_chunks(
    record: &JobRecord,
    committed: &std::collections::BTreeMap<ChunkId, ChunkManifest>,
    jobs: &dyn JobStore,
    queue: &dyn ChunkQueue,
) -> Result<(), RunError> {
    let plan = record
        .plan
        .as_ref()
        .ok_or_else(|| RunError::Internal(format!("job {} has no plan", record.id)))?;
    for (i, range) in plan.chunks.iter().enumerate() {
        let chunk = ChunkId(i as u32);
        if let Some(m) = committed.get(&chunk) {
            let state = ChunkState::Committed {
                rows: m.rows,
                bytes: m.bytes,
            };
            jobs.set_chunk_state(&record.id, chunk, &state)
                .await
                .map_err(internal)?;
            continue;
        }
        jobs.set_chunk_state(&record.id, chunk, &ChunkState::Pending)
            .await
            .map_err(internal)?;
        let task = Task {
            job_id: record.id.clone(),
            chunk_id: chunk,
            range: range.clone(),
        };
        queue.publish(task.encode()).await.map_err(internal)?;
    }
    Ok(())
}

/// Commits a job whose chunks are all committed: the job manifest is written last, then
/// the table's manifest; parts of an export it replaces and the staging area are removed.
pub async fn commit_job(
    dest: &Dest,
    job: &JobId,
    spec: &JobSpec,
    plan: &JobPlan,
    tdir: &str,
    started_at: String,
) -> Result<JobManifest, RunError> {
    let chunks = dest.chunk_manifests(job).await?;
    if chunks.len() != plan.chunks.len() {
        return Err(RunError::Internal(format!(
            "{} chunk manifests for {} chunks",
            chunks.len(),
            plan.chunks.len()
        )));
    }
    let manifest = job_manifest(job, spec, plan, &chunks, started_at);
    if !spec.output.parquet {
        // a load-only job: its manifest records it as done; there is no export to name
        dest.put_json(&dest.job_manifest_path(job), &manifest, true)
            .await?;
        dest.delete_prefix(&format!("_haul/staging/{job}")).await?;
        return Ok(manifest);
    }
    let old: Option<JobManifest> = dest.get_json(&dest.table_manifest_path(tdir)).await?;
    if let Some(w) = &plan.window {
        // The table's manifest is the increment's commit point, so it is written before
        // the job's own manifest: a job manifest never exists for an increment the
        // table's manifest does not list.
        match old {
            // recorded before the process stopped; only the job's own manifest is missing
            Some(o) if o.job == *job => {}
            old => {
                let table = increments_with(old, w, job, &manifest, dest, tdir)?;
                dest.put_json(&dest.table_manifest_path(tdir), &table, false)
                    .await?;
            }
        }
        dest.put_json(&dest.job_manifest_path(job), &manifest, true)
            .await?;
        dest.delete_prefix(&format!("_haul/staging/{job}")).await?;
        return Ok(manifest);
    }
    dest.put_json(&dest.job_manifest_path(job), &manifest, true)
        .await?;
    dest.put_json(&dest.table_manifest_path(tdir), &manifest, false)
        .await?;
    if let Some(old) = old.filter(|o| &o.job != job) {
        // --overwrite: the previous export's parts go once the new one is committed
        for f in &old.files {
            if let Err(e) = dest.delete_if_exists(&dest.path(&f.path)).await {
                warn!(error = %e, file = %f.path, "could not remove a part of the replaced export");
            }
        }
    }
    dest.delete_prefix(&format!("_haul/staging/{job}")).await?;
    Ok(manifest)
}

/// The table's manifest of a series of increments with `increment` added: it must follow
/// on from the last one recorded in `old` (or be the first), and it then lists every
/// increment's files and rows, and the new high mark.
fn increments_with(
    old: Option<JobManifest>,
    w: &haul_shared::jobs::Window,
    job: &JobId,
    increment: &JobManifest,
    dest: &Dest,
    tdir: &str,
) -> Result<JobManifest, RunError> {
    let mut table = match old {
        Some(o) if o.watermark.as_ref().map(|ow| &ow.high) != w.low.as_ref() => {
            return Err(RunError::IncrementRaced {
                job: job.clone(),
                other: o.job,
                dest: dest.url.clone(),
            });
        }
        Some(o) => o,
        None if w.low.is_some() => {
            return Err(RunError::Internal(format!(
                "the increments' manifest {tdir}/_manifest.json vanished"
            )));
        }
        None => JobManifest {
            increments: Vec::new(),
            chunks: 0,
            rows: 0,
            bytes: 0,
            files: Vec::new(),
            ..increment.clone()
        },
    };
    table.increments.push(job.clone());
    table.job = job.clone();
    table.snapshot = increment.snapshot.clone();
    table.columns = increment.columns.clone();
    table.chunks += increment.chunks;
    table.rows += increment.rows;
    table.bytes += increment.bytes;
    table.files.extend(increment.files.iter().cloned());
    table.finished_at = increment.finished_at.clone();
    table.watermark = increment.watermark.clone();
    Ok(table)
}

fn job_manifest(
    job: &JobId,
    spec: &JobSpec,
    plan: &JobPlan,
    chunks: &[ChunkManifest],
    started_at: String,
) -> JobManifest {
    let schema = plan.table.arrow_schema();
    JobManifest {
        job: job.clone(),
        table: format!("{}.{}", plan.table.schema, plan.table.name),
        source: spec.source.to_string(),
        snapshot: plan.snapshot.clone(),
        columns: plan
            .table
            .columns
            .iter()
            .zip(schema.fields())
            .map(|(c, f)| ManifestColumn {
                name: c.name.clone(),
                pg_type: c.pg_type.clone(),
                arrow_type: f.data_type().to_string(),
                nullable: f.is_nullable(),
            })
            .collect(),
        partition_by: spec.output.partition_by.clone(),
        chunks: chunks.len(),
        rows: chunks.iter().map(|c| c.rows).sum(),
        bytes: chunks.iter().map(|c| c.bytes).sum(),
        files: chunks
            .iter()
            .flat_map(|c| c.files.iter().cloned())
            .collect(),
        started_at,
        finished_at: chrono::Utc::now().to_rfc3339(),
        watermark: plan.window.clone(),
        increments: Vec::new(),
    }
}

fn internal(e: impl std::fmt::Display) -> RunError {
    RunError::Internal(e.to_string())
}
