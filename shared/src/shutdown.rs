//! How every role learns to stop: the stop signals (SIGTERM, what Kubernetes sends, and
//! SIGINT, Ctrl-C) as a stream, or as a `CancellationToken` fired by the first one. The
//! work a role then winds down is tracked with `tokio_util`'s `TaskTracker`.

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// The stop signals, installed once.
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    /// Installs the handlers (fails only if the process cannot take signals).
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next stop signal; returns its name.
    pub async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// A token that fires at the first stop signal, logging `msg` with the signal's name:
/// how a server role (coordinator, loader) or `haul run` learns to stop.
pub fn on_stop_signal(msg: &'static str) -> std::io::Result<CancellationToken> {
    let mut signals = StopSignals::install()?;
    let stop = CancellationToken::new();
    let fire = stop.clone();
    tokio::spawn(async move {
        let name = signals.next().await;
        tracing::info!(signal = name, "{msg}");
        fire.cancel();
    });
    Ok(stop)
}
