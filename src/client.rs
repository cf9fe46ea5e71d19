//! The operator CLI's side of the gRPC API: `haul submit|jobs|status|watch|cancel|pause|
//! resume|workers|drain|undrain|dlq`.

use std::time::Duration;

use futures::StreamExt;
use haul_shared::jobs::Submission;
use haul_shared::proto::wire::{
    DeadLetters, DrainRequest, JobRef, JobState, JobStatus, ListJobsRequest, ListWorkersRequest,
    WorkerInfo, WorkerRef, admin_client::AdminClient, jobs_client::JobsClient,
};
use haul_shared::proto::{state_is_terminal, state_name, submission_to_wire};
use haul_shared::rpc::{BearerToken, ClientOptions, RpcError};
use indicatif::{HumanBytes, HumanCount};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::cli::JobRequest;
use crate::progress::{ProgressMode, Reporter, Snapshot};

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
    #[error("{0}")]
    Invalid(String),
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
    j.spec.check_load().map_err(ClientError::Invalid)?;
    let req = submission_to_wire(&Submission {
        spec: j.spec,
        job_id: j.job_id,
        resume: j.resume,
        fresh_snapshot: j.fresh_snapshot,
        overwrite: j.overwrite,
    });
    let mut c = jobs_client(o).await?;
    let status = c.submit(req).await?.into_inner();
    eprintln!(
        "haul: job {} {} ({} chunks, ~{} rows)",
        status.job_id,
        state_name(status.state()),
        status.chunks_total,
        status.estimated_rows
    );
    if !wait {
        return Ok(status);
    }
    follow(o, c, &status.job_id, progress).await
}

/// Follows a job to its end; `Err(JobEnded)` unless it succeeded.
pub async fn watch(
    o: &ClientOptions,
    job: &str,
    progress: ProgressMode,
) -> Result<JobStatus, ClientError> {
    let c = jobs_client(o).await?;
    follow(o, c, job, progress).await
}

/// How long following a job waits out a coordinator that went away (a failover: the
/// standby takes over within about 15 s) before giving up with the last error.
const FOLLOW_PATIENCE: Duration = Duration::from_secs(120);

/// Whether a call failed because the coordinator went away or stands by (the connection
/// broke, or it answered `Unavailable`), not because of what was asked.
fn connection_trouble(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
    )
}

/// After connection trouble: waits a little and connects again, to whichever coordinator
/// is active by then; past [`FOLLOW_PATIENCE`] since the trouble began, `err`.
async fn reconnect(
    o: &ClientOptions,
    c: &mut JobsClient<Authed>,
    since: &mut Option<std::time::Instant>,
    err: tonic::Status,
) -> Result<(), ClientError> {
    let t0 = match since {
        Some(t) => *t,
        None => {
            tracing::warn!(error = %err.message(), "lost the coordinator; following the job again once one answers");
            *since.insert(std::time::Instant::now())
        }
    };
    if t0.elapsed() > FOLLOW_PATIENCE {
        return Err(ClientError::Status(err));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let Ok(fresh) = jobs_client(o).await {
        *c = fresh;
    }
    Ok(())
}

/// Follows a job's status stream to its end, through a coordinator failover (given
/// several addresses, it follows on the one that took over).
async fn follow(
    o: &ClientOptions,
    mut c: JobsClient<Authed>,
    job: &str,
    mode: ProgressMode,
) -> Result<JobStatus, ClientError> {
    // the same display as `haul run`'s
    let mut reporter = Reporter::new(mode, job);
    let mut last: Option<JobStatus> = None;
    let mut log_state: Option<i32> = None;
    let mut trouble: Option<std::time::Instant> = None;
    // the stream ends at the job's end; a dropped connection is picked up again
    'outer: loop {
        let mut stream = match c.watch(job_ref(job)).await {
            Ok(s) => s.into_inner(),
            Err(s) if connection_trouble(&s) => {
                reconnect(o, &mut c, &mut trouble, s).await?;
                continue;
            }
            Err(s) => return Err(s.into()),
        };
        loop {
            // the stream sends only changes: the display (and its log line every 5 s)
            // goes on between them
            let ev = tokio::select! {
                ev = stream.next() => ev,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    if let Some(s) = &last {
                        reporter.update(&snapshot_of(s));
                    }
                    continue;
                }
            };
            let Some(ev) = ev else { break };
            let s = match ev {
                Ok(s) => s,
                Err(e) if connection_trouble(&e) => {
                    reconnect(o, &mut c, &mut trouble, e).await?;
                    continue 'outer;
                }
                Err(e) => return Err(e.into()),
            };
            if trouble.take().is_some() {
                tracing::info!(job_id = %s.job_id, "following the job again");
            }
            if log_state != Some(s.state) && !matches!(mode, ProgressMode::None) {
                tracing::info!(job_id = %s.job_id, state = state_name(s.state()), "job state");
                log_state = Some(s.state);
            }
            if !s.stalled.is_empty()
                && last.as_ref().is_none_or(|l| l.stalled != s.stalled)
                && !matches!(mode, ProgressMode::None)
            {
                tracing::warn!(job_id = %s.job_id, reason = %s.stalled, "the job is not moving");
            }
            reporter.update(&snapshot_of(&s));
            last = Some(s);
        }
        break;
    }
    reporter.finish();
    let end = match last {
        Some(s) => s,
        None => c.get(job_ref(job)).await?.into_inner(),
    };
    if end.state() == JobState::Succeeded {
        Ok(end)
    } else {
        Err(ClientError::JobEnded {
            state: state_name(end.state()).to_owned(),
            job: end.job_id,
            reason: end.reason,
        })
    }
}

/// The progress display's view of a job's status.
fn snapshot_of(s: &JobStatus) -> Snapshot {
    Snapshot {
        rows: s.rows_done,
        bytes: s.bytes_done,
        estimated_rows: s.estimated_rows,
        chunks_total: s.chunks_total as usize,
        chunks_done: s.chunks_done as usize,
        chunks_running: s.chunks_running as usize,
        chunks_waiting: s.chunks_waiting as usize,
        waiting: (s.chunks_waiting > 0 && s.next_retry_at_ms > 0)
            .then(|| (s.waiting_reason.clone(), s.next_retry_at_ms)),
        chunks_failed: s.chunks_failed as usize,
        paused: s.state() == JobState::Paused,
        stalled: (!s.stalled.is_empty()).then(|| s.stalled.clone()),
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

/// What `haul dlq` does with a job's dead letters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DlqAction {
    /// Show them.
    List,
    /// Queue their chunks again (the job must be running or paused), and forget them.
    Requeue,
    /// Forget them.
    Purge,
}

pub async fn dead_letters(
    o: &ClientOptions,
    job: &str,
    action: DlqAction,
) -> Result<DeadLetters, ClientError> {
    let mut c = admin_client(o).await?;
    let r = match action {
        DlqAction::List => c.list_dead_letters(job_ref(job)).await?,
        DlqAction::Requeue => c.requeue_dead_letters(job_ref(job)).await?,
        DlqAction::Purge => c.purge_dead_letters(job_ref(job)).await?,
    };
    Ok(r.into_inner())
}

/// `haul dlq` as a table: chunk, when, why.
pub fn dead_letters_table(d: &DeadLetters, action: DlqAction) -> String {
    let verb = match action {
        DlqAction::List => "dead-lettered",
        DlqAction::Requeue => "queued again",
        DlqAction::Purge => "forgotten",
    };
    let mut out = format!(
        "job {}: {} chunk(s) {verb}\n",
        d.job_id,
        d.dead_letters.len()
    );
    if !d.dead_letters.is_empty() {
        out.push_str(&format!("{:<8} {:<10} {}\n", "CHUNK", "WHEN", "REASON"));
    }
    for x in &d.dead_letters {
        out.push_str(&format!(
            "{:<8} {:<10} {}\n",
            format!("{:06}", x.chunk_id),
            ago(x.at_ms),
            x.reason
        ));
    }
    out
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
            state_name(j.state()),
            format!("{}/{}", j.chunks_done, j.chunks_total),
            j.rows_done,
            j.table,
            j.dest
        ));
    }
    out
}

/// A job's status as JSON (what `--json` prints): states by name, times in Unix ms.
pub fn status_json(s: &JobStatus) -> serde_json::Value {
    serde_json::json!({
        "job_id": s.job_id,
        "state": state_name(s.state()),
        "reason": s.reason,
        "table": s.table,
        "source": s.source,
        "dest": s.dest,
        "chunks": {
            "total": s.chunks_total,
            "done": s.chunks_done,
            "running": s.chunks_running,
            "waiting": s.chunks_waiting,
            "failed": s.chunks_failed,
        },
        "waiting_reason": (s.chunks_waiting > 0).then_some(&s.waiting_reason),
        "next_retry_at_ms": (s.chunks_waiting > 0).then_some(s.next_retry_at_ms),
        "stalled": (!s.stalled.is_empty()).then_some(&s.stalled),
        "rows_done": s.rows_done,
        "bytes_done": s.bytes_done,
        // the names `haul run --json` uses, so that scripts read either the same way
        "rows": s.rows_done,
        "bytes": s.bytes_done,
        "estimated_rows": s.estimated_rows,
        "snapshot": s.snapshot,
        "submitted_at_ms": s.submitted_at_ms,
        "finished_at_ms": (s.finished_at_ms > 0).then_some(s.finished_at_ms),
        "wall_ms": wall_ms(s),
        "manifest": s.manifest,
        "load_target": s.load_target,
        "loaders": s.loaders.iter().map(|l| haul_shared::rpc::flight_display(l)).collect::<Vec<_>>(),
    })
}

/// A worker as JSON (what `haul workers --json` prints).
pub fn worker_json(w: &WorkerInfo) -> serde_json::Value {
    serde_json::json!({
        "worker_id": w.worker_id,
        "host": w.host,
        "pid": w.pid,
        "slots": w.slots,
        "in_flight": w.in_flight,
        "chunks_done": w.chunks_done,
        "rows_done": w.rows_done,
        "last_heartbeat_ms": w.last_heartbeat_ms,
        "state": w.state,
    })
}

/// A job's dead letters as JSON (what `haul dlq --json` prints).
pub fn dead_letters_json(d: &DeadLetters) -> serde_json::Value {
    serde_json::json!({
        "job_id": d.job_id,
        "dead_letters": d.dead_letters.iter().map(|x| serde_json::json!({
            "chunk_id": x.chunk_id,
            "reason": x.reason,
            "at_ms": x.at_ms,
        })).collect::<Vec<_>>(),
    })
}

/// How long an ended job ran, from its submission to its end.
fn wall_ms(s: &JobStatus) -> Option<i64> {
    (s.finished_at_ms > 0 && s.submitted_at_ms > 0)
        .then(|| (s.finished_at_ms - s.submitted_at_ms).max(0))
}

/// `haul status` as `key: value` lines.
pub fn status_text(s: &JobStatus) -> String {
    let mut out = format!(
        "job:       {}\nstate:     {}\ntable:     {}\nsource:    {}\ndest:      {}\nchunks:    {}/{} done, {} running, {} waiting to retry, {} failed\nrows:      {} (~{} estimated)\nbytes:     {} ({} bytes)\n",
        s.job_id,
        state_name(s.state()),
        s.table,
        s.source,
        s.dest,
        s.chunks_done,
        s.chunks_total,
        s.chunks_running,
        s.chunks_waiting,
        s.chunks_failed,
        HumanCount(s.rows_done),
        HumanCount(s.estimated_rows),
        HumanBytes(s.bytes_done),
        HumanCount(s.bytes_done)
    );
    if s.chunks_waiting > 0 && s.next_retry_at_ms > 0 {
        out.push_str(&format!(
            "waiting:   {} (next try {})\n",
            crate::progress::first_line(&s.waiting_reason),
            crate::progress::in_secs(s.next_retry_at_ms)
        ));
    }
    if !s.stalled.is_empty() {
        out.push_str(&format!("stalled:   {}\n", s.stalled));
    }
    if !s.snapshot.is_empty() {
        // an open snapshot holds back vacuum on the source: say for how long
        let held = if !state_is_terminal(s.state()) {
            format!(
                " (held open for {})",
                ago(s.submitted_at_ms).trim_end_matches(" ago")
            )
        } else {
            String::new()
        };
        out.push_str(&format!("snapshot:  {}{held}\n", s.snapshot));
    }
    if let Some(ms) = wall_ms(s) {
        // the rates of the whole job, planning and commit included
        let secs = (ms as f64 / 1000.0).max(0.001);
        out.push_str(&format!(
            "wall:      {secs:.1} s ({} rows/s, {}/s)\n",
            HumanCount((s.rows_done as f64 / secs) as u64),
            HumanBytes((s.bytes_done as f64 / secs) as u64)
        ));
    }
    if !s.load_target.is_empty() {
        out.push_str(&format!(
            "load:      {} rows committed into {} (loaders {})\n",
            s.rows_done,
            s.load_target,
            s.loaders
                .iter()
                .map(|l| haul_shared::rpc::flight_display(l))
                .collect::<Vec<_>>()
                .join(", ")
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
            // a gone worker runs nothing: its last heartbeat's count is history
            if w.state == "gone" {
                "-".to_owned()
            } else {
                w.in_flight.to_string()
            },
            w.chunks_done,
            w.rows_done,
            ago(w.last_heartbeat_ms),
            w.state
        ));
    }
    out
}
