//! What a lake holds, read from its manifests alone (`haul ls`): every job that wrote to
//! it, committed or not, with its table, rows, files, bytes, increment window and times.
//! A lineage tool, or `read_json` in a warehouse, can take it as a small table.

use std::collections::HashMap;

use serde::Serialize;

use super::table::{self, TableNow};
use super::{Dest, DestError, JobManifest, PlanFile};

/// One job in a lake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LakeJob {
    /// The table's folder under the lake (empty if the job's plan is gone).
    pub table_dir: String,
    /// The source table, as the job named it.
    pub table: String,
    pub job_id: String,
    /// `committed` (its files are published: readers see them), `superseded` (committed,
    /// then replaced by an `--overwrite` export), `loaded` (a load-only job: it committed
    /// into its target and wrote no Parquet here) or `unfinished` (running, failed or
    /// interrupted: nothing of it is published).
    pub state: &'static str,
    pub rows: u64,
    pub files: usize,
    pub bytes: u64,
    /// An incremental job's watermark column and window `(low, high]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watermark_column: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_low: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_high: Option<String>,
    /// The exported snapshot the job read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    pub started_at: String,
    /// When it committed (empty while unfinished).
    pub finished_at: String,
    /// Chunks committed so far (of an unfinished job), or in all.
    pub chunks_done: usize,
    pub chunks: usize,
}

/// Every job whose records are in `dest`, oldest first within each table.
pub async fn list(dest: &Dest) -> Result<Vec<LakeJob>, DestError> {
    // each table as its log holds it now
    let mut tables: HashMap<String, TableNow> = HashMap::new();
    let mut out = Vec::new();
    for job in dest.job_ids().await? {
        // the plan names the table's folder (written at planning, kept after the commit)
        let plan: Option<PlanFile> = dest.get_json(&dest.plan_path(&job)).await?;
        let tdir = plan
            .as_ref()
            .map(|p| p.plan.table_dir())
            .unwrap_or_default();
        if let Some(m) = dest
            .get_json::<JobManifest>(&dest.job_manifest_path(&job))
            .await?
        {
            if !tables.contains_key(&tdir) {
                let now = table::read(dest, &tdir).await?;
                tables.insert(tdir.clone(), now);
            }
            // a load-only job keeps only its records here: no export of the table to
            // hold or to have been replaced
            let loaded_only = plan.as_ref().is_some_and(|p| !p.output.parquet);
            let is_published = !loaded_only && table::holds(&tables[&tdir], &m);
            out.push(LakeJob {
                table_dir: tdir,
                table: m.table.clone(),
                job_id: job.to_string(),
                state: if loaded_only {
                    "loaded"
                } else if is_published {
                    "committed"
                } else {
                    "superseded"
                },
                rows: m.rows,
                files: m.files.len(),
                bytes: m.bytes,
                watermark_column: m.watermark.as_ref().map(|w| w.column.clone()),
                window_low: m.watermark.as_ref().and_then(|w| w.low.clone()),
                window_high: m.watermark.as_ref().map(|w| w.high.clone()),
                snapshot: m.snapshot.clone(),
                started_at: m.started_at.clone(),
                finished_at: m.finished_at.clone(),
                chunks_done: m.chunks,
                chunks: m.chunks,
            });
        } else {
            let done = dest.chunk_manifests(&job).await?;
            let window = plan.as_ref().and_then(|p| p.plan.window.as_ref());
            out.push(LakeJob {
                table_dir: tdir,
                table: plan.as_ref().map(|p| p.table.clone()).unwrap_or_default(),
                job_id: job.to_string(),
                state: "unfinished",
                rows: done.iter().map(|c| c.rows).sum(),
                files: done.iter().map(|c| c.files.len()).sum(),
                bytes: done.iter().map(|c| c.bytes).sum(),
                watermark_column: window.map(|w| w.column.clone()),
                window_low: window.and_then(|w| w.low.clone()),
                window_high: window.map(|w| w.high.clone()),
                snapshot: plan.as_ref().and_then(|p| p.plan.snapshot.clone()),
                started_at: plan
                    .as_ref()
                    .map(|p| p.created_at.clone())
                    .unwrap_or_default(),
                finished_at: String::new(),
                chunks_done: done.len(),
                chunks: plan.as_ref().map_or(0, |p| p.plan.chunks.len()),
            });
        }
    }
    out.sort_by(|a, b| {
        (&a.table_dir, &a.started_at, &a.job_id).cmp(&(&b.table_dir, &b.started_at, &b.job_id))
    });
    Ok(out)
}
