//! Prometheus metrics: each role keeps its metrics with `prometheus-client` and serves them
//! in the OpenMetrics text format on `GET /metrics` at `--metrics-listen`. Names follow
//! `haul_<thing>_<unit>`; counters get their `_total` suffix from the encoder.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
pub use prometheus_client::metrics::counter::{ConstCounter, Counter};
pub use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
pub use prometheus_client::metrics::histogram::Histogram;
pub use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Renders the metrics text on each scrape.
pub type Render = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// The label set of a sample in a family: `(name, value)` pairs.
pub type Labels = Vec<(&'static str, String)>;

/// A registry's metrics as OpenMetrics text.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("encoding into a String cannot fail");
    out
}

/// Binds `addr` now (so a bad address is reported at start-up), then serves
/// `GET /metrics` in a background task until `shutdown` fires.
pub async fn spawn(
    addr: SocketAddr,
    render: Render,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving Prometheus metrics on /metrics");
    tokio::spawn(async move {
        if let Err(e) = serve(listener, render, shutdown).await {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}

async fn serve(
    listener: tokio::net::TcpListener,
    render: Render,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let render = Arc::clone(&render);
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render().await,
                )
                    .into_response()
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_encode_with_escaped_labels_and_counter_suffixes() {
        let mut r = Registry::default();
        let jobs = Family::<Labels, Gauge>::default();
        jobs.get_or_create(&vec![("job", "a\"b".to_owned())]).set(2);
        r.register("haul_x", "An example", jobs);
        let done = Counter::<u64>::default();
        done.inc_by(3);
        r.register("haul_done", "Done", done);
        let text = encode(&r);
        assert!(text.contains("haul_x{job=\"a\\\"b\"} 2\n"), "{text}");
        assert!(text.contains("haul_done_total 3\n"), "{text}");
    }
}
