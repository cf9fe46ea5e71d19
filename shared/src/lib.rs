//! haul's common crate: the vocabulary every role shares.
//!
//! - [`ids`]: newtypes for job, chunk, worker and fencing epoch.
//! - [`error`]: the retry decision every error carries ([`ErrorClass`]).
//! - [`proto`]: generated wire types and the one place they map to our own types.
//! - [`queue`], [`lease`], [`jobs`]: the boundary traits (chunk queue, lease + epoch store,
//!   job-state store), each with its contract and an in-process implementation.
//! - `conformance` (feature `testsuite`): the test suites every implementation of those
//!   traits must pass.
//! - [`redis_store`]: the Redis lease and job stores and worker registry, for the cluster.
//! - [`workers`]: what the worker registry holds.
//! - [`rpc`]: gRPC client channels and the bearer token.
//! - [`metrics`]: Prometheus text on `/metrics`.
//! - [`lake`]: the destination's layout, its manifests and the commit protocol.
//! - [`load`]: the load protocol, both sides: the loader's Flight service and ledger, the
//!   target's DDL and type map, Arrow → binary COPY, and the client workers stream with.
//! - [`shutdown`]: the stop signals every role listens to.
//! - [`pg`]: Postgres connection settings, secret masking, identifier quoting, and the
//!   Postgres → Arrow type mapping.

#[cfg(any(test, feature = "testsuite"))]
pub mod conformance;
pub mod error;
pub mod ids;
pub mod jobs;
pub mod lake;
pub mod lease;
pub mod links;
pub mod load;
pub mod metrics;
pub mod pg;
pub mod proto;
pub mod queue;
pub mod rabbit_queue;
pub mod range;
pub mod redis_store;
pub mod rpc;
pub mod shutdown;
pub mod workers;

pub use error::ErrorClass;
pub use ids::{ChunkId, Epoch, JobId, WorkerId};
pub use range::ChunkRange;
