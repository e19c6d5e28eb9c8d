//! Security review findings (issue 12): each test here reproduces one attack or defect against
//! the gateway over real HTTP on loopback and checks it is closed.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use common::*;
use tokio::net::TcpListener;

/// Waits (bounded) until `cond` holds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < Duration::from_secs(10), "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A payload like the node's, plus top-level `extra` members.
fn payload_with(request_id: &str, extra: &str) -> Vec<u8> {
    let base = String::from_utf8(request("key_sign", request_id)).unwrap();
    let body = base.trim_end().strip_suffix('}').unwrap();
    format!("{body},{extra}}}").into_bytes()
}

// === 1. signing oracle ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_carrying_status_or_action_is_refused_and_never_forwarded() {
    let k = keys();
    let enforcing =
        Downstream::start("enforcing", &k.servers[0], always(Answer::approve()), 0).await;
    let shadow = Downstream::start("shadow", &k.servers[1], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry(&enforcing, ""), entry(&shadow, "mode: shadow")], "").await;
    let attacks = [
        r#""status":0,"action":"APPROVE""#,
        r#""status":0"#,
        r#""action":"APPROVE""#,
        r#""Status":0,"ACTION":"APPROVE""#,
        r#""aCtIoN":"APPROVE""#,
        "\"\u{017F}tatus\":0",
        r#""\u0061ction":"APPROVE""#,
    ];
    for (i, extra) in attacks.iter().enumerate() {
        let r = send(&gw.url(), &payload_with(&format!("oracle-{i}"), extra)).await;
        r.expect(10, "REJECT", &["top-level"]);
        assert_eq!(r.response.request_id, format!("oracle-{i}"), "{extra}");
    }
    // A clean request reaches both servers: the refusals above reached neither.
    send(&gw.url(), &request("key_sign", "clean"))
        .await
        .expect(0, "APPROVE", &[]);
    eventually("the shadow call lands", || shadow.calls() == 1).await;
    assert_eq!(enforcing.calls(), 1);
    assert!(enforcing.seen().iter().all(|s| s.request_id == "clean"));
}

/// A downstream that verifies the gateway's requests with `verify` and records their tokens.
struct Recorder {
    addr: SocketAddr,
    tokens: Arc<Mutex<Vec<String>>>,
}

struct RecorderState {
    key: KeyPair,
    verify: jsonwebtoken::DecodingKey,
    tokens: Arc<Mutex<Vec<String>>>,
}

async fn recorder_check(State(s): State<Arc<RecorderState>>, body: Bytes) -> String {
    let token = form_urlencoded::parse(&body)
        .find(|(k, _)| k == "TSS_JWT_MSG")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    s.tokens.lock().unwrap().push(token.clone());
    let (status, action, id) = match open(&token, &s.verify) {
        Ok(payload) => (0, "APPROVE", request_id_of(&payload)),
        Err(_) => (20, "REJECT", String::new()),
    };
    let resp = CallbackResponse {
        request_id: id,
        status,
        action: action.into(),
        error: String::new(),
    };
    token_of(&s.key, &resp)
}

fn token_of(key: &KeyPair, resp: &CallbackResponse) -> String {
    common::token(
        &key.encoding(),
        &serde_json::to_vec(resp).unwrap(),
        "recorder",
    )
}

impl Recorder {
    async fn start(key: &KeyPair, verify: &KeyPair) -> Recorder {
        let tokens = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(RecorderState {
            key: key.clone(),
            verify: verify.decoding(),
            tokens: tokens.clone(),
        });
        let app = Router::new()
            .route("/v2/check", post(recorder_check))
            .with_state(state);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Recorder { addr, tokens }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_downstreams_are_signed_with_the_downstream_signing_key() {
    let k = keys();
    // The requests key: a pair of its own, as `keygen --name gateway-requests` makes.
    let requests = &k.servers[3];
    let rec = Recorder::start(&k.servers[0], requests).await;
    let ds = Downstream::start("unused", &k.servers[0], always(Answer::approve()), 0).await;
    let url = format!("http://{}/v2/check", rec.addr);
    let gw = Gateway::start(
        &[entry_at(&ds, &url, "")],
        &format!("downstream_signing_key: {}", requests.pkcs8.display()),
    )
    .await;
    // The node's answer verifies with the gateway key (checked by `send`).
    send(&gw.url(), &request("key_sign", "two-keys"))
        .await
        .expect(0, "APPROVE", &[]);
    gw.shared.health.check_all(&gw.shared).await;
    let tokens = rec.tokens.lock().unwrap().clone();
    assert_eq!(tokens.len(), 2, "one request and one health ping");
    for t in &tokens {
        open(t, &requests.decoding()).expect("signed with downstream_signing_key");
        assert!(
            open(t, &k.gateway.decoding()).is_err(),
            "a request token must not verify with the key the node trusts"
        );
    }
    let ready: serde_json::Value = http()
        .get(format!("http://{}/readyz", gw.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["servers"][0]["health"]["up"], true, "{ready}");
}
