//! Chunk leases with fencing epochs.
//!
//! # Contract
//! - [`LeaseStore::acquire`] succeeds only if nobody holds an unexpired lease on the key,
//!   and every success returns an epoch strictly greater than any earlier epoch for that
//!   key (epochs survive release and expiry).
//! - A lease is *current* while it is unexpired and no later acquire has happened;
//!   [`LeaseStore::renew`] extends a current lease and reports `false` for a lost one
//!   (expired, released, or superseded) without reviving it.
//! - Expiry is measured by the store's clock (Redis: the server; memory: tokio's clock, so
//!   tests can pause time).
//! - All operations are atomic per key and safe to retry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::error::{Classify, ErrorClass};
use crate::{Epoch, WorkerId};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store holds unreadable data at {key}: {reason}")]
    Corrupt { key: String, reason: String },
    /// The link cannot be set up as configured (a certificate file that cannot be read).
    #[error("store: {0}")]
    Config(String),
}

impl Classify for StoreError {
    fn class(&self) -> ErrorClass {
        match self {
            StoreError::Unavailable(_) => ErrorClass::Transient,
            StoreError::Corrupt { .. } => ErrorClass::Internal,
            StoreError::Config(_) => ErrorClass::User,
        }
    }
}

/// A held lease: proof of holding `key` at `epoch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub key: String,
    pub holder: WorkerId,
    pub epoch: Epoch,
}

#[async_trait]
pub trait LeaseStore: Send + Sync + 'static {
    /// Takes the lease with a new epoch, or `None` if someone holds it.
    async fn acquire(
        &self,
        key: &str,
        holder: &WorkerId,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError>;
    /// Extends a current lease; `false` if it is lost.
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError>;
    /// Whether the lease is still current.
    async fn is_current(&self, lease: &Lease) -> Result<bool, StoreError>;
    /// Gives the lease up if still current; a no-op otherwise.
    async fn release(&self, lease: &Lease) -> Result<(), StoreError>;
    /// Who holds an unexpired lease on `key`, if anyone.
    async fn holder(&self, key: &str) -> Result<Option<WorkerId>, StoreError>;
    /// Ends `holder`'s lease on `key` (a worker known to be dead), so the next attempt
    /// need not wait out its TTL; `false` if `holder` does not hold it. Safe even if the
    /// holder lives on: its lease is no longer current, so it cannot commit.
    async fn evict(&self, key: &str, holder: &WorkerId) -> Result<bool, StoreError>;
}

/// The in-process lease store used by `haul run`.
#[derive(Clone, Default)]
pub struct MemoryLeaseStore {
    inner: Arc<Mutex<MemLeases>>,
}

#[derive(Default)]
struct MemLeases {
    held: HashMap<String, (WorkerId, Epoch, Instant)>,
    epochs: HashMap<String, u64>,
}

impl MemLeases {
    fn current(&self, lease: &Lease) -> bool {
        matches!(self.held.get(&lease.key),
            Some((h, e, exp)) if *h == lease.holder && *e == lease.epoch && *exp > Instant::now())
    }
}

#[async_trait]
impl LeaseStore for MemoryLeaseStore {
    async fn acquire(
        &self,
        key: &str,
        holder: &WorkerId,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let mut g = self.inner.lock().expect("lease lock");
        if let Some((_, _, exp)) = g.held.get(key)
            && *exp > Instant::now()
        {
            return Ok(None);
        }
        let e = g.epochs.entry(key.to_owned()).or_insert(0);
        *e += 1;
        let epoch = Epoch(*e);
        g.held.insert(
            key.to_owned(),
            (holder.clone(), epoch, Instant::now() + ttl),
        );
        Ok(Some(Lease {
            key: key.to_owned(),
            holder: holder.clone(),
            epoch,
        }))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        let mut g = self.inner.lock().expect("lease lock");
        if !g.current(lease) {
            return Ok(false);
        }
        if let Some(entry) = g.held.get_mut(&lease.key) {
            entry.2 = Instant::now() + ttl;
        }
        Ok(true)
    }

    async fn is_current(&self, lease: &Lease) -> Result<bool, StoreError> {
        Ok(self.inner.lock().expect("lease lock").current(lease))
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut g = self.inner.lock().expect("lease lock");
        if g.current(lease) {
            g.held.remove(&lease.key);
        }
        Ok(())
    }

    async fn evict(&self, key: &str, holder: &WorkerId) -> Result<bool, StoreError> {
        let mut g = self.inner.lock().expect("lease lock");
        let held =
            matches!(g.held.get(key), Some((h, _, exp)) if h == holder && *exp > Instant::now());
        if held {
            g.held.remove(key);
        }
        Ok(held)
    }

    async fn holder(&self, key: &str) -> Result<Option<WorkerId>, StoreError> {
        let g = self.inner.lock().expect("lease lock");
        Ok(g.held
            .get(key)
            .filter(|(_, _, exp)| *exp > Instant::now())
            .map(|(h, _, _)| h.clone()))
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test(start_paused = true)]
    async fn memory_lease_store_conforms() {
        crate::conformance::lease_suite(&super::MemoryLeaseStore::default(), "t:").await;
    }
}
