//! Delivery of the node's events to the event servers, at least once.
//!
//! Each event server has a worker task of its own that claims due deliveries from the outbox
//! (a lease, so replicas sharing a PostgreSQL store never send one at the same time), sends them
//! concurrently, re-signed with the downstream signing key (fresh `exp`, `package_data` = the
//! node's exact bytes), and settles each: delivered (2xx), or retried 1 s after the first
//! failure, doubling, at most every 30 s, until `event_retry_hours` have passed since the event
//! was recorded; then dropped, with an `event_dropped` audit record.
//!
//! A 4xx answer (`refused`: Cobo's event servers answer 400 to a token or payload they do not
//! accept) is retried like a failed call: the payload is the node's own verified bytes, so the
//! likely cause is the event server's configuration (the gateway's public key not installed
//! yet, a clock off), and an event must not be lost to it; the backlog alert shows it within
//! 15 minutes. Workers are independent: a server that hangs never delays another, nor any
//! callback (no request waits for a delivery).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::header;
use tokio::sync::watch;
use tracing::field::Empty;
use tracing::Instrument;

use crate::generation::{Audience, EventServer, Generation};
use crate::ops::audit::{EventDropped, EventDroppedRecord};
use crate::ops::metrics::delivery;
use crate::ops::traces::{self, TARGET as TRACES};
use crate::outbound::client;
use crate::state::outbox::{Claimed, Settled};
use crate::state::{now_ms, Store};
use crate::Shared;

/// The first retry after a failed attempt; each later one waits twice as long.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between two attempts.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// Deliveries one worker claims and sends at once.
const BATCH: i64 = 16;
/// A worker with nothing due looks again this often (retries come due; another replica may
/// have recorded events).
const POLL: Duration = Duration::from_secs(1);
/// A claim outlives the attempt's timeout by this much; after it, another replica retakes it.
const LEASE_SLACK: Duration = Duration::from_secs(30);
/// How often the store is pruned (approvals past retention, finished deliveries).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Wakes every delivery worker (an event was recorded).
#[derive(Debug)]
pub(crate) struct Wake(watch::Sender<u64>);

impl Default for Wake {
    fn default() -> Self {
        Wake(watch::channel(0).0)
    }
}

impl Wake {
    pub(crate) fn ring(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Starts the delivery supervisor, the store's heartbeat and its pruning.
pub(crate) fn start(shared: &Arc<Shared>) {
    tokio::spawn(supervise(shared.clone()));
    tokio::spawn(heartbeat(shared.clone()));
    tokio::spawn(prune(shared.clone()));
}

/// Keeps one worker per configured event server: starts one when a reload adds a server; a
/// worker whose server was removed ends by itself (its undelivered events wait in the outbox
/// for a server of that name).
async fn supervise(shared: Arc<Shared>) {
    let mut workers: HashMap<Arc<str>, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        let g = shared.current.load_full();
        workers.retain(|name, task| {
            let keep = !task.is_finished();
            if !keep && !g.event_servers.iter().any(|e| &e.name == name) {
                shared.metrics.forget_event_server(name);
            }
            keep
        });
        for e in &g.event_servers {
            if !workers.contains_key(&e.name) {
                workers.insert(
                    e.name.clone(),
                    tokio::spawn(work(shared.clone(), e.name.clone())),
                );
            }
        }
        drop(g);
        tokio::time::sleep(POLL).await;
    }
}

/// Writes this replica's heartbeat: a store that stopped taking writes turns `/readyz` 503
/// even while no request comes.
async fn heartbeat(shared: Arc<Shared>) {
    let Some(store) = shared.store.clone() else {
        return;
    };
    loop {
        let _ = store.heartbeat().await;
        tokio::time::sleep(crate::state::HEARTBEAT).await;
    }
}

async fn prune(shared: Arc<Shared>) {
    let Some(store) = shared.store.clone() else {
        return;
    };
    loop {
        tokio::time::sleep(Duration::from_secs(60)).await;
        let c = shared.current.load().config.clone();
        let retention = Duration::from_secs(c.approval_retention_days * 86_400);
        let event_keep = Duration::from_secs((c.event_retry_hours + 24) * 3600);
        match store.prune(retention, event_keep).await {
            Ok(n) => tracing::debug!(rows = n, "state store pruned"),
            Err(e) => tracing::warn!(error = %e, "state store not pruned"),
        }
        tokio::time::sleep(PRUNE_EVERY).await;
    }
}

/// The worker of the event server named `name`, until it leaves the config.
async fn work(shared: Arc<Shared>, name: Arc<str>) {
    let Some(store) = shared.store.clone() else {
        return;
    };
    let mut wake = shared.delivery.0.subscribe();
    let mut warned = false;
    loop {
        let g = shared.current.load_full();
        let Some(server) = g.event_servers.iter().find(|e| e.name == name).cloned() else {
            return;
        };
        show_backlog(&shared, &store, &name).await;
        let lease = (server.timeout + LEASE_SLACK).as_millis() as i64;
        match store.claim(&name, lease, BATCH).await {
            Ok(batch) if !batch.is_empty() => {
                warned = false;
                let sends = batch
                    .into_iter()
                    .map(|c| deliver(&shared, &store, &g, &server, c));
                futures::future::join_all(sends).await;
                continue;
            }
            Ok(_) => warned = false,
            Err(e) => {
                if !warned {
                    tracing::warn!(server = %name, error = %e, "cannot claim events to deliver; retrying");
                    warned = true;
                }
            }
        }
        drop(g);
        tokio::select! {
            _ = wake.changed() => {}
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// `tss_gateway_event_backlog` and `tss_gateway_event_oldest_undelivered_seconds` of `name`.
async fn show_backlog(shared: &Shared, store: &Store, name: &str) {
    if let Ok((n, oldest)) = store.backlog(name).await {
        shared
            .metrics
            .event_backlog
            .with_label_values(&[name])
            .set(n);
        let age = oldest.map_or(0.0, |t| (now_ms() - t).max(0) as f64 / 1000.0);
        shared
            .metrics
            .event_oldest_undelivered
            .with_label_values(&[name])
            .set(age);
    }
}

/// One attempt to deliver `c` to `server`, and its outcome recorded.
async fn deliver(
    shared: &Shared,
    store: &Store,
    g: &Arc<Generation>,
    server: &EventServer,
    c: Claimed,
) {
    let started = std::time::Instant::now();
    // A child of the event's span, however long after it this attempt is made.
    let span = tracing::info_span!(
        target: TRACES,
        "event_delivery",
        otel.kind = "client",
        server = %server.name,
        attempt = c.attempts + 1,
        http.version = Empty,
        outcome = Empty,
        otel.status_code = Empty,
    );
    traces::adopt_stored(&span, c.traceparent.as_deref());
    let (outcome, error) = send(g, server, c.package.clone())
        .instrument(span.clone())
        .await;
    if !span.is_disabled() {
        span.record("outcome", outcome);
        if outcome != delivery::DELIVERED {
            span.record("otel.status_code", "ERROR");
        }
    }
    let trace_id = traces::trace_id(&span);
    let trace_id = trace_id.as_deref();
    shared
        .metrics
        .record_delivery(&server.name, outcome, Some(started.elapsed()), &error);
    let settled = if outcome == delivery::DELIVERED {
        tracing::debug!(server = %server.name, event_id = %client::snippet(&c.event_id), trace_id = trace_id.map(tracing::field::display), "event delivered");
        Settled::Delivered
    } else {
        let attempts = c.attempts + 1;
        let give_up_ms = c.created_ms + (g.config.event_retry_hours * 3_600_000) as i64;
        let at_ms = now_ms() + backoff(attempts).as_millis() as i64;
        if at_ms > give_up_ms {
            drop_event(shared, g, server, &c, attempts, &error, trace_id);
            Settled::Dropped { error }
        } else {
            tracing::debug!(server = %server.name, event_id = %client::snippet(&c.event_id), attempts, error = %error, trace_id = trace_id.map(tracing::field::display), "event not delivered; will retry");
            Settled::Retry { at_ms, error }
        }
    };
    if let Err(e) = store.settle(&server.name, &c.event_id, &settled).await {
        // The claim runs out and the delivery is retried: at least once, perhaps twice.
        tracing::warn!(server = %server.name, error = %e, "delivery outcome not recorded; the event will be sent again");
    }
}

/// Audits, logs and counts an event given up.
fn drop_event(
    shared: &Shared,
    g: &Arc<Generation>,
    server: &EventServer,
    c: &Claimed,
    attempts: i64,
    error: &str,
    trace_id: Option<&str>,
) {
    shared
        .metrics
        .record_delivery(&server.name, delivery::DROPPED, None, error);
    tracing::error!(
        server = %server.name,
        event_id = %client::snippet(&c.event_id),
        attempts,
        error = %client::snippet(error),
        trace_id = trace_id.map(tracing::field::display),
        "event dropped: not delivered within event_retry_hours"
    );
    if let Some(audit) = shared.audit.load_full() {
        let record = EventDroppedRecord {
            ts: crate::ops::audit::now_rfc3339(),
            event_dropped: EventDropped {
                event_id: &c.event_id,
                server: &server.name,
                attempts,
                error: &client::snippet(error),
            },
        };
        if let Ok(body) = serde_json::to_vec(&record) {
            audit.record(g, body);
        }
    }
}

/// Waits before attempt `attempts + 1`: 1 s, 2 s, 4 s ... at most 30 s.
fn backoff(attempts: i64) -> Duration {
    let doublings = attempts.saturating_sub(1).clamp(0, 16) as u32;
    FIRST_RETRY.saturating_mul(1 << doublings).min(MAX_RETRY)
}

/// Posts the re-signed event; the outcome label and, unless delivered, why.
async fn send(g: &Generation, server: &EventServer, package: Vec<u8>) -> (&'static str, String) {
    let token = g.sign(Audience::Downstreams, package).await;
    if token.is_empty() {
        return (
            delivery::TRANSPORT_ERROR,
            "the event could not be signed".into(),
        );
    }
    let post = server
        .client
        .post(server.url.clone())
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(client::form_body(&token));
    let post = traces::propagate(post).send();
    let answer = async {
        let mut response = post.await?;
        traces::record_http_version(response.version());
        let status = response.status();
        // Read a short body to its end so the connection can be kept alive; a longer one is
        // left unread (the connection is then closed): nothing in it is used.
        let mut read = 0;
        while let Some(chunk) = response.chunk().await? {
            read += chunk.len();
            if read > client::MAX_ANSWER_BYTES {
                break;
            }
        }
        Ok::<_, reqwest::Error>(status)
    };
    match tokio::time::timeout(server.timeout, answer).await {
        Err(_) => (
            delivery::TIMEOUT,
            format!("no answer within {} ms", server.timeout.as_millis()),
        ),
        // Without the URL: a `user:pass@` in it must not reach the log, the store or the page.
        Ok(Err(e)) if e.is_timeout() => (delivery::TIMEOUT, client::error_chain(&e.without_url())),
        Ok(Err(e)) => (
            delivery::TRANSPORT_ERROR,
            client::error_chain(&e.without_url()),
        ),
        Ok(Ok(s)) if s.is_success() => (delivery::DELIVERED, String::new()),
        Ok(Ok(s)) if s.is_client_error() && s.as_u16() != 408 && s.as_u16() != 429 => {
            (delivery::REFUSED, format!("HTTP {}", s.as_u16()))
        }
        Ok(Ok(s)) => (delivery::TRANSPORT_ERROR, format!("HTTP {}", s.as_u16())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_up_to_thirty() {
        let secs: Vec<u64> = (1..=8).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff(i64::MAX), MAX_RETRY);
    }
}
