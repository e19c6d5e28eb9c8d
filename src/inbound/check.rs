//! HTTP routes. The callback route is thin: read the body, decide, audit, sign the answer.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::time::Instant;

use crate::audit::{AuditRecord, SealPolicy};
use crate::decision::{decide, Decision};
use crate::dedup::{self, Lookup};
use crate::fanout::{self, Verdict};
use crate::protocol::{self, CallbackRequest, CallbackResponse, RequestType, Status, FORM_FIELD};
use crate::rules::RuleVerdict;
use crate::runtime::Runtime;
use crate::Shared;

/// Everything known about one request once it is decided.
struct Answer {
    request_id: String,
    code: Option<i64>,
    decision: Decision,
    embedded: String,
    verdicts: Vec<Verdict>,
    /// Answered from an identical twin's evaluation (a TSS Node retry), not by asking again.
    duplicate: bool,
    /// The verified CallbackRequest, kept only with `audit_payloads: true`.
    request: Option<serde_json::Value>,
}

/// The evaluation of one request: what the rules and the downstreams said. Shared between
/// identical retries by [`crate::dedup::Dedup`].
#[derive(Debug)]
pub struct Evaluation {
    decision: Decision,
    embedded: String,
    verdicts: Vec<Verdict>,
}

impl dedup::Footprint for Arc<Evaluation> {
    fn footprint(&self) -> usize {
        let details: usize = self.verdicts.iter().map(|v| v.detail.capacity()).sum();
        std::mem::size_of::<Evaluation>()
            + self.verdicts.capacity() * std::mem::size_of::<Verdict>()
            + details
            + self.decision.error.capacity()
            + self.embedded.capacity()
    }
}

/// Decrements the in-flight gauge however the request ends (including a dropped connection).
struct InFlight(prometheus::IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Every route: the node's and the operator's (no `admin_listen`).
pub fn router(shared: Arc<Shared>) -> Router {
    node_router(shared.clone()).merge(admin_router(shared))
}

/// What the TSS Node calls: the callbacks and `/ping`.
pub fn node_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v2/check", post(check))
        .route("/v1/check", post(check))
        .route("/ping", get(ping))
        .with_state(shared)
}

/// What operators, probes and Prometheus call; served on `admin_listen` when it is set.
pub fn admin_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

async fn check(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    // The whole request runs on the generation it started with, even if a reload lands meanwhile.
    let rt = shared.runtime.load_full();
    // Before anything is read or signed: shedding must cost no RSA work. The permit is held
    // until the answer is made (move it along if the decision ever runs in a task of its own).
    let Some(_admitted) = shared.admission.try_admit(rt.config.max_in_flight) else {
        return overloaded(&shared);
    };
    shared.metrics.in_flight.inc();
    let _in_flight = InFlight(shared.metrics.in_flight.clone());
    let ticket = shared.audit_pending.enter();
    let deadline = started + Duration::from_millis(rt.config.deadline_ms);

    // `headers` and the body are given away here, so that the connection's read buffer they
    // point into is freed as soon as the token is parsed, not when the answer goes out.
    let read = tokio::time::timeout_at(
        deadline,
        read_body(headers, body, rt.config.max_body_bytes, deadline),
    );
    let mut answer = match read.await {
        Ok(Ok(bytes)) => decide_request(&shared, &rt, bytes, deadline).await,
        Ok(Err(answer)) => answer,
        Err(_) => invalid(
            Status::InvalidRequest,
            String::new(),
            None,
            "request body not received within deadline_ms".into(),
        ),
    };
    let elapsed = started.elapsed();
    let kind = protocol::type_name(answer.code);

    if let Some(audit) = shared.audit.load_full() {
        let record = AuditRecord {
            ts: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            request_id: &answer.request_id,
            kind,
            status: answer.decision.status.code(),
            action: answer.decision.action.as_str(),
            error: &answer.decision.error,
            duration_ms: elapsed.as_secs_f64() * 1000.0,
            embedded: answer.embedded.clone(),
            servers: &answer.verdicts,
            config_generation: rt.generation,
            duplicate: answer.duplicate,
            request: answer.request.as_ref(),
        };
        let policy = SealPolicy {
            every: rt.config.audit_checkpoint_every,
            within: (rt.config.audit_checkpoint_ms > 0)
                .then(|| Duration::from_millis(rt.config.audit_checkpoint_ms)),
        };
        let appended = audit.append(&record, &rt.signer, policy, ticket);
        if let Err(e) = appended {
            // An answer that cannot be audited is not given as an approval.
            tracing::error!(path = %audit.path().display(), error = %e, "audit log write failed");
            if answer.decision.is_approval() {
                answer.decision =
                    Decision::reject(Status::InternalError, format!("audit log unavailable: {e}"));
            }
        }
    }

    shared
        .metrics
        .requests
        .with_label_values(&[kind, answer.decision.outcome()])
        .inc();
    shared
        .metrics
        .request_duration
        .with_label_values(&[kind])
        .observe(elapsed.as_secs_f64());
    log_decision(&answer, kind, elapsed);

    let response = CallbackResponse::new(
        &answer.request_id,
        answer.decision.status,
        answer.decision.action,
        answer.decision.error,
    );
    let token = sign_for_node(&rt, &response).await;
    // The token is base64url and dots only, so quoting it makes a valid JSON string.
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        format!("\"{token}\""),
    )
        .into_response()
}

/// HTTP 503 with `Retry-After`, unsigned and unread: beyond `max_in_flight`, a signature would
/// cost as much RSA as the work being shed. The TSS Node retries it as a failed call.
fn overloaded(shared: &Shared) -> Response {
    shared
        .metrics
        .requests
        .with_label_values(&["unknown", crate::metrics::outcome::OVERLOADED])
        .inc();
    tracing::debug!("overloaded: answered 503 beyond max_in_flight");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [
            (header::RETRY_AFTER, "1"),
            (header::CONTENT_TYPE, "text/plain"),
        ],
        "overloaded: max_in_flight requests are being decided; retry later\n",
    )
        .into_response()
}

async fn sign_for_node(rt: &Runtime, response: &CallbackResponse) -> String {
    let json = serde_json::to_vec(response).unwrap_or_default();
    protocol::sign_token_pooled(
        &rt.signer,
        json,
        rt.config.service_name.clone(),
        rt.config.token_expire_minutes as i64 * 60,
    )
    .await
}

fn invalid(status: Status, request_id: String, code: Option<i64>, error: String) -> Answer {
    Answer {
        request_id,
        code,
        decision: Decision::reject(status, error),
        embedded: "not_evaluated".into(),
        verdicts: Vec::new(),
        duplicate: false,
        request: None,
    }
}

/// A body above `max_body_bytes` is still read and thrown away, up to this many bytes in all,
/// so that a client that sends the whole body before reading gets its status-10 answer rather
/// than a connection reset by unread data (a lingering close).
const LINGER_BYTES: u64 = 64 << 20;
/// ... and for at most this long (never past the request's deadline).
const LINGER_TIME: Duration = Duration::from_secs(5);

/// Reads the body up to `limit` bytes. A larger one is refused from its Content-Length, or as
/// soon as the limit is crossed, without keeping any of it: the rest is drained (bounded by
/// [`LINGER_BYTES`], [`LINGER_TIME`] and `deadline`) so the client can read the refusal.
async fn read_body(
    headers: HeaderMap,
    mut body: Body,
    limit: usize,
    deadline: Instant,
) -> Result<Bytes, Answer> {
    use http_body_util::BodyExt;
    let too_large = || {
        invalid(
            Status::InvalidRequest,
            String::new(),
            None,
            format!("request body is larger than max_body_bytes ({limit})"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > limit as u64) {
        // A client waiting for `100 Continue` has sent nothing and is told no without it.
        let expects_continue = headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if !expects_continue && n <= LINGER_BYTES {
            linger(body, 0, deadline).await;
        }
        return Err(too_large());
    }
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut read = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            invalid(
                Status::InvalidRequest,
                String::new(),
                None,
                format!("request body could not be read: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        read += data.len();
        if read > limit {
            drop(chunks);
            linger(body, read as u64, deadline).await;
            return Err(too_large());
        }
        chunks.push(data);
    }
    // Most bodies arrive in one chunk, which is then kept without a copy.
    Ok(match chunks.as_slice() {
        [one] => one.clone(),
        many => many.concat().into(),
    })
}

/// Reads and discards what is left of `body` (a lingering close), until it ends, `read` reaches
/// [`LINGER_BYTES`], [`LINGER_TIME`] passes or `deadline` comes.
async fn linger(mut body: Body, mut read: u64, deadline: Instant) {
    use http_body_util::BodyExt;
    let until = deadline.min(Instant::now() + LINGER_TIME);
    let drain = async {
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, |d| d.len() as u64);
            if read > LINGER_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout_at(until, drain).await;
}

/// The `TSS_JWT_MSG` field of a form body; exactly one must be there.
fn form_token(body: &[u8]) -> Result<Cow<'_, str>, String> {
    // What the node sends: the one field, with nothing in its value to unescape.
    if let Some(value) = body
        .strip_prefix(FORM_FIELD.as_bytes())
        .and_then(|rest| rest.strip_prefix(b"="))
    {
        if !value.iter().any(|b| matches!(b, b'&' | b'%' | b'+')) {
            if let Ok(token) = std::str::from_utf8(value) {
                return Ok(Cow::Borrowed(token));
            }
        }
    }
    let mut tokens = form_urlencoded::parse(body).filter(|(k, _)| k == FORM_FIELD);
    match (tokens.next(), tokens.next()) {
        (Some((_, t)), None) => Ok(t),
        (None, _) => Err(format!("form field {FORM_FIELD} missing")),
        (Some(_), Some(_)) => Err(format!("form field {FORM_FIELD} given more than once")),
    }
}

/// The node's token checked and its payload parsed. Only the payload outlives this: the body,
/// token and claims are dropped before the (possibly long) wait for the downstreams.
fn parse_request(rt: &Runtime, body: Bytes) -> Result<(CallbackRequest, Vec<u8>), Box<Answer>> {
    let refuse = |status, error: String| Box::new(invalid(status, String::new(), None, error));
    let token = form_token(&body).map_err(|e| refuse(Status::InvalidToken, e))?;
    let claims = protocol::verify_token(&token, &rt.node_verifier, protocol::now_secs())
        .map_err(|e| refuse(Status::InvalidToken, e.to_string()))?;
    let package = protocol::decode_package(&claims.package_data)
        .map_err(|e| refuse(Status::InvalidRequest, e.to_string()))?;
    match CallbackRequest::parse(&package) {
        Ok(request) => Ok((request, package)),
        Err(e) => {
            let (id, code) = salvage_ids(&package);
            Err(Box::new(invalid(
                Status::InvalidRequest,
                id,
                code,
                e.to_string(),
            )))
        }
    }
}

/// Token, payload, rules, fan-out: the decision table of CONTRACT.md section 6, in its order.
async fn decide_request(shared: &Shared, rt: &Runtime, body: Bytes, deadline: Instant) -> Answer {
    let (request, package) = match parse_request(rt, body) {
        Ok(parsed) => parsed,
        Err(answer) => return *answer,
    };
    let code = request.request_type;
    let request_id = request.request_id.clone();
    // Otherwise the payload is dropped as soon as it is forwarded (memory under load).
    let recorded = if rt.config.audit_payloads {
        serde_json::from_slice(&package).ok()
    } else {
        None
    };
    let digest = dedup::digest(&package);
    let ttl = Duration::from_secs(rt.config.token_expire_minutes * 60);
    let lookup = shared
        .dedup
        .run(
            &request_id,
            rt.generation,
            digest,
            ttl,
            // Approvals and status-0 rejections are final; a status-30 failure may be retried.
            |e: &Arc<Evaluation>| e.decision.status == Status::Ok,
            // The request and payload move in, so they are freed once the downstreams' token
            // is signed, not when the answer goes out.
            move || async move { Arc::new(evaluate(shared, rt, request, package, deadline).await) },
        )
        .await;
    match lookup {
        Lookup::Conflict => {
            tracing::warn!(
                request_id = %crate::client::snippet(&request_id),
                "suspicious: request_id already used with a different payload"
            );
            Answer {
                request: recorded,
                ..invalid(
                    Status::InvalidRequest,
                    request_id,
                    Some(code),
                    "request_id was already used with a different payload".into(),
                )
            }
        }
        Lookup::Done { value, shared } => Answer {
            request_id,
            code: Some(code),
            decision: value.decision.clone(),
            embedded: value.embedded.clone(),
            verdicts: value.verdicts.clone(),
            duplicate: shared,
            request: recorded,
        },
    }
}

/// Embedded rules, then the downstreams: the decision for one well-formed request.
async fn evaluate(
    shared: &Shared,
    rt: &Runtime,
    request: CallbackRequest,
    package: Vec<u8>,
    deadline: Instant,
) -> Evaluation {
    let code = request.request_type;
    let kind = RequestType::from_code(code);
    let detail = request.request_detail.as_deref().unwrap_or("");
    let rules = rt.config.embedded_risk_control_rules.check(code, detail);
    let embedded = match &rules {
        RuleVerdict::Off => "off".to_owned(),
        RuleVerdict::Pass => "pass".to_owned(),
        RuleVerdict::Reject(rule) => format!("reject: {rule}"),
    };
    let CallbackRequest { request_id, .. } = request;
    let (decision, verdicts) = if matches!(rules, RuleVerdict::Reject(_)) {
        shared
            .metrics
            .embedded_rejections
            .with_label_values(&[protocol::type_name(Some(code))])
            .inc();
        (decide(&rules, &[]), Vec::new())
    } else {
        ask_downstreams(shared, rt, &rules, kind, request_id, package, deadline).await
    };
    Evaluation {
        decision,
        embedded,
        verdicts,
    }
}

/// Fans the node's exact bytes out to the subscribed servers and decides. Returns the decision
/// and every verdict: enforcing ones first, then shadows as they stand when the answer goes out.
async fn ask_downstreams(
    shared: &Shared,
    rt: &Runtime,
    rules: &RuleVerdict,
    kind: Option<RequestType>,
    request_id: String,
    package: Vec<u8>,
    deadline: Instant,
) -> (Decision, Vec<Verdict>) {
    let mut servers = rt.subscribers(kind).peekable();
    if servers.peek().is_none() {
        return (decide(rules, &[]), Vec::new());
    }
    // One signature for all downstreams: they all get the node's exact bytes.
    let form = crate::client::form_body(
        &protocol::sign_token_pooled(
            rt.request_signer(),
            package,
            rt.config.service_name.clone(),
            rt.config.token_expire_minutes as i64 * 60,
        )
        .await,
    );
    let (mut verdicts, shadows) = fanout::fan_out(
        servers,
        form,
        request_id.into(),
        kind == Some(RequestType::Ping),
        deadline,
        &shared.metrics,
    )
    .await;
    let decision = decide(rules, &verdicts);
    verdicts.extend(fanout::shadow_snapshot(&shadows));
    (decision, verdicts)
}

/// Best-effort `request_id` and `request_type` from a payload that failed to parse, so the
/// status-10 answer can still name the request.
fn salvage_ids(package: &[u8]) -> (String, Option<i64>) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(package) else {
        return (String::new(), None);
    };
    let id = v
        .get("request_id")
        .and_then(|x| x.as_str())
        .filter(|s| s.len() <= protocol::MAX_REQUEST_ID_BYTES)
        .unwrap_or_default()
        .to_owned();
    (id, v.get("request_type").and_then(|x| x.as_i64()))
}

fn log_decision(a: &Answer, kind: &str, elapsed: Duration) {
    let servers: Vec<String> = a
        .verdicts
        .iter()
        .map(|v| {
            format!(
                "{}={}({}ms)",
                v.server,
                v.outcome.as_str(),
                v.duration.as_millis()
            )
        })
        .collect();
    tracing::info!(
        request_id = %crate::client::snippet(&a.request_id),
        r#type = kind,
        status = a.decision.status.code(),
        decision = a.decision.action.as_str(),
        duration_ms = elapsed.as_millis() as u64,
        servers = %servers.join(","),
        duplicate = a.duplicate,
        error = %crate::client::snippet(&a.decision.error),
        "decision"
    );
}

async fn ping(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let rt = shared.runtime.load();
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Json(serde_json::json!({ "server": rt.config.service_name, "timestamp": ms }))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let rt = shared.runtime.load();
    Json(serde_json::json!({
        "ready": true,
        "config_generation": rt.generation,
        "servers": shared.health.report(&rt),
    }))
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        shared.metrics.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the general form parser makes of `body`.
    fn parsed(body: &[u8]) -> Result<String, String> {
        let mut tokens = form_urlencoded::parse(body).filter(|(k, _)| k == FORM_FIELD);
        match (tokens.next(), tokens.next()) {
            (Some((_, t)), None) => Ok(t.into_owned()),
            (None, _) => Err(format!("form field {FORM_FIELD} missing")),
            (Some(_), Some(_)) => Err(format!("form field {FORM_FIELD} given more than once")),
        }
    }

    #[test]
    fn form_token_reads_what_the_form_parser_reads() {
        let cases: &[&[u8]] = &[
            b"TSS_JWT_MSG=eyJh.eyJw.c2ln",
            b"TSS_JWT_MSG=",
            b"TSS_JWT_MSG=a%2Eb",
            b"TSS_JWT_MSG=a+b",
            b"TSS_JWT_MSG=a&TSS_JWT_MSG=b",
            b"TSS_JWT_MSG=a&other=1",
            b"other=1&TSS_JWT_MSG=a",
            b"TSS_JWT_MSGX=a",
            b"TSS_JWT_MSG",
            b"TSS_JWT_MSG=a=b",
            b"TSS_JWT_MSG=\xff\xfe",
            b"",
        ];
        for body in cases {
            assert_eq!(
                form_token(body).map(Cow::into_owned),
                parsed(body),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(matches!(
            form_token(b"TSS_JWT_MSG=eyJh.eyJw.c2ln"),
            Ok(Cow::Borrowed(_))
        ));
    }

    proptest! {
        #[test]
        fn form_token_matches_the_form_parser(tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut body = b"TSS_JWT_MSG=".to_vec();
            body.extend_from_slice(&tail);
            prop_assert_eq!(form_token(&body).map(Cow::into_owned), parsed(&body));
        }
    }
}
