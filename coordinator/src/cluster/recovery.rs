//! Taking over the jobs an earlier coordinator left unfinished. A job whose snapshot died
//! with that coordinator is failed with the way to finish it; a job reading without a
//! snapshot (or whose chunks are all committed) carries on. A job whose destination or
//! store cannot be read just now is tried again later: one job's transient trouble does
//! not stop the coordinator, nor delay its serving (the takeover runs in the background).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use haul_shared::error::Classify;
use haul_shared::jobs::{JobRecord, JobState, JobStore};
use haul_shared::lake::Dest;
use tracing::{info, warn};

use super::{Coordinator, CoordinatorError};
use crate::error::RunError;
use crate::prepare::queue_chunks;

/// How long a job whose recovery failed transiently waits before the next try.
const RETRY_EVERY: Duration = Duration::from_secs(5);
/// Jobs taken over at once (each lists its destination's chunk manifests).
const AT_ONCE: usize = 8;

impl Coordinator {
    /// The jobs an earlier coordinator left unfinished, read before this one serves, so
    /// that no job submitted to this one is taken for one of them.
    pub(super) async fn left_unfinished(&self) -> Result<Vec<JobRecord>, CoordinatorError> {
        let mut left = Vec::new();
        for id in self.store.list_jobs().await? {
            if self
                .store
                .job_state(&id)
                .await?
                .is_some_and(|s| !s.is_terminal())
                && let Some(rec) = self.store.get_job(&id).await?
            {
                left.push(rec);
            }
        }
        Ok(left)
    }

    /// Takes those jobs over in the background of a coordinator that already serves: the
    /// takeover is the lease and the broker connection, whatever the number of jobs, and
    /// one job's unreachable destination delays no other.
    pub(super) async fn recover(self: Arc<Self>, left: Vec<JobRecord>) {
        futures::stream::iter(left)
            .for_each_concurrent(AT_ONCE, |rec| Arc::clone(&self).recover_until_done(rec))
            .await;
    }

    /// Takes one job over, trying again while its trouble is transient; a permanent one
    /// fails the job, saying why.
    async fn recover_until_done(self: Arc<Self>, left: JobRecord) {
        loop {
            match self.recover_job(&left).await {
                Ok(()) => return,
                Err(e) if e.class().is_retryable() => {
                    warn!(job_id = %left.id, error = %e, "cannot take the job over yet; retrying");
                }
                Err(e) => {
                    let reason = format!("cannot carry on after a coordinator restart: {e}");
                    return self.fail(&left.id, reason).await;
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(RETRY_EVERY) => {}
            }
        }
    }

    async fn recover_job(self: &Arc<Self>, left: &JobRecord) -> Result<(), RunError> {
        let id = &left.id;
        // the job as it is now: one that ended meanwhile (cancelled), or was submitted
        // again to this coordinator (a new record), is not this takeover's
        let Some(rec) = self.store.get_job(id).await? else {
            return Ok(());
        };
        if rec.state.is_terminal() || rec.submitted_at != left.submitted_at {
            return Ok(());
        }
        let Some(plan) = rec.plan.clone() else {
            let reason =
                "the coordinator restarted while planning the job; submit it again".to_owned();
            self.fail(id, reason).await;
            return Ok(());
        };
        let dest = Dest::open(&rec.spec.dest, rec.spec.output.fsync)?;
        let manifests = dest.chunk_manifests(id).await?;
        if let Some(snapshot) = &plan.snapshot
            && manifests.len() < plan.chunks.len()
        {
            let reason = format!(
                "the coordinator holding snapshot {snapshot} restarted, so the remaining chunks cannot read from it; finish the job with `haul submit --resume {id} --fresh-snapshot` (committed chunks are kept)"
            );
            self.fail(id, reason).await;
            return Ok(());
        }
        if rec.state == JobState::Planning {
            // its chunks may not all have been queued: queue what is not committed
            let committed = manifests.into_iter().map(|m| (m.chunk, m)).collect();
            queue_chunks(&rec, &committed, &self.store, self.queue.as_ref()).await?;
            self.store.set_job_state(id, &JobState::Running).await?;
        }
        info!(job_id = %id, "carrying on with a job after a coordinator restart");
        self.spawn_driver(rec, dest, None);
        Ok(())
    }
}
