//! Hostile peers: downstreams that misbehave at the TCP and HTTP level, and callers that try to
//! tie the gateway up. Each must end in a refusal (never an approval) with the contract's status,
//! with the same gateway still answering other requests promptly and its memory bounded.
//!
//! Signature-level attacks by downstreams (another server's key, alg none, HS256, a replayed
//! approval for another request_id, non-UTF-8 answers) are in decision.rs; hostile tokens and
//! payloads from the caller (10 MB bodies, 10,000 fields, two TSS_JWT_MSG fields, deep JSON, a
//! 1 MB request_id) are in inbound.rs. The last tests check what hostile peers can make the
//! gateway log, and that a full disk under the audit log lets no approval out.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::downstream::{always, Answer, Downstream};
use common::gateway::{entry, entry_at, rss_mb, Gateway};
use common::http::{complete_request, http_post_closing};
use common::keys::keys;
use common::node::{node_form, post_body, post_token, send, Reply};
use common::requests::request;
use common::tokens::{now, open, token, token_with, CallbackResponse};

/// How long a healthy request may take while something hostile is going on.
const PROMPT: Duration = Duration::from_millis(500);

// === raw peers ===

/// Reads one HTTP request (head and Content-Length body) from `s`. False if the peer left first.
async fn read_request(s: &mut TcpStream) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    let mut seen = Vec::new();
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
        if complete_request(&seen).is_some() {
            return true;
        }
    }
}

/// A raw TCP "callback server": reads each request, then hands the socket to `act`.
async fn raw_server<F, Fut>(act: F) -> String
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let act = Arc::new(act);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let act = act.clone();
            tokio::spawn(async move {
                if read_request(&mut s).await {
                    act(s).await;
                }
            });
        }
    });
    format!("http://{addr}/v2/check")
}

/// Reads until the peer closes the connection or `limit` passes. Returns what was read and
/// when the close came (None if it did not).
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, Option<Duration>) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, Some(started.elapsed())),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, None),
        }
    }
}

/// The verified CallbackResponse in a raw HTTP answer from the gateway.
fn callback_response(raw: &[u8]) -> CallbackResponse {
    let text = String::from_utf8_lossy(raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let token: String = serde_json::from_str(body.trim()).unwrap();
    serde_json::from_slice(&open(&token, &keys().gateway.decoding()).unwrap()).unwrap()
}

// === the gateway in front of a hostile server ===

/// What [`refused`] saw.
struct Refusal {
    reply: Reply,
    /// A request on the same gateway was answered while the hostile one was still pending.
    overlapped: bool,
}

/// A key_gen request, which only the well-behaved server is asked about, answered promptly.
async fn served_promptly(gw: &Gateway, id: &str) {
    let r = send(&gw.url(), &request("key_gen", id)).await;
    r.expect(0, "APPROVE", &[]);
    assert!(r.elapsed < PROMPT, "{id} took {:?}", r.elapsed);
}

/// Sends a key_sign request to a gateway whose enforcing servers are the hostile one at `url`
/// (key_sign only, plus `extra` YAML) and a well-behaved one, and checks the refusal. Meanwhile
/// and right after, requests the hostile server is not asked about are served by the same
/// gateway without waiting.
async fn refused(url: &str, extra: &str, id: &str, fragments: &[&str]) -> Refusal {
    let good = Downstream::start("good", &keys().servers[1], always(Answer::approve()), 0).await;
    // Lends its name and key to the hostile entry; it is never called itself.
    let named =
        Downstream::start("hostile", &keys().servers[0], always(Answer::approve()), 0).await;
    let hostile_extra = format!("request_types: [key_sign]\n{extra}");
    let gw = Gateway::start(
        &[entry_at(&named, url, &hostile_extra), entry(&good, "")],
        "",
    )
    .await;
    let pending = tokio::spawn({
        let (url, payload) = (gw.url(), request("key_sign", id));
        async move { send(&url, &payload).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    served_promptly(&gw, &format!("{id}-meanwhile")).await;
    let overlapped = !pending.is_finished();
    let reply = pending.await.unwrap();
    reply.expect(30, "REJECT", fragments);
    assert_eq!(reply.response.request_id, id);
    served_promptly(&gw, &format!("{id}-after")).await;
    assert_eq!(named.calls(), 0);
    Refusal { reply, overlapped }
}

// === hostile downstreams ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_accepts_and_never_answers_times_out() {
    let url = raw_server(|s| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    })
    .await;
    let r = refused(&url, "timeout_ms: 300", "never", &["hostile: timeout:"]).await;
    assert!(r.overlapped, "the gateway waited on the hostile server");
    assert!(
        r.reply.elapsed < Duration::from_millis(1000),
        "{:?}",
        r.reply.elapsed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_closes_mid_answer_is_a_transport_error() {
    let url = raw_server(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 900\r\n\r\n\"eyJhbGciOiJSUzI1NiJ9.")
            .await;
        // Closed with 878 bytes still owed.
    })
    .await;
    refused(
        &url,
        "retries: 0",
        "mid-answer",
        &["hostile: transport_error:"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_trickles_its_answer_is_cut_off_at_its_timeout() {
    // Headers at once, then the body a byte every 100 ms.
    let body = raw_server(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2000\r\n\r\n")
            .await;
        for _ in 0..100 {
            if s.write_all(b"e").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // The head itself a byte every 100 ms: the per-attempt timeout covers the head as well.
    let head = raw_server(|mut s| async move {
        for b in b"HTTP/1.1 200 OK\r\ncontent-length: 2000\r\nx-slow: "
            .iter()
            .cycle()
        {
            if s.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    for (url, id) in [(body, "trickle-body"), (head, "trickle-head")] {
        let r = refused(&url, "timeout_ms: 400", id, &["hostile: timeout:"]).await;
        assert!(
            r.overlapped,
            "{id}: the gateway waited on the hostile server"
        );
        assert!(
            r.reply.elapsed < Duration::from_millis(1200),
            "{id}: {:?}",
            r.reply.elapsed
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabyte_answers_are_refused_unread_and_memory_stays_bounded() {
    let declared = raw_server(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10485760\r\n\r\n")
            .await;
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..160 {
            if s.write_all(&chunk).await.is_err() {
                return;
            }
        }
    })
    .await;
    let chunked = raw_server(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            .await;
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..160 {
            let head = format!("{:x}\r\n", chunk.len());
            if s.write_all(head.as_bytes()).await.is_err()
                || s.write_all(&chunk).await.is_err()
                || s.write_all(b"\r\n").await.is_err()
            {
                return;
            }
        }
        let _ = s.write_all(b"0\r\n\r\n").await;
    })
    .await;
    let before = rss_mb();
    for i in 0..5 {
        refused(
            &declared,
            "",
            &format!("big-declared-{i}"),
            &["hostile: bad_response:", "above"],
        )
        .await;
        refused(
            &chunked,
            "",
            &format!("big-chunked-{i}"),
            &["hostile: bad_response:", "above"],
        )
        .await;
    }
    let grown = rss_mb() - before;
    // Ten 10 MB answers: had they been buffered, that would be 100 MB.
    assert!(grown < 40.0, "RSS grew by {grown:.1} MB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_sending_endless_headers_is_cut_off_and_memory_stays_bounded() {
    let url = raw_server(|mut s| async move {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\n").await;
        let line = format!("x-filler: {}\r\n", "a".repeat(1000));
        // 20 MB of head, never finished.
        for _ in 0..20_000 {
            if s.write_all(line.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    let before = rss_mb();
    for i in 0..3 {
        let r = refused(
            &url,
            "timeout_ms: 2000\nretries: 0",
            &format!("endless-head-{i}"),
            &["hostile: "],
        )
        .await;
        // hyper refuses a head above its buffer limit; a timeout would be correct too.
        let e = &r.reply.response.error;
        assert!(
            e.contains("hostile: transport_error:") || e.contains("hostile: timeout:"),
            "{e}"
        );
    }
    let grown = rss_mb() - before;
    assert!(grown < 40.0, "RSS grew by {grown:.1} MB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_does_not_speak_http_is_a_transport_error() {
    let url = raw_server(|mut s| async move {
        let _ = s
            .write_all(b"SSH-2.0-OpenSSH_9.6\r\n\x00\x01\xff\xfe")
            .await;
    })
    .await;
    refused(
        &url,
        "retries: 0",
        "not-http",
        &["hostile: transport_error:"],
    )
    .await;
}

/// A downstream (or anyone on a plain-http path) answering with a redirect must not steer the
/// gateway: it talks only to the configured `service_address`, and a 3xx is an `http_error`.
///
/// Observed: the callback client keeps reqwest's default redirect policy (up to 10 hops). On
/// 307/308 the gateway re-posts its signed token (valid for `token_expire_minutes`, accepted
/// by every downstream that trusts the gateway key) to the `Location`; on 301/302/303 it GETs
/// the `Location`, and the first 80 bytes of what it finds there come back in the error sent to
/// the node and written to the audit log and the log (a server-side request forgery with a
/// reflected answer). No approval results: the answer must still verify with the server's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_redirects_is_not_followed() {
    // Would approve if reached; it holds a key the gateway does not trust for `hostile`.
    let elsewhere =
        Downstream::start("elsewhere", &keys().intruder, always(Answer::approve()), 0).await;
    for code in [307u16, 308, 302, 301, 303] {
        let to = elsewhere.url();
        let url = raw_server(move |mut s| {
            let to = to.clone();
            async move {
                let head =
                    format!("HTTP/1.1 {code} Moved\r\nlocation: {to}\r\ncontent-length: 0\r\n\r\n");
                let _ = s.write_all(head.as_bytes()).await;
            }
        })
        .await;
        refused(
            &url,
            "retries: 0",
            &format!("redirect-{code}"),
            &[&format!("hostile: http_error: HTTP {code}")],
        )
        .await;
    }
    assert_eq!(
        (elsewhere.connections(), elsewhere.calls()),
        (0, 0),
        "the gateway followed a redirect"
    );
}

// === hostile callers ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_headers_slowly_is_cut_off_while_others_are_served() {
    let a = Downstream::start("a", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry(&a, "")], "").await;
    let started = Instant::now();
    // One connection that never sends a byte, one that sends its head a byte a second.
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    let silent = tokio::spawn(async move {
        read_until_closed(&mut silent, Duration::from_secs(15))
            .await
            .1
    });
    let mut slow = TcpStream::connect(gw.addr).await.unwrap();
    let head = b"POST /v2/check HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nX-Pad: ";
    let url = gw.url();
    let others = tokio::spawn(async move {
        for i in 0..8 {
            let r = send(&url, &request("key_sign", &format!("while-slow-{i}"))).await;
            r.expect(0, "APPROVE", &[]);
            assert!(r.elapsed < PROMPT, "{:?}", r.elapsed);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let mut closed_at = None;
    for &b in head.iter().cycle() {
        if started.elapsed() > Duration::from_secs(15) {
            break;
        }
        if slow.write_all(&[b]).await.is_err() {
            closed_at = Some(started.elapsed());
            break;
        }
        let mut probe = [0u8; 1];
        // A read returning 0 (or an error) means the gateway closed the connection.
        match tokio::time::timeout(Duration::from_secs(1), slow.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed_at = Some(started.elapsed());
                break;
            }
            _ => {}
        }
    }
    others.await.unwrap();
    let closed_at = closed_at.expect("the slow client was never cut off");
    // read_timeout_ms is 2 s by default, from the first byte.
    assert!(
        closed_at >= Duration::from_millis(1900) && closed_at < Duration::from_secs(8),
        "{closed_at:?}"
    );
    let silent_closed = silent
        .await
        .unwrap()
        .expect("the silent client was never cut off");
    assert!(silent_closed < Duration::from_secs(14), "{silent_closed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_idle_connections_do_not_starve_the_gateway() {
    let a = Downstream::start("a", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry(&a, "")], "").await;
    let before = rss_mb();
    let mut idle = Vec::new();
    for i in 0..400 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        if i % 2 == 1 {
            s.write_all(b"POST /v2/check HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        idle.push(tokio::spawn(async move {
            read_until_closed(&mut s, Duration::from_secs(15)).await
        }));
    }
    for i in 0..5 {
        let r = send(&gw.url(), &request("key_sign", &format!("among-idle-{i}"))).await;
        r.expect(0, "APPROVE", &[]);
        assert!(r.elapsed < PROMPT, "{:?}", r.elapsed);
    }
    let held = rss_mb() - before;
    assert!(held < 40.0, "400 idle connections cost {held:.1} MB");
    for (i, conn) in idle.into_iter().enumerate() {
        let (answer, closed) = conn.await.unwrap();
        let closed = closed.unwrap_or_else(|| panic!("idle connection {i} was never closed"));
        assert!(closed < Duration::from_secs(14), "{i}: {closed:?}");
        // Either nothing, or hyper's 408 for the half-sent head: never a callback answer.
        assert!(!answer.starts_with(b"HTTP/1.1 200"), "{i}");
    }
    send(&gw.url(), &request("key_sign", "after-idle"))
        .await
        .expect(0, "APPROVE", &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_from_a_caller_is_refused_and_the_gateway_keeps_serving() {
    let a = Downstream::start("a", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry(&a, "")], "").await;
    let mut many_headers = b"POST /v2/check HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..10_000 {
        many_headers.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
    }
    many_headers.extend_from_slice(b"\r\n");
    let mut big_header = b"POST /v2/check HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big_header.extend(std::iter::repeat_n(b'a', 1 << 20));
    big_header.extend_from_slice(b"\r\n\r\n");
    let mut long_line = b"POST /".to_vec();
    long_line.extend(std::iter::repeat_n(b'a', 1 << 20));
    long_line.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\n\r\n");
    let overflowing_chunk = b"POST /v2/check HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffffffff\r\nTSS_JWT_MSG=x\r\n0\r\n\r\n".to_vec();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("10,000 headers", many_headers),
        ("a 1 MB header", big_header),
        ("a 1 MB request line", long_line),
        ("an overflowing chunk size", overflowing_chunk),
        (
            "a TLS ClientHello on plain HTTP",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
        ),
        (
            "the HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        ),
        ("binary noise", (0..=255u8).cycle().take(4096).collect()),
    ];
    for (what, bytes) in cases {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        // The gateway may close before all of it is written.
        let _ = s.write_all(&bytes).await;
        let (answer, closed) = read_until_closed(&mut s, Duration::from_secs(3)).await;
        assert!(closed.is_some(), "{what}: the connection was left open");
        if answer.starts_with(b"HTTP/1.1 200") {
            let resp = callback_response(&answer);
            assert_ne!(resp.status, 0, "{what}: {resp:?}");
        }
        send(&gw.url(), &request("key_sign", &format!("after-{what}")))
            .await
            .expect(0, "APPROVE", &[]);
    }
    assert_eq!(a.calls(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_hangs_up_mid_decision_leaves_nothing_behind() {
    let slow = Downstream::start("slow", &keys().servers[0], always(Answer::hang()), 0).await;
    let gw = Gateway::start(&[entry(&slow, "timeout_ms: 5000")], "deadline_ms: 6000").await;
    let payload = request("key_sign", "hang-up");
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(&http_post_closing(&node_form(&payload)))
        .await
        .unwrap();
    let waited = Instant::now();
    while slow.calls() == 0 {
        assert!(waited.elapsed() < Duration::from_secs(3), "never forwarded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(gw.metric("tss_gateway_in_flight_requests"), 1.0);
    drop(s);
    // hyper notices the hang-up and drops the request, cancelling its downstream call, well
    // before that call's 5 s timeout.
    let gone = Instant::now();
    while gw.metric("tss_gateway_in_flight_requests") != 0.0 {
        assert!(
            gone.elapsed() < Duration::from_secs(1),
            "a request whose caller left is still in flight"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The node's retry of the same request is evaluated afresh, not stuck behind the
    // abandoned evaluation.
    slow.set_script(always(Answer::approve()));
    let r = send(&gw.url(), &payload).await;
    r.expect(0, "APPROVE", &[]);
    assert!(r.elapsed < PROMPT, "{:?}", r.elapsed);
}

/// A body trickled in too slowly is not waited for past `read_timeout_ms` (counted from the
/// request's first byte, not `deadline_ms`): the connection is closed unanswered, counted, and
/// nobody is called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_too_slowly_is_closed_at_read_timeout() {
    let a = Downstream::start("a", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry(&a, "")], "read_timeout_ms: 600").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"POST /v2/check HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\nTSS_JWT_MSG=eyJ")
        .await
        .unwrap();
    let started = Instant::now();
    let (mut rx, mut tx) = s.into_split();
    // A byte every 100 ms: the 1000 declared bytes would take 100 s.
    let trickle = tokio::spawn(async move {
        for _ in 0..50 {
            if tx.write_all(b"a").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), rx.read_to_end(&mut answer)).await;
    let closed = started.elapsed();
    trickle.abort();
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    assert!(closed < Duration::from_secs(4), "{closed:?}");
    assert_eq!(
        gw.metric(r#"tss_gateway_connections_refused_total{reason="read_timeout"}"#),
        1.0
    );
    assert_eq!(a.calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_bytes_are_refused_clearly() {
    let a = Downstream::start("a", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry(&a, "")], "").await;
    // In the form body itself.
    let mut body = b"TSS_JWT_MSG=".to_vec();
    body.extend_from_slice(&[0xff, 0xfe, 0x80, 0x00, 0xc3]);
    post_body(&gw.url(), body)
        .await
        .expect(20, "REJECT", &["not a JWT"]);
    // Percent-encoded non-UTF-8 in the field value.
    post_body(&gw.url(), b"TSS_JWT_MSG=%ff%fe%80.%c3.%00".to_vec())
        .await
        .expect(20, "REJECT", &["not a JWT"]);
    // Inside a validly signed package_data.
    send(&gw.url(), &[0xff, 0xfe, b'{', 0x80]).await.expect(
        10,
        "REJECT",
        &["not a CallbackRequest"],
    );
    // A request_id that is valid JSON but an unpaired surrogate.
    send(&gw.url(), br#"{"request_id": "\ud800", "request_type": 2}"#)
        .await
        .expect(10, "REJECT", &["not a CallbackRequest"]);
    assert_eq!(a.calls(), 0);
}

// === what hostile peers can make the gateway log ===

/// Log output captured in memory.
#[derive(Clone, Default)]
struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every error path hostile peers can reach, logged at `trace` for every crate, shows no token
/// and no key material. A single-threaded runtime, so that every task of the gateway, its
/// downstreams and its caller logs to this test's subscriber.
#[tokio::test]
async fn errors_from_hostile_peers_never_log_a_token_or_a_key() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
        .with_writer({
            let c = capture.clone();
            move || c.clone()
        })
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let k = keys();
    let ds = |name: &'static str, i: usize, answer: Answer| async move {
        Downstream::start(name, &k.servers[i], always(answer), 0).await
    };
    let ok = ds("ok", 0, Answer::approve()).await;
    let forged = ds("forged", 1, Answer::approve().signed_by(&k.intruder)).await;
    let stale = ds("stale", 2, Answer::approve().expired()).await;
    let broken = ds("broken", 3, Answer::bytes(500, b"internal error")).await;
    let hung = ds("hung", 0, Answer::hang()).await;
    // Lends its name and key to an address where nothing listens.
    let refused = ds("refused", 1, Answer::approve()).await;
    let nowhere = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/v2/check", l.local_addr().unwrap())
    };
    let sign_only = "request_types: [key_sign]";
    let gw = Gateway::start(
        &[
            entry(&ok, ""),
            entry(&forged, sign_only),
            entry(&stale, sign_only),
            entry(&broken, sign_only),
            entry(&hung, "request_types: [key_sign]\ntimeout_ms: 200"),
            entry_at(&refused, &nowhere, "request_types: [key_sign]\nretries: 1"),
        ],
        "",
    )
    .await;

    // A healthy request, and one every hostile server fails.
    send(&gw.url(), &request("key_gen", "log-ok"))
        .await
        .expect(0, "APPROVE", &[]);
    send(&gw.url(), &request("key_sign", "log-hostile"))
        .await
        .expect(
            30,
            "REJECT",
            &[
                "forged: bad_signature",
                "stale: bad_signature",
                "broken: http_error",
                "hung: timeout",
                "refused: transport_error",
            ],
        );
    // Inbound tokens that fail: expired, signed by another key, unsigned.
    let payload = request("key_sign", "log-inbound");
    let expired = token_with(
        &k.node.encoding(),
        jsonwebtoken::Algorithm::RS256,
        &payload,
        "tss-node",
        now() - 60,
    );
    let intruder = token(&k.intruder.encoding(), &payload, "tss-node");
    let none = format!(
        "eyJhbGciOiJub25lIn0.{}.",
        base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            b"{\"package_data\":\"e30=\",\"exp\":9999999999}"
        )
    );
    for t in [&expired, &intruder, &none] {
        post_token(&gw.url(), t).await.expect(20, "REJECT", &[]);
    }
    // A reload naming a private key where a public key belongs.
    let misconfigured = std::fs::read_to_string(&gw.config_path).unwrap().replace(
        &k.node.spki.display().to_string(),
        &k.gateway.pkcs8.display().to_string(),
    );
    gw.write_config(&misconfigured);
    assert!(
        tss_callback_gateway::ops::reload::reload(&gw.shared, &gw.config_path, "test").is_err()
    );

    let logs = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
    assert!(
        logs.contains("decision") && logs.contains("config reload refused"),
        "nothing was captured"
    );
    assert!(!logs.contains("eyJ"), "a token was logged");
    for pair in [
        &k.node,
        &k.gateway,
        &k.intruder,
        &k.servers[0],
        &k.servers[1],
    ] {
        for file in [&pair.pkcs8, &pair.pkcs1, &pair.spki] {
            let pem = std::fs::read_to_string(file).unwrap();
            for line in pem.lines().filter(|l| !l.starts_with("-----")) {
                assert!(
                    !logs.contains(line),
                    "key material of {} was logged",
                    file.display()
                );
            }
        }
    }
}

/// An audit log that cannot be written (here a full disk: `/dev/full` fails every write with
/// ENOSPC) never lets an approval out: the answer becomes a status-30 failure. Refusals are
/// still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_audit_log_never_lets_an_approval_out() {
    let a = Downstream::start("a", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry(&a, "")], "audit_log: /dev/full").await;
    send(&gw.url(), &request("key_sign", "unaudited"))
        .await
        .expect(30, "REJECT", &["audit log unavailable"]);
    post_token(&gw.url(), "garbage")
        .await
        .expect(20, "REJECT", &[]);
    assert_eq!(a.calls(), 1);
}
