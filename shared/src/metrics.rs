//! Prometheus metrics and health: each role keeps its metrics with `prometheus-client` and
//! serves them in the OpenMetrics text format on `GET /metrics` at `--metrics-listen`, beside
//! `GET /healthz` (the process answers) and `GET /readyz` (it can do its work now: 200 with
//! its state, or 503 with the reason), which Kubernetes probes use. Names follow
//! `haul_<thing>_<unit>`; counters get their `_total` suffix from the encoder.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
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

/// Whether the role can do its work now, checked on each `GET /readyz`: `Ok(state)`
/// answers 200 with the state (e.g. `active`, `standby`, `consuming`), `Err(reason)` 503.
pub type Ready =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<String, String>> + Send>> + Send + Sync>;

/// How long a readiness check may take: one that hangs (a store that does not answer)
/// fails the check instead of hanging the probe.
pub const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

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
/// `GET /metrics`, `/healthz` and `/readyz` in a background task until `shutdown` fires.
pub async fn spawn(
    addr: SocketAddr,
    render: Render,
    ready: Ready,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving Prometheus metrics on /metrics, health on /healthz and /readyz");
    tokio::spawn(async move {
        if let Err(e) = serve(listener, render, ready, shutdown).await {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}

async fn serve(
    listener: tokio::net::TcpListener,
    render: Render,
    ready: Ready,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = Arc::clone(&ready);
                async move {
                    match tokio::time::timeout(READY_TIMEOUT, ready()).await {
                        Ok(Ok(state)) => (StatusCode::OK, format!("{state}\n")),
                        Ok(Err(why)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                        Err(_) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("readiness check took over {READY_TIMEOUT:?}\n"),
                        ),
                    }
                }
            }),
        )
        .route(
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
