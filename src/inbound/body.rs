//! Reading the request body: at most `max_body_bytes` kept, a larger body refused without
//! keeping any of it (and drained, within bounds, so the client can read the refusal), and the
//! `TSS_JWT_MSG` token taken from the form.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap};
use tokio::time::Instant;

use super::admission::Permit;
use super::conn::Conn;
use crate::generation::Generation;
use crate::protocol::FORM_FIELD;
use crate::Shared;

/// How long a handler waits for a body past `read_timeout_ms` before giving up itself; by
/// then the connection's watchdog has closed the connection (and dropped the handler).
pub(crate) const READ_SLACK: Duration = Duration::from_secs(1);

/// A request whose body has arrived (or was refused) and that holds a `max_in_flight` place.
pub(crate) struct Arrived {
    /// The config current once the body had arrived: the one that decides the request.
    pub(crate) g: Arc<Generation>,
    /// The `max_in_flight` place, held until the answer is made.
    pub(crate) admitted: Permit,
    /// The request's first byte: the read and the deadline count from there.
    pub(crate) started: Instant,
    /// The body, or the status-10 text of why it was refused.
    pub(crate) body: Result<Bytes, String>,
}

/// What the node's routes (`/v2/check`, `/v1/check`, `/v2/event`) do first, in this order:
/// shed at once, unread, when every place is taken; read the body within `read_timeout_ms` of
/// the request's first byte (a slow caller holds no place, and its request is decided by the
/// config current once it has arrived); then take a place. `None`: shed (every place taken,
/// before or after the read); the caller answers HTTP 503 without any RSA work.
///
/// A body that comes too late never returns: the connection's watchdog closes the connection
/// unanswered (the timeout here only backs it up), and this request gets no answer, signed or
/// not.
pub(crate) async fn arrive(
    shared: &Shared,
    conn: Option<&Conn>,
    headers: HeaderMap,
    body: Body,
) -> Option<Arrived> {
    let started = conn.map_or_else(Instant::now, |c| c.request_began());
    let (limit, read_by) = {
        let g = shared.current.load();
        if shared.admission.in_flight() >= g.config.max_in_flight {
            return None;
        }
        let read_timeout = Duration::from_millis(g.config.read_timeout_ms);
        (g.config.max_body_bytes, started + read_timeout)
    };
    // `headers` and the body are given away here, so that the connection's read buffer they
    // point into is freed as soon as the token is parsed, not when the answer goes out.
    let read = tokio::time::timeout_at(
        read_by + READ_SLACK,
        read_body(headers, body, limit, read_by),
    )
    .await;
    if let Some(c) = conn {
        if read.is_err() {
            // Late: the watchdog closes the connection unanswered (it may have been starved of
            // its turn until now).
            std::future::pending::<()>().await;
        }
        c.body_read();
    }
    let g = shared.current.load_full();
    let admitted = shared.admission.try_admit(g.config.max_in_flight)?;
    let body =
        read.unwrap_or_else(|_| Err("request body not received within read_timeout_ms".into()));
    Some(Arrived {
        g,
        admitted,
        started,
        body,
    })
}

/// A body above `max_body_bytes` is still read and thrown away, up to this many bytes in all,
/// so that a client that sends the whole body before reading gets its status-10 answer rather
/// than a connection reset by unread data (a lingering close).
const LINGER_BYTES: u64 = 64 << 20;
/// ... and for at most this long (never past the request's deadline).
const LINGER_TIME: Duration = Duration::from_secs(5);

/// Reads the body up to `limit` bytes. A larger one is refused from its Content-Length, or as
/// soon as the limit is crossed, without keeping any of it: the rest is drained (bounded by
/// [`LINGER_BYTES`], [`LINGER_TIME`] and `deadline`) so the client can read the refusal.
/// The error is the status-10 answer's text.
pub(crate) async fn read_body(
    headers: HeaderMap,
    mut body: Body,
    limit: usize,
    deadline: Instant,
) -> Result<Bytes, String> {
    use http_body_util::BodyExt;
    let too_large = || format!("request body is larger than max_body_bytes ({limit})");
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > limit as u64) {
        // A client waiting for `100 Continue` has sent nothing and is told no without it.
        let expects_continue = headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if !expects_continue && n <= LINGER_BYTES {
            linger(body, 0, deadline).await;
        }
        return Err(too_large());
    }
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut read = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("request body could not be read: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        read += data.len();
        if read > limit {
            drop(chunks);
            linger(body, read as u64, deadline).await;
            return Err(too_large());
        }
        chunks.push(data);
    }
    // Most bodies arrive in one chunk, which is then kept without a copy.
    Ok(match chunks.as_slice() {
        [one] => one.clone(),
        many => many.concat().into(),
    })
}

/// Reads and discards what is left of `body` (a lingering close), until it ends, `read` reaches
/// [`LINGER_BYTES`], [`LINGER_TIME`] passes or `deadline` comes.
async fn linger(mut body: Body, mut read: u64, deadline: Instant) {
    use http_body_util::BodyExt;
    let until = deadline.min(Instant::now() + LINGER_TIME);
    let drain = async {
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, |d| d.len() as u64);
            if read > LINGER_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout_at(until, drain).await;
}

/// The `TSS_JWT_MSG` field of a form body; exactly one must be there.
pub(crate) fn form_token(body: &[u8]) -> Result<Cow<'_, str>, String> {
    // What the node sends: the one field, with nothing in its value to unescape.
    if let Some(value) = body
        .strip_prefix(FORM_FIELD.as_bytes())
        .and_then(|rest| rest.strip_prefix(b"="))
    {
        if !value.iter().any(|b| matches!(b, b'&' | b'%' | b'+')) {
            if let Ok(token) = std::str::from_utf8(value) {
                return Ok(Cow::Borrowed(token));
            }
        }
    }
    let mut tokens = form_urlencoded::parse(body).filter(|(k, _)| k == FORM_FIELD);
    match (tokens.next(), tokens.next()) {
        (Some((_, t)), None) => Ok(t),
        (None, _) => Err(format!("form field {FORM_FIELD} missing")),
        (Some(_), Some(_)) => Err(format!("form field {FORM_FIELD} given more than once")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the general form parser makes of `body`.
    fn parsed(body: &[u8]) -> Result<String, String> {
        let mut tokens = form_urlencoded::parse(body).filter(|(k, _)| k == FORM_FIELD);
        match (tokens.next(), tokens.next()) {
            (Some((_, t)), None) => Ok(t.into_owned()),
            (None, _) => Err(format!("form field {FORM_FIELD} missing")),
            (Some(_), Some(_)) => Err(format!("form field {FORM_FIELD} given more than once")),
        }
    }

    #[test]
    fn form_token_reads_what_the_form_parser_reads() {
        let cases: &[&[u8]] = &[
            b"TSS_JWT_MSG=eyJh.eyJw.c2ln",
            b"TSS_JWT_MSG=",
            b"TSS_JWT_MSG=a%2Eb",
            b"TSS_JWT_MSG=a+b",
            b"TSS_JWT_MSG=a&TSS_JWT_MSG=b",
            b"TSS_JWT_MSG=a&other=1",
            b"other=1&TSS_JWT_MSG=a",
            b"TSS_JWT_MSGX=a",
            b"TSS_JWT_MSG",
            b"TSS_JWT_MSG=a=b",
            b"TSS_JWT_MSG=\xff\xfe",
            b"",
        ];
        for body in cases {
            assert_eq!(
                form_token(body).map(Cow::into_owned),
                parsed(body),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(matches!(
            form_token(b"TSS_JWT_MSG=eyJh.eyJw.c2ln"),
            Ok(Cow::Borrowed(_))
        ));
    }

    proptest! {
        #[test]
        fn form_token_matches_the_form_parser(tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut body = b"TSS_JWT_MSG=".to_vec();
            body.extend_from_slice(&tail);
            prop_assert_eq!(form_token(&body).map(Cow::into_owned), parsed(&body));
        }
    }
}
