//! One call to one server becomes a [`Verdict`].
//!
//! Guarantees: the call is bounded by the server's `timeout_ms` per attempt and by the request's
//! deadline overall, waiting for a `max_concurrent` slot included; only transport failures are
//! retried; an answer counts only if it is signed by the server's key and names this request.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::Instrument;

use super::client::{self, CallError, RawAnswer};
use super::Outbound;
use crate::generation::Downstream;
use crate::ops::metrics::Metrics;
use crate::ops::traces::TARGET as TRACES;
use crate::protocol::CallbackResponse;
use crate::verdict::{Outcome, Verdict};

/// Backoff before retry `n` (1-based) after a transport failure.
fn backoff(n: u32) -> Duration {
    Duration::from_millis(50u64.saturating_mul(1 << n.min(6)) / 2)
}

/// Calls one server: first a free slot if it has `max_concurrent` (waited for until the
/// deadline: never getting one is a timeout), then attempts bounded by `timeout_ms` and the
/// deadline, retrying transport failures only. The slot is held until the call ends.
pub(crate) async fn call(ds: &Downstream, metrics: &Metrics, out: &Outbound) -> Verdict {
    let _slot = match &ds.slots {
        None => None,
        Some(slots) => {
            let waiting = Instant::now();
            let slot = slots.acquire(out.deadline).await;
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
                return ds.verdict(Outcome::Timeout, waited, detail);
            }
            slot
        }
    };
    let started = Instant::now();
    let (result, attempt) = post_with_retries(ds, out).await;
    let elapsed = started.elapsed();
    let read = result.and_then(|raw| {
        client::read_answer(&raw, &ds.verifier, Some(&out.request_id)).inspect_err(|e| {
            if matches!(e, CallError::Http(_) | CallError::BadResponse(_)) {
                log_answer(ds, &raw, &out.span);
            }
        })
    });
    let verdict = match read {
        Err(e) => ds.verdict(Outcome::from(&e), elapsed, e.to_string()),
        Ok(resp) => judge(ds, resp, elapsed, out.is_ping()),
    };
    if let Some(attempt) = attempt {
        attempt.finish(verdict.outcome);
    }
    verdict
}

/// One attempt's span (a child of the callback's): `server`, `attempt` (1 = first), `retry`,
/// `http.version`, `outcome`. An attempt dropped before it finished (another server rejected,
/// or the node hung up) ends with `outcome` `cancelled`.
struct Attempt {
    span: tracing::Span,
    finished: bool,
}

// === impl Attempt ===

impl Attempt {
    fn start(ds: &Downstream, out: &Outbound, n: u32) -> Attempt {
        let span = if out.span.is_disabled() {
            tracing::Span::none()
        } else {
            tracing::info_span!(
                target: TRACES,
                parent: &out.span,
                "downstream_call",
                otel.kind = "client",
                server = %ds.name,
                mode = ds.mode.as_str(),
                attempt = i64::from(n) + 1,
                retry = n > 0,
                http.version = tracing::field::Empty,
                outcome = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            )
        };
        Attempt {
            span,
            finished: false,
        }
    }

    /// Records how the attempt ended; any outcome but `approved` marks the span an error.
    fn finish(mut self, outcome: Outcome) {
        self.finished = true;
        if self.span.is_disabled() {
            return;
        }
        self.span.record("outcome", outcome.as_str());
        if !matches!(outcome, Outcome::Approved | Outcome::Cancelled) {
            self.span.record("otel.status_code", "ERROR");
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.finished && !self.span.is_disabled() {
            self.span.record("outcome", Outcome::Cancelled.as_str());
        }
    }
}

/// Logs what a server answered instead of a usable token (its body is kept out of answers and
/// the audit log), with the likely fix: at most once a minute per server, so a broken server
/// does not flood the log.
fn log_answer(ds: &Downstream, raw: &RawAnswer, span: &tracing::Span) {
    static LAST: std::sync::Mutex<Option<HashMap<Arc<str>, Instant>>> = std::sync::Mutex::new(None);
    {
        let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
        let last = last.get_or_insert_with(HashMap::new);
        let now = Instant::now();
        if last
            .get(&ds.name)
            .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(60))
        {
            return;
        }
        last.insert(ds.name.clone(), now);
    }
    let hint = client::http_hint(raw.status, &ds.url).unwrap_or_default();
    tracing::warn!(
        server = %ds.name,
        http_status = raw.status,
        hint = %hint,
        body = %client::body_excerpt(&raw.body),
        trace_id = crate::ops::traces::trace_id(span).map(tracing::field::display),
        "downstream answered without a usable signed token (logged at most once a minute per server)"
    );
}

/// Posts the form until an attempt gets an answer, a failure that is not a transport failure,
/// the retries run out, or the deadline would pass during the next backoff. The last attempt's
/// span is returned open, for the verdict.
async fn post_with_retries(
    ds: &Downstream,
    out: &Outbound,
) -> (Result<RawAnswer, CallError>, Option<Attempt>) {
    let mut attempt = 0;
    loop {
        let now = Instant::now();
        let budget = ds.timeout.min(out.deadline.saturating_duration_since(now));
        if budget.is_zero() {
            return (Err(CallError::Timeout(ds.timeout.as_millis() as u64)), None);
        }
        let traced = Attempt::start(ds, out, attempt);
        let post = client::post_form(&ds.client, &ds.url, out.form.clone())
            .instrument(traced.span.clone());
        let answer = tokio::time::timeout(budget, post)
            .await
            .unwrap_or(Err(CallError::Timeout(budget.as_millis() as u64)));
        match answer {
            Err(CallError::Transport(e)) if attempt < ds.retries => {
                traced.finish(Outcome::TransportError);
                attempt += 1;
                let pause = backoff(attempt);
                if Instant::now() + pause >= out.deadline {
                    return (Err(CallError::Transport(e)), None);
                }
                tracing::debug!(server = %ds.name, attempt, error = %e, "retrying after transport failure");
                tokio::time::sleep(pause).await;
            }
            other => return (other, Some(traced)),
        }
    }
}

/// The verdict a verified answer amounts to.
fn judge(ds: &Downstream, resp: CallbackResponse, elapsed: Duration, is_ping: bool) -> Verdict {
    match resp {
        resp if resp.status == 0 && (is_ping || resp.action == "APPROVE") => {
            ds.verdict(Outcome::Approved, elapsed, String::new())
        }
        resp if resp.status == 0 && resp.action == "REJECT" => {
            ds.verdict(Outcome::Rejected, elapsed, resp.error)
        }
        resp if resp.status != 0 => ds.verdict(
            Outcome::ErrorStatus,
            elapsed,
            format!(
                "error_status: status {} {}: {}",
                resp.status,
                client::snippet(&resp.action),
                client::snippet(&resp.error)
            ),
        ),
        resp if resp.action.is_empty() => ds.verdict(
            Outcome::BadResponse,
            elapsed,
            "bad_response: status 0 without action".into(),
        ),
        resp => ds.verdict(
            Outcome::BadResponse,
            elapsed,
            format!(
                "bad_response: unknown action {:?}",
                client::snippet(&resp.action)
            ),
        ),
    }
}

// === impl Downstream ===

impl Downstream {
    /// This server's verdict (its `detail` capped, see [`Verdict::new`]).
    pub(crate) fn verdict(&self, outcome: Outcome, duration: Duration, detail: String) -> Verdict {
        Verdict::new(self.name.clone(), self.mode, outcome, duration, detail)
    }
}
