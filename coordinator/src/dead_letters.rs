//! Every chunk task the queue dead-letters is seen here, so that no job waits forever for
//! a chunk nobody will run. A task reaches the dead-letter queue when its worker gave up
//! on it (a permanent failure, or a transient one past `--retry-for`: the chunk is
//! already recorded as failed) or when its deliveries kept ending without a verdict (the
//! workers running it died each time: a poison chunk), in which case the job store may
//! still say the chunk is running under a dead worker, or pending. The watcher consumes
//! the dead-letter queue, marks such a chunk failed (the job driver then fails the job
//! naming it, once its other chunks have settled), and records each dead letter for
//! operators (`haul dlq`).
//!
//! Architecture invariant: a dead letter is acked only once its chunk is final in the job
//! store (committed or failed) and the dead letter is recorded, or once it is known to
//! belong to an earlier run of the job (tasks carry their run).

use std::sync::Arc;
use std::time::Duration;

use haul_shared::jobs::{ChunkState, DeadLetter, JobStore, now_ms};
use haul_shared::proto::Task;
use haul_shared::queue::{ChunkQueue, Delivery};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Consumes the dead-letter queue until `stop` fires, resubscribing after broker errors.
pub async fn watch(queue: Arc<dyn ChunkQueue>, jobs: Arc<dyn JobStore>, stop: CancellationToken) {
    loop {
        let mut sub = match queue.subscribe_dead_letters(16).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot consume the dead-letter queue; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let d = tokio::select! {
                _ = stop.cancelled() => return,
                d = sub.next() => d,
            };
            match d {
                Ok(d) => record(d, jobs.as_ref()).await,
                Err(e) => {
                    warn!(error = %e, "consuming the dead-letter queue failed; subscribing again");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    break;
                }
            }
        }
    }
}

/// Makes the dead letter's chunk final and records it, then acks; if the job store is
/// unavailable, hands it back to be seen again.
async fn record(d: Delivery, jobs: &dyn JobStore) {
    let task = match Task::decode(&d.body) {
        Ok(t) => t,
        Err(e) => {
            warn!(error = %e, "dropping a dead letter that is not a chunk task");
            let _ = d.ack().await;
            return;
        }
    };
    let (job, chunk) = (task.job_id, task.chunk_id);
    let outcome = async {
        let Some(rec) = jobs.get_job(&job).await? else {
            warn!(job_id = %job, chunk_id = %chunk, "dead letter of an unknown job; dropping it");
            return Ok(());
        };
        if !task.run.is_empty() && task.run != rec.submitted_at {
            // an earlier run's task (the job was submitted or resumed again since): the
            // current run's chunk is not this letter's to fail
            warn!(job_id = %job, chunk_id = %chunk, run = %task.run, "dead letter of an earlier run of the job; dropping it");
            return Ok(());
        }
        let reason = match jobs.chunk_states(&job).await?.remove(&chunk) {
            // a late duplicate of a chunk that was committed after all: nothing is lost
            Some(ChunkState::Committed { .. }) => return Ok(()),
            Some(ChunkState::Failed { reason }) => reason,
            other => {
                let last = match other {
                    Some(ChunkState::Running { worker, .. }) => format!(", last on worker {worker}"),
                    _ => String::new(),
                };
                let reason = format!(
                    "its task went to the dead-letter queue: its deliveries kept ending without a verdict (the worker running it died each time{last}: a poison chunk?); `haul dlq list {job}` lists it"
                );
                warn!(job_id = %job, chunk_id = %chunk, %reason, "chunk failed");
                jobs.set_chunk_state(&job, chunk, &ChunkState::Failed { reason: reason.clone() })
                    .await?;
                reason
            }
        };
        info!(job_id = %job, chunk_id = %chunk, "dead letter recorded");
        jobs.add_dead_letter(
            &job,
            &DeadLetter {
                chunk,
                reason,
                at_ms: now_ms(),
            },
        )
        .await
    }
    .await;
    match outcome {
        Ok(()) => {
            if let Err(e) = d.ack().await {
                warn!(error = %e, "acking a dead letter failed; it will be seen again");
            }
        }
        Err(e) => {
            warn!(job_id = %job, chunk_id = %chunk, error = %e, "cannot record a dead letter; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = d.nack().await;
        }
    }
}
