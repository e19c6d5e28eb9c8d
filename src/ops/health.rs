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

use crate::fanout::{self, Outcome};
use crate::protocol::{self, RequestType};
use crate::runtime::Runtime;
use crate::Shared;

/// The last health check of one server.
#[derive(Debug, Clone, Serialize)]
pub struct HealthState {
    pub up: bool,
    pub outcome: &'static str,
    pub latency_ms: u64,
    pub error: String,
    /// RFC 3339 time of the check.
    pub checked_at: String,
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
    pub fn report(&self, rt: &Runtime) -> Vec<serde_json::Value> {
        let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        rt.downstreams
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
        let rt = shared.runtime.load_full();
        let expire = rt.config.token_expire_minutes as i64 * 60;
        let checks = rt.downstreams.iter().map(|ds| {
            let n = self.seq.fetch_add(1, Ordering::Relaxed);
            let request_id = format!("health-{}-{n}", std::process::id());
            let payload = serde_json::json!({
                "request_id": request_id,
                "request_type": RequestType::Ping.code(),
                "request_detail": "",
                "extra_info": "",
            })
            .to_string();
            let form = crate::client::form_body(&protocol::sign_token(
                rt.request_signer(),
                payload.as_bytes(),
                &rt.config.service_name,
                expire,
            ));
            async move {
                let deadline = Instant::now() + ds.timeout;
                let v = fanout::call(ds, &shared.metrics, &form, &request_id, true, deadline).await;
                (ds.name.clone(), v)
            }
        });
        let results = futures::future::join_all(checks).await;
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        // Servers removed by a reload disappear from the report and the gauge.
        states.retain(|name, _| rt.downstreams.iter().any(|d| &d.name == name));
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
    pub fn prune_gauges(&self, shared: &Shared, removed: &[Arc<str>]) {
        for name in removed {
            let _ = shared.metrics.downstream_up.remove_label_values(&[name]);
        }
    }
}

/// Runs health checks until the process ends. The interval is re-read every round, so a reload
/// that changes it (or turns it off with 0) takes effect at the next round.
pub async fn run(shared: Arc<Shared>) {
    loop {
        let interval = shared.runtime.load().config.health_check_interval_ms;
        if interval == 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        shared.health.check_all(&shared).await;
        tokio::time::sleep(Duration::from_millis(interval)).await;
    }
}
