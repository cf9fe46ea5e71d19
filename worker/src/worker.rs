//! The worker loop: takes chunk tasks from the queue, leases each chunk, runs it, and
//! settles the delivery by the outcome's error class.
//!
//! Architecture invariant: a delivery is acked only after its chunk is committed (or was
//! found committed), or after its transient failure was recorded as `Waiting` (the
//! coordinator queues it again after a backoff, within the job's `--retry-for`); a
//! permanent failure, or a transient one past that budget, marks the chunk failed and
//! rejects the delivery to the dead-letter queue. A delivery dropped unsettled (its worker
//! died) returns to the queue and counts against the delivery limit, past which the broker
//! dead-letters it (a poison chunk). A task that is not one of its job's planned chunks
//! (id and range) is dropped unread. A task whose job the store does not know is dropped
//! (its coordinator queues its chunks again if the job still runs); an unreachable store
//! is waited out.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use haul_shared::error::Classify;
use haul_shared::jobs::{ChunkState, JobPlan, JobRecord, JobState, JobStore, now_ms};
use haul_shared::lease::LeaseStore;
use haul_shared::proto::Task;
use haul_shared::queue::{ChunkQueue, Delivery, QueueError};
use haul_shared::{JobId, WorkerId};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

use crate::executor::{ChunkJob, ChunkOutcome, Progress, keep_lease, run_chunk};
use haul_shared::lake::Dest;
use haul_shared::load::{LoadAuth, LoadClient};
use haul_shared::pg::{Credentials, Database};

/// The destinations this worker has opened, by URL and fsync setting.
type Dests = HashMap<(String, bool), Dest>;

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub id: WorkerId,
    /// Chunks worked on at once (and the queue prefetch).
    pub slots: usize,
    pub lease_ttl: Duration,
    /// Attempts before a chunk is given up (must match the queue's delivery limit).
    pub max_attempts: u32,
    /// How to authenticate to loaders (jobs with `--load`).
    pub load_auth: LoadAuth,
    /// How this worker logs in to jobs' sources: its own password file, `PGPASSWORD` or
    /// pgpass, never the job's record.
    pub source_credentials: Credentials,
}

/// The boundaries a worker talks to.
#[derive(Clone)]
pub struct Services {
    pub queue: Arc<dyn ChunkQueue>,
    pub leases: Arc<dyn LeaseStore>,
    pub jobs: Arc<dyn JobStore>,
}

/// How a worker is told to stop.
#[derive(Clone, Debug, Default)]
pub struct Control {
    /// Drain: stop taking work, hand back what was prefetched but not started, let the
    /// chunks in flight finish and ack, then return.
    pub drain: CancellationToken,
    /// Also abort the chunks in flight and hand them back to the queue.
    pub abort: CancellationToken,
}

impl Control {
    /// Stop now: drain and abort.
    pub fn stop(&self) {
        self.abort.cancel();
        self.drain.cancel();
    }
}

/// Runs until `ctl.drain` fires, then stops taking work and waits for in-flight chunks
/// (aborting them if `ctl.abort` fires).
pub async fn run_worker(
    cfg: WorkerConfig,
    svc: Services,
    progress: Arc<Progress>,
    ctl: Control,
) -> Result<(), QueueError> {
    let mut sub = svc.queue.subscribe(cfg.slots as u16).await?;
    progress.consuming.store(true, Ordering::Relaxed);
    let slots = Arc::new(Semaphore::new(cfg.slots.max(1)));
    let tracker = TaskTracker::new();
    let dests: Arc<Mutex<Dests>> = Arc::default();
    loop {
        let permit = tokio::select! {
            _ = ctl.drain.cancelled() => break,
            p = Arc::clone(&slots).acquire_owned() => p.expect("semaphore open"),
        };
        let delivery = tokio::select! {
            _ = ctl.drain.cancelled() => break,
            d = sub.next() => d,
        };
        let delivery = match delivery {
            Ok(d) => d,
            Err(e) => {
                // the broker connection is recovering, or the consumer was cancelled by
                // the broker: subscribe again (in-flight chunks carry on; their acks may
                // be lost, and a redelivered committed chunk is a cheap no-op)
                warn!(error = %e, "consuming failed; subscribing again");
                progress.consuming.store(false, Ordering::Relaxed);
                tokio::select! {
                    _ = ctl.drain.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                match svc.queue.subscribe(cfg.slots as u16).await {
                    Ok(s) => {
                        sub = s;
                        progress.consuming.store(true, Ordering::Relaxed);
                    }
                    Err(e) => warn!(error = %e, "subscribing failed; retrying"),
                }
                continue;
            }
        };
        let (cfg, svc, progress, dests) = (
            cfg.clone(),
            svc.clone(),
            Arc::clone(&progress),
            Arc::clone(&dests),
        );
        let abort = ctl.abort.child_token();
        tracker.spawn(async move {
            progress.in_flight.fetch_add(1, Ordering::Relaxed);
            handle(delivery, &cfg, &svc, &progress, &dests, abort).await;
            progress.in_flight.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    // no new deliveries; prefetched ones go back; the channel stays open for the acks
    progress.consuming.store(false, Ordering::Relaxed);
    if let Err(e) = sub.cancel().await {
        warn!(error = %e, "cancelling the consumer failed; its unsettled messages return when it closes");
    }
    tracker.close();
    tracker.wait().await;
    drop(sub);
    Ok(())
}

async fn handle(
    d: Delivery,
    cfg: &WorkerConfig,
    svc: &Services,
    progress: &Arc<Progress>,
    dests: &Mutex<Dests>,
    abort: CancellationToken,
) {
    let task = match Task::decode(&d.body) {
        Ok(t) => t,
        Err(e) => {
            warn!(error = %e, "rejecting a malformed chunk task to the dead-letter queue");
            settle(d.reject().await);
            return;
        }
    };
    let span = info_span!("chunk", job_id = %task.job_id, chunk_id = %task.chunk_id, worker_id = %cfg.id, attempt = d.attempt);
    async move {
        let Some(job) = job_record(svc, &task.job_id, &abort).await else {
            // drained while the job store was unreachable: back to the queue
            settle(d.nack().await);
            return;
        };
        let Some(job) = job else {
            // a job the store does not know: deleted, or lost with the store's data, in
            // which case its coordinator restores it and queues its chunks again
            warn!("task for an unknown job; dropping it");
            settle(d.ack().await);
            return;
        };
        if job.state.is_terminal() {
            info!(state = job.state.name(), "job already ended; dropping task");
            settle(d.ack().await);
            return;
        }
        if job.state == JobState::Paused {
            // parked before the ack: a crash in between only redelivers the task
            info!("job paused; parking the chunk until it resumes");
            match svc.jobs.set_chunk_state(&job.id, task.chunk_id, &ChunkState::Parked).await {
                Ok(()) => settle(d.ack().await),
                Err(e) => {
                    warn!(error = %e, "could not park the chunk; requeueing");
                    settle(d.nack().await);
                }
            }
            return;
        }
        if let Some(plan) = &job.plan
            && let Err(why) = task_matches_plan(&task, plan)
        {
            // anyone with access to the broker can publish a task: one the plan does not
            // hold would read rows twice or leave some out, and it is not a chunk of the
            // job (its real chunk has a task of its own), so it is dropped, not failed
            warn!(reason = %why, "task does not match its job's plan; dropping it");
            settle(d.ack().await);
            return;
        }
        let attempt = d.attempt;
        let result = attempt_chunk(&job, &task, cfg, svc, progress, dests, abort.clone(), attempt).await;
        if result.is_err() && abort.is_cancelled() {
            info!("chunk aborted by a drain; handing it back");
            let _ = svc
                .jobs
                .set_chunk_state(&job.id, task.chunk_id, &ChunkState::Pending)
                .await;
            // a drain is not a failed attempt: queue a fresh copy (its delivery count
            // starts again) and ack this one; a nack would count against the limit
            match svc.queue.publish(d.body.clone()).await {
                Ok(()) => settle(d.ack().await),
                Err(e) => {
                    warn!(error = %e, "could not queue the chunk again; returning it instead");
                    settle(d.nack().await);
                }
            }
            return;
        }
        if result.is_err()
            && let Ok(Some(now)) = svc.jobs.job_state(&job.id).await
            && now.is_terminal()
        {
            info!(state = now.name(), "job ended while its chunk ran; dropping the task");
            settle(d.ack().await);
            return;
        }
        if let Err(crate::executor::ChunkError::LeaseBusy { .. }) = &result {
            // a duplicate delivery of a chunk a live attempt holds (it renewed its lease
            // all along): that attempt settles the chunk, and its own delivery comes back
            // if it dies; this one must neither overwrite the chunk's state nor spend its
            // retry budget
            info!("another attempt holds the chunk's lease and is alive; dropping this duplicate delivery");
            settle(d.ack().await);
            return;
        }
        match result {
            Ok(outcome) => {
                let (rows, bytes) = match outcome {
                    ChunkOutcome::Committed { rows, bytes, .. }
                    | ChunkOutcome::AlreadyCommitted { rows, bytes, .. } => (rows, bytes),
                };
                tracing::debug!(?outcome, "chunk committed");
                let state = ChunkState::Committed { rows, bytes };
                match svc.jobs.set_chunk_state(&job.id, task.chunk_id, &state).await {
                    Ok(()) => {
                        progress.chunks_done.fetch_add(1, Ordering::Relaxed);
                        settle(d.ack().await);
                    }
                    Err(e) => {
                        // unrecorded, the job would wait for this chunk forever: the
                        // redelivery finds it committed and records it again
                        warn!(error = %e, "chunk committed but its state was not recorded; requeueing");
                        settle(d.nack().await);
                    }
                }
            }
            Err(e) => {
                progress.chunk_failures.fetch_add(1, Ordering::Relaxed);
                let class = e.class();
                let mut reason = e.to_string();
                if class.is_retryable() {
                    let now = now_ms();
                    let retry = task.retry.after_failure(now);
                    let failing_for = Duration::from_millis(now.saturating_sub(retry.since_ms));
                    if failing_for < Duration::from_secs(job.spec.retry_for_secs) {
                        // backed off by the coordinator, which queues the chunk again when
                        // the wait is over: no slot is held meanwhile
                        let delay = retry.delay();
                        warn!(error = %reason, failures = retry.failures, retry_in_ms = delay.as_millis() as u64, "chunk attempt failed; trying again after a backoff");
                        let waiting = ChunkState::Waiting {
                            retry_at_ms: now + delay.as_millis() as u64,
                            retry,
                            reason,
                        };
                        match svc.jobs.set_chunk_state(&job.id, task.chunk_id, &waiting).await {
                            Ok(()) => settle(d.ack().await),
                            Err(e) => {
                                warn!(error = %e, "could not record the backoff; requeueing at once");
                                settle(d.nack().await);
                            }
                        }
                        return;
                    }
                    reason = format!(
                        "{reason} (failing for {}s, {} attempts; --retry-for {}s)",
                        failing_for.as_secs(),
                        retry.failures,
                        job.spec.retry_for_secs
                    );
                }
                warn!(error = %reason, ?class, "chunk failed for good");
                let _ = svc
                    .jobs
                    .set_chunk_state(&job.id, task.chunk_id, &ChunkState::Failed { reason })
                    .await;
                settle(d.reject().await);
            }
        }
    }
    .instrument(span)
    .await
}

/// Whether `task` is one of `plan`'s chunks, with the range the plan gives it.
fn task_matches_plan(task: &Task, plan: &JobPlan) -> Result<(), String> {
    match plan.chunks.get(task.chunk_id.0 as usize) {
        None => Err(format!(
            "chunk {} is not in the plan ({} chunks)",
            task.chunk_id,
            plan.chunks.len()
        )),
        Some(range) if *range != task.range => Err(format!(
            "chunk {}'s range {:?} is not the planned {:?}",
            task.chunk_id, task.range, range
        )),
        Some(_) => Ok(()),
    }
}

/// The task's job record, waiting out an unreachable job store (backing off from 1 s to
/// 30 s) rather than handing the task back at once, which would spend its deliveries in
/// milliseconds; `None` if `stop` fires first.
async fn job_record(
    svc: &Services,
    job: &JobId,
    stop: &CancellationToken,
) -> Option<Option<JobRecord>> {
    let mut wait = Duration::from_secs(1);
    loop {
        match svc.jobs.get_job(job).await {
            Ok(j) => return Some(j),
            Err(e) => {
                warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "job store unavailable; waiting for it")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(30));
    }
}

#[allow(clippy::too_many_arguments)]
async fn attempt_chunk(
    job: &JobRecord,
    task: &Task,
    cfg: &WorkerConfig,
    svc: &Services,
    progress: &Arc<Progress>,
    dests: &Mutex<Dests>,
    stop: CancellationToken,
    attempt: u32,
) -> Result<ChunkOutcome, crate::executor::ChunkError> {
    let plan = job
        .plan
        .as_ref()
        .ok_or_else(|| haul_shared::lake::DestError::BadManifest {
            path: format!("job {}", job.id),
            reason: "job has no plan yet".into(),
        })?;
    let dest = {
        // by what the record names, not by job id: an id submitted again after its job
        // ended may name another destination
        let mut g = dests.lock().await;
        let named = (job.spec.dest.clone(), job.spec.output.fsync);
        match g.get(&named) {
            Some(d) => d.clone(),
            None => {
                let d = Dest::open(&job.spec.dest, job.spec.output.fsync)?;
                g.insert(named, d.clone());
                d
            }
        }
    };
    let key = format!("{}/{}", job.id, task.chunk_id);
    // another holder (a duplicate delivery): wait for it to commit or let go
    let deadline = tokio::time::Instant::now() + cfg.lease_ttl * 2;
    let mut waiting = false;
    let lease = loop {
        if let Some(l) = svc.leases.acquire(&key, &cfg.id, cfg.lease_ttl).await? {
            break l;
        }
        if !waiting {
            info!("another attempt holds the chunk's lease; waiting for it to commit or let go");
            waiting = true;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(crate::executor::ChunkError::LeaseBusy {
                chunk: task.chunk_id,
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let _ = svc
        .jobs
        .set_chunk_state(
            &job.id,
            task.chunk_id,
            &ChunkState::Running {
                worker: cfg.id.clone(),
                attempt,
            },
        )
        .await;
    let lost = stop.child_token();
    let renew_stop = CancellationToken::new();
    // a task of its own, so that a long poll of the extraction does not hold it up
    let renewer = tokio::spawn(keep_lease(
        Arc::clone(&svc.leases),
        lease.clone(),
        cfg.lease_ttl,
        renew_stop.clone(),
        lost.clone(),
        Arc::clone(progress),
    ));
    let watcher = tokio::spawn(stop_when_job_ends(
        Arc::clone(&svc.jobs),
        job.id.clone(),
        renew_stop.clone(),
        lost.clone(),
    ));
    let load = job
        .spec
        .load
        .as_ref()
        .map(|l| LoadClient::new(l, &cfg.load_auth));
    let source = Database {
        info: job.spec.source.clone(),
        creds: cfg.source_credentials.clone(),
    };
    let result = run_chunk(ChunkJob {
        job_id: &job.id,
        spec: &job.spec,
        source: &source,
        plan,
        chunk: task.chunk_id,
        range: &task.range,
        dest: &dest,
        lease: &lease,
        leases: svc.leases.as_ref(),
        progress,
        load: load.as_ref(),
        cancel: lost,
    })
    .await;
    renew_stop.cancel();
    let _ = renewer.await;
    let _ = watcher.await;
    let _ = svc.leases.release(&lease).await;
    result
}

/// Cancels a chunk attempt when its job is cancelled or fails elsewhere, so a cancelled
/// job stops using the source within a few seconds.
async fn stop_when_job_ends(
    jobs: Arc<dyn JobStore>,
    job: JobId,
    stop: CancellationToken,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        if let Ok(Some(state)) = jobs.job_state(&job).await
            && state.is_terminal()
        {
            cancel.cancel();
            return;
        }
    }
}

fn settle(r: Result<(), QueueError>) {
    if let Err(e) = r {
        // the message will be redelivered; every commit is safe to repeat
        warn!(error = %e, "settling a delivery failed");
    }
}
