//! The commit protocol's object-store side: a chunk is committed by creating its manifest
//! (create-if-absent: the first attempt wins); its parts stay staged. A job is committed
//! once every chunk is: its chunks' parts are published to their final names, then its
//! manifest and the table's are written (for an increment, the table's manifest is the
//! commit point, written before anything is published). Until then readers of the table's
//! folder see nothing of the job, whether it later fails, is cancelled or succeeds.
//!
//! Every step here is safe to repeat: publishing skips parts already in place, and a job
//! whose table manifest already names it only writes what is missing.

use tracing::warn;

use super::{ChunkManifest, Dest, DestError, JobManifest, table_dir};
use crate::error::{Classify, ErrorClass};
use crate::jobs::{JobPlan, JobSpec, Window};
use crate::{ChunkId, JobId};

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Dest(#[from] DestError),
    #[error(
        "job {job}: another increment ({other}) was committed to {dest} while this one ran; its window no longer follows on, so it was not recorded. Run again"
    )]
    IncrementRaced {
        job: JobId,
        other: JobId,
        dest: String,
    },
    #[error("job {job}: {found} chunk manifests for {planned} chunks")]
    ChunksMissing {
        job: JobId,
        found: usize,
        planned: usize,
    },
    #[error("the increments' manifest {table_dir}/_manifest.json vanished")]
    IncrementsVanished { table_dir: String },
}

impl Classify for CommitError {
    fn class(&self) -> ErrorClass {
        match self {
            CommitError::Dest(e) => e.class(),
            CommitError::IncrementRaced { .. } => ErrorClass::User,
            CommitError::ChunksMissing { .. } | CommitError::IncrementsVanished { .. } => {
                ErrorClass::Internal
            }
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
/// its lease is current.
pub async fn commit_chunk(
    dest: &Dest,
    manifest: ChunkManifest,
    staging: &str,
) -> Result<ChunkCommit, DestError> {
    let path = dest.chunk_manifest_path(&manifest.job, manifest.chunk);
    if !dest.put_json(&path, &manifest, true).await? {
        // a concurrent attempt committed first: ours is void
        dest.delete_prefix(staging).await?;
        let winner = dest
            .get_json::<ChunkManifest>(&path)
            .await?
            .ok_or_else(|| DestError::BadManifest {
                path: path.to_string(),
                reason: "vanished after an already-exists answer".into(),
            })?;
        return Ok(ChunkCommit::Lost(winner));
    }
    Ok(ChunkCommit::Won(manifest))
}

/// Publishes every chunk's staged parts (see [`Dest::publish`]).
async fn publish_all(dest: &Dest, chunks: &[ChunkManifest]) -> Result<(), DestError> {
    for m in chunks {
        dest.publish(m).await?;
    }
    Ok(())
}

/// Commits a job whose chunks are all committed: its parts are published, the job
/// manifest is written, then the table's manifest (an increment's table manifest first:
/// it is the commit point); parts of an export it replaces and the staging area are
/// removed.
pub async fn commit_job(
    dest: &Dest,
    job: &JobId,
    spec: &JobSpec,
    plan: &JobPlan,
    started_at: String,
) -> Result<JobManifest, CommitError> {
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
        publish_all(dest, &chunks).await?;
        dest.put_json(&dest.job_manifest_path(job), &manifest, true)
            .await?;
        dest.clear_staging(job).await?;
        return Ok(manifest);
    }
    let tdir = table_dir(&plan.table.name);
    let old: Option<JobManifest> = dest.get_json(&dest.table_manifest_path(&tdir)).await?;
    if let Some(w) = &plan.window {
        // The table's manifest is the increment's commit point, so it is written before
        // anything is published (an increment that lost a race publishes nothing) and
        // before the job's own manifest: a job manifest never exists for an increment
        // the table's manifest does not list.
        match old {
            // recorded before the process stopped; only the job's own manifest is missing
            Some(o) if o.job == *job => {}
            old => {
                let table = increments_with(old, w, job, &manifest, dest, &tdir)?;
                dest.put_json(&dest.table_manifest_path(&tdir), &table, false)
                    .await?;
            }
        }
        publish_all(dest, &chunks).await?;
        dest.put_json(&dest.job_manifest_path(job), &manifest, true)
            .await?;
        dest.clear_staging(job).await?;
        return Ok(manifest);
    }
    publish_all(dest, &chunks).await?;
    dest.put_json(&dest.job_manifest_path(job), &manifest, true)
        .await?;
    dest.put_json(&dest.table_manifest_path(&tdir), &manifest, false)
        .await?;
    if let Some(old) = old.filter(|o| &o.job != job) {
        // --overwrite: the previous export's parts go once the new one is committed
        for f in &old.files {
            if let Err(e) = dest.delete_if_exists(&dest.path(&f.path)).await {
                warn!(error = %e, file = %f.path, "could not remove a part of the replaced export");
            }
        }
    }
    dest.clear_staging(job).await?;
    Ok(manifest)
}

/// The table's manifest of a series of increments with `increment` added: it must follow
/// on from the last one recorded in `old` (or be the first), and it then lists every
/// increment's files and rows, and the new high mark.
fn increments_with(
    old: Option<JobManifest>,
    w: &Window,
    job: &JobId,
    increment: &JobManifest,
    dest: &Dest,
    tdir: &str,
) -> Result<JobManifest, CommitError> {
    let mut table = match old {
        Some(o) if o.watermark.as_ref().map(|ow| &ow.high) != w.low.as_ref() => {
            return Err(CommitError::IncrementRaced {
                job: job.clone(),
                other: o.job,
                dest: dest.url.clone(),
            });
        }
        Some(o) => o,
        None if w.low.is_some() => {
            return Err(CommitError::IncrementsVanished {
                table_dir: tdir.to_owned(),
            });
        }
        None => JobManifest {
            increments: Vec::new(),
            chunks: 0,
            rows: 0,
            bytes: 0,
            files: Vec::new(),
            ..increment.clone()
        },
    };
    table.increments.push(job.clone());
    table.job = job.clone();
    table.snapshot = increment.snapshot.clone();
    table.columns = increment.columns.clone();
    table.chunks += increment.chunks;
    table.rows += increment.rows;
    table.bytes += increment.bytes;
    table.files.extend(increment.files.iter().cloned());
    table.finished_at = increment.finished_at.clone();
    table.watermark = increment.watermark.clone();
    Ok(table)
}
