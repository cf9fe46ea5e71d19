//! What can go wrong loading a chunk, and what each failure means for a retry.

use crate::error::{Classify, ErrorClass};
use crate::pg::SourceError;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot connect to the target {dsn}: {reason}")]
    Connect {
        dsn: String,
        reason: String,
        transient: bool,
    },
    #[error("target: {0}")]
    Target(SourceError),
    #[error("bad load request: {0}")]
    BadRequest(String),
    #[error(
        "target table {table} does not exist; create it, or pass --create-table to create it from the source's columns"
    )]
    NoTargetTable { table: String },
    #[error("target table {table} does not fit the stream: {problems}")]
    Mismatch { table: String, problems: String },
    #[error(
        "job {job} was not prepared on this loader's target (is every --load endpoint loading the same database?)"
    )]
    NotPrepared { job: String },
    #[error("job {job} loads into {prepared}, not {asked}")]
    OtherTable {
        job: String,
        prepared: String,
        asked: String,
    },
    #[error(
        "chunk {chunk} of job {job}: epoch {epoch} is fenced off, epoch {committed} already loaded it"
    )]
    Fenced {
        job: String,
        chunk: u32,
        epoch: u64,
        committed: u64,
    },
    #[error("chunk {chunk} of job {job} was loaded by another attempt meanwhile; retry")]
    Conflict { job: String, chunk: u32 },
    #[error(
        "chunk {chunk} of job {job} was loaded under another snapshot by a loader that did not record its transaction, and its rows cannot be told apart in {table}; truncate {table} and rerun the job"
    )]
    CannotReplace {
        job: String,
        chunk: u32,
        table: String,
    },
    #[error(
        "chunk {chunk} of job {job} was loaded under another snapshot, and replacing it found {found} of the {loaded} rows that load wrote in {table} (rows changed in the target since?); nothing was replaced: truncate {table} and rerun the job"
    )]
    ReplacedRowsChanged {
        job: String,
        chunk: u32,
        table: String,
        loaded: u64,
        found: u64,
    },
    #[error("the stream broke: {0}")]
    Stream(String),
    #[error("cannot serve: {0}")]
    Serve(String),
    #[error("{0}")]
    Encode(#[from] super::encode::EncodeError),
}

impl Classify for LoadError {
    fn class(&self) -> ErrorClass {
        match self {
            LoadError::Connect { transient, .. } => {
                if *transient {
                    ErrorClass::Transient
                } else {
                    ErrorClass::User
                }
            }
            LoadError::Target(e) => e.class(),
            LoadError::Fenced { .. } | LoadError::Conflict { .. } | LoadError::Stream(_) => {
                ErrorClass::Transient
            }
            _ => ErrorClass::User,
        }
    }

    /// `ABORTED` for what a new attempt may get past, `INVALID_ARGUMENT` for a request the
    /// loader cannot read; otherwise the class's code.
    fn code(&self) -> tonic::Code {
        match self {
            LoadError::Fenced { .. } | LoadError::Conflict { .. } => tonic::Code::Aborted,
            LoadError::BadRequest(_) | LoadError::Encode(_) => tonic::Code::InvalidArgument,
            e => e.class().code(),
        }
    }
}

impl LoadError {
    pub(super) fn query(context: &str, e: tokio_postgres::Error) -> Self {
        LoadError::Target(SourceError::query(context, e))
    }
}
