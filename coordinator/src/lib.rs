//! haul coordinator: plans jobs inside an exported snapshot and drives them to commit.

pub mod cli;
pub mod planner;
pub mod progress;
pub mod run;
