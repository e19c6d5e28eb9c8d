//! What the chain holds, as data: decision records, checkpoints and the other kinds of line
//! (`config`, `refused`, `shadow`, `event`, `alarm`, `event_dropped`). Each serializes to one JSON object; the writer adds `seq` and
//! `prev`.

use serde::Serialize;

use crate::verdict::{Embedded, Verdict};

/// One answered request.
#[derive(Debug, Serialize)]
pub(crate) struct AuditRecord<'a> {
    /// RFC 3339 UTC with milliseconds.
    pub(crate) ts: String,
    pub(crate) request_id: &'a str,
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
    pub(crate) status: i64,
    pub(crate) action: &'static str,
    pub(crate) error: &'a str,
    pub(crate) duration_ms: f64,
    /// `off`, `pass`, `reject: <rule>`, or `not_evaluated` (the token or payload was refused).
    pub(crate) embedded: &'a Embedded,
    pub(crate) servers: &'a [Verdict],
    pub(crate) config_generation: u64,
    /// Present (true) only for a TSS Node retry answered from its twin's evaluation.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) duplicate: bool,
    /// The verified CallbackRequest, with `audit_payloads: true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) request: Option<&'a serde_json::Value>,
}

/// Why a checkpoint was written (its `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seal {
    /// `audit_checkpoint_every` records since the last one.
    Interval,
    /// The gateway is stopping.
    Shutdown,
    /// The file was renamed or deleted: this checkpoint closes the old file.
    Rotation,
    /// No request is being decided any more (at most one per `audit_checkpoint_ms`).
    Idle,
    /// `audit_checkpoint_ms` since the first unsealed record, under steady load.
    Elapsed,
    /// A reload pointed `audit_log` elsewhere: this checkpoint closes this file.
    Reconfigured,
    /// The gateway started: its saved head (`.head`) becomes this line.
    Start,
    /// The file at the path was not the gateway's own chain: it was set aside (`found`).
    Discontinuity,
}

/// What a `discontinuity` checkpoint found at the path and set aside.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Found {
    /// Where the file was moved: `<audit_log>.discontinuity-<UTC time>`.
    pub(crate) file: String,
    /// `seq` of its last line that has one (0 if none).
    pub(crate) last_seq: u64,
    /// Lines after its last checkpoint.
    pub(crate) unsealed_lines: u64,
}

/// The `checkpoint` object of a checkpoint record.
#[derive(Debug, Serialize)]
pub(crate) struct Checkpoint<'a> {
    pub(crate) reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) found: Option<&'a Found>,
    /// Lowercase hex SHA-256 of the signing key's SPKI DER.
    pub(crate) key_id: &'a str,
    /// Standard base64 of the signing key's SPKI DER.
    pub(crate) public_key: &'a str,
    /// Standard base64 RS256 signature of [`super::checkpoint_message`].
    pub(crate) signature: &'a str,
}

#[derive(Serialize)]
pub(crate) struct CheckpointRecord<'a> {
    pub(crate) ts: &'a str,
    pub(crate) checkpoint: Checkpoint<'a>,
}

/// One server of a `config` record.
#[derive(Debug, Serialize)]
pub(crate) struct ServerSummary {
    pub(crate) name: String,
    pub(crate) mode: &'static str,
    pub(crate) request_types: Vec<&'static str>,
}

/// One event server of a `config` record.
#[derive(Debug, Serialize)]
pub(crate) struct EventServerSummary {
    pub(crate) name: String,
    /// `None` (null): every type.
    pub(crate) event_types: Option<Vec<String>>,
}

/// A loaded config generation (at start-up and at every reload).
#[derive(Debug, Serialize)]
pub(crate) struct ConfigSummary {
    pub(crate) generation: u64,
    /// Lowercase hex SHA-256 of the config file's bytes as loaded.
    pub(crate) sha256: String,
    pub(crate) reason: String,
    pub(crate) servers: Vec<ServerSummary>,
    pub(crate) event_servers: Vec<EventServerSummary>,
    pub(crate) added: Vec<String>,
    pub(crate) removed: Vec<String>,
    pub(crate) changed: Vec<String>,
}

#[derive(Serialize)]
pub(crate) struct ConfigRecord<'a> {
    pub(crate) ts: String,
    pub(crate) config: &'a ConfigSummary,
}

/// Status-20 refusals beyond the per-second rate, summed up once a second.
#[derive(Debug, Serialize)]
pub(crate) struct Refused {
    pub(crate) count: u64,
    pub(crate) status: i64,
    /// When the first refusal summed up here arrived.
    pub(crate) since: String,
    /// Peer addresses are not known to the writer; kept for the agreed format.
    pub(crate) peers: Vec<String>,
}

#[derive(Serialize)]
pub(crate) struct RefusedRecord<'a> {
    pub(crate) ts: String,
    pub(crate) refused: &'a Refused,
}

/// A shadow server's verdict that arrived after the answer went out.
#[derive(Debug, Serialize)]
pub(crate) struct Shadow<'a> {
    pub(crate) request_id: &'a str,
    pub(crate) server: &'a str,
    pub(crate) outcome: &'a str,
    pub(crate) duration_ms: f64,
    pub(crate) detail: &'a str,
}

#[derive(Serialize)]
pub(crate) struct ShadowRecord<'a> {
    pub(crate) ts: String,
    pub(crate) shadow: Shadow<'a>,
}

// === impl Seal ===

impl Seal {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Seal::Interval => "interval",
            Seal::Shutdown => "shutdown",
            Seal::Rotation => "rotation",
            Seal::Idle => "idle",
            Seal::Elapsed => "elapsed",
            Seal::Reconfigured => "reconfigured",
            Seal::Start => "start",
            Seal::Discontinuity => "discontinuity",
        }
    }
}

/// A verified TSS Node event (`event` record).
#[derive(Debug, Serialize)]
pub(crate) struct EventSeen<'a> {
    pub(crate) event_id: &'a str,
    pub(crate) event_type: &'a str,
    pub(crate) node_id: &'a str,
    pub(crate) request_id: Option<&'a str>,
    pub(crate) request_type: Option<i64>,
    /// Present (true) only for an event already recorded (the node sent it again).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) duplicate: bool,
}

#[derive(Serialize)]
pub(crate) struct EventRecord<'a> {
    pub(crate) ts: String,
    pub(crate) event: EventSeen<'a>,
}

/// What reconciliation found (`alarm` record): `unapproved_execution` or `approved_then_failed`.
#[derive(Debug, Serialize)]
pub(crate) struct Alarm<'a> {
    pub(crate) kind: &'a str,
    pub(crate) request_id: &'a str,
    pub(crate) event_id: &'a str,
    pub(crate) event_type: &'a str,
    pub(crate) node_id: &'a str,
}

#[derive(Serialize)]
pub(crate) struct AlarmRecord<'a> {
    pub(crate) ts: String,
    pub(crate) alarm: Alarm<'a>,
}

/// An event given up for one event server after `event_retry_hours` (`event_dropped` record).
#[derive(Debug, Serialize)]
pub(crate) struct EventDropped<'a> {
    pub(crate) event_id: &'a str,
    pub(crate) server: &'a str,
    pub(crate) attempts: i64,
    pub(crate) error: &'a str,
}

#[derive(Serialize)]
pub(crate) struct EventDroppedRecord<'a> {
    pub(crate) ts: String,
    pub(crate) event_dropped: EventDropped<'a>,
}
