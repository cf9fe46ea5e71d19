//! The operator's commands: jobs, status, watch, cancel/pause/resume, workers, drain,
//! dead letters.

use haul::cli::{ClientArgs, DlqArgs, DrainArgs, JobCmdArgs, WorkerCmdArgs};
use haul::client;
use haul::progress::ProgressMode;

pub(super) async fn jobs(c: ClientArgs) -> anyhow::Result<()> {
    let jobs = client::jobs(&c.options()).await?;
    if c.json {
        let all: Vec<_> = jobs.iter().map(client::status_json).collect();
        println!("{}", serde_json::Value::Array(all));
    } else {
        print!("{}", client::jobs_table(&jobs));
    }
    Ok(())
}

/// One job's status, as text or (`--json`) JSON.
pub(super) fn print_status(s: &haul_shared::proto::wire::JobStatus, json: bool) {
    if json {
        println!("{}", client::status_json(s));
    } else {
        print!("{}", client::status_text(s));
    }
}

pub(super) async fn status(a: JobCmdArgs) -> anyhow::Result<()> {
    let s = client::status(&a.client.options(), &a.job).await?;
    print_status(&s, a.client.json);
    Ok(())
}

pub(super) async fn watch(a: JobCmdArgs) -> anyhow::Result<()> {
    let s = client::watch(&a.client.options(), &a.job, ProgressMode::Auto).await?;
    print_status(&s, a.client.json);
    Ok(())
}

pub(super) async fn control(a: JobCmdArgs, what: &str) -> anyhow::Result<()> {
    let s = client::control(&a.client.options(), &a.job, what).await?;
    print_status(&s, a.client.json);
    Ok(())
}

pub(super) async fn workers(c: ClientArgs) -> anyhow::Result<()> {
    let workers = client::workers(&c.options()).await?;
    if c.json {
        let all: Vec<_> = workers.iter().map(client::worker_json).collect();
        println!("{}", serde_json::Value::Array(all));
    } else {
        print!("{}", client::workers_table(&workers));
    }
    Ok(())
}

pub(super) async fn drain(a: DrainArgs) -> anyhow::Result<()> {
    let w = client::drain(&a.client.options(), &a.worker, a.requeue_in_flight, a.wait).await?;
    if a.wait {
        println!("worker {} drained and left", a.worker);
    } else {
        print!("{}", client::workers_table(&[w]));
    }
    Ok(())
}

pub(super) async fn dlq(a: DlqArgs) -> anyhow::Result<()> {
    let d = client::dead_letters(&a.client.options(), &a.job, a.action).await?;
    if a.client.json {
        println!("{}", client::dead_letters_json(&d));
    } else {
        print!("{}", client::dead_letters_table(&d, a.action));
    }
    Ok(())
}

pub(super) async fn undrain(a: WorkerCmdArgs) -> anyhow::Result<()> {
    let w = client::undrain(&a.client.options(), &a.worker).await?;
    print!("{}", client::workers_table(&[w]));
    Ok(())
}
