//! The status page, `GET /status` beside `/metrics` (on `admin_listen` when it is set): one
//! server-rendered HTML page for operators, readable on a phone and offline, that reloads itself.
//!
//! It shows the config generation and hash, each callback and event server (mode, types,
//! health, outcomes and latency over the last minutes), the last decisions, the audit chain
//! head, the event backlog, alarms and readiness.
//!
//! Guarantees:
//! - No credentials, keys, tokens or payloads: addresses are redacted, error texts cleared of
//!   URL credentials, and every dynamic string escaped (see [`mod@page`]).
//! - Rendering never waits long on the disk or a database: the state store is asked with a
//!   [`STORE_WAIT`] timeout, and what it did not answer shows as unavailable. Everything else is
//!   in memory ([`recent`]), fed on the request path at the cost of one short lock.

mod page;
mod recent;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::generation::Generation;
use crate::Shared;
use page::{AuditView, Backlog, EventServerView, ServerView, Snapshot};
pub(crate) use recent::{Decisions, Recent};

/// The longest the page waits for the state store (alarms, backlog).
const STORE_WAIT: Duration = Duration::from_millis(500);

/// The page may load nothing and run nothing: inline styles only.
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /status`.
pub(crate) async fn page(State(shared): State<Arc<Shared>>) -> Response {
    let html = page::render(&snapshot(&shared).await);
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        html,
    )
        .into_response()
}

/// Reads everything the page shows.
async fn snapshot(shared: &Shared) -> Snapshot {
    let g = shared.current.load_full();
    let recent = &shared.metrics.recent;
    forget_removed(recent, &g);
    let (alarms, backlogs) = tokio::join!(
        crate::inbound::routes::alarms(shared, STORE_WAIT),
        backlogs(shared, &g)
    );
    let servers = g
        .downstreams
        .iter()
        .map(|d| ServerView {
            name: d.name.to_string(),
            mode: d.mode.as_str(),
            types: d
                .config
                .request_types
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(", "),
            address: page::address(&d.url),
            health: shared.health.state(&d.name),
            recent: recent.calls_of(&d.name),
        })
        .collect();
    let event_servers = g
        .event_servers
        .iter()
        .zip(backlogs)
        .map(|(e, backlog)| EventServerView {
            name: e.name.to_string(),
            types: e
                .config
                .event_types
                .as_ref()
                .map_or_else(|| "all".to_owned(), |t| t.join(", ")),
            address: page::address(&e.url),
            recent: recent.deliveries_of(&e.name),
            backlog,
        })
        .collect();
    let audit = shared.audit.load_full().map(|a| AuditView {
        path: a.path().display().to_string(),
        checkpoint: recent.last_checkpoint(),
    });
    Snapshot {
        now: std::time::SystemTime::now(),
        service_name: g.config.service_name.clone(),
        version: env!("CARGO_PKG_VERSION"),
        unready: crate::inbound::routes::unready(shared),
        config_error: shared.reload.error(),
        generation: g.number,
        config_sha256: crate::ops::audit::config_sha256(&g),
        loaded_at: g.loaded_at,
        health_interval_ms: g.config.health_check_interval_ms,
        servers,
        event_servers,
        decisions: shared.decisions.latest(),
        refused: shared.decisions.refused(),
        audit,
        alarms,
    }
}

/// Drops the windows of servers a reload removed.
pub(crate) fn forget_removed(recent: &Recent, g: &Generation) {
    recent.retain(
        |n| g.downstreams.iter().any(|d| &*d.name == n),
        |n| g.event_servers.iter().any(|e| &*e.name == n),
    );
}

/// Each event server's backlog, in the order of `g.event_servers`, each read within
/// [`STORE_WAIT`].
async fn backlogs(shared: &Shared, g: &Generation) -> Vec<Backlog> {
    let Some(store) = &shared.store else {
        return vec![Backlog::NoStore; g.event_servers.len()];
    };
    let reads = g.event_servers.iter().map(|e| async move {
        match tokio::time::timeout(STORE_WAIT, store.backlog(&e.name)).await {
            Ok(Ok((count, oldest_ms))) => Backlog::Known { count, oldest_ms },
            Ok(Err(e)) => Backlog::Unavailable(e),
            Err(_) => Backlog::Unavailable(format!(
                "the state store did not answer within {} ms",
                STORE_WAIT.as_millis()
            )),
        }
    });
    futures::future::join_all(reads).await
}
