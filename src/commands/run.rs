//! `haul run`: one job, whole, in this process; `haul plan`: the same job, planned only.

use haul::cli::RunArgs;
use haul::embedded::{RunOptions, run as run_job};

pub(super) async fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.dry_run {
        return plan(args).await;
    }
    let json = args.json;
    let opts = RunOptions::try_from(args).map_err(anyhow::Error::msg)?;
    // Ctrl-C or SIGTERM ends the job with what is committed kept, and says how to finish it
    let interrupt = super::stop_on_signal("interrupted; stopping the job")?;
    let summary = run_job(opts, interrupt).await?;
    if json {
        println!("{}", summary.to_json());
    } else {
        println!("{summary}");
    }
    Ok(())
}

/// `haul plan` / `haul run --dry-run`: the job's plan, nothing run.
pub(super) async fn plan(args: RunArgs) -> anyhow::Result<()> {
    let json = args.json;
    let opts = RunOptions::try_from(args).map_err(anyhow::Error::msg)?;
    let report = haul::dry_run::plan(&opts).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}
