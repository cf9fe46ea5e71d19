//! One active coordinator per Redis prefix: it holds the `coordinator` lease; a second
//! one (e.g. during a rolling deploy) stands by until the lease is free.

use std::time::{Duration, Instant};

use haul_shared::WorkerId;
use haul_shared::error::Classify;
use haul_shared::lease::LeaseStore;
use haul_shared::redis_store::RedisStore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::CoordinatorError;

/// The lease that makes one coordinator per Redis prefix the active one.
const LEADER_KEY: &str = "coordinator";
const LEADER_TTL: Duration = Duration::from_secs(10);
/// The active coordinator renews its lease this often.
const RENEW_EVERY: Duration = Duration::from_millis(2500);
/// How long a standby sees the lease free before it takes it: two renewal periods.
const FREE_FOR: Duration = RENEW_EVERY.saturating_mul(2);

/// Waits until this process is the only active coordinator, then keeps the lease renewed
/// until `shutdown` fires. Returns a token that fires if the lease is ever lost (this
/// process was frozen past its TTL): `shutdown` fires with it, since two coordinators
/// must never drive the same jobs.
pub(super) async fn lead(
    store: &RedisStore,
    shutdown: &CancellationToken,
    advertise: &str,
) -> Result<CancellationToken, CoordinatorError> {
    // the lease's holder names where clients reach it: `<host>-<pid> <url>`
    let me = WorkerId(format!(
        "coordinator@{}-{} {advertise}",
        haul_shared::workers::hostname(),
        std::process::id()
    ));
    let lease = stand_by(store, shutdown, &me).await?;
    info!(epoch = %lease.epoch, "this coordinator is the active one");
    let lost = CancellationToken::new();
    let (store, shutdown, on_loss) = (store.clone(), shutdown.clone(), lost.clone());
    tokio::spawn(async move {
        let mut lease = lease;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = store.release(&lease).await;
                    return;
                }
                _ = tokio::time::sleep(RENEW_EVERY) => {}
            }
            match store.renew(&lease, LEADER_TTL).await {
                Ok(true) => {}
                Ok(false) => {
                    // Nobody holds it: Redis lost it (flushed, failed over to an empty
                    // replica, or unreachable past its TTL). Take it again and carry on;
                    // the jobs' drivers restore what Redis lost. Another holder means
                    // another active coordinator: two must never drive the same jobs.
                    match store.acquire(LEADER_KEY, &me, LEADER_TTL).await {
                        Ok(Some(l)) => {
                            warn!(epoch = %l.epoch, "Redis lost the coordinator lease; took it again");
                            lease = l;
                        }
                        Ok(None) => {
                            tracing::error!(
                                "lost the coordinator lease to another coordinator; stopping"
                            );
                            on_loss.cancel();
                            shutdown.cancel();
                            return;
                        }
                        Err(e) => {
                            warn!(error = %e, "taking the coordinator lease again failed; retrying")
                        }
                    }
                }
                Err(e) => warn!(error = %e, "renewing the coordinator lease failed; retrying"),
            }
        }
    });
    Ok(lost)
}

/// Waits for the lease and takes it. A lease free at the first look is taken at once (a
/// coordinator starting alone). After that, a standby takes it only once it has seen it
/// free, with Redis answering, for [`FREE_FOR`]: two of the active coordinator's renewal
/// periods. A lease that expired while Redis was unreachable to every coordinator, or that
/// Redis lost (flushed, failed over), is taken back by the active one within a renewal
/// period, and a standby must not win that race: taking over fails every job whose
/// snapshot the active one holds.
async fn stand_by(
    store: &RedisStore,
    shutdown: &CancellationToken,
    me: &WorkerId,
) -> Result<haul_shared::lease::Lease, CoordinatorError> {
    let mut free_since: Option<Instant> = None;
    let mut first_look = true;
    let mut waiting_logged = false;
    loop {
        match store.holder(LEADER_KEY).await {
            Ok(None) => {
                let since = *free_since.get_or_insert_with(Instant::now);
                if first_look || since.elapsed() >= FREE_FOR {
                    match store.acquire(LEADER_KEY, me, LEADER_TTL).await {
                        Ok(Some(l)) => return Ok(l),
                        Ok(None) => free_since = None,
                        Err(e) if e.class().is_retryable() => {
                            warn!(error = %e, "cannot reach Redis for the coordinator lease; retrying");
                            free_since = None;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            Ok(Some(active)) => {
                free_since = None;
                if !waiting_logged {
                    info!(active = %active.0, "another coordinator is active on this Redis prefix; standing by");
                    waiting_logged = true;
                }
            }
            // a standby rides out a Redis blip (it was reachable when this process
            // started); the lease's freedom counts again from when it answers
            Err(e) if e.class().is_retryable() => {
                warn!(error = %e, "cannot reach Redis for the coordinator lease; retrying");
                free_since = None;
            }
            Err(e) => return Err(e.into()),
        }
        first_look = false;
        tokio::select! {
            _ = shutdown.cancelled() => return Err(CoordinatorError::StoppedStandingBy),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Where clients reach the active coordinator, as it advertised itself, if one is active.
pub(super) async fn active_address(store: &RedisStore) -> Option<String> {
    let holder = store.holder(LEADER_KEY).await.ok()??;
    holder.0.rsplit_once(' ').map(|(_, url)| url.to_owned())
}
