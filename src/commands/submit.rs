//! `haul submit`: hands a job to the coordinator (`--wait` follows it and sets the exit
//! code).

use haul::cli::{JobRequest, SubmitArgs};
use haul::client;

pub(super) async fn run(a: SubmitArgs) -> anyhow::Result<()> {
    let j = JobRequest::try_from(a.job).map_err(anyhow::Error::msg)?;
    let s = client::submit(&a.client.options(), j, a.wait, a.progress).await?;
    if a.wait {
        print!("{}", client::status_text(&s));
    } else {
        println!("{}", s.job_id);
    }
    Ok(())
}
