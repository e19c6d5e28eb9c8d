//! The tamper-evident audit log (issue 14) and its reopening on rotation (issue 12 item 4):
//! the hash chain across restarts, logrotate, renames and deletes; `audit verify` on intact and
//! tampered logs; 32 concurrent writers; `replay` of recorded requests under a candidate config.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::downstream::{always, Answer, Downstream, Script, Seen};
use common::gateway::{config_yaml, entry, Gateway, BIN};
use common::keys::keys;
use common::node::{post_token, send};
use common::requests::request;
use common::tokens::contains_jwt;

/// Exit code, stdout and stderr of the binary.
fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn verify(files: &[&Path], extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["audit", "verify"];
    args.extend_from_slice(extra);
    let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    args.extend(files.iter().map(String::as_str));
    cli(&args)
}

/// SHA-256 hex of `bytes`, computed here (not by the gateway's code).
fn sha256_hex(bytes: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `run -c config`, once it accepts connections.
fn spawn_run(config: &Path, addr: SocketAddr) -> Child {
    let child = Command::new(BIN)
        .args(["run", "-c", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "gateway did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn kill(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig}");
}

/// SIGTERM and wait for a clean exit.
fn stop(mut child: Child) {
    kill(&child, "TERM");
    assert!(child.wait().unwrap().success(), "gateway did not exit 0");
}

/// A gateway config in `dir` whose audit log is `dir/audit.jsonl`.
fn write_config(dir: &Path, addr: SocketAddr, ds: &Downstream, extra: &str) -> PathBuf {
    let path = dir.join("gateway.yaml");
    let extra = format!("audit_log: audit.jsonl\n{extra}");
    std::fs::write(&path, config_yaml(addr, &[entry(ds, "")], &extra)).unwrap();
    path
}

/// A new folder with a gateway config asking `ds` (plus `extra`), a free address for it, and
/// the audit log `audit.jsonl` it will write there.
struct Setup {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    url: String,
    config: PathBuf,
    log: PathBuf,
}

fn setup(ds: &Downstream, extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let config = write_config(dir.path(), addr, ds, extra);
    Setup {
        url: format!("http://{addr}/v2/check"),
        log: dir.path().join("audit.jsonl"),
        dir,
        addr,
        config,
    }
}

async fn send_n(url: &str, prefix: &str, n: usize) {
    for i in 0..n {
        send(url, &request("key_sign", &format!("{prefix}-{i}")))
            .await
            .expect(0, "APPROVE", &[]);
    }
}

/// Every request record's id, over `files` in order.
fn request_ids(files: &[&Path]) -> Vec<String> {
    files
        .iter()
        .flat_map(|f| lines(f))
        .map(|l| json(&l))
        .filter(|r| r.get("checkpoint").is_none())
        .map(|r| r["request_id"].as_str().unwrap().to_owned())
        .collect()
}

// === the chain ===

/// The shipped logrotate config, aimed at `log` and signalling `pid` instead of systemd.
fn logrotate_config(dir: &Path, log: &Path, pid: u32) -> PathBuf {
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/logrotate/tss-callback-gateway"),
    )
    .unwrap();
    assert!(shipped.contains("/var/lib/tss-callback-gateway/decisions.jsonl {"));
    let conf: String = shipped
        .replace(
            "/var/lib/tss-callback-gateway/decisions.jsonl",
            log.to_str().unwrap(),
        )
        .lines()
        .map(|l| {
            if l.contains("systemctl kill --signal=HUP") {
                format!("        kill -HUP {pid}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let path = dir.join("logrotate.conf");
    std::fs::write(&path, conf).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_continues_across_a_restart_and_a_logrotate_rotation_and_verifies() {
    let k = keys();
    let ds = Downstream::start("approver", &k.servers[0], always(Answer::approve()), 0).await;
    let s = setup(&ds, "audit_checkpoint_every: 4\naudit_checkpoint_ms: 0\n");

    let gw = spawn_run(&s.config, s.addr);
    send_n(&s.url, "first", 6).await;
    stop(gw);
    // Six records, an interval checkpoint after the fourth, a shutdown checkpoint at the end.
    let first = lines(&s.log);
    assert_eq!(first.len(), 8);
    assert_eq!(json(&first[0])["prev"], "0".repeat(64));
    assert_eq!(json(&first[4])["checkpoint"]["reason"], "interval");
    assert_eq!(json(&first[7])["checkpoint"]["reason"], "shutdown");
    for pair in first.windows(2) {
        assert_eq!(json(&pair[1])["prev"], sha256_hex(pair[0].as_bytes()));
    }
    let (code, out, err) = verify(&[&s.log], &[]);
    assert_eq!(code, 0, "{out}{err}");

    // A restart continues the chain from the last line.
    let gw = spawn_run(&s.config, s.addr);
    send_n(&s.url, "second", 2).await;
    let before_rotation = lines(&s.log);
    assert_eq!(
        json(&before_rotation[8])["prev"],
        sha256_hex(first[7].as_bytes())
    );

    // The real logrotate, with the shipped config: rename, create, then SIGHUP.
    let state = s.dir.path().join("logrotate.state");
    // Debian installs it in /usr/sbin, which is not on every user's PATH.
    let logrotate = ["/usr/sbin/logrotate", "/usr/bin/logrotate"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("logrotate");
    let out = Command::new(logrotate)
        .args([
            "-f",
            "-s",
            state.to_str().unwrap(),
            logrotate_config(s.dir.path(), &s.log, gw.id())
                .to_str()
                .unwrap(),
        ])
        .output()
        .expect("logrotate is installed (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "logrotate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rotated = s.dir.path().join("audit.jsonl.1");
    // SIGHUP alone (no request yet) closes the old file with a rotation checkpoint.
    let started = Instant::now();
    loop {
        let last = lines(&rotated).last().cloned().unwrap();
        if json(&last)["checkpoint"]["reason"] == "rotation" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no rotation checkpoint after SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    send_n(&s.url, "third", 3).await;
    stop(gw);

    let old = lines(&rotated);
    let new = lines(&s.log);
    assert_eq!(
        json(&new[0])["prev"],
        sha256_hex(old.last().unwrap().as_bytes()),
        "the new file chains to the old one"
    );
    // No record lost or duplicated.
    let mut want: Vec<String> = (0..6).map(|i| format!("first-{i}")).collect();
    want.extend((0..2).map(|i| format!("second-{i}")));
    want.extend((0..3).map(|i| format!("third-{i}")));
    assert_eq!(request_ids(&[&rotated, &s.log]), want);

    let (code, out, err) = verify(&[&rotated, &s.log], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("intact: 11 records in 2 file(s)"), "{out}");
    // Pinned to the gateway's key, by file or by config.
    let spki = k.gateway.spki.to_str().unwrap();
    let (code, out, _) = verify(&[&rotated, &s.log], &["--key", spki]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("pinned"), "{out}");
    let (code, out, _) = verify(&[&rotated, &s.log], &["-c", s.config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    // Out of order, or without the older file, the chain does not hold.
    let (code, out, _) = verify(&[&s.log, &rotated], &[]);
    assert_eq!(code, 1, "{out}");
    let (code, out, _) = verify(&[&s.log], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("audit.jsonl:1:"), "{out}");
    let (code, out, _) = verify(&[&s.log], &["--mid-chain"]);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_rotated_while_the_gateway_was_stopped_is_continued() {
    let ds = Downstream::start("approver", &keys().servers[0], always(Answer::approve()), 0).await;
    let s = setup(&ds, "");
    let gw = spawn_run(&s.config, s.addr);
    send_n(&s.url, "before", 2).await;
    stop(gw);
    let rotated = s.dir.path().join("audit.jsonl-20261127");
    std::fs::rename(&s.log, &rotated).unwrap();
    let gw = spawn_run(&s.config, s.addr);
    send_n(&s.url, "after", 2).await;
    stop(gw);
    let old = lines(&rotated);
    assert_eq!(
        json(&lines(&s.log)[0])["prev"],
        sha256_hex(old.last().unwrap().as_bytes())
    );
    let (code, out, err) = verify(&[&rotated, &s.log], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("intact: 4 records in 2 file(s)"), "{out}");
}

#[test]
fn demo_ends_by_verifying_its_audit_log() {
    let (code, out, err) = cli(&["demo"]);
    assert_eq!(code, 0, "{out}{err}");
    let last = out
        .lines()
        .find(|l| l.starts_with("audit verify: "))
        .unwrap_or_else(|| panic!("no audit verify line in {out}"));
    assert!(
        last.contains("intact: 8 records") && last.contains("checkpoints verified"),
        "{last}"
    );
    assert!(last.contains("pinned"), "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_rename_or_delete_the_next_record_goes_to_a_new_file() {
    let ds = Downstream::start("approver", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(
        &[entry(&ds, "")],
        "audit_log: audit.jsonl\naudit_checkpoint_ms: 0",
    )
    .await;
    let log = gw.dir.path().join("audit.jsonl");
    send_n(&gw.url(), "a", 2).await;

    let renamed = gw.dir.path().join("audit.jsonl.renamed");
    std::fs::rename(&log, &renamed).unwrap();
    send_n(&gw.url(), "b", 2).await;
    assert!(log.exists(), "no new file after the rename");
    let old = lines(&renamed);
    assert_eq!(old.len(), 3, "two records and the closing checkpoint");
    assert_eq!(json(&old[2])["checkpoint"]["reason"], "rotation");
    assert_eq!(json(&lines(&log)[0])["prev"], sha256_hex(old[2].as_bytes()));

    // Deleted: the records kept in hand so far are copied aside as a log shipper would have.
    let shipped = gw.dir.path().join("audit.jsonl.shipped");
    std::fs::copy(&log, &shipped).unwrap();
    std::fs::remove_file(&log).unwrap();
    send_n(&gw.url(), "c", 1).await;
    assert!(log.exists(), "no new file after the delete");
    assert_eq!(request_ids(&[&log]), vec!["c-0".to_owned()]);
    // The copy lacks the closing checkpoint written to the deleted file, so only the first two
    // files verify closed; the chain still links the copy and the new file.
    let tail = lines(&shipped);
    assert_eq!(
        json(&lines(&log)[0])["seq"],
        json(tail.last().unwrap())["seq"].as_u64().unwrap() + 2
    );
    let audit = gw.shared.audit.load_full().unwrap();
    audit.close(&gw.shared.current.load().signer).unwrap();
    let (code, out, _) = verify(&[&renamed, &shipped], &["--live"]);
    assert_eq!(code, 0, "{out}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_writers_never_fork_the_chain() {
    let ds = Downstream::start("approver", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(
        &[entry(&ds, "")],
        "audit_log: audit.jsonl\naudit_checkpoint_every: 7\naudit_checkpoint_ms: 0",
    )
    .await;
    let url = gw.url();
    let tasks: Vec<_> = (0..32)
        .map(|w| {
            let url = url.clone();
            tokio::spawn(async move { send_n(&url, &format!("w{w}"), 6).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let audit = gw.shared.audit.load_full().unwrap();
    audit.close(&gw.shared.current.load().signer).unwrap();
    let log = gw.dir.path().join("audit.jsonl");
    let all = lines(&log);
    // One line per seq, each chained to the line before it.
    for (i, pair) in all.windows(2).enumerate() {
        let r = json(&pair[1]);
        assert_eq!(r["seq"], i as u64 + 2);
        assert_eq!(
            r["prev"],
            sha256_hex(pair[0].as_bytes()),
            "fork at line {}",
            i + 2
        );
    }
    let mut ids = request_ids(&[&log]);
    assert_eq!(ids.len(), 32 * 6);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 32 * 6);
    assert_eq!(all.len(), 32 * 6 + (32 * 6usize).div_ceil(7));
    let (code, out, _) = verify(&[&log], &["--key", keys().gateway.spki.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    gw.stop().await;
}

// === tampering ===

/// A closed log of 10 records, checkpoints every 4: records on lines 1-4, 6-9, 11-12;
/// checkpoints on 5, 10 and 13 (shutdown).
async fn closed_log(dir: &Path) -> Vec<String> {
    let ds = Downstream::start("approver", &keys().servers[0], always(Answer::approve()), 0).await;
    let addr = free_addr();
    let config = write_config(
        dir,
        addr,
        &ds,
        "audit_checkpoint_every: 4\naudit_checkpoint_ms: 0\n",
    );
    let gw = spawn_run(&config, addr);
    send_n(&format!("http://{addr}/v2/check"), "t", 10).await;
    stop(gw);
    let all = lines(&dir.join("audit.jsonl"));
    assert_eq!(all.len(), 13);
    for n in [5, 10, 13] {
        assert!(json(&all[n - 1]).get("checkpoint").is_some(), "line {n}");
    }
    all
}

/// Writes `lines` (each with its newline) to a new file and verifies it.
fn verify_lines(dir: &Path, name: &str, lines: &[String]) -> (i32, String) {
    let path = dir.join(name);
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, text).unwrap();
    let (code, out, err) = verify(&[&path], &[]);
    (code, format!("{out}{err}"))
}

#[track_caller]
fn assert_broken(result: (i32, String), at: &str, why: &str) {
    let (code, out) = result;
    assert_eq!(code, 1, "{out}");
    let expected = format!("{at} {why}");
    assert!(out.contains(&expected), "{expected:?} not in {out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_tampering_fails_verify_at_the_right_line() {
    let dir = tempfile::tempdir().unwrap();
    let all = closed_log(dir.path()).await;
    let d = dir.path();
    let (code, out) = verify_lines(d, "intact.jsonl", &all);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("10 records") && out.contains("3 checkpoints verified"),
        "{out}"
    );

    // One byte edited, the JSON still valid: a REJECT made an APPROVE... here an id changed.
    for n in [3usize, 4, 7, 11] {
        let mut t = all.clone();
        t[n - 1] = t[n - 1].replacen(&format!("\"t-{}\"", n - 1 - n / 5), "\"t-X\"", 1);
        assert_ne!(t[n - 1], all[n - 1]);
        assert_broken(
            verify_lines(d, "edited.jsonl", &t),
            &format!("edited.jsonl:{n}:"),
            "edited",
        );
    }
    // One byte edited so the line is no longer JSON.
    let mut t = all.clone();
    t[6] = t[6].replacen('{', "[", 1);
    assert_broken(
        verify_lines(d, "garbled.jsonl", &t),
        "garbled.jsonl:7:",
        "edited",
    );
    // A line deleted.
    let mut t = all.clone();
    t.remove(6);
    assert_broken(
        verify_lines(d, "deleted.jsonl", &t),
        "deleted.jsonl:7:",
        "deleted",
    );
    // A line inserted (a copy of an earlier record).
    let mut t = all.clone();
    t.insert(6, all[1].clone());
    assert_broken(
        verify_lines(d, "inserted.jsonl", &t),
        "inserted.jsonl:7:",
        "inserted",
    );
    // At the very start: the first line deleted, a line put before it, the first two swapped.
    assert_broken(
        verify_lines(d, "head-deleted.jsonl", &all[1..]),
        "head-deleted.jsonl:1:",
        "deleted",
    );
    let mut t = all.clone();
    t.insert(0, all[2].clone());
    assert_broken(
        verify_lines(d, "head-inserted.jsonl", &t),
        "head-inserted.jsonl:1:",
        "inserted",
    );
    let mut t = all.clone();
    t.swap(0, 1);
    assert_broken(
        verify_lines(d, "head-swapped.jsonl", &t),
        "head-swapped.jsonl:1:",
        "reordered",
    );
    // Two lines swapped.
    let mut t = all.clone();
    t.swap(6, 7);
    assert_broken(
        verify_lines(d, "swapped.jsonl", &t),
        "swapped.jsonl:7:",
        "reordered",
    );
    // Cut before the last checkpoint: the file no longer ends closed.
    assert_broken(
        verify_lines(d, "cut.jsonl", &all[..11]),
        "cut.jsonl:12:",
        "deleted: the file was cut short",
    );
    assert_broken(
        verify_lines(d, "cut2.jsonl", &all[..7]),
        "cut2.jsonl:8:",
        "deleted: the file was cut short",
    );
    // Cut inside a line.
    let path = d.join("cut3.jsonl");
    let text: String = all.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, &text[..text.len() - 10]).unwrap();
    let (code, out, _) = verify(&[&path], &[]);
    assert_broken(
        (code, out),
        "cut3.jsonl:13:",
        "deleted: incomplete last line",
    );
    // A checkpoint whose signature was altered.
    let mut t = all.clone();
    let sig = json(&t[9])["checkpoint"]["signature"]
        .as_str()
        .unwrap()
        .to_owned();
    let flipped = format!(
        "{}{}",
        if sig.starts_with('A') { "B" } else { "A" },
        &sig[1..]
    );
    t[9] = t[9].replace(&sig, &flipped);
    assert_broken(
        verify_lines(d, "badsig.jsonl", &t),
        "badsig.jsonl:10:",
        "bad checkpoint",
    );
    // Records rewritten and re-chained by someone without the gateway key: their own key signs
    // the checkpoints, which a pinned verify refuses as not pinned (tests/verify.rs has more).
    let path = d.join("intact.jsonl");
    let intruder = keys().intruder.spki.to_str().unwrap();
    let (code, out, _) = verify(&[&path], &["--key", intruder]);
    assert_broken(
        (code, out),
        "intact.jsonl:5:",
        "checkpoint signed by key sha256:",
    );
    // Unreadable.
    let (code, _, err) = verify(&[&d.join("missing.jsonl")], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("missing.jsonl"), "{err}");
}

// === replay ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_finds_the_planted_changes_and_none_under_the_unchanged_config() {
    let k = keys();
    let a = Downstream::start("a", &k.servers[0], always(Answer::approve()), 0).await;
    // b rejects one KeySign, after a has approved it.
    let b = Downstream::start(
        "b",
        &k.servers[1],
        std::sync::Arc::new(|seen: &Seen| {
            if seen.request_id == "sign-denied" {
                Answer::reject("destination not allowed").after(300)
            } else {
                Answer::approve()
            }
        }),
        0,
    )
    .await;
    let rules = "embedded_risk_control_rules:\n  enable: true\n  key_gen:\n    reject_all: false\n    allow_list:\n      - threshold: 2\n        node_ids: [coboNodeA1b2c3, thirdPartyNodeD4e5f6, customerNodeG7h8i9]\n  key_reshare:\n    allow_list:\n      - xpubkey: not-this-one\n        new_threshold: 2\n        new_node_ids: [a, b, c]\n";
    let extra = format!("audit_log: audit.jsonl\naudit_payloads: true\n{rules}");
    let gw = Gateway::start(&[entry(&a, ""), entry(&b, "")], &extra).await;
    let url = gw.url();
    send(&url, &request("key_gen", "gen-1"))
        .await
        .expect(0, "APPROVE", &[]);
    send(&url, &request("key_sign", "sign-ok"))
        .await
        .expect(0, "APPROVE", &[]);
    send(&url, &request("key_sign", "sign-denied"))
        .await
        .expect(0, "REJECT", &["b: destination not allowed"]);
    send(&url, &request("key_reshare", "reshare-1"))
        .await
        .expect(0, "REJECT", &["embedded"]);
    send(&url, &request("key_share_sign", "share-1"))
        .await
        .expect(0, "APPROVE", &[]);
    post_token(&url, "not-a-token")
        .await
        .expect(20, "REJECT", &[]);
    let log = gw.dir.path().join("audit.jsonl");
    let records = gw.audit_records();
    assert_eq!(records.len(), 6);
    // The verified request is recorded as an object, never the token.
    assert_eq!(records[1]["request"]["request_id"], "sign-ok");
    assert_eq!(records[1]["request"]["request_type"], 2);
    assert!(records[5].get("request").is_none());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!contains_jwt(&text), "a token in the audit log");

    let log_arg = log.to_str().unwrap();
    let (code, out, err) = cli(&[
        "replay",
        "-c",
        gw.config_path.to_str().unwrap(),
        "--audit",
        log_arg,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("replay: 0 would change"), "{out}");
    assert!(out.contains("1 records skipped"), "{out}");

    // The candidate: b removed; a no longer asked about KeyGen and KeyGen's rule dropped; a new
    // enforcing server c for KeyShareSign; KeyReshare's allow list dropped (rules would pass it).
    let candidate_rules =
        "embedded_risk_control_rules:\n  enable: true\n  key_share_sign: { reject_all: false }\n";
    let yaml = format!(
        "listen: 127.0.0.1:1\ntss_node_public_key: {node}\ngateway_private_key: {gw}\n{candidate_rules}callback_servers:\n  - name: a\n    service_address: {a}\n    pubkey_path: {ak}\n    request_types: [key_sign, key_reshare]\n  - name: c\n    service_address: http://127.0.0.1:2/v2/check\n    pubkey_path: {ak}\n    request_types: [key_share_sign]\n",
        node = k.node.spki.display(),
        gw = k.gateway.pkcs8.display(),
        a = a.url(),
        ak = a.key.spki.display(),
    );
    let candidate = gw.dir.path().join("candidate.yaml");
    std::fs::write(&candidate, yaml).unwrap();
    let (code, out, err) = cli(&[
        "replay",
        "-c",
        candidate.to_str().unwrap(),
        "--audit",
        log_arg,
    ]);
    assert_eq!(code, 1, "{out}{err}");
    let changed: Vec<&str> = out.lines().filter(|l| !l.starts_with("replay:")).collect();
    let line = |id: &str| {
        changed
            .iter()
            .find(|l| l.starts_with(&format!("{id} ")))
            .unwrap_or_else(|| panic!("{id} not reported: {out}"))
            .to_string()
    };
    // A removed server had rejected it: now approved by a alone.
    let l = line("sign-denied");
    assert!(
        l.contains("REJECT (status 0) -> APPROVE") && l.contains("b had answered `rejected`"),
        "{l}"
    );
    // No check would cover KeyGen any more.
    let l = line("gen-1");
    assert!(l.contains("no check would cover it"), "{l}");
    // A server that did not see it would now be asked.
    let l = line("share-1");
    assert!(
        l.contains("UNKNOWN") && l.contains("would now be asked of c"),
        "{l}"
    );
    // The embedded rules no longer reject it; a (which did not see it) would be asked.
    let l = line("reshare-1");
    assert!(
        l.contains("no longer reject") && l.contains("would now be asked of a"),
        "{l}"
    );
    assert_eq!(changed.len(), 4, "{out}");
    assert!(out.contains("key_sign 2 replayed, 1 would change"), "{out}");
    assert!(out.contains("replay: 4 would change"), "{out}");

    // Rules that would now reject: KeySign reject_all.
    let strict = std::fs::read_to_string(&gw.config_path).unwrap().replace(
        "  enable: true\n",
        "  enable: true\n  key_sign: { reject_all: true }\n",
    );
    std::fs::write(&candidate, strict).unwrap();
    let (code, out, _) = cli(&[
        "replay",
        "-c",
        candidate.to_str().unwrap(),
        "--audit",
        log_arg,
    ]);
    assert_eq!(code, 1, "{out}");
    let l = out.lines().find(|l| l.starts_with("sign-ok ")).unwrap();
    assert!(
        l.contains("APPROVE -> REJECT (status 0)")
            && l.contains("would now reject it (key_sign reject_all)"),
        "{l}"
    );
    assert!(out.contains("replay: 1 would change"), "{out}");

    // Errors: an unreadable audit file, a bad candidate.
    let (code, _, _) = cli(&[
        "replay",
        "-c",
        candidate.to_str().unwrap(),
        "--audit",
        "/nonexistent",
    ]);
    assert_eq!(code, 2);
    std::fs::write(&candidate, "bogus: 1\n").unwrap();
    let (code, _, _) = cli(&[
        "replay",
        "-c",
        candidate.to_str().unwrap(),
        "--audit",
        log_arg,
    ]);
    assert_eq!(code, 2);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_audit_payloads_no_request_is_recorded_and_replay_skips_every_record() {
    let ds = Downstream::start("approver", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry(&ds, "")], "audit_log: audit.jsonl").await;
    send_n(&gw.url(), "p", 3).await;
    assert!(gw
        .audit_records()
        .iter()
        .all(|r| r.get("request").is_none()));
    let log = gw.dir.path().join("audit.jsonl");
    let (code, out, _) = cli(&[
        "replay",
        "-c",
        gw.config_path.to_str().unwrap(),
        "--audit",
        log.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("3 records skipped"), "{out}");
    gw.stop().await;
}

// === a live log ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_log_verifies_once_every_answer_is_out_and_fails_when_cut_before_its_checkpoint() {
    let ds = Downstream::start("approver", &keys().servers[0], always(Answer::approve()), 0).await;
    // Default checkpoint settings: nothing but going idle seals 32 records.
    let s = setup(&ds, "");
    let gw = spawn_run(&s.config, s.addr);
    let tasks: Vec<_> = (0..32)
        .map(|w| {
            let url = s.url.clone();
            tokio::spawn(async move { send_n(&url, &format!("live{w}"), 1).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // The gateway is still running: the last record was sealed before its answer went out.
    let (code, out, err) = verify(&[&s.log], &["--key", keys().gateway.spki.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("intact: 32 records"), "{out}");
    let all = lines(&s.log);
    let last = json(all.last().unwrap());
    assert!(last.get("checkpoint").is_some(), "{last}");
    // Cut before that checkpoint: the file no longer ends sealed.
    let cut = all.len() - 1;
    let (code, out) = verify_lines(s.dir.path(), "cut.jsonl", &all[..cut]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("cut.jsonl:{}:", cut + 1)), "{out}");
    stop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_moves_the_audit_log_closes_the_old_file_with_a_checkpoint() {
    let ds = Downstream::start("approver", &keys().servers[0], always(Answer::approve()), 0).await;
    // Only interval, shutdown, rotation and reconfiguration checkpoints.
    let s = setup(&ds, "audit_checkpoint_ms: 0\n");
    let new = s.dir.path().join("moved.jsonl");
    let gw = spawn_run(&s.config, s.addr);
    send_n(&s.url, "old", 3).await;
    let (code, out, _) = verify(&[&s.log], &[]);
    assert_eq!(code, 1, "unsealed before the reload: {out}");
    std::fs::write(
        &s.config,
        config_yaml(
            s.addr,
            &[entry(&ds, "")],
            "audit_log: moved.jsonl\naudit_checkpoint_ms: 0\n",
        ),
    )
    .unwrap();
    kill(&gw, "HUP");
    let mut closed = false;
    for _ in 0..200 {
        let last = lines(&s.log).last().map(|l| json(l));
        if last.is_some_and(|l| l["checkpoint"]["reason"] == "reconfigured") {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        closed,
        "no closing checkpoint in the old file after the reload"
    );
    let (code, out, err) = verify(&[&s.log], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("intact: 3 records"), "{out}");
    send_n(&s.url, "new", 1).await;
    stop(gw);
    assert_eq!(request_ids(&[&new]), vec!["new-0".to_owned()]);
    let (code, out, _) = verify(&[&new], &[]);
    assert_eq!(code, 0, "{out}");
}

/// Under load that never lets the gateway go idle, a checkpoint is still written within
/// `audit_checkpoint_ms` of the first unsealed record (reason `elapsed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_steady_load_a_checkpoint_is_written_within_audit_checkpoint_ms() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    // Every answer takes 150 ms; four staggered senders keep requests in flight throughout.
    let ds = Downstream::start(
        "slowish",
        &keys().servers[0],
        always(Answer::approve().after(150)),
        0,
    )
    .await;
    let s = setup(
        &ds,
        "audit_checkpoint_ms: 200\naudit_checkpoint_every: 100000\n",
    );
    let gw = spawn_run(&s.config, s.addr);
    let done = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..4)
        .map(|w| {
            let (url, done) = (s.url.clone(), done.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(40 * w)).await;
                for i in 0..100 {
                    if done.load(Ordering::SeqCst) {
                        break;
                    }
                    send_n(&url, &format!("steady{w}-{i}"), 1).await;
                }
            })
        })
        .collect();
    let elapsed_checkpoint = |path: &Path| {
        lines(path)
            .iter()
            .map(|l| json(l))
            .any(|r| r["checkpoint"]["reason"] == "elapsed")
    };
    let mut seen = false;
    for _ in 0..400 {
        if elapsed_checkpoint(&s.log) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done.store(true, Ordering::SeqCst);
    for s in senders {
        s.await.unwrap();
    }
    assert!(
        seen,
        "no `elapsed` checkpoint while requests kept the gateway busy"
    );
    stop(gw);
    let (code, out, err) = verify(&[&s.log], &[]);
    assert_eq!(code, 0, "{out}{err}");
}

/// Records written while another request was still pending are sealed once that request ends
/// without a record of its own, because its caller hung up: the log verifies intact without the
/// gateway stopping (reason `idle`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_last_pending_request_is_dropped_the_log_is_sealed() {
    let script: Script = std::sync::Arc::new(|seen: &Seen| {
        if seen.request_id.starts_with("slow") {
            Answer::hang()
        } else {
            Answer::approve()
        }
    });
    let ds = Downstream::start("mixed", &keys().servers[0], script, 0).await;
    // No `elapsed` checkpoint can come within the test: only going idle seals.
    let s = setup(&ds, "audit_checkpoint_ms: 600000\n");
    let gw = spawn_run(&s.config, s.addr);
    // The node sends a request that stays pending (its downstream never answers)...
    let slow = {
        let url = s.url.clone();
        tokio::spawn(async move {
            let _ = send(&url, &request("key_sign", "slow-0")).await;
        })
    };
    for _ in 0..400 {
        if ds.seen().iter().any(|s| s.request_id == "slow-0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ds.seen().iter().any(|s| s.request_id == "slow-0"));
    // ...and, meanwhile, three that are answered: their records are not sealed yet.
    send_n(&s.url, "fast", 3).await;
    let (code, out, _) = verify(&[&s.log], &[]);
    assert_eq!(code, 1, "sealed while a request was still pending: {out}");
    // The node gives up on the pending one and closes its connection.
    slow.abort();
    let _ = slow.await;
    let mut sealed = false;
    for _ in 0..400 {
        if verify(&[&s.log], &[]).0 == 0 {
            sealed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        sealed,
        "the log was not sealed after the last pending request was dropped"
    );
    let last = json(lines(&s.log).last().unwrap());
    assert_eq!(last["checkpoint"]["reason"], "idle", "{last}");
    assert_eq!(request_ids(&[&s.log]), vec!["fast-0", "fast-1", "fast-2"]);
    stop(gw);
}
