//! `haul ls`, `haul show`: what a lake holds, read from its manifests; `haul verify`:
//! whether an export holds exactly its source's rows.

use std::collections::BTreeMap;

use haul::cli::{GcArgs, LsArgs, ShowArgs, VerifyArgs};
use haul_shared::JobId;
use haul_shared::lake::catalog::{self, LakeJob};
use haul_shared::lake::{Dest, JobManifest, gc, local_path};
use haul_shared::pg::Database;
use haul_worker::verify::{self, VerifyRequest};
use indicatif::{HumanBytes, HumanCount};

pub(super) async fn ls(a: LsArgs) -> anyhow::Result<()> {
    let dest = open_lake(&a.dest)?;
    let jobs = catalog::list(&dest).await?;
    if jobs.is_empty() {
        anyhow::bail!(
            "no haul jobs in {} (its _haul/jobs/ is empty): is it the --dest the jobs wrote to?",
            dest.url
        );
    }
    if a.json {
        for j in &jobs {
            println!("{}", serde_json::to_string(j)?);
        }
        return Ok(());
    }
    print_jobs(&jobs);
    Ok(())
}

pub(super) async fn show(a: ShowArgs) -> anyhow::Result<()> {
    let (lake, table_dir) = split_table_path(&a.table)?;
    let dest = open_lake(lake)?;
    let current = haul_shared::lake::table::current(&dest, &table_dir).await?;
    let version = current.as_ref().and_then(|(now, _)| now.base.version);
    let manifest: Option<JobManifest> = current.map(|(_, m)| m);
    let jobs: Vec<LakeJob> = catalog::list(&dest)
        .await?
        .into_iter()
        .filter(|j| j.table_dir == table_dir)
        .collect();
    if manifest.is_none() && jobs.is_empty() {
        anyhow::bail!(
            "no table {table_dir} in {}: no job wrote to it (`haul ls {lake}` lists the lake's tables)",
            dest.url
        );
    }
    let partitions = manifest.as_ref().map(partitions).unwrap_or_default();
    if a.json {
        let v = serde_json::json!({
            "table_dir": table_dir,
            "version": version,
            "export": manifest,
            "partitions": partitions.iter().map(|(p, (files, rows))| {
                serde_json::json!({"partition": p, "files": files, "rows": rows})
            }).collect::<Vec<_>>(),
            "jobs": jobs,
        });
        println!("{v}");
        return Ok(());
    }
    let url = format!("{}/{table_dir}", dest.url.trim_end_matches('/'));
    match &manifest {
        None => println!("{url}: nothing committed yet (the jobs below have not finished)"),
        Some(m) => {
            println!("{url}: {} from {}", m.table, m.source);
            let increments = jobs
                .iter()
                .filter(|j| j.state == "committed" && j.watermark_column.is_some())
                .count();
            let what = if m.watermark.is_none() {
                format!("job {}", m.job)
            } else {
                format!("{increments} increments, the last {}", m.job)
            };
            if let Some(v) = version {
                println!("log:       {url}/_delta_log, version {v} (Delta Lake)");
            }
            println!(
                "export:    {what}, committed {}: {} rows, {} files, {}",
                m.finished_at,
                m.rows,
                m.files.len(),
                HumanBytes(m.bytes)
            );
            if let Some(s) = &m.snapshot {
                println!("snapshot:  {s} (the last job's)");
            }
            if let Some(w) = &m.watermark {
                println!(
                    "window:    {}: up to {} (the next increment starts after it)",
                    w.column, w.high
                );
            }
            if let Some(p) = &m.partition_by {
                let (first, last) = (
                    partitions.keys().next().cloned().unwrap_or_default(),
                    partitions.keys().last().cloned().unwrap_or_default(),
                );
                println!(
                    "partition: {} by {}: {} folders, {first} .. {last}",
                    p.column,
                    format!("{:?}", p.granularity).to_lowercase(),
                    partitions.len()
                );
            }
            println!("columns:");
            for c in &m.columns {
                println!(
                    "  {:<28} {:<28} {:<34} {}",
                    c.name,
                    c.pg_type,
                    c.arrow_type,
                    if c.nullable { "null" } else { "not null" }
                );
            }
        }
    }
    println!("jobs:");
    print_jobs(&jobs);
    Ok(())
}

pub(super) async fn verify(a: VerifyArgs) -> anyhow::Result<()> {
    let (lake, table_dir) = split_table_path(&a.table)?;
    let dest = open_lake(lake)?;
    let source = Database::from_user(&a.source, a.login.source_password_file.clone())
        .map_err(|e| anyhow::anyhow!("--source: {e}"))?;
    let job = a
        .job
        .as_deref()
        .map(JobId::parse)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--job: {e}"))?;
    let report = verify::verify(VerifyRequest {
        dest,
        table_dir: table_dir.to_owned(),
        job,
        source,
        parallelism: a.workers,
    })
    .await?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else if report.identical {
        println!(
            "job {} of {}: identical to the source: {} rows in {} chunks, counts and checksums equal ({} columns)",
            report.job_id,
            report.table,
            HumanCount(report.source_rows),
            report.chunks_checked,
            report.columns.len()
        );
    } else {
        let differ: Vec<_> = report.chunks.iter().filter(|c| !c.identical).collect();
        println!(
            "job {} of {} differs from the source in {} of {} chunks (source {} rows, export {} rows):",
            report.job_id,
            report.table,
            differ.len(),
            report.chunks_checked,
            report.source_rows,
            report.export_rows
        );
        for c in differ {
            let what = if let Some(p) = &c.problem {
                format!("source {} rows, export unreadable: {p}", c.source_rows)
            } else if c.source_rows == c.export_rows {
                format!("{} rows each, checksums differ", c.source_rows)
            } else {
                format!(
                    "source {} rows, export {} rows",
                    c.source_rows, c.export_rows
                )
            };
            println!("  chunk {:06}: {what}; rows where {}", c.chunk, c.range);
        }
        println!(
            "(a source written since the job read it differs by what was written; `haul run --overwrite` exports it again)"
        );
    }
    if !report.identical {
        return Err(super::Reported(format!(
            "verification failed: the export of {} differs from the source",
            report.table
        ))
        .into());
    }
    Ok(())
}

pub(super) async fn gc(a: GcArgs) -> anyhow::Result<()> {
    let dest = open_lake(&a.dest)?;
    let report = gc::collect(
        &dest,
        std::time::Duration::from_secs(a.older_than.0),
        a.delete,
    )
    .await?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    for g in &report.objects {
        println!(
            "{:>10}  {}  ({})",
            HumanBytes(g.bytes).to_string(),
            g.path,
            g.reason
        );
    }
    let young = if report.too_young > 0 {
        format!(
            "; {} younger than --older-than {}s left alone (a running job's, perhaps)",
            report.too_young, a.older_than.0
        )
    } else {
        String::new()
    };
    match (report.objects.len(), report.removed) {
        (0, _) => println!("{}: nothing to collect{young}", dest.url),
        (n, true) => println!("removed {n} objects, {}{young}", HumanBytes(report.bytes)),
        (n, false) => println!(
            "{n} objects, {}, that no manifest needs{young}; `haul gc {} --delete` removes them",
            HumanBytes(report.bytes),
            a.dest
        ),
    }
    Ok(())
}

/// `<lake>/<table folder>` split at its last `/`; the table may also be named as in the
/// source (`Odd "Table"` is the folder `Odd__Table_`).
fn split_table_path(path: &str) -> anyhow::Result<(&str, String)> {
    path.trim_end_matches('/')
        .rsplit_once('/')
        .filter(|(l, t)| !l.is_empty() && !t.is_empty() && !l.ends_with(':') && !l.ends_with('/'))
        .map(|(l, t)| {
            let dir = match t.split_once('.') {
                Some((schema, name)) => haul_shared::lake::table_dir(schema, name),
                None => haul_shared::lake::table_dir("public", t),
            };
            (l, dir)
        })
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{path}: name a table's folder in a lake, <dest>/<table> (e.g. ./lake/orders); `haul ls <dest>` lists them"
            )
        })
}

/// Files and rows in each partition folder of an export (`""` when unpartitioned).
fn partitions(m: &JobManifest) -> BTreeMap<String, (usize, u64)> {
    let mut out: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for f in &m.files {
        let e = out.entry(f.partition.clone()).or_default();
        e.0 += 1;
        e.1 += f.rows;
    }
    out
}

/// A lake, refused in one line when it is a local folder that does not exist.
fn open_lake(url: &str) -> anyhow::Result<Dest> {
    if let Some(p) = local_path(url)
        && !std::path::Path::new(p).is_dir()
    {
        anyhow::bail!("no lake at {url}: no such folder");
    }
    Ok(Dest::open(url, false)?)
}

fn print_jobs(jobs: &[LakeJob]) {
    println!(
        "{:<20} {:<24} {:<11} {:>12} {:>6} {:>10}  {:<35}  window (low, high]",
        "table", "job", "state", "rows", "files", "size", "finished"
    );
    for j in jobs {
        let window = match (&j.watermark_column, &j.window_high) {
            (Some(c), Some(high)) => {
                format!("{c}: ({}, {high}]", j.window_low.as_deref().unwrap_or("-"))
            }
            _ => "-".into(),
        };
        let finished = if j.finished_at.is_empty() {
            format!("{}/{} chunks", j.chunks_done, j.chunks)
        } else {
            j.finished_at.clone()
        };
        println!(
            "{:<20} {:<24} {:<11} {:>12} {:>6} {:>10}  {finished:<35}  {window}",
            j.table_dir,
            j.job_id,
            j.state,
            j.rows,
            j.files,
            HumanBytes(j.bytes).to_string(),
        );
    }
}
