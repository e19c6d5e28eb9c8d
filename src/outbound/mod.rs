//! Outbound: the calls to the downstream callback servers. [`fanout`] sends one request to every
//! subscribed server and gathers their verdicts; [`call`] makes one bounded call; [`client`] is
//! the TSS Node's side of the protocol (post a token, verify the signed answer); [`tls`] builds
//! each server's HTTP client.

pub(crate) mod call;
pub mod client;
pub(crate) mod events;
pub(crate) mod fanout;
pub(crate) mod tls;

use std::sync::Arc;

use axum::body::Bytes;
use tokio::time::Instant;

use crate::protocol::RequestType;

/// One request on its way to the downstreams: the same signed form body for every server, the
/// `request_id` their answers must name, the task type, and the deadline every call ends by.
#[derive(Debug, Clone)]
pub(crate) struct Outbound {
    /// The `TSS_JWT_MSG` form body, signed once for all servers.
    pub(crate) form: Bytes,
    pub(crate) request_id: Arc<str>,
    /// `None`: a type this gateway does not know.
    pub(crate) kind: Option<RequestType>,
    pub(crate) deadline: Instant,
    /// The callback's span: each call attempt is a child of it (none for health pings).
    pub(crate) span: tracing::Span,
}

// === impl Outbound ===

impl Outbound {
    /// For a Ping any status-0 answer counts as approved, with or without `action`.
    pub(crate) fn is_ping(&self) -> bool {
        self.kind == Some(RequestType::Ping)
    }
}
