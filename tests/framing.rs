//! HTTP/1.1 framing of downstream answers, as real servers send them: chunked (with extensions and
//! trailers), close-delimited, after a 1xx interim answer, on keep-alive connections the server
//! closes while they are idle. Every answer here is validly signed, so anything but an approval
//! is the gateway's client misreading the framing; broken framing must never be an approval.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::downstream::{always, Answer, Downstream};
use common::gateway::{entry_at, Gateway};
use common::http::complete_request;
use common::keys::keys;
use common::node::send;
use common::requests::{request, request_id_of};
use common::tokens::{open, token, CallbackResponse};

/// What the raw server does after writing an answer.
#[derive(Clone, Copy)]
enum Then {
    KeepOpen,
    Close,
    CloseAfter(Duration),
}

/// Reads one request; returns its body, or None if the peer left.
async fn read_request(s: &mut TcpStream, pending: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut buf = [0u8; 8192];
    loop {
        if let Some((start, end)) = complete_request(pending) {
            let body = pending[start..end].to_vec();
            pending.drain(..end);
            return Some(body);
        }
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
}

/// A signed approval of the request in `form` (the gateway's token), by server key 0.
fn approval(form: &[u8]) -> String {
    let sent = form_urlencoded::parse(form)
        .find(|(k, _)| k == "TSS_JWT_MSG")
        .map(|(_, v)| v.into_owned())
        .expect("the gateway sent TSS_JWT_MSG");
    let payload = open(&sent, &keys().gateway.decoding()).expect("the gateway's token verifies");
    let answer = CallbackResponse {
        request_id: request_id_of(&payload),
        status: 0,
        action: "APPROVE".into(),
        error: String::new(),
    };
    let json = serde_json::to_vec(&answer).unwrap();
    token(&keys().servers[0].encoding(), &json, "framing")
}

/// A raw callback server answering every request with `frame(token)` bytes, then `after`.
/// Returns its URL and its count of accepted connections.
async fn raw_server(frame: fn(&str) -> Vec<u8>, after: Then) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut pending = Vec::new();
                while let Some(form) = read_request(&mut s, &mut pending).await {
                    let bytes = frame(&approval(&form));
                    if s.write_all(&bytes).await.is_err() {
                        return;
                    }
                    match after {
                        Then::KeepOpen => {}
                        Then::Close => return,
                        Then::CloseAfter(d) => {
                            tokio::time::sleep(d).await;
                            return;
                        }
                    }
                }
            });
        }
    });
    (format!("http://{addr}/v2/check"), connections)
}

/// A gateway whose only server is the raw one (named and keyed as server 0).
async fn gateway_for(url: &str) -> (Gateway, Downstream) {
    let named = Downstream::start("raw", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry_at(&named, url, "timeout_ms: 2000\nretries: 0")], "").await;
    (gw, named)
}

async fn approved(gw: &Gateway, id: &str) {
    send(&gw.url(), &request("key_sign", id))
        .await
        .expect(0, "APPROVE", &[]);
}

async fn refused(gw: &Gateway, id: &str) {
    let r = send(&gw.url(), &request("key_sign", id)).await;
    assert!(!r.approved(), "{id} was approved: {:?}", r.response);
    assert_eq!(r.response.status, 30, "{:?}", r.response);
}

fn with_length(token: &str) -> Vec<u8> {
    let body = format!("\"{token}\"");
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_answers_with_extensions_and_trailers_are_read() {
    fn frame(token: &str) -> Vec<u8> {
        let body = format!("\"{token}\"");
        let (a, b) = body.split_at(body.len() / 3);
        format!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{:x};ext=1\r\n{a}\r\n{:X}\r\n{b}\r\n0\r\nx-trailer: yes\r\n\r\n",
            a.len(),
            b.len()
        )
        .into_bytes()
    }
    let (url, conns) = raw_server(frame, Then::KeepOpen).await;
    let (gw, _named) = gateway_for(&url).await;
    for i in 0..3 {
        approved(&gw, &format!("chunked-{i}")).await;
    }
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "the connection was not reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delimited_answers_are_read_to_the_end() {
    fn frame(token: &str) -> Vec<u8> {
        format!("HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n{token}").into_bytes()
    }
    let (url, conns) = raw_server(frame, Then::Close).await;
    let (gw, _named) = gateway_for(&url).await;
    approved(&gw, "close-1").await;
    approved(&gw, "close-2").await;
    assert_eq!(conns.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_answers_without_keep_alive_are_read() {
    fn frame(token: &str) -> Vec<u8> {
        format!("HTTP/1.0 200 OK\r\n\r\n{token}").into_bytes()
    }
    let (url, _) = raw_server(frame, Then::Close).await;
    let (gw, _named) = gateway_for(&url).await;
    approved(&gw, "http10").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interim_100_continue_is_skipped() {
    fn frame(token: &str) -> Vec<u8> {
        let mut v = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
        v.extend(with_length(token));
        v
    }
    let (url, _) = raw_server(frame, Then::KeepOpen).await;
    let (gw, _named) = gateway_for(&url).await;
    approved(&gw, "continue").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_the_server_closed_while_idle_is_replaced() {
    // The server promises keep-alive but closes each connection 50 ms after answering.
    let (url, conns) = raw_server(with_length, Then::CloseAfter(Duration::from_millis(50))).await;
    let (gw, _named) = gateway_for(&url).await;
    approved(&gw, "stale-1").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    approved(&gw, "stale-2").await;
    assert_eq!(conns.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_the_answer_are_not_taken_as_the_next_answer() {
    // A second, pipelined answer follows the first on the same connection: if the connection were
    // reused, the next request would read a stale (wrong request_id) answer.
    fn frame(token: &str) -> Vec<u8> {
        let mut v = with_length(token);
        v.extend(with_length(token));
        v
    }
    let (url, conns) = raw_server(frame, Then::KeepOpen).await;
    let (gw, _named) = gateway_for(&url).await;
    approved(&gw, "extra-1").await;
    approved(&gw, "extra-2").await;
    assert_eq!(
        conns.load(Ordering::SeqCst),
        2,
        "a connection with leftover bytes was reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_framing_is_never_an_approval() {
    fn conflicting_lengths(token: &str) -> Vec<u8> {
        let body = format!("\"{token}\"");
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-length: 5\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
    fn bad_chunk_size(token: &str) -> Vec<u8> {
        format!("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{token}\r\n0\r\n\r\n")
            .into_bytes()
    }
    fn short_chunk(token: &str) -> Vec<u8> {
        // Declares more than it sends, then closes.
        format!("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nffff\r\n{token}").into_bytes()
    }
    for (name, frame) in [
        ("lengths", conflicting_lengths as fn(&str) -> Vec<u8>),
        ("chunk-size", bad_chunk_size),
        ("short-chunk", short_chunk),
    ] {
        let (url, _) = raw_server(frame, Then::Close).await;
        let (gw, _named) = gateway_for(&url).await;
        refused(&gw, &format!("broken-{name}")).await;
    }
}
