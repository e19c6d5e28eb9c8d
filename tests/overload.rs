//! Bounded under overload (issue 13, CONTRACT.md sections 4, 6, 7), and what running Cobo's real
//! callback servers taught: a Ping answered without `action`, a short deadline without
//! `timeout_ms`, and a client that sends a too-large body whole before reading.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::downstream::{always, Answer, Downstream, Script, Seen};
use common::gateway::{config_yaml, entry, entry_at, metric_value, Gateway, BIN};
use common::http::http;
use common::keys::{keys, KeyPair};
use common::node::{node_form, send};
use common::requests::{request, request_id_of};
use common::tokens::{open, token, CallbackResponse};
use common::until;

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
    let series = r#"tss_gateway_downstream_up{mode="enforce",server="node-v1"}"#;
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
        gw.shared.current.load().downstreams[0].timeout,
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

// === admission control ===

/// A downstream that approves every request after `delay`, counting how many it holds at once.
struct Counting {
    url: String,
    now: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
}

async fn counting_downstream(key: &KeyPair, name: &str, delay: Duration) -> Counting {
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let (n, p, c, key, name) = (
        now.clone(),
        peak.clone(),
        calls.clone(),
        key.clone(),
        name.to_owned(),
    );
    let app = axum::Router::new().route(
        "/v2/check",
        axum::routing::post(move |body: axum::body::Bytes| {
            let (n, p, c, key, name) = (n.clone(), p.clone(), c.clone(), key.clone(), name.clone());
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                let held = n.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(held, Ordering::SeqCst);
                let t = form_urlencoded::parse(&body)
                    .find(|(k, _)| k == "TSS_JWT_MSG")
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
                let payload = open(&t, &keys().gateway.decoding()).unwrap();
                let id = request_id_of(&payload);
                tokio::time::sleep(delay).await;
                n.fetch_sub(1, Ordering::SeqCst);
                signed_body(
                    &key,
                    serde_json::json!({"request_id": id, "status": 0, "action": "APPROVE", "error": ""}),
                    &name,
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v2/check", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Counting {
        url,
        now,
        peak,
        calls,
    }
}

/// Beyond `max_in_flight`, a request is answered at once with HTTP 503 and `Retry-After`: no
/// token, its body never read (it need not even arrive), nobody called, counted as
/// `outcome="overloaded"`. Once a place is free, requests are decided again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_in_flight_requests_get_503_unread_and_unsigned() {
    let k = keys();
    let slow = counting_downstream(&k.servers[0], "slow", Duration::from_millis(1500)).await;
    let stand_in = Downstream::start("slow", &k.servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry_at(&stand_in, &slow.url, "")], "max_in_flight: 2").await;
    let overloaded = r#"tss_gateway_requests_total{outcome="overloaded",type="unknown"}"#;
    assert!(
        gw.shared.metrics.render().contains(overloaded),
        "the overloaded series exists from the start"
    );

    let admitted: Vec<_> = (0..2)
        .map(|i| {
            let url = gw.url();
            tokio::spawn(
                async move { send(&url, &request("key_sign", &format!("held-{i}"))).await },
            )
        })
        .collect();
    until(10, "both requests reach the server", || {
        slow.now.load(Ordering::SeqCst) == 2
    })
    .await;

    // A well-formed request: 503, Retry-After, a body that is no token.
    let resp = http()
        .post(gw.url())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(node_form(&request("key_sign", "shed")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert!(
        resp.headers().contains_key("retry-after"),
        "{:?}",
        resp.headers()
    );
    let text = resp.text().await.unwrap();
    assert!(
        serde_json::from_str::<String>(&text).is_err() && !text.contains("eyJ"),
        "a 503 carries no token: {text:?}"
    );
    // A request whose body never comes is answered all the same: nothing of it is read.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"POST /v2/check HTTP/1.1\r\nHost: gw\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 5000\r\n\r\n")
        .await
        .unwrap();
    let mut head = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut head))
        .await
        .expect("answered without the body")
        .unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_lowercase();
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert!(head.contains("retry-after:"), "{head}");

    assert_eq!(gw.metric(overloaded), 2.0);
    assert_eq!(
        slow.calls.load(Ordering::SeqCst),
        2,
        "shed requests call nobody"
    );
    for a in admitted {
        a.await.unwrap().expect(0, "APPROVE", &[]);
    }
    send(&gw.url(), &request("key_sign", "after-the-flood"))
        .await
        .expect(0, "APPROVE", &[]);
    assert_eq!(gw.shared.admission.in_flight(), 0);
    gw.stop().await;
}

/// A flood beyond `max_in_flight` while the admitted requests hold their places (their RSA work
/// runs on the bounded signing pool, not on the threads that accept and shed): every shed
/// request gets its 503 while the admitted ones are still held by the downstream, and once it
/// answers every admitted one is approved. The downstream holds until released, so nothing here
/// depends on timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_shed_while_admitted_requests_are_held() {
    const ADMITTED: usize = 8;
    const FLOOD: usize = 200;
    let k = keys();
    let (release, held) = tokio::sync::watch::channel(false);
    let waiting = Arc::new(AtomicUsize::new(0));
    let app = {
        let (key, waiting) = (k.servers[0].clone(), waiting.clone());
        axum::Router::new().route(
            "/v2/check",
            axum::routing::post(move |body: axum::body::Bytes| {
                let (key, waiting, mut held) = (key.clone(), waiting.clone(), held.clone());
                async move {
                    let t = form_urlencoded::parse(&body)
                        .find(|(k, _)| k == "TSS_JWT_MSG")
                        .map(|(_, v)| v.into_owned())
                        .unwrap_or_default();
                    let id = request_id_of(&open(&t, &keys().gateway.decoding()).unwrap());
                    waiting.fetch_add(1, Ordering::SeqCst);
                    let _ = held.wait_for(|released| *released).await;
                    signed_body(
                        &key,
                        serde_json::json!({"request_id": id, "status": 0, "action": "APPROVE", "error": ""}),
                        "held",
                    )
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v2/check", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let stand_in = Downstream::start("held", &k.servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(
        &[entry_at(&stand_in, &url, "timeout_ms: 60000\n")],
        &format!("max_in_flight: {ADMITTED}\ndeadline_ms: 60000"),
    )
    .await;

    let admitted: Vec<_> = (0..ADMITTED)
        .map(|i| {
            let url = gw.url();
            tokio::spawn(async move { send(&url, &request("key_sign", &format!("in-{i}"))).await })
        })
        .collect();
    until(10, "every admitted request reaches the server", || {
        waiting.load(Ordering::SeqCst) == ADMITTED
    })
    .await;

    let c = http();
    let shed: Vec<_> = (0..FLOOD)
        .map(|i| {
            let (c, url) = (c.clone(), gw.url());
            tokio::spawn(async move {
                c.post(url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(node_form(&request("key_sign", &format!("flood-{i}"))))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    for s in shed {
        assert_eq!(
            s.await.unwrap().expect("every flood request is answered"),
            503
        );
    }
    assert_eq!(
        waiting.load(Ordering::SeqCst),
        ADMITTED,
        "all 503s arrived while the admitted requests were held, and none reached the server"
    );
    assert!(admitted.iter().all(|a| !a.is_finished()));

    release.send_replace(true);
    for a in admitted {
        a.await.unwrap().expect(0, "APPROVE", &[]);
    }
    assert_eq!(gw.shared.admission.in_flight(), 0);
    gw.stop().await;
}

/// `max_concurrent`: no more calls than that reach the server at once; the others wait for a
/// slot (shown in `tss_gateway_downstream_slot_wait_seconds`) and are approved within the
/// deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_bounds_the_calls_a_server_sees_at_once() {
    let k = keys();
    let weak = counting_downstream(&k.servers[1], "weak", Duration::from_millis(150)).await;
    let stand_in = Downstream::start("weak", &k.servers[1], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry_at(&stand_in, &weak.url, "max_concurrent: 2")], "").await;
    let asked: Vec<_> = (0..6)
        .map(|i| {
            let url = gw.url();
            tokio::spawn(
                async move { send(&url, &request("key_sign", &format!("weak-{i}"))).await },
            )
        })
        .collect();
    for a in asked {
        a.await.unwrap().expect(0, "APPROVE", &[]);
    }
    assert_eq!(weak.calls.load(Ordering::SeqCst), 6);
    assert_eq!(
        weak.peak.load(Ordering::SeqCst),
        2,
        "at most max_concurrent at once"
    );
    let text = gw.shared.metrics.render();
    assert_eq!(
        metric_value(
            &text,
            r#"tss_gateway_downstream_slot_wait_seconds_count{server="weak"}"#
        ),
        6.0
    );
    assert!(
        metric_value(
            &text,
            r#"tss_gateway_downstream_slot_wait_seconds_sum{server="weak"}"#
        ) > 0.0,
        "some calls waited"
    );
    gw.stop().await;
}

/// A call that never gets a slot before the deadline is a `timeout` (status 30), and never
/// reaches the server. Slots survive a reload that keeps the server and its limit, so calls
/// still running on the old generation count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_never_gets_a_slot_is_a_timeout() {
    let k = keys();
    let hung = Downstream::start("hung", &k.servers[2], always(Answer::hang()), 0).await;
    let gw = Gateway::start(&[entry(&hung, "max_concurrent: 1")], "deadline_ms: 5000").await;
    let url = gw.url();
    let holder = tokio::spawn(async move { send(&url, &request("key_sign", "holder")).await });
    until(10, "the first call reaches the server", || {
        hung.calls() == 1
    })
    .await;

    // The next generation has a short deadline; the holder keeps its slot for its own 5 s.
    gw.reload_with(&config_yaml(
        gw.addr,
        &[entry(&hung, "max_concurrent: 1")],
        "deadline_ms: 300",
    ));

    send(&gw.url(), &request("key_sign", "waiter"))
        .await
        .expect(
            30,
            "REJECT",
            &["hung: timeout", "no free slot (max_concurrent 1)"],
        );
    assert_eq!(hung.calls(), 1, "the waiting call never reached the server");
    assert_eq!(
        gw.metric(r#"tss_gateway_downstream_requests_total{outcome="timeout",server="hung"}"#),
        1.0
    );
    holder
        .await
        .unwrap()
        .expect(30, "REJECT", &["hung: timeout"]);
    gw.stop().await;
}

/// `run` raises the soft open-file limit to the hard one and logs both.
#[test]
fn run_raises_the_open_file_limit_and_logs_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let path = dir.path().join("gateway.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: {port}\ntss_node_public_key: {}\ngateway_private_key: {}\nhealth_check_interval_ms: 0\nembedded_risk_control_rules: {{ enable: true }}\n",
            keys().node.spki.display(),
            keys().gateway.pkcs8.display()
        ),
    )
    .unwrap();
    let hard: u64 = String::from_utf8(
        Command::new("bash")
            .args(["-c", "ulimit -Hn"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap_or(u64::MAX);
    assert!(hard > 256, "this test needs a hard limit above 256");
    let child = Command::new("bash")
        .args([
            "-c",
            &format!(
                "ulimit -Sn 256 && exec {BIN} run -c {} --log-format json",
                path.display()
            ),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut limit = String::new();
    for _ in 0..400 {
        if std::net::TcpStream::connect(port).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    if let Some(line) = limits.lines().find(|l| l.starts_with("Max open files")) {
        limit = line.to_owned();
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    let fields: Vec<&str> = limit.split_whitespace().collect();
    assert_eq!(
        fields.get(3..5),
        Some(&[hard.to_string().as_str(), hard.to_string().as_str()][..]),
        "soft limit raised to the hard one: {limit}"
    );
    let line = log
        .lines()
        .find(|l| l.contains("RLIMIT_NOFILE"))
        .unwrap_or_else(|| panic!("no RLIMIT_NOFILE line in {log}"));
    assert!(
        line.contains("\"soft_before\":256") && line.contains(&format!("\"hard\":{hard}")),
        "{line}"
    );
}
