#![allow(unreachable_pub)]
//! haul's integration tests, against the real Postgres on this machine (one database per
//! test). Run them with `scripts/test.sh`, which starts the services first.

mod cluster;
mod commands;
mod commit_log;
mod engine;
mod faults;
mod harness;
mod incremental;
mod kubernetes;
mod lake_tools;
mod load;
mod newcomer;
mod pipeline;
mod reload;
mod s3;
mod standby;
mod stores;
mod tls;
