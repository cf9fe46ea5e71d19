//! haul's data plane: the chunk executor reads one chunk from the source with binary
//! `COPY` inside the job's snapshot, decodes it into Arrow batches, writes partitioned
//! Parquet through `object_store`, streams the same batches to a loader over Arrow Flight,
//! and commits with the fencing protocol of ARCHITECTURE.md; the loader (`haul loader`)
//! writes them into a target Postgres exactly once per chunk.

pub mod decode;
pub mod encode;
pub mod executor;
pub mod layout;
pub mod load_client;
pub mod loader;
pub mod node;
pub mod source;
pub mod worker;
pub mod writer;
