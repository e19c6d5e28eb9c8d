//! Shadow verdicts in the audit chain (issue 21 item 1): a shadow server's verdict that arrives
//! after the answer is appended as a `shadow` record of its own, once, even for duplicates and
//! remembered answers; `replay` judges a shadow server switched to enforce by it; `audit verify`
//! chains it like any other line.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::downstream::{always, Answer, Downstream, Seen};
use common::gateway::{entry, Gateway, BIN};
use common::keys::keys;
use common::node::send;
use common::requests::request;
use common::tokens::contains_jwt;
use common::until;
use serde_json::Value;

/// Exit code and stdout+stderr of the binary.
fn cli(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn records(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The `shadow` records of `log` by request_id (each a list: more than one is a bug).
fn shadow_records(log: &Path) -> HashMap<String, Vec<Value>> {
    let mut by_id: HashMap<String, Vec<Value>> = HashMap::new();
    for r in records(log) {
        if let Some(s) = r.get("shadow") {
            by_id
                .entry(s["request_id"].as_str().unwrap().to_owned())
                .or_default()
                .push(s.clone());
        }
    }
    by_id
}

/// The decision records of `log` (top-level `request_id` and `status`).
fn decisions(log: &Path) -> Vec<Value> {
    records(log)
        .into_iter()
        .filter(|r| r.get("request_id").is_some() && r.get("status").is_some())
        .collect()
}

/// What a decision record says of `server`.
fn verdict_of<'a>(record: &'a Value, server: &str) -> &'a Value {
    record["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == server)
        .unwrap_or_else(|| panic!("{server} not in {record}"))
}

/// Each request's shadow verdict is in the chain exactly once: in its decision record, or
/// (`pending` there) in one `shadow` record. Returns how many came late.
#[track_caller]
fn each_shadow_verdict_recorded_once(log: &Path, server: &str) -> usize {
    let late = shadow_records(log);
    let mut pending = 0;
    let mut seen_ids = Vec::new();
    for d in decisions(log) {
        let id = d["request_id"].as_str().unwrap().to_owned();
        let v = verdict_of(&d, server);
        assert_eq!(v["mode"], "shadow", "{d}");
        let n = late.get(&id).map_or(0, Vec::len);
        if seen_ids.contains(&id) {
            // A duplicate (remembered answer): its evaluation's verdict is recorded already.
            continue;
        }
        seen_ids.push(id.clone());
        if v["outcome"] == "pending" {
            pending += 1;
            assert_eq!(
                n, 1,
                "{id}: {n} shadow records for a pending verdict: {late:?}"
            );
        } else {
            assert_eq!(
                n, 0,
                "{id}: answered in time and recorded late too: {late:?}"
            );
        }
    }
    pending
}

/// A candidate config: the gateway's own, with `server` switched to enforce.
fn enforcing(config: &Path, server: &str, dir: &Path) -> std::path::PathBuf {
    let yaml = std::fs::read_to_string(config).unwrap();
    let at = yaml.find(&format!("- name: {server}\n")).unwrap();
    let (head, tail) = yaml.split_at(at);
    let candidate = dir.join("candidate.yaml");
    std::fs::write(
        &candidate,
        format!(
            "{head}{}",
            tail.replacen("mode: shadow", "mode: enforce", 1)
        ),
    )
    .unwrap();
    candidate
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_shadow_verdicts_are_recorded_once_and_replay_judges_by_them() {
    let k = keys();
    let fast = Downstream::start("fast", &k.servers[0], always(Answer::approve()), 0).await;
    // Slower than the enforcing server by far; it rejects one KeySign with a long error.
    let long_error = "x".repeat(3000);
    let slow = Downstream::start(
        "slow",
        &k.servers[1],
        Arc::new(move |seen: &Seen| {
            if seen.request_id == "sign-deny" {
                Answer::reject(&long_error).after(800)
            } else {
                Answer::approve().after(800)
            }
        }),
        0,
    )
    .await;
    let gw = Gateway::start(
        &[entry(&fast, ""), entry(&slow, "mode: shadow")],
        "audit_log: audit.jsonl\naudit_payloads: true\n",
    )
    .await;
    let url = gw.url();
    let log = gw.dir.path().join("audit.jsonl");
    let asked = [
        ("ping", "ping-1"),
        ("ping", "ping-2"),
        ("key_gen", "gen-1"),
        ("key_sign", "sign-ok"),
        ("key_sign", "sign-deny"),
        ("key_reshare", "reshare-1"),
        ("key_share_sign", "share-1"),
    ];
    for (kind, id) in asked {
        // The shadow server never decides: every answer approves, at once.
        send(&url, &request(kind, id))
            .await
            .expect(0, "APPROVE", &[]);
    }
    until(
        20,
        "a verdict of the shadow server for every request",
        || {
            let late = shadow_records(&log);
            let on_time = decisions(&log)
                .iter()
                .filter(|d| verdict_of(d, "slow")["outcome"] != "pending")
                .count();
            late.values().map(Vec::len).sum::<usize>() + on_time >= asked.len()
        },
    )
    .await;
    let pending = each_shadow_verdict_recorded_once(&log, "slow");
    assert!(pending > 0, "the slow shadow server was never late");
    let late = shadow_records(&log);
    if let Some(s) = late.get("sign-deny") {
        let s = &s[0];
        assert_eq!(s["server"], "slow");
        assert_eq!(s["outcome"], "rejected");
        assert!(s["duration_ms"].as_f64().unwrap() >= 800.0, "{s}");
        let detail = s["detail"].as_str().unwrap();
        assert!(
            detail.len() <= 1024 && detail.starts_with("xxx"),
            "detail not capped at 1 KiB: {} bytes",
            detail.len()
        );
    }

    // A TSS Node retry of an answered request is answered from memory: its verdict of the
    // shadow server is not recorded again.
    send(&url, &request("key_sign", "sign-ok"))
        .await
        .expect(0, "APPROVE", &[]);
    let retried: Vec<Value> = decisions(&log)
        .into_iter()
        .filter(|d| d["request_id"] == "sign-ok")
        .collect();
    assert_eq!(retried.len(), 2);
    assert_eq!(retried[1]["duplicate"], true, "{}", retried[1]);
    // Any late record it could cause would be written before the next idle seal.
    until(10, "the retry's record sealed", || {
        records(&log)
            .last()
            .is_some_and(|r| r.get("checkpoint").is_some())
    })
    .await;
    each_shadow_verdict_recorded_once(&log, "slow");
    assert!(shadow_records(&log).values().all(|v| v.len() == 1));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!contains_jwt(&text), "a token in the audit log");

    // The chain holds the shadow records like any other line.
    let (code, out) = cli(&[
        "audit",
        "verify",
        "--live",
        "-c",
        gw.config_path.to_str().unwrap(),
        log.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");

    // Replay with the shadow server enforcing: its verdict is known for every request, and the
    // one it rejected is the one change.
    let candidate = enforcing(&gw.config_path, "slow", gw.dir.path());
    let (code, out) = cli(&[
        "replay",
        "-c",
        candidate.to_str().unwrap(),
        "--audit",
        log.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(!out.contains("UNKNOWN"), "{out}");
    assert!(!out.contains("not recorded"), "{out}");
    let changes: Vec<&str> = out.lines().filter(|l| !l.starts_with("replay:")).collect();
    assert_eq!(changes.len(), 1, "{out}");
    assert!(
        changes[0].starts_with("sign-deny ")
            && changes[0].contains("APPROVE -> REJECT (status 0, by slow)"),
        "{out}"
    );
    assert!(out.contains("replay: 1 would change"), "{out}");
    assert!(out.contains("ping 2 replayed, 0 would change"), "{out}");
    assert!(out.contains("key_sign 3 replayed, 1 would change"), "{out}");
    // Under the config as it is, nothing changes.
    let (code, out) = cli(&[
        "replay",
        "-c",
        gw.config_path.to_str().unwrap(),
        "--audit",
        log.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_verdict_that_arrives_before_the_answer_is_not_recorded_again() {
    let k = keys();
    // Here the enforcing server is the slow one: the shadow verdict is in before the answer.
    let enforcer = Downstream::start(
        "enforcer",
        &k.servers[0],
        always(Answer::approve().after(300)),
        0,
    )
    .await;
    let quick = Downstream::start(
        "quick",
        &k.servers[1],
        always(Answer::reject("would deny")),
        0,
    )
    .await;
    let gw = Gateway::start(
        &[entry(&enforcer, ""), entry(&quick, "mode: shadow")],
        "audit_log: audit.jsonl\naudit_payloads: true\n",
    )
    .await;
    let url = gw.url();
    let log = gw.dir.path().join("audit.jsonl");
    for i in 0..4 {
        send(&url, &request("key_sign", &format!("early-{i}")))
            .await
            .expect(0, "APPROVE", &[]);
    }
    send(&url, &request("ping", "early-ping"))
        .await
        .expect(0, "APPROVE", &[]);
    until(10, "every shadow verdict recorded and sealed", || {
        let late: usize = shadow_records(&log).values().map(Vec::len).sum();
        let pending = decisions(&log)
            .iter()
            .filter(|d| verdict_of(d, "quick")["outcome"] == "pending")
            .count();
        late >= pending
            && records(&log)
                .last()
                .is_some_and(|r| r.get("checkpoint").is_some())
    })
    .await;
    let pending = each_shadow_verdict_recorded_once(&log, "quick");
    let on_time = decisions(&log)
        .iter()
        .filter(|d| verdict_of(d, "quick")["outcome"] != "pending")
        .count();
    // The shadow verdicts came in time (the answers waited 300 ms for the enforcing server).
    assert!(on_time > 0, "no shadow verdict arrived before its answer");
    assert_eq!(on_time + pending, 5);
    assert_eq!(
        shadow_records(&log).values().map(Vec::len).sum::<usize>(),
        pending
    );
    gw.stop().await;
}
