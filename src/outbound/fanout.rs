//! All calls for one request become the verdict list the decision is made from.
//!
//! Guarantees: every enforcing call is bounded by its own `timeout_ms` per attempt and by the
//! request's deadline overall (see [`super::call`]); the first enforcing rejection ends the wait
//! and cancels the rest; shadow calls run detached and never delay or change the answer; a
//! server has at most its shadow cap of shadow calls in flight (`max_concurrent` if set, else
//! `max_in_flight`), and a shadow call beyond it is skipped at once (counted `skipped`), never
//! waited for, so a shadow server that hangs holds a bounded number of connections. A shadow
//! verdict that arrives after the answer is handed on through its [`ShadowSlot`] (to the audit
//! log, as a `shadow` record of its own).

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};

use super::call::call;
use super::client;
use super::Outbound;
use crate::config::Mode;
use crate::generation::Downstream;
use crate::ops::metrics::Metrics;
use crate::verdict::{Outcome, ShadowSlot, Verdict};

/// A shadow call: its server and the slot its verdict lands in whenever it finishes.
pub(crate) type ShadowCall = (Arc<Downstream>, Arc<ShadowSlot>);

/// Sends `out` to every server in `servers` at once. Returns the enforcing verdicts (in the
/// order they finished, cancelled ones last) and the shadow slots. A shadow server without
/// `max_concurrent` has at most `max_in_flight` shadow calls in flight.
pub(crate) async fn fan_out<'a>(
    servers: impl Iterator<Item = &'a Arc<Downstream>>,
    out: &Outbound,
    metrics: &Metrics,
    max_in_flight: usize,
) -> (Vec<Verdict>, Vec<ShadowCall>) {
    let mut pending = FuturesUnordered::new();
    let mut enforcing = Vec::new();
    let mut shadows = Vec::new();
    for ds in servers {
        match ds.mode {
            Mode::Shadow => shadows.push(spawn_shadow(
                ds.clone(),
                out.clone(),
                metrics.clone(),
                shadow_cap(ds, max_in_flight),
            )),
            Mode::Enforce => {
                let index = enforcing.len();
                enforcing.push(ds.clone());
                let ds = ds.clone();
                pending.push(async move { (index, call(&ds, metrics, out).await) });
            }
        }
    }

    let mut done = vec![false; enforcing.len()];
    let mut verdicts = Vec::with_capacity(enforcing.len());
    while let Some((index, verdict)) = pending.next().await {
        done[index] = true;
        metrics.record_call(&verdict);
        let rejected = verdict.outcome == Outcome::Rejected;
        verdicts.push(verdict);
        if rejected {
            break;
        }
    }
    // Dropping `pending` cancels the calls still running.
    drop(pending);
    for (ds, _) in enforcing.iter().zip(&done).filter(|(_, &d)| !d) {
        let v = ds.verdict(
            Outcome::Cancelled,
            Duration::ZERO,
            "cancelled: another server rejected".into(),
        );
        metrics.record_call(&v);
        verdicts.push(v);
    }
    (verdicts, shadows)
}

/// Shadow calls one server may have in flight: `max_concurrent` if set, else `max_in_flight`.
pub(crate) fn shadow_cap(ds: &Downstream, max_in_flight: usize) -> usize {
    match ds.config.max_concurrent {
        0 => max_in_flight,
        n => n,
    }
}

/// Calls a shadow server in a task of its own; its verdict lands in the returned slot. Beyond
/// `cap` shadow calls in flight to it, the call is skipped and the slot filled at once.
fn spawn_shadow(ds: Arc<Downstream>, out: Outbound, metrics: Metrics, cap: usize) -> ShadowCall {
    let slot = Arc::new(ShadowSlot::default());
    let Some(place) = ds.shadows.try_admit(cap) else {
        let v = ds.verdict(
            Outcome::Skipped,
            Duration::ZERO,
            format!("skipped: {cap} shadow calls to this server in flight"),
        );
        metrics.record_call(&v);
        slot.finish(v);
        return (ds, slot);
    };
    let filled = slot.clone();
    let server = ds.clone();
    tokio::spawn(async move {
        let _place = place;
        let v = call(&server, &metrics, &out).await;
        metrics.record_call(&v);
        tracing::info!(
            request_id = %client::snippet(&out.request_id),
            server = %v.server,
            outcome = v.outcome.as_str(),
            duration_ms = v.duration.as_millis() as u64,
            trace_id = crate::ops::traces::trace_id(&out.span).map(tracing::field::display),
            "shadow verdict"
        );
        filled.finish(v);
    });
    (ds, slot)
}

/// The shadow verdicts as they stand now, for the answer: calls still running show as
/// `pending`, and their slots are returned, to be released once the answer's record is out.
pub(crate) fn shadow_snapshot(shadows: Vec<ShadowCall>) -> (Vec<Verdict>, Vec<Arc<ShadowSlot>>) {
    let mut verdicts = Vec::with_capacity(shadows.len());
    let mut late = Vec::new();
    for (ds, slot) in shadows {
        match slot.take() {
            Some(v) => verdicts.push(v),
            None => {
                verdicts.push(ds.verdict(Outcome::Pending, Duration::ZERO, String::new()));
                late.push(slot);
            }
        }
    }
    (verdicts, late)
}
