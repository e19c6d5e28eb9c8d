//! A test CA with a server certificate for 127.0.0.1 and a client certificate, made by `openssl`,
//! and the rustls server configs that present them.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::keys::openssl;

/// A CA, a server certificate for 127.0.0.1 and a client certificate, in a folder of their own.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = |f: &str| dir.path().join(f).to_str().unwrap().to_owned();
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &d("ca.key"),
            "-out",
            &d("ca.pem"),
            "-days",
            "2",
            "-subj",
            "/CN=test-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        std::fs::write(
            d("server.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        std::fs::write(
            d("client.ext"),
            "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
        )
        .unwrap();
        for who in ["server", "client"] {
            openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &d(&format!("{who}.key")),
                "-out",
                &d(&format!("{who}.csr")),
                "-subj",
                &format!("/CN={who}"),
            ]);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &d(&format!("{who}.csr")),
                "-CA",
                &d("ca.pem"),
                "-CAkey",
                &d("ca.key"),
                "-CAcreateserial",
                "-out",
                &d(&format!("{who}.pem")),
                "-days",
                "2",
                "-extfile",
                &d(&format!("{who}.ext")),
            ]);
        }
        Pki { dir }
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    /// The server entry line that trusts this CA.
    pub fn ca_file(&self) -> String {
        format!("ca_file: {}", self.path("ca.pem").display())
    }

    pub fn der(&self, f: &str) -> Vec<CertificateDer<'static>> {
        pem::parse_many(std::fs::read(self.path(f)).unwrap())
            .unwrap()
            .into_iter()
            .map(|p| p.into_contents().into())
            .collect()
    }

    pub fn key(&self, f: &str) -> PrivateKeyDer<'static> {
        let p = pem::parse(std::fs::read(self.path(f)).unwrap()).unwrap();
        PrivateKeyDer::Pkcs8(p.into_contents().into())
    }

    /// A server config presenting the server certificate, optionally requiring a client one.
    pub fn server_config(&self, require_client: bool) -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if require_client {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.der("ca.pem").remove(0)).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        builder
            .with_single_cert(self.der("server.pem"), self.key("server.key"))
            .unwrap()
    }

    /// [`Pki::server_config`] as an acceptor.
    pub fn acceptor(&self, require_client: bool) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(Arc::new(self.server_config(require_client)))
    }

    /// An acceptor without client certificates offering `alpn` (most preferred first).
    pub fn acceptor_offering(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
        let mut config = self.server_config(false);
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}
