//! `haul coordinator`: the cluster's coordinator. It plans submitted jobs inside a
//! snapshot it holds open, records them in Redis, queues their chunks on RabbitMQ with
//! publisher confirms, and follows each job to its end with the job driver
//! ([`crate::driver`]), the same one embedded mode uses. Restarted, it picks its jobs up
//! again from Redis and the object store.
//!
//! - this module: the coordinator's state and its job operations (submit, status,
//!   pause/resume/cancel);
//! - [`leader`]: one active coordinator per Redis prefix;
//! - [`recovery`]: taking over the jobs a previous coordinator left;
//! - [`service`]: the gRPC services (`Jobs`, `Admin`, `Membership`), thin;
//! - [`server`]: bootstrap (TLS, token, health, reflection, Flight, metrics);
//! - [`metrics`]: what `/metrics` shows.

mod leader;
mod metrics;
mod recovery;
pub mod server;
pub mod service;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use haul_shared::JobId;
use haul_shared::error::to_status;
use haul_shared::jobs::{ChunkState, DeadLetter, JobRecord, JobState, JobStore};
use haul_shared::lake::Dest;
use haul_shared::lease::StoreError;
use haul_shared::load::LoadAuth;
use haul_shared::pg::{self, Secret};
use haul_shared::proto::job_status_to_wire;
use haul_shared::proto::wire::{JobStatus, SubmitRequest};
use haul_shared::queue::QueueError;
use haul_shared::rabbit_queue::RabbitQueue;
use haul_shared::redis_store::RedisStore;
use haul_shared::workers::{HEARTBEAT_GONE_MS, worker_state};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{info, warn};

pub use server::serve;

use crate::driver::Driver;
use crate::error::RunError;
use crate::prepare::{Preparation, prepare, prepare_load, queue_chunks};

#[derive(Clone, Debug)]
pub struct CoordinatorOptions {
    pub listen: SocketAddr,
    /// The address clients reach this coordinator at (what standbys tell callers).
    pub advertise: String,
    pub amqp: Secret,
    pub redis: Secret,
    /// TLS files for an `amqps://` broker and a `rediss://` store.
    pub amqp_tls: haul_shared::links::LinkTls,
    pub redis_tls: haul_shared::links::LinkTls,
    pub queue: String,
    pub redis_prefix: String,
    /// Attempts per chunk (the queue's delivery limit); workers must use the same.
    pub max_attempts: u32,
    pub token: Option<Secret>,
    /// PEM certificate and key: serve TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Chunks extracted at once across the cluster (workers × slots), for planning.
    pub parallelism: usize,
    /// CA certificate (PEM) to trust for `https://` loaders when preparing a job's load.
    pub loader_tls_ca: Option<PathBuf>,
    /// Serve Prometheus metrics on this address.
    pub metrics_listen: Option<SocketAddr>,
    /// How the coordinator logs in to jobs' sources to plan them and hold their snapshots.
    pub source_credentials: pg::Credentials,
}

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("redis: {0}")]
    Store(#[from] StoreError),
    #[error("chunk queue: {0}")]
    Queue(#[from] QueueError),
    #[error("cannot read the TLS file {path}: {reason}")]
    TlsFile { path: String, reason: String },
    #[error("gRPC server: {0}")]
    Serve(String),
    #[error("stopped while standing by for the active coordinator")]
    StoppedStandingBy,
    #[error("lost the coordinator lease to another coordinator (was this process frozen?)")]
    LeaseLost,
}

/// The coordinator's shared state.
pub struct Coordinator {
    store: RedisStore,
    queue: Arc<RabbitQueue>,
    opts: CoordinatorOptions,
    shutdown: CancellationToken,
    /// Follows each job; its `changed` wakes `Watch` streams when a job ends or changes
    /// state, so they report it at once rather than at their next look.
    driver: Driver,
    /// Fires if this process lost the coordinator lease (it then stops with an error).
    lease_lost: CancellationToken,
    /// When each running job's snapshot was opened: a snapshot held open holds back
    /// vacuum on the source, so its age is a metric operators alert on.
    snapshots: std::sync::Mutex<std::collections::HashMap<JobId, std::time::SystemTime>>,
}

/// `haul workers` forgets a worker after an hour without a heartbeat.
const FORGET_GONE_MS: i64 = 3_600_000;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn store_status(e: StoreError) -> Status {
    to_status(&RunError::Store(e))
}

impl Coordinator {
    /// Waits to be the active coordinator on `store`, connects to RabbitMQ and takes over
    /// the unfinished jobs recorded there.
    pub async fn start(
        store: RedisStore,
        opts: CoordinatorOptions,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, CoordinatorError> {
        let lease_lost = leader::lead(&store, &shutdown, &opts.advertise).await?;
        let queue = Arc::new(
            RabbitQueue::connect_with_tls(
                opts.amqp.expose(),
                &opts.queue,
                opts.max_attempts,
                &opts.amqp_tls,
            )
            .await?,
        );
        let driver = Driver {
            jobs: Arc::new(store.clone()),
            queue: Arc::clone(&queue) as _,
            leases: Arc::new(store.clone()),
            max_attempts: opts.max_attempts,
            dead_letters: format!("{}.dlq", opts.queue),
            changed: Arc::default(),
            finish_command: |id, _| format!("haul submit --resume {id} --fresh-snapshot"),
        };
        tokio::spawn(crate::dead_letters::watch(
            Arc::clone(&queue) as _,
            Arc::new(store.clone()),
            shutdown.child_token(),
        ));
        let c = Arc::new(Self {
            store,
            queue,
            opts,
            shutdown,
            driver,
            lease_lost,
            snapshots: Default::default(),
        });
        let left = c.left_unfinished().await?;
        tokio::spawn(Arc::clone(&c).recover(left));
        tokio::spawn(Arc::clone(&c).reap_gone_workers());
        Ok(c)
    }

    /// Releases the chunk leases of workers whose heartbeats stopped, as soon as they
    /// count as gone, so that their chunks' redeliveries start at once instead of waiting
    /// out the lease TTL; the chunks go back to pending. (A worker that is only cut off
    /// loses its lease and cannot commit: fencing.)
    async fn reap_gone_workers(self: Arc<Self>) {
        let mut reaped: std::collections::HashSet<haul_shared::WorkerId> = Default::default();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_millis(
                    haul_shared::workers::HEARTBEAT_INTERVAL_MS as u64,
                )) => {}
            }
            if let Err(e) = self.reap_once(&mut reaped).await {
                warn!(error = %e, "checking for gone workers failed; retrying");
            }
        }
    }

    async fn reap_once(
        &self,
        reaped: &mut std::collections::HashSet<haul_shared::WorkerId>,
    ) -> Result<(), StoreError> {
        use haul_shared::lease::LeaseStore;
        let now = now_ms();
        let mut gone = Vec::new();
        for (w, order) in self.store.workers().await? {
            if haul_shared::workers::worker_state(&w, order, now) != "gone" {
                reaped.remove(&w.id);
            } else if !reaped.contains(&w.id) {
                gone.push(w);
            }
        }
        if gone.is_empty() {
            return Ok(());
        }
        for job in self.store.list_jobs().await? {
            if !matches!(
                self.store.job_state(&job).await?,
                Some(JobState::Running | JobState::Paused)
            ) {
                continue;
            }
            for (chunk, st) in self.store.chunk_states(&job).await? {
                let ChunkState::Running { worker, .. } = st else {
                    continue;
                };
                let Some(w) = gone.iter().find(|w| w.id == worker) else {
                    continue;
                };
                if self.store.evict(&format!("{job}/{chunk}"), &worker).await? {
                    warn!(
                        job_id = %job,
                        chunk_id = %chunk,
                        worker_id = %worker,
                        silent_ms = now - w.last_heartbeat_ms,
                        "worker stopped heartbeating; released its lease so the chunk's next attempt starts at once"
                    );
                    self.store
                        .set_chunk_state(&job, chunk, &ChunkState::Pending)
                        .await?;
                }
            }
        }
        reaped.extend(gone.into_iter().map(|w| w.id));
        Ok(())
    }

    fn spawn_driver(self: &Arc<Self>, rec: JobRecord, dest: Dest, holder: Option<pg::Session>) {
        let stop = self.shutdown.child_token();
        let driver = self.driver.clone();
        let id = rec.id.clone();
        if holder.is_some() {
            self.snapshots_held()
                .insert(id.clone(), std::time::SystemTime::now());
        }
        let me = Arc::clone(self);
        // the driver records the job's end in Redis, where status and Watch read it
        tokio::spawn(async move {
            driver.drive(rec, dest, holder, stop).await;
            me.snapshots_held().remove(&id);
        });
    }

    /// The snapshots this coordinator holds open, by job.
    fn snapshots_held(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<JobId, std::time::SystemTime>> {
        self.snapshots.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn submit(self: &Arc<Self>, req: SubmitRequest) -> Result<JobStatus, Status> {
        let (mut spec, popts) =
            service::spec_from_request(req, self.opts.parallelism, &self.opts.source_credentials)?;
        let existing = match &popts.job_id {
            Some(id) => self.store.get_job(id).await.map_err(store_status)?,
            None => None,
        };
        if let Some(existing) = &existing {
            let id = &existing.id;
            if !existing.state.is_terminal() {
                return Err(Status::already_exists(format!(
                    "job {id} is {}; watch it with `haul watch {id}`",
                    existing.state.name()
                )));
            }
            if popts.resume {
                // what the resume left out is the job's own
                if spec.dest.is_empty() {
                    spec.dest = existing.spec.dest.clone();
                }
                if spec.source.is_empty() {
                    spec.source = existing.spec.source.clone();
                }
            } else if existing.spec.dest != spec.dest {
                // one id, one job: never report one job as another
                return Err(Status::already_exists(format!(
                    "job id {id} is taken: it is the export of {} into {} ({}); pick another --job-id",
                    existing.spec.table,
                    existing.spec.dest,
                    existing.state.name()
                )));
            }
        }
        if spec.dest.is_empty() {
            return Err(Status::not_found(format!(
                "this coordinator has no record of job {}: pass --dest (and --source) as when it was submitted",
                popts
                    .job_id
                    .as_ref()
                    .map(|j| j.to_string())
                    .unwrap_or_default()
            )));
        }
        let mut p = match prepare(&spec, &popts).await.map_err(|e| to_status(&e))? {
            Preparation::AlreadyDone(m) => {
                // recorded again (Redis may have been flushed), as succeeded
                if self
                    .store
                    .get_job(&m.job)
                    .await
                    .map_err(store_status)?
                    .is_none()
                {
                    let rec = JobRecord {
                        id: m.job.clone(),
                        spec,
                        plan: None,
                        state: JobState::Succeeded,
                        submitted_at: m.started_at.clone(),
                    };
                    self.store.put_job(&rec).await.map_err(store_status)?;
                }
                return self.status(&m.job).await;
            }
            Preparation::Ready(p) => *p,
        };
        prepare_load(
            &mut p,
            &LoadAuth {
                token: self.opts.token.clone(),
                tls_ca: self.opts.loader_tls_ca.clone(),
            },
        )
        .await
        .map_err(|e| to_status(&e))?;
        let rec = JobRecord {
            id: p.job.clone(),
            spec: p.spec.clone(),
            plan: Some(p.plan.clone()),
            state: JobState::Planning,
            submitted_at: p.started_at.clone(),
        };
        // what an earlier run under this id left in the store is not this plan's: its
        // chunks' states come from the destination (`p.committed`), recorded next
        self.store.replan_job(&rec).await.map_err(store_status)?;
        if let Err(e) = queue_chunks(&rec, &p.committed, &self.store, self.queue.as_ref()).await {
            // the job ends here, and says how to finish it; the error keeps its class
            let reason = format!(
                "queueing its chunks failed: {e}; finish it with `haul submit --resume {} --fresh-snapshot`",
                rec.id
            );
            self.fail(&rec.id, reason).await;
            return Err(to_status(&e));
        }
        self.store
            .set_job_state(&rec.id, &JobState::Running)
            .await
            .map_err(store_status)?;
        info!(
            job_id = %rec.id,
            table = %rec.spec.table,
            chunks = p.plan.chunks.len(),
            estimated_rows = p.plan.estimated_rows,
            source = %rec.spec.source,
            "job submitted"
        );
        let holder = p.plan.snapshot.is_some().then_some(p.holder);
        self.spawn_driver(rec.clone(), p.dest, holder);
        self.status(&rec.id).await
    }

    /// Records a job as failed, with the reason users read in `haul status`.
    async fn fail(&self, id: &JobId, reason: String) {
        warn!(job_id = %id, %reason, "job failed");
        if let Err(e) = self
            .store
            .set_job_state(id, &JobState::Failed { reason })
            .await
        {
            warn!(job_id = %id, error = %e, "could not record the job's end");
        }
    }

    /// The job's record, or NOT_FOUND.
    async fn job(&self, id: &JobId) -> Result<JobRecord, Status> {
        self.store
            .get_job(id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("no job {id}; `haul jobs` lists them")))
    }

    async fn status(&self, id: &JobId) -> Result<JobStatus, Status> {
        let rec = self.job(id).await?;
        let chunks = self.store.chunk_states(id).await.map_err(store_status)?;
        let mut s = job_status_to_wire(&rec, &chunks);
        if rec.state == JobState::Running
            && s.chunks_running == 0
            && s.chunks_done + s.chunks_failed < s.chunks_total
        {
            s.stalled = self.why_stalled().await.unwrap_or_default();
        }
        s.finished_at_ms = self
            .store
            .finished_at_ms(id)
            .await
            .map_err(store_status)?
            .unwrap_or(0);
        Ok(s)
    }

    /// Why no worker takes a running job's chunks, when the registry says: none alive,
    /// every one draining, or every slot busy. `None` when some worker could (or the
    /// registry cannot be read).
    async fn why_stalled(&self) -> Option<String> {
        let workers = self.store.workers().await.ok()?;
        let now = now_ms();
        let alive: Vec<_> = workers
            .iter()
            .filter(|(w, o)| worker_state(w, *o, now) != "gone")
            .collect();
        if alive.is_empty() {
            return Some(format!(
                "no worker is running: none has sent a heartbeat in the last {} s (start one with `haul worker --coordinator <this coordinator>`)",
                HEARTBEAT_GONE_MS / 1000
            ));
        }
        if alive
            .iter()
            .all(|(w, o)| worker_state(w, *o, now) == "draining")
        {
            return Some(format!(
                "every worker ({}) is draining; start another, or `haul undrain` one",
                alive.len()
            ));
        }
        if alive.iter().all(|(w, _)| w.in_flight >= w.slots) {
            return Some(format!(
                "every slot of the {} worker(s) is busy with other chunks; they queue behind them",
                alive.len()
            ));
        }
        None
    }

    /// The job's dead-lettered chunk tasks.
    async fn dead_letters(&self, id: &JobId) -> Result<Vec<DeadLetter>, Status> {
        self.job(id).await?;
        self.store.dead_letters(id).await.map_err(store_status)
    }

    /// Queues a paused or running job's dead-lettered chunks again (their failed state
    /// back to pending, a fresh task each, with a fresh delivery count and retry budget)
    /// and forgets them.
    async fn requeue_dead_letters(&self, id: &JobId) -> Result<Vec<DeadLetter>, Status> {
        let rec = self.job(id).await?;
        if !matches!(rec.state, JobState::Running | JobState::Paused) {
            return Err(Status::failed_precondition(format!(
                "job {id} is {}: its dead-lettered chunks are redone by `haul submit --resume {id} --fresh-snapshot` (`haul dlq purge {id}` forgets them)",
                rec.state.name()
            )));
        }
        let ranges = rec.plan.map(|p| p.chunks).unwrap_or_default();
        let dead = self.store.dead_letters(id).await.map_err(store_status)?;
        for d in &dead {
            // as the driver queues a chunk again: pending first, then a fresh task
            self.driver
                .requeue(id, &rec.submitted_at, d.chunk, &ranges, Default::default())
                .await
                .map_err(|e| to_status(&e))?;
            self.store
                .remove_dead_letters(id, &[d.chunk])
                .await
                .map_err(store_status)?;
            info!(job_id = %id, chunk_id = %d.chunk, "dead-lettered chunk queued again by request");
        }
        Ok(dead)
    }

    /// Forgets the job's dead letters.
    async fn purge_dead_letters(&self, id: &JobId) -> Result<Vec<DeadLetter>, Status> {
        let dead = self.dead_letters(id).await?;
        let chunks: Vec<_> = dead.iter().map(|d| d.chunk).collect();
        self.store
            .remove_dead_letters(id, &chunks)
            .await
            .map_err(store_status)?;
        Ok(dead)
    }

    async fn set_state(
        &self,
        id: &JobId,
        allowed: &[&str],
        to: JobState,
    ) -> Result<JobStatus, Status> {
        let now = self.status(id).await?;
        let now = haul_shared::proto::state_name(now.state());
        if !allowed.contains(&now) {
            return Err(Status::failed_precondition(format!(
                "job {id} is {now}; it can be {} only when {}",
                to.name(),
                allowed.join(" or ")
            )));
        }
        self.store
            .set_job_state(id, &to)
            .await
            .map_err(store_status)?;
        info!(job_id = %id, state = to.name(), "job state changed by request");
        self.driver.changed.notify_waiters();
        self.status(id).await
    }
}
