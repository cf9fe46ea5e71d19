//! `haul ls`: what a lake holds, read from its manifests.

use haul::cli::LsArgs;
use haul_shared::lake::{Dest, catalog, local_path};

pub(super) async fn ls(a: LsArgs) -> anyhow::Result<()> {
    if let Some(p) = local_path(&a.dest)
        && !std::path::Path::new(p).is_dir()
    {
        anyhow::bail!("no lake at {}: no such folder", a.dest);
    }
    let dest = Dest::open(&a.dest, false)?;
    if !catalog::has_records(&dest).await? {
        anyhow::bail!(
            "no haul jobs in {} (its _haul/jobs/ is empty): is it the --dest the jobs wrote to?",
            dest.url
        );
    }
    let jobs = catalog::list(&dest).await?;
    if a.json {
        for j in &jobs {
            println!("{}", serde_json::to_string(j)?);
        }
        return Ok(());
    }
    println!(
        "{:<20} {:<24} {:<11} {:>12} {:>6} {:>10}  {:<35}  window (low, high]",
        "table", "job", "state", "rows", "files", "size", "finished"
    );
    for j in &jobs {
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
            human_bytes(j.bytes),
        );
    }
    Ok(())
}

/// `1.2 MiB`: binary units, one decimal.
fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
