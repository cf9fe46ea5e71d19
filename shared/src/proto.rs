//! Generated wire types, and the one place they are converted to and from our own types.

use bytes::Bytes;
use prost::Message;

use crate::{ChunkId, ChunkRange, JobId};

/// Code generated from `proto/haul/v1/haul.proto`.
#[allow(unreachable_pub, clippy::all, clippy::clone_on_ref_ptr)]
pub mod wire {
    include!(concat!(env!("OUT_DIR"), "/haul.v1.rs"));
}

/// The encoded descriptor set of haul's protos, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/haul_descriptor.bin"));

use wire::{AllRows, ChunkTask, CtidRange, KeyRange, NullKeys, chunk_range};

/// The wire version this build writes and accepts.
pub const TASK_VERSION: u32 = 1;

/// A chunk task as the rest of haul sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    pub job_id: JobId,
    pub chunk_id: ChunkId,
    pub range: ChunkRange,
}

/// Why a message body is not a task this build can run. Always permanent: the message
/// goes to the dead-letter queue.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed chunk task: {0}")]
    Malformed(#[from] prost::DecodeError),
    #[error("chunk task has wire version {0}, this build understands {TASK_VERSION}")]
    UnknownVersion(u32),
    #[error("chunk task is missing its {0}")]
    Missing(&'static str),
    #[error("chunk task has an invalid job id: {0}")]
    BadJobId(String),
}

/// A chunk range on the wire.
pub fn range_to_wire(range: &ChunkRange) -> wire::ChunkRange {
    let kind = match range {
        ChunkRange::All => chunk_range::Kind::All(AllRows {}),
        ChunkRange::NullKeys => chunk_range::Kind::NullKeys(NullKeys {}),
        ChunkRange::Key { lower, upper } => chunk_range::Kind::Key(KeyRange {
            lower: lower.clone().unwrap_or_default(),
            upper: upper.clone().unwrap_or_default(),
        }),
        ChunkRange::Ctid {
            first_page,
            end_page,
        } => chunk_range::Kind::Ctid(CtidRange {
            first_page: *first_page,
            end_page: end_page.unwrap_or(0),
        }),
    };
    wire::ChunkRange { kind: Some(kind) }
}

/// A chunk range from the wire; `None` when it is missing.
pub fn range_from_wire(range: Option<wire::ChunkRange>) -> Option<ChunkRange> {
    let non_empty = |v: Vec<String>| (!v.is_empty()).then_some(v);
    Some(match range?.kind? {
        chunk_range::Kind::All(_) => ChunkRange::All,
        chunk_range::Kind::NullKeys(_) => ChunkRange::NullKeys,
        chunk_range::Kind::Key(k) => ChunkRange::Key {
            lower: non_empty(k.lower),
            upper: non_empty(k.upper),
        },
        chunk_range::Kind::Ctid(c) => ChunkRange::Ctid {
            first_page: c.first_page,
            end_page: (c.end_page != 0).then_some(c.end_page),
        },
    })
}

/// The wire version of the loader messages (`LoadChunk`, `PrepareLoad`) this build
/// writes and accepts.
pub const LOAD_VERSION: u32 = 1;

impl Task {
    pub fn encode(&self) -> Bytes {
        ChunkTask {
            version: TASK_VERSION,
            job_id: self.job_id.to_string(),
            chunk_id: self.chunk_id.0,
            range: Some(range_to_wire(&self.range)),
        }
        .encode_to_vec()
        .into()
    }

    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let t = ChunkTask::decode(body)?;
        if t.version != TASK_VERSION {
            return Err(DecodeError::UnknownVersion(t.version));
        }
        let range = range_from_wire(t.range).ok_or(DecodeError::Missing("range"))?;
        Ok(Task {
            job_id: JobId::parse(&t.job_id).map_err(DecodeError::BadJobId)?,
            chunk_id: ChunkId(t.chunk_id),
            range,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_round_trips() {
        for range in [
            ChunkRange::All,
            ChunkRange::NullKeys,
            ChunkRange::Key {
                lower: None,
                upper: Some(vec!["10".into(), "x'y".into()]),
            },
            ChunkRange::Key {
                lower: Some(vec!["10".into()]),
                upper: None,
            },
            ChunkRange::Ctid {
                first_page: 7,
                end_page: None,
            },
        ] {
            let t = Task {
                job_id: JobId::parse("j-1").unwrap(),
                chunk_id: ChunkId(3),
                range,
            };
            assert_eq!(Task::decode(&t.encode()).unwrap(), t);
        }
    }

    #[test]
    fn rejects_garbage_and_unknown_versions() {
        assert!(matches!(
            Task::decode(b"\xff\xff\xff"),
            Err(DecodeError::Malformed(_))
        ));
        let future = ChunkTask {
            version: 99,
            job_id: "j".into(),
            chunk_id: 0,
            range: None,
        }
        .encode_to_vec();
        assert!(matches!(
            Task::decode(&future),
            Err(DecodeError::UnknownVersion(99))
        ));
    }
}
