//! Security review findings (issue 12): each test here reproduces one attack or defect against
//! the gateway over real HTTP on loopback and checks it is closed.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use tokio::net::TcpListener;

use common::downstream::{always, Answer, Downstream};
use common::gateway::{config_yaml, entry, entry_at, free_port, Entry, Gateway};
use common::http::{get, get_json, http, http_post};
use common::keys::{keys, KeyPair};
use common::node::{node_form, send};
use common::requests::{request, request_id_of};
use common::tokens::{form_token, open, token, CallbackResponse};
use common::until;

/// A payload like the node's, plus top-level `extra` members.
fn payload_with(request_id: &str, extra: &str) -> Vec<u8> {
    let base = String::from_utf8(request("key_sign", request_id)).unwrap();
    let body = base.trim_end().strip_suffix('}').unwrap();
    format!("{body},{extra}}}").into_bytes()
}

// === 1. signing oracle ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_carrying_status_or_action_is_refused_and_never_forwarded() {
    let k = keys();
    let enforcing =
        Downstream::start("enforcing", &k.servers[0], always(Answer::approve()), 0).await;
    let shadow = Downstream::start("shadow", &k.servers[1], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry(&enforcing, ""), entry(&shadow, "mode: shadow")], "").await;
    let attacks = [
        r#""status":0,"action":"APPROVE""#,
        r#""status":0"#,
        r#""action":"APPROVE""#,
        r#""Status":0,"ACTION":"APPROVE""#,
        r#""aCtIoN":"APPROVE""#,
        "\"\u{017F}tatus\":0",
        r#""\u0061ction":"APPROVE""#,
    ];
    for (i, extra) in attacks.iter().enumerate() {
        let r = send(&gw.url(), &payload_with(&format!("oracle-{i}"), extra)).await;
        r.expect(10, "REJECT", &["top-level"]);
        assert_eq!(r.response.request_id, format!("oracle-{i}"), "{extra}");
    }
    // A clean request reaches both servers: the refusals above reached neither.
    send(&gw.url(), &request("key_sign", "clean"))
        .await
        .expect(0, "APPROVE", &[]);
    until(10, "the shadow call lands", || shadow.calls() == 1).await;
    assert_eq!(enforcing.calls(), 1);
    assert!(enforcing.seen().iter().all(|s| s.request_id == "clean"));
}

/// A downstream that verifies the gateway's requests with `verify` and records their tokens.
struct Recorder {
    addr: SocketAddr,
    tokens: Arc<Mutex<Vec<String>>>,
}

struct RecorderState {
    key: KeyPair,
    verify: jsonwebtoken::DecodingKey,
    tokens: Arc<Mutex<Vec<String>>>,
}

async fn recorder_check(State(s): State<Arc<RecorderState>>, body: Bytes) -> String {
    let token = form_token(&body);
    s.tokens.lock().unwrap().push(token.clone());
    let (status, action, id) = match open(&token, &s.verify) {
        Ok(payload) => (0, "APPROVE", request_id_of(&payload)),
        Err(_) => (20, "REJECT", String::new()),
    };
    let resp = CallbackResponse {
        request_id: id,
        status,
        action: action.into(),
        error: String::new(),
    };
    token_of(&s.key, &resp)
}

fn token_of(key: &KeyPair, resp: &CallbackResponse) -> String {
    token(
        &key.encoding(),
        &serde_json::to_vec(resp).unwrap(),
        "recorder",
    )
}

impl Recorder {
    async fn start(key: &KeyPair, verify: &KeyPair) -> Recorder {
        let tokens = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(RecorderState {
            key: key.clone(),
            verify: verify.decoding(),
            tokens: tokens.clone(),
        });
        let app = Router::new()
            .route("/v2/check", post(recorder_check))
            .with_state(state);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Recorder { addr, tokens }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_downstreams_are_signed_with_the_downstream_signing_key() {
    let k = keys();
    // The requests key: a pair of its own, as `keygen --name gateway-requests` makes.
    let requests = &k.servers[3];
    let rec = Recorder::start(&k.servers[0], requests).await;
    let ds = Downstream::start("unused", &k.servers[0], always(Answer::approve()), 0).await;
    let url = format!("http://{}/v2/check", rec.addr);
    let gw = Gateway::start(
        &[entry_at(&ds, &url, "")],
        &format!("downstream_signing_key: {}", requests.pkcs8.display()),
    )
    .await;
    // The node's answer verifies with the gateway key (checked by `send`).
    send(&gw.url(), &request("key_sign", "two-keys"))
        .await
        .expect(0, "APPROVE", &[]);
    gw.shared.health.check_all(&gw.shared).await;
    let tokens = rec.tokens.lock().unwrap().clone();
    assert_eq!(tokens.len(), 2, "one request and one health ping");
    for t in &tokens {
        open(t, &requests.decoding()).expect("signed with downstream_signing_key");
        assert!(
            open(t, &k.gateway.decoding()).is_err(),
            "a request token must not verify with the key the node trusts"
        );
    }
    let ready = get_json(&format!("http://{}/readyz", gw.addr)).await;
    assert_eq!(ready["servers"][0]["health"]["up"], true, "{ready}");
}

// === 2. abandoned requests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_requests_leave_no_duplicate_memory_behind() {
    use tokio::io::AsyncWriteExt;
    let k = keys();
    let slow = Downstream::start("slow", &k.servers[0], always(Answer::hang()), 0).await;
    let gw = Gateway::start(&[entry(&slow, "timeout_ms: 5000")], "deadline_ms: 6000").await;
    const N: usize = 30;
    for i in 0..N {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let payload = request("key_sign", &format!("abandoned-{i}"));
        s.write_all(&http_post(&node_form(&payload))).await.unwrap();
        until(10, "the request is forwarded", || slow.calls() == i + 1).await;
        // The node gives up mid-decision.
        drop(s);
    }
    until(10, "nothing in flight", || {
        gw.metric("tss_gateway_in_flight_requests") == 0.0
    })
    .await;
    until(10, "the duplicate memory empties", || {
        gw.shared.dedup.is_empty()
    })
    .await;
    assert_eq!(gw.shared.dedup.bytes(), 0);
    // The same request_id with another payload is a new request, not a conflict with a ghost.
    slow.set_script(always(Answer::approve()));
    let other = request("key_gen", "abandoned-0");
    send(&gw.url(), &other).await.expect(0, "APPROVE", &[]);
}

// === 3. error texts and the duplicate memory are bounded ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verbose_downstream_cannot_grow_answers_audit_or_memory() {
    let k = keys();
    // ~36 KB of error in a signed 0/REJECT, and again in a status-30 answer.
    let essay = "x".repeat(36_000);
    let verbose =
        Downstream::start("verbose", &k.servers[0], always(Answer::reject(&essay)), 0).await;
    let failing = Downstream::start(
        "failing",
        &k.servers[1],
        always(Answer::signed(30, "REJECT", &essay)),
        0,
    )
    .await;
    let gw = Gateway::start(
        &[
            entry(&verbose, "request_types: [key_sign]"),
            entry(&failing, "request_types: [key_gen]"),
        ],
        "audit_log: audit.jsonl",
    )
    .await;
    const N: usize = 40;
    for i in 0..N {
        let r = send(&gw.url(), &request("key_sign", &format!("verbose-{i}"))).await;
        r.expect(0, "REJECT", &["verbose: xxx"]);
        assert!(r.response.error.len() <= 1024, "{}", r.response.error.len());
    }
    let r = send(&gw.url(), &request("key_gen", "failing")).await;
    r.expect(30, "REJECT", &["failing: error_status"]);
    assert!(r.response.error.len() <= 1024, "{}", r.response.error.len());
    for rec in gw.audit_records() {
        assert!(rec["error"].as_str().unwrap().len() <= 1024);
        for s in rec["servers"].as_array().unwrap() {
            assert!(s["detail"].as_str().unwrap().len() <= 1024, "{s}");
        }
    }
    // Each remembered rejection costs a few KiB at most, not the 72 KB it was sent with.
    assert_eq!(gw.shared.dedup.len(), N);
    let per_entry = gw.shared.dedup.bytes() / N;
    assert!(per_entry < 4096, "{per_entry} bytes per entry");
}

// === 6. an emergency stop is not outlived by remembered or shared decisions ===

const REJECT_ALL: &str =
    "embedded_risk_control_rules: { enable: true, key_sign: { reject_all: true } }";

async fn reload_to(gw: &Gateway, servers: &[Entry<'_>], extra: &str) {
    let before = gw.generation();
    gw.write_config(&config_yaml(gw.addr, servers, extra));
    tss_callback_gateway::ops::reload::reload(&gw.shared, &gw.config_path, "test").unwrap();
    assert_eq!(gw.generation(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_emergency_stop_a_remembered_approval_is_not_reused() {
    let k = keys();
    let a = Downstream::start("a", &k.servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry(&a, "")], "").await;
    let payload = request("key_sign", "stop-remembered");
    send(&gw.url(), &payload).await.expect(0, "APPROVE", &[]);
    // Remembered: an identical retry is answered from memory.
    send(&gw.url(), &payload).await.expect(0, "APPROVE", &[]);
    assert_eq!(a.calls(), 1);
    reload_to(&gw, &[entry(&a, "")], REJECT_ALL).await;
    send(&gw.url(), &payload).await.expect(
        0,
        "REJECT",
        &["embedded risk control: key_sign reject_all"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_emergency_stop_an_in_flight_evaluation_is_not_shared() {
    let k = keys();
    // Approves, but only after a while: the first request is still being decided at the reload.
    let a = Downstream::start("a", &k.servers[0], always(Answer::approve().after(1500)), 0).await;
    let gw = Gateway::start(&[entry(&a, "")], "").await;
    let payload = request("key_sign", "stop-in-flight");
    let url = gw.url();
    let first = {
        let (url, payload) = (url.clone(), payload.clone());
        tokio::spawn(async move { send(&url, &payload).await })
    };
    until(10, "the first request is forwarded", || a.calls() == 1).await;
    reload_to(&gw, &[entry(&a, "")], REJECT_ALL).await;
    let twin = send(&url, &payload).await;
    twin.expect(0, "REJECT", &["embedded risk control: key_sign reject_all"]);
    // The first request started before the reload and finishes on its own generation.
    first.await.unwrap().expect(0, "APPROVE", &[]);
    assert_eq!(a.calls(), 1);
}

// === 5. a change made while a reload is loading is not lost ===

/// Embedded rules with a key_gen allow_list of about `bytes` bytes: a config that takes a while
/// to parse, which widens the window between reading the files and fingerprinting them.
fn large_rules(bytes: usize) -> String {
    let mut y =
        String::from("embedded_risk_control_rules:\n  enable: true\n  key_gen:\n    allow_list:\n");
    let mut i = 0;
    while y.len() < bytes {
        y.push_str(&format!(
            "      - {{ threshold: 2, node_ids: [n{i}a, n{i}b, n{i}c] }}\n"
        ));
        i += 1;
    }
    y
}

/// Replaces `path` atomically, as an operator's tooling would.
fn replace(path: &std::path::Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Sends key_sign requests until the answer's status is `status` (bounded).
async fn until_status(gw: &Gateway, status: i64, what: &str) {
    let started = Instant::now();
    for i in 0.. {
        let id = format!("{what}-{}-{i}", gw.generation());
        let r = send(&gw.url(), &request("key_sign", &id)).await;
        if r.response.status == status {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what}: still {:?} at generation {}",
            r.response,
            gw.generation()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_removed_while_a_reload_is_loading_is_not_skipped() {
    let k = keys();
    // The downstream's answers are signed with a key that leaked; its operator removes it from
    // the gateway's trust just as another config change is being loaded.
    let leaked = &k.servers[2];
    let ds = Downstream::start(
        "ds",
        &k.servers[0],
        always(Answer::approve().signed_by(leaked)),
        0,
    )
    .await;
    let keydir = tempfile::tempdir().unwrap();
    let keyfile = keydir.path().join("ds-pub.key");
    let good = k.servers[0].public_pem();
    let mut both = good.clone();
    both.extend(leaked.public_pem());
    std::fs::write(&keyfile, &both).unwrap();
    let e = || Entry {
        ds: &ds,
        url: None,
        pubkey: Some(keyfile.clone()),
        extra: "",
    };
    let rules = format!("reload_settle_ms: 150\n{}", large_rules(900_000));
    let gw = Gateway::start(&[e()], &rules).await;
    gw.watch();
    until_status(&gw, 0, "trusted").await;
    // Each round: a config change, and the key removed a little later, at a different moment
    // of the reload each time (the watcher waits 150 ms for writes to settle, then reads and
    // parses the large config and the key files). Whenever the removal lands, it must apply.
    for round in 0..12u64 {
        let extra = format!("deadline_ms: {}\n{rules}", 6000 + round);
        gw.write_config(&config_yaml(gw.addr, &[e()], &extra));
        let written = Instant::now();
        while written.elapsed() < Duration::from_millis(140 + 25 * round) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        replace(&keyfile, &good);
        until_status(&gw, 30, "leaked key removed").await;
        assert_eq!(
            gw.shared.current.load().config.deadline_ms,
            6000 + round,
            "the config change applied too"
        );
        // Trust it again for the next round.
        replace(&keyfile, &both);
        until_status(&gw, 0, "trusted again").await;
    }
}

// === 7. smaller items ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listen_moves_metrics_readyz_and_healthz_off_the_node_listener() {
    let k = keys();
    let a = Downstream::start("a", &k.servers[0], always(Answer::approve()), 0).await;
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let gw = Gateway::start(&[entry(&a, "")], &format!("admin_listen: {admin_addr}")).await;
    tokio::spawn(tss_callback_gateway::inbound::listener::serve_admin(
        admin,
        gw.shared.clone(),
        std::future::pending(),
    ));
    for path in ["/metrics", "/readyz", "/healthz"] {
        let (status, _) = get(&format!("http://{}{path}", gw.addr)).await;
        assert_eq!(status, 404, "{path} on the node's listener");
        let (status, body) = get(&format!("http://{admin_addr}{path}")).await;
        assert_eq!(status, 200, "{path} on admin_listen");
        assert!(!body.is_empty());
    }
    let (status, _) = get(&format!("http://{}/ping", gw.addr)).await;
    assert_eq!(status, 200);
    send(&gw.url(), &request("key_sign", "node-port"))
        .await
        .expect(0, "APPROVE", &[]);
    // The admin port serves nothing of the node's.
    let (status, _) = get(&format!("http://{admin_addr}/ping")).await;
    assert_eq!(status, 404);
    let resp = http()
        .post(format!("http://{admin_addr}/v2/check"))
        .body(node_form(&request("key_sign", "admin-port")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    assert_eq!(a.calls(), 1);
}

const SECRET: &str = "s3cretpass";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_are_warned_and_credentials_never_leak() {
    use std::os::unix::fs::PermissionsExt;
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    // A private key readable by the group.
    let key = dir.path().join("gateway-pri.pem");
    std::fs::copy(&k.gateway.pkcs8, &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (listen, admin) = (free_port(), free_port());
    // Nothing listens on `closed`: calls to it fail, and their errors must not carry the URL's
    // credentials.
    let closed = free_port();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{listen}\nadmin_listen: 127.0.0.1:{admin}\n\
             tss_node_public_key: {}\ngateway_private_key: {}\naudit_log: audit.jsonl\n\
             health_check_interval_ms: 200\n\
             embedded_risk_control_rules: {{ enable: true, key_reshare: {{ reject_all: true }} }}\n\
             callback_servers:\n  - name: creds\n    service_address: http://gw:{SECRET}@127.0.0.1:{closed}/v2/check\n    pubkey_path: {}\n    request_types: [key_gen]\n    retries: 0\n",
            k.node.spki.display(),
            key.display(),
            k.servers[0].spki.display(),
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_tss-callback-gateway");

    let out = std::process::Command::new(bin)
        .args(["check-config", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        !stdout.contains(SECRET) && !stderr.contains(SECRET),
        "{stdout}{stderr}"
    );
    assert!(stdout.contains("http://***@127.0.0.1"), "{stdout}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .collect();
    for t in ["key_sign", "key_share_sign"] {
        assert!(
            warnings
                .iter()
                .any(|w| w.contains(&format!("warning: {t} requests would be approved"))),
            "{t} not named: {stderr}"
        );
    }
    for t in ["key_gen", "key_reshare", "ping"] {
        assert!(
            !warnings
                .iter()
                .any(|w| w.starts_with(&format!("warning: {t} "))),
            "{t} named: {stderr}"
        );
    }
    assert!(
        warnings.iter().any(|w| w.contains("gateway_private_key") && w.contains("readable by group or others")),
        "{stderr}"
    );

    // The running gateway: start-up log, answers, /readyz, audit.
    let log = dir.path().join("stderr.log");
    let mut child = std::process::Command::new(bin)
        .args(["run", "-c"])
        .arg(&config)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while reqwest::get(format!("http://127.0.0.1:{admin}/healthz"))
        .await
        .is_err()
    {
        assert!(started.elapsed() < Duration::from_secs(10), "never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("http://127.0.0.1:{listen}/v2/check");
    let r = send(&url, &request("key_gen", "creds-1")).await;
    r.expect(30, "REJECT", &["creds: transport_error"]);
    assert!(!r.response.error.contains(SECRET), "{}", r.response.error);
    // Approved with nothing checking it, as Cobo's rules would: the warning is the safeguard.
    send(&url, &request("key_sign", "unchecked"))
        .await
        .expect(0, "APPROVE", &[]);
    let started = Instant::now();
    loop {
        let (status, body) = get(&format!("http://127.0.0.1:{admin}/readyz")).await;
        assert_eq!(status, 200);
        assert!(!body.contains(SECRET), "{body}");
        assert!(body.contains("http://***@127.0.0.1"), "{body}");
        // Wait for a health check result (its error text included) to be in the report.
        if body.contains("transport_error") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success());
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(!logs.contains(SECRET), "{logs}");
    assert!(
        logs.contains("key_sign requests would be approved"),
        "{logs}"
    );
    assert!(logs.contains("readable by group or others"), "{logs}");
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(!audit.contains(SECRET), "{audit}");
    assert!(audit.contains("transport_error"), "{audit}");
}

// === 8. what mutation testing found ===

#[test]
fn an_allow_list_under_key_sign_or_key_share_sign_is_refused_naming_the_field() {
    for section in ["key_sign", "key_share_sign"] {
        let yaml = format!(
            "tss_node_public_key: n.pub\ngateway_private_key: g.pem\n\
             embedded_risk_control_rules:\n  enable: true\n  {section}:\n    reject_all: false\n    allow_list:\n      - {{}}\n"
        );
        let err = tss_callback_gateway::config::Config::parse(
            &yaml,
            std::path::Path::new("/etc/gw/config.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(section) && err.contains("allow_list"),
            "{section}: {err}"
        );
        assert!(!err.contains('\n'), "{err}");
    }
}
