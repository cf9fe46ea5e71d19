//! haul's worker role: takes chunk tasks from the queue, leases each chunk, reads it from
//! the source with binary `COPY` inside the job's snapshot, decodes it into Arrow batches,
//! writes partitioned Parquet through `object_store`, streams the same batches to a
//! loader over Arrow Flight, and commits with the lake's protocol (`haul_shared::lake`).
//!
//! - [`source`]: a chunk's source session; the COPY read straight off its socket.
//! - [`decode`]: binary COPY → Arrow builders.
//! - [`writer`]: Parquet on the blocking pool, partition split, streaming upload.
//! - [`executor`]: one chunk attempt and its commit.
//! - [`worker`]: the consume → lease → run → settle loop, drain and abort.
//! - [`node`]: the `haul worker` process: stores, heartbeat, signals.
//! - [`verify`]: `haul verify`, an export read back and reconciled with its source.

pub mod decode;
pub mod executor;
pub mod lineage;
pub mod node;
pub mod source;
pub mod verify;
pub mod worker;
pub mod writer;
