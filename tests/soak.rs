//! Soak: many requests at concurrency 64 through one gateway in front of 5 downstreams whose
//! behaviour is drawn at random per request and per server (approve, reject, slow but in time,
//! time out, fail with an unsigned HTTP 500 or a closed connection, bad signature). The draw is
//! encoded in the request_id, so every answer is compared with the one the behaviours imply:
//! zero false approvals, the decision table's status, the failing servers named, one audit line
//! per answer saying the same, memory flat after warm-up.
//!
//! CI runs `SOAK_REQUESTS` requests (default 2,000); the full run is `scripts/soak.sh` (20,000).
//! `SOAK_SEED` replays another draw.
//!
//! This process hosts the TSS Node side, the five downstreams and the gateway on two cores, and
//! RSA signing dominates its CPU. So the node's tokens and the downstreams' signed answers are
//! made before the run (valid for an hour) and the hot path signs only what the gateway signs:
//! otherwise the harness's own signatures would queue in-time answers past `timeout_ms` and
//! the expected answers would depend on CPU luck. The prepared requests (about 8 KB each) are
//! most of the resident memory the summary reports; they are all made before the run, so the
//! growth the test bounds comes from serving requests.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use jsonwebtoken::DecodingKey;
use tokio::net::TcpListener;

use common::downstream::{always, Answer, Downstream};
use common::gateway::{entry_at, rss_mb, Entry, Gateway};
use common::keys::{keys, KeyPair};
use common::requests::{request, request_id_of};
use common::tokens::{now, open, CallbackResponse, B64};

const SERVERS: usize = 5;
const CONCURRENCY: usize = 64;
/// Requests every server approves, sent first to open the connection pools. A cold start opens
/// hundreds of connections at once and may time out; these are held to "never a false answer"
/// only, not to timing.
const WARMUP: usize = 2 * CONCURRENCY;
/// Per-attempt timeout of every downstream. Unoptimised builds are several times slower, so a
/// plain `cargo test` gets more room.
const TIMEOUT_MS: u64 = if cfg!(debug_assertions) { 1000 } else { 400 };
/// "Slow but in time".
const SLOW: Duration = Duration::from_millis(50);
/// "Time out": a valid approval, far too late. It must never count.
const LATE: Duration = Duration::from_millis(5 * TIMEOUT_MS);
const TYPES: [&str; 4] = ["key_gen", "key_sign", "key_reshare", "key_share_sign"];

/// What one downstream does with one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Behaviour {
    Approve,
    Reject,
    Slow,
    Late,
    Http500,
    Close,
    BadSignature,
}

use Behaviour::*;

// === impl Behaviour ===

impl Behaviour {
    const ALL: [Behaviour; 7] = [Approve, Reject, Slow, Late, Http500, Close, BadSignature];

    fn letter(self) -> char {
        match self {
            Approve => 'a',
            Reject => 'r',
            Slow => 's',
            Late => 't',
            Http500 => 'f',
            Close => 'c',
            BadSignature => 'b',
        }
    }

    /// Mostly approvals, so that requests every server approves are common (0.86^5 ≈ 47%).
    fn draw(rng: &mut u64) -> Behaviour {
        // xorshift64*: reproducible from the seed, no dependency.
        *rng ^= *rng >> 12;
        *rng ^= *rng << 25;
        *rng ^= *rng >> 27;
        match (rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) % 100 {
            0..=77 => Approve,
            78..=85 => Slow,
            86..=89 => Reject,
            90..=92 => Late,
            93..=94 => Http500,
            95..=96 => Close,
            _ => BadSignature,
        }
    }

    /// The gateway's `outcome` for this server when nothing cut the call short.
    fn outcome(self) -> &'static str {
        match self {
            Approve | Slow => "approved",
            Reject => "rejected",
            Late => "timeout",
            Http500 => "http_error",
            Close => "transport_error",
            BadSignature => "bad_signature",
        }
    }

    fn approves(self) -> bool {
        matches!(self, Approve | Slow)
    }
}

/// One request of the run, prepared before it starts.
struct Case {
    id: String,
    warmup: bool,
    kind: &'static str,
    behaviours: [Behaviour; SERVERS],
    /// The node's exact payload bytes: what every downstream must receive.
    payload: Vec<u8>,
    /// The node's form body (its token signed beforehand).
    form: String,
    /// Each server's signed answer body, for the behaviours that have one.
    answers: [Option<Bytes>; SERVERS],
}

fn seed() -> u64 {
    std::env::var("SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15)
}

/// The [`WARMUP`] cases, then `total` drawn ones, their tokens and answers signed on every core.
fn prepare(total: usize, seed: u64) -> Vec<Case> {
    let mut rng = seed | 1;
    let drawn: Vec<(bool, usize, [Behaviour; SERVERS])> = (0..WARMUP)
        .map(|i| (true, i, [Approve; SERVERS]))
        .chain((0..total).map(|i| (false, i, std::array::from_fn(|_| Behaviour::draw(&mut rng)))))
        .collect();
    let signers = Signers {
        node: Rs256::load(&keys().node),
        servers: (0..SERVERS).map(|s| Rs256::load(server_key(s))).collect(),
        intruder: Rs256::load(&keys().intruder),
    };
    let signers = &signers;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = drawn.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = drawn
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|(w, i, b)| make_case(signers, *w, *i, *b))
                        .collect::<Vec<Case>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect::<Vec<Case>>()
    })
}

/// The keys the node side and the servers sign with.
struct Signers {
    node: Rs256,
    servers: Vec<Rs256>,
    intruder: Rs256,
}

/// An RS256 JWT signer whose key is parsed once: jsonwebtoken re-parses the RSA key on every
/// signature, which makes preparing the full run's ~115,000 tokens a third slower.
struct Rs256(aws_lc_rs::signature::RsaKeyPair);

// === impl Rs256 ===

impl Rs256 {
    fn load(pair: &KeyPair) -> Rs256 {
        let pem = pem::parse(std::fs::read(&pair.pkcs8).unwrap()).unwrap();
        Rs256(aws_lc_rs::signature::RsaKeyPair::from_pkcs8(pem.contents()).unwrap())
    }

    /// A token with the claims a TSS Node or a callback server puts in one.
    fn token(&self, payload: &[u8], iss: &str, exp: u64) -> String {
        let b64url =
            |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b);
        let claims = serde_json::json!({
            "package_data": base64::Engine::encode(&B64, payload), "exp": exp, "iss": iss
        });
        let signed = format!(
            "{}.{}",
            b64url(br#"{"alg":"RS256","typ":"JWT"}"#),
            b64url(claims.to_string().as_bytes())
        );
        let mut sig = vec![0; self.0.public_modulus_len()];
        self.0
            .sign(
                &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                signed.as_bytes(),
                &mut sig,
            )
            .unwrap();
        format!("{signed}.{}", b64url(&sig))
    }
}

fn make_case(k: &Signers, warmup: bool, i: usize, behaviours: [Behaviour; SERVERS]) -> Case {
    let letters: String = behaviours.iter().map(|b| b.letter()).collect();
    let id = format!("{}-{i}.{letters}", if warmup { "warm" } else { "soak" });
    let kind = TYPES[i % TYPES.len()];
    let payload = request(kind, &id);
    let hour = now() + 3600;
    let node = k.node.token(&payload, "tss-node", hour);
    let form = form_urlencoded::Serializer::new(String::new())
        .append_pair("TSS_JWT_MSG", &node)
        .finish();
    let answers = std::array::from_fn(|s| {
        let (status, action, error, key) = match behaviours[s] {
            Approve | Slow | Late => (0, "APPROVE", "", &k.servers[s]),
            Reject => (0, "REJECT", "soak says no", &k.servers[s]),
            BadSignature => (0, "APPROVE", "", &k.intruder),
            Http500 | Close => return None,
        };
        let resp = CallbackResponse {
            request_id: id.clone(),
            status,
            action: action.into(),
            error: error.into(),
        };
        let t = key.token(&serde_json::to_vec(&resp).unwrap(), &format!("s{s}"), hour);
        // Both of Cobo's body forms: a JSON string (Go template) and the raw token (Python).
        Some(if s % 2 == 0 {
            Bytes::from(format!("\"{t}\""))
        } else {
            Bytes::from(t)
        })
    });
    Case {
        id,
        warmup,
        kind,
        behaviours,
        payload,
        form,
        answers,
    }
}

/// Server `s`'s key pair. The harness makes four; the fifth server shares the first one's,
/// which only means s0 and s4 could vouch for each other, never for anyone else.
fn server_key(s: usize) -> &'static KeyPair {
    &keys().servers[s % keys().servers.len()]
}

// === the downstreams ===

/// A downstream that looks up the behaviour drawn for it in the request_id and answers with its
/// pre-signed body. Checks what the gateway sends it: a valid gateway token carrying the node's
/// exact bytes.
struct Server {
    index: usize,
    cases: Arc<HashMap<String, Case>>,
    gateway: DecodingKey,
    calls: AtomicUsize,
    /// Requests whose token did not verify, or whose payload was not the node's bytes.
    bad_requests: AtomicUsize,
}

// === impl Server ===

impl Server {
    async fn start(index: usize, cases: Arc<HashMap<String, Case>>) -> (Arc<Server>, SocketAddr) {
        let server = Arc::new(Server {
            index,
            cases,
            gateway: keys().gateway.decoding(),
            calls: AtomicUsize::new(0),
            bad_requests: AtomicUsize::new(0),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let s = server.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let s = s.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move { s.answer(req).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (server, addr)
    }

    /// An `Err` makes hyper close the connection without answering.
    async fn answer(&self, req: Request<Incoming>) -> std::io::Result<Response<Full<Bytes>>> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let body = req
            .into_body()
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes();
        let token = form_urlencoded::parse(&body)
            .find(|(k, _)| k == "TSS_JWT_MSG")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        let case = open(&token, &self.gateway).ok().and_then(|payload| {
            let case = self.cases.get(&request_id_of(&payload))?;
            (case.payload == payload).then_some(case)
        });
        let Some(case) = case else {
            self.bad_requests.fetch_add(1, Ordering::Relaxed);
            return Ok(reply(400, Bytes::from_static(b"bad request")));
        };
        let behaviour = case.behaviours[self.index];
        let signed = || case.answers[self.index].clone().unwrap_or_default();
        match behaviour {
            Approve | Reject | BadSignature => Ok(reply(200, signed())),
            Slow => {
                tokio::time::sleep(SLOW).await;
                Ok(reply(200, signed()))
            }
            Late => {
                tokio::time::sleep(LATE).await;
                Ok(reply(200, signed()))
            }
            Http500 => Ok(reply(500, Bytes::from_static(b"internal error"))),
            Close => Err(std::io::Error::other("closing without an answer")),
        }
    }
}

fn reply(status: u16, body: Bytes) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .body(Full::new(body))
        .unwrap()
}

// === the TSS Node side ===

/// The TSS Node: one shared connection pool, prepared requests.
struct Node<'a> {
    client: &'a reqwest::Client,
    url: String,
    gateway: &'a DecodingKey,
    cases: &'a HashMap<String, Case>,
}

// === impl Node ===

impl<'a> Node<'a> {
    /// Sends the cases named in `ids`, [`CONCURRENCY`] at a time, yielding answers as they come.
    fn run(
        &'a self,
        ids: &'a [String],
    ) -> impl futures::Stream<Item = (&'a Case, CallbackResponse, Duration)> + 'a {
        futures::stream::iter(ids.iter().map(move |id| async move {
            let case = &self.cases[id];
            let (r, elapsed) = self.ask(&case.form).await;
            (case, r, elapsed)
        }))
        .buffer_unordered(CONCURRENCY)
    }

    /// Posts a prepared form and verifies the gateway's answer.
    async fn ask(&self, form: &str) -> (CallbackResponse, Duration) {
        let started = Instant::now();
        let text = self
            .client
            .post(&self.url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.to_owned())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let elapsed = started.elapsed();
        let token: String = serde_json::from_str(&text).unwrap();
        let payload = open(&token, self.gateway).expect("the gateway's answer verifies");
        (serde_json::from_slice(&payload).unwrap(), elapsed)
    }
}

/// Checks one answer against what the behaviours imply; returns its outcome label.
fn check(case: &Case, r: &CallbackResponse) -> &'static str {
    let id = &case.id;
    assert_eq!(&r.request_id, id);
    let b = &case.behaviours;
    let named = |s: usize| r.error.contains(&format!("s{s}: "));
    let approval = r.status == 0 && r.action == "APPROVE";
    if b.iter().all(|x| x.approves()) {
        assert!(approval, "{id}: expected APPROVE, got {r:?}");
        return "approved";
    }
    assert!(!approval, "{id}: FALSE APPROVAL {r:?}");
    if b.contains(&Reject) {
        assert_eq!((r.status, r.action.as_str()), (0, "REJECT"), "{id}: {r:?}");
        // The first rejection to arrive is the answer; any rejecting server may be first.
        assert!(
            (0..SERVERS).any(|s| b[s] == Reject && r.error == format!("s{s}: soak says no")),
            "{id}: {}",
            r.error
        );
        return "rejected";
    }
    assert_eq!((r.status, r.action.as_str()), (30, "REJECT"), "{id}: {r:?}");
    for (s, x) in b.iter().enumerate() {
        if x.approves() {
            assert!(!named(s), "{id}: s{s} approved but is named: {}", r.error);
        } else {
            let kind = format!("s{s}: {}:", x.outcome());
            assert!(r.error.contains(&kind), "{id}: lacks {kind:?}: {}", r.error);
        }
    }
    "failed"
}

/// Checks one audit record against the answer given and the behaviours drawn. Returns the
/// slowest in-time downstream answer in it, in ms.
fn check_audit(case: &Case, r: &CallbackResponse, line: &serde_json::Value) -> u64 {
    let id = &case.id;
    assert_eq!(line["type"], case.kind, "{id}");
    assert_eq!(line["status"], r.status, "{id}");
    assert_eq!(line["action"], r.action.as_str(), "{id}");
    assert_eq!(line["error"], r.error.as_str(), "{id}");
    let servers = line["servers"].as_array().unwrap();
    assert_eq!(servers.len(), SERVERS, "{id}: {line}");
    if case.warmup {
        return 0;
    }
    let any_reject = case.behaviours.contains(&Reject);
    let mut slowest = 0;
    for v in servers {
        let name = v["name"].as_str().unwrap();
        let s: usize = name[1..].parse().unwrap();
        let expected = case.behaviours[s].outcome();
        let outcome = v["outcome"].as_str().unwrap();
        // After the first rejection the other calls are cancelled, whatever they would have said.
        assert!(
            outcome == expected || (any_reject && outcome == "cancelled"),
            "{id}: {name} {outcome}, expected {expected}: {line}"
        );
        if matches!(outcome, "approved" | "rejected") {
            slowest = slowest.max(v["duration_ms"].as_u64().unwrap());
        }
    }
    slowest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_zero_false_approvals() {
    let total: usize = std::env::var("SOAK_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let seed = seed();
    let prepared = Instant::now();
    let cases = tokio::task::spawn_blocking(move || prepare(total, seed))
        .await
        .unwrap();
    let prepared = prepared.elapsed();
    let (warmup, order): (Vec<String>, Vec<String>) = cases
        .iter()
        .map(|c| c.id.clone())
        .partition(|id| id.starts_with("warm-"));
    let cases: Arc<HashMap<String, Case>> =
        Arc::new(cases.into_iter().map(|c| (c.id.clone(), c)).collect());

    let mut servers = Vec::new();
    let mut addrs = Vec::new();
    for s in 0..SERVERS {
        let (server, addr) = Server::start(s, cases.clone()).await;
        servers.push(server);
        addrs.push(addr);
    }
    // The gateway config wants a harness Downstream per entry for its name and key; these are
    // never called, each entry points at the soak server instead.
    let mut named = Vec::new();
    for s in 0..SERVERS {
        named.push(
            Downstream::start(
                &format!("s{s}"),
                server_key(s),
                always(Answer::approve()),
                0,
            )
            .await,
        );
    }
    let extra = format!("timeout_ms: {TIMEOUT_MS}");
    let urls: Vec<String> = addrs
        .iter()
        .map(|a| format!("http://{a}/v2/check"))
        .collect();
    let entries: Vec<Entry> = named
        .iter()
        .zip(&urls)
        .map(|(d, url)| entry_at(d, url, &extra))
        .collect();
    let gw = Gateway::start(&entries, "audit_log: audit.jsonl").await;

    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(2 * CONCURRENCY)
        .build()
        .unwrap();
    let gateway_key = keys().gateway.decoding();
    let node = Node {
        client: &client,
        url: gw.url(),
        gateway: &gateway_key,
        cases: &cases,
    };
    let mut answers: HashMap<String, CallbackResponse> = HashMap::with_capacity(WARMUP + total);
    // Outcome label -> requests, warm-up included (as the metrics count them).
    let mut counted: BTreeMap<&str, usize> = BTreeMap::new();

    let mut warm_timeouts = 0;
    let mut stream = node.run(&warmup);
    while let Some((case, r, _)) = stream.next().await {
        let outcome = if r.status == 0 && r.action == "APPROVE" {
            "approved"
        } else {
            // Only a cold-start timeout may spoil a request every server approves.
            assert_eq!(r.status, 30, "{}: {r:?}", case.id);
            assert!(
                r.error.split("; ").all(|e| e.contains(": timeout:")),
                "{}: {r:?}",
                case.id
            );
            warm_timeouts += 1;
            "failed"
        };
        *counted.entry(outcome).or_default() += 1;
        answers.insert(case.id.clone(), r);
    }
    drop(stream);

    let rss_warm_at = (total / 5).max(1);
    let mut rss_warm = rss_mb();
    let mut latencies = Vec::with_capacity(total);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let started = Instant::now();
    let mut stream = node.run(&order);
    while let Some((case, r, elapsed)) = stream.next().await {
        let outcome = check(case, &r);
        *counts.entry(outcome).or_default() += 1;
        *counted.entry(outcome).or_default() += 1;
        latencies.push(elapsed);
        answers.insert(case.id.clone(), r);
        if latencies.len() == rss_warm_at {
            rss_warm = rss_mb();
        }
    }
    drop(stream);
    let run = started.elapsed();
    let rss_end = rss_mb();
    assert!(!gw.task.is_finished(), "the gateway stopped serving");
    assert_eq!(answers.len(), WARMUP + total);

    // Every answer was audited, once, saying what was answered.
    let mut audited = 0;
    let mut slowest_in_time = 0;
    for line in gw.audit_records() {
        let id = line["request_id"].as_str().unwrap();
        let r = answers
            .get(id)
            .unwrap_or_else(|| panic!("audited but not answered: {id}"));
        slowest_in_time = slowest_in_time.max(check_audit(&cases[id], r, &line));
        audited += 1;
    }
    assert_eq!(audited, WARMUP + total, "audit lines and answers differ");
    // The metrics agree with the answers, and nothing is left in flight.
    for (outcome, n) in &counted {
        let counted: f64 = TYPES
            .iter()
            .map(|t| {
                gw.metric(&format!(
                    "tss_gateway_requests_total{{outcome=\"{outcome}\",type=\"{t}\"}}"
                ))
            })
            .sum();
        assert_eq!(counted as usize, *n, "tss_gateway_requests_total {outcome}");
    }
    assert_eq!(gw.metric("tss_gateway_in_flight_requests"), 0.0);
    // The gateway forwarded the node's exact bytes with a valid token, every time.
    for s in &servers {
        assert_eq!(s.bad_requests.load(Ordering::Relaxed), 0, "s{}", s.index);
    }

    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    let get = |k: &str| counts.get(k).copied().unwrap_or(0);
    let calls: usize = servers
        .iter()
        .map(|s| s.calls.load(Ordering::Relaxed))
        .sum();
    println!(
        "soak: {total} requests in {:.1} s ({:.0}/s; after {WARMUP} warm-up requests, {warm_timeouts} of them timed out; tokens prepared in {:.1} s, seed {seed}): {} approvals, {} rejections, {} failures, 0 false approvals; {calls} downstream calls; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; slowest in-time downstream answer {slowest_in_time} ms (timeout {TIMEOUT_MS} ms); RSS {rss_warm:.1} MB after warm-up, {rss_end:.1} MB at the end",
        run.as_secs_f64(),
        total as f64 / run.as_secs_f64(),
        prepared.as_secs_f64(),
        get("approved"),
        get("rejected"),
        get("failed"),
        pct(0.5),
        pct(0.99),
        pct(1.0),
    );
    // Memory is flat after warm-up (the node side, the servers and the gateway share this
    // process; the gateway's duplicate-retry cache is bounded at 20,000 entries).
    assert!(
        rss_end - rss_warm < 30.0,
        "RSS grew from {rss_warm:.1} to {rss_end:.1} MB"
    );
    if total >= 500 {
        for b in Behaviour::ALL {
            assert!(
                cases.values().any(|c| c.behaviours.contains(&b)),
                "{b:?} never drawn"
            );
        }
        assert!(get("approved") > total / 5, "{counts:?}");
        assert!(get("rejected") > total / 20, "{counts:?}");
        assert!(get("failed") > total / 20, "{counts:?}");
    }
}
