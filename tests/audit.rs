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
use common::sha256_hex;
use common::tokens::contains_jwt;
use common::until;

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

/// Every decision record's id, over `files` in order.
fn request_ids(files: &[&Path]) -> Vec<String> {
    files
        .iter()
        .flat_map(|f| lines(f))
        .map(|l| json(&l))
        .filter(|r| r.get("request_id").is_some() && r.get("status").is_some())
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
    // The config record and the start checkpoint, six records, an interval checkpoint after the
    // fourth, a shutdown checkpoint at the end.
    let first = lines(&s.log);
    assert_eq!(first.len(), 10);
    assert_eq!(json(&first[0])["prev"], "0".repeat(64));
    assert_eq!(json(&first[0])["config"]["reason"], "start");
    assert_eq!(json(&first[1])["checkpoint"]["reason"], "start");
    assert_eq!(json(&first[6])["checkpoint"]["reason"], "interval");
    assert_eq!(json(&first[9])["checkpoint"]["reason"], "shutdown");
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
        json(&before_rotation[10])["prev"],
        sha256_hex(first[9].as_bytes())
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
    assert!(
        out.starts_with("intact: ") && out.contains("in 2 file(s)"),
        "{out}"
    );
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
    assert!(
        out.starts_with("intact: ") && out.contains("in 2 file(s)"),
        "{out}"
    );
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
        last.contains("intact: ") && last.contains("checkpoints verified"),
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
    assert_eq!(
        old.len(),
        5,
        "config, start checkpoint, two records and the closing checkpoint"
    );
    assert_eq!(json(&old[4])["checkpoint"]["reason"], "rotation");
    assert_eq!(json(&lines(&log)[0])["prev"], sha256_hex(old[4].as_bytes()));

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
    audit.close().unwrap();
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
    audit.close().unwrap();
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
    // The config record and start checkpoint, then the records and their checkpoints.
    assert_eq!(all.len(), 2 + 32 * 6 + (32 * 6usize).div_ceil(7));
    let (code, out, _) = verify(&[&log], &["--key", keys().gateway.spki.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    gw.stop().await;
}

// === tampering ===

/// A closed log of 10 records, checkpoints every 4: the config record on line 1, the start
/// checkpoint on 2, records on lines 3-6, 8-11, 13-14; checkpoints on 7, 12 and 15 (shutdown).
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
    assert_eq!(all.len(), 15);
    for n in [2, 7, 12, 15] {
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
        out.starts_with("intact: ") && out.contains("4 checkpoints verified"),
        "{out}"
    );

    // One byte edited, the JSON still valid: a REJECT made an APPROVE... here an id changed.
    for (n, id) in [(5usize, 2), (6, 3), (9, 5), (13, 8)] {
        let mut t = all.clone();
        t[n - 1] = t[n - 1].replacen(&format!("\"t-{id}\""), "\"t-X\"", 1);
        assert_ne!(t[n - 1], all[n - 1]);
        assert_broken(
            verify_lines(d, "edited.jsonl", &t),
            &format!("edited.jsonl:{n}:"),
            "edited",
        );
    }
    // One byte edited so the line is no longer JSON.
    let mut t = all.clone();
    t[8] = t[8].replacen('{', "[", 1);
    assert_broken(
        verify_lines(d, "garbled.jsonl", &t),
        "garbled.jsonl:9:",
        "edited",
    );
    // A line deleted.
    let mut t = all.clone();
    t.remove(8);
    assert_broken(
        verify_lines(d, "deleted.jsonl", &t),
        "deleted.jsonl:9:",
        "deleted",
    );
    // A line inserted (a copy of an earlier record).
    let mut t = all.clone();
    t.insert(8, all[3].clone());
    assert_broken(
        verify_lines(d, "inserted.jsonl", &t),
        "inserted.jsonl:9:",
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
    t.swap(8, 9);
    assert_broken(
        verify_lines(d, "swapped.jsonl", &t),
        "swapped.jsonl:9:",
        "reordered",
    );
    // Cut before the last checkpoint: the file no longer ends closed.
    assert_broken(
        verify_lines(d, "cut.jsonl", &all[..13]),
        "cut.jsonl:14:",
        "deleted: the file was cut short",
    );
    assert_broken(
        verify_lines(d, "cut2.jsonl", &all[..9]),
        "cut2.jsonl:10:",
        "deleted: the file was cut short",
    );
    // Cut inside a line.
    let path = d.join("cut3.jsonl");
    let text: String = all.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, &text[..text.len() - 10]).unwrap();
    let (code, out, _) = verify(&[&path], &[]);
    assert_broken(
        (code, out),
        "cut3.jsonl:15:",
        "deleted: incomplete last line",
    );
    // A checkpoint whose signature was altered.
    let mut t = all.clone();
    let sig = json(&t[11])["checkpoint"]["signature"]
        .as_str()
        .unwrap()
        .to_owned();
    let flipped = format!(
        "{}{}",
        if sig.starts_with('A') { "B" } else { "A" },
        &sig[1..]
    );
    t[11] = t[11].replace(&sig, &flipped);
    assert_broken(
        verify_lines(d, "badsig.jsonl", &t),
        "badsig.jsonl:12:",
        "bad checkpoint",
    );
    // Records rewritten and re-chained by someone without the gateway key: their own key signs
    // the checkpoints, which a pinned verify refuses as not pinned (tests/verify.rs has more).
    let path = d.join("intact.jsonl");
    let intruder = keys().intruder.spki.to_str().unwrap();
    let (code, out, _) = verify(&[&path], &["--key", intruder]);
    assert_broken(
        (code, out),
        "intact.jsonl:2:",
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
    // The gateway is still running: once every answer is out, the last record is sealed within
    // `audit_checkpoint_ms` (idle checkpoints come at most once per `audit_checkpoint_ms`).
    let key = ["--key", keys().gateway.spki.to_str().unwrap()];
    let started = Instant::now();
    let (code, out, err) = loop {
        let result = verify(&[&s.log], &key);
        if result.0 == 0 || started.elapsed() > Duration::from_secs(20) {
            break result;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(request_ids(&[&s.log]).len(), 32);
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
    assert_eq!(request_ids(&[&s.log]).len(), 3);
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
        "the log was not sealed after the last pending request was dropped: {:?} {:?}",
        lines(&s.log),
        verify(&[&s.log], &[])
    );
    let last = json(lines(&s.log).last().unwrap());
    assert_eq!(last["checkpoint"]["reason"], "idle", "{last}");
    assert_eq!(request_ids(&[&s.log]), vec!["fast-0", "fast-1", "fast-2"]);
    stop(gw);
}

// === a chain the gateway can prove is its own (issue 19 item 1, issue 20 items 3-5) ===

/// `run -c config` with its stderr (logs and witness lines) going to a file, once it accepts
/// connections. `prelude`: shell commands run first (`umask 000`, `export RUST_LOG=error`).
fn spawn_logged(config: &Path, addr: SocketAddr, stderr: &Path, prelude: Option<&str>) -> Child {
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(stderr)
        .unwrap();
    let mut cmd = match prelude {
        Some(u) => {
            let mut c = Command::new("sh");
            c.args([
                "-c",
                &format!("{u}; exec \"$0\" run -c \"$1\" --log-format json"),
                BIN,
                config.to_str().unwrap(),
            ]);
            c
        }
        None => {
            let mut c = Command::new(BIN);
            c.args([
                "run",
                "-c",
                config.to_str().unwrap(),
                "--log-format",
                "json",
            ]);
            c
        }
    };
    let child = cmd.stdout(Stdio::null()).stderr(err).spawn().unwrap();
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

/// The files set aside next to `log` (`<log>.discontinuity-*`).
fn set_aside(log: &Path) -> Vec<PathBuf> {
    let prefix = format!(
        "{}.discontinuity-",
        log.file_name().unwrap().to_str().unwrap()
    );
    let mut found: Vec<PathBuf> = std::fs::read_dir(log.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .collect();
    found.sort();
    found
}

/// A metric of the gateway at `addr`, from its `/metrics`.
async fn metric_at(addr: SocketAddr, series: &str) -> f64 {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    common::gateway::metric_value(&text, series)
}

/// The ERROR log lines of a stderr file that mention `text`.
fn errors_mentioning(stderr: &Path, text: &str) -> usize {
    std::fs::read_to_string(stderr)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"ERROR\"") && l.contains(text))
        .count()
}

/// The first line of the new file is a `discontinuity` checkpoint naming `aside`; returns it.
#[track_caller]
fn assert_discontinuity(log: &Path, aside: &Path) -> serde_json::Value {
    let first = json(&lines(log)[0]);
    assert_eq!(first["checkpoint"]["reason"], "discontinuity", "{first}");
    assert_eq!(
        first["checkpoint"]["found"]["file"],
        aside.display().to_string(),
        "{first}"
    );
    first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_cut_at_an_earlier_checkpoint_while_stopped_is_set_aside_not_continued() {
    let ds = Downstream::start("approver", &keys().servers[0], always(Answer::approve()), 0).await;
    let s = setup(&ds, "audit_checkpoint_every: 2\naudit_checkpoint_ms: 0\n");
    let stderr = s.dir.path().join("stderr.log");
    let gw = spawn_logged(&s.config, s.addr, &stderr, None);
    send_n(&s.url, "a", 6).await;
    stop(gw);
    let all = lines(&s.log);
    let last_seq = json(all.last().unwrap())["seq"].as_u64().unwrap();
    // Cut at the interval checkpoint after the fourth record: the last approvals are dropped.
    let cut_at = all
        .iter()
        .rposition(|l| {
            let r = json(l);
            r["checkpoint"]["reason"] == "interval" && r["seq"].as_u64().unwrap() < last_seq - 3
        })
        .unwrap();
    let cut: String = all[..=cut_at].iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&s.log, &cut).unwrap();

    let gw = spawn_logged(&s.config, s.addr, &stderr, None);
    send_n(&s.url, "b", 1).await;
    let aside = set_aside(&s.log);
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read_to_string(&aside[0]).unwrap(), cut);
    let first = assert_discontinuity(&s.log, &aside[0]);
    // Chained to the head the gateway saved, and seq goes on from it, never backwards.
    assert_eq!(first["prev"], sha256_hex(all.last().unwrap().as_bytes()));
    assert_eq!(first["seq"], last_seq + 1);
    assert_eq!(
        first["checkpoint"]["found"]["last_seq"],
        json(&all[cut_at])["seq"]
    );
    assert_eq!(first["checkpoint"]["found"]["unsealed_lines"], 0);
    assert_eq!(
        metric_at(s.addr, "tss_gateway_audit_discontinuities_total").await,
        1.0
    );
    assert_eq!(errors_mentioning(&stderr, "set aside"), 1);
    stop(gw);
    assert_eq!(request_ids(&[&s.log]), vec!["b-0".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_fabricated_while_stopped_is_never_sealed_by_the_gateway() {
    let ds = Downstream::start("approver", &keys().servers[0], always(Answer::approve()), 0).await;
    let s = setup(&ds, "");
    let gw = spawn_run(&s.config, s.addr);
    send_n(&s.url, "real", 2).await;
    stop(gw);
    // A fake approval with a correct `seq` and `prev`, appended while the gateway is stopped.
    let all = lines(&s.log);
    let last = all.last().unwrap();
    let fake = serde_json::json!({
        "ts": "2026-12-01T00:00:00.000Z", "request_id": "fabricated", "type": "key_sign",
        "status": 0, "action": "APPROVE", "error": "", "duration_ms": 1.0, "embedded": "off",
        "servers": [], "config_generation": 1,
        "seq": json(last)["seq"].as_u64().unwrap() + 1, "prev": sha256_hex(last.as_bytes()),
    })
    .to_string();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&s.log)
        .unwrap();
    std::io::Write::write_all(&mut f, format!("{fake}\n").as_bytes()).unwrap();
    drop(f);

    let gw = spawn_run(&s.config, s.addr);
    send_n(&s.url, "after", 1).await;
    stop(gw);
    let aside = set_aside(&s.log);
    assert_eq!(aside.len(), 1);
    // The fabricated line stays last in the file set aside: no checkpoint of the gateway seals it.
    assert_eq!(lines(&aside[0]).last().unwrap(), &fake);
    let first = assert_discontinuity(&s.log, &aside[0]);
    assert_eq!(first["checkpoint"]["found"]["unsealed_lines"], 1);
    assert_eq!(request_ids(&[&s.log]), vec!["after-0".to_owned()]);
    // Pinned verify no longer calls the fabricated record proven: the old file ends unsealed.
    let key = keys().gateway.spki.to_str().unwrap().to_owned();
    let (code, out, _) = verify(&[&aside[0]], &["--key", &key]);
    assert_eq!(code, 1, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_file_renamed_over_the_live_log_is_set_aside_not_continued() {
    let ds = Downstream::start("approver", &keys().servers[0], always(Answer::approve()), 0).await;
    let s = setup(&ds, "");
    let stderr = s.dir.path().join("stderr.log");
    let gw = spawn_logged(&s.config, s.addr, &stderr, None);
    send_n(&s.url, "real", 2).await;
    // A copy of the log without its real approvals, plus a fake one, renamed over the live log.
    let all = lines(&s.log);
    let planted: String = all[..2]
        .iter()
        .map(|l| format!("{l}\n"))
        .chain(std::iter::once(
            "{\"request_id\":\"planted\",\"status\":0,\"action\":\"APPROVE\"}\n".to_owned(),
        ))
        .collect();
    let tmp = s.dir.path().join("planted.tmp");
    std::fs::write(&tmp, &planted).unwrap();
    std::fs::rename(&tmp, &s.log).unwrap();
    send_n(&s.url, "next", 1).await;
    let aside = set_aside(&s.log);
    assert_eq!(aside.len(), 1);
    assert_eq!(std::fs::read_to_string(&aside[0]).unwrap(), planted);
    let first = assert_discontinuity(&s.log, &aside[0]);
    assert_eq!(request_ids(&[&s.log]), vec!["next-0".to_owned()]);
    assert!(!std::fs::read_to_string(&s.log)
        .unwrap()
        .contains("planted\""));
    assert!(first["seq"].as_u64().unwrap() > json(all.last().unwrap())["seq"].as_u64().unwrap());
    assert_eq!(
        metric_at(s.addr, "tss_gateway_audit_discontinuities_total").await,
        1.0
    );
    assert_eq!(errors_mentioning(&stderr, "set aside"), 1);
    stop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_the_restart_begins_with_a_discontinuity_and_seq_goes_on() {
    let ds = Downstream::start("approver", &keys().servers[0], always(Answer::approve()), 0).await;
    let s = setup(&ds, "");
    let mut gw = spawn_run(&s.config, s.addr);
    send_n(&s.url, "before", 3).await;
    kill(&gw, "KILL");
    gw.wait().unwrap();
    let before = lines(&s.log);
    let last_seq = json(before.last().unwrap())["seq"].as_u64().unwrap();
    let gw = spawn_run(&s.config, s.addr);
    send_n(&s.url, "after", 1).await;
    stop(gw);
    let aside = set_aside(&s.log);
    assert_eq!(aside.len(), 1);
    assert_eq!(lines(&aside[0]), before);
    let first = assert_discontinuity(&s.log, &aside[0]);
    assert_eq!(first["seq"], last_seq + 1);
    assert_eq!(first["checkpoint"]["found"]["last_seq"], last_seq);
    // After a crash the gateway knows no head (contract section 8): the head saved at start-up
    // only said how far seq got, so the new chain starts from 64 zeros.
    assert_eq!(first["prev"], "0".repeat(64));
    // The new file verifies on its own, a new chain from its discontinuity checkpoint; the file
    // set aside verifies as the live file the crash left.
    let (code, out, _) = verify(&[&s.log], &[]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = verify(&[&aside[0]], &["--live"]);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_checkpoint_is_witnessed_on_stderr_and_in_the_seq_gauge() {
    let ds = Downstream::start("approver", &keys().servers[0], always(Answer::approve()), 0).await;
    let s = setup(&ds, "audit_checkpoint_every: 2\naudit_checkpoint_ms: 0\n");
    let stderr = s.dir.path().join("stderr.log");
    let gw = spawn_logged(&s.config, s.addr, &stderr, Some("export RUST_LOG=error"));
    send_n(&s.url, "w", 4).await;
    let file = lines(&s.log);
    let last_cp = file
        .iter()
        .rev()
        .map(|l| json(l))
        .find(|r| r.get("checkpoint").is_some())
        .unwrap();
    assert_eq!(
        metric_at(s.addr, "tss_gateway_audit_seq").await,
        last_cp["seq"].as_f64().unwrap()
    );
    stop(gw);
    let file = lines(&s.log);
    let witnesses: Vec<serde_json::Value> = std::fs::read_to_string(&stderr)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("audit_checkpoint").is_some())
        .collect();
    let checkpoints = file
        .iter()
        .filter(|l| json(l).get("checkpoint").is_some())
        .count();
    // start, two intervals, shutdown: each witnessed, whatever the log level.
    assert_eq!(checkpoints, 4);
    assert_eq!(witnesses.len(), checkpoints);
    for w in &witnesses {
        let seq = w["audit_checkpoint"]["seq"].as_u64().unwrap();
        let line = &file[seq as usize - 1];
        assert_eq!(
            w["audit_checkpoint"]["line_sha256"],
            sha256_hex(line.as_bytes())
        );
        assert_eq!(
            w["audit_checkpoint"]["signature"],
            json(line)["checkpoint"]["signature"]
        );
        assert_eq!(w["path"], s.log.display().to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_file_and_its_head_are_created_0600_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let ds = Downstream::start("approver", &keys().servers[0], always(Answer::approve()), 0).await;
    let s = setup(&ds, "");
    let stderr = s.dir.path().join("stderr.log");
    let gw = spawn_logged(&s.config, s.addr, &stderr, Some("umask 000"));
    send_n(&s.url, "m", 1).await;
    stop(gw);
    let head = s.dir.path().join("audit.jsonl.head");
    for f in [&s.log, &head] {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    // The head is the shutdown checkpoint, the file's last line.
    let saved = std::fs::read_to_string(&head).unwrap();
    assert_eq!(saved.trim_end(), lines(&s.log).last().unwrap());
    assert_eq!(json(&saved)["checkpoint"]["reason"], "shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_on_a_busy_port_leaves_the_saved_head_and_the_chain_untouched() {
    let ds = Downstream::start("approver", &keys().servers[0], always(Answer::approve()), 0).await;
    let s = setup(&ds, "");
    let gw = spawn_run(&s.config, s.addr);
    send_n(&s.url, "one", 2).await;
    stop(gw);
    let head = s.dir.path().join("audit.jsonl.head");
    let saved = std::fs::read(&head).unwrap();
    let rotated = s.dir.path().join("audit.jsonl.1");
    std::fs::rename(&s.log, &rotated).unwrap();
    // The port is taken: the start fails before it opens the audit log.
    let busy = std::net::TcpListener::bind(s.addr).unwrap();
    let mut failed = Command::new(BIN)
        .args(["run", "-c", s.config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = failed.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    drop(busy);
    assert_eq!(std::fs::read(&head).unwrap(), saved, ".head changed");
    assert!(!s.log.exists(), "a failed start created the audit log");

    let gw = spawn_run(&s.config, s.addr);
    send_n(&s.url, "two", 1).await;
    stop(gw);
    let new = lines(&s.log);
    assert_eq!(
        json(&new[0])["prev"],
        sha256_hex(lines(&rotated).last().unwrap().as_bytes())
    );
    assert!(set_aside(&s.log).is_empty());
    let (code, out, err) = verify(&[&rotated, &s.log], &[]);
    assert_eq!(code, 0, "{out}{err}");
}

// === a disk that stalls or fails (issue 20 items 3, 4; issue 19 item 5) ===

/// GET `path` on the gateway at `addr`: HTTP status and body, or `None` if no answer within 3 s.
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let resp = client
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_audit_disk_fails_requests_closed_and_freezes_nothing_else() {
    let ds = Downstream::start("approver", &keys().servers[0], always(Answer::approve()), 0).await;
    let s = setup(&ds, "deadline_ms: 1000\n");
    let gw = spawn_run(&s.config, s.addr);
    send_n(&s.url, "ok", 1).await;
    // A FIFO nobody reads stands in for a hung disk: the writer follows the "rotation" to it and
    // blocks once the pipe's buffer is full.
    std::fs::remove_file(&s.log).unwrap();
    let made = Command::new("mkfifo").arg(&s.log).status().unwrap();
    assert!(made.success());
    let mut stalled = None;
    for i in 0..2000 {
        let reply = send(&s.url, &request("key_sign", &format!("fill-{i}"))).await;
        if reply.response.status != 0 {
            stalled = Some(reply);
            break;
        }
    }
    let reply = stalled.expect("the writer never stalled");
    // Fails closed, by its deadline (1 s; the writer gets at least 0.5 s after the decision).
    assert_eq!(reply.response.status, 30, "{:?}", reply.response);
    assert_eq!(reply.response.action, "REJECT");
    assert!(
        reply.response.error.contains("audit log unavailable"),
        "{}",
        reply.response.error
    );
    assert!(
        reply.elapsed < Duration::from_secs(5),
        "{:?}",
        reply.elapsed
    );
    // The admin endpoints answer, and say the gateway is not ready.
    let (code, body) = get(s.addr, "/healthz").await.expect("/healthz answers");
    assert_eq!(code, 200, "{body}");
    let (code, body) = get(s.addr, "/metrics").await.expect("/metrics answers");
    assert_eq!(code, 200);
    assert!(body.contains("tss_gateway_audit_seq"), "{body}");
    let (code, body) = get(s.addr, "/readyz").await.expect("/readyz answers");
    assert_eq!(code, 503, "{body}");
    assert_eq!(json(&body)["ready"], false);
    assert!(
        json(&body)["reason"].as_str().unwrap().contains("audit"),
        "{body}"
    );
    // SIGTERM: the process exits 0 within seconds, without its final checkpoint.
    let started = Instant::now();
    kill(&gw, "TERM");
    let mut gw = gw;
    let status = loop {
        if let Some(status) = gw.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "SIGTERM did not stop the gateway"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_new_audit_file_cannot_be_created_requests_fail_and_readyz_says_why() {
    let ds = Downstream::start("approver", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry(&ds, "")], "audit_log: audit.jsonl").await;
    let log = gw.dir.path().join("audit.jsonl");
    send_n(&gw.url(), "a", 1).await;
    let (code, _) = get(gw.addr, "/readyz").await.unwrap();
    assert_eq!(code, 200);
    // Rotated away, and a directory where the new file should go.
    std::fs::rename(&log, gw.dir.path().join("audit.jsonl.1")).unwrap();
    std::fs::create_dir(&log).unwrap();
    send(&gw.url(), &request("key_sign", "b-0")).await.expect(
        30,
        "REJECT",
        &["audit log unavailable"],
    );
    let (code, body) = get(gw.addr, "/readyz").await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert_eq!(json(&body)["ready"], false);
    assert!(
        json(&body)["reason"]
            .as_str()
            .unwrap()
            .contains("audit.jsonl"),
        "{body}"
    );
    assert!(gw.metric("tss_gateway_audit_write_failures_total") >= 1.0);
    // Fixed: ready again without any traffic, and approvals are recorded again.
    std::fs::remove_dir(&log).unwrap();
    let started = Instant::now();
    while get(gw.addr, "/readyz").await.unwrap().0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never ready again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    send_n(&gw.url(), "c", 1).await;
    assert_eq!(request_ids(&[&log]), vec!["c-0".to_owned()]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_fails_part_way_leaves_no_partial_line_and_no_approval_without_its_record() {
    use std::os::unix::process::CommandExt;
    let ds = Downstream::start("approver", &keys().servers[0], always(Answer::approve()), 0).await;
    let s = setup(&ds, "audit_checkpoint_ms: 0\naudit_checkpoint_every: 3\n");
    // Files this process writes may not grow beyond 6,000 bytes: a write crossing it is cut
    // short, the next fails with EFBIG (the gateway ignores SIGXFSZ).
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "-c", s.config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only setrlimit, async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            rlimit::setrlimit(rlimit::Resource::FSIZE, 6000, 6000)?;
            Ok(())
        });
    }
    let gw = cmd.spawn().unwrap();
    let started = Instant::now();
    while std::net::TcpStream::connect(s.addr).is_err() {
        assert!(started.elapsed() < Duration::from_secs(20), "did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut approved = Vec::new();
    let mut failed = Vec::new();
    for i in 0..40 {
        let id = format!("f-{i}");
        let reply = send(&s.url, &request("key_sign", &id)).await;
        if reply.approved() {
            approved.push(id);
        } else {
            assert_eq!(reply.response.status, 30, "{:?}", reply.response);
            failed.push(id);
        }
    }
    assert!(!failed.is_empty(), "the size limit was never reached");
    let text = std::fs::read_to_string(&s.log).unwrap();
    assert!(text.ends_with('\n'), "a partial line was left");
    for l in text.lines() {
        json(l);
    }
    // Every approval has its record; no answer with status 30 has an APPROVE record.
    assert_eq!(request_ids(&[&s.log]), approved);
    let (code, out, _) = verify(&[&s.log], &["--live"]);
    assert_eq!(code, 0, "{out}");
    stop(gw);
}

// === junk and reloads in the chain (issue 19 item 4, issue 19 item 3) ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_junk_tokens_writes_few_lines_and_every_refusal_is_counted() {
    let ds = Downstream::start("approver", &keys().servers[0], always(Answer::approve()), 0).await;
    let s = setup(&ds, "");
    let gw = spawn_run(&s.config, s.addr);
    const N: usize = 2000;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let url = s.url.clone();
            tokio::spawn(async move {
                for _ in 0..N / 8 {
                    post_token(&url, "x").await.expect(20, "REJECT", &[]);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // Refusals recorded one by one plus those summed up in `refused` records: all of them.
    let refused = |log: &Path| -> u64 {
        lines(log)
            .iter()
            .map(|l| json(l))
            .map(|r| {
                if r["status"] == 20 && r.get("request_id").is_some() {
                    1
                } else {
                    r["refused"]["count"].as_u64().unwrap_or(0)
                }
            })
            .sum()
    };
    until(20, "the refusals were not all recorded", || {
        refused(&s.log) == N as u64
    })
    .await;
    let invalid = metric_at(
        s.addr,
        "tss_gateway_requests_total{outcome=\"invalid_token\",type=\"unknown\"}",
    )
    .await;
    assert_eq!(invalid, N as f64);
    stop(gw);
    let all = lines(&s.log);
    assert!(all.len() < 200, "{} lines for {N} junk requests", all.len());
    assert!(all.iter().any(|l| json(l).get("refused").is_some()));
    let (code, out, err) = verify(&[&s.log], &["--key", keys().gateway.spki.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_loaded_config_is_recorded_and_a_removed_enforcing_server_is_warned_about() {
    let k = keys();
    let a = Downstream::start("a", &k.servers[0], always(Answer::approve()), 0).await;
    let b = Downstream::start("b", &k.servers[1], always(Answer::approve()), 0).await;
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let config = dir.path().join("gateway.yaml");
    let yaml = |servers: &[common::gateway::Entry<'_>]| {
        config_yaml(addr, servers, "audit_log: audit.jsonl\n")
    };
    std::fs::write(&config, yaml(&[entry(&a, ""), entry(&b, "")])).unwrap();
    let log = dir.path().join("audit.jsonl");
    let stderr = dir.path().join("stderr.log");
    let gw = spawn_logged(&config, addr, &stderr, None);
    let tmp = dir.path().join("gateway.yaml.tmp");
    std::fs::write(&tmp, yaml(&[entry(&a, "")])).unwrap();
    std::fs::rename(&tmp, &config).unwrap();
    kill(&gw, "HUP");
    let configs = || -> Vec<serde_json::Value> {
        lines(&log)
            .iter()
            .map(|l| json(l))
            .filter_map(|r| r.get("config").cloned())
            .collect()
    };
    until(20, "no config record for the reload", || {
        configs().len() >= 2
    })
    .await;
    stop(gw);
    let c = configs();
    assert_eq!(c[0]["reason"], "start");
    assert_eq!(c[0]["generation"], 1);
    assert_eq!(c[0]["added"], serde_json::json!(["a", "b"]));
    assert_eq!(c[0]["servers"][1]["mode"], "enforce");
    assert_eq!(c[0]["sha256"].as_str().unwrap().len(), 64, "{}", c[0]);
    let reload = c.last().unwrap();
    assert!(reload["generation"].as_u64().unwrap() >= 2);
    assert_eq!(reload["removed"], serde_json::json!(["b"]));
    assert_eq!(reload["servers"].as_array().unwrap().len(), 1);
    assert_eq!(
        reload["sha256"],
        sha256_hex(&std::fs::read(&config).unwrap())
    );
    let warned = std::fs::read_to_string(&stderr)
        .unwrap()
        .lines()
        .any(|l| l.contains("\"WARN\"") && l.contains("enforcing") && l.contains("\"b\""));
    assert!(warned, "no WARN naming b");
    let (code, out, _) = verify(&[&log], &[]);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_emptied_in_place_is_simply_used_and_the_chain_goes_on() {
    let ds = Downstream::start("approver", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(
        &[entry(&ds, "")],
        "audit_log: audit.jsonl\naudit_checkpoint_ms: 0",
    )
    .await;
    let log = gw.dir.path().join("audit.jsonl");
    send_n(&gw.url(), "a", 1).await;
    let before = lines(&log);
    // logrotate's `copytruncate`: copied, then emptied in place (same inode).
    std::fs::File::create(&log).unwrap();
    send_n(&gw.url(), "b", 1).await;
    let after = lines(&log);
    assert_eq!(
        json(&after[0])["prev"],
        sha256_hex(before.last().unwrap().as_bytes())
    );
    assert!(set_aside(&log).is_empty());
    assert_eq!(request_ids(&[&log]), vec!["b-0".to_owned()]);
    gw.stop().await;
}
