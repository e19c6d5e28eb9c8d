//! Bounded under overload (issue 13, CONTRACT.md sections 4, 6, 7), and what running Cobo's real
//! callback servers taught: a Ping answered without `action`, a short deadline without
//! `timeout_ms`, and a client that sends a too-large body whole before reading.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_tss-callback-gateway");

/// A signed CallbackResponse of exactly these JSON fields, as `key` signs it (raw token body).
fn signed_body(key: &KeyPair, fields: serde_json::Value, iss: &str) -> Vec<u8> {
    token(&key.encoding(), fields.to_string().as_bytes(), iss).into_bytes()
}

/// The signed answer of an HTTP/1.1 response in `raw`: (HTTP status, CallbackResponse).
fn parse_answer(raw: &[u8]) -> (u16, CallbackResponse) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer in {text:?}"));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let t: String = serde_json::from_str(body.trim())
        .unwrap_or_else(|e| panic!("body {body:?} is not a JSON string: {e}"));
    let payload =
        open(&t, &keys().gateway.decoding()).expect("the answer is signed by the gateway");
    (status, serde_json::from_slice(&payload).unwrap())
}

/// Reads one HTTP/1.1 answer with a Content-Length body from `s`.
async fn read_answer(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    for _ in 0..10_000 {
        if let Some(i) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..i]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if out.len() >= i + 4 + len {
                return out;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
            .await
            .expect("the gateway answers")
            .unwrap_or_else(|e| panic!("reading the answer failed: {e}"));
        assert!(n > 0, "connection closed before a whole answer: {out:?}");
        out.extend_from_slice(&buf[..n]);
    }
    panic!("answer never completed");
}

// === findings from real Cobo servers ===

/// Cobo's v1 Node.js example answers a Ping with status 0 and no `action`: healthy for a Ping
/// (in requests and in health checks); for any other type a missing `action` is `bad_response`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_answered_without_action_is_healthy_and_nothing_else_is() {
    let k = keys();
    let key = k.servers[0].clone();
    let node_style: Script = Arc::new(move |seen: &Seen| {
        Answer::bytes(
            200,
            &signed_body(
                &key,
                serde_json::json!({"request_id": seen.request_id, "status": 0}),
                "node-v1",
            ),
        )
    });
    let ds = Downstream::start("node-v1", &k.servers[0], node_style, 0).await;
    let gw = Gateway::start(&[entry(&ds, "")], "health_check_interval_ms: 50").await;

    send(&gw.url(), &request("ping", "ping-no-action"))
        .await
        .expect(0, "APPROVE", &[]);
    send(&gw.url(), &request("key_sign", "sign-no-action"))
        .await
        .expect(30, "REJECT", &["node-v1: bad_response", "without action"]);
    assert_eq!(
        gw.metric(
            r#"tss_gateway_downstream_requests_total{outcome="bad_response",server="node-v1"}"#
        ),
        1.0
    );
    // The health checker's Ping gets the same answer and counts the server up.
    let series = r#"tss_gateway_downstream_up{server="node-v1"}"#;
    let mut up = 0.0;
    for _ in 0..200 {
        up = gw.metric(series);
        if up == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(up, 1.0, "health pings answered without action count as up");
    gw.stop().await;
}

/// `deadline_ms: 4000` without `timeout_ms` loads (the default becomes 4000); a `timeout_ms`
/// the user wrote above the deadline is still refused, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_deadline_without_timeout_ms_loads() {
    let k = keys();
    let ds = Downstream::start("short", &k.servers[1], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry(&ds, "")], "deadline_ms: 4000").await;
    assert_eq!(
        gw.shared.runtime.load().downstreams[0].timeout,
        Duration::from_millis(4000)
    );
    send(&gw.url(), &request("key_sign", "short-deadline"))
        .await
        .expect(0, "APPROVE", &[]);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    let check = |yaml: String| {
        std::fs::write(&path, yaml).unwrap();
        Command::new(BIN)
            .args(["check-config", "-c", path.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let ok = check(config_yaml(gw.addr, &[entry(&ds, "")], "deadline_ms: 4000"));
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    let refused = check(config_yaml(
        gw.addr,
        &[entry(&ds, "timeout_ms: 5000")],
        "deadline_ms: 4000",
    ));
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("callback_servers[0].timeout_ms")
            && err.contains("5000 is above deadline_ms 4000"),
        "{err}"
    );
    gw.stop().await;
}

/// A client that writes a 12 MB body whole before reading (default `max_body_bytes` 1 MiB) reads
/// the signed status-10 answer, with the length declared and chunked; nobody is called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_a_too_large_body_whole_reads_the_status_10_answer() {
    let k = keys();
    let ds = Downstream::start("big", &k.servers[2], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry(&ds, "")], "").await;
    let body = vec![b'a'; 12 << 20];

    let mut declared = format!(
        "POST /v2/check HTTP/1.1\r\nHost: gw\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    declared.extend_from_slice(&body);

    let mut chunked = b"POST /v2/check HTTP/1.1\r\nHost: gw\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for piece in body.chunks(64 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");

    for (how, request) in [("declared", declared), ("chunked", chunked)] {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(&request)
            .await
            .unwrap_or_else(|e| panic!("{how}: the gateway stopped reading the body: {e}"));
        let (http, answer) = parse_answer(&read_answer(&mut s).await);
        assert_eq!(http, 200, "{how}");
        assert_eq!(
            (answer.status, answer.action.as_str()),
            (10, "REJECT"),
            "{how}"
        );
        assert!(answer.error.contains("max_body_bytes"), "{how}: {answer:?}");
    }
    assert_eq!(ds.calls(), 0);
    // The gateway keeps serving.
    send(&gw.url(), &request("key_sign", "after-12mb"))
        .await
        .expect(0, "APPROVE", &[]);
    gw.stop().await;
}
