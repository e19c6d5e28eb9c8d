//! One downstream call becomes a [`Verdict`]; all calls for a request become the verdict list the
//! decision is made from.
//!
//! Guarantees: every enforcing call is bounded by its own `timeout_ms` per attempt and by the
//! request's deadline overall (waiting for a `max_concurrent` slot included); the first enforcing
//! rejection ends the wait and cancels the rest; shadow calls run detached and never delay or
//! change the answer.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;
use tokio::time::Instant;

use crate::client::{self, CallError};
use crate::config::Mode;
use crate::metrics::Metrics;
use crate::runtime::Downstream;

/// What became of one call to one server (the `outcome` label of
/// `tss_gateway_downstream_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Approved,
    Rejected,
    Timeout,
    TransportError,
    HttpError,
    BadSignature,
    BadResponse,
    ErrorStatus,
    Cancelled,
    /// A shadow call still running when the answer was sent.
    Pending,
}

/// One server's answer to one request.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    #[serde(rename = "name")]
    pub server: Arc<str>,
    pub mode: Mode,
    pub outcome: Outcome,
    #[serde(rename = "duration_ms")]
    #[serde(serialize_with = "ser_ms")]
    pub duration: Duration,
    /// The server's `error` for a rejection, or what went wrong.
    pub detail: String,
}

/// A shadow call's verdict, filled in whenever it finishes.
pub type ShadowSlot = (Arc<Downstream>, Arc<OnceLock<Verdict>>);

/// Backoff before retry `n` (1-based) after a transport failure.
fn backoff(n: u32) -> Duration {
    Duration::from_millis(50u64.saturating_mul(1 << n.min(6)) / 2)
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

// === impl Outcome ===

impl Outcome {
    /// The outcomes counted in `tss_gateway_downstream_requests_total` (not `pending`).
    pub const RECORDED: [Outcome; 9] = [
        Outcome::Approved,
        Outcome::Rejected,
        Outcome::Timeout,
        Outcome::TransportError,
        Outcome::HttpError,
        Outcome::BadSignature,
        Outcome::BadResponse,
        Outcome::ErrorStatus,
        Outcome::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Approved => "approved",
            Outcome::Rejected => "rejected",
            Outcome::Timeout => "timeout",
            Outcome::TransportError => "transport_error",
            Outcome::HttpError => "http_error",
            Outcome::BadSignature => "bad_signature",
            Outcome::BadResponse => "bad_response",
            Outcome::ErrorStatus => "error_status",
            Outcome::Cancelled => "cancelled",
            Outcome::Pending => "pending",
        }
    }

    /// Outcomes that are neither an approval nor a definitive rejection.
    pub fn is_failure(self) -> bool {
        !matches!(self, Outcome::Approved | Outcome::Rejected)
    }
}

impl From<&CallError> for Outcome {
    fn from(e: &CallError) -> Outcome {
        match e {
            CallError::Timeout(_) => Outcome::Timeout,
            CallError::Transport(_) => Outcome::TransportError,
            CallError::Http(_) => Outcome::HttpError,
            CallError::BadSignature(_) => Outcome::BadSignature,
            CallError::BadResponse(_) => Outcome::BadResponse,
        }
    }
}

// === impl Verdict ===

impl Verdict {
    /// `detail` is capped at [`crate::decision::MAX_ERROR_BYTES`]: a verbose server's text is
    /// kept (in the answer, the audit log and the duplicate memory) only that far.
    fn new(ds: &Downstream, outcome: Outcome, duration: Duration, detail: String) -> Verdict {
        let detail = if detail.len() > crate::decision::MAX_ERROR_BYTES {
            crate::decision::capped(&detail)
        } else {
            detail
        };
        Verdict {
            server: ds.name.clone(),
            mode: ds.mode,
            outcome,
            duration,
            detail,
        }
    }
}

/// Calls one server: first a free slot if it has `max_concurrent` (waited for until the
/// deadline: never getting one is a timeout), then attempts bounded by `timeout_ms` and the
/// deadline, retrying transport failures only. The slot is held until the call ends. For a Ping
/// any status-0 answer counts as approved, with or without `action`.
pub async fn call(
    ds: &Downstream,
    metrics: &Metrics,
    form: &Bytes,
    request_id: &str,
    is_ping: bool,
    deadline: Instant,
) -> Verdict {
    let _slot = match &ds.slots {
        None => None,
        Some(slots) => {
            let waiting = Instant::now();
            let slot = slots.acquire(deadline).await;
            let waited = waiting.elapsed();
            metrics
                .downstream_slot_wait
                .with_label_values(&[&ds.name])
                .observe(waited.as_secs_f64());
            if slot.is_none() {
                let detail = format!(
                    "timeout: no free slot (max_concurrent {}) within {} ms",
                    slots.limit,
                    waited.as_millis()
                );
                return Verdict::new(ds, Outcome::Timeout, waited, detail);
            }
            slot
        }
    };
    let started = Instant::now();
    let mut attempt = 0;
    let result = loop {
        let now = Instant::now();
        let budget = ds.timeout.min(deadline.saturating_duration_since(now));
        if budget.is_zero() {
            break Err(CallError::Timeout(ds.timeout.as_millis() as u64));
        }
        let answer =
            tokio::time::timeout(budget, client::post_form(&ds.client, &ds.url, form.clone()))
                .await
                .unwrap_or(Err(CallError::Timeout(budget.as_millis() as u64)));
        match answer {
            Err(CallError::Transport(e)) if attempt < ds.retries => {
                attempt += 1;
                let pause = backoff(attempt);
                if Instant::now() + pause >= deadline {
                    break Err(CallError::Transport(e));
                }
                tracing::debug!(server = %ds.name, attempt, error = %e, "retrying after transport failure");
                tokio::time::sleep(pause).await;
            }
            other => break other,
        }
    };
    let elapsed = started.elapsed();
    let answer = result.and_then(|raw| client::read_answer(&raw, &ds.verifier, Some(request_id)));
    match answer {
        Err(e) => Verdict::new(ds, Outcome::from(&e), elapsed, e.to_string()),
        Ok(resp) if resp.status == 0 && (is_ping || resp.action == "APPROVE") => {
            Verdict::new(ds, Outcome::Approved, elapsed, String::new())
        }
        Ok(resp) if resp.status == 0 && resp.action == "REJECT" => {
            Verdict::new(ds, Outcome::Rejected, elapsed, resp.error)
        }
        Ok(resp) if resp.status != 0 => Verdict::new(
            ds,
            Outcome::ErrorStatus,
            elapsed,
            format!(
                "error_status: status {} {}: {}",
                resp.status,
                client::snippet(&resp.action),
                client::snippet(&resp.error)
            ),
        ),
        Ok(resp) if resp.action.is_empty() => Verdict::new(
            ds,
            Outcome::BadResponse,
            elapsed,
            "bad_response: status 0 without action".into(),
        ),
        Ok(resp) => Verdict::new(
            ds,
            Outcome::BadResponse,
            elapsed,
            format!(
                "bad_response: unknown action {:?}",
                client::snippet(&resp.action)
            ),
        ),
    }
}

fn record(metrics: &Metrics, v: &Verdict) {
    metrics
        .downstream_requests
        .with_label_values(&[&v.server, v.outcome.as_str()])
        .inc();
    if v.outcome != Outcome::Cancelled {
        metrics
            .downstream_duration
            .with_label_values(&[&v.server])
            .observe(v.duration.as_secs_f64());
    }
}

/// Sends `token` to every server in `servers` at once. Returns the enforcing verdicts (in the
/// order they finished, cancelled ones last) and the shadow slots.
pub async fn fan_out<'a>(
    servers: impl Iterator<Item = &'a Arc<Downstream>>,
    form: Bytes,
    request_id: Arc<str>,
    is_ping: bool,
    deadline: Instant,
    metrics: &Metrics,
) -> (Vec<Verdict>, Vec<ShadowSlot>) {
    let mut pending = FuturesUnordered::new();
    let mut enforcing = Vec::new();
    let mut shadows = Vec::new();
    for ds in servers {
        match ds.mode {
            Mode::Shadow => {
                let slot = Arc::new(OnceLock::new());
                shadows.push((ds.clone(), slot.clone()));
                let (ds, form, id, metrics) = (
                    ds.clone(),
                    form.clone(),
                    request_id.clone(),
                    metrics.clone(),
                );
                tokio::spawn(async move {
                    let v = call(&ds, &metrics, &form, &id, is_ping, deadline).await;
                    record(&metrics, &v);
                    tracing::info!(request_id = %client::snippet(&id), server = %v.server, outcome = v.outcome.as_str(), duration_ms = v.duration.as_millis() as u64, "shadow verdict");
                    let _ = slot.set(v);
                });
            }
            Mode::Enforce => {
                let index = enforcing.len();
                enforcing.push(ds.clone());
                let (form, id) = (form.clone(), request_id.clone());
                let ds = ds.clone();
                pending.push(async move {
                    (
                        index,
                        call(&ds, metrics, &form, &id, is_ping, deadline).await,
                    )
                });
            }
        }
    }

    let mut done = vec![false; enforcing.len()];
    let mut verdicts = Vec::with_capacity(enforcing.len());
    while let Some((index, verdict)) = pending.next().await {
        done[index] = true;
        record(metrics, &verdict);
        let rejected = verdict.outcome == Outcome::Rejected;
        verdicts.push(verdict);
        if rejected {
            break;
        }
    }
    // Dropping `pending` cancels the calls still running.
    drop(pending);
    for (ds, _) in enforcing.iter().zip(&done).filter(|(_, &d)| !d) {
        let v = Verdict::new(
            ds,
            Outcome::Cancelled,
            Duration::ZERO,
            "cancelled: another server rejected".into(),
        );
        record(metrics, &v);
        verdicts.push(v);
    }
    (verdicts, shadows)
}

/// The shadow verdicts as they stand now; calls still running show as `pending`.
pub fn shadow_snapshot(shadows: &[ShadowSlot]) -> Vec<Verdict> {
    shadows
        .iter()
        .map(|(ds, slot)| {
            slot.get().cloned().unwrap_or_else(|| {
                Verdict::new(ds, Outcome::Pending, Duration::ZERO, String::new())
            })
        })
        .collect()
}
