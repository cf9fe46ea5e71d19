//! The operator CLI's side of the gRPC API: `haul submit|jobs|status|watch|cancel|pause|
//! resume|workers|drain|undrain`.

use std::io::IsTerminal;
use std::time::Duration;

use futures::StreamExt;
use haul_shared::proto::wire::{
    DrainRequest, JobRef, JobStatus, ListJobsRequest, ListWorkersRequest, SubmitRequest,
    WorkerInfo, WorkerRef, admin_client::AdminClient, jobs_client::JobsClient,
};
use haul_shared::rpc::{BearerToken, ClientOptions, RpcError};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::cli::JobRequest;
use crate::progress::ProgressMode;

type Authed = InterceptedService<Channel, BearerToken>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// The coordinator's answer; its message is the whole story (the status itself is
    /// not chained, or the message would be printed twice).
    #[error("{}", .0.message())]
    Status(tonic::Status),
    #[error("job {job} {state}{}", if .reason.is_empty() { String::new() } else { format!(": {}", .reason) })]
    JobEnded {
        job: String,
        state: String,
        reason: String,
    },
    #[error("cannot encode the output options: {0}")]
    Encode(String),
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Status(s)
    }
}

async fn jobs_client(o: &ClientOptions) -> Result<JobsClient<Authed>, ClientError> {
    let (ch, tok) = o.connect().await?;
    Ok(JobsClient::with_interceptor(ch, tok))
}

async fn admin_client(o: &ClientOptions) -> Result<AdminClient<Authed>, ClientError> {
    let (ch, tok) = o.connect().await?;
    Ok(AdminClient::with_interceptor(ch, tok))
}

fn job_ref(job: &str) -> JobRef {
    JobRef {
        job_id: job.to_owned(),
    }
}

/// Submits a job; with `wait`, follows it and fails unless it succeeds.
pub async fn submit(
    o: &ClientOptions,
    j: JobRequest,
    wait: bool,
    progress: ProgressMode,
) -> Result<JobStatus, ClientError> {
    let mut c = jobs_client(o).await?;
    let load = j.spec.load.clone();
    if load.as_ref().is_some_and(|l| l.endpoints.is_empty()) {
        return Err(ClientError::Encode(
            "--target-table, --create-table, --truncate-first and --no-parquet need --load".into(),
        ));
    }
    let req = SubmitRequest {
        source: j.spec.source.expose().to_owned(),
        table: j.spec.table,
        dest: j.spec.dest,
        columns: j.spec.columns,
        key: j.spec.key,
        split: match j.spec.split {
            haul_shared::jobs::Split::Key => "key".into(),
            haul_shared::jobs::Split::Ctid => "ctid".into(),
        },
        casts: j.spec.casts.into_iter().collect(),
        chunk_rows: j.spec.chunk_rows,
        output_json: serde_json::to_string(&j.spec.output)
            .map_err(|e| ClientError::Encode(e.to_string()))?,
        no_snapshot: !j.spec.use_snapshot,
        job_id: j.job_id.map(|i| i.to_string()).unwrap_or_default(),
        resume: j.resume,
        fresh_snapshot: j.fresh_snapshot,
        overwrite: j.overwrite,
        load: load
            .as_ref()
            .map(|l| l.endpoints.clone())
            .unwrap_or_default(),
        target_table: load
            .as_ref()
            .map(|l| l.target_table.clone())
            .unwrap_or_default(),
        create_table: load.as_ref().is_some_and(|l| l.create_table),
        truncate_first: load.as_ref().is_some_and(|l| l.truncate_first),
        incremental_column: j
            .spec
            .incremental
            .as_ref()
            .map(|i| i.column.clone())
            .unwrap_or_default(),
        lag_secs: j.spec.incremental.as_ref().map_or(0, |i| i.lag_secs),
    };
    let status = c.submit(req).await?.into_inner();
    eprintln!(
        "haul: job {} {} ({} chunks, ~{} rows)",
        status.job_id, status.state, status.chunks_total, status.estimated_rows
    );
    if !wait {
        return Ok(status);
    }
    follow(&mut c, &status.job_id, progress).await
}

/// Follows a job to its end; `Err(JobEnded)` unless it succeeded.
pub async fn watch(
    o: &ClientOptions,
    job: &str,
    progress: ProgressMode,
) -> Result<JobStatus, ClientError> {
    let mut c = jobs_client(o).await?;
    follow(&mut c, job, progress).await
}

async fn follow(
    c: &mut JobsClient<Authed>,
    job: &str,
    mode: ProgressMode,
) -> Result<JobStatus, ClientError> {
    let tty = std::io::stderr().is_terminal();
    let bar = matches!(mode, ProgressMode::Bar) || (matches!(mode, ProgressMode::Auto) && tty);
    let bar = bar.then(|| {
        let b = ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} chunks  {msg}  ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        b
    });
    let log = matches!(mode, ProgressMode::Log) || (matches!(mode, ProgressMode::Auto) && !tty);
    let mut last: Option<JobStatus> = None;
    let mut last_log = std::time::Instant::now() - Duration::from_secs(60);
    // the stream ends at the job's end; a dropped connection is picked up again
    'outer: loop {
        let mut stream = match c.watch(job_ref(job)).await {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
            Err(s) => return Err(s.into()),
        };
        while let Some(ev) = stream.next().await {
            let s = match ev {
                Ok(s) => s,
                Err(e) if e.code() == tonic::Code::Unavailable => {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue 'outer;
                }
                Err(e) => return Err(e.into()),
            };
            let msg = format!(
                "{} rows, {:.1} MiB, {} running{}",
                s.rows_done,
                s.bytes_done as f64 / (1024.0 * 1024.0),
                s.chunks_running,
                if s.state == "paused" { " (paused)" } else { "" }
            );
            if let Some(b) = &bar {
                b.set_length(u64::from(s.chunks_total.max(1)));
                b.set_position(u64::from(s.chunks_done));
                b.set_message(msg.clone());
            }
            let changed = last.as_ref().map(|l| l.state != s.state).unwrap_or(true);
            if log && (changed || last_log.elapsed() >= Duration::from_secs(5)) {
                eprintln!(
                    "haul: job {} {}: {}/{} chunks, {msg}",
                    s.job_id, s.state, s.chunks_done, s.chunks_total
                );
                last_log = std::time::Instant::now();
            }
            last = Some(s);
        }
        break;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let end = match last {
        Some(s) => s,
        None => c.get(job_ref(job)).await?.into_inner(),
    };
    if end.state == "succeeded" {
        Ok(end)
    } else {
        Err(ClientError::JobEnded {
            job: end.job_id,
            state: end.state,
            reason: end.reason,
        })
    }
}

pub async fn jobs(o: &ClientOptions) -> Result<Vec<JobStatus>, ClientError> {
    Ok(jobs_client(o)
        .await?
        .list(ListJobsRequest {})
        .await?
        .into_inner()
        .jobs)
}

pub async fn status(o: &ClientOptions, job: &str) -> Result<JobStatus, ClientError> {
    Ok(jobs_client(o).await?.get(job_ref(job)).await?.into_inner())
}

/// `cancel`, `pause` or `resume`.
pub async fn control(o: &ClientOptions, job: &str, what: &str) -> Result<JobStatus, ClientError> {
    let mut c = jobs_client(o).await?;
    let r = match what {
        "cancel" => c.cancel(job_ref(job)).await?,
        "pause" => c.pause(job_ref(job)).await?,
        _ => c.resume(job_ref(job)).await?,
    };
    Ok(r.into_inner())
}

pub async fn workers(o: &ClientOptions) -> Result<Vec<WorkerInfo>, ClientError> {
    Ok(admin_client(o)
        .await?
        .list_workers(ListWorkersRequest {})
        .await?
        .into_inner()
        .workers)
}

/// Orders a drain; with `wait`, returns once the worker has left.
pub async fn drain(
    o: &ClientOptions,
    worker: &str,
    requeue_in_flight: bool,
    wait: bool,
) -> Result<WorkerInfo, ClientError> {
    let mut c = admin_client(o).await?;
    let info = c
        .drain_worker(DrainRequest {
            worker_id: worker.to_owned(),
            requeue_in_flight,
        })
        .await?
        .into_inner();
    if !wait {
        return Ok(info);
    }
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let all = c
            .list_workers(ListWorkersRequest {})
            .await?
            .into_inner()
            .workers;
        match all.into_iter().find(|w| w.worker_id == worker) {
            None => return Ok(info),
            Some(w) if w.state == "gone" => return Ok(w),
            Some(_) => {}
        }
    }
}

pub async fn undrain(o: &ClientOptions, worker: &str) -> Result<WorkerInfo, ClientError> {
    Ok(admin_client(o)
        .await?
        .undrain_worker(WorkerRef {
            worker_id: worker.to_owned(),
        })
        .await?
        .into_inner())
}

fn ago(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let secs = (chrono::Utc::now().timestamp_millis() - ms).max(0) / 1000;
    format!("{secs}s ago")
}

/// `haul jobs` as a table.
pub fn jobs_table(jobs: &[JobStatus]) -> String {
    let mut out = format!(
        "{:<28} {:<10} {:>13} {:>14} {:<24} {}\n",
        "JOB", "STATE", "CHUNKS", "ROWS", "TABLE", "DEST"
    );
    for j in jobs {
        out.push_str(&format!(
            "{:<28} {:<10} {:>13} {:>14} {:<24} {}\n",
            j.job_id,
            j.state,
            format!("{}/{}", j.chunks_done, j.chunks_total),
            j.rows_done,
            j.table,
            j.dest
        ));
    }
    out
}

/// `haul status` as `key: value` lines.
pub fn status_text(s: &JobStatus) -> String {
    let mut out = format!(
        "job:       {}\nstate:     {}\ntable:     {}\nsource:    {}\ndest:      {}\nchunks:    {}/{} done, {} running, {} failed\nrows:      {} (~{} estimated)\nbytes:     {}\n",
        s.job_id,
        s.state,
        s.table,
        s.source,
        s.dest,
        s.chunks_done,
        s.chunks_total,
        s.chunks_running,
        s.chunks_failed,
        s.rows_done,
        s.estimated_rows,
        s.bytes_done
    );
    if !s.snapshot.is_empty() {
        // an open snapshot holds back vacuum on the source: say for how long
        let held = if matches!(s.state.as_str(), "planning" | "running" | "paused") {
            format!(
                " (held open for {})",
                ago(s.submitted_at_ms).trim_end_matches(" ago")
            )
        } else {
            String::new()
        };
        out.push_str(&format!("snapshot:  {}{held}\n", s.snapshot));
    }
    if !s.load_target.is_empty() {
        out.push_str(&format!(
            "load:      {} rows committed into {} (loaders {})\n",
            s.rows_done,
            s.load_target,
            s.loaders.join(", ")
        ));
    }
    if !s.reason.is_empty() {
        out.push_str(&format!("reason:    {}\n", s.reason));
    }
    if !s.manifest.is_empty() {
        out.push_str(&format!("manifest:  {}\n", s.manifest));
    }
    out
}

/// `haul workers` as a table.
pub fn workers_table(ws: &[WorkerInfo]) -> String {
    let mut out = format!(
        "{:<32} {:<20} {:>5} {:>9} {:>10} {:>12} {:<14} {}\n",
        "WORKER", "HOST", "SLOTS", "IN-FLIGHT", "CHUNKS", "ROWS", "HEARTBEAT", "STATE"
    );
    for w in ws {
        out.push_str(&format!(
            "{:<32} {:<20} {:>5} {:>9} {:>10} {:>12} {:<14} {}\n",
            w.worker_id,
            w.host,
            w.slots,
            w.in_flight,
            w.chunks_done,
            w.rows_done,
            ago(w.last_heartbeat_ms),
            w.state
        ));
    }
    out
}
