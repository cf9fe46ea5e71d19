//! The worker registry's vocabulary: what a worker reports in its heartbeat, and the
//! drain order an operator leaves for it.

use serde::{Deserialize, Serialize};

use crate::WorkerId;

/// A worker as its last heartbeat described it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: WorkerId,
    pub host: String,
    pub pid: u32,
    pub slots: u32,
    pub in_flight: u32,
    /// Unix milliseconds, by the coordinator's clock.
    pub last_heartbeat_ms: i64,
    /// The worker says it is draining (drain order received, or SIGTERM).
    pub draining: bool,
    pub chunks_done: u64,
    pub rows_done: u64,
}

/// What a drained worker does with the chunks it is working on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainOrder {
    /// Let them finish and ack, then exit.
    Finish,
    /// Abort them and hand them back to the queue, then exit.
    RequeueInFlight,
}

/// How a worker shows in `haul workers`.
pub fn worker_state(rec: &WorkerRecord, order: Option<DrainOrder>, now_ms: i64) -> &'static str {
    if now_ms - rec.last_heartbeat_ms > HEARTBEAT_GONE_MS {
        "gone"
    } else if rec.draining || order.is_some() {
        "draining"
    } else {
        "active"
    }
}

/// Workers heartbeat this often ...
pub const HEARTBEAT_INTERVAL_MS: i64 = 2_000;
/// ... and count as gone after this long without one.
pub const HEARTBEAT_GONE_MS: i64 = 5 * HEARTBEAT_INTERVAL_MS;

/// This machine's name, for `haul workers`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}
