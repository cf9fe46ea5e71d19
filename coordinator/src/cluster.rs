//! `haul coordinator`: the cluster's gRPC server. It plans submitted jobs inside a
//! snapshot it holds open, records them in Redis, queues their chunks on RabbitMQ with
//! publisher confirms, follows the chunk states the workers record, and commits each job
//! (job manifest last). Restarted, it picks its jobs up again from Redis and the object
//! store.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use haul_shared::error::Classify;
use haul_shared::jobs::{
    ChunkState, JobRecord, JobSpec, JobState, JobStore, LoadSpec, OutputOptions, Split,
};
use haul_shared::pg::{self, Secret, SourceError};
use haul_shared::proto::Task;
use haul_shared::proto::wire::{
    DrainRequest, Empty, HeartbeatReply, HeartbeatRequest, JobRef, JobStatus, ListJobsReply,
    ListJobsRequest, ListWorkersReply, ListWorkersRequest, SubmitRequest, WorkerInfo, WorkerRef,
    admin_server::{Admin, AdminServer},
    jobs_server::{Jobs, JobsServer},
    membership_server::{Membership, MembershipServer},
};
use haul_shared::queue::{ChunkQueue, QueueError};
use haul_shared::rabbit_queue::RabbitQueue;
use haul_shared::redis_store::RedisStore;
use haul_shared::rpc::RequireToken;
use haul_shared::workers::{DrainOrder, WorkerRecord, worker_state};
use haul_shared::{ChunkId, ErrorClass, JobId, WorkerId};
use haul_worker::executor::table_dir;
use haul_worker::layout::Dest;
use haul_worker::load_client::LoadAuth;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::run::{
    Preparation, PrepareOptions, RunError, commit_job, prepare, prepare_load, queue_chunks,
};

#[derive(Clone, Debug)]
pub struct CoordinatorOptions {
    pub listen: SocketAddr,
    pub amqp: Secret,
    pub redis: Secret,
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
}

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("redis: {0}")]
    Store(#[from] haul_shared::lease::StoreError),
    #[error("chunk queue: {0}")]
    Queue(#[from] QueueError),
    #[error("cannot read the TLS file {path}: {reason}")]
    TlsFile { path: String, reason: String },
    #[error("gRPC server: {0}")]
    Serve(String),
}

/// The coordinator's shared state.
pub struct Coordinator {
    store: RedisStore,
    queue: Arc<RabbitQueue>,
    opts: CoordinatorOptions,
    shutdown: CancellationToken,
    /// Woken when this coordinator ends a job or changes its state, so that `Watch`
    /// streams report it at once rather than at their next look.
    changed: tokio::sync::Notify,
}

/// How often a job's driver looks at its chunk states ...
const DRIVER_TICK: Duration = Duration::from_millis(50);
/// ... and every how many looks it checks the destination and the leases (5 s).
const RECONCILE_EVERY: u64 = 100;
/// How often `Watch` looks for a change to stream (progress; a job's end is streamed
/// as soon as this coordinator records it).
const WATCH_TICK: Duration = Duration::from_millis(250);

/// `haul workers` forgets a worker after an hour without a heartbeat.
const FORGET_GONE_MS: i64 = 3_600_000;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn status_of(e: &RunError) -> Status {
    let msg = e.to_string();
    match e {
        RunError::AlreadyStarted { .. } | RunError::DestinationTaken { .. } => {
            Status::already_exists(msg)
        }
        RunError::NoSuchJob { .. } => Status::not_found(msg),
        RunError::Internal(_) => Status::internal(msg),
        other => match other_class(other) {
            ErrorClass::Transient => Status::unavailable(msg),
            ErrorClass::Internal => Status::internal(msg),
            ErrorClass::User => Status::failed_precondition(msg),
        },
    }
}

fn other_class(e: &RunError) -> ErrorClass {
    match e {
        RunError::Source(s) => s.class(),
        RunError::Dest(d) => d.class(),
        RunError::Load(l) => l.class(),
        RunError::Loader(l) => l.class(),
        _ => ErrorClass::User,
    }
}

fn store_status(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("job store: {e}"))
}

/// The lease that makes one coordinator per Redis prefix the active one.
const LEADER_KEY: &str = "coordinator";
const LEADER_TTL: Duration = Duration::from_secs(10);
/// Set when this process lost the coordinator lease: it then exits with an error.
static LEASE_LOST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Waits until this process is the only active coordinator (a second one, e.g. during a
/// rolling deploy, stands by until the first is gone), then keeps the lease renewed. If
/// it is ever lost (this process was frozen past its TTL), `shutdown` fires: two
/// coordinators must never drive the same jobs.
async fn lead(store: &RedisStore, shutdown: &CancellationToken) -> Result<(), CoordinatorError> {
    use haul_shared::lease::LeaseStore;
    let me = WorkerId(format!(
        "coordinator@{}-{}",
        haul_worker::node::hostname(),
        std::process::id()
    ));
    let mut waiting_logged = false;
    let lease = loop {
        if let Some(l) = store.acquire(LEADER_KEY, &me, LEADER_TTL).await? {
            break l;
        }
        if !waiting_logged {
            let other = store
                .holder(LEADER_KEY)
                .await?
                .map(|h| h.0)
                .unwrap_or_default();
            info!(active = %other, "another coordinator is active on this Redis prefix; standing by");
            waiting_logged = true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Err(CoordinatorError::Serve("stopped while standing by".into())),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    };
    info!(epoch = %lease.epoch, "this coordinator is the active one");
    let (store, shutdown) = (store.clone(), shutdown.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = store.release(&lease).await;
                    return;
                }
                _ = tokio::time::sleep(LEADER_TTL / 4) => {}
            }
            match store.renew(&lease, LEADER_TTL).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::error!("lost the coordinator lease to another coordinator; stopping");
                    LEASE_LOST.store(true, std::sync::atomic::Ordering::SeqCst);
                    shutdown.cancel();
                    return;
                }
                Err(e) => warn!(error = %e, "renewing the coordinator lease failed; retrying"),
            }
        }
    });
    Ok(())
}

impl Coordinator {
    /// Connects to Redis and RabbitMQ and takes over the unfinished jobs recorded there.
    pub async fn start(
        opts: CoordinatorOptions,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, CoordinatorError> {
        let store = RedisStore::connect(opts.redis.expose(), &opts.redis_prefix).await?;
        lead(&store, &shutdown).await?;
        let queue =
            RabbitQueue::connect(opts.amqp.expose(), &opts.queue, opts.max_attempts).await?;
        let c = Arc::new(Self {
            store,
            queue: Arc::new(queue),
            opts,
            shutdown,
            changed: tokio::sync::Notify::new(),
        });
        c.recover().await?;
        Ok(c)
    }

    /// Picks up the jobs an earlier coordinator left unfinished. A job whose snapshot
    /// died with that coordinator is failed with the way to finish it; a job reading
    /// without a snapshot carries on.
    async fn recover(self: &Arc<Self>) -> Result<(), CoordinatorError> {
        for id in self.store.list_jobs().await? {
            let Some(rec) = self.store.get_job(&id).await? else {
                continue;
            };
            if rec.state.is_terminal() {
                continue;
            }
            let Some(plan) = rec.plan.clone() else {
                let reason =
                    "the coordinator restarted while planning the job; submit it again".to_owned();
                self.store
                    .set_job_state(&id, &JobState::Failed { reason })
                    .await?;
                continue;
            };
            // the destination is opened, and its chunk manifests listed, once
            let dest = Dest::open(&rec.spec.dest, rec.spec.output.fsync);
            let manifests = match &dest {
                Ok(d) => Some(d.chunk_manifests(&id).await),
                Err(_) => None,
            };
            let committed_chunks = manifests
                .as_ref()
                .and_then(|m| m.as_ref().ok())
                .map_or(0, Vec::len);
            if let Some(snapshot) = &plan.snapshot
                && committed_chunks < plan.chunks.len()
            {
                let reason = format!(
                    "the coordinator holding snapshot {snapshot} restarted, so the remaining chunks cannot read from it; finish the job with `haul submit --resume {id} --fresh-snapshot` (committed chunks are kept)"
                );
                warn!(job_id = %id, "{reason}");
                self.store
                    .set_job_state(&id, &JobState::Failed { reason })
                    .await?;
                continue;
            }
            let dest = match dest {
                Ok(d) => d,
                Err(e) => {
                    let reason = format!("cannot open the destination again: {e}");
                    self.store
                        .set_job_state(&id, &JobState::Failed { reason })
                        .await?;
                    continue;
                }
            };
            if rec.state == JobState::Planning {
                // its chunks may not all have been queued: queue what is not committed
                let committed = manifests
                    .expect("listed once the destination opened")
                    .map_err(|e| CoordinatorError::Serve(e.to_string()))?
                    .into_iter()
                    .map(|m| (m.chunk, m))
                    .collect();
                queue_chunks(&rec, &committed, &self.store, self.queue.as_ref())
                    .await
                    .map_err(|e| CoordinatorError::Serve(e.to_string()))?;
                self.store.set_job_state(&id, &JobState::Running).await?;
            }
            info!(job_id = %id, "carrying on with a job after a coordinator restart");
            self.spawn_driver(rec, dest, None);
        }
        Ok(())
    }

    fn spawn_driver(self: &Arc<Self>, rec: JobRecord, dest: Dest, holder: Option<pg::Session>) {
        let stop = self.shutdown.child_token();
        let me = Arc::clone(self);
        tokio::spawn(async move { me.drive(rec, dest, holder, stop).await });
    }

    /// Follows one job to its end: requeues parked chunks while it runs, fails it when a
    /// chunk fails or its snapshot is lost, commits it when every chunk is committed.
    async fn drive(
        &self,
        rec: JobRecord,
        dest: Dest,
        holder: Option<pg::Session>,
        stop: CancellationToken,
    ) {
        let id = rec.id.clone();
        let Some(plan) = rec.plan.clone() else {
            return;
        };
        let mut closed = holder.as_ref().map(|h| h.closed.clone());
        let snapshot = plan.snapshot.clone().filter(|_| holder.is_some());
        let mut ticks: u64 = 0;
        let mut commit_failures = 0;
        // last attempts whose lease was found gone at the previous check
        let mut orphaned: std::collections::BTreeSet<ChunkId> = Default::default();
        let end: Option<JobState> = loop {
            ticks += 1;
            tokio::select! {
                // a cheap poll (two small Redis reads), so a job commits right after
                // its last chunk
                _ = tokio::time::sleep(DRIVER_TICK) => {}
                // shutting down: the job stays recorded; the next coordinator decides
                _ = stop.cancelled() => break None,
                _ = async { closed.as_mut().expect("a holder").changed().await }, if snapshot.is_some() => {
                    let e = SourceError::SnapshotLost { snapshot: snapshot.clone().unwrap_or_default() };
                    break Some(JobState::Failed { reason: e.to_string() });
                }
            }
            let now = match self.store.job_state(&id).await {
                Ok(Some(s)) => s,
                Ok(None) => break None,
                Err(e) => {
                    warn!(job_id = %id, error = %e, "job store unavailable; retrying");
                    continue;
                }
            };
            match now {
                JobState::Running => {}
                JobState::Paused | JobState::Planning => continue,
                _ => break None,
            }
            let mut states = match self.store.chunk_states(&id).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(job_id = %id, error = %e, "job store unavailable; retrying");
                    continue;
                }
            };
            if ticks.is_multiple_of(RECONCILE_EVERY) {
                // the object store is the truth about what is committed: a chunk state
                // lost or overwritten in Redis is restored from the chunk manifests
                self.reconcile(&id, &dest, &mut states).await;
                self.fail_dead_last_attempts(&id, &mut states, &mut orphaned)
                    .await;
            }
            // a failed chunk fails the job once the other chunks have ended, so that a
            // resume has only the failed ones left to do
            let settled = states.len() == plan.chunks.len()
                && states
                    .values()
                    .all(|s| matches!(s, ChunkState::Committed { .. } | ChunkState::Failed { .. }));
            if settled
                && let Some((chunk, ChunkState::Failed { reason })) = states
                    .iter()
                    .find(|(_, s)| matches!(s, ChunkState::Failed { .. }))
            {
                break Some(JobState::Failed {
                    reason: format!("chunk {chunk} failed: {reason}"),
                });
            }
            for (chunk, _) in states.iter().filter(|(_, s)| **s == ChunkState::Parked) {
                if let Err(e) = self.requeue(&id, *chunk, &plan.chunks).await {
                    warn!(job_id = %id, chunk_id = %chunk, error = %e, "requeueing a parked chunk failed; retrying");
                }
            }
            let done = states
                .values()
                .filter(|s| matches!(s, ChunkState::Committed { .. }))
                .count();
            if done == plan.chunks.len() {
                let tdir = table_dir(&plan.table.name);
                match commit_job(
                    &dest,
                    &id,
                    &rec.spec,
                    &plan,
                    &tdir,
                    rec.submitted_at.clone(),
                )
                .await
                {
                    Ok(m) => {
                        info!(job_id = %id, rows = m.rows, files = m.files.len(), "job committed");
                        break Some(JobState::Succeeded);
                    }
                    Err(e) if other_class(&e).is_retryable() && commit_failures < 10 => {
                        commit_failures += 1;
                        warn!(job_id = %id, error = %e, "committing the job failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => {
                        break Some(JobState::Failed {
                            reason: format!("committing the job: {e}"),
                        });
                    }
                }
            }
        };
        if let Some(state) = end {
            if let JobState::Failed { reason } = &state {
                warn!(job_id = %id, %reason, "job failed");
            }
            if let Err(e) = self.store.set_job_state(&id, &state).await {
                warn!(job_id = %id, error = %e, "could not record the job's end");
            }
            self.changed.notify_waiters();
        }
        let final_state = self
            .store
            .get_job(&id)
            .await
            .ok()
            .flatten()
            .map(|j| j.state);
        if matches!(
            final_state,
            Some(JobState::Failed { .. } | JobState::Cancelled)
        ) && let Err(e) = dest.delete_prefix(&format!("_haul/staging/{id}")).await
        {
            warn!(job_id = %id, error = %e, "could not clean the staging area");
        }
        if let Some(h) = holder {
            let _ = h.client.batch_execute("COMMIT").await;
        }
    }

    /// Prometheus text: jobs by state, progress of unfinished jobs, workers by state,
    /// and the chunk queue's depth (what an autoscaler scales workers on).
    async fn metrics(&self) -> String {
        let mut t = haul_shared::metrics::Text::default();
        let mut by_state: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut open = Vec::new();
        for id in self.store.list_jobs().await.unwrap_or_default() {
            if let Ok(Some(j)) = self.store.get_job(&id).await {
                *by_state.entry(j.state.name()).or_default() += 1;
                if !j.state.is_terminal() {
                    let chunks = self.store.chunk_states(&id).await.unwrap_or_default();
                    open.push(job_status(&j, &chunks));
                }
            }
        }
        t.family("haul_jobs", "gauge", "Jobs recorded, by state.");
        for (state, n) in &by_state {
            t.sample("haul_jobs", &[("state", state)], *n as f64);
        }
        t.family(
            "haul_job_chunks",
            "gauge",
            "Chunks of unfinished jobs, by state.",
        );
        for j in &open {
            let pending = j.chunks_total - j.chunks_done - j.chunks_running - j.chunks_failed;
            for (state, n) in [
                ("committed", j.chunks_done),
                ("running", j.chunks_running),
                ("failed", j.chunks_failed),
                ("pending", pending),
            ] {
                t.sample(
                    "haul_job_chunks",
                    &[("job", &j.job_id), ("state", state)],
                    f64::from(n),
                );
            }
        }
        t.family(
            "haul_job_rows_done",
            "gauge",
            "Rows in committed chunks of unfinished jobs.",
        );
        for j in &open {
            t.sample(
                "haul_job_rows_done",
                &[("job", &j.job_id)],
                j.rows_done as f64,
            );
        }
        let mut workers: BTreeMap<&'static str, u64> = BTreeMap::new();
        for (w, o) in self.store.workers().await.unwrap_or_default() {
            *workers.entry(worker_state(&w, o, now_ms())).or_default() += 1;
        }
        t.family("haul_workers", "gauge", "Registered workers, by state.");
        for (state, n) in &workers {
            t.sample("haul_workers", &[("state", state)], *n as f64);
        }
        if let Ok(ready) = self.queue.ready_count().await {
            t.family(
                "haul_queue_ready_messages",
                "gauge",
                "Chunk tasks waiting in the queue.",
            )
            .sample(
                "haul_queue_ready_messages",
                &[("queue", &self.opts.queue)],
                ready as f64,
            );
        }
        t.finish()
    }

    /// A worker that dies during a chunk's last allowed attempt leaves nobody to record
    /// the failure: the broker dead-letters the task. A chunk still `Running` its last
    /// attempt with no lease at two checks in a row is failed here, so the job ends
    /// instead of waiting for it forever.
    async fn fail_dead_last_attempts(
        &self,
        id: &JobId,
        states: &mut BTreeMap<ChunkId, ChunkState>,
        orphaned: &mut std::collections::BTreeSet<ChunkId>,
    ) {
        let mut seen = std::collections::BTreeSet::new();
        for (chunk, st) in states.iter_mut() {
            let ChunkState::Running { worker, attempt } = st else {
                continue;
            };
            if *attempt < self.opts.max_attempts {
                continue;
            }
            match haul_shared::lease::LeaseStore::holder(&self.store, &format!("{id}/{chunk}"))
                .await
            {
                Ok(None) => {}
                _ => continue,
            }
            if !orphaned.contains(chunk) {
                seen.insert(*chunk);
                continue;
            }
            let reason = format!(
                "worker {worker} stopped during the last attempt ({attempt} of {}) and the task went to the dead-letter queue {}.dlq",
                self.opts.max_attempts, self.opts.queue
            );
            warn!(job_id = %id, chunk_id = %chunk, %reason, "chunk failed");
            let failed = ChunkState::Failed { reason };
            if self
                .store
                .set_chunk_state(id, *chunk, &failed)
                .await
                .is_ok()
            {
                *st = failed;
            }
        }
        *orphaned = seen;
    }

    async fn reconcile(&self, id: &JobId, dest: &Dest, states: &mut BTreeMap<ChunkId, ChunkState>) {
        let manifests = match dest.chunk_manifests(id).await {
            Ok(m) => m,
            Err(e) => {
                warn!(job_id = %id, error = %e, "cannot list the committed chunks; retrying");
                return;
            }
        };
        for m in manifests {
            if matches!(states.get(&m.chunk), Some(ChunkState::Committed { .. })) {
                continue;
            }
            warn!(job_id = %id, chunk_id = %m.chunk, "chunk is committed in the destination but not in the job store; recording it");
            let st = ChunkState::Committed {
                rows: m.rows,
                bytes: m.bytes,
            };
            if self.store.set_chunk_state(id, m.chunk, &st).await.is_ok() {
                states.insert(m.chunk, st);
            }
        }
    }

    async fn requeue(
        &self,
        id: &JobId,
        chunk: ChunkId,
        ranges: &[haul_shared::ChunkRange],
    ) -> Result<(), Status> {
        let range = ranges
            .get(chunk.0 as usize)
            .ok_or_else(|| Status::internal(format!("chunk {chunk} is not in the plan")))?;
        self.store
            .set_chunk_state(id, chunk, &ChunkState::Pending)
            .await
            .map_err(store_status)?;
        let task = Task {
            job_id: id.clone(),
            chunk_id: chunk,
            range: range.clone(),
        };
        self.queue
            .publish(task.encode())
            .await
            .map_err(|e| Status::unavailable(e.to_string()))
    }

    async fn submit(self: &Arc<Self>, req: SubmitRequest) -> Result<JobStatus, Status> {
        let (spec, popts) = spec_from_request(req, self.opts.parallelism)?;
        if let Some(id) = &popts.job_id
            && let Some(existing) = self.store.get_job(id).await.map_err(store_status)?
            && !existing.state.is_terminal()
        {
            return Err(Status::already_exists(format!(
                "job {id} is {}; watch it with `haul watch {id}`",
                existing.state.name()
            )));
        }
        let mut p = match prepare(&spec, &popts).await.map_err(|e| status_of(&e))? {
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
        .map_err(|e| status_of(&e))?;
        let rec = JobRecord {
            id: p.job.clone(),
            spec: p.spec.clone(),
            plan: Some(p.plan.clone()),
            state: JobState::Planning,
            submitted_at: p.started_at.clone(),
        };
        self.store.put_job(&rec).await.map_err(store_status)?;
        queue_chunks(&rec, &p.committed, &self.store, self.queue.as_ref())
            .await
            .map_err(|e| status_of(&e))?;
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

    async fn status(&self, id: &JobId) -> Result<JobStatus, Status> {
        let rec = self
            .store
            .get_job(id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("no job {id}; `haul jobs` lists them")))?;
        let chunks = self.store.chunk_states(id).await.map_err(store_status)?;
        Ok(job_status(&rec, &chunks))
    }

    async fn set_state(
        &self,
        id: &JobId,
        allowed: &[&str],
        to: JobState,
    ) -> Result<JobStatus, Status> {
        let now = self.status(id).await?;
        if !allowed.contains(&now.state.as_str()) {
            return Err(Status::failed_precondition(format!(
                "job {id} is {}; it can be {} only when {}",
                now.state,
                to.name(),
                allowed.join(" or ")
            )));
        }
        self.store
            .set_job_state(id, &to)
            .await
            .map_err(store_status)?;
        info!(job_id = %id, state = to.name(), "job state changed by request");
        self.changed.notify_waiters();
        self.status(id).await
    }
}

fn parse_job_id(s: &str) -> Result<JobId, Status> {
    JobId::parse(s).map_err(Status::invalid_argument)
}

/// The API's view of a job: counts, not the chunk list, and never the source password.
pub fn job_status(rec: &JobRecord, chunks: &BTreeMap<ChunkId, ChunkState>) -> JobStatus {
    let mut s = JobStatus {
        job_id: rec.id.to_string(),
        state: rec.state.name().into(),
        reason: match &rec.state {
            JobState::Failed { reason } => reason.clone(),
            _ => String::new(),
        },
        table: rec.spec.table.clone(),
        dest: rec.spec.dest.clone(),
        source: rec.spec.source.to_string(),
        chunks_total: rec
            .plan
            .as_ref()
            .map(|p| p.chunks.len() as u32)
            .unwrap_or(0),
        estimated_rows: rec.plan.as_ref().map(|p| p.estimated_rows).unwrap_or(0),
        snapshot: rec
            .plan
            .as_ref()
            .and_then(|p| p.snapshot.clone())
            .unwrap_or_default(),
        submitted_at_ms: chrono::DateTime::parse_from_rfc3339(&rec.submitted_at)
            .map(|t| t.timestamp_millis())
            .unwrap_or(0),
        ..JobStatus::default()
    };
    for c in chunks.values() {
        match c {
            ChunkState::Committed { rows, bytes } => {
                s.chunks_done += 1;
                s.rows_done += rows;
                s.bytes_done += bytes;
            }
            ChunkState::Running { .. } => s.chunks_running += 1,
            ChunkState::Failed { .. } => s.chunks_failed += 1,
            ChunkState::Pending | ChunkState::Parked => {}
        }
    }
    if let Some(l) = &rec.spec.load {
        s.load_target = l.target_table.clone();
        s.loaders = l.endpoints.clone();
    }
    if rec.state == JobState::Succeeded
        && rec.spec.output.parquet
        && let Some(p) = &rec.plan
    {
        s.manifest = format!(
            "{}/{}/_manifest.json",
            rec.spec.dest.trim_end_matches('/'),
            table_dir(&p.table.name)
        );
    }
    s
}

fn spec_from_request(
    r: SubmitRequest,
    parallelism: usize,
) -> Result<(JobSpec, PrepareOptions), Status> {
    let bad = |m: String| Status::invalid_argument(m);
    let source = Secret::new(r.source);
    pg::parse_dsn(&source).map_err(|e| bad(e.to_string()))?;
    if r.table.is_empty() && !r.resume {
        return Err(bad("a table is required (--table schema.table)".into()));
    }
    if r.dest.is_empty() {
        return Err(bad("a destination is required (--dest)".into()));
    }
    let output: OutputOptions = if r.output_json.is_empty() {
        OutputOptions::default()
    } else {
        serde_json::from_str(&r.output_json)
            .map_err(|e| bad(format!("invalid output options: {e}")))?
    };
    let split = match r.split.as_str() {
        "" | "key" => Split::Key,
        "ctid" => Split::Ctid,
        s => return Err(bad(format!("invalid split {s:?}: use key or ctid"))),
    };
    let job_id = if r.job_id.is_empty() {
        None
    } else {
        Some(parse_job_id(&r.job_id)?)
    };
    if r.resume && job_id.is_none() {
        return Err(bad("resume needs the job id".into()));
    }
    let load = if r.load.is_empty() {
        if !r.target_table.is_empty() || r.create_table || r.truncate_first || !output.parquet {
            return Err(bad(
                "target_table, create_table, truncate_first and no Parquet need loaders (--load)"
                    .into(),
            ));
        }
        None
    } else {
        let endpoints = r
            .load
            .iter()
            .map(|e| haul_worker::load_client::flight_url(e).map_err(|m| bad(format!("load: {m}"))))
            .collect::<Result<Vec<_>, _>>()?;
        Some(LoadSpec {
            endpoints,
            target_table: r.target_table,
            create_table: r.create_table,
            truncate_first: r.truncate_first,
        })
    };
    let spec = JobSpec {
        source,
        table: r.table,
        columns: r.columns,
        key: r.key,
        split,
        casts: r.casts.into_iter().collect(),
        dest: r.dest,
        chunk_rows: if r.chunk_rows == 0 {
            1_000_000
        } else {
            r.chunk_rows
        },
        output,
        use_snapshot: !r.no_snapshot,
        load,
        incremental: (!r.incremental_column.is_empty()).then(|| haul_shared::jobs::Incremental {
            column: r.incremental_column,
            lag_secs: r.lag_secs,
        }),
    };
    let popts = PrepareOptions {
        job_id,
        resume: r.resume,
        fresh_snapshot: r.fresh_snapshot,
        overwrite: r.overwrite,
        parallelism,
    };
    Ok((spec, popts))
}

/// The gRPC face of the coordinator.
#[derive(Clone)]
pub struct Api(pub Arc<Coordinator>);

type StatusStream = Pin<Box<dyn Stream<Item = Result<JobStatus, Status>> + Send>>;

#[tonic::async_trait]
impl Jobs for Api {
    async fn submit(&self, req: Request<SubmitRequest>) -> Result<Response<JobStatus>, Status> {
        self.0.submit(req.into_inner()).await.map(Response::new)
    }

    async fn get(&self, req: Request<JobRef>) -> Result<Response<JobStatus>, Status> {
        let id = parse_job_id(&req.into_inner().job_id)?;
        self.0.status(&id).await.map(Response::new)
    }

    async fn list(&self, _: Request<ListJobsRequest>) -> Result<Response<ListJobsReply>, Status> {
        let mut jobs = Vec::new();
        for id in self.0.store.list_jobs().await.map_err(store_status)? {
            match self.0.status(&id).await {
                Ok(s) => jobs.push(s),
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) => return Err(s),
            }
        }
        jobs.sort_by_key(|j| j.submitted_at_ms);
        Ok(Response::new(ListJobsReply { jobs }))
    }

    type WatchStream = StatusStream;

    async fn watch(&self, req: Request<JobRef>) -> Result<Response<StatusStream>, Status> {
        let id = parse_job_id(&req.into_inner().job_id)?;
        let first = self.0.status(&id).await?;
        let c = Arc::clone(&self.0);
        // one event now, then one whenever something changed, until the job ends
        let stream = futures::stream::unfold(
            (c, id, Some(first), None::<JobStatus>),
            |(c, id, mut next, last)| async move {
                loop {
                    // the last event sent was terminal: the stream ends
                    if last.as_ref().is_some_and(|l| is_terminal(&l.state)) {
                        return None;
                    }
                    if let Some(s) = next.take()
                        && last.as_ref() != Some(&s)
                    {
                        return Some((Ok(s.clone()), (c, id, None, Some(s))));
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(WATCH_TICK) => {}
                        _ = c.changed.notified() => {}
                    }
                    match c.status(&id).await {
                        Ok(s) => next = Some(s),
                        Err(e) => return Some((Err(e), (c, id, None, last))),
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel(&self, req: Request<JobRef>) -> Result<Response<JobStatus>, Status> {
        let id = parse_job_id(&req.into_inner().job_id)?;
        self.0
            .set_state(&id, &["planning", "running", "paused"], JobState::Cancelled)
            .await
            .map(Response::new)
    }

    async fn pause(&self, req: Request<JobRef>) -> Result<Response<JobStatus>, Status> {
        let id = parse_job_id(&req.into_inner().job_id)?;
        self.0
            .set_state(&id, &["running"], JobState::Paused)
            .await
            .map(Response::new)
    }

    async fn resume(&self, req: Request<JobRef>) -> Result<Response<JobStatus>, Status> {
        let id = parse_job_id(&req.into_inner().job_id)?;
        self.0
            .set_state(&id, &["paused"], JobState::Running)
            .await
            .map(Response::new)
    }
}

fn is_terminal(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "cancelled")
}

fn worker_info(rec: &WorkerRecord, order: Option<DrainOrder>) -> WorkerInfo {
    WorkerInfo {
        worker_id: rec.id.to_string(),
        host: rec.host.clone(),
        slots: rec.slots,
        in_flight: rec.in_flight,
        last_heartbeat_ms: rec.last_heartbeat_ms,
        state: worker_state(rec, order, now_ms()).into(),
        chunks_done: rec.chunks_done,
        rows_done: rec.rows_done,
        pid: rec.pid,
    }
}

impl Api {
    async fn worker(&self, id: &str) -> Result<WorkerInfo, Status> {
        self.0
            .store
            .workers()
            .await
            .map_err(store_status)?
            .iter()
            .find(|(r, _)| r.id.0 == id)
            .map(|(r, o)| worker_info(r, *o))
            .ok_or_else(|| Status::not_found(format!("no worker {id}; `haul workers` lists them")))
    }
}

#[tonic::async_trait]
impl Admin for Api {
    async fn list_workers(
        &self,
        _: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersReply>, Status> {
        let mut workers = Vec::new();
        for (r, o) in self.0.store.workers().await.map_err(store_status)? {
            // a worker silent for an hour is forgotten (it was killed without draining)
            if now_ms() - r.last_heartbeat_ms > FORGET_GONE_MS {
                let _ = self.0.store.deregister(&r.id).await;
                continue;
            }
            workers.push(worker_info(&r, o));
        }
        Ok(Response::new(ListWorkersReply { workers }))
    }

    async fn drain_worker(
        &self,
        req: Request<DrainRequest>,
    ) -> Result<Response<WorkerInfo>, Status> {
        let r = req.into_inner();
        let order = if r.requeue_in_flight {
            DrainOrder::RequeueInFlight
        } else {
            DrainOrder::Finish
        };
        let id = WorkerId(r.worker_id.clone());
        if !self
            .0
            .store
            .request_drain(&id, order)
            .await
            .map_err(store_status)?
        {
            return Err(Status::not_found(format!(
                "no worker {id}; `haul workers` lists them"
            )));
        }
        info!(worker_id = %id, ?order, "drain requested");
        self.worker(&r.worker_id).await.map(Response::new)
    }

    async fn undrain_worker(
        &self,
        req: Request<WorkerRef>,
    ) -> Result<Response<WorkerInfo>, Status> {
        let id = req.into_inner().worker_id;
        self.0
            .store
            .undrain(&WorkerId(id.clone()))
            .await
            .map_err(store_status)?;
        self.worker(&id).await.map(Response::new)
    }
}

#[tonic::async_trait]
impl Membership for Api {
    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let r = req.into_inner();
        if r.worker_id.is_empty() {
            return Err(Status::invalid_argument("a heartbeat needs the worker id"));
        }
        let rec = WorkerRecord {
            id: WorkerId(r.worker_id),
            host: r.host,
            pid: r.pid,
            slots: r.slots,
            in_flight: r.in_flight,
            last_heartbeat_ms: now_ms(),
            draining: r.draining,
            chunks_done: r.chunks_done,
            rows_done: r.rows_done,
        };
        let order = self.0.store.heartbeat(&rec).await.map_err(store_status)?;
        Ok(Response::new(HeartbeatReply {
            drain: order.is_some(),
            requeue_in_flight: order == Some(DrainOrder::RequeueInFlight),
        }))
    }

    async fn deregister(&self, req: Request<WorkerRef>) -> Result<Response<Empty>, Status> {
        let id = WorkerId(req.into_inner().worker_id);
        self.0.store.deregister(&id).await.map_err(store_status)?;
        info!(worker_id = %id, "worker left");
        Ok(Response::new(Empty {}))
    }
}

/// Serves the coordinator until `shutdown` fires.
pub async fn serve(
    opts: CoordinatorOptions,
    shutdown: CancellationToken,
) -> Result<(), CoordinatorError> {
    let coordinator = match Coordinator::start(opts.clone(), shutdown.clone()).await {
        Ok(c) => c,
        // stopped while standing by for the active coordinator: nothing to clean up
        Err(_) if shutdown.is_cancelled() => return Ok(()),
        Err(e) => return Err(e),
    };
    if let Some(addr) = opts.metrics_listen {
        let c = Arc::clone(&coordinator);
        let render: haul_shared::metrics::Render = Arc::new(move || {
            let c = Arc::clone(&c);
            Box::pin(async move { c.metrics().await })
        });
        haul_shared::metrics::spawn(addr, render, shutdown.clone())
            .await
            .map_err(|e| CoordinatorError::Serve(format!("cannot serve metrics on {addr}: {e}")))?;
    }
    let flight = crate::flight::JobsFlight {
        jobs: Arc::new(coordinator.store.clone()),
    };
    let api = Api(coordinator);
    let auth = RequireToken::new(opts.token.as_ref());

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<JobsServer<Api>>().await;
    health.set_serving::<AdminServer<Api>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(haul_shared::proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| CoordinatorError::Serve(e.to_string()))?;

    let mut builder = Server::builder();
    if let Some((cert, key)) = &opts.tls {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| CoordinatorError::TlsFile {
                path: p.display().to_string(),
                reason: e.to_string(),
            })
        };
        let identity = Identity::from_pem(read(cert)?, read(key)?);
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(identity))
            .map_err(|e| CoordinatorError::Serve(e.to_string()))?;
    }
    info!(
        listen = %opts.listen,
        tls = opts.tls.is_some(),
        token = opts.token.is_some(),
        queue = %opts.queue,
        "coordinator serving"
    );
    builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(JobsServer::with_interceptor(api.clone(), auth.clone()))
        .add_service(AdminServer::with_interceptor(api.clone(), auth.clone()))
        .add_service(MembershipServer::with_interceptor(api, auth.clone()))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            arrow_flight::flight_service_server::FlightServiceServer::new(flight),
            auth,
        ))
        .serve_with_shutdown(opts.listen, shutdown.cancelled_owned())
        .await
        .map_err(|e| CoordinatorError::Serve(haul_shared::rpc::error_chain(&e)))?;
    if LEASE_LOST.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(CoordinatorError::Serve(
            "lost the coordinator lease to another coordinator (was this process frozen?)".into(),
        ));
    }
    Ok(())
}
