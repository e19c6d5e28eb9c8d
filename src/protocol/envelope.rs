//! The Cobo callback envelope: CallbackRequest and CallbackResponse, the status codes, and the
//! RS256 token that carries either one as base64 `package_data`.
//!
//! Token handling is deliberately narrow: exactly three dot-separated parts, a header whose `alg`
//! is `RS256` and nothing else, a valid signature by the one key the caller expects, an `exp` in
//! the future. Everything else is refused before the payload is looked at.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::{DecodePaddingMode, Engine};
use serde::{Deserialize, Serialize};

use crate::keys::{Signer, Verifier};

/// The form field a TSS Node posts its token in.
pub const FORM_FIELD: &str = "TSS_JWT_MSG";

/// Longest `request_id` accepted; Cobo's are UUID-sized.
pub const MAX_REQUEST_ID_BYTES: usize = 1024;

const B64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
const B64STD: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

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

/// Why a token was refused (status 20 inbound; bad_signature/bad_response downstream).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is not a JWT: {0}")]
    Malformed(String),
    #[error("token alg {0:?} is not allowed (RS256 only)")]
    Algorithm(String),
    #[error("token signature does not verify with the expected key")]
    Signature,
    #[error("token expired at {exp} (now {now})")]
    Expired { exp: i64, now: i64 },
    #[error("token claims invalid: {0}")]
    Claims(String),
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
}

/// The verified claims of a token.
#[derive(Debug, Clone)]
pub struct Claims {
    /// `package_data` as sent: base64 of the payload, decoded by [`decode_package`].
    pub package_data: String,
    pub iss: Option<String>,
    pub exp: i64,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

#[derive(Deserialize)]
struct RawClaims {
    package_data: String,
    exp: serde_json::Number,
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    nbf: Option<serde_json::Number>,
}

#[derive(Serialize)]
struct OutClaims<'a> {
    package_data: &'a str,
    exp: i64,
    iss: &'a str,
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
    pub fn from_code(code: i64) -> Option<Self> {
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
pub fn type_name(code: Option<i64>) -> &'static str {
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
        if let Some(key) = keys.0.into_iter().find(|k| is_response_field(k)) {
            return Err(PayloadError::ReservedKey(key_snippet(&key)));
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

/// True for a key Go's `encoding/json` would read into a CallbackResponse's `status` or `action`:
/// it matches names under Unicode simple case folding, where `ſ` (U+017F) is an `s` and `K`
/// (U+212A, Kelvin) a `k`.
fn is_response_field(key: &str) -> bool {
    let folded: String = key
        .chars()
        .map(|c| match c {
            '\u{017F}' => 's',
            '\u{212A}' => 'k',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    folded == "status" || folded == "action"
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

/// Seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Standard base64 with padding, as Cobo's templates put in `package_data`.
pub fn encode_package(bytes: &[u8]) -> String {
    B64STD.encode(bytes)
}

/// Decodes `package_data`: standard alphabet, padding optional.
pub fn decode_package(text: &str) -> Result<Vec<u8>, PayloadError> {
    B64STD
        .decode(text.trim())
        .map_err(|e| PayloadError::Base64(e.to_string()))
}

/// Signs `package` (raw bytes, base64-encoded here) into an RS256 token with `iss` and `exp`.
pub fn sign_token(signer: &Signer, package: &[u8], iss: &str, expire_secs: i64) -> String {
    let header = B64URL.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
    let package_data = encode_package(package);
    let claims = OutClaims {
        package_data: &package_data,
        exp: now_secs() + expire_secs,
        iss,
    };
    // Serializing a struct of strings and an integer cannot fail.
    let claims = serde_json::to_vec(&claims).unwrap_or_default();
    let mut token = String::with_capacity(header.len() + claims.len() * 4 / 3 + 360);
    token.push_str(&header);
    token.push('.');
    B64URL.encode_string(&claims, &mut token);
    let sig = signer.sign(token.as_bytes());
    token.push('.');
    B64URL.encode_string(&sig, &mut token);
    token
}

/// [`sign_token`] on the bounded signing pool ([`crate::keys::on_signing_pool`]), off the async
/// worker threads: what the request path uses. Returns an empty string (which no one accepts:
/// fail closed) only if the signing job could not run.
pub async fn sign_token_pooled(
    signer: &Signer,
    package: Vec<u8>,
    iss: String,
    expire_secs: i64,
) -> String {
    let signer = signer.clone();
    crate::keys::on_signing_pool(move || sign_token(&signer, &package, &iss, expire_secs))
        .await
        .unwrap_or_else(|| {
            tracing::error!("signing job failed; answering with an empty token");
            String::new()
        })
}

/// Verifies an RS256 token with `verifier` and returns its claims, `package_data` decoded.
pub fn verify_token(token: &str, verifier: &Verifier, now: i64) -> Result<Claims, TokenError> {
    let token = token.trim();
    let mut parts = token.splitn(4, '.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed(
            "expected three dot-separated parts".into(),
        ));
    };
    let header = B64URL
        .decode(h)
        .map_err(|e| TokenError::Malformed(format!("header is not base64url: {e}")))?;
    let header: Header = serde_json::from_slice(&header)
        .map_err(|e| TokenError::Malformed(format!("header is not JSON with alg: {e}")))?;
    if header.alg != "RS256" {
        return Err(TokenError::Algorithm(header.alg));
    }
    let sig = B64URL
        .decode(s)
        .map_err(|e| TokenError::Malformed(format!("signature is not base64url: {e}")))?;
    let signed_len = h.len() + 1 + c.len();
    if !verifier.verify(&token.as_bytes()[..signed_len], &sig) {
        return Err(TokenError::Signature);
    }
    let claims = B64URL
        .decode(c)
        .map_err(|e| TokenError::Claims(format!("not base64url: {e}")))?;
    let claims: RawClaims =
        serde_json::from_slice(&claims).map_err(|e| TokenError::Claims(e.to_string()))?;
    let exp =
        number_secs(&claims.exp).ok_or_else(|| TokenError::Claims("exp is not a number".into()))?;
    if exp <= now {
        return Err(TokenError::Expired { exp, now });
    }
    if let Some(nbf) = claims.nbf.as_ref().and_then(number_secs) {
        if nbf > now {
            return Err(TokenError::Claims(format!("not valid before {nbf}")));
        }
    }
    Ok(Claims {
        package_data: claims.package_data,
        iss: claims.iss,
        exp,
    })
}

fn number_secs(n: &serde_json::Number) -> Option<i64> {
    n.as_i64().or_else(|| n.as_f64().map(|f| f.floor() as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Signer, Verifier) {
        let dir = tempfile::tempdir().unwrap();
        let files = crate::keys::generate(dir.path(), "k").unwrap();
        (
            Signer::load(&files.private).unwrap(),
            Verifier::load(&files.public).unwrap(),
        )
    }

    #[test]
    fn round_trip_and_refusals() {
        let (signer, verifier) = pair();
        let (_, other) = pair();
        let token = sign_token(&signer, b"{\"a\":1}", "me", 120);
        let claims = verify_token(&token, &verifier, now_secs()).unwrap();
        assert_eq!(decode_package(&claims.package_data).unwrap(), b"{\"a\":1}");
        assert_eq!(claims.iss.as_deref(), Some("me"));

        assert_eq!(
            verify_token(&token, &other, now_secs()).unwrap_err(),
            TokenError::Signature
        );
        assert!(matches!(
            verify_token(&token, &verifier, now_secs() + 121),
            Err(TokenError::Expired { .. })
        ));
        assert!(matches!(
            verify_token("a.b", &verifier, 0),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            verify_token(&format!("{token}.x"), &verifier, 0),
            Err(TokenError::Malformed(_))
        ));

        // Same claims and signature under a header that names another algorithm.
        let (_, claims_and_sig) = token.split_once('.').unwrap();
        for alg in ["none", "HS256", "RS512", "PS256", "rs256"] {
            let h = B64URL.encode(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#));
            assert_eq!(
                verify_token(&format!("{h}.{claims_and_sig}"), &verifier, now_secs()).unwrap_err(),
                TokenError::Algorithm(alg.into())
            );
        }

        // A flipped bit in the claims breaks the signature.
        let (h, rest) = token.split_once('.').unwrap();
        let (c, s) = rest.split_once('.').unwrap();
        let mut c = c.to_owned().into_bytes();
        c[5] ^= 1;
        let tampered = format!("{h}.{}.{s}", String::from_utf8(c).unwrap());
        assert!(verify_token(&tampered, &verifier, now_secs()).is_err());
    }

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

    /// A token with exactly these claims, signed RS256.
    fn with_claims(signer: &Signer, claims: &str) -> String {
        let signed = format!(
            "{}.{}",
            B64URL.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
            B64URL.encode(claims)
        );
        let sig = B64URL.encode(signer.sign(signed.as_bytes()));
        format!("{signed}.{sig}")
    }

    #[test]
    fn nbf_and_exp_boundaries() {
        let (signer, verifier) = pair();
        let now = 1_700_000_000i64;
        let pd = encode_package(b"{}");
        let check = |exp: &str, nbf: Option<&str>| {
            let nbf = nbf.map_or(String::new(), |n| format!(r#","nbf":{n}"#));
            let claims = format!(r#"{{"package_data":"{pd}","exp":{exp}{nbf}}}"#);
            verify_token(&with_claims(&signer, &claims), &verifier, now)
        };
        let later = (now + 60).to_string();
        // nbf in the past, now, or within the same second: valid.
        for nbf in [now - 10, now] {
            assert!(check(&later, Some(&nbf.to_string())).is_ok(), "nbf {nbf}");
        }
        assert!(check(&later, Some(&format!("{now}.5"))).is_ok());
        // nbf in the future: not yet valid.
        for nbf in [
            format!("{}", now + 1),
            format!("{}", now + 3600),
            format!("{now}9.5"),
        ] {
            assert_eq!(
                check(&later, Some(&nbf)).unwrap_err(),
                TokenError::Claims(format!(
                    "not valid before {}",
                    nbf.parse::<f64>().unwrap().floor() as i64
                ))
            );
        }
        // exp exactly now is expired; one second later is not.
        assert_eq!(
            check(&now.to_string(), None).unwrap_err(),
            TokenError::Expired { exp: now, now }
        );
        assert_eq!(
            check(&format!("{now}.9"), None).unwrap_err(),
            TokenError::Expired { exp: now, now }
        );
        assert!(check(&(now + 1).to_string(), None).is_ok());
        assert!(matches!(
            check("\"soon\"", None),
            Err(TokenError::Claims(_))
        ));
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
