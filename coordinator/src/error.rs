//! What can end a job early, each failure with its class (the user's, transient, or a
//! bug), which travels with it to the gRPC client.

use haul_shared::error::{Classify, ErrorClass};
use haul_shared::lake::DestError;
use haul_shared::lake::commit::CommitError;
use haul_shared::lake::table::TableError;
use haul_shared::lease::StoreError;
use haul_shared::load::{LoadClientError, LoadError};
use haul_shared::pg::SourceError;
use haul_shared::queue::QueueError;
use haul_shared::{ChunkId, JobId};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Dest(#[from] DestError),
    #[error(
        "job {job} was already started in this destination; pass --resume {job} to finish it, or choose another --job-id"
    )]
    AlreadyStarted { job: JobId },
    #[error(
        "job id {job} is taken in {dest}: it exported {what} {was}, not {now}; pick another --job-id (the same id again is a no-op only for the same job)"
    )]
    JobIdTaken {
        job: JobId,
        dest: String,
        what: &'static str,
        was: String,
        now: String,
    },
    #[error(
        "job {job} already committed its increment {window} to {dest}; each increment is a job of its own: leave --job-id out, or make it unique per run (e.g. with the date)"
    )]
    IncrementDone {
        job: JobId,
        dest: String,
        window: String,
    },
    #[error("no job {job} in {dest} (no plan at _haul/jobs/{job}/plan.json)")]
    NoSuchJob { job: JobId, dest: String },
    #[error(
        "job {job} read from snapshot {snapshot}, which ended with the process that held it; pass --fresh-snapshot to finish the remaining chunks under a new snapshot (rows changed in between may then differ between chunks)"
    )]
    NeedsFreshSnapshot { job: JobId, snapshot: String },
    #[error(
        "job {job} was split into ctid (page) ranges, which are only valid in its original snapshot: it cannot be finished; export the table again under another job id (leave --job-id out)"
    )]
    CannotResumeCtid { job: JobId },
    #[error(
        "job {job}'s plan does not record its source (an older haul planned it): pass --source as when it was first run"
    )]
    ResumeNeedsSource { job: JobId },
    #[error("the columns of {table} changed since job {job} was planned; rerun it as a new job")]
    TableChanged { job: JobId, table: String },
    #[error(
        "{dest}/{table_dir} holds job {other}'s export; pass --overwrite to replace that export, or choose another --dest"
    )]
    DestinationTaken {
        dest: String,
        table_dir: String,
        other: String,
    },
    #[error("chunk {chunk} failed: {reason}{}", finish_hint(finish))]
    ChunkFailed {
        chunk: ChunkId,
        reason: String,
        /// The command that finishes the job once the cause is fixed (none for a job
        /// that cannot be resumed).
        finish: Option<String>,
    },
    #[error(
        "interrupted; committed chunks are kept: finish with `haul run --resume {job} --fresh-snapshot --dest {dest}`"
    )]
    Interrupted { job: JobId, dest: String },
    #[error(transparent)]
    Load(#[from] LoadClientError),
    #[error(transparent)]
    Loader(#[from] LoadError),
    #[error("--load needs at least one loader address")]
    NoLoaders,
    #[error("--workers must be at least 1")]
    NoWorkers,
    #[error(
        "--partition-by column {column:?} is not among --columns; add it to --columns (the partition value is read from it)"
    )]
    PartitionColumnNotRead { column: String },
    #[error(
        "{table} has no columns to export (a Parquet file and a COPY need at least one); add a column or leave the table out"
    )]
    NoColumns { table: String },
    #[error("job {job}: {what}; a resume finishes the job as it was planned")]
    ResumeChanges { job: JobId, what: String },
    #[error(
        "--partition-by: partition field {field:?}: {reason}; name it with --partition-by {column}:<granularity>:as=<field>"
    )]
    PartitionField {
        field: String,
        column: String,
        reason: &'static str,
    },
    #[error(
        "--lineage-columns: {table} has a column named {column}, which the lineage column of that name would shadow; leave the column out with --columns, or drop --lineage-columns"
    )]
    LineageColumnTaken { table: String, column: String },
    #[error(
        "--incremental {column}: {dest}/{table_dir} holds a full export, not a series of increments; start the increments in another --dest (the first one reads everything up to its high mark)"
    )]
    NotIncremental {
        column: String,
        dest: String,
        table_dir: String,
    },
    #[error(
        "--incremental {column}: the increments in {dest} follow column {other:?}; keep that column, or choose another --dest"
    )]
    OtherWatermark {
        column: String,
        other: String,
        dest: String,
    },
    #[error(
        "--incremental {column}: the column has type {pg_type}; the watermark must be a timestamptz or timestamp column set to the time of each change"
    )]
    BadWatermark { column: String, pg_type: String },
    #[error(
        "--incremental {column}: {table}.{column} is a timestamp without time zone, and the source's sessions default to TimeZone {zone:?}, so `now()` and the like write it in local time, which haul cannot place on its UTC clock (rows would fall outside every window around the zone's offset and its DST changes); make the column timestamptz (ALTER TABLE {table} ALTER {column} TYPE timestamptz USING {column} AT TIME ZONE '{zone}'), or have the database's sessions write UTC (ALTER DATABASE ... SET TimeZone = 'UTC')"
    )]
    LocalWatermark {
        column: String,
        table: String,
        zone: String,
    },
    #[error(
        "--incremental cannot be combined with --load yet: an increment's changed rows must be merged into the target, which the loaders do not do"
    )]
    IncrementalLoad,
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("job store: {0}")]
    Store(#[from] StoreError),
    #[error("chunk queue: {0}")]
    Queue(#[from] QueueError),
    #[error("job {job} was failed: {reason}")]
    Failed { job: JobId, reason: String },
    #[error("job {job} was cancelled")]
    Cancelled { job: JobId },
    /// A broken invariant (a bug).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Classify for RunError {
    fn class(&self) -> ErrorClass {
        match self {
            RunError::Source(e) => e.class(),
            RunError::Dest(e) => e.class(),
            RunError::Load(e) => e.class(),
            RunError::Loader(e) => e.class(),
            RunError::Commit(e) => e.class(),
            RunError::Table(e) => e.class(),
            RunError::Store(e) => e.class(),
            RunError::Queue(e) => e.class(),
            RunError::Internal(_) => ErrorClass::Internal,
            RunError::AlreadyStarted { .. }
            | RunError::JobIdTaken { .. }
            | RunError::IncrementDone { .. }
            | RunError::NoSuchJob { .. }
            | RunError::NeedsFreshSnapshot { .. }
            | RunError::CannotResumeCtid { .. }
            | RunError::ResumeNeedsSource { .. }
            | RunError::TableChanged { .. }
            | RunError::DestinationTaken { .. }
            | RunError::ChunkFailed { .. }
            | RunError::Failed { .. }
            | RunError::Cancelled { .. }
            | RunError::Interrupted { .. }
            | RunError::NoLoaders
            | RunError::NoWorkers
            | RunError::ResumeChanges { .. }
            | RunError::NoColumns { .. }
            | RunError::PartitionColumnNotRead { .. }
            | RunError::PartitionField { .. }
            | RunError::LineageColumnTaken { .. }
            | RunError::NotIncremental { .. }
            | RunError::OtherWatermark { .. }
            | RunError::BadWatermark { .. }
            | RunError::LocalWatermark { .. }
            | RunError::IncrementalLoad => ErrorClass::User,
        }
    }

    fn code(&self) -> tonic::Code {
        match self {
            RunError::AlreadyStarted { .. }
            | RunError::JobIdTaken { .. }
            | RunError::IncrementDone { .. }
            | RunError::DestinationTaken { .. } => tonic::Code::AlreadyExists,
            RunError::NoSuchJob { .. } => tonic::Code::NotFound,
            RunError::NoLoaders | RunError::NoWorkers => tonic::Code::InvalidArgument,
            e => e.class().code(),
        }
    }
}

fn finish_hint(finish: &Option<String>) -> String {
    finish
        .as_ref()
        .map(|c| format!("; once that is fixed, finish the job with `{c}`"))
        .unwrap_or_default()
}

/// `s` as one word of a shell command: as it is when it is plain, else single-quoted, so
/// that a command haul prints runs as printed.
pub fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._:=@%+,-".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod shell_tests {
    use super::shell_word;

    #[test]
    fn words_run_as_printed() {
        assert_eq!(shell_word("file:///tmp/lake"), "file:///tmp/lake");
        assert_eq!(shell_word("file:///tmp/my lake"), "'file:///tmp/my lake'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
    }
}
