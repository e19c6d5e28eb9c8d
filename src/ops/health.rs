//! Health checks: a signed Ping to every downstream every `health_check_interval_ms`, feeding
//! `tss_gateway_downstream_up` and `/readyz`.
//!
//! Health is information only. The decision path never reads it, so a server that looks healthy
//! still has to approve each request, and one that looks down is still asked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::time::Instant;

use crate::generation::{Audience, Generation};
use crate::outbound::{call::call, client, Outbound};
use crate::protocol::RequestType;
use crate::verdict::Outcome;
use crate::Shared;

/// The last health check of one server.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct HealthState {
    up: bool,
    outcome: &'static str,
    latency_ms: u64,
    error: String,
    /// RFC 3339 time of the check.
    checked_at: String,
}

/// Last health state per server name.
#[derive(Debug, Default)]
pub struct Health {
    states: Mutex<HashMap<Arc<str>, HealthState>>,
    seq: AtomicU64,
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
            shared
                .metrics
                .downstream_up
                .with_label_values(&[&name])
                .set(i64::from(up));
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

    /// Forgets the gauge of servers no longer configured.
    pub(crate) fn prune_gauges(&self, shared: &Shared, removed: &[Arc<str>]) {
        for name in removed {
            let _ = shared.metrics.downstream_up.remove_label_values(&[name]);
        }
    }
}

/// Runs health checks until the process ends. The interval is re-read every round, so a reload
/// that changes it (or turns it off with 0) takes effect at the next round.
pub async fn run(shared: Arc<Shared>) {
    loop {
        let interval = shared.current.load().config.health_check_interval_ms;
        if interval == 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        shared.health.check_all(&shared).await;
        tokio::time::sleep(Duration::from_millis(interval)).await;
    }
}
