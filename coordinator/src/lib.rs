//! haul's coordinator role: prepares jobs (snapshot, plan, load target) and follows each
//! to its end with one job driver, used by both modes.
//!
//! - [`prepare`]: checking the destination, exporting the snapshot, planning, queueing.
//! - [`planner`]: cutting the key space into chunks of about equal row counts.
//! - [`driver`]: the one job driver (settle, reconcile, fail, commit).
//! - [`dead_letters`]: sees every dead-lettered chunk task, so that every job ends.
//! - [`error`]: what ends a job early, with its class.
//! - [`cluster`]: `haul coordinator`, the driver behind gRPC over RabbitMQ and Redis.
//! - [`flight`]: Flight DoGet of succeeded jobs for readers.

pub mod cluster;
pub mod dead_letters;
pub mod driver;
pub mod error;
pub mod flight;
pub mod planner;
pub mod prepare;

pub use error::RunError;
