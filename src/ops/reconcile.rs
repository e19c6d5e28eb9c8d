//! Reconciliation of what the node executed with what the gateway approved, as events arrive.
//!
//! - `request.<kind>.succeeded` for a request_id with no approval in the index (of any replica
//!   sharing the store) is the alarm `unapproved_execution`: a task ran without the callback's
//!   consent (a misconfigured or tampered node, or its key holder bypassing the callback). It is
//!   an `alarm` audit record, an ERROR log line, `tss_gateway_unapproved_executions_total`, a
//!   row in the alarms table and an entry of `/readyz` `alarms` for 24 hours. Readiness stays
//!   true: refusing to approve would not undo the execution, and would stop the good ones.
//! - `request.<kind>.failed` for an approved request is audited (`approved_then_failed`) and
//!   counted (`tss_gateway_approved_then_failed_total`): approved work that did not happen.
//! - Anything else (ping, created, updated, unknown types) counts nothing.
//!
//! The lookup cannot race the approval: an approval enters the index before its answer is
//! sent, and the node executes only after the answer.

use std::sync::Arc;

use crate::generation::Generation;
use crate::ops::audit::{Alarm as AlarmBody, AlarmRecord};
use crate::outbound::client;
use crate::protocol::event::{Event, Stage};
use crate::state::alarms::{rfc3339, Alarm};
use crate::state::now_ms;
use crate::Shared;

/// `kind` of the alarm for an execution nobody approved.
pub const UNAPPROVED_EXECUTION: &str = "unapproved_execution";
/// `kind` of the record for an approved request that failed.
pub const APPROVED_THEN_FAILED: &str = "approved_then_failed";

/// What reconciling one event needs from the approvals index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// Nothing to reconcile (ping, created, updated, unknown types).
    None,
    /// A succeeded or failed event: was it approved?
    Lookup(Stage),
}

/// Whether `event` needs the approvals index.
pub(crate) fn check_for(event: &Event) -> Check {
    match event.request_stage() {
        Some((_, s @ (Stage::Succeeded | Stage::Failed))) => Check::Lookup(s),
        _ => Check::None,
    }
}

/// Raises what `event` (recorded for the first time) shows, given whether its request was
/// approved.
pub(crate) async fn reconcile(shared: &Shared, g: &Arc<Generation>, event: &Event, approved: bool) {
    let Some((kind, stage)) = event.request_stage() else {
        return;
    };
    let request_id = event.request_id.as_deref().unwrap_or_default();
    let alarm_kind = match (stage, approved) {
        (Stage::Succeeded, false) => UNAPPROVED_EXECUTION,
        (Stage::Failed, true) => APPROVED_THEN_FAILED,
        _ => return,
    };
    if alarm_kind == UNAPPROVED_EXECUTION {
        shared
            .metrics
            .unapproved_executions
            .with_label_values(&[kind.name()])
            .inc();
        tracing::error!(
            alarm = UNAPPROVED_EXECUTION,
            request_id = %client::snippet(request_id),
            event_id = %client::snippet(&event.event_id),
            event_type = %client::snippet(&event.event_type),
            node_id = %client::snippet(&event.node_id),
            "ALARM: the TSS Node executed a request that no gateway replica approved"
        );
    } else {
        shared
            .metrics
            .approved_then_failed
            .with_label_values(&[kind.name()])
            .inc();
        tracing::warn!(
            request_id = %client::snippet(request_id),
            event_id = %client::snippet(&event.event_id),
            "an approved request failed on the TSS Node"
        );
    }
    if let Some(audit) = shared.audit.load_full() {
        let record = AlarmRecord {
            ts: crate::ops::audit::now_rfc3339(),
            alarm: AlarmBody {
                kind: alarm_kind,
                request_id,
                event_id: &event.event_id,
                event_type: &event.event_type,
                node_id: &event.node_id,
            },
        };
        if let Ok(body) = serde_json::to_vec(&record) {
            audit.record(g, body);
        }
    }
    if alarm_kind != UNAPPROVED_EXECUTION {
        return;
    }
    let Some(store) = &shared.store else {
        return;
    };
    let ts_ms = now_ms();
    let alarm = Alarm {
        kind: alarm_kind.to_owned(),
        request_id: request_id.to_owned(),
        event_id: event.event_id.clone(),
        ts: rfc3339(ts_ms),
        ts_ms,
        event_type: event.event_type.clone(),
        node_id: event.node_id.clone(),
    };
    if let Err(e) = store.raise(&alarm).await {
        tracing::error!(error = %e, "the alarm could not be stored: /readyz will not list it (the audit log and the counter have it)");
    }
}
