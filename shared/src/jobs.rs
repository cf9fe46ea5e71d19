//! Jobs: what the user asked for ([`JobSpec`]), what the planner decided ([`JobPlan`]),
//! and where the job stands ([`JobStore`]).
//!
//! # Contract of [`JobStore`]
//! - Every write is atomic and last-writer-wins per job (per chunk for chunk states),
//!   except that a committed chunk stays committed: a late writer (a zombie attempt, a
//!   redelivery that failed) cannot set it back to pending, running, parked or failed.
//! - The store is a coordination cache: the object store's chunk and job manifests are the
//!   truth about what is committed. Losing the store may cause re-work, never lost or
//!   doubled data.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::lease::StoreError;
use crate::pg::{ConnInfo, TableInfo};
pub use crate::range::KeyColumn;
use crate::{ChunkId, ChunkRange, JobId, WorkerId};

/// Parquet compression codec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    Snappy,
    Zstd { level: i32 },
    None,
}

/// Granularity of Hive-style partitioning by a date/timestamp column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    Day,
    Month,
    Year,
}

/// Hive-style partitioning by a date/timestamp column: folders `<field>=<value>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionBy {
    pub column: String,
    pub granularity: Granularity,
    /// The partition field's name (`dt` unless given): what the folders are called, and
    /// the column a Hive-partitioning reader adds. It must not name an exported column.
    #[serde(default = "default_partition_field")]
    pub field: String,
}

/// The partition field's name unless the user names it.
pub const DEFAULT_PARTITION_FIELD: &str = "dt";

fn default_partition_field() -> String {
    DEFAULT_PARTITION_FIELD.to_owned()
}

impl PartitionBy {
    /// Partitioning by `column` into `dt=` folders.
    pub fn new(column: impl Into<String>, granularity: Granularity) -> Self {
        Self {
            column: column.into(),
            granularity,
            field: default_partition_field(),
        }
    }
}

/// Output file shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputOptions {
    pub compression: Compression,
    /// Rows per Arrow record batch read from the source.
    pub batch_rows: usize,
    /// Rows per Parquet row group.
    pub row_group_rows: usize,
    /// A part file is closed, and the next one started, past this many rows ...
    pub max_file_rows: u64,
    /// ... or this many bytes.
    pub max_file_bytes: u64,
    pub partition_by: Option<PartitionBy>,
    /// Local destinations: sync part files and manifests to disk before each commit, so a
    /// power loss cannot leave a committed chunk with torn files (object stores are
    /// durable on upload anyway).
    #[serde(default)]
    pub fsync: bool,
    /// Write Parquet parts (off for a job that only loads a target; its manifests still
    /// go to the destination).
    #[serde(default = "yes")]
    pub parquet: bool,
    /// Add `_haul_job_id` and `_haul_extracted_at` (the job's snapshot time) to every
    /// row of the Parquet output, for downstream freshness checks, de-duplication and
    /// lineage (`--lineage-columns`).
    #[serde(default)]
    pub lineage: bool,
}

/// The most rows one Arrow batch may hold (a batch is also cut at 32 MiB; its builders
/// are sized for this many rows up front, so a larger value could not even be allocated).
pub const MAX_BATCH_ROWS: u64 = 1 << 20;
/// The most rows one Parquet row group may hold.
pub const MAX_ROW_GROUP_ROWS: u64 = 1 << 24;
/// The most workers (or slots, or planned parallelism) one process or job asks for.
pub const MAX_WORKERS: u64 = 1024;

/// `n` if it lies in `1..=max`; otherwise one line naming the flag and the limit.
pub fn bounded(n: u64, max: u64, flag: &str) -> Result<u64, String> {
    match n {
        0 => Err(format!("{flag} must be at least 1")),
        n if n > max => Err(format!("{flag} {n} is above its limit of {max}")),
        n => Ok(n),
    }
}

/// The columns `--lineage-columns` adds to every row: the job's id, and the time of its
/// snapshot.
pub const LINEAGE_COLUMNS: [&str; 2] = ["_haul_job_id", "_haul_extracted_at"];

fn yes() -> bool {
    true
}

impl Default for OutputOptions {
    fn default() -> Self {
        Self {
            compression: Compression::Snappy,
            batch_rows: 32768,
            row_group_rows: 128 * 1024,
            max_file_rows: 10_000_000,
            max_file_bytes: 512 * 1024 * 1024,
            partition_by: None,
            fsync: false,
            parquet: true,
            lineage: false,
        }
    }
}

/// How a table is cut into chunks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Key ranges (resumable under a new snapshot); heap page ranges only for tables
    /// without a usable key.
    #[default]
    Key,
    /// Heap page (ctid) ranges: the cheapest scan for the source, but valid only in the
    /// job's own snapshot, so an interrupted job cannot resume and must be rerun.
    Ctid,
}

/// What the user asked for.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobSpec {
    /// The source's connection options, never a password (each process that connects
    /// has its own credentials).
    pub source: ConnInfo,
    /// The table as the user named it (`schema.table`, quoting allowed).
    pub table: String,
    /// Columns to extract; all when empty.
    pub columns: Vec<String>,
    /// Key columns to split on; the primary key (or a unique not-null index) when empty.
    pub key: Vec<String>,
    /// How to split the table.
    #[serde(default)]
    pub split: Split,
    /// `column -> postgres type` casts applied in the source query (e.g. `text`).
    pub casts: BTreeMap<String, String>,
    /// Destination URL (`file:///...`, `s3://...`).
    pub dest: String,
    pub chunk_rows: u64,
    pub output: OutputOptions,
    /// Read all chunks from one exported snapshot (the default). Without it, each chunk
    /// sees the table as of its own start.
    pub use_snapshot: bool,
    /// Also load every chunk into a target database through loaders.
    #[serde(default)]
    pub load: Option<LoadSpec>,
    /// Extract only what changed since the destination's last increment (`--incremental`).
    #[serde(default)]
    pub incremental: Option<Incremental>,
    /// How long a chunk's transient failures are retried (with backoff) before it fails
    /// for good (`--retry-for`).
    #[serde(default = "default_retry_for_secs")]
    pub retry_for_secs: u64,
}

/// `--retry-for`'s default: ten minutes, enough to ride out a failover, a rescheduled pod
/// or a broker restart.
pub const DEFAULT_RETRY_FOR_SECS: u64 = 600;

fn default_retry_for_secs() -> u64 {
    DEFAULT_RETRY_FOR_SECS
}

impl JobSpec {
    /// The one rule of the loading options: a target table, creating or emptying it, and
    /// writing no Parquet mean nothing without loaders.
    pub fn check_load(&self) -> Result<(), String> {
        let without_loaders = match &self.load {
            None => !self.output.parquet,
            Some(l) => l.endpoints.is_empty(),
        };
        if without_loaders {
            Err("--target-table, --create-table, --truncate-first and --no-parquet need loaders: --load (or, for `haul run`, --load-target)".into())
        } else if self.output.lineage && self.load.is_some() {
            Err("--lineage-columns adds columns to the Parquet output only, not to a loaded target: drop --lineage-columns or the loading flags".into())
        } else {
            Ok(())
        }
    }
}

/// A job as a client submits it: the spec, and which job it is.
#[derive(Clone, Debug)]
pub struct Submission {
    pub spec: JobSpec,
    /// Generated when absent.
    pub job_id: Option<JobId>,
    /// Finish an interrupted job (its committed chunks are kept).
    pub resume: bool,
    pub fresh_snapshot: bool,
    pub overwrite: bool,
}

/// Incremental extraction on a watermark column (`--incremental <column>`): each job reads
/// the rows whose watermark lies in `(low, high]`, `low` being the high mark of the last
/// increment committed to the destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incremental {
    /// A `timestamptz` or `timestamp` (taken as UTC) column that every insert and update
    /// sets to the time of the change (e.g. `updated_at`, set by a default or a trigger).
    pub column: String,
    /// `high` lags the snapshot's time by this much, for clocks that write the column
    /// late (an application's own clock).
    pub lag_secs: u64,
}

/// The rows an incremental job reads: `low < column <= high`, as text in the column's
/// type, fixed at planning inside the job's snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub column: String,
    pub pg_type: String,
    /// `None` for the first increment: everything up to `high`.
    pub low: Option<String>,
    pub high: String,
}

impl Window {
    /// The window as a `WHERE` predicate; the identifier is quoted and the bounds are
    /// quoted literals cast to the column's type.
    pub fn predicate(&self) -> String {
        let col = crate::pg::quote_ident(&self.column);
        let lit = |v: &str| format!("{}::{}", crate::pg::quote_literal(v), self.pg_type);
        match &self.low {
            Some(low) => format!("{col} > {} AND {col} <= {}", lit(low), lit(&self.high)),
            None => format!("{col} <= {}", lit(&self.high)),
        }
    }
}

/// Where and how a job's chunks are loaded (`--load`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadSpec {
    /// Loader endpoints (`http://host:port`, or `https://` for TLS); chunks are spread
    /// across them, and a chunk goes to another one when its first choice is down.
    pub endpoints: Vec<String>,
    /// The target table (`schema.table`, quoting allowed).
    pub target_table: String,
    /// Create the target table from the stream's schema when it does not exist.
    pub create_table: bool,
    /// Empty the target table once, before the job's first chunk is loaded.
    pub truncate_first: bool,
}

/// What the planner decided, inside the job's snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobPlan {
    pub table: TableInfo,
    /// Key columns used for ranges (empty for ctid ranges or a single chunk).
    pub key: Vec<KeyColumn>,
    pub chunks: Vec<ChunkRange>,
    pub estimated_rows: u64,
    /// The exported snapshot id every chunk imports, if any.
    pub snapshot: Option<String>,
    /// When the snapshot was taken (RFC 3339; without a snapshot, when the job was
    /// planned): the rows' `_haul_extracted_at` with `--lineage-columns`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_at: Option<String>,
    /// An incremental job's window; every chunk reads only the rows in it.
    #[serde(default)]
    pub window: Option<Window>,
    /// The table in the destination as the job was planned against it: its commit
    /// applies only while the table's log still follows on from it.
    #[serde(default)]
    pub base: TableBase,
    /// The source's database (`current_database()`), recorded as the table's owner in
    /// the lake with the table's schema and name.
    #[serde(default)]
    pub database: String,
}

impl JobPlan {
    /// The table's folder in the destination.
    pub fn table_dir(&self) -> String {
        crate::lake::table_dir(&self.table.schema, &self.table.name)
    }
}

/// The fields `--lineage-columns` adds to the Parquet output (see [`LINEAGE_COLUMNS`]).
pub fn lineage_fields() -> [arrow_schema::Field; 2] {
    use arrow_schema::{DataType, Field, TimeUnit};
    [
        Field::new(LINEAGE_COLUMNS[0], DataType::Utf8, false),
        Field::new(
            LINEAGE_COLUMNS[1],
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
    ]
}

/// The schema of a job's Parquet parts: the table's columns, then the lineage columns
/// when asked for.
pub fn export_schema(table: &crate::pg::TableInfo, lineage: bool) -> arrow_schema::Schema {
    let schema = table.arrow_schema();
    if !lineage {
        return schema;
    }
    let mut fields: Vec<arrow_schema::Field> =
        schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.extend(lineage_fields());
    arrow_schema::Schema::new_with_metadata(fields, schema.metadata().clone())
}

/// A table of the lake as a job was planned against it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableBase {
    /// How many haul jobs the table's log held (its haul `txn` version): the job commits
    /// as the next one.
    pub seq: u64,
    /// The log version read (`None`: no log).
    #[serde(default)]
    pub version: Option<u64>,
    /// The table's latest job then, if any.
    #[serde(default)]
    pub job: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum JobState {
    Planning,
    Running,
    /// No new chunks start; chunks already running finish.
    Paused,
    Succeeded,
    Failed {
        reason: String,
    },
    Cancelled,
}

impl JobState {
    /// The state's name as the CLI and API show it.
    pub fn name(&self) -> &'static str {
        match self {
            JobState::Planning => "planning",
            JobState::Running => "running",
            JobState::Paused => "paused",
            JobState::Succeeded => "succeeded",
            JobState::Failed { .. } => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed { .. } | JobState::Cancelled
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ChunkState {
    Pending,
    Running {
        worker: WorkerId,
        attempt: u32,
    },
    Committed {
        rows: u64,
        bytes: u64,
    },
    Failed {
        reason: String,
    },
    /// Its task arrived while the job was paused; the coordinator queues it again on
    /// resume.
    Parked,
    /// Its last attempt failed transiently: the coordinator queues it again at
    /// `retry_at_ms` (ms since the Unix epoch). No worker holds it meanwhile.
    Waiting {
        retry_at_ms: u64,
        retry: Retry,
        reason: String,
    },
}

/// A chunk's transient failures so far: how many, and since when (ms since the Unix
/// epoch). Carried by its task from one attempt to the next.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retry {
    pub failures: u32,
    pub since_ms: u64,
}

impl Retry {
    /// After one more failure at `now_ms`.
    pub fn after_failure(self, now_ms: u64) -> Retry {
        Retry {
            failures: self.failures + 1,
            since_ms: if self.failures == 0 {
                now_ms
            } else {
                self.since_ms
            },
        }
    }

    /// How long to wait before the next attempt: 1 s doubling to 60 s, plus a random
    /// jitter of up to as much again, so that chunks failed by one outage do not all come
    /// back at once.
    pub fn delay(&self) -> std::time::Duration {
        use backon::BackoffBuilder;
        backon::ExponentialBuilder::default()
            .with_min_delay(std::time::Duration::from_secs(1))
            .with_max_delay(std::time::Duration::from_secs(60))
            .with_jitter()
            .without_max_times()
            .build()
            .nth(self.failures.saturating_sub(1) as usize)
            .unwrap_or(std::time::Duration::from_secs(60))
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: JobId,
    pub spec: JobSpec,
    pub plan: Option<JobPlan>,
    pub state: JobState,
    /// When the job was submitted (RFC 3339).
    #[serde(default)]
    pub submitted_at: String,
}

#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Creates or replaces a job record; its chunk states and dead letters stay.
    async fn put_job(&self, job: &JobRecord) -> Result<(), StoreError>;
    /// Records a job planned (again): replaces its record and forgets the chunk states and
    /// dead letters an earlier run under the same id left, so that nothing of an old plan
    /// (another destination, another table) is read as this one's. What this plan's
    /// chunks already hold is in its destination: the caller records that next.
    async fn replan_job(&self, job: &JobRecord) -> Result<(), StoreError>;
    async fn get_job(&self, id: &JobId) -> Result<Option<JobRecord>, StoreError>;
    /// Just the job's state: what pollers read, without the (possibly large) plan.
    async fn job_state(&self, id: &JobId) -> Result<Option<JobState>, StoreError> {
        Ok(self.get_job(id).await?.map(|j| j.state))
    }
    async fn list_jobs(&self) -> Result<Vec<JobId>, StoreError>;
    async fn set_job_state(&self, id: &JobId, state: &JobState) -> Result<(), StoreError>;
    async fn set_chunk_state(
        &self,
        id: &JobId,
        chunk: ChunkId,
        state: &ChunkState,
    ) -> Result<(), StoreError>;
    async fn chunk_states(&self, id: &JobId) -> Result<BTreeMap<ChunkId, ChunkState>, StoreError>;
    /// When the job ended (Unix ms), as recorded when its state first became terminal;
    /// `None` while it runs, and from a store that keeps no times.
    async fn finished_at_ms(&self, _id: &JobId) -> Result<Option<i64>, StoreError> {
        Ok(None)
    }
    /// Records a chunk task the queue dead-lettered (one per chunk: a later one replaces
    /// it), for operators (`haul dlq`).
    async fn add_dead_letter(&self, id: &JobId, dead: &DeadLetter) -> Result<(), StoreError>;
    /// The job's dead-lettered chunk tasks, by chunk.
    async fn dead_letters(&self, id: &JobId) -> Result<Vec<DeadLetter>, StoreError>;
    /// Forgets the dead letters of these chunks.
    async fn remove_dead_letters(&self, id: &JobId, chunks: &[ChunkId]) -> Result<(), StoreError>;
}

/// A chunk task the queue dead-lettered: which chunk, why (the chunk's failure as its
/// worker recorded it, or that its deliveries kept ending without a verdict), and when
/// (ms since the Unix epoch).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub chunk: ChunkId,
    pub reason: String,
    pub at_ms: u64,
}

type JobEntry = (JobRecord, BTreeMap<ChunkId, ChunkState>);

/// The in-process job store used by `haul run`.
#[derive(Clone, Default)]
pub struct MemoryJobStore {
    inner: Arc<Mutex<HashMap<JobId, JobEntry>>>,
    dead: Arc<Mutex<HashMap<JobId, BTreeMap<ChunkId, DeadLetter>>>>,
}

#[async_trait]
impl JobStore for MemoryJobStore {
    async fn put_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        let mut g = self.inner.lock().expect("job store lock");
        let chunks = g.remove(&job.id).map(|(_, c)| c).unwrap_or_default();
        g.insert(job.id.clone(), (job.clone(), chunks));
        Ok(())
    }

    async fn replan_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        self.dead.lock().expect("job store lock").remove(&job.id);
        let mut g = self.inner.lock().expect("job store lock");
        g.insert(job.id.clone(), (job.clone(), BTreeMap::new()));
        Ok(())
    }

    async fn get_job(&self, id: &JobId) -> Result<Option<JobRecord>, StoreError> {
        let g = self.inner.lock().expect("job store lock");
        Ok(g.get(id).map(|(j, _)| j.clone()))
    }

    async fn list_jobs(&self) -> Result<Vec<JobId>, StoreError> {
        let g = self.inner.lock().expect("job store lock");
        let mut ids: Vec<_> = g.keys().cloned().collect();
        ids.sort();
        Ok(ids)
    }

    async fn set_job_state(&self, id: &JobId, state: &JobState) -> Result<(), StoreError> {
        let mut g = self.inner.lock().expect("job store lock");
        match g.get_mut(id) {
            Some((j, _)) => {
                j.state = state.clone();
                Ok(())
            }
            None => Err(StoreError::Corrupt {
                key: id.to_string(),
                reason: "no such job".into(),
            }),
        }
    }

    async fn set_chunk_state(
        &self,
        id: &JobId,
        chunk: ChunkId,
        state: &ChunkState,
    ) -> Result<(), StoreError> {
        let mut g = self.inner.lock().expect("job store lock");
        match g.get_mut(id) {
            Some((_, chunks)) => {
                let committed = matches!(chunks.get(&chunk), Some(ChunkState::Committed { .. }));
                if !committed || matches!(state, ChunkState::Committed { .. }) {
                    chunks.insert(chunk, state.clone());
                }
                Ok(())
            }
            None => Err(StoreError::Corrupt {
                key: id.to_string(),
                reason: "no such job".into(),
            }),
        }
    }

    async fn chunk_states(&self, id: &JobId) -> Result<BTreeMap<ChunkId, ChunkState>, StoreError> {
        let g = self.inner.lock().expect("job store lock");
        Ok(g.get(id).map(|(_, c)| c.clone()).unwrap_or_default())
    }

    async fn add_dead_letter(&self, id: &JobId, dead: &DeadLetter) -> Result<(), StoreError> {
        let mut g = self.dead.lock().expect("job store lock");
        g.entry(id.clone())
            .or_default()
            .insert(dead.chunk, dead.clone());
        Ok(())
    }

    async fn dead_letters(&self, id: &JobId) -> Result<Vec<DeadLetter>, StoreError> {
        let g = self.dead.lock().expect("job store lock");
        Ok(g.get(id)
            .map(|d| d.values().cloned().collect())
            .unwrap_or_default())
    }

    async fn remove_dead_letters(&self, id: &JobId, chunks: &[ChunkId]) -> Result<(), StoreError> {
        let mut g = self.dead.lock().expect("job store lock");
        if let Some(d) = g.get_mut(id) {
            for c in chunks {
                d.remove(c);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn retries_back_off_from_one_second_to_a_minute_with_jitter() {
        use super::Retry;
        use std::time::Duration;
        let first = Retry::default().after_failure(1_000);
        assert_eq!((first.failures, first.since_ms), (1, 1_000));
        let second = first.after_failure(5_000);
        assert_eq!(
            (second.failures, second.since_ms),
            (2, 1_000),
            "counted from the first"
        );
        let mut r = Retry::default();
        for n in 1..=12u32 {
            r = r.after_failure(0);
            let base = Duration::from_secs(1 << (n - 1).min(6)).min(Duration::from_secs(60));
            let d = r.delay();
            // jitter adds up to the delay again
            assert!(
                d >= base && d <= base * 2,
                "failure {n}: {d:?} for a base of {base:?}"
            );
        }
    }

    #[tokio::test]
    async fn memory_job_store_conforms() {
        crate::conformance::job_store_suite(&super::MemoryJobStore::default()).await;
    }
}
