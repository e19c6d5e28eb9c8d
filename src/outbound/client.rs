//! The TSS Node's side of one callback: post a token, read and verify the signed answer.
//!
//! The gateway plays this role toward every downstream; `probe` and `demo` play it toward the
//! gateway. Reading the answer accepts both body forms Cobo's reference servers use (the raw
//! token, or the token as a JSON string) and trusts a validly signed body whatever the HTTP status.

use std::time::Duration;

use axum::body::Bytes;

use crate::protocol::keys::Verifier;
use crate::protocol::{self, CallbackResponse, TokenError, FORM_FIELD};
use crate::verdict::Outcome;

/// Answers longer than this are refused unread: a signed CallbackResponse is well under 2 KiB.
pub(crate) const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Why one call did not produce a verified CallbackResponse. The variant is the metric outcome.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("timeout: no answer within {0} ms")]
    Timeout(u64),
    #[error("transport_error: {0}")]
    Transport(String),
    #[error("http_error: {0}")]
    Http(String),
    #[error("bad_signature: {0}")]
    BadSignature(String),
    #[error("bad_response: {0}")]
    BadResponse(String),
}

/// The metric outcome of a failed call.
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

/// An HTTP answer before any of it is trusted.
#[derive(Debug)]
pub struct RawAnswer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Builds the HTTP client used for callbacks: no proxies (a proxy would see every token), Nagle
/// off, pooled keep-alive connections.
pub(crate) fn http_client(connect_timeout: Duration) -> reqwest::Client {
    builder(connect_timeout)
        .build()
        // Building a client without custom TLS roots or proxies only fails if the TLS backend
        // cannot initialise, which would make the process useless anyway.
        .expect("the HTTP client backend initialises")
}

/// The settings every callback client shares; TLS options are added by [`super::tls`].
pub fn builder(connect_timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        // A redirect is an answer we did not ask for: following it would re-post the signed token
        // (or fetch an address) wherever a downstream points. It is an http_error instead.
        .redirect(reqwest::redirect::Policy::none())
        // The gateway retries transport failures itself, within the deadline; reqwest's own
        // retry layer would otherwise keep a copy of every request (headers, URL) just in case.
        .retry(reqwest::retry::never().max_retries_per_request(0))
        .no_proxy()
        .tcp_nodelay(true)
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
}

/// The form body carrying `token` as the `TSS_JWT_MSG` field. Built once per request and shared
/// by every downstream call.
pub fn form_body(token: &str) -> Bytes {
    // A JWT is base64url and dots: nothing in it needs escaping, so skip the byte-by-byte encoder.
    let plain = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'*');
    if token.bytes().all(plain) {
        let mut body = Vec::with_capacity(FORM_FIELD.len() + 1 + token.len());
        body.extend_from_slice(FORM_FIELD.as_bytes());
        body.push(b'=');
        body.extend_from_slice(token.as_bytes());
        return body.into();
    }
    form_urlencoded::Serializer::new(String::with_capacity(token.len() + 16))
        .append_pair(FORM_FIELD, token)
        .finish()
        .into()
}

/// Posts `token` as the `TSS_JWT_MSG` form field; see [`post_form`].
pub async fn post_token(
    client: &reqwest::Client,
    url: &reqwest::Url,
    token: &str,
) -> Result<RawAnswer, CallError> {
    post_form(client, url, form_body(token)).await
}

/// Posts a [`form_body`] and reads at most [`MAX_ANSWER_BYTES`] of the answer. Callers bound the
/// time with their own timeout.
pub(crate) async fn post_form(
    client: &reqwest::Client,
    url: &reqwest::Url,
    body: Bytes,
) -> Result<RawAnswer, CallError> {
    let post = client
        .post(url.clone())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body);
    let mut resp = crate::ops::traces::propagate(post)
        .send()
        .await
        // Without the URL: its `user:pass@`, if any, must not reach answers, logs or the audit.
        .map_err(|e| CallError::Transport(transport_error(&e.without_url(), url)))?;
    crate::ops::traces::record_http_version(resp.version());
    let status = resp.status().as_u16();
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
    {
        return Err(CallError::BadResponse(format!(
            "HTTP {status} answer of {} bytes is above {MAX_ANSWER_BYTES}",
            resp.content_length().unwrap_or_default()
        )));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| {
        CallError::Transport(format!("reading answer: {}", error_chain(&e.without_url())))
    })? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(CallError::BadResponse(format!(
                "HTTP {status} answer is above {MAX_ANSWER_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(RawAnswer { status, body })
}

/// Verifies an answer with the server's key and decodes its CallbackResponse. When
/// `expect_request_id` is given, a status-0 answer for any other request is refused: a replayed
/// approval (or rejection) must never count.
pub fn read_answer(
    answer: &RawAnswer,
    verifier: &Verifier,
    expect_request_id: Option<&str>,
) -> Result<CallbackResponse, CallError> {
    let http_ok = (200..300).contains(&answer.status);
    // An unsigned body under an error status is an HTTP failure; under 2xx it is a bad answer.
    // Neither repeats the body: a server's error page is not for the node's answer or the
    // audit log (see [`body_excerpt`] for the log).
    let unsigned = |detail: String| {
        if http_ok {
            CallError::BadResponse(detail)
        } else {
            CallError::Http(format!("HTTP {}", answer.status))
        }
    };
    let text = std::str::from_utf8(&answer.body)
        .map_err(|_| unsigned("answer is not UTF-8".into()))?
        .trim();
    let token: std::borrow::Cow<str> = if text.starts_with('"') {
        serde_json::from_str::<std::borrow::Cow<str>>(text)
            .map_err(|e| unsigned(format!("answer is not a JSON string: {e}")))?
    } else {
        text.into()
    };
    let claims =
        protocol::verify_token(&token, verifier, protocol::now_secs()).map_err(|e| match e {
            TokenError::Malformed(_) => {
                unsigned(format!("{e}: the answer is {}", body_kind(&answer.body)))
            }
            TokenError::Algorithm(_) | TokenError::Signature | TokenError::Expired { .. } => {
                CallError::BadSignature(e.to_string())
            }
            TokenError::Claims(_) => CallError::BadResponse(e.to_string()),
        })?;
    let package = protocol::decode_package(&claims.package_data)
        .map_err(|e| CallError::BadResponse(e.to_string()))?;
    if package.trim_ascii_start().first() != Some(&b'{') {
        return Err(CallError::BadResponse(
            "CallbackResponse is not a JSON object".into(),
        ));
    }
    let answered: Answered = serde_json::from_slice(&package)
        .map_err(|e| CallError::BadResponse(format!("not a CallbackResponse: {e}")))?;
    // A server that could not read the request (status 10/20) cannot name it, and may leave
    // `request_id` out: its signed refusal still says why, which is what an operator needs
    // (a downstream holding the wrong gateway key answers so). An answer that could count must
    // name the request.
    let response = match answered.request_id {
        Some(request_id) => CallbackResponse {
            request_id,
            status: answered.status,
            action: answered.action,
            error: answered.error,
        },
        None if answered.status != 0 => CallbackResponse {
            request_id: String::new(),
            status: answered.status,
            action: answered.action,
            error: answered.error,
        },
        None => {
            return Err(CallError::BadResponse(
                "not a CallbackResponse: missing field `request_id`".into(),
            ))
        }
    };
    // A non-zero status is a failure whichever request it names, and servers that could not read
    // the request (status 10/20) cannot name it; only answers that could count are matched.
    if let Some(expected) = expect_request_id.filter(|_| response.status == 0) {
        if response.request_id != expected {
            return Err(CallError::BadResponse(format!(
                "request_id mismatch: sent {:?}, answer is for {:?}",
                snippet(expected),
                snippet(&response.request_id)
            )));
        }
    }
    Ok(response)
}

/// A verified CallbackResponse as it came, `request_id` possibly absent.
#[derive(serde::Deserialize)]
struct Answered {
    #[serde(default)]
    request_id: Option<String>,
    status: i64,
    #[serde(default)]
    action: String,
    #[serde(default)]
    error: String,
}

/// The first 80 characters of untrusted text, for error messages.
pub(crate) fn snippet(text: &str) -> String {
    snippet_of(text, 80)
}

/// The first `n` characters of `text`, marked with `…` when cut.
fn snippet_of(text: &str, n: usize) -> String {
    let mut s: String = text.chars().take(n).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    s
}

/// What an answer that is not a signed token looks like, in a few fixed words: safe to put in
/// answers and the audit log, unlike the body itself.
pub(crate) fn body_kind(body: &[u8]) -> &'static str {
    let text = String::from_utf8_lossy(body);
    let text = text.trim_start();
    if text.is_empty() {
        "empty"
    } else if text.starts_with('<') {
        "an HTML or XML page"
    } else if text.starts_with('{') || text.starts_with('[') {
        "JSON that is not a token"
    } else {
        "text that is not a token"
    }
}

/// The start of an answer's body for the log: printable characters only, whitespace runs
/// folded, at most 200 characters.
pub(crate) fn body_excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(2048)]);
    let mut out = String::new();
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().map(|c| if c.is_control() { '?' } else { c }));
        if out.chars().count() >= 200 {
            break;
        }
    }
    snippet_of(&out, 200)
}

/// The likely fix for an HTTP error status from a callback server at `url`, if there is one.
pub fn http_hint(status: u16, url: &reqwest::Url) -> Option<String> {
    matches!(status, 404 | 405).then(|| {
        format!(
            "HTTP {status} from {}: wrong path? Cobo callback servers listen on /v2/check (older ones /v1/check)",
            crate::config::redact_address(url.as_str())
        )
    })
}

/// A transport failure in words, with the likely fix where the error says what went wrong.
fn transport_error(e: &dyn std::error::Error, url: &reqwest::Url) -> String {
    let text = error_chain(e);
    if url.scheme() == "https"
        && (text.contains("InvalidContentType") || text.contains("corrupt message"))
    {
        return format!(
            "TLS handshake failed: the server answered plain HTTP; use http:// or enable TLS on it ({text})"
        );
    }
    text
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_body_round_trips_through_the_form_parser() {
        for token in [
            "eyJh.eyJw.c2ln-_",
            "needs escaping: a+b&c=d%",
            "",
            "ünïcode",
        ] {
            let body = form_body(token);
            let fields: Vec<(String, String)> = form_urlencoded::parse(&body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            assert_eq!(fields, vec![(FORM_FIELD.to_owned(), token.to_owned())]);
        }
        assert_eq!(&form_body("a.b_c-d")[..], b"TSS_JWT_MSG=a.b_c-d");
    }
}
