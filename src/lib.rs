//! The `haul` binary's library: what its subcommands share, and what the tests drive
//! in-process.
//!
//! - [`cli`]: the flags (each also a `HAUL_*` environment variable), parsed by clap and
//!   checked into the role crates' option structs.
//! - [`embedded`]: `haul run`, the cluster's job driver and worker loop over in-process
//!   queue and stores.
//! - [`dry_run`]: `haul plan`, a job planned and explained, not run.
//! - [`client`]: the operator CLI's calls to the coordinator, and its tables.
//! - [`progress`]: the progress bar or log lines of a running job.

pub mod cli;
pub mod client;
pub mod dry_run;
pub mod embedded;
pub mod progress;
