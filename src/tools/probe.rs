//! `probe`: act as a TSS Node once. Sign a CallbackRequest with the node's key, post it, verify
//! the answer with the server's public key and return the CallbackResponse.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::outbound::client::{self, CallError};
use crate::protocol::keys::{KeyError, Signer, Verifier};
use crate::protocol::{self, CallbackResponse, RequestType};

/// The sample CallbackRequests shipped with the binary, one per task type (built with Cobo's SDK
/// models; the same files as `config/samples/`).
pub(crate) const SAMPLES: [(RequestType, &str); 5] = [
    (
        RequestType::Ping,
        include_str!("../../config/samples/ping.json"),
    ),
    (
        RequestType::KeyGen,
        include_str!("../../config/samples/key_gen.json"),
    ),
    (
        RequestType::KeySign,
        include_str!("../../config/samples/key_sign.json"),
    ),
    (
        RequestType::KeyReshare,
        include_str!("../../config/samples/key_reshare.json"),
    ),
    (
        RequestType::KeyShareSign,
        include_str!("../../config/samples/key_share_sign.json"),
    ),
];

/// Why a probe produced no verified answer (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("--url {0}: {1}")]
    Url(String, String),
    #[error("--type {0}: expected one of ping, key_gen, key_sign, key_reshare, key_share_sign or a code")]
    Type(String),
    #[error("--fixture {path}: {detail}")]
    Fixture { path: PathBuf, detail: String },
    #[error("{0}")]
    Call(#[from] CallError),
    /// The server answered without a usable token: what it said, and the likely fix.
    #[error("{0}")]
    Answer(String),
}

/// What to send.
#[derive(Debug, Clone)]
pub enum Payload {
    /// The embedded sample of this type, with a fresh `request_id`.
    Sample(RequestType),
    /// A file's exact bytes.
    File(PathBuf),
}

/// One probe's inputs.
#[derive(Debug, Clone)]
pub struct Probe {
    pub url: String,
    pub node_key: PathBuf,
    pub server_pub: PathBuf,
    pub payload: Payload,
    pub timeout: Duration,
}

/// The embedded sample for `kind`.
pub fn sample(kind: RequestType) -> &'static str {
    SAMPLES
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or(SAMPLES[0].1, |(_, s)| s)
}

/// The sample for `kind` with its `request_id` replaced, so repeated probes are distinct requests.
pub fn sample_with_id(kind: RequestType, request_id: &str) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_str(sample(kind)).unwrap_or_default();
    v["request_id"] = request_id.into();
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Parses `--type` (a name or a numeric code).
pub fn parse_type(text: &str) -> Result<RequestType, ProbeError> {
    RequestType::parse(text).ok_or_else(|| ProbeError::Type(text.to_owned()))
}

fn read_fixture(path: &Path) -> Result<Vec<u8>, ProbeError> {
    let bytes = std::fs::read(path).map_err(|e| ProbeError::Fixture {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    protocol::CallbackRequest::parse(&bytes).map_err(|e| ProbeError::Fixture {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    Ok(bytes)
}

/// Sends one request and returns the verified answer.
pub async fn run(probe: &Probe) -> Result<CallbackResponse, ProbeError> {
    let signer = Signer::load(&probe.node_key)?;
    let verifier = Verifier::load(&probe.server_pub)?;
    if !probe.url.contains("://") {
        return Err(ProbeError::Url(
            probe.url.clone(),
            format!(
                "has no scheme; write http://{} or https://{}",
                probe.url, probe.url
            ),
        ));
    }
    let url = reqwest::Url::parse(&probe.url)
        .map_err(|e| ProbeError::Url(probe.url.clone(), e.to_string()))?;
    let payload = match &probe.payload {
        Payload::File(path) => read_fixture(path)?,
        Payload::Sample(kind) => {
            let ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            sample_with_id(
                *kind,
                &format!("probe-{}-{ms}-{}", kind.name(), std::process::id()),
            )
        }
    };
    let request_id = protocol::CallbackRequest::parse(&payload)
        .map(|r| r.request_id)
        .unwrap_or_default();
    let token = protocol::sign_token(&signer, &payload, "tss-node-probe", 120);
    let http = client::http_client(probe.timeout);
    let raw = tokio::time::timeout(probe.timeout, client::post_token(&http, &url, &token))
        .await
        .map_err(|_| CallError::Timeout(probe.timeout.as_millis() as u64))??;
    client::read_answer(&raw, &verifier, Some(&request_id)).map_err(|e| {
        let body = client::body_excerpt(&raw.body);
        match (&e, client::http_hint(raw.status, &url)) {
            (CallError::Http(_), Some(hint)) => {
                ProbeError::Answer(format!("http_error: {hint} (body: {body})"))
            }
            (CallError::Http(_) | CallError::BadResponse(_), None) => {
                ProbeError::Answer(format!("{e} (body: {body})"))
            }
            _ => e.into(),
        }
    })
}
