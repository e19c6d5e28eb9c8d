//! What outlives a config generation: the state every request shares (the current generation,
//! the audit log, metrics, health, the duplicate memory, admission), and the background work that
//! keeps the audit log sealed.

use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::config::Mode;
use crate::generation::Generation;
use crate::inbound::admission::Admission;
use crate::inbound::dedup::{self, Dedup};
use crate::ops::audit::{self, AuditLog};
use crate::ops::health::Health;
use crate::ops::metrics::Metrics;
use crate::verdict::Evaluation;

/// State shared by every request: the current config generation and what outlives it.
pub struct Shared {
    /// The current generation, swapped whole on reload; each request holds the generation it
    /// started with.
    pub current: ArcSwap<Generation>,
    pub audit: ArcSwapOption<AuditLog>,
    /// Requests that will write an audit record and have not yet.
    pub(crate) audit_pending: Arc<audit::Pending>,
    pub metrics: Metrics,
    pub health: Health,
    /// Per process: replicas behind a load balancer each have their own.
    pub dedup: Dedup<Arc<Evaluation>>,
    /// Requests being decided, against `max_in_flight`.
    pub admission: Admission,
    /// Whether the config on disk loads (for `/readyz` and the watcher's retries).
    pub reload: crate::ops::reload::Status,
}

// === impl Shared ===

impl Shared {
    /// Wraps a loaded generation; opens its audit log and sets the config gauges.
    pub fn new(g: Generation, metrics: Metrics) -> std::io::Result<Arc<Shared>> {
        let audit = match &g.config.audit_log {
            Some(path) => Some(Arc::new(AuditLog::open(path)?)),
            None => None,
        };
        let shared = Shared {
            current: ArcSwap::from_pointee(g),
            audit: ArcSwapOption::new(audit),
            audit_pending: Arc::default(),
            metrics,
            health: Health::default(),
            dedup: Dedup::new(dedup::DEFAULT_CAPACITY, dedup::DEFAULT_MAX_BYTES),
            admission: Admission::default(),
            reload: Default::default(),
        };
        shared.set_config_gauges();
        Ok(Arc::new(shared))
    }

    /// Moves the audit log to a new file if the open one was renamed or deleted (SIGHUP).
    pub(crate) fn reopen_audit(&self) {
        if let Some(audit) = self.audit.load_full() {
            if let Err(e) = audit.reopen(&self.current.load().signer) {
                tracing::error!(path = %audit.path().display(), error = %e, "cannot reopen the audit log");
            }
        }
    }

    /// Seals the audit log when the last pending request ended without a record (a dropped
    /// connection), and within `audit_checkpoint_ms` under steady load; a record written while
    /// no other is pending is sealed by [`AuditLog::append`] itself. Runs until the process
    /// ends.
    pub(crate) async fn keep_audit_sealed(self: Arc<Self>) {
        loop {
            let ms = self.current.load().config.audit_checkpoint_ms;
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
            let signer = &self.current.load().signer;
            if let Err(e) = audit.seal_if_due(signer, idle, std::time::Duration::from_millis(ms)) {
                tracing::error!(path = %audit.path().display(), error = %e, "audit log checkpoint failed");
            }
        }
    }

    /// `tss_gateway_callback_servers{mode}` and the last-success timestamp, for the current
    /// generation.
    pub(crate) fn set_config_gauges(&self) {
        let g = self.current.load();
        for d in &g.downstreams {
            self.metrics.register_server(&d.name);
        }
        for mode in [Mode::Enforce, Mode::Shadow] {
            let n = g.downstreams.iter().filter(|d| d.mode == mode).count();
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
