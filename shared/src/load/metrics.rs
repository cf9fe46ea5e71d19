//! The loader's metrics on `/metrics`: rows, bytes and batches loaded, chunk loads by
//! outcome, chunks in flight, and the chunk load latency histogram.

use std::time::Duration;

use crate::metrics::{Counter, Family, Gauge, Histogram, Labels, Registry, encode};

/// Upper bounds (seconds) of the chunk latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 8] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// How a chunk load ended.
#[derive(Clone, Copy, Debug)]
pub enum Outcome {
    Loaded,
    Replayed,
    Failed,
}

/// The loader's metrics, registered once.
#[derive(Debug)]
pub struct LoaderMetrics {
    registry: Registry,
    pub rows: Counter,
    /// Bytes of binary COPY data sent to the target.
    pub bytes: Counter,
    pub batches: Counter,
    chunks: Family<Labels, Counter>,
    pub in_flight: Gauge,
    latency: Histogram,
}

impl Default for LoaderMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let (rows, bytes, batches) = (Counter::default(), Counter::default(), Counter::default());
        let chunks = Family::<Labels, Counter>::default();
        let in_flight = Gauge::default();
        let latency = Histogram::new(LATENCY_BUCKETS);
        registry.register(
            "haul_loader_rows",
            "Rows committed into the target",
            rows.clone(),
        );
        registry.register(
            "haul_loader_bytes",
            "Binary COPY bytes sent to the target",
            bytes.clone(),
        );
        registry.register(
            "haul_loader_batches",
            "Arrow batches received",
            batches.clone(),
        );
        registry.register(
            "haul_loader_chunks",
            "Chunk loads by outcome",
            chunks.clone(),
        );
        registry.register(
            "haul_loader_chunks_in_flight",
            "Chunks being loaded now",
            in_flight.clone(),
        );
        registry.register(
            "haul_loader_chunk_seconds",
            "Time from a chunk's first batch to its commit",
            latency.clone(),
        );
        for o in [Outcome::Loaded, Outcome::Replayed, Outcome::Failed] {
            // every outcome shows from the start, at 0
            let _ = chunks.get_or_create(&outcome_labels(o));
        }
        Self {
            registry,
            rows,
            bytes,
            batches,
            chunks,
            in_flight,
            latency,
        }
    }
}

fn outcome_labels(o: Outcome) -> Labels {
    let name = match o {
        Outcome::Loaded => "loaded",
        Outcome::Replayed => "replayed",
        Outcome::Failed => "failed",
    };
    vec![("outcome", name.to_owned())]
}

impl LoaderMetrics {
    /// Counts a chunk load that ended.
    pub(super) fn chunk(&self, o: Outcome) {
        self.chunks.get_or_create(&outcome_labels(o)).inc();
    }

    pub(super) fn observe(&self, d: Duration) {
        self.latency.observe(d.as_secs_f64());
    }

    /// OpenMetrics text.
    pub fn render(&self) -> String {
        encode(&self.registry)
    }
}
