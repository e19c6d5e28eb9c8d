//! The callback handler, thin on purpose: admit, read the body, decide (token, payload, rules,
//! downstreams, in the order of CONTRACT.md section 6), audit, count, sign the answer.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use tokio::time::Instant;
use tracing::field::Empty;
use tracing::Instrument;

use super::body::{arrive, form_token, Arrived};
use super::conn::ConnRef;
use super::dedup::{self, Lookup};
use super::refusal;
use crate::config::Mode;
use crate::generation::{Audience, Downstream, Generation};
use crate::ops::audit::{AuditRecord, Shadow, Ticket};
use crate::ops::metrics::Metrics;
use crate::ops::traces::{self, TARGET as TRACES};
use crate::outbound::{client, fanout, Outbound};
use crate::protocol::{self, CallbackRequest, CallbackResponse, RequestType, Status};
use crate::rules::RuleVerdict;
use crate::verdict::{
    decide, Decision, Embedded, Evaluation, ShadowSlot, Verdict, MAX_ERROR_BYTES,
};
use crate::Shared;

/// Everything known about one request once it is decided.
struct Answer {
    request_id: String,
    code: Option<i64>,
    decision: Decision,
    embedded: Embedded,
    verdicts: Vec<Verdict>,
    /// Answered from an identical twin's evaluation (a TSS Node retry), not by asking again.
    duplicate: bool,
    /// The verified CallbackRequest, kept only with `audit_payloads: true`.
    request: Option<serde_json::Value>,
    /// A status-20 answer's fixed text (see [`refusal`]); `decision.error` says exactly why,
    /// for the log and the audit record.
    refusal: Option<&'static str>,
    /// The shadow calls `verdicts` shows `pending`, released once the record is out.
    late: Vec<Arc<ShadowSlot>>,
    /// SHA-256 of the CallbackRequest bytes (zeros when there were none), for the approvals
    /// index.
    digest: [u8; 32],
}

impl dedup::Footprint for Arc<Evaluation> {
    fn footprint(&self) -> usize {
        let details: usize = self.verdicts.iter().map(|v| v.detail.capacity()).sum();
        std::mem::size_of::<Evaluation>()
            + self.verdicts.capacity() * std::mem::size_of::<Verdict>()
            + details
            + self.decision.error.capacity()
            + self.embedded.heap_bytes()
            // A late verdict waits here at most until it is handed on.
            + self.late.len() * (std::mem::size_of::<ShadowSlot>() + MAX_ERROR_BYTES)
    }
}

/// Decrements the in-flight gauge however the request ends (including a dropped connection).
struct InFlight(prometheus::IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// `POST /v2/check` and `/v1/check`: one callback, answered with a token signed by the gateway.
/// With `tracing:`, the callback is the root span of its trace (the child of the node's
/// `traceparent`, if it sent one).
pub(crate) async fn check(
    State(shared): State<Arc<Shared>>,
    conn: Option<Extension<ConnRef>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let root = tracing::info_span!(
        target: TRACES,
        "callback",
        otel.kind = "server",
        "type" = Empty,
        request_id = Empty,
        decision = Empty,
        status = Empty,
        outcome = Empty,
        duplicate = Empty,
        otel.status_code = Empty,
    );
    traces::adopt(&root, &headers);
    answer_callback(shared, conn, headers, body)
        .instrument(root)
        .await
}

async fn answer_callback(
    shared: Arc<Shared>,
    conn: Option<Extension<ConnRef>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let conn = conn.map(|Extension(c)| c.0);
    // Before anything is signed: shedding must cost no RSA work. The permit is held until the
    // answer is made (move it along if the decision ever runs in a task of its own).
    let Some(Arrived {
        g,
        admitted: _admitted,
        started,
        body,
    }) = arrive(&shared, conn.as_deref(), headers, body).await
    else {
        return overloaded(&shared);
    };
    shared.metrics.in_flight.inc();
    let _in_flight = InFlight(shared.metrics.in_flight.clone());
    let ticket = shared.audit_pending.enter();
    let deadline = started + Duration::from_millis(g.config.deadline_ms);
    shared.admission.note_deadline(deadline);

    let mut answer = match body {
        Ok(bytes) => decide_request(&shared, &g, bytes, deadline).await,
        Err(refusal) => invalid(Status::InvalidRequest, String::new(), None, refusal),
    };
    index_approval(&shared, &g, &mut answer, deadline)
        .instrument(tracing::info_span!(target: TRACES, "approvals_index"))
        .await;
    let elapsed = started.elapsed();
    let kind = protocol::type_name(answer.code);
    audit(&shared, &g, &mut answer, kind, elapsed, ticket, deadline)
        .instrument(tracing::info_span!(target: TRACES, "audit_write"))
        .await;
    release_late_shadows(&shared, &answer);
    shared
        .metrics
        .requests
        .with_label_values(&[kind, answer.decision.metric_label()])
        .inc();
    shared
        .metrics
        .request_duration
        .with_label_values(&[kind])
        .observe(elapsed.as_secs_f64());
    let root = tracing::Span::current();
    record_decision(&root, &answer, kind);
    let trace_id = traces::trace_id(&root);
    log_decision(
        &answer,
        kind,
        elapsed,
        conn.as_ref().map(|c| c.peer),
        trace_id.as_deref(),
    );
    shared.decisions.push(
        &answer.request_id,
        kind,
        answer.decision.status.code(),
        answer.decision.action.as_str(),
        &answer.decision.error,
        answer.duplicate,
    );

    let token = match answer.refusal {
        // Nothing is known about this caller: a token signed in advance, no RSA work.
        Some(text) if answer.decision.status == Status::InvalidToken => g
            .refusals
            .token(text, || refusal::Signing {
                signer: g.signer.clone(),
                iss: g.config.service_name.clone(),
                expire_secs: g.config.token_expire_minutes as i64 * 60,
            })
            .await
            .to_string(),
        _ => {
            let response = CallbackResponse::new(
                &answer.request_id,
                answer.decision.status,
                answer.decision.action,
                answer.decision.error,
            );
            let json = serde_json::to_vec(&response).unwrap_or_default();
            g.sign(Audience::Node, json)
                .instrument(tracing::info_span!(target: TRACES, "sign_answer"))
                .await
        }
    };
    // The token is base64url and dots only, so quoting it makes a valid JSON string.
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        format!("\"{token}\""),
    )
        .into_response()
}

/// Writes the answer's audit record, if there is an audit log, before the answer is sent,
/// waiting for it until the request's deadline (at least [`AUDIT_WAIT_MIN`]). An approval whose
/// record was not written is not given: it becomes status 30. Status-20 refusals
/// beyond the writer's rate are summed up in a `refused` record instead.
async fn audit(
    shared: &Shared,
    g: &Arc<Generation>,
    answer: &mut Answer,
    kind: &'static str,
    elapsed: Duration,
    ticket: Ticket,
    deadline: Instant,
) {
    let Some(audit) = shared.audit.load_full() else {
        return;
    };
    if answer.decision.status == Status::InvalidToken && !audit.admit_refusal() {
        return;
    }
    let record = AuditRecord {
        ts: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        request_id: &answer.request_id,
        kind,
        status: answer.decision.status.code(),
        action: answer.decision.action.as_str(),
        error: &answer.decision.error,
        duration_ms: elapsed.as_secs_f64() * 1000.0,
        embedded: &answer.embedded,
        servers: &answer.verdicts,
        config_generation: g.number,
        duplicate: answer.duplicate,
        request: answer.request.as_ref(),
    };
    let until = deadline.max(Instant::now() + AUDIT_WAIT_MIN);
    if let Err(e) = audit.append(&record, g, ticket, until).await {
        if answer.decision.is_approval() {
            answer.decision =
                Decision::reject(Status::InternalError, format!("audit log unavailable: {e}"));
        }
    }
}

/// Once the answer's record is handed over (or was not to be written): each shadow verdict it
/// shows `pending` goes to the audit log as a `shadow` record of its own when it arrives (at
/// once if it already has). Twins and remembered answers release the same calls: each verdict
/// is recorded once.
fn release_late_shadows(shared: &Arc<Shared>, answer: &Answer) {
    for slot in &answer.late {
        // Weak: a verdict still to come must not keep the gateway's state alive.
        let shared = Arc::downgrade(shared);
        let request_id = answer.request_id.clone();
        slot.release(Box::new(move |v: Verdict| {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            if let Some(audit) = shared.audit.load_full() {
                let shadow = Shadow {
                    request_id: &request_id,
                    server: &v.server,
                    outcome: v.outcome.as_str(),
                    duration_ms: v.duration.as_secs_f64() * 1000.0,
                    detail: &v.detail,
                };
                audit.shadow(&shared.current.load_full(), shadow);
            }
        }));
    }
}

/// Puts an approval in the approvals index before it is sent (contract section 5), so that the
/// `succeeded` event of the task can be reconciled with it, here or on another replica. Pings
/// are not indexed: a Ping is never executed. An approval that could not be indexed is not
/// given: it becomes status 30 (fail closed), and `/readyz` turns 503 until the store recovers.
async fn index_approval(shared: &Shared, g: &Generation, answer: &mut Answer, deadline: Instant) {
    let Some(store) = &shared.store else {
        return;
    };
    if !answer.decision.is_approval() || answer.code == Some(RequestType::Ping.code()) {
        return;
    }
    let approval = crate::state::approvals::Approval {
        request_id: answer.request_id.clone(),
        request_type: answer.code.unwrap_or(-1),
        payload_sha256: crate::ops::audit::hex(&answer.digest),
        config_generation: g.number,
    };
    let until = deadline.max(Instant::now() + AUDIT_WAIT_MIN);
    if let Err(e) = store.approve(approval, until).await {
        answer.decision = Decision::reject(
            Status::InternalError,
            format!("state store unavailable: {e}"),
        );
    }
}

/// A request whose decision used up its deadline still gives the audit writer this long.
const AUDIT_WAIT_MIN: Duration = Duration::from_millis(500);

/// HTTP 503 with `Retry-After`, unsigned and unread: beyond `max_in_flight`, a signature would
/// cost as much RSA as the work being shed. The TSS Node retries it as a failed call.
fn overloaded(shared: &Shared) -> Response {
    shared
        .metrics
        .requests
        .with_label_values(&["unknown", crate::ops::metrics::outcome::OVERLOADED])
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

fn invalid(status: Status, request_id: String, code: Option<i64>, error: String) -> Answer {
    Answer {
        request_id,
        code,
        decision: Decision::reject(status, error),
        embedded: Embedded::NotEvaluated,
        verdicts: Vec::new(),
        duplicate: false,
        request: None,
        refusal: None,
        late: Vec::new(),
        digest: [0; 32],
    }
}

/// The node's token checked and its payload parsed. Only the payload outlives this: the body,
/// token and claims are dropped before the (possibly long) wait for the downstreams.
fn parse_request(g: &Generation, body: Bytes) -> Result<(CallbackRequest, Vec<u8>), Box<Answer>> {
    let refuse = |status, error: String| Box::new(invalid(status, String::new(), None, error));
    let bad_token = |text: &'static str, error: String| {
        Box::new(Answer {
            refusal: Some(text),
            ..invalid(Status::InvalidToken, String::new(), None, error)
        })
    };
    let token = form_token(&body).map_err(|e| {
        let text = if e.contains("more than once") {
            refusal::FORM_TWICE
        } else {
            refusal::FORM_MISSING
        };
        bad_token(text, e)
    })?;
    let claims = protocol::verify_token(&token, &g.node_verifier, protocol::now_secs())
        .map_err(|e| bad_token(refusal::of_token(&e), e.to_string()))?;
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
async fn decide_request(shared: &Shared, g: &Generation, body: Bytes, deadline: Instant) -> Answer {
    let parsed =
        tracing::info_span!(target: TRACES, "token_check").in_scope(|| parse_request(g, body));
    let (request, package) = match parsed {
        Ok(parsed) => parsed,
        Err(answer) => return *answer,
    };
    let code = request.request_type;
    let request_id = request.request_id.clone();
    // Otherwise the payload is dropped as soon as it is forwarded (memory under load).
    let recorded = if g.config.audit_payloads {
        serde_json::from_slice(&package).ok()
    } else {
        None
    };
    let digest = dedup::digest(&package);
    let ttl = Duration::from_secs(g.config.token_expire_minutes * 60);
    // Not entered: the evaluation it may run is the callback's child, not this span's.
    let memory = tracing::info_span!(target: TRACES, "duplicate_memory", result = Empty);
    let lookup = shared
        .dedup
        .run(
            &request_id,
            g.number,
            digest,
            ttl,
            // Approvals and status-0 rejections are final; a status-30 failure may be retried.
            |e: &Arc<Evaluation>| e.decision.status == Status::Ok,
            // The request and payload move in, so they are freed once the downstreams' token
            // is signed, not when the answer goes out.
            move || async move { Arc::new(evaluate(shared, g, request, package, deadline).await) },
        )
        .await;
    memory.record(
        "result",
        match &lookup {
            Lookup::Conflict => "conflict",
            Lookup::Done { shared: true, .. } => "shared",
            Lookup::Done { .. } => "evaluated",
        },
    );
    drop(memory);
    match lookup {
        Lookup::Conflict => {
            tracing::warn!(
                request_id = %client::snippet(&request_id),
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
            refusal: None,
            late: value.late.clone(),
            digest,
        },
    }
}

/// Embedded rules, then the downstreams: the decision for one well-formed request.
async fn evaluate(
    shared: &Shared,
    g: &Generation,
    request: CallbackRequest,
    package: Vec<u8>,
    deadline: Instant,
) -> Evaluation {
    let code = request.request_type;
    let kind = RequestType::from_code(code);
    let detail = request.request_detail.as_deref().unwrap_or("");
    let rules_span = tracing::info_span!(target: TRACES, "embedded_rules", verdict = Empty);
    let rules = rules_span.in_scope(|| g.config.embedded_risk_control_rules.check(code, detail));
    let embedded = Embedded::from(&rules);
    if !rules_span.is_disabled() {
        rules_span.record("verdict", tracing::field::display(&embedded));
    }
    drop(rules_span);
    let CallbackRequest { request_id, .. } = request;
    let mut servers = g.subscribers(kind).peekable();
    let (decision, verdicts, late) = if matches!(rules, RuleVerdict::Reject(_)) {
        shared
            .metrics
            .embedded_rejections
            .with_label_values(&[protocol::type_name(Some(code))])
            .inc();
        (decide(&rules, &[]), Vec::new(), Vec::new())
    } else if servers.peek().is_none() {
        (decide(&rules, &[]), Vec::new(), Vec::new())
    } else {
        // One signature for all downstreams: they all get the node's exact bytes.
        let token = g
            .sign(Audience::Downstreams, package)
            .instrument(tracing::info_span!(target: TRACES, "sign_request"))
            .await;
        let out = Outbound {
            form: client::form_body(&token),
            request_id: request_id.into(),
            kind,
            deadline,
            span: tracing::Span::current(),
        };
        ask_downstreams(
            &shared.metrics,
            servers,
            &rules,
            &out,
            g.config.max_in_flight,
        )
        .await
    };
    Evaluation {
        decision,
        embedded,
        verdicts,
        late,
    }
}

/// Fans `out` out to `servers` and decides. Returns the decision, every verdict (enforcing
/// ones first, then shadows as they stand when the answer goes out) and the slots of the
/// shadow calls still running.
async fn ask_downstreams<'a>(
    metrics: &Metrics,
    servers: impl Iterator<Item = &'a Arc<Downstream>>,
    rules: &RuleVerdict,
    out: &Outbound,
    max_in_flight: usize,
) -> (Decision, Vec<Verdict>, Vec<Arc<ShadowSlot>>) {
    let (mut verdicts, shadows) = fanout::fan_out(servers, out, metrics, max_in_flight).await;
    let decision = decide(rules, &verdicts);
    let (shadow_verdicts, late) = fanout::shadow_snapshot(shadows);
    verdicts.extend(shadow_verdicts);
    (decision, verdicts, late)
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

/// Logs one line per decision: INFO for an answer that says something about the request
/// (approved, rejected, invalid request), WARN for a downstream failure (status 30) and for a
/// refused token (status 20, with the caller's address). Refusals are what junk and attacks
/// produce, so at most [`REFUSAL_LOGS_PER_SECOND`] are logged a second; the next one logged
/// says how many were not.
fn log_decision(
    a: &Answer,
    kind: &str,
    elapsed: Duration,
    peer: Option<std::net::SocketAddr>,
    trace_id: Option<&str>,
) {
    let servers: Vec<String> = a
        .verdicts
        .iter()
        .map(|v| {
            let shadow = if v.mode == Mode::Shadow {
                "(shadow)"
            } else {
                ""
            };
            format!(
                "{}={}{shadow}({}ms)",
                v.server,
                v.outcome.as_str(),
                v.duration.as_millis()
            )
        })
        .collect();
    let request_id = client::snippet(&a.request_id);
    // The answer's text, not a snippet of it: capped at 1 KiB as error texts are everywhere.
    let error = crate::verdict::capped(&a.decision.error);
    macro_rules! decision {
        ($level:ident $(, $k:ident = $v:tt)*) => {
            tracing::$level!(
                request_id = %request_id,
                r#type = kind,
                status = a.decision.status.code(),
                decision = a.decision.action.as_str(),
                duration_ms = elapsed.as_millis() as u64,
                servers = %servers.join(","),
                duplicate = a.duplicate,
                error = %error,
                trace_id = trace_id.map(tracing::field::display),
                $($k = $v,)*
                "decision"
            )
        };
    }
    match a.decision.status {
        Status::InvalidToken => {
            let Some(unlogged) = refusal_log_budget() else {
                return;
            };
            let peer = peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
            let peer = peer.as_str();
            decision!(warn, peer = peer, refusals_not_logged = unlogged);
        }
        Status::InternalError => decision!(warn),
        _ => decision!(info),
    }
}

/// The decision on the callback's root span: `type`, `request_id`, `decision`, `status`,
/// `duplicate`; an answer that is not status 0 marks the span as an error.
fn record_decision(root: &tracing::Span, a: &Answer, kind: &'static str) {
    if root.is_disabled() {
        return;
    }
    root.record("type", kind);
    root.record("request_id", client::snippet(&a.request_id).as_str());
    root.record("decision", a.decision.action.as_str());
    root.record("status", a.decision.status.code());
    // As in `tss_gateway_requests_total`: the dashboard's trace links filter on it.
    root.record("outcome", a.decision.metric_label());
    root.record("duplicate", a.duplicate);
    if a.decision.status != Status::Ok {
        root.record("otel.status_code", "ERROR");
    }
}

/// Status-20 decisions logged per second at most; the rest are counted in metrics (and summed
/// up in the audit log), not logged one by one.
const REFUSAL_LOGS_PER_SECOND: u32 = 10;

/// Whether a status-20 decision may be logged now: `Some(n)` with the number not logged since
/// the last one that was, or `None` beyond [`REFUSAL_LOGS_PER_SECOND`].
pub(crate) fn refusal_log_budget() -> Option<u64> {
    struct Budget {
        window: Option<std::time::Instant>,
        logged: u32,
        unlogged: u64,
    }
    static BUDGET: std::sync::Mutex<Budget> = std::sync::Mutex::new(Budget {
        window: None,
        logged: 0,
        unlogged: 0,
    });
    let mut b = BUDGET.lock().unwrap_or_else(|p| p.into_inner());
    let now = std::time::Instant::now();
    if b.window
        .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1))
    {
        b.window = Some(now);
        b.logged = 0;
    }
    if b.logged >= REFUSAL_LOGS_PER_SECOND {
        b.unlogged += 1;
        return None;
    }
    b.logged += 1;
    Some(std::mem::take(&mut b.unlogged))
}
