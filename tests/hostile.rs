//! Hostile peers: downstreams that misbehave at the TCP and HTTP level, and callers that try to
//! tie the gateway up. Each must end in a refusal (never an approval), with the gateway still
//! serving others and its memory bounded. (Signature-level attacks are in decision.rs and
//! inbound.rs.)

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A raw TCP "callback server" that reads the request and then does `act` with the socket.
async fn raw_server<F, Fut>(act: F) -> String
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let act = std::sync::Arc::new(act);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let act = act.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                // Read until the end of the (small) request.
                let mut seen = Vec::new();
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    if let Some(i) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&seen[..i]).to_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if seen.len() >= i + 4 + len {
                            break;
                        }
                    }
                }
                act(s).await;
            });
        }
    });
    format!("http://{addr}/v2/check")
}

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    kb / 1024.0
}

/// Runs `request` against a gateway whose only enforcing server is the hostile one at `url`,
/// checks the refusal, and checks that a healthy gateway request is served meanwhile.
async fn refused(url: &str, extra: &str, id: &str, fragments: &[&str]) -> Reply {
    let good = Downstream::start("good", &keys().servers[1], always(Answer::approve()), 0).await;
    let hostile =
        Downstream::start("hostile", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry_at(&hostile, url, extra), entry(&good, "")], "").await;
    // Meanwhile a request that the hostile server is not asked about is answered promptly.
    let other = Gateway::start(&[entry(&good, "")], "").await;
    let gw_url = gw.url();
    let id_owned = id.to_owned();
    let pending = tokio::spawn(async move { send(&gw_url, &request("key_sign", &id_owned)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = send(&other.url(), &request("key_sign", &format!("{id}-other"))).await;
    r.expect(0, "APPROVE", &[]);
    assert!(r.elapsed < Duration::from_millis(500), "{:?}", r.elapsed);
    let reply = pending.await.unwrap();
    reply.expect(30, "REJECT", fragments);
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_accepts_and_never_answers_times_out() {
    let url = raw_server(|s| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    })
    .await;
    let r = refused(&url, "timeout_ms: 300", "never", &["hostile: timeout"]).await;
    assert!(r.elapsed < Duration::from_millis(1000), "{:?}", r.elapsed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_closes_mid_answer_is_a_transport_error() {
    let url = raw_server(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 900\r\n\r\n\"eyJhbGciOiJSUzI1NiJ9.")
            .await;
        // Closed with 880 bytes still owed.
    })
    .await;
    refused(
        &url,
        "retries: 0",
        "mid-answer",
        &["hostile: transport_error"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_trickles_its_answer_is_cut_off_at_its_timeout() {
    let url = raw_server(|mut s| async move {
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
    let r = refused(&url, "timeout_ms: 400", "trickle", &["hostile: timeout"]).await;
    assert!(r.elapsed < Duration::from_millis(1200), "{:?}", r.elapsed);
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
            &["hostile: bad_response", "above"],
        )
        .await;
        refused(
            &chunked,
            "",
            &format!("big-chunked-{i}"),
            &["hostile: bad_response", "above"],
        )
        .await;
    }
    let grown = rss_mb() - before;
    // Ten 10 MB answers: had they been buffered, that would be 100 MB.
    assert!(grown < 40.0, "RSS grew by {grown:.1} MB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_headers_slowly_is_cut_off_while_others_are_served() {
    let a = Downstream::start("a", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry(&a, "")], "").await;
    let mut slow = TcpStream::connect(gw.addr).await.unwrap();
    let started = Instant::now();
    let header = b"POST /v2/check HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n";
    let url = gw.url();
    let others = tokio::spawn(async move {
        for i in 0..5 {
            send(&url, &request("key_sign", &format!("while-slow-{i}")))
                .await
                .expect(0, "APPROVE", &[]);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let mut closed_at = None;
    for &b in header.iter().cycle().take(40) {
        if slow.write_all(&[b]).await.is_err() {
            closed_at = Some(started.elapsed());
            break;
        }
        let mut probe = [0u8; 1];
        // A read returning 0 (or an error) means the gateway closed the connection.
        match tokio::time::timeout(Duration::from_millis(400), slow.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed_at = Some(started.elapsed());
                break;
            }
            _ => {}
        }
    }
    others.await.unwrap();
    let closed_at = closed_at.expect("the slow client was never cut off");
    assert!(
        closed_at >= Duration::from_secs(9) && closed_at < Duration::from_secs(14),
        "{closed_at:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_too_slowly_is_refused_at_the_deadline() {
    let a = Downstream::start("a", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry(&a, "timeout_ms: 500")], "deadline_ms: 600").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"POST /v2/check HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\nTSS_JWT_MSG=eyJ")
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    let token: String = serde_json::from_str(body.trim()).unwrap();
    let resp: CallbackResponse =
        serde_json::from_slice(&open(&token, &keys().gateway.decoding()).unwrap()).unwrap();
    assert_eq!((resp.status, resp.action.as_str()), (10, "REJECT"));
    assert!(resp.error.contains("deadline"), "{}", resp.error);
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
    // Inside a validly signed package_data.
    send(&gw.url(), &[0xff, 0xfe, b'{', 0x80]).await.expect(
        10,
        "REJECT",
        &["not a CallbackRequest"],
    );
    assert_eq!(a.calls(), 0);
}
