//! HTTP/2 to downstreams (`http2: auto | always | never`, CONTRACT.md section 4), against a real
//! HTTP/2 server (hyper's, which speaks HTTP/1.1 too) over TLS with ALPN and over plain TCP (h2c).
//! The server records the HTTP version of every request it was sent.

mod common;

use std::sync::{Arc, Mutex};

use axum::http::Version;
use tokio::net::TcpListener;

use common::downstream::{always, serve, Answer, Downstream, Versions};
use common::gateway::{config_yaml, entry_at, Gateway};
use common::keys::{keys, KeyPair};
use common::node::send;
use common::pki::Pki;
use common::requests::{request, request_id_of};
use common::tokens::{form_token, open, token};

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
                let payload = open(&form_token(&body), &keys().gateway.decoding()).unwrap();
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
    serve(listener, app, Versions::Http1And2, tls, 0);
    Versioned {
        url: format!("{scheme}://{addr}/v2/check"),
        seen,
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
    let offering_h2 = || Some(pki.acceptor_offering(&[b"h2", b"http/1.1"]));

    let h2 = versioned_server(&k.servers[0], offering_h2()).await;
    ask(&h2, &k.servers[0], &ca, "alpn-auto", 4).await;
    assert_eq!(h2.versions(), vec![Version::HTTP_2; 4], "auto over TLS");

    let h2 = versioned_server(&k.servers[0], offering_h2()).await;
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

    let h2 = versioned_server(&k.servers[0], offering_h2()).await;
    ask(
        &h2,
        &k.servers[0],
        &format!("{ca}\nhttp2: always"),
        "alpn-always",
        2,
    )
    .await;
    assert_eq!(h2.versions(), vec![Version::HTTP_2; 2], "always over TLS");

    let h1 = versioned_server(&k.servers[0], Some(pki.acceptor_offering(&[b"http/1.1"]))).await;
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
    gw.reload_with(&config_yaml(
        gw.addr,
        &[entry_at(&stand_in, &server.url, "http2: always")],
        "",
    ));
    send(&gw.url(), &request("key_sign", "after-reload"))
        .await
        .expect(0, "APPROVE", &[]);
    assert_eq!(server.versions(), vec![Version::HTTP_11, Version::HTTP_2]);
    gw.stop().await;
}
