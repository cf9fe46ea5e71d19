//! `haul run`: one job, whole, in this process.

use haul::cli::RunArgs;
use haul::embedded::{RunOptions, run as run_job};
use tokio_util::sync::CancellationToken;

pub(super) async fn run(args: RunArgs) -> anyhow::Result<()> {
    let opts = RunOptions::try_from(args).map_err(anyhow::Error::msg)?;
    // Ctrl-C ends the job with what is committed kept, and says how to finish it
    let interrupt = CancellationToken::new();
    let on_signal = interrupt.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_signal.cancel();
        }
    });
    let summary = run_job(opts, interrupt).await?;
    println!("{summary}");
    Ok(())
}
