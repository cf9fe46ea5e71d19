//! What the coordinator's `/metrics` shows: jobs by state, progress of unfinished jobs,
//! workers by state, and the chunk queue's depth (what an autoscaler scales workers on).

use std::collections::BTreeMap;

use haul_shared::jobs::JobStore;
use haul_shared::queue::ChunkQueue;
use haul_shared::workers::worker_state;

use super::{Coordinator, job_status, now_ms};

impl Coordinator {
    /// Prometheus text: jobs by state, progress of unfinished jobs, workers by state,
    /// and the chunk queue's depth (what an autoscaler scales workers on).
    pub(super) async fn metrics(&self) -> String {
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
}
