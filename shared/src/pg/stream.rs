//! Sockets to Postgres: TCP or Unix, and TLS negotiated the libpq way (`sslmode`,
//! `sslrootcert`, `sslcert`/`sslkey`) with rustls.
//!
//! haul opens its Postgres sockets itself and hands them to tokio-postgres already
//! encrypted (its own TLS support knows only disable/prefer/require and no certificate
//! checks), so that every connection — the planner's, the loaders', and the chunk reader
//! that reads COPY straight off the socket — is the same [`PgStream`].

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::conninfo::{ConnInfo, Target};

/// A connection to Postgres, encrypted or not.
pub enum PgStream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl PgStream {
    /// The TCP socket underneath, for socket options.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            PgStream::Tcp(s) => Some(s),
            PgStream::Tls(s) => Some(s.get_ref().0),
            PgStream::Unix(_) => None,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, PgStream::Tls(_))
    }
}

impl AsyncRead for PgStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            PgStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PgStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PgStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            PgStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            PgStream::Unix(s) => Pin::new(s).poll_flush(cx),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            PgStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// Plain first; TLS if the server refuses a plain connection.
    Allow,
    /// TLS if the server offers it (libpq's default).
    Prefer,
    Require,
    /// TLS, and the server's certificate chains to `sslrootcert`.
    VerifyCa,
    /// As `VerifyCa`, and the certificate names the host connected to.
    VerifyFull,
}

impl SslMode {
    pub fn of(info: &ConnInfo) -> SslMode {
        match info.get("sslmode").unwrap_or("prefer") {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => SslMode::Prefer,
        }
    }

    fn needs_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }
}

/// Why a connection could not be made: a line for the user, and whether trying again
/// later may help.
#[derive(Debug)]
pub(super) struct OpenError {
    pub reason: String,
    pub transient: bool,
}

impl OpenError {
    fn permanent(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            transient: false,
        }
    }
}

impl From<io::Error> for OpenError {
    fn from(e: io::Error) -> Self {
        Self {
            reason: e.to_string(),
            transient: true,
        }
    }
}

/// How this connection string wants TLS, with its certificates read (again at every
/// connection, so rotated files are picked up).
pub(super) struct TlsPolicy {
    pub mode: SslMode,
    config: Option<Arc<ClientConfig>>,
}

impl TlsPolicy {
    pub(super) fn new(info: &ConnInfo) -> Result<Self, OpenError> {
        let mode = SslMode::of(info);
        if mode == SslMode::Disable {
            return Ok(Self { mode, config: None });
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let home_file = |name: &str| {
            std::env::var_os("HOME").map(|h| Path::new(&h).join(".postgresql").join(name))
        };
        // libpq: a root certificate file that exists is used (require then checks the
        // chain as verify-ca does); verify-ca/verify-full without one are refused
        let root = match info.get("sslrootcert") {
            Some(r) => Some(r.to_owned()),
            None => home_file("root.crt")
                .filter(|p| p.exists())
                .map(|p| p.display().to_string()),
        };
        let verifier: Arc<dyn ServerCertVerifier> = match &root {
            None if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) => {
                return Err(OpenError::permanent(format!(
                    "sslmode={} needs the CA that signed the server's certificate: give sslrootcert=<file> (or sslrootcert=system for the system's CAs, with verify-full), or put it in ~/.postgresql/root.crt",
                    info.get("sslmode").unwrap_or_default()
                )));
            }
            None => Arc::new(AnyCertificate(Arc::clone(&provider))),
            Some(root) => {
                let roots = Arc::new(load_roots(root)?);
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
                        .build()
                        .map_err(|e| OpenError::permanent(format!("sslrootcert={root}: {e}")))?;
                if mode == SslMode::VerifyFull {
                    webpki
                } else {
                    Arc::new(ChainOnly(webpki))
                }
            }
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| OpenError::permanent(format!("TLS setup: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let cert = info
            .get("sslcert")
            .map(|c| (PathBuf::from(c), true))
            .or_else(|| home_file("postgresql.crt").map(|p| (p, false)));
        let mut config = match cert {
            Some((cert, explicit)) if explicit || cert.exists() => {
                let key = info
                    .get("sslkey")
                    .map(PathBuf::from)
                    .or_else(|| home_file("postgresql.key"))
                    .unwrap_or_else(|| cert.with_extension("key"));
                let (chain, key) = crate::links::client_identity(&cert, &key)
                    .map_err(|e| OpenError::permanent(format!("sslcert/sslkey {e}")))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| OpenError::permanent(format!("sslcert={}: {e}", cert.display())))?
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        config.enable_sni = info.get("sslsni") != Some("0");
        Ok(Self {
            mode,
            config: Some(Arc::new(config)),
        })
    }
}

fn load_roots(root: &str) -> Result<RootCertStore, OpenError> {
    crate::links::root_store(root).map_err(|e| OpenError::permanent(format!("sslrootcert={e}")))
}

/// Opens a socket to `target` (its connect timeout and keepalives from `info`) and, when
/// `tls` says so, negotiates TLS on it.
pub(super) async fn open(
    info: &ConnInfo,
    target: &Target,
    policy: &TlsPolicy,
    try_tls: bool,
) -> Result<PgStream, OpenError> {
    let timeout = info
        .get("connect_timeout")
        .and_then(|t| t.trim().parse::<u64>().ok())
        .filter(|t| *t > 0)
        // libpq's minimum
        .map(|t| Duration::from_secs(t.max(2)));
    let attempt = async {
        if let Some(path) = target.socket_path() {
            return Ok(PgStream::Unix(UnixStream::connect(path).await?));
        }
        let tcp = match (target.addr, &target.host) {
            (Some(ip), _) => TcpStream::connect((ip, target.port)).await?,
            (None, Some(h)) => TcpStream::connect((h.as_str(), target.port)).await?,
            (None, None) => TcpStream::connect(("localhost", target.port)).await?,
        };
        tcp_options(&tcp, info)?;
        if !try_tls || policy.config.is_none() {
            return Ok(PgStream::Tcp(tcp));
        }
        negotiate(tcp, target, policy).await
    };
    match timeout {
        Some(t) => tokio::time::timeout(t, attempt).await.unwrap_or_else(|_| {
            Err(OpenError {
                reason: format!("connecting to {target} timed out after {}s", t.as_secs()),
                transient: true,
            })
        }),
        None => attempt.await,
    }
}

fn tcp_options(stream: &TcpStream, info: &ConnInfo) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let secs = |key: &str| {
        info.get(key)
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|v| *v > 0)
    };
    if info.get("keepalives") != Some("0") {
        let mut ka = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(secs("keepalives_idle").unwrap_or(120)))
            .with_interval(Duration::from_secs(
                secs("keepalives_interval").unwrap_or(75),
            ));
        if let Some(n) = secs("keepalives_count") {
            ka = ka.with_retries(n as u32);
        }
        socket2::SockRef::from(stream).set_tcp_keepalive(&ka)?;
    }
    if let Some(t) = secs("tcp_user_timeout") {
        socket2::SockRef::from(stream).set_tcp_user_timeout(Some(Duration::from_millis(t)))?;
    }
    Ok(())
}

/// `SSLRequest`, then the handshake if the server agrees.
async fn negotiate(
    mut tcp: TcpStream,
    target: &Target,
    policy: &TlsPolicy,
) -> Result<PgStream, OpenError> {
    let config = policy.config.as_ref().expect("checked by the caller");
    // length 8, code 80877103
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await?;
    // exactly one byte: anything the server sent after it, unencrypted, is not read
    match tcp.read_u8().await? {
        b'S' => {}
        b'N' if policy.mode.needs_tls() => {
            return Err(OpenError::permanent(format!(
                "{target} does not accept TLS connections, and sslmode={} requires one",
                mode_name(policy.mode)
            )));
        }
        b'N' => return Ok(PgStream::Tcp(tcp)),
        other => {
            return Err(OpenError::permanent(format!(
                "{target} answered the TLS request with {:?}: is this a Postgres server?",
                char::from(other)
            )));
        }
    }
    let name = target.name();
    let server_name = match ServerName::try_from(name.clone()) {
        Ok(n) => n,
        Err(_) if policy.mode != SslMode::VerifyFull => {
            ServerName::try_from("localhost").expect("a valid name")
        }
        Err(e) => {
            return Err(OpenError::permanent(format!(
                "sslmode=verify-full cannot check the name {name:?}: {e}"
            )));
        }
    };
    let tls = tokio_rustls::TlsConnector::from(Arc::clone(config))
        .connect(server_name, tcp)
        .await
        .map_err(|e| handshake_error(e, target, policy.mode))?;
    Ok(PgStream::Tls(Box::new(tls)))
}

fn mode_name(mode: SslMode) -> &'static str {
    match mode {
        SslMode::Disable => "disable",
        SslMode::Allow => "allow",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    }
}

/// A handshake failure, naming the certificate problem when there is one.
fn handshake_error(e: io::Error, target: &Target, mode: SslMode) -> OpenError {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return OpenError {
            reason: format!("TLS handshake with {target}: {e}"),
            transient: true,
        };
    };
    let why = match tls {
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "the server's certificate is not valid for the name {:?} (sslmode=verify-full checks it: connect with a name the certificate holds, or use verify-ca)",
            target.name()
        ),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the server's certificate is not signed by a CA in sslrootcert (give the CA that signed it)".into()
        }
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "the server's certificate has expired".into(),
        rustls::Error::InvalidCertificate(c) => {
            format!("the server's certificate was refused: {c:?}")
        }
        rustls::Error::AlertReceived(alert) => format!(
            "the server refused the handshake ({alert:?}); if it wants a client certificate, give sslcert and sslkey"
        ),
        other => format!("{other}"),
    };
    OpenError::permanent(format!(
        "TLS with {target} (sslmode={}): {why}",
        mode_name(mode)
    ))
}

/// verify-ca: the chain must lead to a trusted CA; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain before the name: a name error means the chain passed
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// prefer/require without a root certificate (libpq's meaning): encrypted, and the
/// handshake's signatures checked, but the certificate not.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
