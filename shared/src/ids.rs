//! Identifiers. Generated wire types never leak past [`crate::proto`]; everything else
//! speaks these.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A job's id: short, URL- and path-safe (`[a-z0-9-]`), chosen by the user or generated.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(String);

impl JobId {
    /// A fresh random id, e.g. `j-3f9a1c2e7b`.
    pub fn generate() -> Self {
        let u = uuid::Uuid::new_v4().simple().to_string();
        Self(format!("j-{}", &u[..10]))
    }

    /// Validates a user-chosen id: 1-64 characters of `a-z`, `0-9`, `-`, `_`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "invalid job id {s:?}: use 1-64 characters of a-z, 0-9, '-' and '_'"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A chunk's index within its job's plan, `0..n_chunks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChunkId(pub u32);

impl fmt::Display for ChunkId {
    /// Zero-padded so names sort in chunk order: `000042`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:06}", self.0)
    }
}

/// A worker's id, unique among live workers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(pub String);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A fencing token: every lease taken on a chunk gets a strictly larger epoch than any
/// earlier lease on that chunk. Only the holder of the current epoch may commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_path_safe() {
        let id = JobId::generate();
        assert!(JobId::parse(id.as_str()).is_ok());
        assert!(JobId::parse("../etc").is_err());
        assert!(JobId::parse("").is_err());
        assert!(JobId::parse("Nightly").is_err());
        assert_eq!(ChunkId(42).to_string(), "000042");
    }
}
