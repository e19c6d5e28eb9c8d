//! Operations: duplicate-safe retries, hot reload under load, health checks, TLS.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::downstream::{always, Answer, Downstream};
use common::gateway::{config_yaml, entry, entry_at, free_port, spawn_run, Entry, Gateway};
use common::http::{get_json, http};
use common::keys::keys;
use common::node::send;
use common::pki::Pki;
use common::requests::request;
use common::tokens::{open, token, CallbackResponse};

async fn ds(name: &str, i: usize, answer: Answer) -> Downstream {
    Downstream::start(name, &keys().servers[i], always(answer), 0).await
}

// === duplicate-safe retries ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_retries_share_one_fan_out_and_definitive_decisions_are_remembered() {
    let a = ds("a", 0, Answer::approve().after(300)).await;
    let gw = Gateway::start(&[entry(&a, "")], "audit_log: audit.jsonl").await;
    let payload = request("key_sign", "retry-me");
    // The node retries while the first attempt is still being decided.
    let url = gw.url();
    let replies = futures::future::join_all((0..5).map(|_| send(&url, &payload))).await;
    for r in &replies {
        r.expect(0, "APPROVE", &[]);
    }
    assert_eq!(
        a.calls(),
        1,
        "concurrent identical requests share one fan-out"
    );
    // A later identical retry gets the remembered approval without asking again (the call count,
    // not the clock, shows it: a timed bound failed on a loaded machine).
    let r = send(&gw.url(), &payload).await;
    r.expect(0, "APPROVE", &[]);
    assert_eq!(a.calls(), 1);
    // Every answer is audited; retries are marked.
    let records = gw.audit_records();
    assert_eq!(records.len(), 6);
    assert_eq!(records.iter().filter(|r| r["duplicate"] == true).count(), 5);

    // Same request_id, different payload: refused as suspicious, nobody asked.
    let other = request("key_gen", "retry-me");
    send(&gw.url(), &other)
        .await
        .expect(10, "REJECT", &["different payload"]);
    assert_eq!(a.calls(), 1);

    // Status-0 rejections are remembered too.
    a.set_script(always(Answer::reject("limit")));
    let rejected = request("key_sign", "rejected-once");
    send(&gw.url(), &rejected)
        .await
        .expect(0, "REJECT", &["a: limit"]);
    a.set_script(always(Answer::approve()));
    send(&gw.url(), &rejected)
        .await
        .expect(0, "REJECT", &["a: limit"]);
    assert_eq!(a.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_30_failures_are_not_remembered() {
    let a = ds("a", 0, Answer::signed(30, "REJECT", "database down")).await;
    let gw = Gateway::start(&[entry(&a, "")], "").await;
    let payload = request("key_sign", "fails-then-works");
    send(&gw.url(), &payload)
        .await
        .expect(30, "REJECT", &["a: error_status"]);
    a.set_script(always(Answer::approve()));
    send(&gw.url(), &payload).await.expect(0, "APPROVE", &[]);
    assert_eq!(a.calls(), 2);
}

// === hot reload ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_is_refused_and_the_running_one_kept() {
    let a = ds("a", 0, Answer::approve()).await;
    let gw = Gateway::start(&[entry(&a, "")], "").await;
    let good = std::fs::read_to_string(&gw.config_path).unwrap();
    std::fs::write(
        &gw.config_path,
        good.replace("timeout_ms", "timeout_msx") + "bogus: 1\n",
    )
    .unwrap();
    let err =
        tss_callback_gateway::ops::reload::reload(&gw.shared, &gw.config_path, "test").unwrap_err();
    assert!(err.to_string().contains("bogus"), "{err}");
    assert_eq!(gw.generation(), 1);
    assert_eq!(
        gw.metric(r#"tss_gateway_config_reloads_total{result="failure"}"#),
        1.0
    );
    send(&gw.url(), &request("key_sign", "still-works"))
        .await
        .expect(0, "APPROVE", &[]);
    // A config naming a key that does not load is refused the same way.
    std::fs::write(
        &gw.config_path,
        good.replace(
            &keys().servers[0].spki.display().to_string(),
            "/nonexistent.key",
        ),
    )
    .unwrap();
    assert!(
        tss_callback_gateway::ops::reload::reload(&gw.shared, &gw.config_path, "test").is_err()
    );
    std::fs::write(&gw.config_path, &good).unwrap();
    assert_eq!(
        tss_callback_gateway::ops::reload::reload(&gw.shared, &gw.config_path, "test").unwrap(),
        2
    );
    assert_eq!(
        gw.metric(r#"tss_gateway_config_reloads_total{result="success"}"#),
        1.0
    );
    // An unchanged server keeps its warm keep-alive connection across the reload.
    send(&gw.url(), &request("key_sign", "same-connection"))
        .await
        .expect(0, "APPROVE", &[]);
    assert_eq!(a.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_finish_on_the_config_they_started_with() {
    let slow = ds("slow", 0, Answer::approve().after(600)).await;
    let gw = Gateway::start(&[entry(&slow, "")], "").await;
    let url = gw.url();
    let in_flight = tokio::spawn(async move { send(&url, &request("key_sign", "old-gen")).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The new generation would reject everything from this server... but only new requests see it.
    let other = ds("other", 1, Answer::reject("new config")).await;
    let listen = gw.addr;
    std::fs::write(
        &gw.config_path,
        config_yaml(listen, &[entry(&other, "")], ""),
    )
    .unwrap();
    tss_callback_gateway::ops::reload::reload(&gw.shared, &gw.config_path, "test").unwrap();
    in_flight.await.unwrap().expect(0, "APPROVE", &[]);
    send(&gw.url(), &request("key_sign", "new-gen"))
        .await
        .expect(0, "REJECT", &["other: new config"]);
}

/// Continuous load (50 requests/s for 15 s) while the config file changes under the gateway:
/// add a server, remove one, rotate a downstream key, write an invalid file, write a good one.
/// No request fails or gets a wrong decision because of a reload; an added server receives
/// requests within 1 s of the change; a removed one receives none after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_under_load_drops_nothing() {
    let k = keys();
    let a = ds("a", 0, Answer::approve()).await;
    let b = ds("b", 1, Answer::approve()).await;
    let c = ds("c", 2, Answer::approve()).await;
    // The audit log says which generation each request ran on and which servers it asked.
    // A short settle, so an added server is asked within 1 s of the change.
    let audit = "audit_log: audit.jsonl\nreload_settle_ms: 100";
    let gw = Gateway::start(&[entry(&a, ""), entry(&b, "")], audit).await;
    gw.watch();
    let yaml = |entries: &[Entry<'_>]| config_yaml(gw.addr, entries, audit);

    let url = gw.url();
    let load = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut pending = Vec::new();
        for i in 0..750 {
            tick.tick().await;
            let url = url.clone();
            pending.push(tokio::spawn(async move {
                (
                    i,
                    send(&url, &request("key_sign", &format!("load-{i}"))).await,
                )
            }));
        }
        futures::future::join_all(pending).await
    });

    let wait_generation = |g: u64| {
        let shared = gw.shared.clone();
        async move {
            let started = Instant::now();
            while shared.current.load().number < g {
                assert!(
                    started.elapsed() < Duration::from_secs(3),
                    "reload to generation {g} not seen"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            started.elapsed()
        }
    };

    tokio::time::sleep(Duration::from_secs(2)).await;
    // Add c.
    let changed = Instant::now();
    gw.write_config(&yaml(&[entry(&a, ""), entry(&b, ""), entry(&c, "")]));
    wait_generation(2).await;
    tokio::time::sleep(Duration::from_millis(1000).saturating_sub(changed.elapsed())).await;
    assert!(c.calls() > 0, "the added server got no request within 1 s");

    tokio::time::sleep(Duration::from_secs(1)).await;
    // Remove b.
    gw.write_config(&yaml(&[entry(&a, ""), entry(&c, "")]));
    wait_generation(3).await;

    // Rotate a's key: publish old and new together, switch a, then drop the old key.
    let dir = gw.dir.path();
    let both = dir.join("a-both.key");
    let mut pems = std::fs::read(&k.servers[0].spki).unwrap();
    pems.extend(std::fs::read(&k.servers[3].spki).unwrap());
    std::fs::write(&both, pems).unwrap();
    gw.write_config(&yaml(&[entry_at_key(&a, &both), entry(&c, "")]));
    wait_generation(4).await;
    // Requests that started on generation 3 (old key only) must finish before a signs with the
    // new key: an operator waits deadline_ms; requests here take milliseconds, so 1.5 s is ample.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.set_script(always(Answer::approve().signed_by(&k.servers[3])));
    // Likewise, requests that might get an old-key answer finish before the old key goes.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let only_new = dir.join("a-new.key");
    std::fs::copy(&k.servers[3].spki, &only_new).unwrap();
    gw.write_config(&yaml(&[entry_at_key(&a, &only_new), entry(&c, "")]));
    wait_generation(5).await;

    tokio::time::sleep(Duration::from_secs(1)).await;
    // An invalid file is refused; the running config stays.
    std::fs::write(&gw.config_path, "callback_servers: [oops\n").unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(gw.generation(), 5);
    assert!(gw.metric(r#"tss_gateway_config_reloads_total{result="failure"}"#) >= 1.0);

    tokio::time::sleep(Duration::from_secs(1)).await;
    // Putting the running config back clears the failure; there is nothing new to load.
    gw.write_config(&yaml(&[entry_at_key(&a, &only_new), entry(&c, "")]));
    let started = Instant::now();
    while gw.metric("tss_gateway_config_reload_failing") != 0.0 {
        assert!(started.elapsed() < Duration::from_secs(5), "still failing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gw.generation(), 5);

    let results = load.await.unwrap();
    let mut failures = Vec::new();
    for r in results {
        let (i, reply) = r.unwrap();
        if !reply.approved() {
            failures.push((i, reply.response));
        }
    }
    assert!(
        failures.is_empty(),
        "{} requests not approved: {failures:?}",
        failures.len()
    );
    // Every call b got belongs to a request that ran on a generation that had b, and none that
    // ran on a later one asked it (counted from the audit log, not from wall-clock time).
    let records = gw.audit_records();
    let asked_b = |r: &serde_json::Value| {
        r["servers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "b")
    };
    let late: Vec<_> = records
        .iter()
        .filter(|r| r["config_generation"].as_u64().unwrap() >= 3 && asked_b(r))
        .map(|r| r["request_id"].clone())
        .collect();
    assert!(late.is_empty(), "the removed server was asked by {late:?}");
    assert_eq!(
        b.calls(),
        records.iter().filter(|r| asked_b(r)).count(),
        "b was called by requests that do not list it"
    );
    assert_eq!(a.unverified() + b.unverified() + c.unverified(), 0);
}

/// A Kubernetes ConfigMap update: the mounted directory's `..data` symlink is swapped to a new
/// timestamped folder, and `config.yaml` is a symlink through it. The gateway must see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_style_symlink_swap_is_hot_reloaded() {
    use std::os::unix::fs::symlink;
    let a = ds("a", 0, Answer::approve()).await;
    let b = ds("b", 1, Answer::reject("b is new")).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mount = tempfile::tempdir().unwrap();
    let m = mount.path();
    std::fs::create_dir(m.join("..2026_11_24_1")).unwrap();
    std::fs::write(
        m.join("..2026_11_24_1/config.yaml"),
        config_yaml(addr, &[entry(&a, "")], ""),
    )
    .unwrap();
    symlink("..2026_11_24_1", m.join("..data")).unwrap();
    symlink("..data/config.yaml", m.join("config.yaml")).unwrap();
    let config = m.join("config.yaml");
    let rt = tss_callback_gateway::generation::Generation::load(&config, 1).unwrap();
    let shared =
        tss_callback_gateway::Shared::new(rt, tss_callback_gateway::ops::metrics::Metrics::new())
            .unwrap();
    tokio::spawn(tss_callback_gateway::inbound::listener::serve(
        listener,
        shared.clone(),
        std::future::pending(),
    ));
    tokio::spawn(tss_callback_gateway::ops::reload::watch(
        shared.clone(),
        config.clone(),
    ));
    let url = format!("http://{addr}/v2/check");
    send(&url, &request("key_sign", "before-swap"))
        .await
        .expect(0, "APPROVE", &[]);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // What the kubelet does: write the new version aside, then atomically swap `..data`.
    std::fs::create_dir(m.join("..2026_11_24_2")).unwrap();
    std::fs::write(
        m.join("..2026_11_24_2/config.yaml"),
        config_yaml(addr, &[entry(&a, ""), entry(&b, "")], ""),
    )
    .unwrap();
    symlink("..2026_11_24_2", m.join("..data_tmp")).unwrap();
    std::fs::rename(m.join("..data_tmp"), m.join("..data")).unwrap();
    std::fs::remove_dir_all(m.join("..2026_11_24_1")).unwrap();

    let started = Instant::now();
    while shared.current.load().number < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the symlink swap was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    send(&url, &request("key_sign", "after-swap"))
        .await
        .expect(0, "REJECT", &["b: b is new"]);
}

/// An entry with a different public key file.
fn entry_at_key<'a>(ds: &'a Downstream, key: &Path) -> Entry<'a> {
    Entry {
        ds,
        url: None,
        extra: "",
        pubkey: Some(key.to_owned()),
    }
}

/// `SIGHUP` reloads the running binary; a changed `listen` is reported as needing a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_running_process() {
    let a = ds("a", 0, Answer::approve()).await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    let listen = format!("127.0.0.1:{port}").parse().unwrap();
    std::fs::write(&config, config_yaml(listen, &[entry(&a, "")], "")).unwrap();
    let child = spawn_run(&config, port);
    let base = format!("http://127.0.0.1:{port}");
    let readyz = || async {
        for _ in 0..200 {
            if let Ok(r) = http().get(format!("{base}/readyz")).send().await {
                return r.json::<serde_json::Value>().await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("gateway not ready");
    };
    assert_eq!(readyz().await["config_generation"], 1);
    let b = ds("b", 1, Answer::reject("b says no")).await;
    let other_port = port.wrapping_add(1);
    let moved = format!("127.0.0.1:{other_port}").parse().unwrap();
    std::fs::write(
        &config,
        config_yaml(moved, &[entry(&a, ""), entry(&b, "")], ""),
    )
    .unwrap();
    Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    let mut generation = 0;
    for _ in 0..100 {
        generation = readyz().await["config_generation"].as_u64().unwrap();
        if generation >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(generation >= 2);
    // Still on the old port, with the new servers.
    send(
        &format!("{base}/v2/check"),
        &request("key_sign", "after-hup"),
    )
    .await
    .expect(0, "REJECT", &["b: b says no"]);
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("restart"), "{log}");
}

// === health ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_feed_readyz_and_the_up_gauge_but_never_approve() {
    let up = ds("up", 0, Answer::approve()).await;
    let down = ds("down", 1, Answer::approve()).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refused = format!("http://{}/v2/check", closed.local_addr().unwrap());
    drop(closed);
    let gw = Gateway::start(
        &[entry(&up, ""), entry_at(&down, &refused, "retries: 0")],
        "health_check_interval_ms: 100",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        gw.metric(r#"tss_gateway_downstream_up{mode="enforce",server="up"}"#),
        1.0
    );
    assert_eq!(
        gw.metric(r#"tss_gateway_downstream_up{mode="enforce",server="down"}"#),
        0.0
    );
    assert!(
        up.seen().iter().all(|s| s.request_type == 0),
        "health checks are signed pings"
    );
    assert!(up.calls() >= 2);
    assert_eq!(up.unverified(), 0);
    let ready = get_json(&format!("http://{}/readyz", gw.addr)).await;
    let servers = ready["servers"].as_array().unwrap();
    let state = |name: &str| servers.iter().find(|s| s["name"] == name).unwrap()["health"].clone();
    assert_eq!(state("up")["up"], true);
    assert_eq!(state("down")["up"], false);
    assert_eq!(state("down")["outcome"], "transport_error");
    assert!(state("down")["checked_at"]
        .as_str()
        .unwrap()
        .starts_with("20"));
    // Healthy or not, each request still asks every server.
    send(&gw.url(), &request("key_sign", "health"))
        .await
        .expect(30, "REJECT", &["down: transport_error"]);
    // Health pings are not counted as TSS Node requests.
    assert_eq!(
        gw.metric(r#"tss_gateway_downstream_requests_total{outcome="approved",server="up"}"#),
        1.0
    );
}

// === TLS ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_downstreams_are_verified_with_ca_file_and_client_certificates() {
    let pki = Pki::new();
    let k = keys();
    let tls = Downstream::start_with(
        "tls",
        &k.servers[0],
        always(Answer::approve()),
        0,
        Some(pki.acceptor(false)),
    )
    .await;
    let mtls = Downstream::start_with(
        "mtls",
        &k.servers[1],
        always(Answer::approve()),
        0,
        Some(pki.acceptor(true)),
    )
    .await;
    assert!(tls.url().starts_with("https://"));
    let ca = pki.ca_file();
    let client = format!(
        "{ca}\nclient_cert: {}\nclient_key: {}",
        pki.path("client.pem").display(),
        pki.path("client.key").display()
    );
    let gw = Gateway::start(&[entry(&tls, &ca), entry(&mtls, &client)], "").await;
    send(&gw.url(), &request("key_sign", "tls-ok"))
        .await
        .expect(0, "APPROVE", &[]);

    // The test CA is not among the system roots: without ca_file the certificate is refused.
    let gw = Gateway::start(&[entry(&tls, "retries: 0")], "").await;
    send(&gw.url(), &request("key_sign", "tls-untrusted"))
        .await
        .expect(30, "REJECT", &["tls: transport_error"]);
    // Without a client certificate the mutual-TLS server refuses the handshake.
    let gw = Gateway::start(&[entry(&mtls, &format!("{ca}\nretries: 0"))], "").await;
    send(&gw.url(), &request("key_sign", "mtls-no-cert"))
        .await
        .expect(30, "REJECT", &["mtls: transport_error"]);
    assert_eq!(mtls.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_serves_https_when_configured() {
    let pki = Pki::new();
    let a = ds("a", 0, Answer::approve()).await;
    let tls = format!(
        "tls:\n  cert: {}\n  key: {}",
        pki.path("server.pem").display(),
        pki.path("server.key").display()
    );
    let gw = Gateway::start(&[entry(&a, "")], &tls).await;
    let ca = reqwest::Certificate::from_pem(&std::fs::read(pki.path("ca.pem")).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([ca])
        .build()
        .unwrap();
    let t = token(
        &keys().node.encoding(),
        &request("key_sign", "https-in"),
        "node",
    );
    let resp = client
        .post(format!("https://{}/v2/check", gw.addr))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("TSS_JWT_MSG={t}"))
        .send()
        .await
        .unwrap();
    let body: String = resp.json().await.unwrap();
    let answer: CallbackResponse =
        serde_json::from_slice(&open(&body, &keys().gateway.decoding()).unwrap()).unwrap();
    assert_eq!((answer.status, answer.action.as_str()), (0, "APPROVE"));
    // Plain HTTP on the TLS port gets no answer.
    assert!(http()
        .post(gw.url())
        .body("TSS_JWT_MSG=x")
        .send()
        .await
        .is_err());

    // Renewing the certificate is a file change: the next connection gets the new one.
    gw.watch();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let renewed = Pki::new();
    for f in ["server.key", "server.pem"] {
        let tmp = pki.path(&format!("{f}.new"));
        std::fs::copy(renewed.path(f), &tmp).unwrap();
        std::fs::rename(&tmp, pki.path(f)).unwrap();
    }
    let ca =
        reqwest::Certificate::from_pem(&std::fs::read(renewed.path("ca.pem")).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([ca])
        .build()
        .unwrap();
    let started = Instant::now();
    while client
        .get(format!("https://{}/healthz", gw.addr))
        .send()
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the renewed certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gw.generation() >= 2);
}
