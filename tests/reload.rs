//! Hot reload: a file written in place is loaded only once it settled, every file the config names
//! is watched and no other, a refused reload is retried until it loads, and what a reload
//! retires (servers' series, old generations) does not stay behind.

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::downstream::{always, Answer, Downstream};
use common::gateway::{config_yaml, entry, entry_at, free_port, rss_of, spawn_run, Gateway};
use common::http::{get, get_json};
use common::keys::keys;
use common::node::send;
use common::pki::Pki;
use common::requests::request;
use common::until;
use tss_callback_gateway::generation::Generation;
use tss_callback_gateway::ops::reload;

async fn ds(name: &str, i: usize, answer: Answer) -> Downstream {
    Downstream::start(name, &keys().servers[i], always(answer), 0).await
}

/// Writes `bytes` to `path` atomically (write aside, then rename).
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp-replace");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// === settling ===

/// Issue 19 §3: `cat > gw.yaml` wrote a valid prefix without the `veto` server, and the watcher
/// loaded it. With `reload_settle_ms` the prefix is never loaded: a request sent while the file
/// is half written is still decided by the old generation, and the next generation is the whole
/// file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_written_in_place_slowly_is_never_loaded_half_written() {
    let a = ds("a", 0, Answer::approve()).await;
    let veto = ds("veto", 1, Answer::reject("veto says no")).await;
    let c = ds("c", 2, Answer::approve()).await;
    let settle = "reload_settle_ms: 1000";
    let gw = Gateway::start(&[entry(&a, ""), entry(&veto, "")], settle).await;
    gw.watch();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let full = config_yaml(
        gw.addr,
        &[entry(&a, ""), entry(&c, ""), entry(&veto, "")],
        settle,
    );
    let (prefix, rest) = full.split_at(full.find("  - name: veto").unwrap());
    assert!(
        tss_callback_gateway::config::Config::parse(prefix, &gw.config_path).is_ok(),
        "the prefix alone must be a valid config, or the test proves nothing"
    );
    {
        let mut f = std::fs::File::create(&gw.config_path).unwrap();
        f.write_all(prefix.as_bytes()).unwrap();
        f.flush().unwrap();
        // Longer than the old fixed 150 ms settle, shorter than reload_settle_ms.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let during = send(&gw.url(), &request("key_sign", "half-written")).await;
        f.write_all(rest.as_bytes()).unwrap();
        f.flush().unwrap();
        during.expect(0, "REJECT", &["veto: veto says no"]);
    }
    until(15, "the whole file loaded", || gw.generation() >= 2).await;
    send(&gw.url(), &request("key_sign", "whole")).await.expect(
        0,
        "REJECT",
        &["veto: veto says no"],
    );
    assert!(c.calls() >= 1, "the new config is the one running");
    // Two more settle periods: nothing else is loaded; the generation went up by exactly one.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(gw.generation(), 2);
}

// === what is watched ===

/// Issue 19 §5: the watcher did not follow `downstream_signing_key`, so after a reload refused
/// for a bad key there, fixing that file alone reloaded nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixing_a_bad_downstream_signing_key_alone_reloads() {
    let a = ds("a", 0, Answer::approve()).await;
    let gw = Gateway::start(&[entry(&a, "")], "reload_settle_ms: 100").await;
    gw.watch();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let key = gw.dir.path().join("requests-pri.pem");
    std::fs::write(&key, "not a key\n").unwrap();
    let extra = format!(
        "reload_settle_ms: 100\ndownstream_signing_key: {}",
        key.display()
    );
    gw.write_config(&config_yaml(gw.addr, &[entry(&a, "")], &extra));
    let failures = r#"tss_gateway_config_reloads_total{result="failure"}"#;
    until(10, "the bad key refused", || gw.metric(failures) >= 1.0).await;
    assert_eq!(gw.generation(), 1);

    // The fix touches the key file only.
    replace(&key, &std::fs::read(&keys().gateway.pkcs8).unwrap());
    until(10, "the fixed key loaded", || gw.generation() >= 2).await;
    assert_eq!(
        gw.shared.current.load().config.downstream_signing_key,
        Some(key)
    );
    send(&gw.url(), &request("key_sign", "signed-with-the-new-key"))
        .await
        .expect(0, "APPROVE", &[]);
}

/// Every file a generation reads is a file the watcher follows, for a config that names every
/// kind of file there is (keys, listener TLS, downstream CA and client certificate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_file_a_generation_reads_is_watched() {
    let k = keys();
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    let p = |f: &str| pki.path(f).display().to_string();
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:1\ntss_node_public_key: {}\ngateway_private_key: {}\n\
             downstream_signing_key: {}\ntls:\n  cert: {}\n  key: {}\ncallback_servers:\n\
             \x20 - name: a\n    service_address: https://127.0.0.1:1/v2/check\n\
             \x20   pubkey_path: {}\n    ca_file: {}\n    client_cert: {}\n    client_key: {}\n",
            k.node.spki.display(),
            k.gateway.pkcs8.display(),
            k.gateway.pkcs1.display(),
            p("server.pem"),
            p("server.key"),
            k.servers[0].spki.display(),
            p("ca.pem"),
            p("client.pem"),
            p("client.key"),
        ),
    )
    .unwrap();
    let g = Generation::load(&config, 1).unwrap_or_else(|e| panic!("{e}"));
    let watched = reload::watched_files(&config);
    let read: Vec<&Path> = g.source_files().collect();
    assert_eq!(read.len(), 10, "{read:?}");
    for f in read {
        assert!(
            watched.contains(f),
            "{} is read but not watched",
            f.display()
        );
    }
}

/// Issue 20 item 10: any write in a watched folder made the watcher read and hash every key
/// file. Writes to other files in the config's folder now read nothing; a write to the config
/// itself still does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_other_files_in_the_config_folder_read_nothing() {
    let a = ds("a", 0, Answer::approve()).await;
    let gw = Gateway::start(&[entry(&a, "")], "reload_settle_ms: 100").await;
    gw.watch();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = &gw.shared.reload;
    let before = status.disk_reads();
    for i in 0..200 {
        std::fs::write(gw.dir.path().join(format!("other-{i}.txt")), "x").unwrap();
    }
    replace(&gw.dir.path().join("other-0.txt"), b"y");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(status.disk_reads(), before, "unrelated writes were read");

    // The watcher is alive: the same bytes written to the config are read, and load nothing.
    let same = std::fs::read(&gw.config_path).unwrap();
    std::fs::write(&gw.config_path, same).unwrap();
    until(5, "the config write read", || status.disk_reads() > before).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gw.generation(), 1);
}

// === a refused reload is retried ===

/// Issue 20 item 1: an emergency stop saved while a reload briefly failed was never applied,
/// because the watcher took the refused state as seen. Here the node's key is on a volume that
/// is not mounted yet (a folder nobody watches): the reload is refused, the failure is visible
/// in the gauge and `/readyz`, and once the volume appears (no write to anything the config
/// names) the retry applies `key_sign: reject_all: true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_refused_by_a_transient_error_is_applied_once_it_clears() {
    let k = keys();
    let a = ds("a", 0, Answer::approve()).await;
    let gw = Gateway::start(&[entry(&a, "")], "reload_settle_ms: 100").await;
    gw.watch();
    tokio::time::sleep(Duration::from_millis(200)).await;
    send(&gw.url(), &request("key_sign", "before"))
        .await
        .expect(0, "APPROVE", &[]);

    let elsewhere = tempfile::tempdir().unwrap();
    let volume = elsewhere.path().join("volume");
    std::os::unix::fs::symlink(&volume, gw.dir.path().join("mnt")).unwrap();
    let node_key = gw.dir.path().join("mnt/node.key");
    let stop = "reload_settle_ms: 100\nembedded_risk_control_rules:\n  enable: true\n  key_sign:\n    reject_all: true";
    let yaml = config_yaml(gw.addr, &[entry(&a, "")], stop).replace(
        &format!("tss_node_public_key: {}", k.node.spki.display()),
        &format!("tss_node_public_key: {}", node_key.display()),
    );
    assert!(yaml.contains("mnt/node.key"));
    gw.write_config(&yaml);

    let failing = "tss_gateway_config_reload_failing";
    until(10, "the refusal visible", || gw.metric(failing) == 1.0).await;
    let readyz = get_json(&format!("http://{}/readyz", gw.addr)).await;
    assert_eq!(readyz["ready"], true, "{readyz}");
    assert!(
        readyz["config_error"]
            .as_str()
            .is_some_and(|e| e.contains("tss_node_public_key")),
        "{readyz}"
    );
    send(&gw.url(), &request("key_sign", "while-refused"))
        .await
        .expect(0, "APPROVE", &[]);

    // The volume arrives.
    std::fs::create_dir(&volume).unwrap();
    std::fs::copy(&k.node.spki, volume.join("node.key")).unwrap();
    until(20, "the emergency stop applied", || gw.generation() >= 2).await;
    send(&gw.url(), &request("key_sign", "after")).await.expect(
        0,
        "REJECT",
        &["embedded risk control"],
    );
    assert_eq!(gw.metric(failing), 0.0);
    let readyz = get_json(&format!("http://{}/readyz", gw.addr)).await;
    assert!(readyz.get("config_error").is_none(), "{readyz}");
}

/// A refused config that is put back as it was clears the failure without a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn putting_the_running_config_back_clears_the_failure() {
    let a = ds("a", 0, Answer::approve()).await;
    let gw = Gateway::start(&[entry(&a, "")], "reload_settle_ms: 100").await;
    gw.watch();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let good = std::fs::read(&gw.config_path).unwrap();
    gw.write_config("callback_servers: [oops\n");
    let failing = "tss_gateway_config_reload_failing";
    until(10, "the refusal visible", || gw.metric(failing) == 1.0).await;
    replace(&gw.config_path, &good);
    until(10, "the failure cleared", || gw.metric(failing) == 0.0).await;
    assert_eq!(gw.generation(), 1);
    assert!(gw.shared.reload.error().is_none());
}

// === what a reload leaves behind ===

/// Issue 20 item 8: 387 renames grew `/metrics` from 22 KB to 1.78 MB. A server's series go once
/// it left the config and its calls are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_of_renamed_servers_are_deleted() {
    let a = ds("a", 0, Answer::approve()).await;
    let extra = "health_check_interval_ms: 100";
    let gw = Gateway::start(&[entry(&a, "")], extra).await;
    send(&gw.url(), &request("key_sign", "first"))
        .await
        .expect(0, "APPROVE", &[]);
    until(5, "a health check", || {
        gw.metric(r#"tss_gateway_downstream_up{mode="enforce",server="a"}"#) == 1.0
    })
    .await;
    let one_server = gw.shared.metrics.render().len();
    let named = |name: &str| {
        config_yaml(gw.addr, &[entry(&a, "")], extra)
            .replace("  - name: a\n", &format!("  - name: {name}\n"))
    };
    for i in 0..50 {
        gw.write_config(&named(&format!("renamed-{i}")));
        reload::reload(&gw.shared, &gw.config_path, "test").unwrap();
        send(
            &gw.url(),
            &request("key_sign", &format!("after-rename-{i}")),
        )
        .await
        .expect(0, "APPROVE", &[]);
    }
    let gone = |text: &str| {
        !text.contains("server=\"a\"")
            && (0..49).all(|i| !text.contains(&format!("server=\"renamed-{i}\"")))
    };
    until(10, "old names forgotten", || {
        gone(&gw.shared.metrics.render())
    })
    .await;
    let text = gw.shared.metrics.render();
    assert!(text.contains("server=\"renamed-49\""));
    assert!(
        text.len() < one_server + 2048,
        "/metrics grew from {one_server} to {} bytes",
        text.len()
    );
}

/// Issue 21 §5: `tss_gateway_downstream_up` carries each server's mode (alerts page for enforcing
/// servers only), and a reload that switches a server's mode deletes the series of its old mode
/// at once: no `mode="enforce"` series stays behind for a server that is now in shadow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downstream_up_carries_the_mode_and_a_switch_leaves_no_stale_series() {
    let a = ds("a", 0, Answer::approve()).await;
    let b = ds("b", 1, Answer::approve()).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refused = format!("http://{}/v2/check", closed.local_addr().unwrap());
    drop(closed);
    let extra = "health_check_interval_ms: 100";
    let gw = Gateway::start(
        &[
            entry(&a, ""),
            entry_at(&b, &refused, "mode: shadow\nretries: 0"),
        ],
        extra,
    )
    .await;
    let up_lines = |text: &str| -> Vec<String> {
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("tss_gateway_downstream_up{"))
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines
    };
    let scrape = || async { get(&format!("http://{}/metrics", gw.addr)).await.1 };
    let before = [
        r#"tss_gateway_downstream_up{mode="enforce",server="a"} 1"#,
        r#"tss_gateway_downstream_up{mode="shadow",server="b"} 0"#,
    ];
    until(10, "both servers health-checked", || {
        up_lines(&gw.shared.metrics.render()) == before
    })
    .await;
    assert_eq!(up_lines(&scrape().await), before);

    // a goes to shadow, b (still down) starts to enforce.
    gw.write_config(&config_yaml(
        gw.addr,
        &[
            entry(&a, "mode: shadow"),
            entry_at(&b, &refused, "retries: 0"),
        ],
        extra,
    ));
    reload::reload(&gw.shared, &gw.config_path, "test").unwrap();
    let text = scrape().await;
    for stale in before {
        let series = stale.rsplit_once(' ').unwrap().0;
        assert!(
            !text.contains(series),
            "{series} still exported after the reload:\n{text}"
        );
    }
    let after = [
        r#"tss_gateway_downstream_up{mode="enforce",server="b"} 0"#,
        r#"tss_gateway_downstream_up{mode="shadow",server="a"} 1"#,
    ];
    until(10, "both servers health-checked in their new mode", || {
        up_lines(&gw.shared.metrics.render()) == after
    })
    .await;
    assert_eq!(up_lines(&scrape().await), after);
}

/// Issue 20 item 9: after 1,000 reloads no old generation is alive once its requests are done
/// (clients and call slots carried over are shared, not chained to the old generation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_leave_no_old_generation_alive() {
    let a = ds("a", 0, Answer::approve()).await;
    let gw = Gateway::start(&[entry(&a, "")], "").await;
    let yaml = |i: u64| {
        config_yaml(
            gw.addr,
            &[entry(&a, "")],
            &format!("deadline_ms: {}", 6000 + i),
        )
    };
    let mut old = Vec::new();
    for i in 0..1000 {
        old.push(Arc::downgrade(&gw.shared.current.load_full()));
        gw.write_config(&yaml(i));
        reload::reload(&gw.shared, &gw.config_path, "test").unwrap();
        if i % 20 == 0 {
            send(&gw.url(), &request("key_sign", &format!("load-{i}")))
                .await
                .expect(0, "APPROVE", &[]);
        }
    }
    until(10, "old generations released", || {
        old.iter().all(|g| g.upgrade().is_none())
    })
    .await;
    assert_eq!(gw.generation(), 1001);
}

/// Issue 20 item 9: 1,234 reloads raised the binary's RSS from 10.9 to 16.2 MB. The running
/// binary, reloading through its watcher 1,200 times with health checks on: memory stays flat
/// after the first 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_reloads_keep_the_binarys_memory_flat() {
    let a = ds("a", 0, Answer::approve()).await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    let listen = format!("127.0.0.1:{port}").parse().unwrap();
    let yaml = |i: u64| {
        let extra = format!(
            "reload_settle_ms: 0\nhealth_check_interval_ms: 50\ndeadline_ms: {}",
            6000 + i
        );
        config_yaml(listen, &[entry(&a, "")], &extra)
    };
    std::fs::write(&config, yaml(0)).unwrap();
    let mut child = spawn_run(&config, port);
    // A log line per reload: read it, or the pipe fills and the gateway blocks on logging.
    let mut log = child.stderr.take().unwrap();
    std::thread::spawn(move || std::io::copy(&mut log, &mut std::io::sink()));
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    let mut warm = 0.0;
    for i in 1..=1200u64 {
        replace(&config, yaml(i).as_bytes());
        let started = Instant::now();
        while get_json(&readyz).await["config_generation"].as_u64() != Some(i + 1) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "reload {i} not seen"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if i == 200 {
            warm = rss_of(child.id());
        }
    }
    let grown = rss_of(child.id()) - warm;
    let _ = child.kill();
    let _ = child.wait();
    eprintln!("RSS after 200 reloads {warm:.1} MB, then grew {grown:.2} MB");
    assert!(grown < 2.0, "RSS grew {grown:.2} MB over 1,000 reloads");
}
