//! `haul plan` (`haul run --dry-run`): what a job would do, without doing it. The job is
//! planned exactly as `haul run` plans it (same key choice, same quantiles, same window),
//! in a read-only transaction and without exporting a snapshot; then the source's planner
//! is asked about each chunk's query (`EXPLAIN`, never run), so a chunk that would scan
//! the whole table shows before a night is spent on it. Nothing is written anywhere.

use haul_coordinator::RunError;
use haul_coordinator::prepare::{DryRun, Preparation, plan_only};
use haul_shared::ChunkRange;
use haul_shared::pg::{SourceError, quote_ident};
use haul_worker::executor::{copy_statement, select_statement};
use serde::Serialize;

use crate::embedded::RunOptions;

/// What a job would do.
#[derive(Clone, Debug, Serialize)]
pub struct PlanReport {
    pub job_id: String,
    /// The job is already committed in the destination: a run would do nothing.
    pub already_done: bool,
    pub table: String,
    /// Where its files would go (`<dest>/<table folder>`), empty for a load-only job.
    pub dest: String,
    /// The key the chunks are ranges of (`name type`), empty for page ranges or one chunk.
    pub key: Vec<String>,
    /// `key`, `ctid` (heap page ranges: the table has no usable key) or `whole` (one chunk).
    pub split: &'static str,
    pub estimated_rows: u64,
    /// Whether the run would read every chunk from one exported snapshot.
    pub snapshot: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition_by: Option<String>,
    /// An incremental job's window `(low, high]` on its watermark column.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// Chunks a resumed job has committed already (they would be skipped).
    pub committed: usize,
    /// With `--partition-by`: the partitions the first chunk's rows fall in (from up to
    /// [`PARTITION_SAMPLE`] of them). Each chunk writes at least a file per partition
    /// it touches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions_per_chunk: Option<u64>,
    /// What readers of the Parquet may get wrong about some columns, and the way out.
    pub warnings: Vec<String>,
    pub chunks: Vec<PlannedChunk>,
}

/// Rows of the first chunk looked at to count the partitions a chunk touches.
pub const PARTITION_SAMPLE: u64 = 100_000;
/// Partitions per chunk above which the plan warns of small files.
pub const MANY_PARTITIONS: u64 = 100;

/// One chunk of the plan and what the source's planner expects of its query.
#[derive(Clone, Debug, Serialize)]
pub struct PlannedChunk {
    pub chunk: usize,
    /// The chunk's rows, as the `WHERE` of its query.
    pub range: String,
    /// The source planner's estimate of its rows.
    pub estimated_rows: u64,
    /// How the source would read it (`Index Scan using orders_pkey`, `Seq Scan`, ...).
    pub scan: String,
    /// The statement the worker would run.
    pub statement: String,
}

/// Plans the job `opts` describes and asks the source how it would read each chunk.
pub async fn plan(opts: &RunOptions) -> Result<PlanReport, RunError> {
    let d: DryRun = match plan_only(&opts.spec, &opts.prepare_options()).await? {
        Preparation::Ready(d) => *d,
        Preparation::AlreadyDone(m) => {
            return Ok(PlanReport {
                job_id: m.job.to_string(),
                already_done: true,
                table: m.table.clone(),
                dest: opts.spec.dest.clone(),
                key: Vec::new(),
                split: "whole",
                estimated_rows: m.rows,
                snapshot: m.snapshot.is_some(),
                partition_by: None,
                window: None,
                committed: m.chunks,
                partitions_per_chunk: None,
                warnings: Vec::new(),
                chunks: Vec::new(),
            });
        }
    };
    let mut chunks = Vec::with_capacity(d.plan.chunks.len());
    for (i, range) in d.plan.chunks.iter().enumerate() {
        let (estimated_rows, scan) = explain(&d, range).await?;
        chunks.push(PlannedChunk {
            chunk: i,
            range: haul_worker::executor::chunk_filter(&d.plan, range),
            estimated_rows,
            scan,
            statement: copy_statement(&d.plan, range),
        });
    }
    let partitions_per_chunk = match (&d.spec.output.partition_by, d.plan.chunks.first()) {
        (Some(p), Some(first)) => Some(partitions_in(&d, p, first).await?),
        _ => None,
    };
    let split = match d.plan.chunks.first() {
        Some(ChunkRange::Ctid { .. }) => "ctid",
        _ if d.plan.key.is_empty() => "whole",
        _ => "key",
    };
    Ok(PlanReport {
        job_id: d.job.to_string(),
        already_done: false,
        table: d.plan.table.quoted(),
        dest: if d.spec.output.parquet {
            format!("{}/{}", d.dest.url.trim_end_matches('/'), d.table_dir)
        } else {
            String::new()
        },
        key: d
            .plan
            .key
            .iter()
            .map(|k| format!("{} {}", quote_ident(&k.name), k.pg_type))
            .collect(),
        split,
        estimated_rows: d.plan.estimated_rows,
        snapshot: d.spec.use_snapshot,
        partition_by: d.spec.output.partition_by.as_ref().map(|p| {
            let g = format!("{:?}", p.granularity).to_lowercase();
            format!("{} by {g}, folders {}=...", p.column, p.field)
        }),
        window: d.plan.window.as_ref().map(|w| {
            format!(
                "{}: ({}, {}]",
                w.column,
                w.low.as_deref().unwrap_or("-infinity"),
                w.high
            )
        }),
        committed: d.committed,
        partitions_per_chunk,
        warnings: if d.spec.output.parquet {
            d.plan.table.reader_caveats()
        } else {
            Vec::new()
        },
        chunks,
    })
}

/// The partitions (folders) the rows of `range` fall in, from up to [`PARTITION_SAMPLE`]
/// of them: a `timestamptz` by its UTC day (month, year), as the writer files it.
async fn partitions_in(
    d: &DryRun,
    p: &haul_shared::jobs::PartitionBy,
    range: &ChunkRange,
) -> Result<u64, RunError> {
    use haul_shared::jobs::Granularity;
    let col = quote_ident(&p.column);
    let utc = match d.plan.table.column(&p.column).map(|c| &c.kind) {
        Some(haul_shared::pg::PgKind::Timestamptz) => format!("({col} AT TIME ZONE 'UTC')"),
        _ => col.clone(),
    };
    let unit = match p.granularity {
        Granularity::Day => "day",
        Granularity::Month => "month",
        Granularity::Year => "year",
    };
    let sql = format!(
        "SELECT count(DISTINCT date_trunc('{unit}', {utc})) FROM \
         (SELECT {col} FROM {} WHERE {} LIMIT {PARTITION_SAMPLE}) s",
        d.plan.table.quoted(),
        haul_worker::executor::chunk_filter(&d.plan, range)
    );
    let n: i64 = d
        .session
        .client
        .query_one(&sql, &[])
        .await
        .map_err(|e| SourceError::query("counting the partitions of a chunk", e))?
        .get(0);
    Ok(n.max(0) as u64)
}

/// The source planner's row estimate and scan for a chunk's query.
async fn explain(d: &DryRun, range: &ChunkRange) -> Result<(u64, String), RunError> {
    let sql = format!("EXPLAIN (FORMAT JSON) {}", select_statement(&d.plan, range));
    // EXPLAIN's JSON comes as one value of type json: read as text (simple protocol)
    let text = d
        .session
        .client
        .simple_query(&sql)
        .await
        .map_err(|e| SourceError::query("explaining a chunk's query", e))?
        .into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let plan = &json[0]["Plan"];
    let rows = plan["Plan Rows"].as_f64().unwrap_or(0.0).max(0.0) as u64;
    Ok((rows, scan_of(plan)))
}

/// The node that reads the table: the first one with a relation, under any Gather or
/// Result above it.
fn scan_of(node: &serde_json::Value) -> String {
    if node.get("Relation Name").is_some() {
        let kind = node["Node Type"].as_str().unwrap_or("scan");
        return match node["Index Name"].as_str() {
            Some(ix) => format!("{kind} using {ix}"),
            None => kind.to_owned(),
        };
    }
    match node["Plans"].as_array().and_then(|p| p.first()) {
        Some(child) => scan_of(child),
        None => node["Node Type"].as_str().unwrap_or("?").to_owned(),
    }
}

impl std::fmt::Display for PlanReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.already_done {
            return write!(
                f,
                "job {} has already succeeded in {}: {} rows; a run would do nothing",
                self.job_id, self.dest, self.estimated_rows
            );
        }
        writeln!(
            f,
            "dry run of job {}: nothing was read or written",
            self.job_id
        )?;
        writeln!(f, "table:     {}", self.table)?;
        if !self.dest.is_empty() {
            writeln!(f, "dest:      {}", self.dest)?;
        }
        let split = match self.split {
            "key" => format!("key ranges on {}", self.key.join(", ")),
            "ctid" => "heap page ranges (no usable key)".to_owned(),
            _ => "one chunk".to_owned(),
        };
        writeln!(f, "split:     {split}")?;
        writeln!(
            f,
            "rows:      ~{} (estimated), {} chunks{}",
            self.estimated_rows,
            self.chunks.len(),
            if self.committed > 0 {
                format!(", {} already committed", self.committed)
            } else {
                String::new()
            }
        )?;
        writeln!(
            f,
            "snapshot:  {}",
            if self.snapshot {
                "one exported snapshot for every chunk"
            } else {
                "none (--no-snapshot): each chunk reads the table as it is then"
            }
        )?;
        if let Some(p) = &self.partition_by {
            writeln!(f, "partition: {p}")?;
        }
        if let Some(n) = self.partitions_per_chunk
            && n > MANY_PARTITIONS
        {
            writeln!(
                f,
                "warning:   the first chunk's rows fall in {n} partitions, so each chunk writes {n}+ files (~{} in all, of ~{} rows each); partition by a coarser unit (:month), or split on a key that follows the partition column (--key <column>,<key>)",
                n * self.chunks.len() as u64,
                (self.estimated_rows / (n * self.chunks.len().max(1) as u64).max(1)).max(1)
            )?;
        }
        if let Some(w) = &self.window {
            writeln!(f, "window:    {w}")?;
        }
        for w in &self.warnings {
            writeln!(f, "warning:   {w}")?;
        }
        writeln!(
            f,
            "{:>5} {:>12}  {:<36} range",
            "chunk", "est. rows", "scan"
        )?;
        for c in &self.chunks {
            writeln!(
                f,
                "{:>5} {:>12}  {:<36} {}",
                c.chunk, c.estimated_rows, c.scan, c.range
            )?;
        }
        if let Some(c) = self.chunks.first() {
            write!(
                f,
                "chunk {}'s statement (the others differ in their range):\n  {}",
                c.chunk, c.statement
            )?;
        }
        Ok(())
    }
}
