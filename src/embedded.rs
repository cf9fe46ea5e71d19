//! `haul run`: one job, whole, in this process. It is the cluster's own machinery over
//! in-process implementations of the same traits: the job is prepared as the coordinator
//! prepares it, its chunks go on the in-process queue, N worker tasks run the same worker
//! loop as `haul worker`, and the same job driver (`haul_coordinator::driver`) follows it
//! to its end, with the same failure semantics. With `--load-target`, a loader is served
//! in-process on a loopback port.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use haul_coordinator::RunError;
use haul_coordinator::driver::{Driver, Ending};
use haul_coordinator::prepare::{
    Preparation, PrepareOptions, Prepared, prepare, prepare_load, queue_chunks,
};
use haul_shared::jobs::{ChunkState, JobRecord, JobSpec, JobState, JobStore, MemoryJobStore};
use haul_shared::lake::Dest;
use haul_shared::lease::MemoryLeaseStore;
use haul_shared::load::{LoadAuth, Loader, LoaderOptions, serve};
use haul_shared::pg;
use haul_shared::queue::MemoryQueue;
use haul_shared::{JobId, WorkerId};
use haul_worker::executor::Progress;
use haul_worker::worker::{Control, Services, WorkerConfig, run_worker};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::progress::{ProgressMode, Reporter, Snapshot};

/// How often the progress display is brought up to date.
const REPORT_EVERY: Duration = Duration::from_millis(200);

/// Options of one `haul run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub spec: JobSpec,
    pub job_id: Option<JobId>,
    pub resume: bool,
    pub fresh_snapshot: bool,
    pub overwrite: bool,
    pub workers: usize,
    pub max_attempts: u32,
    pub lease_ttl: Duration,
    pub progress: ProgressMode,
    /// How this process logs in to the source (a password given in `--source` stays here).
    pub source_credentials: pg::Credentials,
    /// Load into this Postgres through an in-process loader (`--load-target`).
    pub load_target: Option<pg::Database>,
    /// Schema of the in-process loader's ledger tables.
    pub ledger_schema: String,
}

impl RunOptions {
    /// How the job is prepared (or planned only, for `haul plan`).
    pub fn prepare_options(&self) -> PrepareOptions {
        PrepareOptions {
            job_id: self.job_id.clone(),
            resume: self.resume,
            fresh_snapshot: self.fresh_snapshot,
            overwrite: self.overwrite,
            parallelism: self.workers,
            source_credentials: self.source_credentials.clone(),
        }
    }
}

/// The end-of-run summary.
#[derive(Clone, Debug)]
pub struct JobSummary {
    pub job: JobId,
    pub rows: u64,
    pub bytes: u64,
    pub files: usize,
    pub chunks: usize,
    /// Rows this run extracted (not those of chunks an earlier run committed): the rate's.
    pub rows_here: u64,
    pub wall: Duration,
    /// The job had already succeeded; nothing was done.
    pub already_done: bool,
    pub manifest: String,
    /// The table the rows were loaded into, with `--load`/`--load-target`.
    pub loaded_into: Option<String>,
}

impl JobSummary {
    /// The summary as JSON (what `haul run --json` prints).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "job_id": self.job.to_string(),
            "state": "succeeded",
            "already_done": self.already_done,
            "rows": self.rows,
            "bytes": self.bytes,
            "files": self.files,
            "chunks": self.chunks,
            "wall_ms": self.wall.as_millis() as u64,
            "manifest": self.manifest,
            "loaded_into": self.loaded_into,
        })
    }
}

impl std::fmt::Display for JobSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use indicatif::{HumanBytes, HumanCount};
        if self.already_done {
            return write!(
                f,
                "job {} had already succeeded: {} rows, {} files ({})",
                self.job,
                HumanCount(self.rows),
                self.files,
                self.manifest
            );
        }
        let secs = self.wall.as_secs_f64().max(1e-6);
        // the rate of what this run extracted (a resume's earlier chunks not counted)
        let rate = HumanCount((self.rows_here as f64 / secs) as u64);
        let resumed = match self.rows - self.rows_here {
            0 => String::new(),
            before => format!(
                " ({} of them committed before this run)",
                HumanCount(before)
            ),
        };
        if let (0, Some(t)) = (self.files, &self.loaded_into) {
            // a load-only job
            return write!(
                f,
                "job {} succeeded: {} rows{resumed} loaded into {t} from {} chunks, {secs:.2}s wall, {rate} rows/s\nmanifest: {}",
                self.job,
                HumanCount(self.rows),
                self.chunks,
                self.manifest
            );
        }
        write!(
            f,
            "job {} succeeded: {} rows{resumed}, {} in {} files from {} chunks, {secs:.2}s wall, {rate} rows/s\nmanifest: {}",
            self.job,
            HumanCount(self.rows),
            HumanBytes(self.bytes),
            self.files,
            self.chunks,
            self.manifest
        )?;
        if let Some(t) = &self.loaded_into {
            write!(f, "\nloaded: {} rows into {t}", HumanCount(self.rows))?;
        }
        Ok(())
    }
}

/// Runs a job to its end in this process: prepared as the cluster prepares it, its
/// chunks queued on the in-process queue, `opts.workers` worker tasks taking them, and the
/// same job driver following it to its end. A chunk that fails for good lets the other
/// chunks settle, then fails the job naming it; `--resume` finishes it.
pub async fn run(
    mut opts: RunOptions,
    interrupt: CancellationToken,
) -> Result<JobSummary, RunError> {
    let started = Instant::now();
    if opts.workers == 0 {
        return Err(RunError::NoWorkers);
    }
    let loader_stop = CancellationToken::new();
    let _stop_loader = loader_stop.clone().drop_guard();
    if let Some(target) = &opts.load_target {
        let url = start_local_loader(target, &opts.ledger_schema, loader_stop).await?;
        if let Some(l) = opts.spec.load.as_mut() {
            l.endpoints = vec![url];
        }
    }
    let prepare_opts = opts.prepare_options();
    let mut p = match prepare(&opts.spec, &prepare_opts).await? {
        Preparation::AlreadyDone(m) => {
            let dest = Dest::open(&opts.spec.dest, false)?;
            return Ok(JobSummary {
                job: m.job.clone(),
                rows: m.rows,
                bytes: m.bytes,
                files: m.files.len(),
                chunks: m.chunks,
                rows_here: 0,
                wall: started.elapsed(),
                already_done: true,
                manifest: format!("{}/_haul/jobs/{}/_manifest.json", dest.url, m.job),
                loaded_into: None,
            });
        }
        Preparation::Ready(p) => *p,
    };
    let no_loader_given = opts.load_target.is_none()
        && opts
            .spec
            .load
            .as_ref()
            .is_none_or(|l| l.endpoints.is_empty());
    if let Some(l) = p.spec.load.as_ref()
        && no_loader_given
    {
        // a resume of a job that loaded through `--load-target`: its loader ran in the
        // process that planned it, and went with it
        return Err(RunError::ResumeChanges {
            job: p.job,
            what: format!(
                "it loads into {}; resume it with --load-target <dsn> (haul run's loader runs in-process)",
                l.target_table
            ),
        });
    }
    prepare_load(&mut p, &LoadAuth::default()).await?;
    let Prepared {
        job,
        spec,
        plan,
        dest,
        holder,
        committed,
        started_at,
        ..
    } = p;

    let queue = Arc::new(MemoryQueue::new(opts.max_attempts));
    let jobs = Arc::new(MemoryJobStore::default());
    let leases = Arc::new(MemoryLeaseStore::default());
    let record = JobRecord {
        id: job.clone(),
        spec: spec.clone(),
        plan: Some(plan.clone()),
        state: JobState::Running,
        submitted_at: started_at,
    };
    jobs.put_job(&record).await?;
    queue_chunks(&record, &committed, jobs.as_ref(), queue.as_ref()).await?;

    let svc = Services {
        queue: Arc::clone(&queue) as _,
        leases: Arc::clone(&leases) as _,
        jobs: Arc::clone(&jobs) as _,
    };
    let progress = Arc::new(Progress::default());
    let ctl = Control::default();
    let workers = TaskTracker::new();
    for i in 0..opts.workers {
        let cfg = WorkerConfig {
            id: WorkerId(format!("local-{i}")),
            slots: 1,
            lease_ttl: opts.lease_ttl,
            max_attempts: opts.max_attempts,
            load_auth: LoadAuth::default(),
            source_credentials: opts.source_credentials.clone(),
        };
        let (svc, progress, ctl) = (svc.clone(), Arc::clone(&progress), ctl.clone());
        workers.spawn(async move {
            if let Err(e) = run_worker(cfg, svc, progress, ctl).await {
                warn!(error = %e, "worker ended with an error");
            }
        });
    }
    workers.close();

    let watching = CancellationToken::new();
    let watcher = tokio::spawn(haul_coordinator::dead_letters::watch(
        Arc::clone(&queue) as _,
        Arc::clone(&jobs) as _,
        watching.clone(),
    ));
    let driver = Driver {
        jobs: Arc::clone(&jobs) as _,
        queue: queue as _,
        leases: leases as _,
        max_attempts: opts.max_attempts,
        dead_letters: "the in-process dead-letter list".into(),
        changed: Arc::default(),
        finish_command: |id, dest| {
            format!(
                "haul run --resume {id} --fresh-snapshot --dest {}",
                haul_coordinator::error::shell_word(dest)
            )
        },
    };
    let reporting = CancellationToken::new();
    let base_rows: u64 = committed.values().map(|m| m.rows).sum();
    let reporter = tokio::spawn(report(
        Reporter::new(opts.progress, job.as_str()),
        (base_rows, committed.values().map(|m| m.bytes).sum()),
        (plan.estimated_rows, plan.chunks.len()),
        Arc::clone(&progress),
        Arc::clone(&jobs),
        job.clone(),
        reporting.clone(),
    ));
    let holder = plan.snapshot.is_some().then_some(holder);
    let ending = driver
        .follow(&record, &dest, holder.as_ref(), interrupt)
        .await;
    // the workers stop (aborting what still runs) before the end is recorded and a
    // failed job's staging area is cleared, so no attempt writes after the cleanup
    ctl.stop();
    workers.wait().await;
    driver.finish(&job, holder, &ending).await;
    if !matches!(ending, Ending::Committed(_)) {
        // failed or interrupted: every attempt ran in this process, and all have stopped;
        // committed chunks' parts stay staged for a resume
        if let Err(e) = dest.clear_uncommitted_staging(&job).await {
            warn!(job_id = %job, error = %e, "could not clean the staging area");
        }
    }
    reporting.cancel();
    let _ = reporter.await;
    watching.cancel();
    let _ = watcher.await;

    let manifest = match ending {
        Ending::Committed(m) => m,
        Ending::Failed(e) => return Err(e),
        Ending::Ended(JobState::Cancelled) => return Err(RunError::Cancelled { job }),
        Ending::Ended(state) => {
            return Err(RunError::Failed {
                job,
                reason: state.name().into(),
            });
        }
        Ending::Stopped => {
            return Err(RunError::Interrupted {
                job,
                dest: haul_coordinator::error::shell_word(&dest.url),
            });
        }
    };
    Ok(JobSummary {
        job: job.clone(),
        rows_here: manifest.rows.saturating_sub(base_rows),
        rows: manifest.rows,
        bytes: manifest.bytes,
        files: manifest.files.len(),
        chunks: manifest.chunks,
        wall: started.elapsed(),
        already_done: false,
        manifest: if spec.output.parquet {
            format!("{}/{}/_manifest.json", dest.url, plan.table_dir())
        } else {
            format!("{}/_haul/jobs/{job}/_manifest.json", dest.url)
        },
        loaded_into: spec.load.as_ref().map(|l| l.target_table.clone()),
    })
}

/// Shows the job's progress until `stop` fires: rows and bytes from the workers'
/// counters (on top of what earlier runs committed, `base`), chunks from the job store.
async fn report(
    mut reporter: Reporter,
    base: (u64, u64),
    (estimated_rows, chunks_total): (u64, usize),
    progress: Arc<Progress>,
    jobs: Arc<MemoryJobStore>,
    job: JobId,
    stop: CancellationToken,
) {
    reporter.set_base(base.0, base.1);
    loop {
        let mut snap = Snapshot {
            rows: base.0 + progress.rows.load(Ordering::Relaxed),
            bytes: base.1 + progress.source_bytes.load(Ordering::Relaxed),
            estimated_rows,
            chunks_total,
            ..Snapshot::default()
        };
        for state in jobs.chunk_states(&job).await.unwrap_or_default().values() {
            match state {
                ChunkState::Committed { .. } => snap.chunks_done += 1,
                ChunkState::Running { .. } => snap.chunks_running += 1,
                ChunkState::Waiting {
                    retry_at_ms,
                    reason,
                    ..
                } => {
                    snap.chunks_waiting += 1;
                    let at = i64::try_from(*retry_at_ms).unwrap_or(i64::MAX);
                    if snap.waiting.as_ref().is_none_or(|(_, t)| at < *t) {
                        snap.waiting = Some((reason.clone(), at));
                    }
                }
                ChunkState::Failed { .. } => snap.chunks_failed += 1,
                ChunkState::Pending | ChunkState::Parked => {}
            }
        }
        reporter.update(&snap);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(REPORT_EVERY) => {}
        }
    }
    reporter.finish();
}

/// Starts an in-process loader on a loopback port (`haul run --load-target`); it serves
/// until `stop` fires. Returns its address.
async fn start_local_loader(
    target: &pg::Database,
    ledger_schema: &str,
    stop: CancellationToken,
) -> Result<String, RunError> {
    // fail here, before any work, if the target cannot take the ledger
    Loader::new(target.clone(), ledger_schema)
        .ensure_ledger()
        .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| RunError::Internal(format!("binding the in-process loader: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| RunError::Internal(e.to_string()))?;
    let opts = LoaderOptions {
        target: target.clone(),
        ledger_schema: ledger_schema.to_owned(),
        token: None,
        tls: None,
        metrics_listen: None,
    };
    tokio::spawn(async move {
        if let Err(e) = serve(listener, opts, stop).await {
            warn!(error = %e, "the in-process loader stopped");
        }
    });
    Ok(format!("http://{addr}"))
}
