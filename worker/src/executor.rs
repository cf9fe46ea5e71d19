//! Runs one chunk attempt end to end, under a lease, and commits it with the fencing
//! protocol:
//!
//! 1. a chunk whose manifest already exists is not run again — redelivery of a
//!    committed chunk is a cheap no-op;
//! 2. the attempt imports the job's snapshot and streams
//!    `COPY (SELECT ... WHERE <range>) TO STDOUT (FORMAT binary)` into Arrow batches and
//!    Parquet parts under its own staging prefix (`.../<chunk>/<epoch>/`);
//! 3. if its lease (epoch) is no longer current it stops without committing;
//! 4. it creates the chunk manifest with create-if-absent: the first attempt to commit
//!    wins, a late zombie finds it present and deletes its own staging files. The
//!    winner's parts stay staged: they are published when the job commits.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arrow_array::RecordBatch;
use haul_shared::error::{Classify, ErrorClass};
use haul_shared::jobs::{JobPlan, JobSpec};
use haul_shared::lease::{Lease, LeaseStore, StoreError};
use haul_shared::pg::{Database, SourceError};
use haul_shared::{ChunkId, ChunkRange, JobId};
use tokio_util::sync::CancellationToken;

use haul_shared::lake::commit::{self, ChunkCommit};
use haul_shared::lake::{ChunkManifest, Dest, DestError, PartFile};
use haul_shared::load::{ChunkLoad, LoadClient, LoadClientError};

use crate::decode::CopyDecoder;
use crate::lineage::Lineage;
use crate::source::ChunkSource;
use crate::writer::{ChunkWriter, WriteError, WriterConfig};

/// Upper bound on one decoded batch's source bytes (in addition to the row bound).
pub const BATCH_BYTES: usize = 32 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Dest(#[from] DestError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("lost the lease on chunk {chunk} (epoch {epoch}); another attempt owns it")]
    LeaseLost { chunk: ChunkId, epoch: u64 },
    #[error("chunk {chunk} is leased by another worker that neither committed nor let go")]
    LeaseBusy { chunk: ChunkId },
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Load(#[from] LoadClientError),
    #[error("chunk {chunk}: the loader committed {loaded} rows but the attempt read {read}")]
    LoadCount {
        chunk: ChunkId,
        loaded: u64,
        read: u64,
    },
    #[error("lineage columns: {0}")]
    Lineage(String),
}

impl Classify for ChunkError {
    fn class(&self) -> ErrorClass {
        match self {
            ChunkError::Source(e) => e.class(),
            ChunkError::Dest(e) => e.class(),
            ChunkError::Write(
                WriteError::BadPartitionColumn { .. } | WriteError::TimeOutOfRange { .. },
            ) => ErrorClass::User,
            ChunkError::Write(_) => ErrorClass::Transient,
            ChunkError::Store(e) => e.class(),
            ChunkError::LeaseLost { .. } | ChunkError::LeaseBusy { .. } | ChunkError::Cancelled => {
                ErrorClass::Transient
            }
            ChunkError::Load(e) => e.class(),
            ChunkError::LoadCount { .. } | ChunkError::Lineage(_) => ErrorClass::Internal,
        }
    }
}

/// How a chunk attempt ended when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkOutcome {
    /// This attempt committed the chunk.
    Committed { rows: u64, bytes: u64, files: usize },
    /// It was committed before (by this or an earlier attempt).
    AlreadyCommitted { rows: u64, bytes: u64, files: usize },
}

/// Live counters a progress display and the worker's metrics read.
#[derive(Debug, Default)]
pub struct Progress {
    /// Rows read, including those of chunks still in flight.
    pub rows: AtomicU64,
    pub source_bytes: AtomicU64,
    /// Chunks this process committed (or found committed).
    pub chunks_done: AtomicU64,
    /// Chunks being worked on now.
    pub in_flight: AtomicU64,
    /// Chunk lease renewals that succeeded.
    pub lease_renewals: AtomicU64,
    /// Chunk leases lost while working (another attempt may own the chunk now).
    pub leases_lost: AtomicU64,
    /// Attempts that came to commit and found another attempt had the chunk: their lease
    /// was gone at the fence, or another attempt's manifest was there first.
    pub commit_conflicts: AtomicU64,
    /// Chunk attempts that failed (to be retried, or for good).
    pub chunk_failures: AtomicU64,
    /// A consumer on the chunk queue is open (a worker's readiness).
    pub consuming: AtomicBool,
}

/// Everything one chunk attempt needs.
pub struct ChunkJob<'a> {
    pub job_id: &'a JobId,
    pub spec: &'a JobSpec,
    /// The job's source, with this worker's credentials.
    pub source: &'a Database,
    pub plan: &'a JobPlan,
    pub chunk: ChunkId,
    pub range: &'a ChunkRange,
    pub dest: &'a Dest,
    pub lease: &'a Lease,
    pub leases: &'a dyn LeaseStore,
    pub progress: &'a Progress,
    /// The job's loaders, when it loads a target too.
    pub load: Option<&'a LoadClient>,
    /// Fires when the lease is lost or the worker must stop now.
    pub cancel: CancellationToken,
}

/// Fault injection for tests (feature `testsuite`): sleeps for the milliseconds in env var
/// `name`, if set, so a test can kill the process at that point of the protocol.
#[cfg(feature = "testsuite")]
async fn fault_pause(name: &str) {
    if let Some(ms) = std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok()) {
        tracing::warn!(fault = name, ms, "pausing (fault injection)");
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}

/// Without the `testsuite` feature, fault injection is compiled out.
#[cfg(not(feature = "testsuite"))]
async fn fault_pause(_name: &str) {}

/// What the loader is told about a chunk attempt.
fn load_command(c: &ChunkJob<'_>) -> haul_shared::proto::wire::LoadChunk {
    use haul_shared::proto::wire;
    wire::LoadChunk {
        version: haul_shared::proto::LOAD_VERSION,
        job_id: c.job_id.to_string(),
        chunk_id: c.chunk.0,
        epoch: c.lease.epoch.0,
        target_table: c
            .spec
            .load
            .as_ref()
            .map(|l| l.target_table.clone())
            .unwrap_or_default(),
        snapshot: c.plan.snapshot.clone().unwrap_or_default(),
        range: Some(haul_shared::proto::range_to_wire(c.range)),
        key: c
            .plan
            .key
            .iter()
            .map(haul_shared::proto::key_to_wire)
            .collect(),
    }
}

/// The COPY statement of a chunk (of an incremental job: the rows of its range that are
/// in the job's window).
pub fn copy_statement(plan: &JobPlan, range: &ChunkRange) -> String {
    format!(
        "COPY ({}) TO STDOUT (FORMAT binary)",
        select_statement(plan, range)
    )
}

/// The query a chunk's COPY runs.
pub fn select_statement(plan: &JobPlan, range: &ChunkRange) -> String {
    let cols: Vec<String> = plan.table.columns.iter().map(|c| c.select_expr()).collect();
    format!(
        "SELECT {} FROM {} WHERE {}",
        cols.join(", "),
        plan.table.quoted(),
        chunk_filter(plan, range)
    )
}

/// The rows of a chunk: its range, and of an incremental job, the job's window.
pub fn chunk_filter(plan: &JobPlan, range: &ChunkRange) -> String {
    let filter = range.predicate(&plan.key);
    match &plan.window {
        Some(w) => format!("({filter}) AND {}", w.predicate()),
        None => filter,
    }
}

/// Runs one attempt. See the module docs for the protocol.
pub async fn run_chunk(c: ChunkJob<'_>) -> Result<ChunkOutcome, ChunkError> {
    let dest = c.dest;
    if let Some(m) = commit::committed_chunk(dest, c.job_id, c.chunk).await? {
        return Ok(ChunkOutcome::AlreadyCommitted {
            rows: m.rows,
            bytes: m.bytes,
            files: m.files.len(),
        });
    }
    // a slower extraction, so that a test can act while a job runs
    fault_pause("HAUL_FAULT_CHUNK_DELAY_MS").await;
    let epoch = c.lease.epoch;
    let staging = dest.staging_prefix(c.job_id, c.chunk, epoch);
    // `extract` watches `c.cancel` itself, so that it can stop its writer first
    let result = extract(&c, &staging).await;
    let (files, rows) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = dest.delete_prefix(&staging).await;
            return Err(e);
        }
    };
    // fencing: a lease lost while we worked means someone else may be committing
    if !c.leases.is_current(c.lease).await? {
        c.progress.commit_conflicts.fetch_add(1, Ordering::Relaxed);
        dest.delete_prefix(&staging).await?;
        return Err(ChunkError::LeaseLost {
            chunk: c.chunk,
            epoch: epoch.0,
        });
    }
    let manifest = ChunkManifest {
        job: c.job_id.clone(),
        chunk: c.chunk,
        epoch,
        worker: c.lease.holder.clone(),
        range: c.range.clone(),
        rows,
        bytes: files.iter().map(|f| f.bytes).sum(),
        files,
        committed_at: chrono::Utc::now().to_rfc3339(),
    };
    Ok(
        match commit::commit_chunk(dest, manifest, &staging).await? {
            ChunkCommit::Won(m) => ChunkOutcome::Committed {
                rows: m.rows,
                bytes: m.bytes,
                files: m.files.len(),
            },
            ChunkCommit::Lost(m) => {
                c.progress.commit_conflicts.fetch_add(1, Ordering::Relaxed);
                ChunkOutcome::AlreadyCommitted {
                    rows: m.rows,
                    bytes: m.bytes,
                    files: m.files.len(),
                }
            }
        },
    )
}

async fn extract(c: &ChunkJob<'_>, staging: &str) -> Result<(Vec<PartFile>, u64), ChunkError> {
    let mut source = ChunkSource::open(c.source, c.plan.snapshot.as_deref()).await?;
    let mut decoder = CopyDecoder::new(&c.plan.table, c.spec.output.batch_rows, BATCH_BYTES);
    let lineage = if c.spec.output.lineage && c.spec.output.parquet {
        let at = c.plan.snapshot_at.as_deref().ok_or_else(|| {
            ChunkError::Lineage(
                "the job's plan has no snapshot time (planned by an older haul)".into(),
            )
        })?;
        Some(Lineage::new(&decoder.schema(), c.job_id.as_str(), at).map_err(ChunkError::Lineage)?)
    } else {
        None
    };
    let writer = if c.spec.output.parquet {
        Some(ChunkWriter::start(
            c.dest.clone(),
            WriterConfig {
                output: c.spec.output.clone(),
                table_dir: c.plan.table_dir(),
                staging: staging.to_owned(),
                stem: format!("part-{}-{}", c.job_id, c.chunk),
            },
            lineage
                .as_ref()
                .map_or_else(|| decoder.schema(), Lineage::schema),
        )?)
    } else {
        None
    };
    let mut load = match c.load {
        Some(l) => Some(l.start(load_command(c), decoder.schema()).await?),
        None => None,
    };
    let stmt = copy_statement(c.plan, c.range);
    let mut rows = 0u64;
    let copy = async {
        let mut sinks = Sinks {
            progress: c.progress,
            writer: writer.as_ref(),
            lineage: lineage.as_ref(),
            load: load.as_mut(),
        };
        let mut stream = source.copy_out(&stmt).await?;
        let mut batches = Vec::new();
        loop {
            let mut bytes = 0;
            let more = stream
                .read(|piece| {
                    bytes += piece.len();
                    decoder.push(piece, &mut batches)
                })
                .await?;
            c.progress
                .source_bytes
                .fetch_add(bytes as u64, Ordering::Relaxed);
            for b in batches.drain(..) {
                rows += hand_on(b, &mut sinks).await?;
            }
            if !more {
                break;
            }
        }
        if let Some(b) = decoder.finish()? {
            rows += hand_on(b, &mut sinks).await?;
        }
        Ok::<_, ChunkError>(())
    };
    let copied = tokio::select! {
        r = copy => r,
        _ = c.cancel.cancelled() => Err(ChunkError::Cancelled),
    };
    if let Err(e) = copied {
        // the writer's thread may be mid-file: let it stop before the caller deletes
        // the staging prefix, so no part of this attempt is written after the cleanup
        if let Some(w) = writer {
            w.abort().await;
        }
        return Err(e);
    }
    if let Some(l) = load.as_mut() {
        // a zombie (lease lost while it read) must not commit the load: the loader would
        // take it, being the first, and the live attempt would have to retry
        let current = c.leases.is_current(c.lease).await;
        if !matches!(current, Ok(true)) {
            if let Some(w) = writer {
                w.abort().await;
            }
            return Err(match current {
                Err(e) => e.into(),
                Ok(_) => ChunkError::LeaseLost {
                    chunk: c.chunk,
                    epoch: c.lease.epoch.0,
                },
            });
        }
        // end the stream now, so the loader commits while the Parquet parts finish
        l.close();
    }
    let files = match writer {
        Some(w) => w.finish().await?,
        None => Vec::new(),
    };
    if let Some(l) = load {
        // the load commits before the chunk manifest: a chunk with a manifest is loaded
        let ack = tokio::select! {
            r = l.finish() => r?,
            _ = c.cancel.cancelled() => return Err(ChunkError::Cancelled),
        };
        fault_pause("HAUL_FAULT_PAUSE_AFTER_LOAD_MS").await;
        if ack.rows != rows {
            return Err(ChunkError::LoadCount {
                chunk: c.chunk,
                loaded: ack.rows,
                read: rows,
            });
        }
    }
    source.close().await;
    Ok((files, rows))
}

/// Where a chunk's batches go: the Parquet writer (with the lineage columns, if asked
/// for) and the load; the progress counts them.
struct Sinks<'a> {
    progress: &'a Progress,
    writer: Option<&'a ChunkWriter>,
    lineage: Option<&'a Lineage>,
    load: Option<&'a mut ChunkLoad>,
}

/// Hands a decoded batch to the Parquet writer and the loader (whichever the job has);
/// returns its row count.
async fn hand_on(b: RecordBatch, sinks: &mut Sinks<'_>) -> Result<u64, ChunkError> {
    let n = b.num_rows() as u64;
    sinks.progress.rows.fetch_add(n, Ordering::Relaxed);
    // the writer first: it encodes on its own thread while the loader takes its copy
    if let Some(w) = sinks.writer {
        let out = match sinks.lineage {
            Some(l) => l
                .add(b.clone())
                .map_err(|e| ChunkError::Lineage(e.to_string()))?,
            None => b.clone(),
        };
        w.write(out).await?;
    }
    if let Some(l) = sinks.load.as_deref_mut() {
        l.send(b).await?;
    }
    Ok(n)
}

/// Renews a lease every third of its TTL until `stop` fires; fires `lost` if renewal
/// fails (the attempt must then stop: it can no longer commit). Counts both in `progress`.
pub async fn keep_lease(
    leases: Arc<dyn LeaseStore>,
    lease: Lease,
    ttl: std::time::Duration,
    stop: CancellationToken,
    lost: CancellationToken,
    progress: Arc<Progress>,
) {
    let mut tick = tokio::time::interval(ttl / 3);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match leases.renew(&lease, ttl).await {
            Ok(true) => {
                progress.lease_renewals.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => {
                progress.leases_lost.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(key = %lease.key, epoch = %lease.epoch, "lease lost");
                lost.cancel();
                return;
            }
            Err(e) => tracing::warn!(error = %e, "lease renewal failed; retrying"),
        }
    }
}
