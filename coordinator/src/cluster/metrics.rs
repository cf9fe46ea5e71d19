//! What the coordinator's `/metrics` shows: whether it is the active one, jobs by state,
//! progress, dead letters and snapshot age of unfinished jobs, workers by state, and the
//! chunk queue's depth and consumers (what an autoscaler scales workers on); and what its
//! `/readyz` answers.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use haul_shared::jobs::JobStore;
use haul_shared::metrics::{ConstGauge, Family, Gauge, Labels, Registry, encode};
use haul_shared::proto::job_status_to_wire;
use haul_shared::workers::worker_state;

use super::{Coordinator, now_ms};

fn active_gauge(r: &mut Registry, active: bool) {
    r.register(
        "haul_coordinator_active",
        "1 on the active coordinator, 0 on one standing by",
        ConstGauge::new(i64::from(active)),
    );
}

impl Coordinator {
    /// What a coordinator standing by for the active one shows.
    pub(super) fn standby_metrics() -> String {
        let mut r = Registry::default();
        active_gauge(&mut r, false);
        encode(&r)
    }

    /// Ready when it holds the lease and the broker answers (Redis is checked by the
    /// caller, before the coordinator is active too).
    pub(super) async fn ready(&self) -> Result<String, String> {
        if self.lease_lost.is_cancelled() {
            return Err("lost the coordinator lease; stopping".to_owned());
        }
        self.queue
            .depth()
            .await
            .map_err(|e| format!("chunk queue unreachable: {e}"))?;
        Ok("active".to_owned())
    }

    /// The active coordinator's metrics (see the module docs).
    pub(super) async fn metrics(&self) -> String {
        let mut by_state: BTreeMap<&'static str, i64> = BTreeMap::new();
        let mut open = Vec::new();
        for id in self.store.list_jobs().await.unwrap_or_default() {
            if let Ok(Some(j)) = self.store.get_job(&id).await {
                *by_state.entry(j.state.name()).or_default() += 1;
                if !j.state.is_terminal() {
                    let chunks = self.store.chunk_states(&id).await.unwrap_or_default();
                    open.push(job_status_to_wire(&j, &chunks));
                }
            }
        }
        let mut r = Registry::default();
        active_gauge(&mut r, true);
        let jobs = Family::<Labels, Gauge>::default();
        for (state, n) in &by_state {
            jobs.get_or_create(&vec![("state", (*state).to_owned())])
                .set(*n);
        }
        r.register("haul_jobs", "Jobs recorded, by state", jobs);
        let chunks = Family::<Labels, Gauge>::default();
        let rows = Family::<Labels, Gauge>::default();
        let dead_letters = Family::<Labels, Gauge>::default();
        let snapshot_age = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        for j in &open {
            let pending = j.chunks_total - j.chunks_done - j.chunks_running - j.chunks_failed;
            for (state, n) in [
                ("committed", j.chunks_done),
                ("running", j.chunks_running),
                ("failed", j.chunks_failed),
                ("pending", pending),
            ] {
                chunks
                    .get_or_create(&vec![
                        ("job", j.job_id.clone()),
                        ("state", state.to_owned()),
                    ])
                    .set(i64::from(n));
            }
            rows.get_or_create(&vec![("job", j.job_id.clone())])
                .set(j.rows_done as i64);
            if let Ok(id) = haul_shared::JobId::parse(&j.job_id) {
                let dead = self.store.dead_letters(&id).await.unwrap_or_default();
                dead_letters
                    .get_or_create(&vec![("job", j.job_id.clone())])
                    .set(dead.len() as i64);
            }
        }
        let now = std::time::SystemTime::now();
        for (job, opened) in self.snapshots_held().iter() {
            let age = now.duration_since(*opened).unwrap_or_default();
            snapshot_age
                .get_or_create(&vec![("job", job.to_string())])
                .set(age.as_secs_f64());
        }
        r.register(
            "haul_job_dead_letters",
            "Chunk tasks of unfinished jobs in the dead-letter queue (`haul dlq`)",
            dead_letters,
        );
        r.register(
            "haul_job_snapshot_age_seconds",
            "How long the job's snapshot has been held open on its source (it holds back vacuum there)",
            snapshot_age,
        );
        r.register(
            "haul_job_chunks",
            "Chunks of unfinished jobs, by state",
            chunks,
        );
        r.register(
            "haul_job_rows_done",
            "Rows in committed chunks of unfinished jobs",
            rows,
        );
        let workers = Family::<Labels, Gauge>::default();
        for (w, o) in self.store.workers().await.unwrap_or_default() {
            workers
                .get_or_create(&vec![("state", worker_state(&w, o, now_ms()).to_owned())])
                .inc();
        }
        r.register("haul_workers", "Registered workers, by state", workers);
        if let Ok(depth) = self.queue.depth().await {
            let queue = vec![("queue", self.opts.queue.clone())];
            let ready = Family::<Labels, Gauge>::default();
            ready.get_or_create(&queue).set(i64::from(depth.ready));
            r.register(
                "haul_queue_ready_messages",
                "Chunk tasks waiting in the queue (not counting those being worked on)",
                ready,
            );
            let consumers = Family::<Labels, Gauge>::default();
            consumers
                .get_or_create(&queue)
                .set(i64::from(depth.consumers));
            r.register(
                "haul_queue_consumers",
                "Consumers on the chunk queue: workers taking chunks",
                consumers,
            );
        }
        encode(&r)
    }
}
