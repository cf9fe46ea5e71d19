//! gRPC plumbing every role shares: the client channel (plain or TLS) and the bearer
//! token, sent by clients and checked by the coordinator.

use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use crate::pg::Secret;

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("bad coordinator address {url:?}: {reason}")]
    BadAddress { url: String, reason: String },
    #[error("cannot read the TLS file {path}: {reason}")]
    TlsFile { path: String, reason: String },
    #[error(
        "cannot reach the coordinator at {url}: {reason}; is `haul coordinator` running there?"
    )]
    Unreachable { url: String, reason: String },
    #[error("the token is not a valid header value (it must be printable ASCII)")]
    BadToken,
}

/// How to reach the coordinator.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// `http://host:port`, or `https://host:port` for TLS.
    pub url: String,
    pub token: Option<Secret>,
    /// CA certificate (PEM) to trust for an `https://` coordinator; the system roots
    /// otherwise.
    pub tls_ca: Option<PathBuf>,
}

impl ClientOptions {
    /// The addresses `url` lists (comma-separated: an active coordinator and its standbys).
    pub fn urls(&self) -> Vec<&str> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }

    /// The endpoint of `url`'s only (or first) address.
    pub fn endpoint(&self) -> Result<Endpoint, RpcError> {
        let first = self.urls().first().copied().unwrap_or_default().to_owned();
        self.endpoint_for(&first)
    }

    fn endpoint_for(&self, url: &str) -> Result<Endpoint, RpcError> {
        let bad = |e: &dyn std::fmt::Display| RpcError::BadAddress {
            url: url.to_owned(),
            reason: e.to_string(),
        };
        let mut ep = Endpoint::from_shared(url.to_owned())
            .map_err(|e| bad(&e))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_keepalive(Some(Duration::from_secs(30)));
        if url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_enabled_roots();
            if let Some(ca) = &self.tls_ca {
                let pem = std::fs::read(ca).map_err(|e| RpcError::TlsFile {
                    path: ca.display().to_string(),
                    reason: e.to_string(),
                })?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            ep = ep.tls_config(tls).map_err(|e| bad(&e))?;
        }
        Ok(ep)
    }

    /// Connects now to the active coordinator: of several addresses, the first whose
    /// gRPC health says its `Jobs` service is serving (standbys say not); an unreachable
    /// coordinator is an error naming each address and why.
    ///
    /// While the coordinators that answer all stand by (one is starting, or taking over
    /// from one that died), it waits for one to turn active, up to [`TAKEOVER_WAIT`];
    /// then it connects to a standby anyway, whose answers say where the active one is.
    pub async fn connect(&self) -> Result<(Channel, BearerToken), RpcError> {
        let token = BearerToken::new(self.token.as_ref())?;
        let urls = self.urls();
        let t0 = std::time::Instant::now();
        loop {
            let mut tried = Vec::new();
            let mut standby = None;
            for url in &urls {
                match self.endpoint_for(url)?.connect().await {
                    Ok(ch) if is_active(&ch).await => return Ok((ch, token)),
                    Ok(ch) => {
                        tried.push(format!("{url} is standing by"));
                        standby.get_or_insert(ch);
                    }
                    Err(e) => tried.push(format!("{url}: {}", error_chain(&e))),
                }
            }
            match standby {
                Some(ch) if t0.elapsed() >= TAKEOVER_WAIT || !taking_over(&ch, &token).await => {
                    return Ok((ch, token));
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(250)).await,
                None => {
                    return Err(RpcError::Unreachable {
                        url: self.url.clone(),
                        reason: tried.join("; "),
                    });
                }
            }
        }
    }

    /// Connects on first use and reconnects as needed (for long-lived workers).
    pub fn connect_lazy(&self) -> Result<(Channel, BearerToken), RpcError> {
        self.connect_lazy_to(0)
    }

    /// [`Self::connect_lazy`] to the `i`-th address (modulo their number): a worker moves
    /// on to the next when its calls fail.
    pub fn connect_lazy_to(&self, i: usize) -> Result<(Channel, BearerToken), RpcError> {
        let urls = self.urls();
        let url = urls.get(i % urls.len().max(1)).copied().unwrap_or_default();
        Ok((
            self.endpoint_for(url)?.connect_lazy(),
            BearerToken::new(self.token.as_ref())?,
        ))
    }
}

/// How long a client waits for a standing-by coordinator to turn active: a standby takes
/// over within about 15 s of the active one's end, and one starting up within a second.
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(20);

/// Whether the coordinator behind `ch` is the active one: its gRPC health reports the
/// `Jobs` service serving (a standby reports it not serving). A coordinator that does not
/// answer the health check counts as active; its calls will tell.
async fn is_active(ch: &Channel) -> bool {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut health = HealthClient::new(ch.clone());
    let check = health.check(HealthCheckRequest {
        service: crate::proto::wire::jobs_server::SERVICE_NAME.to_owned(),
    });
    match tokio::time::timeout(Duration::from_secs(3), check).await {
        Ok(Ok(r)) => r.into_inner().status() == ServingStatus::Serving,
        Ok(Err(_)) | Err(_) => true,
    }
}

/// Whether a standing-by coordinator says that none is active yet (one is starting or
/// taking over): worth waiting for. One that names another, active coordinator is not.
async fn taking_over(ch: &Channel, token: &BearerToken) -> bool {
    let mut jobs =
        crate::proto::wire::jobs_client::JobsClient::with_interceptor(ch.clone(), token.clone());
    let probe = jobs.get(crate::proto::wire::JobRef {
        job_id: String::new(),
    });
    match tokio::time::timeout(Duration::from_secs(3), probe).await {
        Ok(Err(s)) if s.code() == tonic::Code::Unavailable => {
            !s.message().contains("the active coordinator is")
        }
        _ => false,
    }
}

/// The full cause chain of an error, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let c_s = c.to_string();
        if !s.contains(&c_s) {
            s.push_str(": ");
            s.push_str(&c_s);
        }
        src = c.source();
    }
    s
}

/// Adds `authorization: Bearer <token>` to every request (when a token is set).
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    pub fn new(token: Option<&Secret>) -> Result<Self, RpcError> {
        token
            .map(|t| {
                format!("Bearer {}", t.expose())
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| RpcError::BadToken)
            })
            .transpose()
            .map(Self)
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The coordinator's check: with a token configured, every request must carry it.
#[derive(Clone)]
pub struct RequireToken(Option<String>);

impl RequireToken {
    pub fn new(token: Option<&Secret>) -> Self {
        Self(token.map(|t| format!("Bearer {}", t.expose())))
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(want) = &self.0 else {
            return Ok(req);
        };
        let got = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        // compared in full either way, so the time taken says nothing about the token
        let ok = got.is_some_and(|g| {
            g.len() == want.len()
                && g.bytes()
                    .zip(want.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        });
        if ok {
            Ok(req)
        } else {
            Err(Status::unauthenticated(
                "missing or wrong bearer token: pass --token or set HAUL_TOKEN",
            ))
        }
    }
}

/// `flight://host:port` (also `grpc://`, `grpc+tcp://`) → `http://host:port`;
/// `flight+tls://` / `grpc+tls://` → `https://`; `http(s)://` as given.
pub fn flight_url(s: &str) -> Result<String, String> {
    let s = s.trim();
    for (scheme, to) in [
        ("flight://", "http://"),
        ("grpc://", "http://"),
        ("grpc+tcp://", "http://"),
        ("flight+tls://", "https://"),
        ("grpc+tls://", "https://"),
        ("http://", "http://"),
        ("https://", "https://"),
    ] {
        if let Some(rest) = s.strip_prefix(scheme) {
            if rest.is_empty() || rest.contains('/') {
                return Err(format!("{s:?}: expected {scheme}host:port"));
            }
            return Ok(format!("{to}{rest}"));
        }
    }
    Err(format!(
        "{s:?}: a loader address is flight://host:port (or flight+tls://host:port)"
    ))
}

/// A loader's address as users write it: `http://` → `flight://`, `https://` →
/// `flight+tls://` (the inverse of [`flight_url`], for messages and `haul status`).
pub fn flight_display(url: &str) -> String {
    if let Some(rest) = url.strip_prefix("http://") {
        format!("flight://{rest}")
    } else if let Some(rest) = url.strip_prefix("https://") {
        format!("flight+tls://{rest}")
    } else {
        url.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::{flight_display, flight_url};

    #[test]
    fn loader_addresses_show_as_written() {
        assert_eq!(flight_display("http://a:50052"), "flight://a:50052");
        assert_eq!(flight_display("https://b:1"), "flight+tls://b:1");
        assert_eq!(
            flight_display(&flight_url("flight://c:2").unwrap()),
            "flight://c:2"
        );
    }

    #[test]
    fn loader_addresses() {
        assert_eq!(flight_url("flight://a:50052").unwrap(), "http://a:50052");
        assert_eq!(flight_url(" grpc+tls://b:1 ").unwrap(), "https://b:1");
        assert_eq!(flight_url("http://c:2").unwrap(), "http://c:2");
        assert!(flight_url("flight://a:1/x").is_err());
        assert!(flight_url("a:50052").is_err());
    }
}
