//! Test harness: keys made by `openssl`, downstream callback servers and a TSS Node client that
//! sign and verify with `jsonwebtoken` (crypto that shares nothing with the gateway), and the
//! gateway itself served on loopback.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use base64::Engine;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

pub const B64: base64::engine::general_purpose::GeneralPurpose =
    base64::engine::general_purpose::STANDARD;

// === keys ===

/// A key pair on disk in every PEM form.
#[derive(Clone, Debug)]
pub struct KeyPair {
    /// PKCS#8 `BEGIN PRIVATE KEY`.
    pub pkcs8: PathBuf,
    /// PKCS#1 `BEGIN RSA PRIVATE KEY`.
    pub pkcs1: PathBuf,
    /// SPKI `BEGIN PUBLIC KEY`.
    pub spki: PathBuf,
    /// PKCS#1 `BEGIN RSA PUBLIC KEY`.
    pub pkcs1_pub: PathBuf,
}

impl KeyPair {
    pub fn encoding(&self) -> EncodingKey {
        EncodingKey::from_rsa_pem(&std::fs::read(&self.pkcs8).unwrap()).unwrap()
    }
    pub fn decoding(&self) -> DecodingKey {
        DecodingKey::from_rsa_pem(&std::fs::read(&self.spki).unwrap()).unwrap()
    }
    pub fn public_pem(&self) -> Vec<u8> {
        std::fs::read(&self.spki).unwrap()
    }
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_pair(dir: &Path, name: &str) -> KeyPair {
    let p = |suffix: &str| dir.join(format!("{name}{suffix}"));
    let pair = KeyPair {
        pkcs8: p("-pri.pem"),
        pkcs1: p("-pri-pkcs1.pem"),
        spki: p("-pub.key"),
        pkcs1_pub: p("-pub-pkcs1.key"),
    };
    let s = |x: &PathBuf| x.to_str().unwrap().to_owned();
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        &s(&pair.pkcs8),
    ]);
    openssl(&[
        "rsa",
        "-in",
        &s(&pair.pkcs8),
        "-traditional",
        "-out",
        &s(&pair.pkcs1),
    ]);
    openssl(&[
        "rsa",
        "-in",
        &s(&pair.pkcs8),
        "-pubout",
        "-out",
        &s(&pair.spki),
    ]);
    openssl(&[
        "rsa",
        "-in",
        &s(&pair.pkcs8),
        "-RSAPublicKey_out",
        "-out",
        &s(&pair.pkcs1_pub),
    ]);
    pair
}

/// Key pairs shared by every test in one test binary (generating RSA keys is slow).
pub struct Keys {
    pub node: KeyPair,
    pub gateway: KeyPair,
    pub intruder: KeyPair,
    pub servers: Vec<KeyPair>,
}

pub fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        Keys {
            node: make_pair(&dir, "tss-node"),
            gateway: make_pair(&dir, "gateway"),
            intruder: make_pair(&dir, "intruder"),
            servers: (0..4).map(|i| make_pair(&dir, &format!("ds{i}"))).collect(),
        }
    })
}

// === tokens ===

#[derive(Serialize, Deserialize, Debug)]
pub struct Claims {
    pub package_data: String,
    pub exp: u64,
    #[serde(default)]
    pub iss: String,
}

pub fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// An RS256 token as a TSS Node (or a callback server) makes it.
pub fn token(key: &EncodingKey, payload: &[u8], iss: &str) -> String {
    token_with(key, Algorithm::RS256, payload, iss, now() + 120)
}

pub fn token_with(
    key: &EncodingKey,
    alg: Algorithm,
    payload: &[u8],
    iss: &str,
    exp: u64,
) -> String {
    let claims = Claims {
        package_data: B64.encode(payload),
        exp,
        iss: iss.into(),
    };
    jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
}

/// Verifies an RS256 token and returns the decoded `package_data` bytes.
pub fn open(token: &str, key: &DecodingKey) -> Result<Vec<u8>, String> {
    let data = jsonwebtoken::decode::<Claims>(token, key, &Validation::new(Algorithm::RS256))
        .map_err(|e| e.to_string())?;
    B64.decode(data.claims.package_data)
        .map_err(|e| e.to_string())
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CallbackResponse {
    pub request_id: String,
    pub status: i64,
    pub action: String,
    #[serde(default)]
    pub error: String,
}

// === requests ===

/// For raw test peers: once `buf` holds a whole HTTP request (head and Content-Length body),
/// where its body starts and where the request ends.
pub fn complete_request(buf: &[u8]) -> Option<(usize, usize)> {
    let i = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    (buf.len() >= i + 4 + len).then_some((i + 4, i + 4 + len))
}

pub fn sample(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("config/samples/{name}.json")))
        .unwrap()
}

/// A sample with a new `request_id`, so each test request is distinct.
pub fn request(name: &str, request_id: &str) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(&sample(name)).unwrap();
    v["request_id"] = request_id.into();
    serde_json::to_vec(&v).unwrap()
}

/// A request of any `request_type` code.
pub fn request_of_type(code: i64, request_id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "request_id": request_id, "request_type": code, "request_detail": "{}", "extra_info": "{}"
    }))
    .unwrap()
}

pub fn request_id_of(payload: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
    v["request_id"].as_str().unwrap().to_owned()
}

// === downstream callback servers ===

/// What a downstream saw in one request it accepted.
#[derive(Clone, Debug)]
pub struct Seen {
    pub request_id: String,
    pub request_type: i64,
    /// The decoded `package_data`: must be the node's exact bytes.
    pub payload: Vec<u8>,
    pub iss: String,
}

/// How a downstream answers.
#[derive(Clone, Debug)]
pub enum Body {
    /// A signed CallbackResponse.
    Signed {
        status: i64,
        action: String,
        error: String,
        /// Answer for this request_id instead of the one asked about.
        request_id: Option<String>,
        /// JSON-string body (Go template) rather than the raw token (Python template).
        json: bool,
        /// Sign with this key instead of the server's own.
        key: Option<KeyPair>,
        alg: Algorithm,
        exp_offset: i64,
    },
    /// These exact bytes.
    Bytes(Vec<u8>),
    /// Never answer.
    Hang,
}

#[derive(Clone, Debug)]
pub struct Answer {
    pub delay: Duration,
    pub http: u16,
    pub body: Body,
}

impl Answer {
    pub fn signed(status: i64, action: &str, error: &str) -> Answer {
        Answer {
            delay: Duration::ZERO,
            http: 200,
            body: Body::Signed {
                status,
                action: action.into(),
                error: error.into(),
                request_id: None,
                json: true,
                key: None,
                alg: Algorithm::RS256,
                exp_offset: 120,
            },
        }
    }
    pub fn approve() -> Answer {
        Answer::signed(0, "APPROVE", "")
    }
    pub fn reject(error: &str) -> Answer {
        Answer::signed(0, "REJECT", error)
    }
    pub fn bytes(http: u16, body: &[u8]) -> Answer {
        Answer {
            delay: Duration::ZERO,
            http,
            body: Body::Bytes(body.to_vec()),
        }
    }
    pub fn hang() -> Answer {
        Answer {
            delay: Duration::ZERO,
            http: 200,
            body: Body::Hang,
        }
    }
    pub fn after(mut self, ms: u64) -> Answer {
        self.delay = Duration::from_millis(ms);
        self
    }
    pub fn http(mut self, code: u16) -> Answer {
        self.http = code;
        self
    }
    fn signed_mut(
        &mut self,
    ) -> (
        &mut Option<String>,
        &mut bool,
        &mut Option<KeyPair>,
        &mut Algorithm,
        &mut i64,
    ) {
        match &mut self.body {
            Body::Signed {
                request_id,
                json,
                key,
                alg,
                exp_offset,
                ..
            } => (request_id, json, key, alg, exp_offset),
            _ => panic!("not a signed answer"),
        }
    }
    pub fn raw(mut self) -> Answer {
        *self.signed_mut().1 = false;
        self
    }
    pub fn for_request(mut self, id: &str) -> Answer {
        *self.signed_mut().0 = Some(id.into());
        self
    }
    pub fn signed_by(mut self, key: &KeyPair) -> Answer {
        *self.signed_mut().2 = Some(key.clone());
        self
    }
    pub fn alg(mut self, alg: Algorithm) -> Answer {
        *self.signed_mut().3 = alg;
        self
    }
    pub fn expired(mut self) -> Answer {
        *self.signed_mut().4 = -60;
        self
    }
}

pub type Script = Arc<dyn Fn(&Seen) -> Answer + Send + Sync>;

pub fn always(answer: Answer) -> Script {
    Arc::new(move |_| answer.clone())
}

struct DsState {
    name: String,
    key: KeyPair,
    gateway: DecodingKey,
    script: Mutex<Script>,
    seen: Mutex<Vec<Seen>>,
    calls: AtomicUsize,
    unverified: AtomicUsize,
}

/// A downstream callback server on loopback.
#[derive(Clone)]
pub struct Downstream {
    pub name: String,
    pub addr: SocketAddr,
    pub key: KeyPair,
    state: Arc<DsState>,
    connections: Arc<AtomicUsize>,
    https: bool,
}

impl Downstream {
    /// Starts a server answering with `script`. The first `drop_connections` connections are
    /// closed without an answer (a transport failure for the caller).
    pub async fn start(
        name: &str,
        key: &KeyPair,
        script: Script,
        drop_connections: usize,
    ) -> Downstream {
        Downstream::start_with(name, key, script, drop_connections, None).await
    }

    /// As [`Downstream::start`], serving HTTPS through `tls` when given.
    pub async fn start_with(
        name: &str,
        key: &KeyPair,
        script: Script,
        drop_connections: usize,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Downstream {
        let state = Arc::new(DsState {
            name: name.into(),
            key: key.clone(),
            gateway: keys().gateway.decoding(),
            script: Mutex::new(script),
            seen: Mutex::new(Vec::new()),
            calls: AtomicUsize::new(0),
            unverified: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/v2/check", post(ds_check))
            .route("/v1/check", post(ds_check))
            .with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let conns = connections.clone();
        let tls_on = tls.is_some();
        tokio::spawn(async move {
            let service = TowerToHyperService::new(app);
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if conns.fetch_add(1, Ordering::SeqCst) < drop_connections {
                    drop(stream);
                    continue;
                }
                let service = service.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                    }
                });
            }
        });
        Downstream {
            name: name.into(),
            addr,
            key: key.clone(),
            state,
            connections,
            https: tls_on,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}/v2/check", self.addr)
    }
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
    /// Requests whose gateway token did not verify.
    pub fn unverified(&self) -> usize {
        self.state.unverified.load(Ordering::SeqCst)
    }
    pub fn set_script(&self, script: Script) {
        *self.state.script.lock().unwrap() = script;
    }
}

async fn ds_check(State(s): State<Arc<DsState>>, body: Bytes) -> Response {
    s.calls.fetch_add(1, Ordering::SeqCst);
    let inbound = form_urlencoded::parse(&body)
        .find(|(k, _)| k == "TSS_JWT_MSG")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let data = match jsonwebtoken::decode::<Claims>(
        &inbound,
        &s.gateway,
        &Validation::new(Algorithm::RS256),
    ) {
        Ok(d) => d,
        Err(e) => {
            s.unverified.fetch_add(1, Ordering::SeqCst);
            let resp = CallbackResponse {
                request_id: String::new(),
                status: 20,
                action: "REJECT".into(),
                error: e.to_string(),
            };
            let t = token(
                &s.key.encoding(),
                &serde_json::to_vec(&resp).unwrap(),
                &s.name,
            );
            return (StatusCode::BAD_REQUEST, t).into_response();
        }
    };
    let payload = B64.decode(&data.claims.package_data).unwrap();
    let req: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    let seen = Seen {
        request_id: req["request_id"].as_str().unwrap_or_default().into(),
        request_type: req["request_type"].as_i64().unwrap_or(-1),
        payload,
        iss: data.claims.iss.clone(),
    };
    {
        // Bounded, so long soaks measure the gateway's memory rather than this record's.
        let mut record = s.seen.lock().unwrap();
        if record.len() >= 1000 {
            record.drain(..500);
        }
        record.push(seen.clone());
    }
    let script = s.script.lock().unwrap().clone();
    let answer = script(&seen);
    tokio::time::sleep(answer.delay).await;
    let status = StatusCode::from_u16(answer.http).unwrap();
    match answer.body {
        Body::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        Body::Bytes(b) => (status, b).into_response(),
        Body::Signed {
            status: st,
            action,
            error,
            request_id,
            json,
            key,
            alg,
            exp_offset,
        } => {
            let resp = CallbackResponse {
                request_id: request_id.unwrap_or(seen.request_id),
                status: st,
                action,
                error,
            };
            let payload = serde_json::to_vec(&resp).unwrap();
            let enc = match alg {
                Algorithm::HS256 => EncodingKey::from_secret(&s.key.public_pem()),
                _ => key.as_ref().unwrap_or(&s.key).encoding(),
            };
            let exp = (now() as i64 + exp_offset) as u64;
            let t = token_with(&enc, alg, &payload, &s.name, exp);
            if json {
                (
                    status,
                    [("content-type", "application/json")],
                    format!("\"{t}\""),
                )
                    .into_response()
            } else {
                (status, t).into_response()
            }
        }
    }
}

// === the gateway ===

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
    pub shared: Arc<tss_callback_gateway::Shared>,
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
        let rt = tss_callback_gateway::generation::Generation::load(&config_path, 1)
            .unwrap_or_else(|e| panic!("{e}"));
        let shared = tss_callback_gateway::Shared::new(
            rt,
            tss_callback_gateway::ops::metrics::Metrics::new(),
        )
        .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tss_callback_gateway::inbound::listener::serve(
            listener,
            shared.clone(),
            async {
                let _ = rx.await;
            },
        ));
        // Ends with the test's runtime; with health_check_interval_ms: 0 it only sleeps.
        tokio::spawn(tss_callback_gateway::ops::health::run(shared.clone()));
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
        tokio::spawn(tss_callback_gateway::ops::reload::watch(
            self.shared.clone(),
            self.config_path.clone(),
        ));
    }

    /// Rewrites the config atomically (write then rename), as a careful operator would.
    pub fn write_config(&self, yaml: &str) {
        let tmp = self.dir.path().join(".gateway.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }

    pub fn generation(&self) -> u64 {
        self.shared.current.load().number
    }

    /// The request records of an `audit_log: audit.jsonl` in the gateway's folder, in order.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            // Checkpoints seal the hash chain; they are not answers.
            .filter(|r| r.get("checkpoint").is_none())
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

// === the TSS Node ===

/// What the gateway answered.
#[derive(Debug)]
pub struct Reply {
    pub http: u16,
    pub response: CallbackResponse,
    pub elapsed: Duration,
    pub content_type: String,
}

impl Reply {
    pub fn approved(&self) -> bool {
        self.response.status == 0 && self.response.action == "APPROVE"
    }
    /// Asserts status and action, and that `error` contains every fragment.
    #[track_caller]
    pub fn expect(&self, status: i64, action: &str, fragments: &[&str]) {
        assert_eq!(
            (self.response.status, self.response.action.as_str()),
            (status, action),
            "unexpected answer {:?}",
            self.response
        );
        for f in fragments {
            assert!(
                self.response.error.contains(f),
                "error {:?} lacks {f:?}",
                self.response.error
            );
        }
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Posts a raw form body and verifies the gateway's answer with the gateway's public key.
pub async fn post_body(url: &str, body: Vec<u8>) -> Reply {
    let started = Instant::now();
    let resp = http()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = resp.text().await.unwrap();
    let elapsed = started.elapsed();
    let token: String = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("answer {text:?} is not a JSON string: {e}"));
    let payload = open(&token, &keys().gateway.decoding())
        .expect("the gateway's answer verifies with its public key");
    let response = serde_json::from_slice(&payload).unwrap();
    Reply {
        http: status,
        response,
        elapsed,
        content_type,
    }
}

pub async fn post_token(url: &str, token: &str) -> Reply {
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("TSS_JWT_MSG", token)
        .finish();
    post_body(url, body.into_bytes()).await
}

/// Sends `payload` as the TSS Node would.
pub async fn send(url: &str, payload: &[u8]) -> Reply {
    post_token(url, &token(&keys().node.encoding(), payload, "tss-node")).await
}
