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
    pub fn endpoint(&self) -> Result<Endpoint, RpcError> {
        let bad = |e: &dyn std::fmt::Display| RpcError::BadAddress {
            url: self.url.clone(),
            reason: e.to_string(),
        };
        let mut ep = Endpoint::from_shared(self.url.clone())
            .map_err(|e| bad(&e))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_keepalive(Some(Duration::from_secs(30)));
        if self.url.starts_with("https://") {
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

    /// Connects now: an unreachable coordinator is an error naming it.
    pub async fn connect(&self) -> Result<(Channel, BearerToken), RpcError> {
        let ch = self
            .endpoint()?
            .connect()
            .await
            .map_err(|e| RpcError::Unreachable {
                url: self.url.clone(),
                reason: error_chain(&e),
            })?;
        Ok((ch, BearerToken::new(self.token.as_ref())?))
    }

    /// Connects on first use and reconnects as needed (for long-lived workers).
    pub fn connect_lazy(&self) -> Result<(Channel, BearerToken), RpcError> {
        Ok((
            self.endpoint()?.connect_lazy(),
            BearerToken::new(self.token.as_ref())?,
        ))
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

#[cfg(test)]
mod tests {
    use super::flight_url;

    #[test]
    fn loader_addresses() {
        assert_eq!(flight_url("flight://a:50052").unwrap(), "http://a:50052");
        assert_eq!(flight_url(" grpc+tls://b:1 ").unwrap(), "https://b:1");
        assert_eq!(flight_url("http://c:2").unwrap(), "http://c:2");
        assert!(flight_url("flight://a:1/x").is_err());
        assert!(flight_url("a:50052").is_err());
    }
}
