//! `POST /v2/event`: a TSS Node event, verified with the node's event key, recorded (outbox and
//! audit chain) before the answer, then delivered by [`crate::outbound::events`] and reconciled
//! by [`crate::ops::reconcile`].
//!
//! Answers are plain HTTP, as Cobo's event servers give them: 200 once the event is recorded,
//! 400 for a bad token or payload (nothing recorded, nothing delivered), 503 when it cannot be
//! recorded (the node may send it again: a duplicate `event_id` is accepted, not delivered twice).

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
use crate::generation::Generation;
use crate::ops::audit::{EventRecord, EventSeen};
use crate::ops::metrics::event_outcome;
use crate::ops::reconcile::{self, Check};
use crate::ops::traces::{self, TARGET as TRACES};
use crate::outbound::client;
use crate::protocol::event::Event;
use crate::protocol::{self, keys::Verifier};
use crate::Shared;

/// Why an event was not accepted: the HTTP status, the metric outcome and the text.
struct Refusal {
    http: StatusCode,
    outcome: &'static str,
    event_type: String,
    text: String,
}

fn refuse(http: StatusCode, outcome: &'static str, text: String) -> Refusal {
    Refusal {
        http,
        outcome,
        event_type: String::new(),
        text,
    }
}

/// The handler. With `tracing:`, each event is the root span of its trace (the child of the
/// node's `traceparent`, if any); its deliveries join that trace later (see
/// [`crate::outbound::events`]).
pub(crate) async fn event(
    State(shared): State<Arc<Shared>>,
    conn: Option<Extension<ConnRef>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let root = tracing::info_span!(
        target: TRACES,
        "event",
        otel.kind = "server",
        event_id = Empty,
        event_type = Empty,
        request_id = Empty,
        http.status_code = Empty,
        otel.status_code = Empty,
    );
    traces::adopt(&root, &headers);
    let response = take_event(shared, conn, headers, body)
        .instrument(root.clone())
        .await;
    if !root.is_disabled() {
        root.record("http.status_code", i64::from(response.status().as_u16()));
        if !response.status().is_success() {
            root.record("otel.status_code", "ERROR");
        }
    }
    response
}

async fn take_event(
    shared: Arc<Shared>,
    conn: Option<Extension<ConnRef>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let conn = conn.map(|Extension(c)| c.0);
    if shared.current.load().event_verifier.is_none() {
        return plain(
            StatusCode::NOT_FOUND,
            "events are off: tss_node_event_public_key is not set\n".into(),
        );
    }
    let Some(Arrived {
        g,
        admitted: _admitted,
        started,
        body,
    }) = arrive(&shared, conn.as_deref(), headers, body).await
    else {
        return overloaded();
    };
    let deadline = started + Duration::from_millis(g.config.deadline_ms);
    let result = match body {
        Ok(bytes) => receive(&shared, &g, bytes, deadline).await,
        Err(e) => Err(refuse(
            StatusCode::BAD_REQUEST,
            event_outcome::INVALID_REQUEST,
            e,
        )),
    };
    match result {
        Ok(event_type) => {
            shared
                .metrics
                .count_event(&event_type, event_outcome::ACCEPTED);
            plain(StatusCode::OK, "ok\n".into())
        }
        Err(r) => {
            shared.metrics.count_event(&r.event_type, r.outcome);
            // A 400 needs no key to provoke: logged within the same per-second budget as
            // status-20 callbacks (every one is counted in metrics).
            let unlogged = if r.http == StatusCode::BAD_REQUEST {
                super::check::refusal_log_budget()
            } else {
                Some(0)
            };
            if let Some(unlogged) = unlogged {
                let peer = conn.as_ref().map(|c| c.peer.to_string());
                tracing::warn!(
                    http = r.http.as_u16(),
                    outcome = r.outcome,
                    peer = peer.as_deref().unwrap_or("unknown"),
                    refusals_not_logged = unlogged,
                    error = %client::snippet(&r.text),
                    "event not accepted"
                );
            }
            plain(r.http, format!("{}\n", r.text))
        }
    }
}

/// Verifies, records, wakes the delivery and reconciles; the event type on success.
async fn receive(
    shared: &Shared,
    g: &Arc<Generation>,
    body: Bytes,
    deadline: Instant,
) -> Result<String, Refusal> {
    let Some(verifier) = g.event_verifier.as_ref() else {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            event_outcome::INVALID_REQUEST,
            "events are off".into(),
        ));
    };
    let (event, package) = parse(verifier, &body)?;
    drop(body);
    let span = tracing::Span::current();
    if !span.is_disabled() {
        span.record("event_id", client::snippet(&event.event_id).as_str());
        span.record("event_type", client::snippet(&event.event_type).as_str());
        if let Some(id) = &event.request_id {
            span.record("request_id", client::snippet(id).as_str());
        }
    }
    let failed = |text: String| Refusal {
        http: StatusCode::SERVICE_UNAVAILABLE,
        outcome: event_outcome::FAILED,
        event_type: event.event_type.clone(),
        text,
    };
    let Some(store) = shared.store.clone() else {
        return Err(failed("no state store is open: restart the gateway".into()));
    };
    let check = reconcile::check_for(&event);
    let approved = match (check, &event.request_id) {
        (Check::Lookup(_), Some(id)) => store
            .approved(id)
            .await
            .map_err(|e| failed(format!("state store unavailable: {e}")))?,
        _ => false,
    };
    let servers: Vec<&str> = g
        .event_servers
        .iter()
        .filter(|s| s.wants(&event.event_type))
        .map(|s| &*s.name)
        .collect();
    let traceparent = traces::traceparent(&span);
    let new = store
        .record_event(
            &event.event_id,
            &event.event_type,
            &package,
            &servers,
            traceparent.as_deref(),
        )
        .await
        .map_err(|e| failed(format!("state store unavailable: {e}")))?;
    let audited = match shared.audit.load_full() {
        None => Ok(()),
        Some(audit) => {
            let record = EventRecord {
                ts: crate::ops::audit::now_rfc3339(),
                event: EventSeen {
                    event_id: &event.event_id,
                    event_type: &event.event_type,
                    node_id: &event.node_id,
                    request_id: event.request_id.as_deref(),
                    request_type: event.request_type.clone(),
                    duplicate: !new,
                },
            };
            let until = deadline.max(Instant::now() + Duration::from_millis(500));
            match serde_json::to_vec(&record) {
                Ok(body) => {
                    audit
                        .append_body(body, g, shared.audit_pending.enter(), until)
                        .await
                }
                Err(e) => Err(e.to_string()),
            }
        }
    };
    // Once in the outbox the event is delivered and reconciled, even if its audit record
    // failed: the node's retry of it is a duplicate, which reconciles nothing again.
    if new {
        shared.delivery.ring();
        reconcile::reconcile(shared, g, &event, approved).await;
    }
    audited.map_err(|e| failed(format!("audit log unavailable: {e}")))?;
    tracing::info!(
        event_id = %client::snippet(&event.event_id),
        event_type = %client::snippet(&event.event_type),
        request_id = %client::snippet(event.request_id.as_deref().unwrap_or_default()),
        servers = servers.len(),
        duplicate = !new,
        trace_id = traces::trace_id(&span).map(tracing::field::display),
        "event recorded"
    );
    Ok(event.event_type)
}

/// The token checked with the event key and the TSSEvent read; the node's exact bytes kept.
fn parse(verifier: &Verifier, body: &[u8]) -> Result<(Event, Vec<u8>), Refusal> {
    let bad_token =
        |text: String| refuse(StatusCode::BAD_REQUEST, event_outcome::INVALID_TOKEN, text);
    let token = form_token(body).map_err(bad_token)?;
    let claims = protocol::verify_token(&token, verifier, protocol::now_secs())
        .map_err(|e| bad_token(format!("invalid token: {e}")))?;
    let invalid = |text: String| {
        refuse(
            StatusCode::BAD_REQUEST,
            event_outcome::INVALID_REQUEST,
            text,
        )
    };
    let package =
        protocol::decode_package(&claims.package_data).map_err(|e| invalid(e.to_string()))?;
    let event = Event::parse(&package).map_err(|e| invalid(e.to_string()))?;
    Ok((event, package))
}

fn plain(status: StatusCode, text: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], text).into_response()
}

/// HTTP 503 with `Retry-After` beyond `max_in_flight`, unread.
fn overloaded() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [
            (header::RETRY_AFTER, "1"),
            (header::CONTENT_TYPE, "text/plain"),
        ],
        "overloaded: max_in_flight requests are being handled; retry later\n",
    )
        .into_response()
}
