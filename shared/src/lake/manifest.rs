//! What the lake's manifests hold: a chunk's (its commit point), a job's plan (what a
//! resume needs) and a job's (written once its table commit is in the table's log; a
//! copy of the latest is the table's `_manifest.json`, for convenience only).

use serde::{Deserialize, Serialize};

use crate::jobs::{JobPlan, JobSpec};
use crate::{ChunkId, ChunkRange, Epoch, JobId, WorkerId};

/// One part file of a chunk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartFile {
    /// Final path relative to the destination root (`orders/dt=2024-01-01/part-....parquet`).
    pub path: String,
    /// Where the committing attempt staged it, relative to the destination root.
    pub staged: String,
    pub rows: u64,
    pub bytes: u64,
    /// The partition directory (`dt=2024-01-01`), empty when unpartitioned.
    pub partition: String,
}

/// The commit point of one chunk: created once, with create-if-absent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChunkManifest {
    pub job: JobId,
    pub chunk: ChunkId,
    pub epoch: Epoch,
    pub worker: WorkerId,
    pub range: ChunkRange,
    pub rows: u64,
    pub bytes: u64,
    pub files: Vec<PartFile>,
    pub committed_at: String,
}

/// What `plan.json` holds: enough to resume a job (the source DSN is not stored; the
/// user passes it again).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlanFile {
    pub job: JobId,
    pub table: String,
    pub dest: String,
    pub columns: Vec<String>,
    pub key: Vec<String>,
    #[serde(default)]
    pub split: crate::jobs::Split,
    pub casts: std::collections::BTreeMap<String, String>,
    pub chunk_rows: u64,
    pub output: crate::jobs::OutputOptions,
    pub use_snapshot: bool,
    #[serde(default)]
    pub incremental: Option<crate::jobs::Incremental>,
    /// The job's load (target table and options; the loaders' addresses as planned), so
    /// that a resume finishes the load too.
    #[serde(default)]
    pub load: Option<crate::jobs::LoadSpec>,
    pub plan: JobPlan,
    pub created_at: String,
    /// The source's connection options (never a password), so that a resume can leave
    /// `--source` out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<crate::pg::ConnInfo>,
}

/// A column of the job manifest's schema.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ManifestColumn {
    pub name: String,
    pub pg_type: String,
    pub arrow_type: String,
    pub nullable: bool,
}

/// The commit point of a job, written last. Readers trust it, not a directory listing.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobManifest {
    pub job: JobId,
    pub table: String,
    pub source: String,
    pub snapshot: Option<String>,
    pub columns: Vec<ManifestColumn>,
    pub partition_by: Option<crate::jobs::PartitionBy>,
    pub chunks: usize,
    pub rows: u64,
    pub bytes: u64,
    pub files: Vec<PartFile>,
    pub started_at: String,
    pub finished_at: String,
    /// An incremental job's window. In the table's `_manifest.json` of a series of
    /// increments: the last one's, whose `high` the next increment starts after, while
    /// `files`, `rows`, `bytes` and `chunks` count every increment so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<crate::jobs::Window>,
    /// Written by an older haul in the table's `_manifest.json` of a series of
    /// increments: their job ids, oldest first (read to take such a table over).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub increments: Vec<JobId>,
    /// The version of the table's Delta log that committed the job (in the table's
    /// `_manifest.json` copy: the log version it was copied from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_version: Option<u64>,
}

impl JobManifest {
    /// A job's manifest from its committed chunks' manifests.
    pub fn new(
        job: &JobId,
        spec: &JobSpec,
        plan: &JobPlan,
        chunks: &[ChunkManifest],
        started_at: String,
    ) -> Self {
        let schema = plan.table.arrow_schema();
        JobManifest {
            job: job.clone(),
            table: format!("{}.{}", plan.table.schema, plan.table.name),
            source: spec.source.to_string(),
            snapshot: plan.snapshot.clone(),
            columns: plan
                .table
                .columns
                .iter()
                .zip(schema.fields())
                .map(|(c, f)| ManifestColumn {
                    name: c.name.clone(),
                    pg_type: c.pg_type.clone(),
                    arrow_type: f.data_type().to_string(),
                    nullable: f.is_nullable(),
                })
                .collect(),
            partition_by: spec.output.partition_by.clone(),
            chunks: chunks.len(),
            rows: chunks.iter().map(|c| c.rows).sum(),
            bytes: chunks.iter().map(|c| c.bytes).sum(),
            files: chunks
                .iter()
                .flat_map(|c| c.files.iter().cloned())
                .collect(),
            started_at,
            finished_at: chrono::Utc::now().to_rfc3339(),
            watermark: plan.window.clone(),
            increments: Vec::new(),
            table_version: None,
        }
    }
}
