//! The TSS Node's events (contract section 1): the `TSSEvent` the gateway reads from a verified
//! token, and the event type names it knows. Like a CallbackRequest, an event is forwarded as the
//! node's exact bytes; nothing here is ever re-serialized toward an event server.

use serde::Deserialize;

use super::RequestType;

/// Request kinds as event types spell them (`request.<kind>.<stage>`), with their task type.
const KINDS: [(&str, RequestType); 4] = [
    ("keygen", RequestType::KeyGen),
    ("keysign", RequestType::KeySign),
    ("keyreshare", RequestType::KeyReshare),
    ("keysharesign", RequestType::KeyShareSign),
];

/// The stages of a request's life.
const STAGES: [&str; 4] = ["created", "updated", "failed", "succeeded"];

/// Longest `event_id` accepted (it is a primary key and an audit field).
pub const MAX_EVENT_ID_BYTES: usize = 256;

/// What a TSSEvent says, as far as the gateway reads it.
#[derive(Debug, Clone)]
pub struct Event {
    pub event_id: String,
    pub event_type: String,
    pub node_id: String,
    pub created_timestamp: Option<i64>,
    /// `data.request_id`: present for every `request.*` event.
    pub request_id: Option<String>,
    /// `data.request_type`.
    pub request_type: Option<i64>,
}

/// Why a verified payload is not a TSSEvent (HTTP 400).
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("payload is not a TSSEvent JSON object: {0}")]
    Json(String),
    #[error("TSSEvent field `{0}` is missing or empty")]
    Missing(&'static str),
    #[error("TSSEvent field `event_id` is longer than {MAX_EVENT_ID_BYTES} bytes")]
    LongId,
}

/// The stage of a request an event reports, for reconciliation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Created,
    Updated,
    Failed,
    Succeeded,
}

#[derive(Deserialize)]
struct Wire {
    #[serde(default)]
    event_id: Option<String>,
    #[serde(default)]
    created_timestamp: Option<i64>,
    #[serde(default)]
    node_id: Option<String>,
    #[serde(default)]
    event_type: Option<String>,
    #[serde(default)]
    data: Option<WireData>,
}

#[derive(Deserialize)]
struct WireData {
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    request_type: Option<i64>,
}

// === impl Event ===

impl Event {
    /// Parses the node's payload bytes: an object with `event_id` and `event_type`, and for a
    /// `request.*` type a `data` object naming its `request_id`.
    pub fn parse(bytes: &[u8]) -> Result<Event, EventError> {
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(EventError::Json("not a JSON object".into()));
        }
        let w: Wire = serde_json::from_slice(bytes).map_err(|e| EventError::Json(e.to_string()))?;
        let non_empty = |v: Option<String>, name| v.filter(|s| !s.is_empty()).ok_or(name);
        let event_id = non_empty(w.event_id, "event_id").map_err(EventError::Missing)?;
        if event_id.len() > MAX_EVENT_ID_BYTES {
            return Err(EventError::LongId);
        }
        let event_type = non_empty(w.event_type, "event_type").map_err(EventError::Missing)?;
        let (request_id, request_type) = match w.data {
            Some(d) => (d.request_id.filter(|s| !s.is_empty()), d.request_type),
            None => (None, None),
        };
        if event_type.starts_with("request.") && request_id.is_none() {
            return Err(EventError::Missing("data.request_id"));
        }
        if request_id
            .as_ref()
            .is_some_and(|id| id.len() > super::MAX_REQUEST_ID_BYTES)
        {
            return Err(EventError::Json("data.request_id is too long".into()));
        }
        Ok(Event {
            event_id,
            event_type,
            node_id: w.node_id.unwrap_or_default(),
            created_timestamp: w.created_timestamp,
            request_id,
            request_type,
        })
    }

    /// The task type and stage of a `request.<kind>.<stage>` event this gateway knows.
    pub fn request_stage(&self) -> Option<(RequestType, Stage)> {
        request_stage(&self.event_type)
    }
}

/// The task type and stage of a known `request.<kind>.<stage>` type.
pub fn request_stage(event_type: &str) -> Option<(RequestType, Stage)> {
    let rest = event_type.strip_prefix("request.")?;
    let (kind, stage) = rest.split_once('.')?;
    let t = KINDS.iter().find(|(k, _)| *k == kind)?.1;
    let stage = match stage {
        "created" => Stage::Created,
        "updated" => Stage::Updated,
        "failed" => Stage::Failed,
        "succeeded" => Stage::Succeeded,
        _ => return None,
    };
    Some((t, stage))
}

/// `request.<kind>.<stage>` for a task type (`None` for Ping, which has no request events).
pub fn request_event_type(t: RequestType, stage: &str) -> Option<String> {
    KINDS
        .iter()
        .find(|(_, k)| *k == t)
        .map(|(word, _)| format!("request.{word}.{stage}"))
}

/// Every event type this gateway knows: `ping` and the sixteen `request.<kind>.<stage>`.
pub fn known_types() -> Vec<String> {
    let mut all = vec!["ping".to_owned()];
    for (kind, _) in KINDS {
        for stage in STAGES {
            all.push(format!("request.{kind}.{stage}"));
        }
    }
    all
}

/// Whether `t` is a type this gateway knows.
pub fn is_known(t: &str) -> bool {
    t == "ping" || request_stage(t).is_some()
}

/// Whether `t` could be an event type: `ping`, or `request.<word>.<word>` in `[a-z0-9_]` (a
/// type Cobo may add later). A filter naming anything else is refused.
pub fn is_event_type_shaped(t: &str) -> bool {
    let word = |w: &str| {
        !w.is_empty()
            && w.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    t == "ping"
        || t.strip_prefix("request.")
            .and_then(|r| r.split_once('.'))
            .is_some_and(|(k, s)| word(k) && word(s))
}

/// The `type` label of `tss_gateway_events_total`: the event type when known, else `other`
/// (bounded: a node cannot create series at will).
pub fn type_label(t: &str) -> &str {
    if is_known(t) {
        t
    } else {
        "other"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_tss_event() {
        let e = Event::parse(br#"{"event_id":"e1","created_timestamp":1700000000000,"node_id":"n1","event_type":"request.keysign.succeeded","data":{"data_type":"KeySign","request_id":"r1","request_type":2,"request_status":"Succeeded"}}"#).unwrap();
        assert_eq!((e.event_id.as_str(), e.node_id.as_str()), ("e1", "n1"));
        assert_eq!(e.request_id.as_deref(), Some("r1"));
        assert_eq!(
            e.request_stage(),
            Some((RequestType::KeySign, Stage::Succeeded))
        );
        let ping = Event::parse(br#"{"event_id":"p","event_type":"ping"}"#).unwrap();
        assert_eq!(ping.request_stage(), None);
    }

    #[test]
    fn refuses_what_is_not_a_tss_event() {
        for bad in [
            &br#"{"request_id":"r","request_type":2}"#[..],
            br#"{"event_id":"","event_type":"ping"}"#,
            br#"{"event_id":"e","event_type":"request.keysign.succeeded"}"#,
            br#"{"event_id":"e","event_type":"request.keysign.succeeded","data":{"request_id":""}}"#,
            br#"["e","ping"]"#,
            br#"{"event_id":5,"event_type":"ping"}"#,
            b"not json",
        ] {
            assert!(
                Event::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn types_known_shaped_and_labelled() {
        assert_eq!(known_types().len(), 17);
        assert!(is_known("request.keysharesign.failed") && is_known("ping"));
        assert!(!is_known("request.keysign.archived"));
        assert!(is_event_type_shaped("request.keysign.archived"));
        for bad in [
            "keysign",
            "request.keysign",
            "request..x",
            "Request.A.B",
            "pong",
        ] {
            assert!(!is_event_type_shaped(bad), "{bad}");
        }
        assert_eq!(type_label("request.wallet.created"), "other");
        assert_eq!(type_label("ping"), "ping");
    }
}
