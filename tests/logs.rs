//! The gateway's own log, read as an SRE reads it: the real binary with its stderr in a file,
//! its level and fields checked line by line.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::downstream::{always, Answer, Downstream};
use common::gateway::{config_yaml, entry, entry_at, free_port, BIN};
use common::keys::keys;
use common::node::{post_token, send};
use common::requests::request;
use common::until;

/// The gateway binary running `config`, its stderr written to `log`.
struct Running {
    child: Child,
    log: PathBuf,
    port: u16,
}

impl Running {
    fn start(dir: &Path, yaml: &str, port: u16, format: &str) -> Running {
        let config = dir.join("gateway.yaml");
        std::fs::write(&config, yaml).unwrap();
        let log = dir.join("gateway.log");
        let child = Command::new(BIN)
            .args([
                "run",
                "-c",
                config.to_str().unwrap(),
                "--log-format",
                format,
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "gateway did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Running { child, log, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v2/check", self.port)
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    /// Every JSON line of the log so far.
    fn lines(&self) -> Vec<serde_json::Value> {
        self.text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The lines whose message is `message`.
    fn with_message(&self, message: &str) -> Vec<serde_json::Value> {
        self.lines()
            .into_iter()
            .filter(|l| l["message"] == message)
            .collect()
    }

    fn stop(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap();
        self.text()
    }
}

fn listen(port: u16) -> std::net::SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

/// A failing health check logs one WARN with the reason when the server goes down and one INFO
/// when it comes back; the probes in between log nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_state_change_is_logged_once_per_change() {
    let k = keys();
    let ds = Downstream::start("flaky", &k.servers[0], always(Answer::approve()), 0).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let yaml = config_yaml(
        listen(port),
        &[entry(&ds, "")],
        "health_check_interval_ms: 100",
    );
    let gw = Running::start(dir.path(), &yaml, port, "json");
    let up = || gw.with_message("downstream up: its signed health ping is approved");
    let down = || gw.with_message("downstream down: its signed health ping failed");
    until(20, "first health check logged", || up().len() == 1).await;

    ds.set_script(always(Answer::bytes(500, b"database unavailable")));
    let failing_from = ds.calls();
    // Several failed probes, each of which could have logged.
    until(20, "five failed probes", || ds.calls() >= failing_from + 5).await;
    until(20, "down logged", || down().len() == 1).await;
    ds.set_script(always(Answer::approve()));
    let healthy_from = ds.calls();
    until(20, "five good probes", || ds.calls() >= healthy_from + 5).await;
    until(20, "up logged again", || up().len() == 2).await;

    let down = down();
    assert_eq!(down.len(), 1, "one line for one change: {down:#?}");
    assert_eq!(down[0]["level"], "WARN");
    assert_eq!(down[0]["server"], "flaky");
    assert!(
        down[0]["error"]
            .as_str()
            .unwrap()
            .contains("http_error: HTTP 500"),
        "{down:#?}"
    );
    let up = up();
    assert_eq!(up.len(), 2, "{up:#?}");
    assert!(up.iter().all(|l| l["level"] == "INFO"));
    gw.stop();
}

/// Status 20 is a WARN naming the caller's address, status 30 a WARN with the whole error (not
/// cut at 100 characters), an approval INFO; shadow servers are marked; no `Some(`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_failures_are_warnings_with_what_an_sre_needs() {
    let k = keys();
    // The enforcing server answers after the shadow one, so the shadow verdict is in the line.
    let approver = Downstream::start(
        "approver",
        &k.servers[0],
        always(Answer::approve().after(300)),
        0,
    )
    .await;
    let shadow = Downstream::start("shadowy", &k.servers[1], always(Answer::reject("no")), 0).await;
    let page = format!(
        "<!doctype html><html><body>{}</body></html>",
        "Not Found on this server. ".repeat(20)
    );
    let lost = Downstream::start(
        "lost",
        &k.servers[2],
        always(Answer::bytes(404, page.as_bytes())),
        0,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let refused = format!("http://127.0.0.1:{}/v2/check", free_port());
    let yaml = config_yaml(
        listen(port),
        &[
            entry(&approver, "request_types: [key_gen]"),
            entry(&shadow, "mode: shadow"),
            entry(&lost, "request_types: [key_sign]\nretries: 0"),
            entry_at(&approver, &refused, "request_types: [key_sign]\nretries: 0"),
        ],
        "",
    )
    // Two entries for one test server: give the second a name of its own.
    .replacen(
        &format!("  - name: approver\n    service_address: {refused}"),
        &format!("  - name: nobody-listening-here\n    service_address: {refused}"),
        1,
    );
    let gw = Running::start(dir.path(), &yaml, port, "json");

    send(&gw.url(), &request("key_gen", "log-approved"))
        .await
        .expect(0, "APPROVE", &[]);
    let failed = send(&gw.url(), &request("key_sign", "log-failed")).await;
    failed.expect(30, "REJECT", &["lost: http_error: HTTP 404"]);
    post_token(&gw.url(), "eyJhbGciOiJub25lIn0.eyJ4IjoxfQ.")
        .await
        .expect(20, "REJECT", &[]);
    until(10, "three decisions logged", || {
        gw.with_message("decision").len() == 3
    })
    .await;
    let text = gw.stop();
    let decisions: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["message"] == "decision")
        .collect();
    let by_status = |s: i64| {
        decisions
            .iter()
            .find(|d| d["status"] == s)
            .unwrap_or_else(|| panic!("no status {s}: {decisions:#?}"))
    };

    let approved = by_status(0);
    assert_eq!(approved["level"], "INFO");
    let servers = approved["servers"].as_str().unwrap();
    assert!(
        servers.contains("approver=approved(") && !servers.contains("approver=approved(shadow)"),
        "{servers}"
    );
    assert!(servers.contains("shadowy=rejected(shadow)("), "{servers}");

    let failure = by_status(30);
    assert_eq!(failure["level"], "WARN");
    let error = failure["error"].as_str().unwrap();
    assert!(error.len() > 100, "a short error proves nothing: {error}");
    assert_eq!(
        error, failed.response.error,
        "the log keeps the whole error"
    );
    assert!(
        error.contains("nobody-listening-here: transport_error"),
        "{error}"
    );
    assert!(
        !error.contains("doctype") && !error.contains("Not Found"),
        "{error}"
    );

    let refusal = by_status(20);
    assert_eq!(refusal["level"], "WARN");
    assert!(
        refusal["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{refusal}"
    );

    // The body of the 404 is in the log (once), for the operator; with the likely fix.
    assert!(
        text.lines().any(|l| l.contains("\"server\":\"lost\"")
            && l.contains("wrong path?")
            && l.contains("Not Found")),
        "{text}"
    );
    assert!(!text.contains("Some("), "{text}");
    let listening = text
        .lines()
        .find(|l| l.contains("gateway listening"))
        .unwrap();
    assert!(
        listening.contains(&format!("\"listen\":\"127.0.0.1:{port}\"")),
        "{listening}"
    );
}

/// A flood of junk tokens does not flood the log: at most 10 refusals are logged a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refusals_is_logged_at_a_bounded_rate() {
    let k = keys();
    let ds = Downstream::start("approver", &k.servers[0], always(Answer::approve()), 0).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let gw = Running::start(
        dir.path(),
        &config_yaml(listen(port), &[entry(&ds, "")], ""),
        port,
        "json",
    );
    let started = Instant::now();
    for _ in 0..200 {
        post_token(&gw.url(), "junk")
            .await
            .expect(20, "REJECT", &[]);
    }
    let seconds = started.elapsed().as_secs() + 1;
    let text = gw.stop();
    let logged = text
        .lines()
        .filter(|l| l.contains("\"message\":\"decision\"") && l.contains("\"status\":20"))
        .count();
    assert!(logged >= 1, "{text}");
    assert!(
        logged as u64 <= 10 * (seconds + 1),
        "{logged} refusals logged in {seconds} s"
    );
}

/// Text logs written to a file carry no colour codes, and addresses read as addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_in_a_file_have_no_colour_codes() {
    let k = keys();
    let ds = Downstream::start("approver", &k.servers[0], always(Answer::approve()), 0).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin = free_port();
    let gw = Running::start(
        dir.path(),
        &config_yaml(
            listen(port),
            &[entry(&ds, "")],
            &format!("admin_listen: 127.0.0.1:{admin}"),
        ),
        port,
        "text",
    );
    send(&gw.url(), &request("key_sign", "plain-text"))
        .await
        .expect(0, "APPROVE", &[]);
    let text = gw.stop();
    assert!(text.contains("decision"), "{text}");
    assert!(!text.contains('\u{1b}'), "ANSI escape in a file: {text:?}");
    assert!(text.contains(&format!("listen=127.0.0.1:{port}")), "{text}");
    assert!(
        text.contains(&format!("admin_listen=127.0.0.1:{admin}")),
        "{text}"
    );
    assert!(!text.contains("Some("), "{text}");
}

/// A reload says which file changed, which servers came and went, and the keys now in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_logs_what_changed_and_the_keys_in_use() {
    let k = keys();
    let a = Downstream::start("alpha", &k.servers[0], always(Answer::approve()), 0).await;
    let b = Downstream::start("beta", &k.servers[1], always(Answer::approve()), 0).await;
    let c = Downstream::start("gamma", &k.servers[2], always(Answer::approve()), 0).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let gw = Running::start(
        dir.path(),
        &config_yaml(listen(port), &[entry(&a, ""), entry(&b, "")], ""),
        port,
        "json",
    );
    let next = config_yaml(
        listen(port),
        &[entry(&a, "timeout_ms: 700"), entry(&c, "")],
        "",
    );
    let config = dir.path().join("gateway.yaml");
    std::fs::write(dir.path().join("next.yaml"), next).unwrap();
    std::fs::rename(dir.path().join("next.yaml"), &config).unwrap();
    let _ = Command::new("kill")
        .args(["-HUP", &gw.child.id().to_string()])
        .status();
    until(20, "reload logged", || {
        !gw.with_message("config reloaded").is_empty()
    })
    .await;
    let line = gw.with_message("config reloaded").remove(0);
    gw.stop();
    assert_eq!(line["servers_added"], "gamma", "{line}");
    assert_eq!(line["servers_removed"], "beta", "{line}");
    assert_eq!(line["servers_changed"], "alpha", "{line}");
    assert!(
        line["files_changed"]
            .as_str()
            .unwrap()
            .contains("gateway.yaml"),
        "{line}"
    );
    let keys = line["keys"].as_str().unwrap();
    let der = Command::new("openssl")
        .args([
            "pkey",
            "-pubin",
            "-in",
            k.gateway.spki.to_str().unwrap(),
            "-outform",
            "DER",
        ])
        .output()
        .unwrap()
        .stdout;
    let gateway_id = common::sha256_hex(&der);
    assert!(
        keys.contains(&format!("answers=sha256:{}", &gateway_id[..16])),
        "{keys}"
    );
    assert!(keys.contains("gamma=sha256:"), "{keys}");
}
