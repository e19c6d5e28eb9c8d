//! The gateway under test: served in this process on loopback ([`Gateway`]), or run as the real
//! binary ([`spawn_run`]), with a config written for the test's downstreams.

use tss_callback_gateway::generation::Generation;
use tss_callback_gateway::inbound::listener::serve;
use tss_callback_gateway::ops::metrics::Metrics;
use tss_callback_gateway::ops::{health, reload};
use tss_callback_gateway::Shared;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use super::downstream::Downstream;
use super::keys::keys;

/// The gateway binary this test run built.
pub const BIN: &str = env!("CARGO_BIN_EXE_tss-callback-gateway");

/// One downstream's entry in a gateway config.
pub struct Entry<'a> {
    pub ds: &'a Downstream,
    /// `service_address` if not the server's own.
    pub url: Option<String>,
    /// `pubkey_path` if not the server's own SPKI file.
    pub pubkey: Option<PathBuf>,
    /// Extra YAML lines for this server (`timeout_ms: 300`, `mode: shadow`, ...).
    pub extra: &'a str,
}

pub fn entry<'a>(ds: &'a Downstream, extra: &'a str) -> Entry<'a> {
    Entry {
        ds,
        url: None,
        extra,
        pubkey: None,
    }
}

/// An entry with the server's name and key but another address.
pub fn entry_at<'a>(ds: &'a Downstream, url: &str, extra: &'a str) -> Entry<'a> {
    Entry {
        ds,
        url: Some(url.into()),
        extra,
        pubkey: None,
    }
}

/// A gateway config for `servers`, plus `extra` top-level YAML.
pub fn config_yaml(listen: SocketAddr, servers: &[Entry<'_>], extra: &str) -> String {
    let k = keys();
    let health = if extra.contains("health_check_interval_ms") {
        ""
    } else {
        "health_check_interval_ms: 0\n"
    };
    let mut y = format!(
        "listen: {listen}\nservice_name: test-gateway\ntss_node_public_key: {}\ngateway_private_key: {}\n{health}{extra}\ncallback_servers:\n",
        k.node.spki.display(),
        k.gateway.pkcs8.display()
    );
    if servers.is_empty() {
        y.push_str("  []\n");
    }
    for e in servers {
        y.push_str(&format!(
            "  - name: {}\n    service_address: {}\n    pubkey_path: {}\n",
            e.ds.name,
            e.url.clone().unwrap_or_else(|| e.ds.url()),
            e.pubkey.as_ref().unwrap_or(&e.ds.key.spki).display()
        ));
        for line in e.extra.lines().filter(|l| !l.trim().is_empty()) {
            y.push_str(&format!("    {}\n", line.trim()));
        }
    }
    y
}

/// A gateway served in this process on loopback.
pub struct Gateway {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Gateway {
    pub async fn start(servers: &[Entry<'_>], extra: &str) -> Gateway {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("gateway.yaml");
        std::fs::write(&config_path, config_yaml(addr, servers, extra)).unwrap();
        let rt = Generation::load(&config_path, 1).unwrap_or_else(|e| panic!("{e}"));
        let shared = Shared::open(rt, Metrics::new())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, shared.clone(), async {
            let _ = rx.await;
        }));
        // Ends with the test's runtime; with health_check_interval_ms: 0 it only sleeps.
        tokio::spawn(health::run(shared.clone()));
        Gateway {
            addr,
            shared,
            dir,
            config_path,
            stop: Some(tx),
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/v2/check", self.addr)
    }

    /// Reloads on config and key file changes, as `run` does.
    pub fn watch(&self) {
        tokio::spawn(reload::watch(self.shared.clone(), self.config_path.clone()));
    }

    /// Rewrites the config atomically (write then rename), as a careful operator would.
    pub fn write_config(&self, yaml: &str) {
        let tmp = self.dir.path().join(".gateway.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }

    /// Rewrites the config and makes it the current generation at once, without a watcher, as
    /// a reload does (in-flight requests keep theirs).
    pub fn reload_with(&self, yaml: &str) {
        self.write_config(yaml);
        let next = Generation::reload(&self.config_path, &self.shared.current.load())
            .unwrap_or_else(|e| panic!("{e}"));
        self.shared.current.store(std::sync::Arc::new(next));
    }

    pub fn generation(&self) -> u64 {
        self.shared.current.load().number
    }

    /// The decision records (top-level `request_id` and `status`) of an `audit_log: audit.jsonl` in the gateway's folder, in order.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            // Checkpoints, config and refusal summaries are not answers.
            .filter(|r| r.get("request_id").is_some() && r.get("status").is_some())
            .collect()
    }

    /// A counter or gauge value from `/metrics` text, by full series name with labels.
    pub fn metric(&self, series: &str) -> f64 {
        metric_value(&self.shared.metrics.render(), series)
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = self.task.await;
    }
}

/// The value of one series in Prometheus text, 0 if absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `run -c config` with JSON logs on stderr (piped) and waits until it accepts
/// connections on `port`.
pub fn spawn_run(config: &Path, port: u16) -> Child {
    let child = Command::new(BIN)
        .args([
            "run",
            "-c",
            config.to_str().unwrap(),
            "--log-format",
            "json",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "gateway did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Resident memory of this process (which hosts the gateway), in MB.
pub fn rss_mb() -> f64 {
    vm_rss_mb("/proc/self/status")
}

/// Resident memory of process `pid` (a gateway started with [`spawn_run`]), in MB.
pub fn rss_of(pid: u32) -> f64 {
    vm_rss_mb(&format!("/proc/{pid}/status"))
}

/// `VmRSS` of a `/proc/*/status` file, in MB.
fn vm_rss_mb(status: &str) -> f64 {
    let status = std::fs::read_to_string(status).unwrap();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    kb / 1024.0
}
