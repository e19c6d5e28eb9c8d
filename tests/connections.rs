//! What anyone who can open a TCP connection to `listen` can do, and cannot (issue 19 §2,
//! CONTRACT.md sections 4, 6, 7): slow callers are closed at `read_timeout_ms` and hold no
//! `max_in_flight` slot, peers outside `allowed_clients` and connections beyond
//! `max_connections` are closed at accept, and a flood of junk tokens costs no RSA work.

mod common;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::downstream::{always, Answer, Downstream};
use common::gateway::{config_yaml, entry, Gateway};
use common::http::http;
use common::keys::keys;
use common::node::{post_token, send};
use common::requests::request;
use common::tokens::open;
use common::until;

const READ_TIMEOUT: &str = r#"tss_gateway_connections_refused_total{reason="read_timeout"}"#;
const NOT_ALLOWED: &str = r#"tss_gateway_connections_refused_total{reason="not_allowed"}"#;
const TOO_MANY: &str = r#"tss_gateway_connections_refused_total{reason="too_many_connections"}"#;

/// The head of a callback whose body is 1,000 bytes, and the first 12 of them.
const SLOW_START: &[u8] = b"POST /v2/check HTTP/1.1\r\nHost: gw\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\nTSS_JWT_MSG=";

/// Reads until the peer closes the connection or `limit` passes: what was read, and how long
/// after `since` the close came (None if it did not).
async fn read_until_closed(
    s: &mut TcpStream,
    since: Instant,
    limit: Duration,
) -> (Vec<u8>, Option<Duration>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(since.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, Some(since.elapsed())),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, None),
        }
    }
}

/// The reproduction of issue 19 §2: a thousand connections that send the headers and 12 bytes
/// of a 1,000-byte body, then nothing. They hold no `max_in_flight` slot (here only 16), so the
/// node's requests meanwhile are approved, not shed with 503; and each slow connection is closed
/// unanswered once `read_timeout_ms` has passed since its first byte, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_hold_no_slot_and_are_closed_at_read_timeout() {
    const SLOW: usize = 1000;
    let a = Downstream::start("a", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry(&a, "")], "read_timeout_ms: 3000\nmax_in_flight: 16").await;
    let mut slow = Vec::with_capacity(SLOW);
    for _ in 0..SLOW {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(SLOW_START).await.unwrap();
        let sent = Instant::now();
        slow.push(tokio::spawn(async move {
            read_until_closed(&mut s, sent, Duration::from_secs(30)).await
        }));
    }
    for i in 0..10 {
        let r = send(&gw.url(), &request("key_sign", &format!("among-slow-{i}"))).await;
        assert_eq!(r.http, 200);
        r.expect(0, "APPROVE", &[]);
    }
    assert_eq!(
        gw.metric(r#"tss_gateway_requests_total{outcome="overloaded",type="unknown"}"#),
        0.0
    );
    for (i, s) in slow.into_iter().enumerate() {
        let (answer, closed) = s.await.unwrap();
        let closed = closed.unwrap_or_else(|| panic!("slow connection {i} was never closed"));
        assert!(answer.is_empty(), "{i}: closed unanswered, got {answer:?}");
        // From its first byte, which came just before `sent`.
        assert!(
            closed >= Duration::from_millis(2500) && closed < Duration::from_secs(20),
            "{i}: {closed:?}"
        );
    }
    assert_eq!(gw.metric(READ_TIMEOUT), SLOW as f64);
    assert_eq!(a.calls(), 10, "no slow request reached a server");
    send(&gw.url(), &request("key_sign", "after-slow"))
        .await
        .expect(0, "APPROVE", &[]);
    gw.stop().await;
}

/// The clock starts at a request's first byte: a kept-alive connection that sat idle between two
/// requests (longer than `read_timeout_ms`, less than the idle limit) still gets its whole
/// `read_timeout_ms` for the next one; headers sent slowly are cut off like a slow body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_timeout_counts_from_the_first_byte_not_the_idle_time_before() {
    let a = Downstream::start("a", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry(&a, "")], "read_timeout_ms: 1000").await;
    let client = http();
    for i in 0..2 {
        let r = client
            .post(gw.url())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(common::node::node_form(&request(
                "key_sign",
                &format!("kept-{i}"),
            )))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        // Idle longer than read_timeout_ms on the kept-alive connection.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    assert_eq!(gw.metric(READ_TIMEOUT), 0.0);
    assert_eq!(a.calls(), 2);

    // Headers a byte at a time, 50 ms apart: cut off at about a second.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let started = Instant::now();
    let mut closed = None;
    for &b in SLOW_START.iter().cycle().take(200) {
        if s.write_all(&[b]).await.is_err() {
            closed = Some(started.elapsed());
            break;
        }
        let mut probe = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(50), s.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = Some(started.elapsed());
                break;
            }
            _ => {}
        }
    }
    let closed = closed.expect("slow headers were never cut off");
    assert!(
        closed >= Duration::from_millis(900) && closed < Duration::from_secs(8),
        "{closed:?}"
    );
    until(30, "the slow head is counted", || {
        gw.metric(READ_TIMEOUT) == 1.0
    })
    .await;
    gw.stop().await;
}

/// A caller that asks for `100 Continue` gets it, and its body is still timed from the
/// request's first byte: the interim answer is not the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_after_100_continue_is_closed_at_read_timeout() {
    let a = Downstream::start("a", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry(&a, "")], "read_timeout_ms: 1000").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let started = Instant::now();
    s.write_all(b"POST /v2/check HTTP/1.1\r\nHost: gw\r\nContent-Type: application/x-www-form-urlencoded\r\nExpect: 100-continue\r\nContent-Length: 1000\r\n\r\n")
        .await
        .unwrap();
    let mut interim = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut interim))
        .await
        .expect("100 Continue")
        .unwrap();
    assert!(
        interim[..n].starts_with(b"HTTP/1.1 100"),
        "{:?}",
        &interim[..n]
    );
    s.write_all(b"TSS_JWT_MSG=").await.unwrap();
    let (answer, closed) = read_until_closed(&mut s, started, Duration::from_secs(30)).await;
    let closed = closed.expect("never closed");
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    assert!(
        closed >= Duration::from_millis(900) && closed < Duration::from_secs(15),
        "{closed:?}"
    );
    until(30, "counted", || gw.metric(READ_TIMEOUT) == 1.0).await;
    assert_eq!(a.calls(), 0);
    gw.stop().await;
}

/// `allowed_clients`: a peer outside every block is closed at accept, before any HTTP, and
/// counted; a peer inside one is served. IPv4 and IPv6 blocks mix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_outside_allowed_clients_is_closed_at_accept_and_counted() {
    let a = Downstream::start("a", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(
        &[entry(&a, "")],
        "allowed_clients: [10.0.0.0/8, \"fd00::/8\"]",
    )
    .await;
    for i in 0..3 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        // The gateway may have closed before this is written.
        let _ = s
            .write_all(&common::http::http_post(b"TSS_JWT_MSG=x"))
            .await;
        let (answer, closed) =
            read_until_closed(&mut s, Instant::now(), Duration::from_secs(10)).await;
        assert!(closed.is_some(), "{i}: left open");
        assert!(answer.is_empty(), "{i}: answered {answer:?}");
    }
    assert_eq!(gw.metric(NOT_ALLOWED), 3.0);
    assert_eq!(a.calls(), 0);

    // Loopback allowed (a single address is a block of one): served.
    let yaml = config_yaml(
        gw.addr,
        &[entry(&a, "")],
        "allowed_clients: [10.0.0.0/8, \"::1\", 127.0.0.1]",
    );
    gw.reload_with(&yaml);
    send(&gw.url(), &request("key_sign", "allowed"))
        .await
        .expect(0, "APPROVE", &[]);
    assert_eq!(gw.metric(NOT_ALLOWED), 3.0);
    gw.stop().await;
}

/// An entry that is no CIDR block is refused, naming its place in the list.
#[test]
fn a_bad_allowed_clients_entry_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.yaml");
    let k = keys();
    for (list, field) in [
        ("[10.0.0.0/8, 10.0.0.0/33]", "allowed_clients[1]"),
        ("[nowhere]", "allowed_clients[0]"),
        (
            "[10.0.0.0/8, \"fd00::/8\", \"fd00::/129\"]",
            "allowed_clients[2]",
        ),
    ] {
        std::fs::write(
            &path,
            format!(
                "tss_node_public_key: {}\ngateway_private_key: {}\nembedded_risk_control_rules: {{ enable: true }}\nallowed_clients: {list}\n",
                k.node.spki.display(),
                k.gateway.pkcs8.display()
            ),
        )
        .unwrap();
        let err = tss_callback_gateway::config::Config::load(&path)
            .expect_err(list)
            .to_string();
        assert!(err.contains(field), "{field} not in {err}");
    }
}

/// `max_connections`: beyond it a new connection is closed at accept (counted), so a flood from
/// an allowed address cannot use up descriptors; once connections close, new ones are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_closed_at_accept() {
    let a = Downstream::start("a", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(
        &[entry(&a, "")],
        "max_connections: 4\nread_timeout_ms: 60000",
    )
    .await;
    // Four connections that send nothing hold every place.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    for i in 0..3 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        let _ = s.write_all(b"GET /ping HTTP/1.1\r\nHost: gw\r\n\r\n").await;
        let (answer, closed) =
            read_until_closed(&mut s, Instant::now(), Duration::from_secs(10)).await;
        assert!(closed.is_some() && answer.is_empty(), "{i}: {answer:?}");
    }
    assert_eq!(gw.metric(TOO_MANY), 3.0);
    drop(held);
    // The gateway sees the four close at its next read: event-based, not timed.
    let url = gw.url();
    for attempt in 0.. {
        let sent = http()
            .post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(common::node::node_form(&request("key_sign", "after")))
            .send()
            .await;
        if let Ok(r) = sent {
            assert_eq!(r.status().as_u16(), 200);
            break;
        }
        assert!(attempt < 500, "never served again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.stop().await;
}

/// A status-20 answer costs no RSA work (CONTRACT.md section 6): junk tokens, minutes apart or
/// not, get the very same token (signed in advance, renewed only after half its lifetime), which
/// verifies with the gateway's key and names the kind of refusal. Were each one signed, the
/// tokens a second apart would differ in `exp`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_tokens_get_an_answer_signed_in_advance() {
    let a = Downstream::start("a", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry(&a, "")], "").await;
    let raw = |junk: String| {
        let url = gw.url();
        async move {
            http()
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("TSS_JWT_MSG={junk}"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let first = raw("junk-0".into()).await;
    let mut answers = Vec::new();
    for i in 1..40 {
        answers.push(raw(format!("junk-{i}")).await);
        if i % 10 == 0 {
            // Into the next second: a token signed now would carry another `exp`.
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
    }
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(answer, &first, "junk answer {} differs", i + 1);
    }
    let token: String = serde_json::from_str(&first).unwrap();
    let payload = open(&token, &keys().gateway.decoding()).expect("signed by the gateway");
    let response: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(response["status"], 20);
    assert_eq!(response["action"], "REJECT");
    assert_eq!(response["request_id"], "");
    assert_eq!(response["error"], "token is not a JWT");
    // Another kind of refusal has its own fixed text.
    post_token(
        &gw.url(),
        &common::tokens::token(&keys().intruder.encoding(), b"{}", "x"),
    )
    .await
    .expect(20, "REJECT", &["signature does not verify"]);
    assert_eq!(
        gw.metric(r#"tss_gateway_requests_total{outcome="invalid_token",type="unknown"}"#),
        41.0
    );
    assert_eq!(a.calls(), 0);
    gw.stop().await;
}
