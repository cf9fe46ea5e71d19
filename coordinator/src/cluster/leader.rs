//! One active coordinator per Redis prefix: it holds the `coordinator` lease; a second
//! one (e.g. during a rolling deploy) stands by until the lease is free.

use std::time::Duration;

use haul_shared::WorkerId;
use haul_shared::lease::LeaseStore;
use haul_shared::redis_store::RedisStore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::CoordinatorError;

/// The lease that makes one coordinator per Redis prefix the active one.
const LEADER_KEY: &str = "coordinator";
const LEADER_TTL: Duration = Duration::from_secs(10);

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
    let mut waiting_logged = false;
    let lease = loop {
        if let Some(l) = store.acquire(LEADER_KEY, &me, LEADER_TTL).await? {
            break l;
        }
        if !waiting_logged {
            let other = store
                .holder(LEADER_KEY)
                .await?
                .map(|h| h.0)
                .unwrap_or_default();
            info!(active = %other, "another coordinator is active on this Redis prefix; standing by");
            waiting_logged = true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Err(CoordinatorError::StoppedStandingBy),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    };
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
                _ = tokio::time::sleep(LEADER_TTL / 4) => {}
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

/// Where clients reach the active coordinator, as it advertised itself, if one is active.
pub(super) async fn active_address(store: &RedisStore) -> Option<String> {
    let holder = store.holder(LEADER_KEY).await.ok()??;
    holder.0.rsplit_once(' ').map(|(_, url)| url.to_owned())
}
