//! `check-config` refuses what `run` would refuse short of binding, naming the field and the
//! path or address; `run` refuses the same configs with the same line.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::gateway::{free_port, BIN};
use common::keys::keys;

/// A config with the embedded rules alone (nothing to call), plus `extra`.
fn write_config(dir: &Path, port: u16, extra: &str) -> std::path::PathBuf {
    let k = keys();
    let path = dir.join("gateway.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: 127.0.0.1:{port}\ntss_node_public_key: {}\ngateway_private_key: {}\n\
             health_check_interval_ms: 0\n{extra}\nembedded_risk_control_rules:\n  enable: true\n  \
             key_gen: {{ reject_all: true }}\n  key_sign: {{ reject_all: true }}\n  \
             key_reshare: {{ reject_all: true }}\n  key_share_sign: {{ reject_all: true }}\n",
            k.node.spki.display(),
            k.gateway.pkcs8.display()
        ),
    )
    .unwrap();
    path
}

fn gateway(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// check-config and run both refuse `config`, with one line naming each of `fragments`.
#[track_caller]
fn both_refuse(config: &Path, fragments: &[&str]) {
    let c = config.to_str().unwrap();
    let check = gateway(&["check-config", "-c", c]);
    let said = String::from_utf8_lossy(&check.stderr).to_string();
    assert_eq!(check.status.code(), Some(2), "check-config: {said}");
    for f in fragments {
        assert!(said.contains(f), "check-config said {said:?}, lacks {f:?}");
    }
    let run = gateway(&["run", "-c", c]);
    let said = String::from_utf8_lossy(&run.stderr).to_string();
    assert_ne!(run.status.code(), Some(0), "run: {said}");
    for f in fragments {
        assert!(said.contains(f), "run said {said:?}, lacks {f:?}");
    }
}

#[test]
fn an_audit_log_under_a_regular_file_is_refused_naming_the_field_and_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-folder");
    std::fs::write(&file, "x").unwrap();
    let log = file.join("audit.jsonl");
    let config = write_config(
        dir.path(),
        free_port(),
        &format!("audit_log: {}", log.display()),
    );
    both_refuse(&config, &["audit_log", &file.display().to_string()]);
}

#[test]
fn an_audit_log_in_a_missing_tree_is_refused_but_its_own_folder_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nonexistent");
    let log = missing.join("audit/decisions.jsonl");
    let config = write_config(
        dir.path(),
        free_port(),
        &format!("audit_log: {}", log.display()),
    );
    both_refuse(&config, &["audit_log", &missing.display().to_string()]);

    // One level is the log's own folder: created, as deployments expect (a fresh volume).
    let config = write_config(dir.path(), free_port(), "audit_log: audit/decisions.jsonl");
    let check = gateway(&["check-config", "-c", config.to_str().unwrap()]);
    assert_eq!(
        check.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn an_audit_log_that_is_a_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    std::fs::create_dir(&log).unwrap();
    let config = write_config(
        dir.path(),
        free_port(),
        &format!("audit_log: {}", log.display()),
    );
    both_refuse(&config, &["audit_log", &log.display().to_string()]);
}

#[test]
fn admin_listen_equal_to_listen_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, &format!("admin_listen: 127.0.0.1:{port}"));
    both_refuse(&config, &["admin_listen", "listen"]);
}
