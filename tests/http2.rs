//! HTTP/2 to downstreams (`http2: auto | always | never`, CONTRACT.md section 4), against a real
//! HTTP/2 server (hyper's, which speaks HTTP/1.1 too) over TLS with ALPN and over plain TCP (h2c).
//! The server records the HTTP version of every request it was sent.

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};

use axum::http::Version;
use common::*;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// A callback server that approves everything and remembers the HTTP version of each request.
struct Versioned {
    url: String,
    seen: Arc<Mutex<Vec<Version>>>,
}

impl Versioned {
    fn versions(&self) -> Vec<Version> {
        self.seen.lock().unwrap().clone()
    }
}

/// Serves HTTP/1.1 and HTTP/2 on loopback; over TLS when `tls` is given (offering `h2` and
/// `http/1.1` by ALPN), else plain (HTTP/2 only by prior knowledge).
async fn versioned_server(key: &KeyPair, tls: Option<tokio_rustls::TlsAcceptor>) -> Versioned {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (record, key) = (seen.clone(), key.clone());
    let app = axum::Router::new().route(
        "/v2/check",
        axum::routing::post(move |req: axum::extract::Request| {
            let (record, key) = (record.clone(), key.clone());
            async move {
                record.lock().unwrap().push(req.version());
                let body = axum::body::to_bytes(req.into_body(), 1 << 20)
                    .await
                    .unwrap();
                let t = form_urlencoded::parse(&body)
                    .find(|(k, _)| k == "TSS_JWT_MSG")
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
                let payload = open(&t, &keys().gateway.decoding()).unwrap();
                let answer = serde_json::json!({
                    "request_id": request_id_of(&payload), "status": 0, "action": "APPROVE", "error": ""
                });
                token(&key.encoding(), answer.to_string().as_bytes(), "versioned")
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let scheme = if tls.is_some() { "https" } else { "http" };
    tokio::spawn(async move {
        let service = hyper_util::service::TowerToHyperService::new(app);
        let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (http, service, tls) = (http.clone(), service.clone(), tls.clone());
            tokio::spawn(async move {
                match tls {
                    None => {
                        let _ = http.serve_connection(TokioIo::new(stream), service).await;
                    }
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                }
            });
        }
    });
    Versioned {
        url: format!("{scheme}://{addr}/v2/check"),
        seen,
    }
}

/// A CA and a server certificate for 127.0.0.1, made by openssl.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = |f: &str| dir.path().join(f).to_str().unwrap().to_owned();
        let run = |args: &[&str]| {
            let out = Command::new("openssl").args(args).output().unwrap();
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
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
            "/CN=h2-test-ca",
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
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &d("server.key"),
            "-out",
            &d("server.csr"),
            "-subj",
            "/CN=server",
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &d("server.csr"),
            "-CA",
            &d("ca.pem"),
            "-CAkey",
            &d("ca.key"),
            "-CAcreateserial",
            "-out",
            &d("server.pem"),
            "-days",
            "2",
            "-extfile",
            &d("server.ext"),
        ]);
        Pki { dir }
    }

    fn ca_file(&self) -> String {
        format!("ca_file: {}", self.dir.path().join("ca.pem").display())
    }

    /// A TLS server config offering `alpn` (most preferred first).
    fn acceptor(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
        let read = |f: &str| std::fs::read(self.dir.path().join(f)).unwrap();
        let certs = pem::parse_many(read("server.pem"))
            .unwrap()
            .into_iter()
            .map(|p| p.into_contents().into())
            .collect();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            pem::parse(read("server.key"))
                .unwrap()
                .into_contents()
                .into(),
        );
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

/// A gateway whose one server is `server`, with `extra` server lines; asks it `count` requests
/// at once and checks they are approved.
async fn ask(server: &Versioned, key: &KeyPair, extra: &str, tag: &str, count: usize) {
    let stand_in = Downstream::start("versioned", key, always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry_at(&stand_in, &server.url, extra)], "").await;
    let asked: Vec<_> = (0..count)
        .map(|i| {
            let url = gw.url();
            let id = format!("{tag}-{i}");
            tokio::spawn(async move { send(&url, &request("key_sign", &id)).await })
        })
        .collect();
    for a in asked {
        a.await.unwrap().expect(0, "APPROVE", &[]);
    }
    assert_eq!(stand_in.calls(), 0);
    gw.stop().await;
}

/// `auto` (the default) negotiates HTTP/2 by ALPN with an https server that offers it, and stays
/// on HTTP/1.1 with one that does not; `never` pins HTTP/1.1 even where h2 is offered; `always`
/// speaks HTTP/2 over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_servers_get_http2_by_alpn_unless_pinned_to_http1() {
    let pki = Pki::new();
    let k = keys();
    let ca = pki.ca_file();

    let h2 = versioned_server(&k.servers[0], Some(pki.acceptor(&[b"h2", b"http/1.1"]))).await;
    ask(&h2, &k.servers[0], &ca, "alpn-auto", 4).await;
    assert_eq!(h2.versions(), vec![Version::HTTP_2; 4], "auto over TLS");

    let h2 = versioned_server(&k.servers[0], Some(pki.acceptor(&[b"h2", b"http/1.1"]))).await;
    ask(
        &h2,
        &k.servers[0],
        &format!("{ca}\nhttp2: never"),
        "alpn-never",
        4,
    )
    .await;
    assert_eq!(
        h2.versions(),
        vec![Version::HTTP_11; 4],
        "never pins HTTP/1.1"
    );

    let h2 = versioned_server(&k.servers[0], Some(pki.acceptor(&[b"h2", b"http/1.1"]))).await;
    ask(
        &h2,
        &k.servers[0],
        &format!("{ca}\nhttp2: always"),
        "alpn-always",
        2,
    )
    .await;
    assert_eq!(h2.versions(), vec![Version::HTTP_2; 2], "always over TLS");

    let h1 = versioned_server(&k.servers[0], Some(pki.acceptor(&[b"http/1.1"]))).await;
    ask(&h1, &k.servers[0], &ca, "alpn-h1-only", 2).await;
    assert_eq!(
        h1.versions(),
        vec![Version::HTTP_11; 2],
        "auto falls back to HTTP/1.1"
    );
}

/// On plain http, `always` speaks HTTP/2 with prior knowledge (h2c); `auto` and `never` speak
/// HTTP/1.1 (nothing negotiates h2 without TLS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_servers_get_h2c_only_with_always() {
    let k = keys();
    let h2c = versioned_server(&k.servers[1], None).await;
    ask(&h2c, &k.servers[1], "http2: always", "h2c-always", 4).await;
    assert_eq!(
        h2c.versions(),
        vec![Version::HTTP_2; 4],
        "always on http is h2c"
    );

    let plain = versioned_server(&k.servers[1], None).await;
    ask(&plain, &k.servers[1], "", "h2c-auto", 2).await;
    ask(&plain, &k.servers[1], "http2: never", "h2c-never", 2).await;
    assert_eq!(plain.versions(), vec![Version::HTTP_11; 4]);
}

/// A reload that changes only `http2` builds a new client: the next request speaks the new
/// version (clients are reused across reloads only when connection settings are unchanged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_http2_takes_effect() {
    let k = keys();
    let server = versioned_server(&k.servers[2], None).await;
    let stand_in =
        Downstream::start("versioned", &k.servers[2], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry_at(&stand_in, &server.url, "http2: never")], "").await;
    send(&gw.url(), &request("key_sign", "before-reload"))
        .await
        .expect(0, "APPROVE", &[]);
    gw.write_config(&config_yaml(
        gw.addr,
        &[entry_at(&stand_in, &server.url, "http2: always")],
        "",
    ));
    let next = tss_callback_gateway::generation::Generation::reload(
        &gw.config_path,
        &gw.shared.current.load(),
    )
    .unwrap();
    gw.shared.current.store(Arc::new(next));
    send(&gw.url(), &request("key_sign", "after-reload"))
        .await
        .expect(0, "APPROVE", &[]);
    assert_eq!(server.versions(), vec![Version::HTTP_11, Version::HTTP_2]);
    gw.stop().await;
}
