//! Health checks: a signed Ping to every downstream every `health_check_interval_ms`, feeding
//! `tss_gateway_downstream_up` and `/readyz`.
//!
//! Health is information only. The decision path never reads it, so a server that looks healthy
//! still has to approve each request, and one that looks down is still asked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::time::Instant;

use crate::generation::{Audience, Downstream, Generation};
use crate::outbound::{call::call, client, Outbound};
use crate::protocol::RequestType;
use crate::verdict::Outcome;
use crate::Shared;

/// The last health check of one server.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct HealthState {
    pub(crate) up: bool,
    pub(crate) outcome: &'static str,
    pub(crate) latency_ms: u64,
    pub(crate) error: String,
    /// RFC 3339 time of the check.
    pub(crate) checked_at: String,
}

/// Last health state per server name.
#[derive(Debug, Default)]
pub struct Health {
    states: Mutex<HashMap<Arc<str>, HealthState>>,
    seq: AtomicU64,
    /// Servers a reload removed, until their last call is done.
    retired: Mutex<Vec<(Arc<str>, Weak<Downstream>)>>,
}

// === impl Health ===

impl Health {
    /// Each configured server with its last health, for `/readyz`.
    pub(crate) fn report(&self, g: &Generation) -> Vec<serde_json::Value> {
        let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        g.downstreams
            .iter()
            .map(|d| {
                serde_json::json!({
                    "name": d.name,
                    "mode": d.mode.as_str(),
                    "service_address": crate::config::redact_address(d.url.as_str()),
                    "health": states.get(&d.name),
                })
            })
            .collect()
    }

    /// The last health of the server `name`, if it was checked.
    pub(crate) fn state(&self, name: &str) -> Option<HealthState> {
        let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states.get(name).cloned()
    }

    /// Pings every server of the current generation once, concurrently.
    pub async fn check_all(&self, shared: &Shared) {
        let g = shared.current.load_full();
        let checks = g.downstreams.iter().map(|ds| {
            let n = self.seq.fetch_add(1, Ordering::Relaxed);
            let request_id = format!("health-{}-{n}", std::process::id());
            let payload = serde_json::json!({
                "request_id": request_id,
                "request_type": RequestType::Ping.code(),
                "request_detail": "",
                "extra_info": "",
            })
            .to_string();
            let g = &g;
            async move {
                let token = g.sign(Audience::Downstreams, payload.into_bytes()).await;
                let out = Outbound {
                    form: client::form_body(&token),
                    request_id: request_id.into(),
                    kind: Some(RequestType::Ping),
                    // The server's own timeout, from when its Ping is ready to go.
                    deadline: Instant::now() + ds.timeout,
                    span: tracing::Span::none(),
                };
                (ds.name.clone(), call(ds, &shared.metrics, &out).await)
            }
        });
        let results = futures::future::join_all(checks).await;
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        // Servers removed by a reload disappear from the report and the gauge.
        states.retain(|name, _| g.downstreams.iter().any(|d| &d.name == name));
        for (name, v) in results {
            let up = v.outcome == Outcome::Approved;
            log_change(&name, states.get(&name).map(|s| s.up), up, &v.detail);
            shared.metrics.set_downstream_up(&name, up, || {
                let now = shared.current.load();
                now.downstreams
                    .iter()
                    .find(|d| d.name == name)
                    .map(|d| d.mode)
            });
            states.insert(
                name,
                HealthState {
                    up,
                    outcome: v.outcome.as_str(),
                    latency_ms: v.duration.as_millis() as u64,
                    error: v.detail,
                    checked_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                },
            );
        }
    }

    /// Takes servers a reload removed: their series are deleted once their last call is done
    /// (see [`Health::forget_retired`]).
    pub(crate) fn retire(&self, removed: Vec<Arc<Downstream>>) {
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        retired.extend(removed.iter().map(|d| (d.name.clone(), Arc::downgrade(d))));
    }

    /// Deletes the series of retired servers nothing uses any more (no call, health check or
    /// generation holds them), unless the current config has a server of that name again.
    pub(crate) fn forget_retired(&self, shared: &Shared) {
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        if retired.is_empty() {
            return;
        }
        let g = shared.current.load();
        retired.retain(|(name, d)| {
            if d.strong_count() > 0 {
                return true;
            }
            if !g.downstreams.iter().any(|n| &n.name == name) {
                shared.metrics.forget_server(name);
            }
            false
        });
    }
}

/// One log line when a server's health changes (and at its first check): WARN with the reason
/// when it goes down, INFO when it comes up. Probes that change nothing log nothing.
fn log_change(name: &str, was: Option<bool>, up: bool, detail: &str) {
    match (was, up) {
        (Some(true), true) | (Some(false), false) => {}
        (_, true) => {
            tracing::info!(server = %name, "downstream up: its signed health ping is approved")
        }
        (_, false) => {
            tracing::warn!(server = %name, error = %detail, "downstream down: its signed health ping failed")
        }
    }
}

/// Runs health checks until the process ends, and forgets retired servers' series within a
/// second of their last call. The interval is re-read every round, so a reload that changes it
/// (or turns it off with 0) takes effect at the next round.
pub async fn run(shared: Arc<Shared>) {
    let mut next = Instant::now();
    loop {
        shared.health.forget_retired(&shared);
        let interval = shared.current.load().config.health_check_interval_ms;
        if interval != 0 && Instant::now() >= next {
            shared.health.check_all(&shared).await;
            next = Instant::now() + Duration::from_millis(interval);
        }
        let tick = Instant::now() + Duration::from_secs(1);
        let wake = if interval == 0 { tick } else { next.min(tick) };
        tokio::time::sleep_until(wake).await;
    }
}
