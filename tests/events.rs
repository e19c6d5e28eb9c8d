//! TSS Node events (contract sections 1, 2, 5, 7, 8), over real HTTP on loopback with real RS256
//! tokens: the node signs events with its event key, event servers verify the gateway's re-signed
//! token with `jsonwebtoken`, and the state store is a SQLite file.

mod common;

use std::path::Path;
use std::process::Command;

use common::downstream::{always, Answer, Downstream};
use common::events::{
    event_body, event_form, expired_event_body, post_event, tss_event, EventPeer,
};
use common::gateway::{config_yaml, entry, free_port, spawn_run, Gateway, BIN};
use common::http::get_json;
use common::keys::keys;
use common::node::send;
use common::requests::request;
use common::until;

/// The event settings of a gateway config: the node's event key, an audit log and `servers`
/// (name, URL, extra YAML for the entry).
fn events_yaml(servers: &[(&str, String, &str)]) -> String {
    let mut y = format!(
        "tss_node_event_public_key: {}\naudit_log: audit.jsonl\nevent_servers:\n",
        keys().node_event.spki.display()
    );
    if servers.is_empty() {
        y.push_str("  []\n");
    }
    for (name, url, extra) in servers {
        y.push_str(&format!(
            "  - name: {name}\n    service_address: {url}\n    timeout_ms: 2000\n"
        ));
        for line in extra.lines().filter(|l| !l.trim().is_empty()) {
            y.push_str(&format!("    {}\n", line.trim()));
        }
    }
    y
}

async fn approver() -> Downstream {
    Downstream::start("risk", &keys().servers[0], always(Answer::approve()), 0).await
}

/// Every line of the gateway's audit log, parsed.
fn audit_lines(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The `event` (or `alarm`) objects of the audit log.
fn audit_kind(dir: &Path, kind: &str) -> Vec<serde_json::Value> {
    audit_lines(dir)
        .into_iter()
        .filter_map(|v| v.get(kind).cloned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_every_matching_server_resigned_with_the_nodes_exact_bytes() {
    let all = EventPeer::start("siem").await;
    let only = EventPeer::start("ledger").await;
    let ds = approver().await;
    let extra = events_yaml(&[
        ("siem", all.url(), ""),
        (
            "ledger",
            only.url(),
            "event_types: [request.keysign.succeeded]",
        ),
    ]);
    let gw = Gateway::start(&[entry(&ds, "")], &extra).await;

    // An approved KeySign, then its events; and a type the gateway does not know.
    send(&gw.url(), &request("key_sign", "req-1"))
        .await
        .expect(0, "APPROVE", &[]);
    let created = tss_event("ev-1", "request.keysign.created", "req-1");
    let succeeded = tss_event("ev-2", "request.keysign.succeeded", "req-1");
    let unknown = tss_event("ev-3", "request.wallet.created", "req-1");
    for payload in [&created, &succeeded, &unknown] {
        let (status, _) = post_event(gw.addr, event_body(payload)).await;
        assert_eq!(status, 200);
    }
    // The node sends one again (its retry): accepted, not delivered twice.
    assert_eq!(post_event(gw.addr, event_body(&created)).await.0, 200);
    let sentinel = tss_event("ev-4", "request.keysign.succeeded", "req-1");
    assert_eq!(post_event(gw.addr, event_body(&sentinel)).await.0, 200);

    until(10, "every event at siem", || all.got().len() >= 4).await;
    until(10, "the succeeded events at ledger", || {
        only.got().len() >= 2
    })
    .await;
    for (id, payload) in [("ev-1", &created), ("ev-2", &succeeded), ("ev-3", &unknown)] {
        assert_eq!(all.count(id), 1, "{id} once at siem");
        let got = all.got().into_iter().find(|g| g.event_id == id).unwrap();
        assert_eq!(&got.package, payload, "{id}: the node's exact bytes");
        assert_eq!(got.iss, "test-gateway");
    }
    let ledger: Vec<String> = only.got().into_iter().map(|g| g.event_id).collect();
    assert_eq!(
        ledger,
        ["ev-2", "ev-4"],
        "the filter keeps only its type, unknown types excluded"
    );
    assert_eq!((all.unverified(), only.unverified()), (0, 0));

    // Recorded in the audit chain, once per arrival; the retry marked as a duplicate.
    let events = audit_kind(gw.dir.path(), "event");
    assert_eq!(events.len(), 5);
    assert_eq!(events[0]["event_id"], "ev-1");
    assert_eq!(events[0]["request_id"], "req-1");
    assert_eq!(events[0]["node_id"], "coboAbCdEf0123456789");
    assert_eq!(events[3]["duplicate"], true);
    assert!(
        audit_kind(gw.dir.path(), "alarm").is_empty(),
        "every execution was approved"
    );

    assert_eq!(
        gw.metric(r#"tss_gateway_events_total{outcome="accepted",type="other"}"#),
        1.0
    );
    assert_eq!(
        gw.metric(
            r#"tss_gateway_events_total{outcome="accepted",type="request.keysign.succeeded"}"#
        ),
        2.0
    );
    until(10, "deliveries counted", || {
        gw.metric(r#"tss_gateway_event_deliveries_total{outcome="delivered",server="siem"}"#) == 4.0
    })
    .await;
    until(10, "no backlog", || {
        gw.metric(r#"tss_gateway_event_backlog{server="siem"}"#) == 0.0
    })
    .await;
    let ready = get_json(&format!("http://{}/readyz", gw.addr)).await;
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["alarms"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_events_get_400_and_are_neither_recorded_nor_delivered() {
    let peer = EventPeer::start("siem").await;
    let ds = approver().await;
    let gw = Gateway::start(
        &[entry(&ds, "")],
        &format!(
            "max_body_bytes: 4096\n{}",
            events_yaml(&[("siem", peer.url(), "")])
        ),
    )
    .await;
    let good = |id: &str| tss_event(id, "request.keysign.succeeded", "never-approved");
    let k = keys();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "forged",
            event_form(&k.intruder.encoding(), &good("forged")),
            "invalid_token",
        ),
        (
            "expired",
            expired_event_body(&good("expired")),
            "invalid_token",
        ),
        // The node's callback key is not its event key.
        (
            "callback key",
            event_form(&k.node.encoding(), &good("callback-key")),
            "invalid_token",
        ),
        ("no token", b"other=1".to_vec(), "invalid_token"),
        (
            "a CallbackRequest",
            event_body(&request("key_sign", "r-9")),
            "invalid_request",
        ),
        ("not JSON", event_body(b"hello"), "invalid_request"),
        (
            "oversized",
            event_body(
                &[b' '; 8192]
                    .iter()
                    .copied()
                    .chain(good("big"))
                    .collect::<Vec<u8>>(),
            ),
            "invalid_request",
        ),
    ];
    for (what, body, _) in &cases {
        let (status, text) = post_event(gw.addr, body.clone()).await;
        assert_eq!(status, 400, "{what}: {text}");
    }
    for outcome in ["invalid_token", "invalid_request"] {
        let want = cases.iter().filter(|c| c.2 == outcome).count() as f64;
        let got: f64 = ["other", "request.keysign.succeeded"]
            .iter()
            .map(|t| {
                gw.metric(&format!(
                    r#"tss_gateway_events_total{{outcome="{outcome}",type="{t}"}}"#
                ))
            })
            .sum();
        assert_eq!(got, want, "{outcome}");
    }
    // A good event after them: once it is delivered, nothing else was.
    let sentinel = tss_event("sentinel", "ping", "");
    assert_eq!(post_event(gw.addr, event_body(&sentinel)).await.0, 200);
    until(10, "the sentinel delivered", || peer.count("sentinel") == 1).await;
    let ids: Vec<String> = peer.got().into_iter().map(|g| g.event_id).collect();
    assert_eq!(ids, ["sentinel"]);
    let recorded: Vec<serde_json::Value> = audit_kind(gw.dir.path(), "event");
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert!(audit_kind(gw.dir.path(), "alarm").is_empty());
    assert_eq!(
        gw.metric(r#"tss_gateway_unapproved_executions_total{type="key_sign"}"#),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execution_nobody_approved_raises_the_alarm_and_an_approved_one_does_not() {
    let ds = approver().await;
    let gw = Gateway::start(&[entry(&ds, "")], &events_yaml(&[])).await;
    send(&gw.url(), &request("key_sign", "approved-1"))
        .await
        .expect(0, "APPROVE", &[]);
    let ok = tss_event("e-ok", "request.keysign.succeeded", "approved-1");
    let bad = tss_event("e-bad", "request.keysign.succeeded", "bypassed-1");
    let failed = tss_event("e-failed", "request.keysign.failed", "approved-1");
    let ping = tss_event("e-ping", "ping", "");
    for p in [&ok, &bad, &failed, &ping] {
        assert_eq!(post_event(gw.addr, event_body(p)).await.0, 200);
    }
    // The node's retry of the alarming event raises nothing more.
    assert_eq!(post_event(gw.addr, event_body(&bad)).await.0, 200);

    let alarms = audit_kind(gw.dir.path(), "alarm");
    assert_eq!(alarms.len(), 2, "{alarms:?}");
    assert_eq!(alarms[0]["kind"], "unapproved_execution");
    assert_eq!(alarms[0]["request_id"], "bypassed-1");
    assert_eq!(alarms[0]["event_id"], "e-bad");
    assert_eq!(alarms[0]["event_type"], "request.keysign.succeeded");
    assert_eq!(alarms[0]["node_id"], "coboAbCdEf0123456789");
    assert_eq!(alarms[1]["kind"], "approved_then_failed");
    assert_eq!(alarms[1]["request_id"], "approved-1");
    assert_eq!(
        gw.metric(r#"tss_gateway_unapproved_executions_total{type="key_sign"}"#),
        1.0
    );
    assert_eq!(
        gw.metric(r#"tss_gateway_approved_then_failed_total{type="key_sign"}"#),
        1.0
    );
    // Listed on /readyz; readiness stays: an alarm is no reason to stop approving.
    let ready = get_json(&format!("http://{}/readyz", gw.addr)).await;
    assert_eq!(ready["ready"], true, "{ready}");
    let listed = ready["alarms"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{ready}");
    assert_eq!(listed[0]["kind"], "unapproved_execution");
    assert_eq!(listed[0]["request_id"], "bypassed-1");
    assert_eq!(listed[0]["event_id"], "e-bad");
    assert!(listed[0]["ts"].as_str().unwrap().ends_with('Z'));
    // The approval entered the index: the succeeded event of an approved request is quiet.
    send(&gw.url(), &request("key_gen", "approved-2")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_event_server_delays_neither_another_nor_the_callbacks() {
    let stuck = EventPeer::start("stuck").await;
    stuck.hang(true);
    let fine = EventPeer::start("fine").await;
    let ds = approver().await;
    let extra = events_yaml(&[("stuck", stuck.url(), ""), ("fine", fine.url(), "")]);
    let gw = Gateway::start(&[entry(&ds, "")], &extra).await;
    for i in 0..20 {
        let e = tss_event(&format!("e{i}"), "request.keysign.created", "r");
        assert_eq!(post_event(gw.addr, event_body(&e)).await.0, 200);
    }
    for i in 0..5 {
        send(&gw.url(), &request("key_sign", &format!("cb-{i}")))
            .await
            .expect(0, "APPROVE", &[]);
    }
    until(10, "every event at the working server", || {
        fine.got().len() == 20
    })
    .await;
    assert!(stuck.got().is_empty());
    assert!(stuck.calls() > 0, "the stuck server was tried");
    assert!(gw.metric(r#"tss_gateway_event_backlog{server="stuck"}"#) > 0.0 || stuck.calls() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_takes_no_writes_fails_approvals_closed_and_readiness_says_so() {
    let ds = approver().await;
    let gw = Gateway::start(&[entry(&ds, "")], &events_yaml(&[])).await;
    send(&gw.url(), &request("key_sign", "before"))
        .await
        .expect(0, "APPROVE", &[]);

    // Another process holds the database's write lock: every write of the gateway times out.
    use sqlx::Connection;
    let db = gw.dir.path().join("state/gateway.db");
    let mut lock = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut lock)
        .await
        .unwrap();

    let r = send(&gw.url(), &request("key_sign", "during")).await;
    r.expect(30, "REJECT", &["state store unavailable"]);
    let (status, _) = post_event(
        gw.addr,
        event_body(&tss_event("e-during", "request.keysign.created", "x")),
    )
    .await;
    assert_eq!(status, 503, "an event that cannot be recorded");
    assert_eq!(
        gw.metric(r#"tss_gateway_events_total{outcome="failed",type="request.keysign.created"}"#),
        1.0
    );
    let url = format!("http://{}/readyz", gw.addr);
    let resp = common::http::http().get(&url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    let ready: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(ready["ready"], false);
    assert!(
        ready["reason"].as_str().unwrap().contains("state store"),
        "{ready}"
    );
    let decisions = gw.audit_records();
    let during = decisions
        .iter()
        .find(|d| d["request_id"] == "during")
        .unwrap();
    assert_eq!(
        during["status"], 30,
        "the audit log records the answer given"
    );

    sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
    drop(lock);
    let mut ready_again = false;
    for _ in 0..250 {
        let (status, _) = common::http::get(&url).await;
        if status == 200 {
            ready_again = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(40)).await;
    }
    assert!(ready_again, "ready once the store takes writes again");
    send(&gw.url(), &request("key_sign", "after"))
        .await
        .expect(0, "APPROVE", &[]);
}

/// Sends SIGTERM to `child` and waits for it to exit.
fn stop(mut child: std::process::Child) {
    // SAFETY: a signal to a child process this test started.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_was_down_gets_every_event_once_across_a_gateway_restart() {
    let ds = approver().await;
    let mut peer = EventPeer::down("siem", free_port());
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("gateway.yaml");
    let listen: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    std::fs::write(
        &config,
        config_yaml(
            listen,
            &[entry(&ds, "")],
            &events_yaml(&[("siem", peer.url(), "")]),
        ),
    )
    .unwrap();
    let gw = spawn_run(&config, port);
    let ids: Vec<String> = (0..5).map(|i| format!("down-{i}")).collect();
    for id in &ids {
        let e = tss_event(id, "request.keysign.created", "r");
        assert_eq!(post_event(listen, event_body(&e)).await.0, 200);
    }
    let unapproved = tss_event("alarm-1", "request.keysign.succeeded", "nobody-approved");
    assert_eq!(post_event(listen, event_body(&unapproved)).await.0, 200);
    let metrics = format!("http://{listen}/metrics");
    let mut backlog = 0.0;
    for _ in 0..250 {
        let text = common::http::get(&metrics).await.1;
        backlog =
            common::gateway::metric_value(&text, r#"tss_gateway_event_backlog{server="siem"}"#);
        if backlog == 6.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(40)).await;
    }
    assert_eq!(backlog, 6.0, "six events wait for the server");
    stop(gw);

    // The server comes back while the gateway is down; the gateway restarts on the same store.
    peer.up().await;
    let gw = spawn_run(&config, port);
    until(30, "every event delivered after the restart", || {
        peer.got().len() >= 6
    })
    .await;
    for id in ids.iter().chain([&"alarm-1".to_owned()]) {
        assert_eq!(peer.count(id), 1, "{id} once");
    }
    // The alarm raised before the restart is still listed.
    let ready = get_json(&format!("http://{listen}/readyz")).await;
    let alarms = ready["alarms"].as_array().unwrap();
    assert_eq!(alarms.len(), 1, "{ready}");
    assert_eq!(alarms[0]["request_id"], "nobody-approved");
    assert_eq!(ready["ready"], true);
    stop(gw);
    assert_eq!(peer.unverified(), 0);
}

/// Runs `reconcile` over `files`: exit code and stdout.
fn reconcile(files: &[&Path], extra: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .arg("reconcile")
        .arg("--audit")
        .args(files)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn reconcile_reads_every_replicas_audit_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.jsonl");
    let b = dir.path().join("b.jsonl");
    let decision = |id: &str, status: i64, action: &str| {
        format!(
            r#"{{"ts":"2026-01-01T00:00:00.000Z","request_id":"{id}","type":"key_sign","status":{status},"action":"{action}","error":"","duration_ms":1.0,"embedded":"off","servers":[],"config_generation":1,"seq":1,"prev":"00"}}"#
        )
    };
    let event = |eid: &str, t: &str, id: &str| {
        format!(
            r#"{{"ts":"2026-01-01T00:00:01.000Z","event":{{"event_id":"{eid}","event_type":"{t}","node_id":"n","request_id":"{id}","request_type":2}},"seq":2,"prev":"00"}}"#
        )
    };
    // Approved on replica A, executed as reported to replica B.
    std::fs::write(
        &a,
        decision("r-1", 0, "APPROVE") + "\n" + &decision("r-2", 0, "REJECT") + "\n",
    )
    .unwrap();
    std::fs::write(&b, event("e-1", "request.keysign.succeeded", "r-1") + "\n").unwrap();
    let (code, out) = reconcile(&[&a, &b], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 unapproved"), "{out}");

    // B also saw the execution of a request A rejected, and of one nobody was asked about.
    std::fs::write(
        &b,
        [
            event("e-1", "request.keysign.succeeded", "r-1"),
            event("e-2", "request.keysign.succeeded", "r-2"),
            event("e-3", "request.keygen.succeeded", "r-3"),
            event("e-4", "request.keysign.created", "r-4"),
        ]
        .join("\n")
            + "\n",
    )
    .unwrap();
    let (code, out) = reconcile(&[&a, &b, &b], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("UNAPPROVED EXECUTION request_id=r-2"), "{out}");
    assert!(out.contains("UNAPPROVED EXECUTION request_id=r-3"), "{out}");
    assert!(!out.contains("request_id=r-1 "), "{out}");
    assert!(
        out.contains("2 file(s)"),
        "the same file twice is read once: {out}"
    );

    // An approval with no outcome is listed for information once past the grace.
    std::fs::write(&a, decision("r-5", 0, "APPROVE") + "\n").unwrap();
    std::fs::write(&b, "").unwrap();
    let (code, out) = reconcile(&[&a, &b], &["--grace", "1m"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("approved with no succeeded/failed event yet: request_id=r-5"),
        "{out}"
    );

    let (code, out) = reconcile(&[&dir.path().join("missing.jsonl")], &[]);
    assert_eq!(code, 2, "{out}");
}

#[test]
fn check_config_shows_the_event_settings_and_refuses_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys();
    let base = format!(
        "tss_node_public_key: {}\ngateway_private_key: {}\nembedded_risk_control_rules: {{ enable: true }}\ntss_node_event_public_key: {}\n",
        k.node.spki.display(),
        k.gateway.pkcs8.display(),
        k.node_event.spki.display()
    );
    let check = |yaml: &str| {
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, yaml).unwrap();
        let out = Command::new(BIN)
            .args(["check-config", "-c", path.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = check(&format!(
        "{base}state_store: \"postgres://gw:s3cret@db.internal/gateway\"\nevent_servers:\n  - name: siem\n    service_address: https://u:s3cret@siem.internal/v2/event\n    event_types: [request.keysign.succeeded, request.wallet.created]\n"
    ));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("event server siem https://***@siem.internal/v2/event"),
        "{out}"
    );
    assert!(
        out.contains("state store postgres postgres://***@db.internal/gateway"),
        "{out}"
    );
    assert!(
        !out.contains("s3cret") && !err.contains("s3cret"),
        "{out}{err}"
    );
    assert!(
        err.contains("request.wallet.created"),
        "an unknown type is a warning: {err}"
    );

    let (code, out, _) = check(&base);
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!(
            "state store sqlite {}",
            dir.path().join("state/gateway.db").display()
        )),
        "{out}"
    );

    let (code, _, err) = check(&format!(
        "{base}event_servers:\n  - name: siem\n    service_address: nowhere\n"
    ));
    assert_eq!(code, 2);
    assert!(err.contains("event_servers[0].service_address"), "{err}");
    let (code, _, err) = check(&base.replace(
        &k.node_event.spki.display().to_string(),
        "/nonexistent/event.pub",
    ));
    assert_eq!(code, 2);
    assert!(err.contains("tss_node_event_public_key"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_servers_come_and_go_with_a_reload_and_the_store_needs_a_restart() {
    use tss_callback_gateway::ops::reload::reload;
    let first = EventPeer::start("first").await;
    let second = EventPeer::start("second").await;
    let ds = approver().await;
    let gw = Gateway::start(
        &[entry(&ds, "")],
        &events_yaml(&[("first", first.url(), "")]),
    )
    .await;
    let yaml = |servers: &[(&str, String, &str)]| {
        config_yaml(gw.addr, &[entry(&ds, "")], &events_yaml(servers))
    };
    let post = |id: &str| {
        let e = tss_event(id, "request.keysign.created", "r");
        post_event(gw.addr, event_body(&e))
    };
    assert_eq!(post("before").await.0, 200);
    until(10, "first gets the first event", || {
        first.count("before") == 1
    })
    .await;

    gw.write_config(&yaml(&[("second", second.url(), "")]));
    reload(&gw.shared, &gw.config_path, "test").unwrap();
    assert_eq!(post("after").await.0, 200);
    until(10, "the added server gets the next event", || {
        second.count("after") == 1
    })
    .await;
    assert_eq!(
        second.count("before"),
        0,
        "an added server gets the events from then on"
    );
    assert_eq!(
        first.count("after"),
        0,
        "a removed server gets nothing more"
    );
    until(10, "the removed server's series are gone", || {
        !gw.shared
            .metrics
            .render()
            .contains(r#"tss_gateway_event_backlog{server="first"}"#)
    })
    .await;

    // Moving the store is refused: the running config stays, and says why.
    gw.write_config(&format!(
        "{}state_store: elsewhere.db\n",
        yaml(&[("second", second.url(), "")])
    ));
    let err = reload(&gw.shared, &gw.config_path, "test")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("state_store") && err.contains("restart"),
        "{err}"
    );
    let ready = get_json(&format!("http://{}/readyz", gw.addr)).await;
    assert!(
        ready["config_error"]
            .as_str()
            .unwrap()
            .contains("state_store"),
        "{ready}"
    );

    // The audit chain holds the new record kinds and still verifies.
    let out = Command::new(BIN)
        .args(["audit", "verify", "--live"])
        .arg(gw.dir.path().join("audit.jsonl"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let config = audit_kind(gw.dir.path(), "config");
    assert_eq!(config.last().unwrap()["event_servers"][0]["name"], "second");
}
