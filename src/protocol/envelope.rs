//! The Cobo callback envelope: CallbackRequest and CallbackResponse, the status codes and the
//! task types. A CallbackRequest is parsed only from verified bytes, and a payload that could read
//! as a CallbackResponse is refused (the gateway re-signs what it forwards).

use serde::{Deserialize, Serialize};

/// The form field a TSS Node posts its token in.
pub(crate) const FORM_FIELD: &str = "TSS_JWT_MSG";

/// Longest `request_id` accepted; Cobo's are UUID-sized.
pub const MAX_REQUEST_ID_BYTES: usize = 1024;

/// The `status` of a CallbackResponse, with Cobo's meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "i64", try_from = "i64")]
pub enum Status {
    Ok,
    InvalidRequest,
    InvalidToken,
    InternalError,
}

/// The `action` of a CallbackResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    #[serde(rename = "APPROVE")]
    Approve,
    #[serde(rename = "REJECT")]
    Reject,
}

/// Cobo's task types (`request_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum RequestType {
    Ping,
    KeyGen,
    KeySign,
    KeyReshare,
    KeyShareSign,
}

/// The fields of a CallbackRequest the gateway reads. The request is forwarded as the node's
/// exact bytes, so nothing here is ever re-serialized.
#[derive(Debug, Clone, Deserialize)]
pub struct CallbackRequest {
    pub request_id: String,
    pub request_type: i64,
    #[serde(default)]
    pub request_detail: Option<String>,
    #[serde(default)]
    pub extra_info: Option<String>,
}

/// A callback server's answer, and the gateway's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallbackResponse {
    pub request_id: String,
    pub status: i64,
    /// Empty when the answer has none: Cobo's v1 Node.js example answers a Ping with status 0
    /// and no `action`, which is healthy for a Ping and a `bad_response` for any other type.
    #[serde(default)]
    pub action: String,
    #[serde(default)]
    pub error: String,
}

/// Why a verified payload is not a CallbackRequest (status 10).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("package_data is not base64: {0}")]
    Base64(String),
    #[error("package_data is not a CallbackRequest: {0}")]
    Json(String),
    #[error("request_id is longer than {MAX_REQUEST_ID_BYTES} bytes")]
    RequestIdTooLong,
    #[error("payload has a top-level {0:?} key: a CallbackRequest carries no status or action")]
    ReservedKey(String),
    #[error("payload has a top-level {0:?} key: it differs from a CallbackRequest field only in letter case")]
    CaseVariantKey(String),
}

// === impl Status ===

impl Status {
    pub fn code(self) -> i64 {
        match self {
            Status::Ok => 0,
            Status::InvalidRequest => 10,
            Status::InvalidToken => 20,
            Status::InternalError => 30,
        }
    }
}

impl From<Status> for i64 {
    fn from(s: Status) -> i64 {
        s.code()
    }
}

impl TryFrom<i64> for Status {
    type Error = String;
    fn try_from(v: i64) -> Result<Self, String> {
        match v {
            0 => Ok(Status::Ok),
            10 => Ok(Status::InvalidRequest),
            20 => Ok(Status::InvalidToken),
            30 => Ok(Status::InternalError),
            other => Err(format!("unknown status {other}")),
        }
    }
}

// === impl Action ===

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Approve => "APPROVE",
            Action::Reject => "REJECT",
        }
    }
}

// === impl RequestType ===

impl RequestType {
    pub const ALL: [RequestType; 5] = [
        RequestType::Ping,
        RequestType::KeyGen,
        RequestType::KeySign,
        RequestType::KeyReshare,
        RequestType::KeyShareSign,
    ];

    /// Maps Cobo's integer `request_type`; `None` for types this gateway does not know.
    pub(crate) fn from_code(code: i64) -> Option<Self> {
        match code {
            0 => Some(RequestType::Ping),
            1 => Some(RequestType::KeyGen),
            2 => Some(RequestType::KeySign),
            3 => Some(RequestType::KeyReshare),
            5 => Some(RequestType::KeyShareSign),
            _ => None,
        }
    }

    pub fn code(self) -> i64 {
        match self {
            RequestType::Ping => 0,
            RequestType::KeyGen => 1,
            RequestType::KeySign => 2,
            RequestType::KeyReshare => 3,
            RequestType::KeyShareSign => 5,
        }
    }

    /// The name used in config, metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            RequestType::Ping => "ping",
            RequestType::KeyGen => "key_gen",
            RequestType::KeySign => "key_sign",
            RequestType::KeyReshare => "key_reshare",
            RequestType::KeyShareSign => "key_share_sign",
        }
    }

    /// Parses a name (`key_sign`) or a code (`2`).
    pub fn parse(text: &str) -> Option<Self> {
        RequestType::ALL
            .into_iter()
            .find(|t| t.name() == text)
            .or_else(|| text.parse().ok().and_then(RequestType::from_code))
    }
}

/// The metrics/log name of a raw `request_type`: `unknown` for codes the gateway does not know.
pub(crate) fn type_name(code: Option<i64>) -> &'static str {
    code.and_then(RequestType::from_code)
        .map_or("unknown", RequestType::name)
}

// === impl CallbackRequest ===

impl CallbackRequest {
    /// Parses the node's payload bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, PayloadError> {
        // serde would also read a JSON array by field order (`["id", 2]`); only an object is a
        // CallbackRequest.
        if bytes.trim_ascii_start().first() != Some(&b'{') {
            return Err(PayloadError::Json("not a JSON object".into()));
        }
        let req: CallbackRequest = serde_json::from_slice(bytes).map_err(|e| {
            PayloadError::Json(field_problem(bytes).unwrap_or_else(|| e.to_string()))
        })?;
        if req.request_id.len() > MAX_REQUEST_ID_BYTES {
            return Err(PayloadError::RequestIdTooLong);
        }
        // The gateway re-signs these bytes for the downstreams. With a `status` or `action` in
        // them, that token would read as a CallbackResponse (a Go client matches field names
        // case-insensitively), so the gateway would be signing approvals on request.
        let keys: TopLevelKeys =
            serde_json::from_slice(bytes).map_err(|e| PayloadError::Json(e.to_string()))?;
        for key in keys.0 {
            if is_response_field(&key) {
                return Err(PayloadError::ReservedKey(key_snippet(&key)));
            }
            // Go's decoder would read `Request_Type` into `request_type` (the last one wins), so
            // a downstream written in Go could see another request than the one checked here.
            let folded = fold(&key);
            if REQUEST_FIELDS.contains(&folded.as_str()) && !REQUEST_FIELDS.contains(&key.as_str())
            {
                return Err(PayloadError::CaseVariantKey(key_snippet(&key)));
            }
        }
        Ok(req)
    }
}

/// The keys of a JSON object, values skipped.
struct TopLevelKeys(Vec<String>);

impl<'de> Deserialize<'de> for TopLevelKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = TopLevelKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<TopLevelKeys, A::Error> {
                let mut keys = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    keys.push(k);
                }
                Ok(TopLevelKeys(keys))
            }
        }
        d.deserialize_map(Keys)
    }
}

/// The fields of a CallbackRequest, as the node spells them.
const REQUEST_FIELDS: [&str; 4] = ["request_id", "request_type", "request_detail", "extra_info"];

/// True for a key Go's `encoding/json` would read into a CallbackResponse's `status` or `action`.
fn is_response_field(key: &str) -> bool {
    let folded = fold(key);
    folded == "status" || folded == "action"
}

/// `key` as Go's `encoding/json` compares names: under Unicode simple case folding, where `ſ`
/// (U+017F) is an `s` and `K` (U+212A, Kelvin) a `k`.
fn fold(key: &str) -> String {
    key.chars()
        .map(|c| match c {
            '\u{017F}' => 's',
            '\u{212A}' => 'k',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

fn key_snippet(text: &str) -> String {
    text.chars().take(32).collect()
}

/// Names the required field that is missing or of the wrong type, for a clearer status-10 error
/// than serde's position-based message.
fn field_problem(bytes: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let obj = v.as_object()?;
    match (obj.get("request_id"), obj.get("request_type")) {
        (None, _) => Some("request_id is missing".into()),
        (Some(id), _) if !id.is_string() => Some("request_id is not a string".into()),
        (_, None) => Some("request_type is missing".into()),
        (_, Some(t)) if !t.is_i64() => Some("request_type is not an integer".into()),
        _ => None,
    }
}

// === impl CallbackResponse ===

impl CallbackResponse {
    pub fn new(request_id: &str, status: Status, action: Action, error: String) -> Self {
        CallbackResponse {
            request_id: request_id.to_owned(),
            status: status.code(),
            action: action.as_str().to_owned(),
            error,
        }
    }

    /// Cobo's definition of an approval.
    pub fn is_approval(&self) -> bool {
        self.status == 0 && self.action == "APPROVE"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_parsing() {
        let ok = CallbackRequest::parse(
            br#"{"request_id":"r","request_type":2,"request_detail":"{}","extra_info":"{}"}"#,
        )
        .unwrap();
        assert_eq!((ok.request_id.as_str(), ok.request_type), ("r", 2));
        for bad in [
            &br#"{"request_type":2}"#[..],
            br#"{"request_id":"r"}"#,
            br#"{"request_id":7,"request_type":2}"#,
            br#"{"request_id":"r","request_type":"2"}"#,
            b"not json",
        ] {
            assert!(
                CallbackRequest::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!(
            r#"{{"request_id":"{}","request_type":0}}"#,
            "x".repeat(2000)
        );
        assert_eq!(
            CallbackRequest::parse(long.as_bytes()).unwrap_err(),
            PayloadError::RequestIdTooLong
        );
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(CallbackRequest::parse(deep.as_bytes()).is_err());
    }

    #[test]
    fn a_payload_with_a_status_or_action_key_is_refused() {
        for key in [
            "status",
            "action",
            "Status",
            "ACTION",
            "aCtIoN",
            "\u{017F}tatus",
            "\\u0073tatus",
        ] {
            let payload = format!(r#"{{"request_id":"r","request_type":2,"{key}":0}}"#);
            assert!(
                matches!(
                    CallbackRequest::parse(payload.as_bytes()),
                    Err(PayloadError::ReservedKey(_))
                ),
                "{payload}"
            );
        }
        for key in ["statuses", "actions", "extra_status", "stat"] {
            let payload = format!(r#"{{"request_id":"r","request_type":2,"{key}":0}}"#);
            assert!(
                CallbackRequest::parse(payload.as_bytes()).is_ok(),
                "{payload}"
            );
        }
        // Nested keys are the request's own business.
        assert!(CallbackRequest::parse(
            br#"{"request_id":"r","request_type":2,"request_detail":"{\"status\":0}","x":{"action":"APPROVE"}}"#
        )
        .is_ok());
    }

    #[test]
    fn a_key_that_is_a_request_field_but_for_letter_case_is_refused() {
        // The last two: a long s (U+017F), and `R` written as a JSON escape.
        for key in [
            "REQUEST_ID",
            "Request_Type",
            "Request_Detail",
            "EXTRA_INFO",
            "reque\u{017F}t_id",
            "\\u0052equest_type",
        ] {
            let payload = format!(r#"{{"request_id":"r","request_type":2,"{key}":"x"}}"#);
            let refused = CallbackRequest::parse(payload.as_bytes());
            assert!(
                matches!(refused, Err(PayloadError::CaseVariantKey(_))),
                "{payload}: {refused:?}"
            );
        }
        let issue = br#"{"request_id":"X","request_type":2,"REQUEST_ID":"other","Request_Type":5,"Request_Detail":"evil"}"#;
        assert!(matches!(
            CallbackRequest::parse(issue),
            Err(PayloadError::CaseVariantKey(_))
        ));
        // The exact names, and other keys, are the request's own.
        assert!(CallbackRequest::parse(
            br#"{"request_id":"r","request_type":2,"request_detail":"{}","extra_info":"{}","requestid":1}"#
        )
        .is_ok());
    }

    /// `Status` serializes as Cobo's integer code (serde goes through `From<Status> for i64`).
    #[test]
    fn status_serializes_as_its_code() {
        for (status, code) in [
            (Status::Ok, 0),
            (Status::InvalidRequest, 10),
            (Status::InvalidToken, 20),
            (Status::InternalError, 30),
        ] {
            assert_eq!(serde_json::to_string(&status).unwrap(), code.to_string());
            assert_eq!(i64::from(status), code);
            assert_eq!(
                serde_json::from_str::<Status>(&code.to_string()).unwrap(),
                status
            );
        }
        assert!(serde_json::from_str::<Status>("5").is_err());
    }

    #[test]
    fn request_type_names() {
        for t in RequestType::ALL {
            assert_eq!(RequestType::parse(t.name()), Some(t));
            assert_eq!(RequestType::from_code(t.code()), Some(t));
        }
        assert_eq!(RequestType::from_code(4), None);
        assert_eq!(type_name(Some(4)), "unknown");
        assert_eq!(RequestType::parse("2"), Some(RequestType::KeySign));
    }
}
