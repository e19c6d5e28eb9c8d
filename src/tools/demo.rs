//! `demo`: the gateway doing its job on an embedded default, in one process on loopback.
//!
//! It makes keys in a temporary folder, starts three sample downstream callback servers
//! (approve-all; a KeySign destination whitelist; one that answers after ~200 ms), starts the
//! gateway with embedded rules on, plays a TSS Node sending every sample task type plus an
//! embedded-rule rejection and a forged token, and prints what happened to each request.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;

use super::sample_server::{self, Policy, SampleServer};
use crate::generation::Generation;
use crate::ops::metrics::Metrics;
use crate::outbound::client;
use crate::protocol::keys::{self, Signer, Verifier};
use crate::protocol::{self, CallbackResponse, RequestType};
use crate::Shared;

/// The destination the whitelist server accepts; the KeySign sample pays elsewhere.
const WHITELISTED: &str = "0x2222222222222222222222222222222222222222";
const SERVERS: [&str; 3] = ["approve-all", "whitelist", "slow"];

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo setup: {0}")]
    Setup(String),
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> DemoError + '_ {
    move |e| DemoError::Setup(format!("{what}: {e}"))
}

/// One request the simulated TSS Node sends.
struct Case {
    label: &'static str,
    payload: Vec<u8>,
    /// Sign with a key the gateway does not know.
    forged: bool,
}

/// Runs the demo and prints its table to stdout.
pub async fn run() -> Result<(), DemoError> {
    crate::ops::audit::checkpoint::quiet_witness();
    let dir = tempfile::tempdir().map_err(setup("temporary folder"))?;
    let keys_dir = dir.path().join("keys");
    for name in ["tss-node", "tss-node-event", "gateway", "intruder"]
        .iter()
        .chain(SERVERS.iter())
    {
        keys::generate(&keys_dir, name).map_err(setup("keygen"))?;
    }
    let key = |name: &str, kind: &str| keys_dir.join(format!("{name}-{kind}"));
    let gateway_pub = Verifier::load(&key("gateway", "pub.key")).map_err(setup("gateway key"))?;
    let addrs = start_servers(&keys_dir, &gateway_pub).await?;

    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(setup("listen"))?;
    let gateway_addr = listener.local_addr().map_err(setup("listen"))?;
    let config_path = dir.path().join("gateway.yaml");
    std::fs::write(&config_path, gateway_config(gateway_addr, &addrs)).map_err(setup("config"))?;
    let g = Generation::load(&config_path, 1).map_err(setup("config"))?;
    let audit_path = g.config.audit_log.clone();
    let shared = Shared::open(g, Metrics::new())
        .await
        .map_err(setup("gateway"))?;
    tokio::spawn(crate::inbound::listener::serve(
        listener,
        shared.clone(),
        std::future::pending(),
    ));

    println!("tss-callback-gateway demo: gateway on {gateway_addr}, downstreams:");
    for (name, addr) in SERVERS.iter().zip(&addrs) {
        let role = match *name {
            "approve-all" => "approves everything (JSON-string answers)",
            "whitelist" => "approves KeySign only to whitelisted destinations (raw-token answers)",
            _ => "approves everything after ~200 ms",
        };
        println!("  {name:<12} http://{addr}/v2/check  {role}");
    }
    println!("embedded rules: KeyGen and KeyReshare must match their allow lists\n");

    let node = Signer::load(&key("tss-node", "pri.pem")).map_err(setup("node key"))?;
    let intruder = Signer::load(&key("intruder", "pri.pem")).map_err(setup("intruder key"))?;
    let url = reqwest::Url::parse(&format!("http://{gateway_addr}/v2/check"))
        .map_err(setup("gateway url"))?;
    let node = Node {
        http: client::http_client(Duration::from_secs(5)),
        url,
        node,
        intruder,
        gateway_pub: gateway_pub.clone(),
    };
    let answered = send_cases(&node, audit_path.as_deref()).await;
    let event_key = Signer::load(&key("tss-node-event", "pri.pem")).map_err(setup("event key"))?;
    send_events(&node, &event_key, gateway_addr, &answered, &shared).await;
    if let Some(p) = &audit_path {
        close_and_verify(&shared, p, &gateway_pub)?;
    }
    println!(
        "metrics: {} series exposed at /metrics",
        shared
            .metrics
            .render()
            .lines()
            .filter(|l| l.starts_with("tss_gateway_"))
            .count()
    );
    Ok(())
}

/// The simulated TSS Node: its key, a key the gateway does not know, and where it calls.
struct Node {
    http: reqwest::Client,
    url: reqwest::Url,
    node: Signer,
    intruder: Signer,
    gateway_pub: Verifier,
}

/// Starts the sample downstream servers of [`SERVERS`]; returns their addresses.
async fn start_servers(
    keys_dir: &Path,
    gateway_pub: &Verifier,
) -> Result<Vec<SocketAddr>, DemoError> {
    let mut addrs = Vec::new();
    for (i, name) in SERVERS.iter().enumerate() {
        let private = keys_dir.join(format!("{name}-pri.pem"));
        let server = SampleServer {
            name: (*name).to_owned(),
            signer: Signer::load(&private).map_err(setup("server key"))?,
            gateway: gateway_pub.clone(),
            policy: if *name == "whitelist" {
                Policy::Whitelist(vec![WHITELISTED.to_owned()])
            } else {
                Policy::ApproveAll
            },
            delay: Duration::from_millis(if *name == "slow" { 200 } else { 0 }),
            raw_body: i == 1,
            presigned: None,
        };
        addrs.push(
            sample_server::start(server)
                .await
                .map_err(setup("sample server"))?,
        );
    }
    Ok(addrs)
}

/// The demo gateway's YAML: embedded rules on, the sample servers as its downstreams.
fn gateway_config(gateway_addr: SocketAddr, addrs: &[SocketAddr]) -> String {
    let servers: String = SERVERS
        .iter()
        .zip(addrs)
        .map(|(name, addr)| {
            format!(
                "  - name: {name}\n    service_address: http://{addr}/v2/check\n    pubkey_path: keys/{name}-pub.key\n    timeout_ms: 2000\n"
            )
        })
        .collect();
    format!(
        "listen: {gateway_addr}\n\
         service_name: tss-callback-gateway-demo\n\
         tss_node_public_key: keys/tss-node-pub.key\n\
         gateway_private_key: keys/gateway-pri.pem\n\
         deadline_ms: 3000\n\
         health_check_interval_ms: 0\n\
         audit_log: audit/decisions.jsonl\n\
         tss_node_event_public_key: keys/tss-node-event-pub.key\n\
         state_store: state/gateway.db\n\
         embedded_risk_control_rules:\n  \
           enable: true\n  \
           key_gen:\n    reject_all: false\n    allow_list:\n      - threshold: 2\n        node_ids: [coboNodeA1b2c3, thirdPartyNodeD4e5f6, customerNodeG7h8i9]\n  \
           key_sign: {{ reject_all: false }}\n  \
           key_reshare:\n    reject_all: false\n    allow_list:\n      - xpubkey: {xpub}\n        new_threshold: 2\n        new_node_ids: [coboNodeA1b2c3, thirdPartyNodeD4e5f6, customerNodeG7h8i9]\n  \
           key_share_sign: {{ reject_all: false }}\n\
         callback_servers:\n{servers}",
        xpub = sample_field(RequestType::KeyReshare, "root_pub_key"),
    )
}

/// What the node asked and was answered: task type, request_id, approved.
type Answered = Vec<(Option<RequestType>, String, bool)>;

/// After the approvals, the node reports what it executed: a `succeeded` event for every
/// approved task, and one for a task nobody approved (its callback bypassed). Prints what
/// reconciliation made of each.
async fn send_events(
    node: &Node,
    event_key: &Signer,
    gateway_addr: SocketAddr,
    answered: &Answered,
    shared: &Shared,
) {
    let mut executed: Vec<(RequestType, String, bool)> = answered
        .iter()
        .filter_map(|(t, id, ok)| {
            t.filter(|t| *t != RequestType::Ping && *ok)
                .map(|t| (t, id.clone(), true))
        })
        .collect();
    executed.push((RequestType::KeySign, "demo-bypassed-key_sign".into(), false));
    let Ok(url) = reqwest::Url::parse(&format!("http://{gateway_addr}/v2/event")) else {
        return;
    };
    println!(
        "
events: the node reports what it executed (request.*.succeeded, signed with its event key)"
    );
    let header = format!(
        "{:<34} {:<26} {:<9} reconciliation",
        "event_type", "request_id", "approved"
    );
    println!("{header}");
    println!("{}", "-".repeat(header.len() + 30));
    for (i, (kind, request_id, approved)) in executed.iter().enumerate() {
        let Some(event_type) = crate::protocol::event::request_event_type(*kind, "succeeded")
        else {
            continue;
        };
        let event = serde_json::json!({
            "event_id": format!("demo-event-{i}"),
            "created_timestamp": crate::state::now_ms(),
            "node_id": "coboNodeA1b2c3",
            "event_type": event_type,
            "data": {"data_type": "KeySign", "request_id": request_id, "request_type": kind.code(),
                     "request_status": "Succeeded", "extra_info": "{}", "failed_reason": "",
                     "request_detail": "{}", "result": "{}"}
        });
        let payload = serde_json::to_vec(&event).unwrap_or_default();
        let token = protocol::sign_token(event_key, &payload, "tss-node-demo", 120);
        let sent = node
            .http
            .post(url.clone())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(client::form_body(&token))
            .send()
            .await;
        let result = match sent {
            Ok(r) if r.status().is_success() => {
                let alarms = match &shared.store {
                    Some(store) => store
                        .alarms_since(crate::ops::reconcile::UNAPPROVED_EXECUTION, 0, 100)
                        .await
                        .unwrap_or_default(),
                    None => Vec::new(),
                };
                if alarms.iter().any(|a| &a.request_id == request_id) {
                    "ALARM unapproved_execution (audit record, ERROR log, /readyz alarms)"
                        .to_owned()
                } else {
                    "ok: approved before it ran".to_owned()
                }
            }
            Ok(r) => format!("event refused: HTTP {}", r.status().as_u16()),
            Err(e) => format!("event not sent: {e}"),
        };
        let yes_no = if *approved { "yes" } else { "NO" };
        println!("{event_type:<34} {request_id:<26} {yes_no:<9} {result}");
    }
    let raised = shared
        .metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("tss_gateway_unapproved_executions_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    println!("tss_gateway_unapproved_executions_total: {raised}");
}

/// Sends every case as the TSS Node and prints one row each: what each server said (from the
/// audit log) and the gateway's verified answer.
async fn send_cases(node: &Node, audit_path: Option<&Path>) -> Answered {
    let mut answered = Vec::new();
    let header = format!(
        "{:<22} {:<26} {:<15} {:<15} {:<15} {:>8}  decision",
        "type", "request_id", SERVERS[0], SERVERS[1], SERVERS[2], "total ms"
    );
    println!("{header}");
    println!("{}", "-".repeat(header.len() + 30));
    for case in cases() {
        let signer = if case.forged {
            &node.intruder
        } else {
            &node.node
        };
        let token = protocol::sign_token(signer, &case.payload, "tss-node-demo", 120);
        let request_id = protocol::CallbackRequest::parse(&case.payload)
            .map(|r| r.request_id)
            .unwrap_or_default();
        let started = Instant::now();
        let answer = match client::post_token(&node.http, &node.url, &token).await {
            Ok(raw) => {
                client::read_answer(&raw, &node.gateway_pub, None).map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        let total = started.elapsed();
        let verdicts = audit_path
            .map(|p| audit_verdicts(p, &request_id))
            .unwrap_or_default();
        let cell = |server: &str| {
            verdicts
                .iter()
                .find(|(name, _)| name == server)
                .map_or_else(|| "-".to_owned(), |(_, v)| v.clone())
        };
        println!(
            "{:<22} {:<26} {:<15} {:<15} {:<15} {:>8}  {}",
            case.label,
            request_id,
            cell(SERVERS[0]),
            cell(SERVERS[1]),
            cell(SERVERS[2]),
            total.as_millis(),
            describe(&answer)
        );
        let kind = protocol::CallbackRequest::parse(&case.payload)
            .ok()
            .and_then(|r| RequestType::from_code(r.request_type));
        let approved = matches!(&answer, Ok(r) if r.is_approval());
        answered.push((kind, request_id, approved));
    }
    answered
}

/// Closes the audit log with a signed checkpoint, as a shutdown does, and checks the chain.
fn close_and_verify(shared: &Shared, path: &Path, gateway_pub: &Verifier) -> Result<(), DemoError> {
    let lines = std::fs::read_to_string(path).map_or(0, |t| t.lines().count());
    println!("\naudit log: {lines} lines appended (one per answer, written before it was sent)");
    if let Some(audit) = shared.audit.load_full() {
        audit.close().map_err(setup("audit log checkpoint"))?;
    }
    let opts = super::verify::Options {
        pinned: vec![gateway_pub.clone()],
        ..Default::default()
    };
    match super::verify::verify(std::slice::from_ref(&path.to_owned()), &opts, |w| {
        println!("{w}")
    }) {
        Ok(summary) => println!("audit verify: {summary}"),
        Err(failure) => return Err(DemoError::Setup(format!("audit verify: {failure}"))),
    }
    Ok(())
}

fn describe(answer: &Result<CallbackResponse, String>) -> String {
    match answer {
        Ok(r) if r.is_approval() => "APPROVE".to_owned(),
        Ok(r) => format!("REJECT status {}: {}", r.status, r.error),
        Err(e) => format!("no verified answer: {e}"),
    }
}

/// `field` of the sample's `request_detail`.
fn sample_field(kind: RequestType, field: &str) -> String {
    let req: serde_json::Value =
        serde_json::from_str(super::probe::sample(kind)).unwrap_or_default();
    let detail: serde_json::Value =
        serde_json::from_str(req["request_detail"].as_str().unwrap_or("{}")).unwrap_or_default();
    detail[field].as_str().unwrap_or_default().to_owned()
}

/// The sample with `request_detail` or `extra_info` edited by `edit`, under a new `request_id`.
fn variant(
    kind: RequestType,
    request_id: &str,
    field: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> Vec<u8> {
    let mut req: serde_json::Value =
        serde_json::from_str(super::probe::sample(kind)).unwrap_or_default();
    let mut inner: serde_json::Value =
        serde_json::from_str(req[field].as_str().unwrap_or("{}")).unwrap_or_default();
    edit(&mut inner);
    req[field] = inner.to_string().into();
    req["request_id"] = request_id.into();
    serde_json::to_vec(&req).unwrap_or_default()
}

fn cases() -> Vec<Case> {
    let sample = |kind| super::probe::sample(kind).as_bytes().to_vec();
    let case = |label, payload| Case {
        label,
        payload,
        forged: false,
    };
    vec![
        case("ping", sample(RequestType::Ping)),
        case("key_gen", sample(RequestType::KeyGen)),
        case("key_sign", sample(RequestType::KeySign)),
        case(
            "key_sign (whitelisted)",
            variant(
                RequestType::KeySign,
                "demo-key_sign-ok",
                "extra_info",
                |e| {
                    e["transaction"]["destination"]["account_output"]["address"] =
                        WHITELISTED.into();
                },
            ),
        ),
        case("key_reshare", sample(RequestType::KeyReshare)),
        case("key_share_sign", sample(RequestType::KeyShareSign)),
        case(
            "key_gen (threshold 1)",
            variant(
                RequestType::KeyGen,
                "demo-key_gen-t1",
                "request_detail",
                |d| {
                    d["threshold"] = 1.into();
                },
            ),
        ),
        Case {
            label: "key_sign (forged)",
            payload: super::probe::sample_with_id(RequestType::KeySign, "demo-forged"),
            forged: true,
        },
    ]
}

/// Each server's `outcome ms` for `request_id`, from the audit log.
fn audit_verdicts(path: &Path, request_id: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let Some(record) = text
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|r| r["request_id"] == request_id)
    else {
        return Vec::new();
    };
    record["servers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let name = s["name"].as_str().unwrap_or_default().to_owned();
            let outcome = s["outcome"].as_str().unwrap_or_default();
            let cell = match outcome {
                "cancelled" | "pending" => outcome.to_owned(),
                _ => format!("{outcome} {}ms", s["duration_ms"]),
            };
            (name, cell)
        })
        .collect()
}
