//! TLS toward `https` downstreams: system roots or a per-server `ca_file`, and an optional client
//! certificate for mutual TLS. Certificates and keys are read once per config generation, so a
//! reload rotates them.

use std::time::Duration;

use crate::config::{Http2, ServerConfig, TlsError};

/// The HTTP client for one downstream, with its TLS options and HTTP version (`http2`), all
/// through reqwest: ALPN and HTTP/2 framing are its code, not ours.
pub(crate) fn downstream_client(
    s: &ServerConfig,
    timeout: Duration,
) -> Result<reqwest::Client, TlsError> {
    let mut b = match s.http2 {
        Http2::Auto => super::client::builder(timeout),
        Http2::Always => super::client::builder(timeout).http2_prior_knowledge(),
        Http2::Never => super::client::builder(timeout).http1_only(),
    };
    if let Some(path) = &s.ca_file {
        let certs = reqwest::Certificate::from_pem_bundle(&TlsError::read("ca_file", path)?)
            .map_err(|e| TlsError::at("ca_file", path, e))?;
        if certs.is_empty() {
            return Err(TlsError::at("ca_file", path, "no certificate found"));
        }
        b = b.tls_certs_only(certs);
    }
    if let (Some(cert), Some(key)) = (&s.client_cert, &s.client_key) {
        let mut pem = TlsError::read("client_cert", cert)?;
        pem.push(b'\n');
        pem.extend(TlsError::read("client_key", key)?);
        let identity =
            reqwest::Identity::from_pem(&pem).map_err(|e| TlsError::at("client_cert", cert, e))?;
        b = b.identity(identity);
    }
    b.build().map_err(|e| TlsError {
        field: "service_address",
        message: format!("cannot build the HTTP client: {e}"),
    })
}
