//! haul coordinator: plans jobs inside an exported snapshot and drives them to commit.

pub mod cli;
pub mod client;
pub mod cluster;
pub mod flight;
pub mod planner;
pub mod progress;
pub mod run;
