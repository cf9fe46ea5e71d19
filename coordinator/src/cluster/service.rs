//! The coordinator's gRPC services (`Jobs`, `Admin`, `Membership`): thin, each call one
//! operation of the [`Coordinator`], its errors turned into statuses by
//! `haul_shared::error::to_status`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use haul_shared::WorkerId;
use haul_shared::jobs::{JobSpec, JobState, JobStore};
use haul_shared::pg::Credentials;
use haul_shared::proto::wire::{
    DeadLetters, DrainRequest, Empty, HeartbeatReply, HeartbeatRequest, JobRef, JobStatus,
    ListJobsReply, ListJobsRequest, ListWorkersReply, ListWorkersRequest, SubmitRequest,
    WorkerInfo, WorkerRef, admin_server::Admin, jobs_server::Jobs, membership_server::Membership,
};
use haul_shared::proto::{
    dead_letters_to_wire, drain_order_to_wire, state_is_terminal, submission_from_wire,
    worker_from_heartbeat, worker_to_wire,
};
use haul_shared::workers::DrainOrder;
use tonic::{Request, Response, Status};
use tracing::info;

use haul_shared::redis_store::RedisStore;

use super::{Coordinator, FORGET_GONE_MS, now_ms, store_status};
use crate::prepare::PrepareOptions;

/// How often `Watch` looks for a change to stream (progress; a job's end is streamed
/// as soon as this coordinator records it).
const WATCH_TICK: Duration = Duration::from_millis(250);
/// How long `Watch` waits out a job store that fails or no longer knows the job.
const WATCH_PATIENCE: Duration = Duration::from_secs(120);

fn parse_job_id(s: &str) -> Result<haul_shared::JobId, Status> {
    haul_shared::JobId::parse(s).map_err(Status::invalid_argument)
}

/// A submitted job's spec and preparation options, checked.
pub(super) fn spec_from_request(
    r: SubmitRequest,
    parallelism: usize,
    source_credentials: &Credentials,
) -> Result<(JobSpec, PrepareOptions), Status> {
    let s = submission_from_wire(r).map_err(Status::invalid_argument)?;
    let popts = PrepareOptions {
        job_id: s.job_id,
        resume: s.resume,
        fresh_snapshot: s.fresh_snapshot,
        overwrite: s.overwrite,
        parallelism,
        source_credentials: source_credentials.clone(),
    };
    Ok((s.spec, popts))
}

/// The gRPC face of the coordinator. It serves from start-up: until this process is the
/// active coordinator, job and admin calls are answered `Unavailable` naming the active
/// one (clients given several addresses move on to it), while worker heartbeats, which
/// only touch the shared store, are served by either.
#[derive(Clone)]
pub struct Api {
    pub active: Arc<std::sync::OnceLock<Arc<Coordinator>>>,
    pub store: RedisStore,
    /// This coordinator's own address, as it advertises it.
    pub advertise: String,
}

impl Api {
    /// The active coordinator this process is, or the standby's answer.
    async fn c(&self) -> Result<&Arc<Coordinator>, Status> {
        match self.active.get() {
            Some(c) => Ok(c),
            None => Err(Status::unavailable(
                match super::leader::active_address(&self.store).await {
                    Some(url) if url == self.advertise => {
                        "this coordinator is starting (connecting to the broker); retry in a moment"
                            .to_owned()
                    }
                    Some(url) => format!(
                        "{STANDING_BY}; the active coordinator is {url} (give clients and workers every coordinator's address, comma-separated)"
                    ),
                    None => format!(
                        "{STANDING_BY}; no coordinator is active at the moment (a standby takes over within 15 s)"
                    ),
                },
            )),
        }
    }
}

/// How a standby's answers begin.
pub const STANDING_BY: &str = "this coordinator is standing by";

type StatusStream = Pin<Box<dyn Stream<Item = Result<JobStatus, Status>> + Send>>;

#[tonic::async_trait]
impl Jobs for Api {
    async fn submit(&self, req: Request<SubmitRequest>) -> Result<Response<JobStatus>, Status> {
        self.c()
            .await?
            .submit(req.into_inner())
            .await
            .map(Response::new)
    }

    async fn get(&self, req: Request<JobRef>) -> Result<Response<JobStatus>, Status> {
        let id = parse_job_id(&req.into_inner().job_id)?;
        self.c().await?.status(&id).await.map(Response::new)
    }

    async fn list(&self, _: Request<ListJobsRequest>) -> Result<Response<ListJobsReply>, Status> {
        let mut jobs = Vec::new();
        for id in self
            .c()
            .await?
            .store
            .list_jobs()
            .await
            .map_err(store_status)?
        {
            match self.c().await?.status(&id).await {
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
        let first = self.c().await?.status(&id).await?;
        let c = Arc::clone(self.c().await?);
        // one event now, then one whenever something changed, until the job ends; the job
        // store unreachable, or the job missing from it (Redis lost its data: the job's
        // driver restores it), is waited out for a while
        let stream = futures::stream::unfold(
            (c, id, Some(first), None::<JobStatus>),
            |(c, id, mut next, last)| async move {
                let mut failing_since: Option<tokio::time::Instant> = None;
                loop {
                    // the last event sent was terminal: the stream ends
                    if last.as_ref().is_some_and(|l| state_is_terminal(l.state())) {
                        return None;
                    }
                    if let Some(s) = next.take()
                        && last.as_ref() != Some(&s)
                    {
                        return Some((Ok(s.clone()), (c, id, None, Some(s))));
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(WATCH_TICK) => {}
                        _ = c.driver.changed.notified() => {}
                    }
                    match c.status(&id).await {
                        Ok(s) => {
                            failing_since = None;
                            next = Some(s);
                        }
                        Err(e)
                            if matches!(
                                e.code(),
                                tonic::Code::NotFound | tonic::Code::Unavailable
                            ) && failing_since
                                .get_or_insert_with(tokio::time::Instant::now)
                                .elapsed()
                                < WATCH_PATIENCE => {}
                        Err(e) => return Some((Err(e), (c, id, None, last))),
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel(&self, req: Request<JobRef>) -> Result<Response<JobStatus>, Status> {
        let id = parse_job_id(&req.into_inner().job_id)?;
        self.c()
            .await?
            .set_state(&id, &["planning", "running", "paused"], JobState::Cancelled)
            .await
            .map(Response::new)
    }

    async fn pause(&self, req: Request<JobRef>) -> Result<Response<JobStatus>, Status> {
        let id = parse_job_id(&req.into_inner().job_id)?;
        self.c()
            .await?
            .set_state(&id, &["running"], JobState::Paused)
            .await
            .map(Response::new)
    }

    async fn resume(&self, req: Request<JobRef>) -> Result<Response<JobStatus>, Status> {
        let id = parse_job_id(&req.into_inner().job_id)?;
        self.c()
            .await?
            .set_state(&id, &["paused"], JobState::Running)
            .await
            .map(Response::new)
    }
}

impl Api {
    async fn worker(&self, id: &str) -> Result<WorkerInfo, Status> {
        self.c()
            .await?
            .store
            .workers()
            .await
            .map_err(store_status)?
            .iter()
            .find(|(r, _)| r.id.0 == id)
            .map(|(r, o)| worker_to_wire(r, *o, now_ms()))
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
        for (r, o) in self
            .c()
            .await?
            .store
            .workers()
            .await
            .map_err(store_status)?
        {
            // a worker silent for an hour is forgotten (it was killed without draining)
            if now_ms() - r.last_heartbeat_ms > FORGET_GONE_MS {
                let _ = self.c().await?.store.deregister(&r.id).await;
                continue;
            }
            workers.push(worker_to_wire(&r, o, now_ms()));
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
            .c()
            .await?
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

    async fn list_dead_letters(
        &self,
        req: Request<JobRef>,
    ) -> Result<Response<DeadLetters>, Status> {
        let id = parse_job_id(&req.into_inner().job_id)?;
        let dead = self.c().await?.dead_letters(&id).await?;
        Ok(Response::new(dead_letters_to_wire(&id, &dead)))
    }

    async fn requeue_dead_letters(
        &self,
        req: Request<JobRef>,
    ) -> Result<Response<DeadLetters>, Status> {
        let id = parse_job_id(&req.into_inner().job_id)?;
        let dead = self.c().await?.requeue_dead_letters(&id).await?;
        Ok(Response::new(dead_letters_to_wire(&id, &dead)))
    }

    async fn purge_dead_letters(
        &self,
        req: Request<JobRef>,
    ) -> Result<Response<DeadLetters>, Status> {
        let id = parse_job_id(&req.into_inner().job_id)?;
        let dead = self.c().await?.purge_dead_letters(&id).await?;
        Ok(Response::new(dead_letters_to_wire(&id, &dead)))
    }

    async fn undrain_worker(
        &self,
        req: Request<WorkerRef>,
    ) -> Result<Response<WorkerInfo>, Status> {
        let id = req.into_inner().worker_id;
        self.c()
            .await?
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
        let rec =
            worker_from_heartbeat(req.into_inner(), now_ms()).map_err(Status::invalid_argument)?;
        let order = self.store.heartbeat(&rec).await.map_err(store_status)?;
        Ok(Response::new(drain_order_to_wire(order)))
    }

    async fn deregister(&self, req: Request<WorkerRef>) -> Result<Response<Empty>, Status> {
        let id = WorkerId(req.into_inner().worker_id);
        self.store.deregister(&id).await.map_err(store_status)?;
        info!(worker_id = %id, "worker left");
        Ok(Response::new(Empty {}))
    }
}
