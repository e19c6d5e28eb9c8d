//! Soak: many requests at concurrency 64 across 5 downstreams whose behaviour is drawn at random
//! per request. Every answer is compared with the answer the behaviours imply.
//!
//! CI runs `SOAK_REQUESTS` (default 2,000); the full run is `bash scripts/soak.sh` (20,000).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use futures::StreamExt;

const SERVERS: usize = 5;
const BEHAVIOURS: [&str; 6] = ["approve", "reject", "slow", "timeout", "fail", "badsig"];

/// Behaviour weights: mostly approvals, so that all-approve requests are common.
fn draw(rng: &mut u64) -> &'static str {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    match *rng % 100 {
        0..=79 => "approve",
        80..=83 => "reject",
        84..=91 => "slow",
        92..=94 => "timeout",
        95..=97 => "fail",
        _ => "badsig",
    }
}

fn script(index: usize) -> Script {
    Arc::new(move |seen: &Seen| {
        let behaviour = seen
            .request_id
            .split('.')
            .nth(1 + index)
            .unwrap_or("approve");
        match behaviour {
            "approve" => Answer::approve(),
            "reject" => Answer::reject("soak says no"),
            "slow" => Answer::approve().after(40),
            "timeout" => Answer::approve().after(2500),
            "fail" => Answer::bytes(500, b"internal error"),
            _ => Answer::approve().signed_by(&keys().intruder),
        }
    })
}

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap()
        / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_zero_false_approvals() {
    let total: usize = std::env::var("SOAK_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let mut servers = Vec::new();
    for i in 0..SERVERS {
        servers
            .push(Downstream::start(&format!("s{i}"), &keys().servers[i % 4], script(i), 0).await);
    }
    // servers[4] shares servers[0]'s key pair; each still answers with its own script.
    // timeout_ms leaves room for CPU queueing: this process signs for the node, the gateway and
    // five servers on two cores, so an in-time answer can take a few hundred ms at concurrency 64.
    let entries: Vec<Entry> = servers
        .iter()
        .map(|s| entry(s, "timeout_ms: 1000\nretries: 0"))
        .collect();
    let gw = Gateway::start(&entries, "audit_log: audit.jsonl").await;
    let url = gw.url();

    let mut rng = 0x9e3779b97f4a7c15u64;
    let cases: Vec<(String, Vec<&str>)> = (0..total)
        .map(|i| {
            let b: Vec<&str> = (0..SERVERS).map(|_| draw(&mut rng)).collect();
            (format!("soak-{i}.{}", b.join(".")), b)
        })
        .collect();
    let warm = total / 5;
    let mut rss_warm = 0.0;
    let mut latencies = Vec::with_capacity(total);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut stream = futures::stream::iter(cases.iter().cloned().map(|(id, b)| {
        let url = url.clone();
        async move {
            let r = send(&url, &request("key_sign", &id)).await;
            (id, b, r)
        }
    }))
    .buffer_unordered(64);
    let mut done = 0;
    while let Some((id, b, r)) = stream.next().await {
        done += 1;
        if done == warm {
            rss_warm = rss_mb();
        }
        latencies.push(r.elapsed.as_secs_f64() * 1000.0);
        let all_ok = b.iter().all(|x| matches!(*x, "approve" | "slow"));
        let any_reject = b.contains(&"reject");
        let resp = &r.response;
        assert_eq!(resp.request_id, id);
        if all_ok {
            assert!(r.approved(), "{id}: expected APPROVE, got {resp:?}");
            *counts.entry("approved").or_default() += 1;
        } else if any_reject {
            assert_eq!(
                (resp.status, resp.action.as_str()),
                (0, "REJECT"),
                "{id}: {resp:?}"
            );
            let who: Vec<String> = b
                .iter()
                .enumerate()
                .filter(|(_, x)| **x == "reject")
                .map(|(i, _)| format!("s{i}: soak says no"))
                .collect();
            assert!(
                who.iter().any(|w| resp.error.starts_with(w.as_str())),
                "{id}: {}",
                resp.error
            );
            *counts.entry("rejected").or_default() += 1;
        } else {
            assert_eq!(
                (resp.status, resp.action.as_str()),
                (30, "REJECT"),
                "{id}: {resp:?}"
            );
            for (i, x) in b.iter().enumerate() {
                let kind = match *x {
                    "timeout" => "timeout",
                    "fail" => "http_error",
                    "badsig" => "bad_signature",
                    _ => continue,
                };
                assert!(
                    resp.error.contains(&format!("s{i}: {kind}")),
                    "{id}: {}",
                    resp.error
                );
            }
            *counts.entry("failed").or_default() += 1;
        }
    }
    let rss_end = rss_mb();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    println!(
        "soak: {total} requests, {counts:?}, p50 {:.1} ms, p99 {:.1} ms, RSS after warm-up {rss_warm:.1} MB, at end {rss_end:.1} MB",
        pct(0.5),
        pct(0.99)
    );
    assert_eq!(counts.values().sum::<usize>(), total);
    assert!(
        counts.get("approved").copied().unwrap_or(0) > total / 10,
        "the mix should approve often: {counts:?}"
    );
    // Every answer was audited, one line each.
    let audit = std::fs::read_to_string(gw.dir.path().join("audit.jsonl")).unwrap();
    assert_eq!(audit.lines().count(), total);
    // Memory is flat after warm-up (the harness, its servers and the gateway share this process).
    assert!(
        rss_end - rss_warm < 40.0,
        "RSS grew from {rss_warm:.1} to {rss_end:.1} MB"
    );
    // No behaviour is missing from the mix.
    for b in BEHAVIOURS {
        assert!(cases.iter().any(|(_, x)| x.contains(&b)), "{b} never drawn");
    }
}
