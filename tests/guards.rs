//! Smaller holes found by the second security review and the fault-injection review (issue 19
//! §5, issue 20 items 6 and 7): keys that differ from a CallbackRequest field only in letter
//! case, the generation a slow body is decided by, the shutdown grace after a reload that
//! shortened the deadline, and a downstream's signed refusal without `request_id`.

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::downstream::{always, Answer, Downstream};
use common::gateway::{config_yaml, entry, free_port, spawn_run, Gateway};
use common::http::http;
use common::keys::keys;
use common::node::{node_form, send};
use common::requests::request;
use common::tokens::{open, token, CallbackResponse};
use common::until;

/// Go's `encoding/json` reads `Request_Type` into `request_type` (the last key wins), so a
/// downstream written in Go would see type 5 and detail "evil" where the gateway checked type 2:
/// such a payload is refused with status 10 and reaches nobody (CONTRACT.md section 6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_differing_from_a_request_field_only_in_case_is_refused_unforwarded() {
    let a = Downstream::start("a", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry(&a, "")], "").await;
    let payloads: [&[u8]; 3] = [
        br#"{"request_id":"case-1","request_type":2,"REQUEST_ID":"other","Request_Type":5,"Request_Detail":"evil"}"#,
        br#"{"request_id":"case-2","request_type":2,"request_detail":"{}","Extra_Info":"{}"}"#,
        br#"{"request_id":"case-3","request_type":2,"ACTION":"APPROVE"}"#,
    ];
    for p in payloads {
        send(&gw.url(), p)
            .await
            .expect(10, "REJECT", &["top-level"]);
    }
    assert_eq!(a.calls(), 0, "never forwarded");
    // The exact field names still pass.
    send(&gw.url(), &request("key_sign", "case-ok"))
        .await
        .expect(0, "APPROVE", &[]);
    gw.stop().await;
}

/// The config generation is taken once the body has arrived: a body still arriving when an
/// emergency `key_sign: reject_all: true` is loaded is decided by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_is_decided_by_the_config_current_when_it_completed() {
    let a = Downstream::start("a", &keys().servers[0], always(Answer::approve()), 0).await;
    // The default `read_timeout_ms` (2 s) leaves the body time enough.
    let gw = Gateway::start(&[entry(&a, "")], "").await;
    let body = node_form(&request("key_sign", "slow-then-stop"));
    let (head, tail) = body.split_at(20);
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let start = format!(
        "POST /v2/check HTTP/1.1\r\nHost: gw\r\nContent-Type: application/x-www-form-urlencoded\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(start.as_bytes()).await.unwrap();
    s.write_all(head).await.unwrap();
    // Let the handler start on the headers (it did so at generation 1 before the fix).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stop = config_yaml(
        gw.addr,
        &[entry(&a, "")],
        "embedded_risk_control_rules:\n  enable: true\n  key_sign: { reject_all: true }\n",
    );
    gw.reload_with(&stop);
    s.write_all(tail).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut raw))
        .await
        .expect("answered")
        .unwrap();
    let text = String::from_utf8_lossy(&raw);
    let (_, json) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let t: String = serde_json::from_str(json.trim()).unwrap();
    let answer: CallbackResponse =
        serde_json::from_slice(&open(&t, &keys().gateway.decoding()).unwrap()).unwrap();
    assert_eq!(
        (answer.status, answer.action.as_str()),
        (0, "REJECT"),
        "{answer:?}"
    );
    assert!(answer.error.contains("embedded risk control"), "{answer:?}");
    assert_eq!(a.calls(), 0);
    gw.stop().await;
}

/// A downstream that cannot verify the gateway's token answers, signed, `{"status":20,
/// "action":"REJECT","error":"Signature verification failed"}` with no `request_id`: that is
/// `error_status` carrying its own text (what an operator needs to see a wrong key), not
/// `bad_response: missing field request_id`; the decision is status 30.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_refusal_without_request_id_is_error_status_with_its_text() {
    let k = keys();
    let body = token(
        &k.servers[0].encoding(),
        br#"{"status":20,"action":"REJECT","error":"Signature verification failed"}"#,
        "a",
    );
    let a = Downstream::start(
        "a",
        &k.servers[0],
        always(Answer::bytes(400, body.as_bytes())),
        0,
    )
    .await;
    let gw = Gateway::start(&[entry(&a, "")], "").await;
    send(&gw.url(), &request("key_sign", "wrong-key"))
        .await
        .expect(
            30,
            "REJECT",
            &["a: error_status", "Signature verification failed"],
        );
    assert_eq!(
        gw.metric(r#"tss_gateway_downstream_requests_total{outcome="error_status",server="a"}"#),
        1.0
    );
    // A status-0 answer must still name the request.
    let approve = token(
        &k.servers[0].encoding(),
        br#"{"status":0,"action":"APPROVE","error":""}"#,
        "a",
    );
    a.set_script(always(Answer::bytes(200, approve.as_bytes())));
    send(&gw.url(), &request("key_sign", "unnamed-approval"))
        .await
        .expect(30, "REJECT", &["a: bad_response", "request_id"]);
    gw.stop().await;
}

/// Shutdown waits for the latest deadline among the requests in flight, not the current
/// config's `deadline_ms` (issue 20 item 6): twenty requests under `deadline_ms: 5000`, a reload
/// (SIGHUP) to 1000, then SIGTERM to the real binary; every one is answered and it exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_the_deadline_of_the_requests_in_flight() {
    const N: usize = 20;
    let a = Downstream::start(
        "a",
        &keys().servers[0],
        always(Answer::approve().after(3000)),
        0,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.yaml");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}").parse().unwrap();
    std::fs::write(
        &config,
        config_yaml(
            listen,
            &[entry(&a, "timeout_ms: 5000")],
            "deadline_ms: 5000",
        ),
    )
    .unwrap();
    let child = spawn_run(&config, port);
    let base = format!("http://127.0.0.1:{port}");
    let asked: Vec<_> = (0..N)
        .map(|i| {
            let url = format!("{base}/v2/check");
            tokio::spawn(async move {
                http()
                    .post(url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(node_form(&request("key_sign", &format!("inflight-{i}"))))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    until(30, "every request reaches the server", || a.calls() == N).await;
    std::fs::write(
        &config,
        config_yaml(
            listen,
            &[entry(&a, "timeout_ms: 1000")],
            "deadline_ms: 1000",
        ),
    )
    .unwrap();
    signal(&child, "-HUP");
    for attempt in 0.. {
        let ready = http().get(format!("{base}/readyz")).send().await;
        if let Ok(r) = ready {
            let v: serde_json::Value = r.json().await.unwrap();
            if v["config_generation"].as_u64() >= Some(2) {
                break;
            }
        }
        assert!(attempt < 500, "the reload never happened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&child, "-TERM");
    for (i, r) in asked.into_iter().enumerate() {
        assert_eq!(
            r.await.unwrap().ok(),
            Some(200),
            "request {i} went unanswered"
        );
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
}

fn signal(child: &std::process::Child, which: &str) {
    std::process::Command::new("kill")
        .args([which, &child.id().to_string()])
        .status()
        .unwrap();
}
