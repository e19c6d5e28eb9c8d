//! `audit verify` on audit files built here, line by line, with real RSA signatures (issue 19
//! item 1, issue 21 items 2 and 6): keys across a rotation, a key not pinned, nothing signed,
//! witness logs that catch a file cut at an earlier checkpoint, discontinuities, a file that is
//! not an audit log, and every kind of record.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use common::gateway::{config_yaml, BIN};
use common::keys::{keys, KeyPair};
use common::sha256_hex;
use serde_json::{json, Value};

/// Exit code and stdout+stderr of `audit verify EXTRA... FILES...`.
fn verify(files: &[&Path], extra: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(["audit", "verify"])
        .args(extra)
        .args(files)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn spki_der(key: &KeyPair) -> Vec<u8> {
    pem::parse(key.public_pem()).unwrap().contents().to_vec()
}

/// The key id `audit verify` prints: SHA-256 of the SPKI DER.
fn key_id(key: &KeyPair) -> String {
    sha256_hex(&spki_der(key))
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An audit chain written the way the gateway writes it (CONTRACT.md section 8): each line a
/// JSON object with `seq` and `prev` appended; checkpoints signed with RS256 (jsonwebtoken's
/// signer, not the gateway's) over the documented message.
#[derive(Clone)]
struct Chain {
    lines: Vec<String>,
    head: String,
    seq: u64,
}

/// A checkpoint as the gateway also writes it to its own log: one witness line.
#[derive(Clone)]
struct Witness {
    seq: u64,
    line: String,
}

impl Chain {
    fn new() -> Chain {
        Chain {
            lines: Vec::new(),
            head: "0".repeat(64),
            seq: 0,
        }
    }

    /// A new file continuing this chain (after a rotation).
    fn next_file(&self) -> Chain {
        Chain {
            lines: Vec::new(),
            ..self.clone()
        }
    }

    fn ts(seq: u64) -> String {
        format!("2026-12-01T00:{:02}:{:02}.000000Z", seq / 60, seq % 60)
    }

    /// Appends `body` at `seq` (the next one unless a jump is asked for).
    fn push_at(&mut self, body: Value, seq: u64) -> String {
        let text = serde_json::to_string(&body).unwrap();
        let open = text.strip_suffix('}').unwrap();
        let sep = if open.len() > 1 { "," } else { "" };
        let line = format!("{open}{sep}\"seq\":{seq},\"prev\":\"{}\"}}", self.head);
        self.head = sha256_hex(line.as_bytes());
        self.seq = seq;
        self.lines.push(line.clone());
        line
    }

    fn push(&mut self, body: Value) -> String {
        self.push_at(body, self.seq + 1)
    }

    fn decision(&mut self, id: &str) {
        self.push(json!({
            "ts": Chain::ts(self.seq + 1), "request_id": id, "type": "KeySign", "status": 0,
            "action": "APPROVE", "error": "", "duration_ms": 1.5, "embedded": "approved",
            "servers": [], "config_generation": 1,
        }));
    }

    fn decisions(&mut self, prefix: &str, n: usize) {
        for i in 0..n {
            self.decision(&format!("{prefix}-{i}"));
        }
    }

    /// A checkpoint at `seq` signed by `key`; returns its witness line.
    fn checkpoint_at(
        &mut self,
        key: &KeyPair,
        reason: &str,
        found: Option<Value>,
        seq: u64,
    ) -> Witness {
        let ts = Chain::ts(seq);
        let message = format!(
            "tss-callback-gateway audit checkpoint v1\nprev {}\nseq {seq}\nts {ts}\nreason {reason}\n",
            self.head
        );
        let sig = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &key.encoding(),
            jsonwebtoken::Algorithm::RS256,
        )
        .unwrap();
        let b64 = base64::engine::general_purpose::STANDARD;
        let sig = b64.encode(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(sig)
                .unwrap(),
        );
        let mut cp = json!({
            "reason": reason, "key_id": key_id(key),
            "public_key": b64.encode(spki_der(key)), "signature": sig,
        });
        if let Some(found) = found {
            cp["found"] = found;
        }
        let line = self.push_at(json!({"ts": ts, "checkpoint": cp}), seq);
        let witness = json!({
            "audit_checkpoint": {
                "seq": seq, "line_sha256": sha256_hex(line.as_bytes()),
                "key_id": key_id(key), "signature": sig,
            },
            "path": "/var/lib/tss-gateway/decisions.jsonl", "ts": ts,
        });
        Witness {
            seq,
            line: witness.to_string(),
        }
    }

    fn checkpoint(&mut self, key: &KeyPair, reason: &str) -> Witness {
        self.checkpoint_at(key, reason, None, self.seq + 1)
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        write_lines(dir, name, &self.lines)
    }
}

fn write_lines(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let path = dir.join(name);
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, text).unwrap();
    path
}

/// The gateway's own log as a log pipeline keeps it: text lines, JSON log lines and, among
/// them, the witness lines of `witnesses`.
fn gateway_log(dir: &Path, name: &str, witnesses: &[&Witness]) -> PathBuf {
    let mut lines = vec![
        "2026-12-01T00:00:00.000000Z  INFO tss_callback_gateway: listening listen=127.0.0.1:11020"
            .to_owned(),
        r#"{"level":"INFO","message":"config loaded","generation":1}"#.to_owned(),
    ];
    for w in witnesses {
        lines.push(w.line.clone());
        lines.push(
            r#"{"level":"INFO","message":"answered","request_id":"x","status":0}"#.to_owned(),
        );
        lines.push("2026-12-01T00:00:01.000000Z  WARN status 30: downstream timeout".to_owned());
    }
    write_lines(dir, name, &lines)
}

#[test]
fn checkpoints_verify_across_a_key_rotation_and_a_key_not_pinned_is_reported_as_not_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (old, new) = (&keys().gateway, &keys().intruder);
    let mut c = Chain::new();
    c.decisions("a", 3);
    c.checkpoint(old, "interval");
    c.decisions("b", 2);
    c.checkpoint(old, "shutdown");
    c.decisions("c", 2);
    c.checkpoint(new, "idle");
    let log = c.write(d, "rotated.jsonl");

    // Both keys given (repeated --key, or -c and --key): intact.
    let (code, out) = verify(
        &[&log],
        &["--key", path(&old.spki), "--key", path(&new.spki)],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("7 records") && out.contains("3 checkpoints verified"),
        "{out}"
    );
    assert!(out.contains("signed by pinned key"), "{out}");
    let config = d.join("gateway.yaml");
    std::fs::write(
        &config,
        config_yaml(
            "127.0.0.1:1".parse().unwrap(),
            &[],
            "embedded_risk_control_rules:\n  enable: true\n",
        ),
    )
    .unwrap();
    let (code, out) = verify(&[&log], &["-c", path(&config), "--key", path(&new.spki)]);
    assert_eq!(code, 0, "{out}");

    // Only the old key pinned (the README's -c after a rotation): the checkpoint by the new key
    // is reported as not pinned, naming its key, never as tampering.
    let not_pinned = format!(
        "NOT PINNED {}:10: checkpoint signed by key sha256:{} which you did not pin (give it with --key if it is an old gateway key)",
        log.display(),
        key_id(new)
    );
    for pin in [["--key", path(&old.spki)], ["-c", path(&config)]] {
        let (code, out) = verify(&[&log], &pin);
        assert_eq!(code, 1, "{out}");
        assert!(out.contains(&not_pinned), "{not_pinned:?} not in {out:?}");
        assert!(!out.contains("BROKEN"), "{out}");
    }
    // Only the new key pinned: the first checkpoint, by the old key, is the one not pinned.
    let (code, out) = verify(&[&log], &["--key", path(&new.spki)]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "NOT PINNED {}:4: checkpoint signed by key sha256:{}",
            log.display(),
            key_id(old)
        )),
        "{out}"
    );

    // A signature that does not verify stays tampering, pinned or not.
    let mut t = c.lines.clone();
    let sig = serde_json::from_str::<Value>(&t[3]).unwrap()["checkpoint"]["signature"]
        .as_str()
        .unwrap()
        .to_owned();
    let flipped = format!(
        "{}{}",
        if sig.starts_with('A') { "B" } else { "A" },
        &sig[1..]
    );
    t[3] = t[3].replace(&sig, &flipped);
    let bad = write_lines(d, "badsig.jsonl", &t);
    for pins in [
        vec![],
        vec!["--key", path(&old.spki), "--key", path(&new.spki)],
    ] {
        let (code, out) = verify(&[&bad], &pins);
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains(&format!(
                "BROKEN {}:4: bad checkpoint: signature does not verify",
                bad.display()
            )),
            "{out}"
        );
    }
}

#[test]
fn with_a_pinned_key_files_that_hold_nothing_signed_by_it_fail() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = path(&keys().gateway.spki);
    // An emptied file.
    let empty = write_lines(d, "emptied.jsonl", &[]);
    // A hand-written file with no checkpoint at all, passed as a live log (the replay recipe).
    let mut c = Chain::new();
    c.decisions("forged", 3);
    let forged = c.write(d, "forged.jsonl");
    for (file, extra) in [
        (&empty, vec!["--key", key]),
        (&empty, vec!["--key", key, "--live"]),
        (&forged, vec!["--key", key, "--live"]),
    ] {
        let (code, out) = verify(&[file], &extra);
        assert_eq!(code, 1, "{extra:?} {}: {out}", file.display());
        assert!(out.contains("nothing signed by this key"), "{out}");
    }
    // Unpinned, a live file without a checkpoint still only proves consistency, as it says.
    let (code, out) = verify(&[&forged], &["--live"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("3 records after the last checkpoint"), "{out}");
}

#[test]
fn a_file_cut_at_an_earlier_checkpoint_is_caught_by_the_witness_log() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = &keys().gateway;
    let mut c = Chain::new();
    c.decisions("a", 2);
    let w1 = c.checkpoint(key, "start");
    c.decisions("b", 2);
    let w2 = c.checkpoint(key, "idle");
    let cut_at = c.lines.len();
    c.decisions("c", 2);
    let w3 = c.checkpoint(key, "shutdown");
    let whole = c.write(d, "decisions.jsonl");
    let cut = write_lines(d, "cut.jsonl", &c.lines[..cut_at]);
    let log = gateway_log(d, "gateway.log", &[&w1, &w2, &w3]);
    let pin = ["--key", path(&key.spki)];

    // Without a witness the cut file verifies (a valid chain closed by a checkpoint), and the
    // summary says that this is not proven.
    let (code, out) = verify(&[&cut], &pin);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(
            "not witnessed: a cut at an earlier checkpoint cannot be detected without --witness"
        ),
        "{out}"
    );

    // With the gateway's log as witness: the cut names the third checkpoint's seq.
    let (code, out) = verify(&[&cut], &[&pin[..], &["--witness", path(&log)]].concat());
    assert_eq!(code, 1, "{out}");
    let missing = format!(
        "MISSING seq {} witnessed in {}:{} is not in the files: cut after seq {}",
        w3.seq,
        log.display(),
        3 + 3 * 2,
        w2.seq
    );
    assert!(out.contains(&missing), "{missing:?} not in {out:?}");
    // The whole file passes, and says how far the witness reaches.
    let (code, out) = verify(&[&whole], &[&pin[..], &["--witness", path(&log)]].concat());
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "witnessed up to seq {} (3 witnessed checkpoints found)",
            w3.seq
        )),
        "{out}"
    );
    assert!(!out.contains("not witnessed"), "{out}");
    // Witnesses spread over two logs (a rotated gateway log) count alike.
    let log1 = gateway_log(d, "gateway.log.1", &[&w1, &w2]);
    let log2 = gateway_log(d, "gateway.log.2", &[&w3]);
    let two = ["--witness", path(&log1), "--witness", path(&log2)];
    let (code, out) = verify(&[&cut], &two);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "MISSING seq {} witnessed in {}:3",
            w3.seq,
            log2.display()
        )),
        "{out}"
    );
    assert_eq!(verify(&[&whole], &two).0, 0);

    // A chain rebuilt from the same seqs (a checkpoint re-signed by whoever holds the key, or a
    // different file) differs from the witness at that line.
    let mut other = Chain::new();
    other.decisions("a", 2);
    other.checkpoint(key, "start");
    other.decisions("forged", 2);
    other.checkpoint(key, "idle");
    other.decisions("c", 2);
    other.checkpoint(key, "shutdown");
    let forged = other.write(d, "forged.jsonl");
    let (code, out) = verify(&[&forged], &["--witness", path(&log)]);
    assert_eq!(code, 1, "{out}");
    let differs = format!(
        "BROKEN {}:{}: seq {} differs from the witnessed checkpoint ({}:6)",
        forged.display(),
        w2.seq,
        w2.seq,
        log.display()
    );
    assert!(out.contains(&differs), "{differs:?} not in {out:?}");

    // A log with no witness line at all (the wrong log) proves nothing.
    let none = gateway_log(d, "other.log", &[]);
    let (code, out) = verify(&[&whole], &["--witness", path(&none)]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("NO WITNESS"), "{out}");
}

#[test]
fn witnesses_of_older_files_not_given_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = &keys().gateway;
    let mut first = Chain::new();
    first.decisions("a", 2);
    let w1 = first.checkpoint(key, "rotation");
    let mut second = first.next_file();
    second.decisions("b", 2);
    let w2 = second.checkpoint(key, "idle");
    second.decisions("c", 1);
    let w3 = second.checkpoint(key, "shutdown");
    let (f1, f2) = (first.write(d, "d.jsonl.1"), second.write(d, "d.jsonl"));
    let log = gateway_log(d, "gateway.log", &[&w1, &w2, &w3]);
    let (code, out) = verify(&[&f2], &["--mid-chain", "--witness", path(&log)]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "witnessed up to seq {} (2 witnessed checkpoints found, 1 older skipped",
            w3.seq
        )),
        "{out}"
    );
    let (code, out) = verify(&[&f1, &f2], &["--witness", path(&log)]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("(3 witnessed checkpoints found)"), "{out}");
    // The newest file deleted: the witness names its first checkpoint.
    let (code, out) = verify(&[&f1], &["--witness", path(&log)]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("MISSING seq {} ", w2.seq)), "{out}");
}

#[test]
fn a_discontinuity_checkpoint_is_warned_about_and_chains_only_to_the_head_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = &keys().gateway;
    let found = |file: &str, last_seq: u64| json!({"file": file, "last_seq": last_seq, "unsealed_lines": 2});
    let mut known = Chain::new();
    known.decisions("a", 3);
    known.checkpoint(key, "shutdown");
    let known_file = known.write(d, "d.jsonl.1");

    // The gateway found a file it could not prove its own (planted, last seq 40), set it aside
    // and began a new file continuing the head it knew, with seq past both.
    let aside = "/audit/d.jsonl.discontinuity-20261201T000000Z";
    let mut next = known.next_file();
    let w = next.checkpoint_at(key, "discontinuity", Some(found(aside, 40)), 41);
    next.decisions("b", 2);
    next.checkpoint(key, "shutdown");
    let next_file = next.write(d, "d.jsonl");
    let log = gateway_log(d, "gateway.log", &[&w]);
    let (code, out) = verify(
        &[&known_file, &next_file],
        &["--key", path(&key.spki), "--witness", path(&log)],
    );
    assert_eq!(code, 0, "{out}");
    let warning = format!("WARNING {}:1: discontinuity", next_file.display());
    assert!(out.contains(&warning), "{warning:?} not in {out:?}");
    assert!(
        out.contains(aside) && out.contains("last seq 40, 2 unsealed lines"),
        "{out}"
    );
    assert!(
        out.contains("5 records in 2 file(s)") && out.contains("1 discontinuity"),
        "{out}"
    );

    // After a crash the gateway knows no head: a new chain from 64 zeros, fine as the first file.
    let mut fresh = Chain::new();
    fresh.checkpoint_at(key, "discontinuity", Some(found(aside, 17)), 18);
    fresh.decisions("c", 1);
    fresh.checkpoint(key, "shutdown");
    let fresh_file = fresh.write(d, "fresh.jsonl");
    let (code, out) = verify(&[&fresh_file], &["--key", path(&key.spki)]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "WARNING {}:1: discontinuity",
            fresh_file.display()
        )),
        "{out}"
    );
    assert!(out.contains("a new chain starts here"), "{out}");
    // ...but after another file it does not continue that file's chain.
    let (code, out) = verify(&[&known_file, &fresh_file], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "BROKEN {}:1: a new chain starts here",
            fresh_file.display()
        )),
        "{out}"
    );

    // A discontinuity whose prev is not the last line of the file before it: broken.
    let mut elsewhere = known.clone();
    elsewhere.decision("unseen");
    elsewhere.checkpoint(key, "shutdown");
    let mut after = elsewhere.next_file();
    after.checkpoint_at(key, "discontinuity", Some(found(aside, 3)), 9);
    after.checkpoint(key, "shutdown");
    let after_file = after.write(d, "after.jsonl");
    let (code, out) = verify(&[&known_file, &after_file], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "BROKEN {}:1: deleted or edited: this discontinuity checkpoint continues from head",
            after_file.display()
        )),
        "{out}"
    );
    // The gateway was killed after writing more lines than its saved head: it continues from
    // that head, an earlier line of the file it set aside. Each part verifies on its own.
    let mut killed = known.clone();
    killed.decision("after-head");
    killed.checkpoint(key, "idle");
    killed.decision("unsealed");
    let killed_file = killed.write(d, "killed.jsonl");
    let mut resumed = known.next_file();
    resumed.checkpoint_at(key, "discontinuity", Some(found("killed.jsonl", 7)), 8);
    resumed.checkpoint(key, "shutdown");
    let resumed_file = resumed.write(d, "resumed.jsonl");
    // Given together, the unsealed last line of the killed file fails first (not the last
    // file), said as set aside; without that line, the fork is named.
    let (code, out) = verify(&[&killed_file, &resumed_file], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "BROKEN {}:8: set aside: the next file opens with a discontinuity checkpoint naming this one",
            killed_file.display()
        )),
        "{out}"
    );
    let forks = format!(
        "the chain forks: this discontinuity checkpoint continues from {}:4 (seq 4)",
        d.join("killed-sealed.jsonl").display()
    );
    let sealed_file = write_lines(d, "killed-sealed.jsonl", &killed.lines[..6]);
    let (code, out) = verify(&[&sealed_file, &resumed_file], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&forks.replace("killed.jsonl", "killed-sealed.jsonl")),
        "{out}"
    );
    // The file after a discontinuity given alone continues a head it does not hold: named,
    // and verified from there with --mid-chain.
    let (code, out) = verify(&[&resumed_file], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "BROKEN {}:1: deleted: this file opens with a discontinuity checkpoint",
            resumed_file.display()
        )),
        "{out}"
    );
    let (code, out) = verify(&[&resumed_file], &["--mid-chain", "--key", path(&key.spki)]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("the chain continues here"), "{out}");

    // Seq may jump forward only at a discontinuity checkpoint: not at another checkpoint, nor
    // at a discontinuity checkpoint that does not open its file.
    for (reason, leading) in [("shutdown", 0), ("discontinuity", 1)] {
        let mut jump = known.next_file();
        jump.decisions("x", leading);
        jump.checkpoint_at(key, reason, Some(found(aside, 40)), 41 + leading as u64);
        let jump_file = jump.write(d, "jump.jsonl");
        let (code, out) = verify(&[&known_file, &jump_file], &[]);
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains(&format!(
                "BROKEN {}:{}: edited: seq {}",
                jump_file.display(),
                leading + 1,
                41 + leading
            )),
            "{reason}: {out}"
        );
    }
}

#[test]
fn a_file_that_is_not_an_audit_log_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Chain::new();
    c.decisions("a", 1);
    let w = c.checkpoint(&keys().gateway, "shutdown");
    let audit = c.write(d, "d.jsonl");
    // The gateway's own log (text and JSON), a config file: not audit logs.
    let log = gateway_log(d, "gateway.log", &[&w]);
    let json_log = write_lines(
        d,
        "gateway.json.log",
        &[
            r#"{"level":"INFO","message":"listening"}"#.to_owned(),
            w.line.clone(),
        ],
    );
    let yaml = d.join("gateway.yaml");
    std::fs::write(&yaml, "listen: 127.0.0.1:1\n").unwrap();
    for wrong in [&log, &json_log, &yaml] {
        for files in [
            vec![wrong.as_path()],
            vec![audit.as_path(), wrong.as_path()],
        ] {
            let (code, out) = verify(&files, &[]);
            assert_eq!(code, 1, "{out}");
            let expected = format!("{}:1: not an audit log (expected a JSON object with seq and prev; is this the right file?)", wrong.display());
            assert!(out.contains(&expected), "{expected:?} not in {out:?}");
            assert!(!out.contains("edited"), "{out}");
        }
    }
    // An audit log whose first line alone was garbled is still an edit, not the wrong file.
    let mut t = c.lines.clone();
    t[0] = t[0].replacen('{', "[", 1);
    let garbled = write_lines(d, "garbled.jsonl", &t);
    let (code, out) = verify(&[&garbled], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("BROKEN {}:1: edited", garbled.display())),
        "{out}"
    );
}

#[test]
fn every_kind_of_record_chains_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = &keys().gateway;
    let mut c = Chain::new();
    c.checkpoint(key, "start");
    c.push(json!({"ts": Chain::ts(2), "config": {"generation": 1, "sha256": "ab", "reason": "start", "servers": [], "event_servers": [], "added": [], "removed": [], "changed": []}}));
    c.decisions("a", 2);
    c.push(json!({"ts": Chain::ts(5), "shadow": {"request_id": "a-0", "server": "aml", "outcome": "approved", "duration_ms": 900.0, "detail": ""}}));
    c.push(json!({"ts": Chain::ts(6), "refused": {"count": 12, "peers": ["10.0.0.9"]}}));
    c.push(json!({"ts": Chain::ts(7), "event": {"event_id": "e1", "event_type": "request.KeySign.succeeded", "node_id": "n", "request_id": "a-1", "request_type": 3}}));
    c.push(json!({"ts": Chain::ts(8), "alarm": {"kind": "unapproved_execution", "request_id": "zz", "event_id": "e2"}}));
    c.push(json!({"ts": Chain::ts(9), "something_new": {"x": 1}}));
    c.decision("b");
    c.checkpoint(key, "shutdown");
    let file = c.write(d, "kinds.jsonl");
    let (code, out) = verify(&[&file], &["--key", path(&key.spki)]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("intact: 9 records in 1 file(s) (3 decisions, 6 other)"),
        "{out}"
    );
    assert!(out.contains("2 checkpoints verified"), "{out}");
    // An edited record of any kind breaks the chain.
    let mut t = c.lines.clone();
    t[5] = t[5].replace("\"count\":12", "\"count\":1");
    let edited = write_lines(d, "edited.jsonl", &t);
    let (code, out) = verify(&[&edited], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("BROKEN {}:6: edited", edited.display())),
        "{out}"
    );
}

// === key rotation (issue 21 item 2) ===

impl Chain {
    /// A `key_rotated` record as the README documents it: `old_signer` and `new_signer` sign
    /// the statement naming `old` and `new` at this place in the chain (an honest gateway:
    /// each key signs for itself; a forger signs with what it has).
    fn key_rotated_signed(
        &mut self,
        (old, old_signer): (&KeyPair, &KeyPair),
        (new, new_signer): (&KeyPair, &KeyPair),
    ) -> String {
        let seq = self.seq + 1;
        let ts = Chain::ts(seq);
        let message = format!(
            "tss-callback-gateway audit key rotation v1\nprev {}\nseq {seq}\nts {ts}\nold {}\nnew {}\n",
            self.head,
            key_id(old),
            key_id(new)
        );
        let b64 = base64::engine::general_purpose::STANDARD;
        let sign = |key: &KeyPair| {
            let sig = jsonwebtoken::crypto::sign(
                message.as_bytes(),
                &key.encoding(),
                jsonwebtoken::Algorithm::RS256,
            )
            .unwrap();
            b64.encode(
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(sig)
                    .unwrap(),
            )
        };
        self.push(json!({"ts": ts, "key_rotated": {
            "old_key_id": key_id(old), "old_public_key": b64.encode(spki_der(old)),
            "new_key_id": key_id(new), "new_public_key": b64.encode(spki_der(new)),
            "old_signature": sign(old_signer), "new_signature": sign(new_signer),
        }}))
    }

    /// The gateway's rotation from `old` to `new`: a checkpoint by `old`, the record, a
    /// checkpoint by `new`.
    fn rotate(&mut self, old: &KeyPair, new: &KeyPair) {
        self.checkpoint(old, "key_rotated");
        self.key_rotated_signed((old, old), (new, new));
        self.checkpoint(new, "key_rotated");
    }
}

#[test]
fn a_key_rotated_record_makes_the_pinned_key_vouch_for_its_predecessors_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k = keys();
    let (first, old, new) = (&k.servers[2], &k.gateway, &k.intruder);
    let mallory = &k.servers[3];
    let pin = |key: &KeyPair| ["--key", path(&key.spki)].map(str::to_owned);
    let run = |file: &Path, key: &KeyPair| {
        let p = pin(key);
        verify(&[file], &[p[0].as_str(), p[1].as_str()])
    };

    // Two rotations: first -> old -> new. Pinning the newest key trusts both predecessors.
    let mut c = Chain::new();
    c.decisions("a", 2);
    c.checkpoint(first, "start");
    c.rotate(first, old);
    c.decisions("b", 2);
    c.checkpoint(old, "idle");
    let rotation_seq = c.seq + 2;
    c.rotate(old, new);
    c.decisions("c", 2);
    c.checkpoint(new, "shutdown");
    let good = c.write(d, "rotated.jsonl");
    let (code, out) = run(&good, new);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "and before seq {rotation_seq} by its predecessor sha256:{}",
            &key_id(old)[..16]
        )),
        "{out}"
    );
    // The middle key pinned: its predecessor is vouched for, its successor is not pinned.
    let (code, out) = run(&good, old);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("checkpoint signed by key sha256:{}", key_id(new)))
            && out.contains("NOT PINNED"),
        "{out}"
    );
    assert!(!out.contains("BROKEN"), "{out}");

    // The old key, leaked after the rotation, signs lines appended after it: not trusted
    // there, though its checkpoints before the rotation are.
    let mut leaked = c.clone();
    leaked.decisions("after-leak", 1);
    leaked.checkpoint(old, "shutdown");
    let file = leaked.write(d, "leaked.jsonl");
    let (code, out) = run(&file, new);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "NOT PINNED {}:{}: checkpoint signed by key sha256:{}",
            file.display(),
            leaked.lines.len(),
            key_id(old)
        )),
        "{out}"
    );

    // A forger with write access but no gateway key rewrites the history with a key of their
    // own and names it the predecessor of the pinned key. They cannot sign for the pinned key:
    // the record is tampering.
    let mut forged = Chain::new();
    forged.decisions("fake", 3);
    forged.checkpoint(mallory, "idle");
    forged.key_rotated_signed((mallory, mallory), (new, mallory));
    forged.checkpoint(mallory, "key_rotated");
    let file = forged.write(d, "forged.jsonl");
    let (code, out) = run(&file, new);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "BROKEN {}:5: bad key_rotated: new_signature does not verify with new_public_key",
            file.display()
        )),
        "{out}"
    );
    // Or carries a second key of their own as the new one: valid signatures, but no trusted
    // key vouches for either of theirs.
    let mut forged = Chain::new();
    forged.decisions("fake", 3);
    forged.rotate(mallory, first);
    let file = forged.write(d, "forged2.jsonl");
    let (code, out) = run(&file, new);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "NOT PINNED {}:4: checkpoint signed by key sha256:{}",
            file.display(),
            key_id(mallory)
        )),
        "{out}"
    );
    assert!(!out.contains("intact"), "{out}");

    // A genuine record moved elsewhere in the chain no longer verifies: it is bound to its
    // place (prev, seq, ts).
    let genuine: Value = serde_json::from_str(&c.lines[4]).unwrap();
    assert!(genuine.get("key_rotated").is_some(), "{genuine}");
    let mut moved = Chain::new();
    moved.decisions("a", 2);
    moved.checkpoint(first, "start");
    moved.decisions("extra", 1);
    moved.checkpoint(first, "idle");
    moved.push(json!({"ts": genuine["ts"], "key_rotated": genuine["key_rotated"]}));
    moved.checkpoint(old, "key_rotated");
    let file = moved.write(d, "moved.jsonl");
    let (code, out) = run(&file, old);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "BROKEN {}:6: bad key_rotated: old_signature does not verify",
            file.display()
        )),
        "{out}"
    );
    // And a record that does not follow a checkpoint by its old key is refused.
    let mut loose = Chain::new();
    loose.checkpoint(first, "start");
    loose.decisions("a", 1);
    loose.key_rotated_signed((first, first), (old, old));
    loose.checkpoint(old, "key_rotated");
    let file = loose.write(d, "loose.jsonl");
    let (code, out) = run(&file, old);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("bad key_rotated: it does not follow a checkpoint by its old key"),
        "{out}"
    );
}

/// `run -c config` with its stderr (logs and witness lines) going to `stderr`, once it accepts
/// connections on `addr`.
fn spawn_gateway(config: &Path, addr: std::net::SocketAddr, stderr: &Path) -> std::process::Child {
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(stderr)
        .unwrap();
    let child = Command::new(BIN)
        .args(["run", "-c", path(config), "--log-format", "json"])
        .stdout(std::process::Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "gateway did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child
}

/// SIGTERM and a clean exit.
fn stop(mut child: std::process::Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    assert!(child.wait().unwrap().success(), "gateway did not exit 0");
}

/// Asks the gateway at `addr` to approve a KeySign as the TSS Node does; its answer must be
/// signed by `key`.
async fn approved(addr: std::net::SocketAddr, id: &str, key: &KeyPair) -> bool {
    let payload = common::requests::request("key_sign", id);
    let text = common::http::http()
        .post(format!("http://{addr}/v2/check"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(common::node::node_form(&payload))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let token: String = serde_json::from_str(&text).unwrap();
    let answer = common::tokens::open(&token, &key.decoding())
        .unwrap_or_else(|e| panic!("answer not signed by the expected key: {e}"));
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    answer["status"] == 0 && answer["action"] == "APPROVE"
}

/// A folder with a gateway config (embedded rules only) whose `gateway_private_key` is
/// `keys/gateway-pri.pem`, holding `key` for now.
fn rotation_setup(key: &KeyPair) -> (tempfile::TempDir, std::net::SocketAddr, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    std::fs::copy(&key.pkcs8, dir.path().join("keys/gateway-pri.pem")).unwrap();
    let yaml = config_yaml(
        addr,
        &[],
        "audit_log: audit.jsonl\nreload_settle_ms: 200\nembedded_risk_control_rules:\n  enable: true\n",
    )
    .replace(path(&keys().gateway.pkcs8), "keys/gateway-pri.pem");
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, yaml).unwrap();
    (dir, addr, config)
}

/// Puts `key` in place of the gateway's private key file, as an operator would (write beside,
/// rename over).
fn replace_key(dir: &Path, key: &KeyPair) {
    let tmp = dir.join("keys/.gateway-pri.pem.new");
    std::fs::copy(&key.pkcs8, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("keys/gateway-pri.pem")).unwrap();
}

fn audit_lines(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotated_by_reload_verifies_with_the_config_alone() {
    let k = keys();
    let (old, new) = (&k.gateway, &k.intruder);
    let (dir, addr, config) = rotation_setup(old);
    let d = dir.path();
    let log = d.join("audit.jsonl");
    let stderr = d.join("gateway.log");
    let gw = spawn_gateway(&config, addr, &stderr);
    for i in 0..3 {
        assert!(approved(addr, &format!("before-{i}"), old).await);
    }
    replace_key(d, new);
    common::until(30, "a key_rotated record after the reload", || {
        audit_lines(&log)
            .iter()
            .any(|l| l.get("key_rotated").is_some())
    })
    .await;
    for i in 0..3 {
        assert!(approved(addr, &format!("after-{i}"), new).await);
    }
    stop(gw);

    // The rotation as written: a checkpoint by the old key, the record both keys sign, a
    // checkpoint by the new key.
    let lines = audit_lines(&log);
    let at = lines
        .iter()
        .position(|l| l.get("key_rotated").is_some())
        .unwrap();
    let r = &lines[at]["key_rotated"];
    assert_eq!(r["old_key_id"], key_id(old).as_str());
    assert_eq!(r["new_key_id"], key_id(new).as_str());
    assert_eq!(lines[at - 1]["checkpoint"]["key_id"], key_id(old).as_str());
    assert_eq!(lines[at - 1]["checkpoint"]["reason"], "key_rotated");
    assert_eq!(lines[at + 1]["checkpoint"]["key_id"], key_id(new).as_str());
    assert!(
        lines[..at]
            .iter()
            .filter_map(|l| l.get("checkpoint"))
            .all(|c| c["key_id"] == key_id(old).as_str()),
        "a checkpoint before the rotation by another key"
    );
    assert!(
        lines[at + 1..]
            .iter()
            .filter_map(|l| l.get("checkpoint"))
            .all(|c| c["key_id"] == key_id(new).as_str()),
        "a checkpoint after the rotation by another key"
    );

    // `-c` (the new key, now in the config) verifies the whole file by itself, witnesses too.
    let (code, out) = verify(&[&log], &["-c", path(&config)]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("6 decisions"), "{out}");
    assert!(out.contains("by its predecessor"), "{out}");
    let (code, out) = verify(&[&log], &["-c", path(&config), "--witness", path(&stderr)]);
    assert_eq!(code, 0, "{out}");
    // The new key alone, and both keys: intact too.
    assert_eq!(verify(&[&log], &["--key", path(&new.spki)]).0, 0);
    let (code, out) = verify(
        &[&log],
        &["--key", path(&old.spki), "--key", path(&new.spki)],
    );
    assert_eq!(code, 0, "{out}");
    // The old key alone: what the new key signed is not pinned, never tampering.
    let (code, out) = verify(&[&log], &["--key", path(&old.spki)]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "NOT PINNED {}:{}: checkpoint signed by key sha256:{}",
            log.display(),
            at + 2,
            key_id(new)
        )),
        "{out}"
    );
    assert!(!out.contains("BROKEN"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotated_across_a_restart_begins_a_new_chain_each_part_verifies_with_its_key() {
    let k = keys();
    let (old, new) = (&k.gateway, &k.intruder);
    let (dir, addr, config) = rotation_setup(old);
    let d = dir.path();
    let log = d.join("audit.jsonl");
    let stderr = d.join("gateway.log");
    let gw = spawn_gateway(&config, addr, &stderr);
    assert!(approved(addr, "before", old).await);
    stop(gw);
    replace_key(d, new);
    let gw = spawn_gateway(&config, addr, &stderr);
    assert!(approved(addr, "after", new).await);
    stop(gw);

    // The saved head is signed by a key the gateway can no longer vouch for: the old file is
    // set aside, and the log says why.
    let aside: Vec<PathBuf> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("audit.jsonl.discontinuity-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    let text = std::fs::read_to_string(&stderr).unwrap();
    assert!(
        text.contains(&format!(
            "signed by key sha256:{}, not by this gateway's key sha256:{}",
            key_id(old),
            key_id(new)
        )),
        "{text}"
    );
    let first = &audit_lines(&log)[0];
    assert_eq!(first["checkpoint"]["reason"], "discontinuity", "{first}");
    assert_eq!(first["prev"], "0".repeat(64), "{first}");

    // Each part verifies with its own key, as the README says; together they are two chains.
    let (code, out) = verify(&[&aside[0]], &["--key", path(&old.spki)]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = verify(&[&log], &["-c", path(&config)]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("a new chain starts here"), "{out}");
    let (code, out) = verify(
        &[&aside[0], &log],
        &["--key", path(&old.spki), "--key", path(&new.spki)],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("a new chain starts here"), "{out}");
}
