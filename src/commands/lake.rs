//! `haul ls`: what a lake holds, read from its manifests.

use haul::cli::LsArgs;
use haul_shared::lake::{Dest, catalog, local_path};
use indicatif::HumanBytes;

pub(super) async fn ls(a: LsArgs) -> anyhow::Result<()> {
    if let Some(p) = local_path(&a.dest)
        && !std::path::Path::new(p).is_dir()
    {
        anyhow::bail!("no lake at {}: no such folder", a.dest);
    }
    let dest = Dest::open(&a.dest, false)?;
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
            HumanBytes(j.bytes).to_string(),
        );
    }
    Ok(())
}
