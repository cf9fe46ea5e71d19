//! What the coordinator's `/metrics` shows: jobs by state, progress of unfinished jobs,
//! workers by state, and the chunk queue's depth (what an autoscaler scales workers on).

use std::collections::BTreeMap;

use haul_shared::jobs::JobStore;
use haul_shared::metrics::{Family, Gauge, Labels, Registry, encode};
use haul_shared::queue::ChunkQueue;
use haul_shared::workers::worker_state;

use haul_shared::proto::job_status_to_wire;

use super::{Coordinator, now_ms};

impl Coordinator {
    /// Prometheus text: jobs by state, progress of unfinished jobs, workers by state,
    /// and the chunk queue's depth (what an autoscaler scales workers on).
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
        let jobs = Family::<Labels, Gauge>::default();
        for (state, n) in &by_state {
            jobs.get_or_create(&vec![("state", (*state).to_owned())])
                .set(*n);
        }
        r.register("haul_jobs", "Jobs recorded, by state", jobs);
        let chunks = Family::<Labels, Gauge>::default();
        let rows = Family::<Labels, Gauge>::default();
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
        }
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
        if let Ok(ready) = self.queue.ready_count().await {
            let depth = Family::<Labels, Gauge>::default();
            depth
                .get_or_create(&vec![("queue", self.opts.queue.clone())])
                .set(ready as i64);
            r.register(
                "haul_queue_ready_messages",
                "Chunk tasks waiting in the queue",
                depth,
            );
        }
        encode(&r)
    }
}
