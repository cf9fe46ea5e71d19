//! `haul submit`: hands a job to the coordinator (`--wait` follows it and sets the exit
//! code).

use haul::cli::{JobRequest, SubmitArgs, absolute_dest};
use haul::client;

pub(super) async fn run(a: SubmitArgs) -> anyhow::Result<()> {
    let mut j = JobRequest::try_from(a.job).map_err(anyhow::Error::msg)?;
    if j.source_password.is_some() {
        anyhow::bail!(haul_shared::proto::PASSWORD_NOT_CARRIED);
    }
    if j.resume && !j.dest_given {
        // the coordinator knows where the job writes
        j.spec.dest = String::new();
    } else {
        // the coordinator and workers run elsewhere: a relative path means here
        j.spec.dest = absolute_dest(&j.spec.dest).map_err(anyhow::Error::msg)?;
    }
    let s = client::submit(&a.client.options(), j, a.wait, a.progress).await?;
    if a.wait || a.client.json {
        super::admin::print_status(&s, a.client.json);
    } else {
        println!("{}", s.job_id);
    }
    Ok(())
}
