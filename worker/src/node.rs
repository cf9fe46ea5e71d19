//! `haul worker`: one worker process of the cluster. It consumes chunk tasks from
//! RabbitMQ, leases chunks in Redis, runs the same chunk executor as `haul run`, and
//! heartbeats to the coordinator, whose answer may tell it to drain.
//!
//! Stopping: the first SIGTERM or SIGINT (or a drain order) drains: no new deliveries,
//! prefetched tasks go back to the queue, chunks in flight finish and are acked, then the
//! worker deregisters and the process exits 0. A second signal, a drain order with
//! `requeue_in_flight`, or the end of the drain grace period aborts the chunks in flight
//! and hands them back.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use haul_shared::WorkerId;
use haul_shared::lease::StoreError;
use haul_shared::metrics;
use haul_shared::pg::Secret;
use haul_shared::proto::wire::membership_client::MembershipClient;
use haul_shared::proto::wire::{HeartbeatRequest, WorkerRef};
use haul_shared::queue::QueueError;
use haul_shared::rabbit_queue::RabbitQueue;
use haul_shared::redis_store::RedisStore;
use haul_shared::rpc::{BearerToken, ClientOptions, RpcError};
use haul_shared::shutdown::StopSignals;
use haul_shared::workers::HEARTBEAT_INTERVAL_MS;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::executor::Progress;
use crate::worker::{Control, Services, WorkerConfig, run_worker};

#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// Unique among live workers; `<host>-<pid>` by default.
    pub id: Option<String>,
    pub coordinator: ClientOptions,
    pub amqp: Secret,
    pub redis: Secret,
    /// TLS files for an `amqps://` broker and a `rediss://` store.
    pub amqp_tls: haul_shared::links::LinkTls,
    pub redis_tls: haul_shared::links::LinkTls,
    pub queue: String,
    pub redis_prefix: String,
    pub slots: usize,
    pub lease_ttl: Duration,
    pub max_attempts: u32,
    /// How long a drain waits for chunks in flight before aborting them.
    pub drain_grace: Option<Duration>,
    /// Serve Prometheus metrics on this address.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How this worker logs in to jobs' sources.
    pub source_credentials: haul_shared::pg::Credentials,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("chunk queue: {0}")]
    Queue(#[from] QueueError),
    #[error("redis: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("cannot install the signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot serve metrics on {addr}: {reason}")]
    Metrics { addr: String, reason: String },
}

/// Runs the worker until it has drained.
pub async fn run_node(opts: NodeOptions) -> Result<(), NodeError> {
    let host = haul_shared::workers::hostname();
    let pid = std::process::id();
    let id = WorkerId(opts.id.clone().unwrap_or_else(|| format!("{host}-{pid}")));
    let mut signals = StopSignals::install().map_err(NodeError::Signals)?;

    let store =
        RedisStore::connect_with_tls(opts.redis.expose(), &opts.redis_prefix, &opts.redis_tls)
            .await?;
    let queue = RabbitQueue::connect_with_tls(
        opts.amqp.expose(),
        &opts.queue,
        opts.max_attempts,
        &opts.amqp_tls,
    )
    .await?;
    let (channel, token) = opts.coordinator.connect_lazy()?;
    let mut membership = MembershipClient::with_interceptor(channel, token);

    let svc = Services {
        queue: Arc::new(queue),
        leases: Arc::new(store.clone()),
        jobs: Arc::new(store),
    };
    let cfg = WorkerConfig {
        id: id.clone(),
        slots: opts.slots.max(1),
        lease_ttl: opts.lease_ttl,
        max_attempts: opts.max_attempts,
        load_auth: haul_shared::load::LoadAuth {
            token: opts.coordinator.token.clone(),
            tls_ca: opts.coordinator.tls_ca.clone(),
        },
        source_credentials: opts.source_credentials.clone(),
    };
    let progress = Arc::new(Progress::default());
    let ctl = Control::default();
    let metrics_stop = tokio_util::sync::CancellationToken::new();
    if let Some(addr) = opts.metrics_listen {
        let (p, c, slots) = (Arc::clone(&progress), ctl.clone(), opts.slots);
        let render: metrics::Render = Arc::new(move || {
            let text = worker_metrics(&p, &c, slots);
            Box::pin(async move { text })
        });
        let (p, c) = (Arc::clone(&progress), ctl.clone());
        let ready: metrics::Ready = Arc::new(move || {
            let state = if c.drain.is_cancelled() {
                Err("draining".to_owned())
            } else if p.consuming.load(Ordering::Relaxed) {
                Ok("consuming".to_owned())
            } else {
                Err("not consuming the chunk queue (connecting to the broker)".to_owned())
            };
            Box::pin(async move { state })
        });
        metrics::spawn(addr, render, ready, metrics_stop.clone())
            .await
            .map_err(|e| NodeError::Metrics {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
    }
    let _stop_metrics = metrics_stop.drop_guard();
    let mut work = tokio::spawn(run_worker(cfg, svc, Arc::clone(&progress), ctl.clone()));
    info!(worker_id = %id, slots = opts.slots, queue = %opts.queue, coordinator = %opts.coordinator.url, "worker started");

    let mut tick = tokio::time::interval(Duration::from_millis(HEARTBEAT_INTERVAL_MS as u64));
    let mut grace_end: Option<tokio::time::Instant> = None;
    let mut coordinator_ok = true;
    let mut coordinator_at = 0;
    let result = loop {
        let grace = async {
            match grace_end {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = &mut work => break r,
            name = signals.next() => stop_signal(&ctl, &opts, &mut grace_end, name),
            _ = grace, if !ctl.abort.is_cancelled() => {
                warn!("drain grace period over; aborting the chunks in flight and handing them back");
                ctl.abort.cancel();
            }
            _ = tick.tick() => {
                let req = HeartbeatRequest {
                    worker_id: id.to_string(),
                    host: host.clone(),
                    slots: opts.slots as u32,
                    in_flight: progress.in_flight.load(Ordering::Relaxed) as u32,
                    draining: ctl.drain.is_cancelled(),
                    chunks_done: progress.chunks_done.load(Ordering::Relaxed),
                    rows_done: progress.rows.load(Ordering::Relaxed),
                    pid,
                };
                let call = tokio::time::timeout(Duration::from_secs(5), membership.heartbeat(req));
                match call.await {
                    Ok(Ok(reply)) => {
                        if !coordinator_ok {
                            info!("coordinator reachable again");
                            coordinator_ok = true;
                        }
                        let reply = reply.into_inner();
                        if reply.drain && !ctl.drain.is_cancelled() {
                            info!(requeue_in_flight = reply.requeue_in_flight, "drain ordered by the coordinator");
                            start_drain(&ctl, &opts, &mut grace_end);
                        }
                        if reply.drain && reply.requeue_in_flight && !ctl.abort.is_cancelled() {
                            info!("aborting the chunks in flight and handing them back");
                            ctl.abort.cancel();
                        }
                    }
                    Ok(Err(status)) => {
                        if coordinator_ok {
                            warn!(error = %status.message(), "heartbeat refused; working on");
                        }
                        coordinator_ok = false;
                        coordinator_at = next_coordinator(&opts.coordinator, &mut membership, coordinator_at);
                    }
                    Err(_) => {
                        if coordinator_ok {
                            warn!("coordinator unreachable; working on and retrying");
                        }
                        coordinator_ok = false;
                        coordinator_at = next_coordinator(&opts.coordinator, &mut membership, coordinator_at);
                    }
                }
            }
        }
    };
    let deregister = membership.deregister(WorkerRef {
        worker_id: id.to_string(),
    });
    if let Ok(Err(e)) | Err(e) = tokio::time::timeout(Duration::from_secs(5), deregister)
        .await
        .map(|r| r.map(|_| ()))
        .map_err(|_| tonic::Status::deadline_exceeded("deregistering"))
    {
        warn!(error = %e.message(), "could not deregister; the coordinator will show this worker as gone");
    }
    match result {
        Ok(r) => r?,
        Err(join) => {
            return Err(NodeError::Queue(QueueError::Protocol(format!(
                "worker loop panicked: {join}"
            ))));
        }
    }
    info!(worker_id = %id, chunks = progress.chunks_done.load(Ordering::Relaxed), "worker drained; exiting");
    Ok(())
}

/// The worker's metrics, read from its live counters at each scrape.
fn worker_metrics(p: &Progress, ctl: &Control, slots: usize) -> String {
    use metrics::{ConstCounter, ConstGauge, Registry};
    let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut r = Registry::default();
    let counters = [
        (
            "haul_worker_chunks_done",
            "Chunks this worker committed (or found committed)",
            &p.chunks_done,
        ),
        (
            "haul_worker_rows_read",
            "Rows read from the source, including chunks in flight",
            &p.rows,
        ),
        (
            "haul_worker_source_bytes",
            "Bytes of binary COPY data read from the source",
            &p.source_bytes,
        ),
        (
            "haul_worker_lease_renewals",
            "Chunk lease renewals that succeeded",
            &p.lease_renewals,
        ),
        (
            "haul_worker_leases_lost",
            "Chunk leases lost while working (the chunk's next attempt may be another worker's)",
            &p.leases_lost,
        ),
        (
            "haul_worker_commit_conflicts",
            "Attempts that came to commit and found the chunk was another attempt's",
            &p.commit_conflicts,
        ),
        (
            "haul_worker_chunk_failures",
            "Chunk attempts that failed (retried with a backoff, or failed for good)",
            &p.chunk_failures,
        ),
    ];
    for (name, help, value) in counters {
        r.register(name, help, ConstCounter::new(n(value)));
    }
    let gauges = [
        (
            "haul_worker_consuming",
            "1 while the worker holds a consumer on the chunk queue",
            i64::from(p.consuming.load(Ordering::Relaxed)),
        ),
        (
            "haul_worker_chunks_in_flight",
            "Chunks being extracted now",
            n(&p.in_flight) as i64,
        ),
        (
            "haul_worker_slots",
            "Chunks this worker extracts at once",
            slots as i64,
        ),
        (
            "haul_worker_draining",
            "1 while the worker drains",
            i64::from(ctl.drain.is_cancelled()),
        ),
    ];
    for (name, help, value) in gauges {
        r.register(name, help, ConstGauge::new(value));
    }
    metrics::encode(&r)
}

fn start_drain(ctl: &Control, opts: &NodeOptions, grace_end: &mut Option<tokio::time::Instant>) {
    ctl.drain.cancel();
    if let Some(g) = opts.drain_grace {
        *grace_end = Some(tokio::time::Instant::now() + g);
    }
}

fn stop_signal(
    ctl: &Control,
    opts: &NodeOptions,
    grace_end: &mut Option<tokio::time::Instant>,
    name: &str,
) {
    if ctl.drain.is_cancelled() {
        warn!(
            signal = name,
            "second stop signal: aborting the chunks in flight and handing them back"
        );
        ctl.abort.cancel();
    } else {
        info!(
            signal = name,
            "draining: finishing the chunks in flight, taking no new ones"
        );
        start_drain(ctl, opts, grace_end);
    }
}

/// After a failed heartbeat, the next of several coordinator addresses (an active
/// coordinator and its standbys all take heartbeats); returns its index.
fn next_coordinator(
    opts: &ClientOptions,
    membership: &mut MembershipClient<InterceptedService<Channel, BearerToken>>,
    at: usize,
) -> usize {
    if opts.urls().len() < 2 {
        return at;
    }
    let next = at + 1;
    if let Ok((channel, token)) = opts.connect_lazy_to(next) {
        *membership = MembershipClient::with_interceptor(channel, token);
    }
    next
}
