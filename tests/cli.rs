//! The command line (CONTRACT.md section 3), run as the real binary.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::Duration;

use common::downstream::{always, Answer, Downstream, Seen};
use common::gateway::{config_yaml, entry, free_port, spawn_run, BIN};
use common::keys::keys;
use common::node::{post_token, send};
use common::requests::request;
use common::tokens::{contains_jwt, open, token};

fn gateway(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[test]
fn keygen_writes_a_pkcs8_private_key_readable_only_by_its_owner_and_an_spki_public_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let out = gateway(&[
        "keygen",
        "--out",
        dir.path().to_str().unwrap(),
        "--name",
        "risk-engine",
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    let private = dir.path().join("risk-engine-pri.pem");
    let public = dir.path().join("risk-engine-pub.key");
    assert_eq!(
        std::fs::metadata(&private).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let pem = std::fs::read_to_string(&private).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
    assert!(std::fs::read_to_string(&public)
        .unwrap()
        .starts_with("-----BEGIN PUBLIC KEY-----"));
    // openssl agrees it is a 2048-bit RSA key.
    let o = Command::new("openssl")
        .args(["rsa", "-in", private.to_str().unwrap(), "-noout", "-text"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("2048 bit"));
    // The pair works with independent crypto.
    let t = token(
        &jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
        b"{}",
        "x",
    );
    let dec = jsonwebtoken::DecodingKey::from_rsa_pem(&std::fs::read(&public).unwrap()).unwrap();
    assert_eq!(open(&t, &dec).unwrap(), b"{}");
    // An existing key is never overwritten.
    let again = gateway(&[
        "keygen",
        "--out",
        dir.path().to_str().unwrap(),
        "--name",
        "risk-engine",
    ]);
    assert_eq!(again.status.code(), Some(2));
    assert_eq!(std::fs::read_to_string(&private).unwrap(), pem);
}

#[test]
fn check_config_prints_a_summary_or_one_line_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys();
    let good = format!(
        "tss_node_public_key: {}\ngateway_private_key: {}\ncallback_servers:\n  - name: risk-engine\n    service_address: http://127.0.0.1:11021/v2/check\n    pubkey_path: {}\n",
        k.node.spki.display(),
        k.gateway.pkcs8.display(),
        k.servers[0].spki.display()
    );
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, &good).unwrap();
    let out = gateway(&["check-config", "-c", path.to_str().unwrap()]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    assert!(
        stdout.contains("risk-engine") && stdout.contains("127.0.0.1:11020"),
        "{stdout}"
    );

    std::fs::write(dir.path().join("not-a-key.pem"), "hello").unwrap();
    let bad: Vec<(String, &str)> = vec![
        (format!("{good}surprise: 1\n"), "surprise"),
        (good.replace("risk-engine", "Risk Engine"), "callback_servers[0].name"),
        (format!("{good}  - name: risk-engine\n    service_address: http://127.0.0.1:1/\n    pubkey_path: {}\n", k.servers[1].spki.display()), "risk-engine"),
        (good.replace(&k.servers[0].spki.display().to_string(), "missing.key"), "callback_servers[0].pubkey_path"),
        (good.replace(&k.servers[0].spki.display().to_string(), "not-a-key.pem"), "callback_servers[0].pubkey_path"),
        (good.replace(&k.gateway.pkcs8.display().to_string(), &k.gateway.spki.display().to_string()), "gateway_private_key"),
        (format!("{good}    timeout_ms: 9000\n"), "timeout_ms"),
        (good.split("callback_servers").next().unwrap().to_owned(), "nothing would be checked"),
        ("listen: [".into(), "gateway.yaml"),
    ];
    for (yaml, field) in bad {
        std::fs::write(&path, &yaml).unwrap();
        let out = gateway(&["check-config", "-c", path.to_str().unwrap()]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{yaml}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(field), "{field:?} not in {stderr:?}");
    }
    let out = gateway(&["check-config", "-c", "/nonexistent/gateway.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("/nonexistent/gateway.yaml"));
}

#[test]
fn demo_shows_approvals_and_rejections_and_exits_0() {
    let out = gateway(&["demo"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    for t in [
        "ping",
        "key_gen",
        "key_sign",
        "key_reshare",
        "key_share_sign",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(t)),
            "{t} missing:\n{stdout}"
        );
    }
    let line = |prefix: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap()
            .to_owned()
    };
    assert!(
        line("key_sign ").contains("REJECT status 0: whitelist:"),
        "{stdout}"
    );
    assert!(
        line("key_sign (whitelisted)").ends_with("APPROVE"),
        "{stdout}"
    );
    assert!(
        line("key_gen (threshold 1)").contains("embedded risk control"),
        "{stdout}"
    );
    assert!(line("key_reshare").contains("approved") && line("key_reshare").contains("APPROVE"));
    assert!(line("key_sign (forged)").contains("status 20"));
    // The audit summary says what its lines are: one decision per answer, and the rest.
    let rows = stdout
        .lines()
        .filter(|l| l.ends_with("APPROVE") || l.contains(" REJECT status"))
        .count();
    let audit = line("audit log: ");
    assert!(
        audit.contains(&format!(": {rows} decisions (one per answer"))
            && audit.contains("signed checkpoints"),
        "{rows} answers: {audit}"
    );
    assert!(
        !stdout.contains("WARN") && !stderr.contains("WARN"),
        "{stderr}"
    );
}

/// `run`, `probe` against it (exit 0 approved, 1 not approved, 2 error), then SIGTERM: the
/// request in flight finishes, the audit log holds every answer, and the exit code is 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_probe_and_graceful_shutdown() {
    let k = keys();
    let approve = Downstream::start(
        "approver",
        &k.servers[0],
        always(Answer::approve().after(800)),
        0,
    )
    .await;
    let picky = Downstream::start(
        "picky",
        &k.servers[1],
        std::sync::Arc::new(|s: &Seen| {
            if s.request_type == 2 {
                Answer::reject("not today")
            } else {
                Answer::approve()
            }
        }),
        0,
    )
    .await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    let yaml = config_yaml(
        format!("127.0.0.1:{port}").parse().unwrap(),
        &[entry(&approve, ""), entry(&picky, "")],
        "audit_log: audit/decisions.jsonl",
    );
    std::fs::write(&config, yaml).unwrap();
    let mut child = spawn_run(&config, port);
    let url = format!("http://127.0.0.1:{port}/v2/check");
    let probe = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || Command::new(BIN).args(args).output().unwrap())
            .await
            .unwrap()
    };
    let base = |extra: &[&str]| {
        let mut v: Vec<String> = vec![
            "probe".into(),
            "--url".into(),
            url.clone(),
            "--key".into(),
            k.node.pkcs8.display().to_string(),
            "--server-pub".into(),
            k.gateway.spki.display().to_string(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let out = probe(base(&["--type", "key_gen"])).await;
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (answer["status"].as_i64(), answer["action"].as_str()),
        (Some(0), Some("APPROVE"))
    );
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/samples/key_sign.json");
    let out = probe(base(&["--fixture", fixture.to_str().unwrap()])).await;
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert!(text(&out).0.contains("picky: not today"));
    // Wrong server key: the answer cannot be verified, an error.
    let mut wrong = base(&["--type", "ping"]);
    wrong[6] = k.intruder.spki.display().to_string();
    assert_eq!(probe(wrong).await.status.code(), Some(2));

    // SIGTERM while a request is in flight: it is answered, then the process exits 0.
    let in_flight = tokio::spawn({
        let url = url.clone();
        async move { send(&url, &request("key_gen", "in-flight")).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&child, "TERM");
    let reply = in_flight.await.unwrap();
    reply.expect(0, "APPROVE", &[]);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still listening"
    );
    let audit = std::fs::read_to_string(dir.path().join("audit/decisions.jsonl")).unwrap();
    let mut lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // The shutdown closes the hash-chained log with a signed checkpoint.
    let closing = lines.pop().unwrap();
    assert!(closing.get("checkpoint").is_some(), "{audit}");
    // Checkpoints (`start`, `idle`, ...) and the `config` record are not decisions.
    lines.retain(|l| l.get("request_id").is_some() && l.get("status").is_some());
    assert_eq!(lines.len(), 4, "{audit}");
    assert_eq!(lines[3]["request_id"], "in-flight");
    for l in &lines {
        for field in [
            "ts",
            "request_id",
            "type",
            "status",
            "action",
            "error",
            "duration_ms",
            "embedded",
            "servers",
            "config_generation",
        ] {
            assert!(l.get(field).is_some(), "{field} missing in {l}");
        }
    }
    assert!(!contains_jwt(&audit), "a token leaked into the audit log");
}

/// The log has one line per decision, and never a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_one_json_line_per_decision_without_tokens() {
    let k = keys();
    let ds = Downstream::start("approver", &k.servers[0], always(Answer::approve()), 0).await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        config_yaml(
            format!("127.0.0.1:{port}").parse().unwrap(),
            &[entry(&ds, "")],
            "",
        ),
    )
    .unwrap();
    let mut child = spawn_run(&config, port);
    let url = format!("http://127.0.0.1:{port}/v2/check");
    send(&url, &request("key_sign", "logged-1"))
        .await
        .expect(0, "APPROVE", &[]);
    post_token(&url, "eyJhbGciOiJub25lIn0.eyJ4IjoxfQ.")
        .await
        .expect(20, "REJECT", &[]);
    signal(&child, "TERM");
    let stderr = child.stderr.take().unwrap();
    let lines: Vec<String> = BufReader::new(stderr).lines().map(|l| l.unwrap()).collect();
    child.wait().unwrap();
    let decisions: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "decision")
        .collect();
    assert_eq!(decisions.len(), 2, "{lines:#?}");
    assert_eq!(decisions[0]["request_id"], "logged-1");
    assert_eq!(decisions[0]["decision"], "APPROVE");
    assert!(decisions[0]["servers"]
        .as_str()
        .unwrap()
        .contains("approver=approved"));
    assert!(
        lines.iter().all(|l| !l.contains("eyJ")),
        "a token was logged: {lines:#?}"
    );
}

/// The audit line is written before the answer: after N answers, a SIGKILL leaves N complete,
/// parseable lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_lines_survive_sigkill() {
    let k = keys();
    let ds = Downstream::start("approver", &k.servers[0], always(Answer::approve()), 0).await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    let yaml = config_yaml(
        format!("127.0.0.1:{port}").parse().unwrap(),
        &[entry(&ds, "")],
        "audit_log: audit.jsonl",
    );
    std::fs::write(&config, yaml).unwrap();
    let mut child = spawn_run(&config, port);
    let url = format!("http://127.0.0.1:{port}/v2/check");
    const N: usize = 25;
    for i in 0..N {
        let r = if i % 5 == 4 {
            post_token(&url, "garbage").await
        } else {
            send(&url, &request("key_sign", &format!("kill-{i}"))).await
        };
        assert_eq!(r.http, 200);
    }
    signal(&child, "KILL");
    child.wait().unwrap();
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(audit.ends_with('\n'), "last line incomplete");
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter(|l: &serde_json::Value| l.get("request_id").is_some() && l.get("status").is_some())
        .collect();
    assert_eq!(lines.len(), N);
    assert_eq!(lines.iter().filter(|l| l["status"] == 20).count(), N / 5);
    assert_eq!(lines[0]["request_id"], "kill-0");
    assert_eq!(lines[0]["servers"][0]["name"], "approver");
    assert_eq!(lines[0]["servers"][0]["outcome"], "approved");
}

/// The options of one subcommand as `--help` lists them: (short, long) pairs.
fn help_options(command: &[&str]) -> Vec<(Option<String>, String)> {
    let mut args = command.to_vec();
    args.push("--help");
    let out = gateway(&args);
    assert!(out.status.success(), "{:?}", text(&out));
    let help = String::from_utf8_lossy(&out.stdout).to_string();
    help.lines()
        // An option's own line: `  -c, --config <FILE>` or `      --live`, not a wrapped description.
        .filter(|l| l.trim_start().starts_with('-') && l.len() - l.trim_start().len() <= 6)
        .map(str::trim_start)
        .filter_map(|l| {
            let mut words = l.split([',', ' ']).filter(|w| w.starts_with('-'));
            let first = words.next()?.to_owned();
            match first.strip_prefix("--") {
                Some(_) => Some((None, first)),
                None => Some((Some(first), words.next()?.to_owned())),
            }
        })
        .filter(|(_, long)| long != "--help" && long != "--version")
        .collect()
}

/// Every command the README's command table lists exists in `--help` and the other way
/// round, and each command's row names exactly the options its `--help` lists.
#[test]
fn the_readme_command_table_and_help_agree() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table = readme
        .split("## Command line")
        .nth(1)
        .unwrap()
        .split("\n\n")
        .find(|block| block.contains("| command |"))
        .unwrap()
        .to_owned();
    // `\|` inside a cell is a literal bar, not a column.
    let table = table.replace("\\|", " or ");
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with("| `tss-callback-gateway "))
        .collect();
    let top = String::from_utf8_lossy(&gateway(&["--help"]).stdout).to_string();
    let commands: Vec<String> = top
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("Options:")
        .next()
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect();
    for c in &commands {
        let subcommands = if c == "audit" {
            vec!["audit verify".to_owned()]
        } else {
            vec![c.clone()]
        };
        for sub in subcommands {
            let prefix = format!("| `tss-callback-gateway {sub}");
            let row = rows
                .iter()
                .find(|r| r.starts_with(&prefix) && r[prefix.len()..].starts_with([' ', '`']))
                .unwrap_or_else(|| panic!("README has no row for `{sub}`"));
            let usage = row.split('|').nth(1).unwrap();
            let options = help_options(&sub.split(' ').collect::<Vec<_>>());
            for (short, long) in &options {
                let named = |flag: &str| {
                    usage
                        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                        .any(|w| w == flag)
                };
                assert!(
                    named(long) || short.as_deref().is_some_and(named),
                    "`{sub}`: {long} is in --help but not in the README row {usage}"
                );
            }
            for flag in usage
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .filter(|w| w.starts_with('-') && w.len() > 1)
            {
                assert!(
                    options
                        .iter()
                        .any(|(s, l)| l == flag || s.as_deref() == Some(flag)),
                    "`{sub}`: the README names {flag}, which --help does not list"
                );
            }
        }
    }
    for row in rows {
        let named = row.trim_start_matches("| `tss-callback-gateway ");
        assert!(
            commands
                .iter()
                .any(|c| named.starts_with(&format!("{c} ")) || named.starts_with(&format!("{c}`"))),
            "README row for a command --help does not list: {row}"
        );
    }
}

#[test]
fn keygen_refuses_a_name_that_is_not_a_file_stem() {
    let dir = tempfile::tempdir().unwrap();
    let out = gateway(&[
        "keygen",
        "--out",
        dir.path().to_str().unwrap(),
        "--name",
        "Bad Name/x",
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("[A-Za-z0-9_-]"), "{stderr}");
    assert!(!stderr.contains("No such file"), "{stderr}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// `replay --audit f f` would count every record twice: refused, naming the file.
#[test]
fn replay_refuses_the_same_audit_file_given_twice() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys();
    let config = dir.path().join("candidate.yaml");
    std::fs::write(
        &config,
        format!(
            "tss_node_public_key: {}\ngateway_private_key: {}\nembedded_risk_control_rules:\n  enable: true\n",
            k.node.spki.display(),
            k.gateway.pkcs8.display()
        ),
    )
    .unwrap();
    let audit = dir.path().join("decisions.jsonl");
    std::fs::write(&audit, "").unwrap();
    let a = audit.to_str().unwrap();
    let same = format!("{}/./decisions.jsonl", dir.path().display());
    for twice in [[a, a], [a, same.as_str()]] {
        let out = gateway(&[
            "replay",
            "-c",
            config.to_str().unwrap(),
            "--audit",
            twice[0],
            twice[1],
        ]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("given more than once"), "{stderr}");
    }
    let once = gateway(&["replay", "-c", config.to_str().unwrap(), "--audit", a]);
    assert_eq!(once.status.code(), Some(0), "{:?}", text(&once));
}

/// `probe` says what is wrong and how to fix it: an https URL to a plain-HTTP server, a wrong
/// path, a URL without a scheme.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_errors_say_how_to_fix_them() {
    let k = keys();
    let ds = Downstream::start("approver", &k.servers[0], always(Answer::approve()), 0).await;
    let gw = common::gateway::Gateway::start(&[entry(&ds, "")], "").await;
    let probe = |url: String| {
        let args = vec![
            "probe".to_owned(),
            "--url".into(),
            url,
            "--key".into(),
            k.node.pkcs8.display().to_string(),
            "--server-pub".into(),
            k.gateway.spki.display().to_string(),
        ];
        async move {
            tokio::task::spawn_blocking(move || Command::new(BIN).args(args).output().unwrap())
                .await
                .unwrap()
        }
    };
    let cases = [
        (
            format!("https://{}/v2/check", gw.addr),
            "TLS handshake failed: the server answered plain HTTP; use http:// or enable TLS on it".to_owned(),
        ),
        (
            format!("http://{}/v2/chek", gw.addr),
            format!("HTTP 404 from http://{}/v2/chek: wrong path? Cobo callback servers listen on /v2/check", gw.addr),
        ),
        (
            format!("{}/v2/check", gw.addr),
            format!("has no scheme; write http://{}/v2/check", gw.addr),
        ),
    ];
    for (url, expected) in cases {
        let out = probe(url.clone()).await;
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{url}: {stderr}");
        assert!(stderr.contains(&expected), "{url}: {stderr}");
    }
    let out = probe(gw.url()).await;
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
}

/// The gateway's answer to the node names the failing server and the kind of failure, never a
/// downstream's error page; an https address to a plain-HTTP server says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downstream_error_pages_never_reach_the_node() {
    let k = keys();
    let page =
        b"<!doctype html><html><head><title>404 Not Found</title></head><body>nginx</body></html>";
    let lost = Downstream::start("lost", &k.servers[0], always(Answer::bytes(404, page)), 0).await;
    let garbled = Downstream::start(
        "garbled",
        &k.servers[1],
        always(Answer::bytes(200, page)),
        0,
    )
    .await;
    let plain = Downstream::start("plain", &k.servers[2], always(Answer::approve()), 0).await;
    let https_to_plain = format!("https://{}/v2/check", plain.addr);
    let gw = common::gateway::Gateway::start(
        &[
            entry(&lost, "request_types: [key_sign]"),
            entry(&garbled, "request_types: [key_gen]"),
            common::gateway::entry_at(
                &plain,
                &https_to_plain,
                "request_types: [key_reshare]\nretries: 0",
            ),
        ],
        "",
    )
    .await;
    let r = send(&gw.url(), &request("key_sign", "page-404")).await;
    r.expect(30, "REJECT", &["lost: http_error: HTTP 404"]);
    assert_eq!(r.response.error, "lost: http_error: HTTP 404");
    let not_found = r.response.error.clone();
    let r = send(&gw.url(), &request("key_gen", "page-200")).await;
    r.expect(
        30,
        "REJECT",
        &[
            "garbled: bad_response:",
            "the answer is an HTML or XML page",
        ],
    );
    for reply in [&not_found, &r.response.error] {
        assert!(
            !reply.contains("doctype") && !reply.contains("nginx"),
            "{reply}"
        );
    }
    let r = send(&gw.url(), &request("key_reshare", "tls-to-plain")).await;
    r.expect(
        30,
        "REJECT",
        &["plain: transport_error: TLS handshake failed: the server answered plain HTTP; use http://"],
    );
    gw.stop().await;
}

/// The README's Configuration example, its embedded rules as written, decides the bundled
/// samples as its comments say: every type approved but KeyShareSign (`reject_all: true`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_example_rules_pass_the_bundled_samples() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let example = readme
        .split("## Configuration")
        .nth(1)
        .unwrap()
        .split("```yaml\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    let rules: String = example
        .lines()
        .skip_while(|l| !l.starts_with("embedded_risk_control_rules:"))
        .take_while(|l| !l.starts_with("callback_servers:"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(rules.contains("key_share_sign"), "{rules}");
    let gw = common::gateway::Gateway::start(&[], &rules).await;
    for (kind, approved) in [
        ("ping", true),
        ("key_gen", true),
        ("key_sign", true),
        ("key_reshare", true),
        ("key_share_sign", false),
    ] {
        let r = send(&gw.url(), &request(kind, &format!("readme-{kind}"))).await;
        assert_eq!(r.approved(), approved, "{kind}: {:?}", r.response);
    }
    gw.stop().await;
}
