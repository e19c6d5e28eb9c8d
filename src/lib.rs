//! tss-callback-gateway: the one callback server a Cobo TSS Node talks to, which asks every
//! configured risk-control callback server at once and approves only if all of them (and the
//! node's embedded rules) do.
//!
//! A request flows through the modules in this order: [`server`] reads it, [`protocol`] verifies
//! the node's token, [`rules`] applies the embedded rules, [`fanout`] asks the downstreams through
//! [`client`], [`decision`] makes the answer, [`audit`] records it, and [`server`] signs it.

pub mod admission;
pub mod audit;
pub mod client;
pub mod config;
pub mod decision;
pub mod dedup;
pub mod demo;
pub mod fanout;
pub mod health;
pub mod keys;
pub mod metrics;
pub mod probe;
pub mod protocol;
pub mod reload;
pub mod replay;
pub mod rules;
pub mod runtime;
pub mod sample_server;
pub mod serve;
pub mod server;
pub mod signing_pool;
pub mod tls;
pub mod verify;

use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::audit::AuditLog;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::runtime::Runtime;

/// State shared by every request: the current config generation and what outlives it.
pub struct Shared {
    /// Swapped whole on reload; each request holds the generation it started with.
    pub runtime: ArcSwap<Runtime>,
    pub audit: ArcSwapOption<AuditLog>,
    /// Requests that will write an audit record and have not yet.
    pub audit_pending: Arc<audit::Pending>,
    pub metrics: Metrics,
    pub health: Health,
    /// Per process: replicas behind a load balancer each have their own.
    pub dedup: dedup::Dedup<Arc<server::Evaluation>>,
    /// Requests being decided, against `max_in_flight`.
    pub admission: admission::Admission,
}

// === impl Shared ===

impl Shared {
    /// Wraps a loaded generation; opens its audit log and sets the config gauges.
    pub fn new(rt: Runtime, metrics: Metrics) -> std::io::Result<Arc<Shared>> {
        let audit = match &rt.config.audit_log {
            Some(path) => Some(Arc::new(AuditLog::open(path)?)),
            None => None,
        };
        let shared = Shared {
            runtime: ArcSwap::from_pointee(rt),
            audit: ArcSwapOption::new(audit),
            audit_pending: Arc::default(),
            metrics,
            health: Health::default(),
            dedup: dedup::Dedup::new(dedup::DEFAULT_CAPACITY, dedup::DEFAULT_MAX_BYTES),
            admission: admission::Admission::default(),
        };
        shared.set_config_gauges();
        Ok(Arc::new(shared))
    }

    /// Moves the audit log to a new file if the open one was renamed or deleted (SIGHUP).
    pub fn reopen_audit(&self) {
        if let Some(audit) = self.audit.load_full() {
            if let Err(e) = audit.reopen(&self.runtime.load().signer) {
                tracing::error!(path = %audit.path().display(), error = %e, "cannot reopen the audit log");
            }
        }
    }

    /// Seals the audit log when the last pending request ended without a record (a dropped
    /// connection), and within `audit_checkpoint_ms` under steady load; a record written while
    /// no other is pending is sealed by [`audit::AuditLog::append`] itself. Runs until the process
    /// ends.
    pub async fn keep_audit_sealed(self: Arc<Self>) {
        loop {
            let ms = self.runtime.load().config.audit_checkpoint_ms;
            // A quarter of the bound, so a record is sealed at most 1.25 x `ms` after it.
            let tick = std::time::Duration::from_millis((ms / 4).clamp(10, 1000));
            tokio::select! {
                () = self.audit_pending.went_idle() => {}
                () = tokio::time::sleep(tick) => {}
            }
            let Some(audit) = self.audit.load_full() else {
                continue;
            };
            if ms == 0 {
                continue;
            }
            let idle = self.audit_pending.is_idle();
            let signer = &self.runtime.load().signer;
            if let Err(e) = audit.seal_if_due(signer, idle, std::time::Duration::from_millis(ms)) {
                tracing::error!(path = %audit.path().display(), error = %e, "audit log checkpoint failed");
            }
        }
    }

    /// `tss_gateway_callback_servers{mode}` and the last-success timestamp, for the current
    /// generation.
    pub fn set_config_gauges(&self) {
        let rt = self.runtime.load();
        for d in &rt.downstreams {
            self.metrics.register_server(&d.name);
        }
        for mode in [config::Mode::Enforce, config::Mode::Shadow] {
            let n = rt.downstreams.iter().filter(|d| d.mode == mode).count();
            self.metrics
                .callback_servers
                .with_label_values(&[mode.as_str()])
                .set(n as i64);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.metrics.config_last_reload_success.set(now);
    }
}
