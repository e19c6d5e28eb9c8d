//! What outlives a config generation: the state every request shares (the current generation,
//! the audit log, metrics, health, the duplicate memory, admission).

use std::path::Path;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::config::Mode;
use crate::generation::Generation;
use crate::inbound::admission::Admission;
use crate::inbound::dedup::{self, Dedup};
use crate::ops::audit::{self, AuditLog};
use crate::ops::health::Health;
use crate::ops::metrics::Metrics;
use crate::state::Store;
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
    /// The state store (event outbox, approvals index, alarms), when the config uses one.
    pub store: Option<Arc<Store>>,
    /// Wakes the event delivery workers when an event is recorded.
    pub(crate) delivery: crate::outbound::events::Wake,
    /// The last decisions, for the status page.
    pub(crate) decisions: crate::ops::status::Decisions,
}

/// Why [`Shared::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Store(#[from] crate::state::StoreError),
    #[error("audit log: {0}")]
    Audit(std::io::Error),
}

// === impl Shared ===

impl Shared {
    /// Wraps a loaded generation; opens its audit log (which records the config and a `start`
    /// checkpoint) and sets the config gauges. A config that uses a state store needs
    /// [`Shared::open`].
    pub fn new(g: Generation, metrics: Metrics) -> std::io::Result<Arc<Shared>> {
        if g.config.state_store().is_some() {
            return Err(std::io::Error::other(
                "this config uses a state store: open it with Shared::open",
            ));
        }
        Shared::build(g, metrics, None)
    }

    /// As [`Shared::new`], also opening the state store the config uses (migrations applied)
    /// and starting the event delivery, heartbeat and pruning tasks on the current runtime.
    pub async fn open(g: Generation, metrics: Metrics) -> Result<Arc<Shared>, OpenError> {
        let store = match g.config.state_store() {
            Some(at) => Some(Arc::new(
                Store::open(&at, crate::state::replica_id()).await?,
            )),
            None => None,
        };
        let shared = Shared::build(g, metrics, store).map_err(OpenError::Audit)?;
        if shared.store.is_some() {
            crate::outbound::events::start(&shared);
        }
        Ok(shared)
    }

    fn build(
        g: Generation,
        metrics: Metrics,
        store: Option<Arc<Store>>,
    ) -> std::io::Result<Arc<Shared>> {
        let g = Arc::new(g);
        let pending = Arc::<audit::Pending>::default();
        let audit = match &g.config.audit_log {
            Some(path) => Some(Arc::new(AuditLog::open(
                path,
                &g.signer,
                pending.clone(),
                metrics.audit(),
            )?)),
            None => None,
        };
        let shared = Shared {
            current: ArcSwap::new(g.clone()),
            audit: ArcSwapOption::new(audit.clone()),
            audit_pending: pending,
            metrics,
            health: Health::default(),
            dedup: Dedup::new(dedup::DEFAULT_CAPACITY, dedup::DEFAULT_MAX_BYTES),
            admission: Admission::default(),
            reload: Default::default(),
            store,
            delivery: Default::default(),
            decisions: Default::default(),
        };
        shared.set_config_gauges();
        if let Some(audit) = audit {
            audit.start(&g, audit::config_record(None, &g, "start"));
        }
        Ok(Arc::new(shared))
    }

    /// Opens the audit log a reloaded config names (`g`: the generation being loaded).
    pub(crate) fn open_audit(&self, path: &Path, g: &Generation) -> std::io::Result<Arc<AuditLog>> {
        AuditLog::open(
            path,
            &g.signer,
            self.audit_pending.clone(),
            self.metrics.audit(),
        )
        .map(Arc::new)
    }

    /// Records the generation now current, loaded by a reload from `old` (a `config` record),
    /// and warns when it checks less than `old` did.
    pub(crate) fn audit_config(&self, old: &Generation, reason: &str) {
        let next = self.current.load_full();
        audit::warn_if_weaker(old, &next);
        if let Some(audit) = self.audit.load_full() {
            audit.record(&next, audit::config_record(Some(old), &next, reason));
        }
    }

    /// Moves the audit log to a new file if the open one was renamed or deleted (SIGHUP).
    pub(crate) fn reopen_audit(&self) {
        if let Some(audit) = self.audit.load_full() {
            audit.reopen(&self.current.load_full());
        }
    }

    /// `tss_gateway_callback_servers{mode}` and the last-success timestamp, for the current
    /// generation.
    pub(crate) fn set_config_gauges(&self) {
        let g = self.current.load();
        crate::ops::status::forget_removed(&self.metrics.recent, &g);
        for d in &g.downstreams {
            self.metrics.register_server(&d.name, d.mode);
        }
        for e in &g.event_servers {
            self.metrics.register_event_server(&e.name);
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
