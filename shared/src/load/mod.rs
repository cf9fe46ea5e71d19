//! `haul loader`: an Arrow Flight server that loads each chunk a worker streams to it
//! (DoPut) into a target Postgres table, exactly once per chunk.
//!
//! # Protocol
//! - The job is prepared once (the `prepare` action, [`Loader::prepare`]): the target table
//!   is created from the stream's schema if asked, its columns are checked against the
//!   stream, it is emptied if asked, and the job is recorded in the ledger. A resumed job
//!   is found there and left alone (no second truncate).
//! - Each chunk is one transaction ([`Loader::load_chunk`]): binary `COPY ... FROM STDIN`
//!   of the streamed batches, then the chunk's ledger row `(job, chunk) -> epoch`, then
//!   COMMIT; only then is the `LoadAck` sent. The ledger lives in the target
//!   (`<ledger schema>.load_jobs`, `.load_chunks`), so the rows and the record that they
//!   were loaded commit together.
//! - A chunk already in the ledger is a replay: under an older epoch and the same
//!   snapshot its rows are already there, identical, and nothing is loaded again; under
//!   another snapshot (a job resumed with `--fresh-snapshot`, or one read without a
//!   snapshot) the rows the earlier attempt's transaction wrote (`xmin` = the `xid` its
//!   ledger row keeps; narrowed by the key range when the target orders the key as the
//!   source does) are deleted first, and must be as many as it loaded: the replay
//!   replaces exactly, never duplicates, and never takes another chunk's rows.
//! - Fencing: a chunk whose epoch is older than the ledger's is refused. The ledger row
//!   is written with a compare-and-set on the epoch read at the start, so of two attempts
//!   loading at once only one commits.

pub mod client;
pub mod encode;
pub mod error;
pub mod ledger;
pub mod metrics;
pub mod service;
mod target;

use arrow_schema::SchemaRef;
use bytes::Bytes;

pub use client::{ChunkLoad, LoadAuth, LoadClient, LoadClientError};
pub use error::LoadError;
pub use ledger::Loader;
pub use service::{LoaderOptions, LoaderService, serve};

/// The action that prepares a job on the target.
pub const PREPARE_ACTION: &str = "prepare";

/// The schema as a Flight IPC message, as `PrepareLoad.arrow_schema` carries it.
pub fn schema_to_ipc(schema: &SchemaRef) -> Result<Bytes, arrow_schema::ArrowError> {
    let opts = arrow_ipc::writer::IpcWriteOptions::default();
    let msg: arrow_flight::IpcMessage =
        arrow_flight::SchemaAsIpc::new(schema.as_ref(), &opts).try_into()?;
    Ok(msg.0)
}
