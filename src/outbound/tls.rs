//! TLS on both sides: `https` downstreams (system roots or a per-server `ca_file`, optional client
//! certificate for mutual TLS) and an optional HTTPS listener for the TSS Node. Certificates and
//! keys are read once per config generation, so a reload rotates them.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::{Http2, ListenerTls, ServerConfig};

/// A TLS setting that could not be loaded: the config field and why.
#[derive(Debug)]
pub struct TlsError {
    pub field: &'static str,
    pub message: String,
}

fn err(field: &'static str, path: &Path, detail: impl std::fmt::Display) -> TlsError {
    TlsError {
        field,
        message: format!("{}: {detail}", path.display()),
    }
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| err(field, path, e))
}

/// The HTTP client for one downstream, with its TLS options and HTTP version (`http2`), all
/// through reqwest: ALPN and HTTP/2 framing are its code, not ours.
pub fn downstream_client(s: &ServerConfig, timeout: Duration) -> Result<reqwest::Client, TlsError> {
    let mut b = match s.http2 {
        Http2::Auto => crate::client::builder(timeout),
        Http2::Always => crate::client::builder(timeout).http2_prior_knowledge(),
        Http2::Never => crate::client::builder(timeout).http1_only(),
    };
    if let Some(path) = &s.ca_file {
        let certs = reqwest::Certificate::from_pem_bundle(&read("ca_file", path)?)
            .map_err(|e| err("ca_file", path, e))?;
        if certs.is_empty() {
            return Err(err("ca_file", path, "no certificate found"));
        }
        b = b.tls_certs_only(certs);
    }
    if let (Some(cert), Some(key)) = (&s.client_cert, &s.client_key) {
        let mut pem = read("client_cert", cert)?;
        pem.push(b'\n');
        pem.extend(read("client_key", key)?);
        let identity =
            reqwest::Identity::from_pem(&pem).map_err(|e| err("client_cert", cert, e))?;
        b = b.identity(identity);
    }
    b.build().map_err(|e| TlsError {
        field: "service_address",
        message: format!("cannot build the HTTP client: {e}"),
    })
}

/// The listener's TLS acceptor, loaded from `tls:`.
#[derive(Clone)]
pub struct Acceptor(pub TlsAcceptor);

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Acceptor")
    }
}

/// Loads the listener's certificate chain and key.
pub fn acceptor(t: &ListenerTls) -> Result<Acceptor, TlsError> {
    let certs: Vec<CertificateDer<'static>> = pem::parse_many(read("tls.cert", &t.cert)?)
        .map_err(|e| err("tls.cert", &t.cert, e))?
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect();
    if certs.is_empty() {
        return Err(err("tls.cert", &t.cert, "no CERTIFICATE block found"));
    }
    let block = pem::parse(read("tls.key", &t.key)?).map_err(|e| err("tls.key", &t.key, e))?;
    let key = match block.tag() {
        "PRIVATE KEY" => PrivateKeyDer::Pkcs8(block.into_contents().into()),
        "RSA PRIVATE KEY" => PrivateKeyDer::Pkcs1(block.into_contents().into()),
        "EC PRIVATE KEY" => PrivateKeyDer::Sec1(block.into_contents().into()),
        other => {
            return Err(err(
                "tls.key",
                &t.key,
                format!("unexpected PEM block {other:?}"),
            ))
        }
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err("tls.cert", &t.cert, e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| err("tls.key", &t.key, e))?;
    let mut config = config;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Acceptor(TlsAcceptor::from(Arc::new(config))))
}
