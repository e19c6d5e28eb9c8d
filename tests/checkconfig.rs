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

/// A server entry for `write_config`'s `extra`, its key the first test server's.
fn server(name: &str, address: &str, more: &str) -> String {
    format!(
        "callback_servers:\n  - name: {name}\n    service_address: {address}\n    pubkey_path: {}\n{more}",
        keys().servers[0].spki.display()
    )
}

#[test]
fn a_service_address_without_a_scheme_says_how_to_write_it() {
    let dir = tempfile::tempdir().unwrap();
    for address in ["127.0.0.1:11021/v2/check", "risk.internal:11021/v2/check"] {
        let config = write_config(dir.path(), free_port(), &server("risk", address, ""));
        both_refuse(
            &config,
            &[
                "callback_servers[0].service_address",
                &format!("`{address}` has no scheme; write http://{address} or https://{address}"),
            ],
        );
    }
}

#[test]
fn an_ec_key_is_refused_as_not_rsa_naming_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let ec = dir.path().join("ec-pri.pem");
    let ec_pub = dir.path().join("ec-pub.key");
    common::keys::openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        ec.to_str().unwrap(),
    ]);
    common::keys::openssl(&[
        "pkey",
        "-in",
        ec.to_str().unwrap(),
        "-pubout",
        "-out",
        ec_pub.to_str().unwrap(),
    ]);
    let k = keys();
    let base = write_config(dir.path(), free_port(), "");
    let text = std::fs::read_to_string(&base).unwrap();
    let private = text.replace(
        &k.gateway.pkcs8.display().to_string(),
        &ec.display().to_string(),
    );
    std::fs::write(&base, private).unwrap();
    both_refuse(
        &base,
        &[
            "gateway_private_key",
            &ec.display().to_string(),
            "is an EC key; callback tokens are RS256: use an RSA key",
        ],
    );
    let public = text.replace(
        &k.node.spki.display().to_string(),
        &ec_pub.display().to_string(),
    );
    std::fs::write(&base, public).unwrap();
    both_refuse(
        &base,
        &[
            "tss_node_public_key",
            "is an EC key; callback tokens are RS256",
        ],
    );
}

#[test]
fn a_der_key_is_refused_with_the_command_that_converts_it() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys();
    let der = dir.path().join("gateway.der");
    let der_pub = dir.path().join("node-pub.der");
    common::keys::openssl(&[
        "pkey",
        "-in",
        k.gateway.pkcs8.to_str().unwrap(),
        "-outform",
        "DER",
        "-out",
        der.to_str().unwrap(),
    ]);
    common::keys::openssl(&[
        "pkey",
        "-pubin",
        "-in",
        k.node.spki.to_str().unwrap(),
        "-outform",
        "DER",
        "-out",
        der_pub.to_str().unwrap(),
    ]);
    let base = write_config(dir.path(), free_port(), "");
    let text = std::fs::read_to_string(&base).unwrap();
    std::fs::write(
        &base,
        text.replace(
            &k.gateway.pkcs8.display().to_string(),
            &der.display().to_string(),
        ),
    )
    .unwrap();
    both_refuse(
        &base,
        &[
            "gateway_private_key",
            "is DER, not PEM: convert it with `openssl pkey -inform DER -in",
        ],
    );
    std::fs::write(
        &base,
        text.replace(
            &k.node.spki.display().to_string(),
            &der_pub.display().to_string(),
        ),
    )
    .unwrap();
    both_refuse(
        &base,
        &[
            "tss_node_public_key",
            "is DER, not PEM: convert it with `openssl pkey -pubin -inform DER -in",
        ],
    );
}

/// A long deadline, an address without a path and a server asked only about pings are legal
/// but likely mistakes: check-config and start-up warn (exit 0), one line each.
#[test]
fn likely_mistakes_are_warned_about_at_check_config_and_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let extra = format!(
        "deadline_ms: 10000\n{}  - name: pinger\n    service_address: http://127.0.0.1:11022/v2/check\n    pubkey_path: {}\n    request_types: [ping]\n",
        server("pathless", "http://127.0.0.1:11021/", ""),
        keys().servers[1].spki.display()
    );
    let config = write_config(dir.path(), port, &extra);
    let expected = [
        "deadline_ms 10000 is not below the TSS Node's default request_timeout",
        "callback_servers[0].service_address http://127.0.0.1:11021/ has no path",
        "callback_servers[1].request_types: server pinger subscribes only to ping",
    ];
    let check = gateway(&["check-config", "-c", config.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&check.stderr).to_string();
    assert_eq!(check.status.code(), Some(0), "{said}");
    for e in expected {
        assert_eq!(
            said.lines()
                .filter(|l| l.starts_with("warning: ") && l.contains(e))
                .count(),
            1,
            "{e:?} not warned once: {said}"
        );
    }
    // A sensible config says none of it.
    let fine = write_config(
        dir.path(),
        port,
        &server("risk", "http://127.0.0.1:11021/v2/check", ""),
    );
    let check = gateway(&["check-config", "-c", fine.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&check.stderr).to_string();
    assert_eq!(check.status.code(), Some(0), "{said}");
    assert!(!said.contains("warning"), "{said}");

    // Start-up logs the same warnings.
    let config = write_config(dir.path(), port, &extra);
    let mut child = common::gateway::spawn_run(&config, port);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    child.wait().unwrap();
    for e in expected {
        assert!(
            log.lines()
                .any(|l| l.contains("\"level\":\"WARN\"") && l.contains(e)),
            "{e:?} not logged: {log}"
        );
    }
}

/// The summary names what an operator checks first: both addresses, the audit log, and the
/// fingerprints of the keys; a dry run has no generation.
#[test]
fn the_summary_shows_admin_listen_audit_log_and_key_fingerprints() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        free_port(),
        "admin_listen: 127.0.0.1:11029\naudit_log: audit/decisions.jsonl",
    );
    let check = gateway(&["check-config", "-c", config.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&check.stdout).to_string();
    assert_eq!(check.status.code(), Some(0), "{out}");
    let der = Command::new("openssl")
        .args([
            "pkey",
            "-pubin",
            "-in",
            keys().gateway.spki.to_str().unwrap(),
            "-outform",
            "DER",
        ])
        .output()
        .unwrap()
        .stdout;
    let id = common::sha256_hex(&der);
    for expected in [
        "admin_listen 127.0.0.1:11029".to_owned(),
        format!(
            "audit_log {}",
            dir.path().join("audit/decisions.jsonl").display()
        ),
        format!("sha256:{}", &id[..16]),
    ] {
        assert!(out.contains(&expected), "{expected:?} not in {out}");
    }
    assert!(!out.contains("generation"), "{out}");
}

/// `tracing:` is validated like every other field: unknown keys, the ratio's bounds, an http(s)
/// URL; credentials in the endpoint are never printed, in refusals or in the summary.
#[test]
fn tracing_is_validated_naming_the_field_and_never_showing_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let with = |tracing: &str| write_config(dir.path(), free_port(), tracing);
    both_refuse(
        &with("tracing:\n  otlp_endpoint: http://127.0.0.1:4318\n  sample_rate: 0.5"),
        &["tracing", "sample_rate"],
    );
    both_refuse(
        &with("tracing:\n  otlp_endpoint: http://127.0.0.1:4318\n  sample_ratio: 1.5"),
        &["tracing.sample_ratio", "between 0.0 and 1.0"],
    );
    both_refuse(
        &with("tracing:\n  otlp_endpoint: http://127.0.0.1:4318\n  sample_ratio: -0.1"),
        &["tracing.sample_ratio"],
    );
    both_refuse(
        &with("tracing:\n  otlp_endpoint: ftp://collector:4318"),
        &["tracing.otlp_endpoint", "http or https"],
    );
    both_refuse(&with("tracing:\n  sample_ratio: 0.5"), &["otlp_endpoint"]);
    let secret = with("tracing:\n  otlp_endpoint: http://otel:s3cret@collector:bad-port");
    both_refuse(&secret, &["tracing.otlp_endpoint", "***@"]);
    let out = gateway(&["check-config", "-c", secret.to_str().unwrap()]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("s3cret"));

    let ok = with(
        "tracing:\n  otlp_endpoint: https://otel:s3cret@collector.example:4318/\n  sample_ratio: 0.25",
    );
    let out = gateway(&["check-config", "-c", ok.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains(
            "traces: OTLP/HTTP to https://***@collector.example:4318/v1/traces  sample_ratio 0.25"
        ),
        "{said}"
    );
    assert!(!said.contains("s3cret"), "{said}");
    let off = with("");
    let said =
        String::from_utf8_lossy(&gateway(&["check-config", "-c", off.to_str().unwrap()]).stdout)
            .to_string();
    assert!(said.contains("traces: off"), "{said}");
}
