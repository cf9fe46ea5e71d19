//! The commit protocol's object-store side: a chunk is committed by creating its manifest
//! (create-if-absent: the first attempt wins); its parts stay staged. A job is committed
//! once every chunk is: for a Parquet export, by its table's commit ([`super::table`]:
//! intent, publish, one new version of the table's Delta log, clean-up); for a load-only
//! job, by its manifest. Until its table commit, readers of the table see nothing of the
//! job, whether it later fails, is cancelled or succeeds.
//!
//! Every step here is safe to repeat: a job already in its table's log is only cleaned
//! up after.

use super::table::{self, TableCommit, TableError, TableIdentity};
use super::{ChunkManifest, Dest, DestError, JobManifest};
use crate::error::{Classify, ErrorClass};
use crate::jobs::{JobPlan, JobSpec};
use crate::{ChunkId, JobId};

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Dest(#[from] DestError),
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("job {job}: {found} chunk manifests for {planned} chunks")]
    ChunksMissing {
        job: JobId,
        found: usize,
        planned: usize,
    },
}

impl Classify for CommitError {
    fn class(&self) -> ErrorClass {
        match self {
            CommitError::Dest(e) => e.class(),
            CommitError::Table(e) => e.class(),
            CommitError::ChunksMissing { .. } => ErrorClass::Internal,
        }
    }
}

/// How a chunk's commit ended.
#[derive(Debug)]
pub enum ChunkCommit {
    /// This attempt's manifest was created: it committed the chunk.
    Won(ChunkManifest),
    /// Another attempt had committed first; this one's staging files are gone.
    Lost(ChunkManifest),
}

/// The chunk's manifest if it was committed before: a redelivered committed chunk is a
/// cheap no-op.
pub async fn committed_chunk(
    dest: &Dest,
    job: &JobId,
    chunk: ChunkId,
) -> Result<Option<ChunkManifest>, DestError> {
    dest.get_json::<ChunkManifest>(&dest.chunk_manifest_path(job, chunk))
        .await
}

/// Commits a chunk whose parts are staged under `staging`: creates its manifest if no
/// attempt did. The parts stay staged until the job commits. The caller has checked that
/// its lease is current. An attempt that finds the manifest there deletes its staged
/// parts only if the manifest names another attempt's (it may be this attempt's own,
/// created by a try whose answer was lost).
pub async fn commit_chunk(
    dest: &Dest,
    manifest: ChunkManifest,
    staging: &str,
) -> Result<ChunkCommit, DestError> {
    let path = dest.chunk_manifest_path(&manifest.job, manifest.chunk);
    if dest.put_json(&path, &manifest, true).await? {
        return Ok(ChunkCommit::Won(manifest));
    }
    let winner = dest
        .get_json::<ChunkManifest>(&path)
        .await?
        .ok_or_else(|| DestError::BadManifest {
            path: path.to_string(),
            reason: "vanished after an already-exists answer".into(),
        })?;
    let ours = format!("{}/", staging.trim_end_matches('/'));
    if winner.files.iter().any(|f| f.staged.starts_with(&ours))
        || (winner.files.is_empty()
            && winner.epoch == manifest.epoch
            && winner.worker == manifest.worker
            && winner.committed_at == manifest.committed_at)
    {
        return Ok(ChunkCommit::Won(winner));
    }
    // a concurrent attempt committed first: ours is void
    dest.delete_prefix(staging).await?;
    Ok(ChunkCommit::Lost(winner))
}

/// Commits a job whose chunks are all committed (see the module docs).
pub async fn commit_job(
    dest: &Dest,
    job: &JobId,
    spec: &JobSpec,
    plan: &JobPlan,
    started_at: String,
) -> Result<JobManifest, CommitError> {
    #[cfg(feature = "testsuite")]
    let _armed = super::faults::arm();
    let chunks = dest.chunk_manifests(job).await?;
    if chunks.len() != plan.chunks.len() {
        return Err(CommitError::ChunksMissing {
            job: job.clone(),
            found: chunks.len(),
            planned: plan.chunks.len(),
        });
    }
    let manifest = JobManifest::new(job, spec, plan, &chunks, started_at);
    if !spec.output.parquet {
        // a load-only job: its manifest records it as done; there is no export to name
        dest.put_json(&dest.job_manifest_path(job), &manifest, true)
            .await?;
        dest.clear_staging(job).await?;
        return Ok(manifest);
    }
    let schema = crate::jobs::export_schema(&plan.table, spec.output.lineage);
    let table_dir = plan.table_dir();
    let commit = TableCommit {
        job,
        table_dir: &table_dir,
        identity: TableIdentity {
            database: plan.database.clone(),
            schema: plan.table.schema.clone(),
            table: plan.table.name.clone(),
        },
        window: plan.window.as_ref(),
        base: &plan.base,
        schema: &schema,
        partition_field: spec.output.partition_by.as_ref().map(|p| p.field.as_str()),
        manifest,
    };
    Ok(table::commit(dest, commit).await?)
}
