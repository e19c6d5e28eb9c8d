//! TLS for the TSS Node's listener (`tls:`): the certificate chain and key are read once per
//! config generation, so a reload rotates them; each new connection uses the current one.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::{ListenerTls, TlsError};

/// The listener's TLS acceptor, loaded from `tls:`.
#[derive(Clone)]
pub(crate) struct Acceptor(pub(crate) TlsAcceptor);

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Acceptor")
    }
}

/// Loads the listener's certificate chain and key.
pub(crate) fn acceptor(t: &ListenerTls) -> Result<Acceptor, TlsError> {
    let certs: Vec<CertificateDer<'static>> = pem::parse_many(TlsError::read("tls.cert", &t.cert)?)
        .map_err(|e| TlsError::at("tls.cert", &t.cert, e))?
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect();
    if certs.is_empty() {
        return Err(TlsError::at(
            "tls.cert",
            &t.cert,
            "no CERTIFICATE block found",
        ));
    }
    let block = pem::parse(TlsError::read("tls.key", &t.key)?)
        .map_err(|e| TlsError::at("tls.key", &t.key, e))?;
    let key = match block.tag() {
        "PRIVATE KEY" => PrivateKeyDer::Pkcs8(block.into_contents().into()),
        "RSA PRIVATE KEY" => PrivateKeyDer::Pkcs1(block.into_contents().into()),
        "EC PRIVATE KEY" => PrivateKeyDer::Sec1(block.into_contents().into()),
        other => {
            return Err(TlsError::at(
                "tls.key",
                &t.key,
                format!("unexpected PEM block {other:?}"),
            ))
        }
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::at("tls.cert", &t.cert, e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::at("tls.key", &t.key, e))?;
    let mut config = config;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Acceptor(TlsAcceptor::from(Arc::new(config))))
}
