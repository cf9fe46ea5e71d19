//! TLS for the cluster's own links (`amqps://` to RabbitMQ, `rediss://` to Redis): the CA
//! to trust instead of the system's, and a client certificate when the server asks for one.

use std::path::PathBuf;

/// A client certificate and its key, PEM.
pub type CertAndKey = (Vec<u8>, Vec<u8>);

/// PEM files for one link; all optional (the system's CAs, no client certificate).
#[derive(Clone, Debug, Default)]
pub struct LinkTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl LinkTls {
    /// The CA file's contents, if one was given.
    pub fn ca_pem(&self) -> Result<Option<Vec<u8>>, String> {
        self.ca.as_ref().map(read).transpose()
    }

    /// The client certificate and key (PEM), if given (both or neither).
    pub fn identity_pem(&self) -> Result<Option<CertAndKey>, String> {
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Ok(Some((read(c)?, read(k)?))),
            (None, None) => Ok(None),
            _ => Err("a client certificate needs both its certificate and its key".into()),
        }
    }
}

fn read(p: &PathBuf) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
}

/// The CA certificates in a PEM file (or, for `system`, the system's) as a root store.
pub(crate) fn root_store(ca: &str) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut store = rustls::RootCertStore::empty();
    if ca == "system" {
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = store.add(cert);
        }
        if store.is_empty() {
            return Err("system: no CA certificates found on this system (install ca-certificates, or give a CA file)".into());
        }
        return Ok(store);
    }
    let certs = CertificateDer::pem_file_iter(ca)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{ca}: {e}"))?;
    for cert in certs {
        store.add(cert).map_err(|e| format!("{ca}: {e}"))?;
    }
    if store.is_empty() {
        return Err(format!("{ca} holds no certificate"));
    }
    Ok(store)
}

/// A client certificate chain and its private key, as rustls takes them.
pub(crate) type ClientIdentity = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

/// A client certificate chain and its private key, from PEM files.
pub(crate) fn client_identity(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<ClientIdentity, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    Ok((chain, key))
}

/// Whether a TLS link's server can be trusted, checked once before its client library
/// connects (which retries every failure for minutes): `Err` with the certificate problem
/// when it cannot; `Ok` when it can, or when the server is not reachable yet (a transient
/// matter, for the client's own retries). Plain URLs are not checked.
pub async fn check_server_certificate(url: &str, tls: &LinkTls) -> Result<(), String> {
    use rustls::pki_types::ServerName;
    let Ok(parsed) = url::Url::parse(url) else {
        return Ok(());
    };
    let default_port = match parsed.scheme() {
        "amqps" => 5671,
        "rediss" => 6379,
        _ => return Ok(()),
    };
    let host = parsed
        .host_str()
        .unwrap_or("localhost")
        .trim_matches(['[', ']']);
    let port = parsed.port().unwrap_or(default_port);
    let roots = root_store(
        &tls.ca
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "system".into()),
    )?;
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match (&tls.cert, &tls.key) {
        (Some(c), Some(k)) => {
            let (chain, key) = client_identity(c, k)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("{}: {e}", c.display()))?
        }
        _ => builder.with_no_client_auth(),
    };
    let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("{host}: {e}"))?;
    let connect = async {
        let tcp = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        Some(
            tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                .connect(name, tcp)
                .await,
        )
    };
    match tokio::time::timeout(std::time::Duration::from_secs(10), connect).await {
        Ok(Some(Err(e))) => match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::InvalidCertificate(c)) => Err(format!(
                "{host}:{port}: the server's certificate was refused ({c:?}); give the CA that signed it"
            )),
            Some(other) => Err(format!("{host}:{port}: TLS handshake failed: {other}")),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}
