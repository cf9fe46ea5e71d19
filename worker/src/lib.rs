//! haul's chunk executor: reads one chunk from the source with binary `COPY` inside the
//! job's snapshot, decodes it into Arrow batches, writes partitioned Parquet through
//! `object_store`, and commits it with the fencing protocol of ARCHITECTURE.md.

pub mod decode;
pub mod executor;
pub mod layout;
pub mod node;
pub mod worker;
pub mod writer;
