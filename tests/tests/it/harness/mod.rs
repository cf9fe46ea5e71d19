//! Test helpers, in one place: fixtures (a database and a destination per test, checksums
//! of a table computed two independent ways, job options), the services the tests talk
//! to, outages of those services (a forwarder the test takes down), and real clusters of
//! `haul` processes. Test files use these; they export nothing
//! to each other.

mod cluster;
mod fixtures;
mod keda;
mod outage;
mod s3;
mod services;

pub(crate) use cluster::*;
pub(crate) use fixtures::*;
pub(crate) use keda::*;
pub(crate) use outage::*;
pub(crate) use s3::*;
pub(crate) use services::*;
