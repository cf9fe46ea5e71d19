//! The loader's counters and chunk-latency histogram on `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::metrics;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct LoaderMetrics {
    pub rows: AtomicU64,
    /// Bytes of binary COPY data sent to the target.
    pub bytes: AtomicU64,
    pub batches: AtomicU64,
    pub chunks_loaded: AtomicU64,
    pub chunks_replayed: AtomicU64,
    pub chunks_failed: AtomicU64,
    pub in_flight: AtomicU64,
    /// Chunk load latency histogram: counts per bucket of [`LATENCY_BUCKETS`], then +Inf.
    latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_ms: AtomicU64,
}

/// Upper bounds (seconds) of the chunk latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 8] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

impl LoaderMetrics {
    pub(super) fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ms
            .fetch_add(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let mut t = metrics::Text::default();
        t.family(
            "haul_loader_rows_total",
            "counter",
            "Rows committed into the target.",
        )
        .sample("haul_loader_rows_total", &[], n(&self.rows));
        t.family(
            "haul_loader_bytes_total",
            "counter",
            "Binary COPY bytes sent to the target.",
        )
        .sample("haul_loader_bytes_total", &[], n(&self.bytes));
        t.family(
            "haul_loader_batches_total",
            "counter",
            "Arrow batches received.",
        )
        .sample("haul_loader_batches_total", &[], n(&self.batches));
        t.family(
            "haul_loader_chunks_total",
            "counter",
            "Chunk loads by outcome.",
        )
        .sample(
            "haul_loader_chunks_total",
            &[("outcome", "loaded")],
            n(&self.chunks_loaded),
        )
        .sample(
            "haul_loader_chunks_total",
            &[("outcome", "replayed")],
            n(&self.chunks_replayed),
        )
        .sample(
            "haul_loader_chunks_total",
            &[("outcome", "failed")],
            n(&self.chunks_failed),
        );
        t.family(
            "haul_loader_chunks_in_flight",
            "gauge",
            "Chunks being loaded now.",
        )
        .sample("haul_loader_chunks_in_flight", &[], n(&self.in_flight));
        let name = "haul_loader_chunk_seconds";
        t.family(
            name,
            "histogram",
            "Time from a chunk's first batch to its commit.",
        );
        let mut cumulative = 0.0;
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += n(&self.latency[i]);
            t.sample(
                &format!("{name}_bucket"),
                &[("le", &b.to_string())],
                cumulative,
            );
        }
        cumulative += n(&self.latency[LATENCY_BUCKETS.len()]);
        t.sample(&format!("{name}_bucket"), &[("le", "+Inf")], cumulative);
        t.sample(
            &format!("{name}_sum"),
            &[],
            n(&self.latency_sum_ms) / 1000.0,
        );
        t.sample(&format!("{name}_count"), &[], cumulative);
        t.finish()
    }
}
