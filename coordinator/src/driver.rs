//! The job driver: follows one job from its queued chunks to its end, the same in both
//! modes. Embedded mode (`haul run`) is this driver over the in-process queue and stores
//! plus N worker tasks; the cluster is this driver over RabbitMQ and Redis plus remote
//! workers.
//!
//! What it does, every [`TICK`]:
//! - reads the job's state (a paused job waits; a job ended elsewhere, e.g. cancelled,
//!   ends the drive) and its chunks' states;
//! - requeues chunks parked while the job was paused, and chunks waiting out a transient
//!   failure once their backoff is over (no worker holds them meanwhile);
//! - every [`RECONCILE_EVERY`] ticks: restores committed states lost from the job store
//!   from the chunk manifests (the destination is the truth), and fails a chunk whose
//!   worker died during its last allowed attempt (its task is dead-lettered, so nobody
//!   else would);
//! - restores a job the job store lost (Redis is a cache: the driver's record and the
//!   destination's chunk manifests hold what is needed) and queues its open chunks again;
//! - fails the job once every chunk has ended and one failed (the others settle first, so
//!   a resume has only the failed ones left), or when the snapshot's session is lost;
//! - commits the job once every chunk is committed (transient commit failures retried).
//!
//! [`Driver::drive`] follows the job and then records its end ([`Driver::finish`]: the job
//! store, the snapshot's transaction); embedded mode calls [`Driver::follow`], stops its
//! workers, then `finish`. Callers read [`Ending`].
//!
//! Architecture invariant: the driver never deletes staged parts of a job that has not
//! committed: an attempt may sit between "parts staged" and "chunk manifest created" when
//! the job ends, and its chunk manifest must never list parts that are gone.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use haul_shared::error::Classify;
use haul_shared::jobs::{ChunkState, JobRecord, JobState, JobStore, Retry};
use haul_shared::lake::commit::commit_job;
use haul_shared::lake::{Dest, JobManifest};
use haul_shared::lease::LeaseStore;
use haul_shared::pg::{self, SourceError};
use haul_shared::proto::Task;
use haul_shared::queue::ChunkQueue;
use haul_shared::{ChunkId, ChunkRange, JobId};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::RunError;

/// How often the driver looks at its job's chunk states (two small store reads) ...
pub const TICK: Duration = Duration::from_millis(50);
/// ... and every how many looks it checks the destination and the leases (5 s).
pub const RECONCILE_EVERY: u64 = 100;
/// Transient failures of the job's commit retried before the job fails.
const COMMIT_RETRIES: u32 = 10;

/// The boundaries a driver works with, and what it tells others.
#[derive(Clone)]
pub struct Driver {
    pub jobs: Arc<dyn JobStore>,
    pub queue: Arc<dyn ChunkQueue>,
    pub leases: Arc<dyn LeaseStore>,
    /// Attempts per chunk (the queue's delivery limit).
    pub max_attempts: u32,
    /// Where the queue dead-letters a chunk's last failed attempt (for messages).
    pub dead_letters: String,
    /// Woken when the driver records a job's end.
    pub changed: Arc<Notify>,
    /// The command that finishes a job of this mode after a failure, given its id and
    /// destination URL (what a failed job's reason tells the user to run).
    pub finish_command: fn(&JobId, &str) -> String,
}

/// How a drive ended.
#[derive(Debug)]
pub enum Ending {
    /// Every chunk committed, and the job with them; recorded as succeeded.
    Committed(Box<JobManifest>),
    /// The job failed (a chunk failed for good, the snapshot was lost, the commit
    /// failed); recorded as failed with this error's message.
    Failed(RunError),
    /// The job was ended elsewhere (cancelled, or failed by an operator).
    Ended(JobState),
    /// The driver was stopped (shutdown, interrupt) or the job vanished from the store;
    /// the job stays as recorded.
    Stopped,
}

impl Driver {
    /// Follows one job to its end, then records the end ([`Driver::finish`]). `holder` is
    /// the session holding the job's exported snapshot (none for a job recovered after a
    /// restart, or read without a snapshot); its transaction ends with the drive.
    pub async fn drive(
        &self,
        rec: JobRecord,
        dest: Dest,
        holder: Option<pg::Session>,
        stop: CancellationToken,
    ) -> Ending {
        let ending = self.follow(&rec, &dest, holder.as_ref(), stop).await;
        self.finish(&rec.id, holder, &ending).await;
        ending
    }

    /// Follows one job until it ends (see the module docs), without recording the end:
    /// a caller that runs the workers too (embedded mode) stops them first, then calls
    /// [`Driver::finish`].
    pub async fn follow(
        &self,
        rec: &JobRecord,
        dest: &Dest,
        holder: Option<&pg::Session>,
        stop: CancellationToken,
    ) -> Ending {
        let Some(plan) = rec.plan.as_ref() else {
            return Ending::Failed(RunError::Internal(format!("job {} has no plan", rec.id)));
        };
        let snapshot = plan.snapshot.clone().filter(|_| holder.is_some());
        let closed = holder.map(|h| h.closed.clone());
        self.until_end(rec, plan, dest, snapshot, closed, stop)
            .await
    }

    /// Records how the job ended in the job store (a success or a failure; a job ended
    /// elsewhere or a stopped drive stays as recorded) and ends the snapshot's
    /// transaction. It leaves the staging area alone: remote workers may still be
    /// committing an attempt whose parts are staged there (a committed job's staging is
    /// cleared by its commit; embedded mode clears a failed job's once its workers stop).
    pub async fn finish(&self, id: &JobId, holder: Option<pg::Session>, ending: &Ending) {
        let recorded = match ending {
            Ending::Committed(_) => Some(JobState::Succeeded),
            Ending::Failed(e) => {
                let reason = e.to_string();
                warn!(job_id = %id, %reason, "job failed");
                Some(JobState::Failed { reason })
            }
            Ending::Ended(_) | Ending::Stopped => None,
        };
        if let Some(state) = recorded {
            if let Err(e) = self.jobs.set_job_state(id, &state).await {
                warn!(job_id = %id, error = %e, "could not record the job's end");
            }
            self.changed.notify_waiters();
        }
        if let Some(h) = holder {
            let _ = h.client.batch_execute("COMMIT").await;
        }
    }

    async fn until_end(
        &self,
        rec: &JobRecord,
        plan: &haul_shared::jobs::JobPlan,
        dest: &Dest,
        snapshot: Option<String>,
        mut closed: Option<tokio::sync::watch::Receiver<bool>>,
        stop: CancellationToken,
    ) -> Ending {
        let id = &rec.id;
        let mut ticks: u64 = 0;
        let mut commit_failures = 0;
        // last attempts whose lease was found gone at the previous check
        let mut orphaned: BTreeSet<ChunkId> = BTreeSet::new();
        loop {
            ticks += 1;
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = stop.cancelled() => return Ending::Stopped,
                _ = async { closed.as_mut().expect("a holder").changed().await }, if snapshot.is_some() => {
                    let snapshot = snapshot.clone().unwrap_or_default();
                    return Ending::Failed(SourceError::SnapshotLost { snapshot }.into());
                }
            }
            let now = match self.jobs.job_state(id).await {
                Ok(Some(s)) => s,
                Ok(None) => {
                    // the job store lost the job (Redis flushed, or failed over to an
                    // empty replica): it is a cache; this driver and the destination
                    // hold what it needs to carry on
                    warn!(job_id = %id, "the job vanished from the job store; restoring it from the destination");
                    if let Err(e) = self.restore(rec, plan, dest).await {
                        warn!(job_id = %id, error = %e, "restoring the job failed; retrying");
                    }
                    continue;
                }
                Err(e) => {
                    warn!(job_id = %id, error = %e, "job store unavailable; retrying");
                    continue;
                }
            };
            match now {
                JobState::Running => {}
                JobState::Paused | JobState::Planning => continue,
                other => return Ending::Ended(other),
            }
            let mut states = match self.jobs.chunk_states(id).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(job_id = %id, error = %e, "job store unavailable; retrying");
                    continue;
                }
            };
            if ticks.is_multiple_of(RECONCILE_EVERY) {
                self.reconcile(id, dest, &mut states).await;
                self.fail_dead_last_attempts(id, &mut states, &mut orphaned)
                    .await;
            }
            // a failed chunk fails the job once the other chunks have ended, so that a
            // resume has only the failed ones left to do
            let settled = states.len() == plan.chunks.len()
                && states
                    .values()
                    .all(|s| matches!(s, ChunkState::Committed { .. } | ChunkState::Failed { .. }));
            if settled
                && let Some((chunk, ChunkState::Failed { reason })) = states
                    .iter()
                    .find(|(_, s)| matches!(s, ChunkState::Failed { .. }))
            {
                let resumable = plan.chunks.iter().all(|c| c.survives_new_snapshot());
                return Ending::Failed(RunError::ChunkFailed {
                    chunk: *chunk,
                    reason: reason.clone(),
                    finish: resumable.then(|| (self.finish_command)(&rec.id, &dest.url)),
                });
            }
            let now_ms = haul_shared::jobs::now_ms();
            for (chunk, st) in &states {
                let retry = match st {
                    ChunkState::Parked => Retry::default(),
                    ChunkState::Waiting {
                        retry_at_ms, retry, ..
                    } if *retry_at_ms <= now_ms => *retry,
                    _ => continue,
                };
                if let Err(e) = self
                    .requeue(id, &rec.submitted_at, *chunk, &plan.chunks, retry)
                    .await
                {
                    warn!(job_id = %id, chunk_id = %chunk, error = %e, "queueing a chunk again failed; retrying");
                    // its task may not exist: the state says so, and the next look tries
                    // again; the queue already retried for a while, so the other chunks
                    // wait for that look too (the job stays responsive to a cancel)
                    let _ = self.jobs.set_chunk_state(id, *chunk, st).await;
                    break;
                }
            }
            let done = states
                .values()
                .filter(|s| matches!(s, ChunkState::Committed { .. }))
                .count();
            if done < plan.chunks.len() {
                continue;
            }
            match commit_job(dest, id, &rec.spec, plan, rec.submitted_at.clone()).await {
                Ok(m) => {
                    info!(job_id = %id, rows = m.rows, files = m.files.len(), "job committed");
                    return Ending::Committed(Box::new(m));
                }
                Err(e) if e.class().is_retryable() && commit_failures < COMMIT_RETRIES => {
                    commit_failures += 1;
                    warn!(job_id = %id, error = %e, "committing the job failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Ending::Failed(e.into()),
            }
        }
    }

    /// The object store is the truth about what is committed: a chunk state lost or
    /// overwritten in the job store is restored from the chunk manifests.
    async fn reconcile(&self, id: &JobId, dest: &Dest, states: &mut BTreeMap<ChunkId, ChunkState>) {
        let manifests = match dest.chunk_manifests(id).await {
            Ok(m) => m,
            Err(e) => {
                warn!(job_id = %id, error = %e, "cannot list the committed chunks; retrying");
                return;
            }
        };
        for m in manifests {
            if matches!(states.get(&m.chunk), Some(ChunkState::Committed { .. })) {
                continue;
            }
            warn!(job_id = %id, chunk_id = %m.chunk, "chunk is committed in the destination but not in the job store; recording it");
            let st = ChunkState::Committed {
                rows: m.rows,
                bytes: m.bytes,
            };
            if self.jobs.set_chunk_state(id, m.chunk, &st).await.is_ok() {
                states.insert(m.chunk, st);
            }
        }
    }

    /// A worker that dies during a chunk's last allowed attempt leaves nobody to record
    /// the failure: the queue dead-letters the task. A chunk still `Running` its last
    /// attempt with no lease at two checks in a row is failed here, so the job ends
    /// instead of waiting for it forever.
    async fn fail_dead_last_attempts(
        &self,
        id: &JobId,
        states: &mut BTreeMap<ChunkId, ChunkState>,
        orphaned: &mut BTreeSet<ChunkId>,
    ) {
        let mut seen = BTreeSet::new();
        for (chunk, st) in states.iter_mut() {
            let ChunkState::Running { worker, attempt } = st else {
                continue;
            };
            if *attempt < self.max_attempts {
                continue;
            }
            match self.leases.holder(&format!("{id}/{chunk}")).await {
                Ok(None) => {}
                _ => continue,
            }
            if !orphaned.contains(chunk) {
                seen.insert(*chunk);
                continue;
            }
            let reason = format!(
                "worker {worker} stopped during the last attempt ({attempt} of {}) and the task went to the dead-letter queue {}",
                self.max_attempts, self.dead_letters
            );
            warn!(job_id = %id, chunk_id = %chunk, %reason, "chunk failed");
            let failed = ChunkState::Failed { reason };
            if self.jobs.set_chunk_state(id, *chunk, &failed).await.is_ok() {
                *st = failed;
            }
        }
        *orphaned = seen;
    }

    /// Puts back a job the job store lost: its record (running), its committed chunks
    /// from their manifests, and a task for every other chunk (tasks delivered meanwhile
    /// were dropped by workers that found no job; a duplicate is harmless).
    async fn restore(
        &self,
        rec: &JobRecord,
        plan: &haul_shared::jobs::JobPlan,
        dest: &Dest,
    ) -> Result<(), RunError> {
        self.jobs
            .put_job(&JobRecord {
                state: JobState::Running,
                ..rec.clone()
            })
            .await?;
        let committed: BTreeMap<ChunkId, _> = dest
            .chunk_manifests(&rec.id)
            .await?
            .into_iter()
            .map(|m| (m.chunk, m))
            .collect();
        for i in 0..plan.chunks.len() {
            let chunk = ChunkId(i as u32);
            match committed.get(&chunk) {
                Some(m) => {
                    let st = ChunkState::Committed {
                        rows: m.rows,
                        bytes: m.bytes,
                    };
                    self.jobs.set_chunk_state(&rec.id, chunk, &st).await?;
                }
                None => {
                    self.requeue(
                        &rec.id,
                        &rec.submitted_at,
                        chunk,
                        &plan.chunks,
                        Retry::default(),
                    )
                    .await?
                }
            }
        }
        info!(job_id = %rec.id, committed = committed.len(), queued = plan.chunks.len() - committed.len(), "job restored in the job store");
        self.changed.notify_waiters();
        Ok(())
    }

    /// Queues a chunk's task again (its state `Pending` first: no task exists without
    /// it), carrying its transient failures so far.
    pub(crate) async fn requeue(
        &self,
        id: &JobId,
        run: &str,
        chunk: ChunkId,
        ranges: &[ChunkRange],
        retry: Retry,
    ) -> Result<(), RunError> {
        let range = ranges
            .get(chunk.0 as usize)
            .ok_or_else(|| RunError::Internal(format!("chunk {chunk} is not in the plan")))?;
        self.jobs
            .set_chunk_state(id, chunk, &ChunkState::Pending)
            .await?;
        let task = Task {
            job_id: id.clone(),
            chunk_id: chunk,
            range: range.clone(),
            retry,
            run: run.to_owned(),
        };
        Ok(self.queue.publish(task.encode()).await?)
    }
}
