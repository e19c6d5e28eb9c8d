//! All calls for one request become the verdict list the decision is made from.
//!
//! Guarantees: every enforcing call is bounded by its own `timeout_ms` per attempt and by the
//! request's deadline overall (see [`super::call`]); the first enforcing rejection ends the wait
//! and cancels the rest; shadow calls run detached and never delay or change the answer.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};

use super::call::call;
use super::client;
use super::Outbound;
use crate::config::Mode;
use crate::generation::Downstream;
use crate::ops::metrics::Metrics;
use crate::verdict::{Outcome, Verdict};

/// A shadow call's verdict, filled in whenever it finishes.
pub(crate) type ShadowSlot = (Arc<Downstream>, Arc<OnceLock<Verdict>>);

/// Sends `out` to every server in `servers` at once. Returns the enforcing verdicts (in the
/// order they finished, cancelled ones last) and the shadow slots.
pub(crate) async fn fan_out<'a>(
    servers: impl Iterator<Item = &'a Arc<Downstream>>,
    out: &Outbound,
    metrics: &Metrics,
) -> (Vec<Verdict>, Vec<ShadowSlot>) {
    let mut pending = FuturesUnordered::new();
    let mut enforcing = Vec::new();
    let mut shadows = Vec::new();
    for ds in servers {
        match ds.mode {
            Mode::Shadow => shadows.push(spawn_shadow(ds.clone(), out.clone(), metrics.clone())),
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

/// Calls a shadow server in a task of its own; its verdict lands in the returned slot.
fn spawn_shadow(ds: Arc<Downstream>, out: Outbound, metrics: Metrics) -> ShadowSlot {
    let slot = Arc::new(OnceLock::new());
    let filled = slot.clone();
    let server = ds.clone();
    tokio::spawn(async move {
        let v = call(&server, &metrics, &out).await;
        metrics.record_call(&v);
        tracing::info!(request_id = %client::snippet(&out.request_id), server = %v.server, outcome = v.outcome.as_str(), duration_ms = v.duration.as_millis() as u64, "shadow verdict");
        let _ = filled.set(v);
    });
    (ds, slot)
}

/// The shadow verdicts as they stand now; calls still running show as `pending`.
pub(crate) fn shadow_snapshot(shadows: &[ShadowSlot]) -> Vec<Verdict> {
    shadows
        .iter()
        .map(|(ds, slot)| {
            slot.get()
                .cloned()
                .unwrap_or_else(|| ds.verdict(Outcome::Pending, Duration::ZERO, String::new()))
        })
        .collect()
}
