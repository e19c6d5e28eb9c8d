//! The Prometheus registry and every metric handle, named exactly as CONTRACT.md section 7 says:
//! dashboards and alerts depend on these names and label values.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::Mode;
use crate::protocol::RequestType;
use crate::verdict::{Outcome, Verdict};

/// Buckets from 1 ms to 30 s, dense around the 5–500 ms where downstream answers usually land.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 15.0, 30.0,
];

/// Every metric the gateway exports, on a registry of its own (so several gateways can live in
/// one test process).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub(crate) requests: IntCounterVec,
    pub(crate) request_duration: HistogramVec,
    pub(crate) downstream_requests: IntCounterVec,
    pub(crate) downstream_duration: HistogramVec,
    /// `tss_gateway_downstream_up{server,mode}`: written only through
    /// [`Metrics::set_downstream_up`] and [`Metrics::register_server`], which keep one series
    /// per server, in its current mode.
    downstream_up: IntGaugeVec,
    /// Held while a `downstream_up` series is written or a reload's stale mode is deleted, so a
    /// health check that ends as a reload switches the server's mode cannot bring the old
    /// series back.
    downstream_up_lock: Arc<Mutex<()>>,
    pub(crate) downstream_slot_wait: HistogramVec,
    pub(crate) in_flight: IntGauge,
    pub(crate) embedded_rejections: IntCounterVec,
    pub(crate) config_reloads: IntCounterVec,
    pub(crate) config_last_reload_success: Gauge,
    pub(crate) callback_servers: IntGaugeVec,
    pub(crate) build_info: IntGaugeVec,
    /// `tss_gateway_audit_seq`: `seq` of the last audit checkpoint (a witness outside the
    /// audit folder).
    pub(crate) audit_seq: IntGauge,
    pub(crate) audit_discontinuities: IntCounter,
    pub(crate) audit_last_discontinuity: Gauge,
    pub(crate) audit_write_failures: IntCounter,
    /// 1 while the config on disk differs from the running one and does not load.
    pub(crate) config_reload_failing: IntGauge,
    pub(crate) connections_refused: IntCounterVec,
    /// `tss_gateway_events_total{type,outcome}`: `type` is bounded by [`event_type_label`].
    pub(crate) events: IntCounterVec,
    pub(crate) event_deliveries: IntCounterVec,
    pub(crate) event_backlog: IntGaugeVec,
    pub(crate) event_oldest_undelivered: GaugeVec,
    pub(crate) unapproved_executions: IntCounterVec,
    pub(crate) approved_then_failed: IntCounterVec,
    /// What the status page shows of the last minutes, fed where calls and deliveries are
    /// counted here.
    pub(crate) recent: Arc<crate::ops::status::Recent>,
}

/// Event outcomes (`tss_gateway_events_total{outcome}`).
pub(crate) mod event_outcome {
    pub(crate) const ACCEPTED: &str = "accepted";
    pub(crate) const INVALID_TOKEN: &str = "invalid_token";
    pub(crate) const INVALID_REQUEST: &str = "invalid_request";
    /// Verified but not recorded (state store or audit log unavailable): HTTP 503.
    pub(crate) const FAILED: &str = "failed";
    pub(crate) const ALL: [&str; 4] = [ACCEPTED, INVALID_TOKEN, INVALID_REQUEST, FAILED];
}

/// Delivery outcomes (`tss_gateway_event_deliveries_total{outcome}`), one per attempt; `dropped`
/// once per event given up.
pub(crate) mod delivery {
    pub(crate) const DELIVERED: &str = "delivered";
    /// The event server answered 4xx (Cobo's answer to a token or payload it refuses).
    pub(crate) const REFUSED: &str = "refused";
    pub(crate) const TIMEOUT: &str = "timeout";
    /// Connection refused or reset, or an answer other than 2xx/4xx.
    pub(crate) const TRANSPORT_ERROR: &str = "transport_error";
    pub(crate) const DROPPED: &str = "dropped";
    pub(crate) const ALL: [&str; 5] = [DELIVERED, REFUSED, TIMEOUT, TRANSPORT_ERROR, DROPPED];
}

/// Why a connection to `listen` was closed unanswered
/// (`tss_gateway_connections_refused_total{reason}`).
pub(crate) mod refused {
    /// The peer is outside `allowed_clients`; closed at accept.
    pub(crate) const NOT_ALLOWED: &str = "not_allowed";
    /// Headers and body did not arrive within `read_timeout_ms`.
    pub(crate) const READ_TIMEOUT: &str = "read_timeout";
    /// `max_connections` were open already; closed at accept.
    pub(crate) const TOO_MANY_CONNECTIONS: &str = "too_many_connections";
    pub(crate) const ALL: [&str; 3] = [NOT_ALLOWED, READ_TIMEOUT, TOO_MANY_CONNECTIONS];
}

/// Request outcomes (`tss_gateway_requests_total{outcome}`).
pub(crate) mod outcome {
    pub(crate) const APPROVED: &str = "approved";
    pub(crate) const REJECTED: &str = "rejected";
    pub(crate) const FAILED: &str = "failed";
    pub(crate) const INVALID_TOKEN: &str = "invalid_token";
    pub(crate) const INVALID_REQUEST: &str = "invalid_request";
    /// Answered HTTP 503 beyond `max_in_flight`, unread.
    pub(crate) const OVERLOADED: &str = "overloaded";
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let m = Metrics {
            requests: counters(
                &r,
                "tss_gateway_requests_total",
                "Callback requests answered, by task type and outcome.",
                &["type", "outcome"],
            ),
            request_duration: histogram(
                &r,
                "tss_gateway_request_duration_seconds",
                "Time from receiving a callback to answering it.",
                &["type"],
            ),
            downstream_requests: counters(
                &r,
                "tss_gateway_downstream_requests_total",
                "Calls to downstream callback servers, by server and outcome.",
                &["server", "outcome"],
            ),
            downstream_duration: histogram(
                &r,
                "tss_gateway_downstream_duration_seconds",
                "Time a downstream callback server took to answer, retries included.",
                &["server"],
            ),
            downstream_up: gauges(
                &r,
                "tss_gateway_downstream_up",
                "1 if the last health check of the server succeeded; mode is the server's mode (enforce, shadow).",
                &["server", "mode"],
            ),
            downstream_up_lock: Arc::default(),
            downstream_slot_wait: histogram(
                &r,
                "tss_gateway_downstream_slot_wait_seconds",
                "Time a call waited for a free slot of a server with max_concurrent set.",
                &["server"],
            ),
            in_flight: register(
                &r,
                IntGauge::new(
                    "tss_gateway_in_flight_requests",
                    "Callback requests being decided right now.",
                ),
            ),
            embedded_rejections: counters(
                &r,
                "tss_gateway_embedded_rejections_total",
                "Requests rejected by the embedded risk control rules.",
                &["type"],
            ),
            config_reloads: counters(
                &r,
                "tss_gateway_config_reloads_total",
                "Configuration reload attempts by result.",
                &["result"],
            ),
            config_last_reload_success: register(
                &r,
                Gauge::new(
                    "tss_gateway_config_last_reload_success_timestamp_seconds",
                    "Unix time of the last successful configuration load.",
                ),
            ),
            callback_servers: gauges(
                &r,
                "tss_gateway_callback_servers",
                "Configured downstream callback servers by mode.",
                &["mode"],
            ),
            build_info: gauges(
                &r,
                "tss_gateway_build_info",
                "Always 1; the version label says which build runs.",
                &["version"],
            ),
            audit_seq: register(
                &r,
                IntGauge::new(
                    "tss_gateway_audit_seq",
                    "seq of the last audit checkpoint written.",
                ),
            ),
            audit_discontinuities: register(
                &r,
                IntCounter::new(
                    "tss_gateway_audit_discontinuities_total",
                    "Audit files set aside because they were not the gateway's own chain.",
                ),
            ),
            audit_last_discontinuity: register(
                &r,
                Gauge::new(
                    "tss_gateway_audit_last_discontinuity_timestamp_seconds",
                    "Unix time of the last audit discontinuity (0: none since start-up).",
                ),
            ),
            audit_write_failures: register(
                &r,
                IntCounter::new(
                    "tss_gateway_audit_write_failures_total",
                    "Audit log writes (records or checkpoints) that failed.",
                ),
            ),
            config_reload_failing: register(
                &r,
                IntGauge::new(
                    "tss_gateway_config_reload_failing",
                    "1 while the config on disk differs from the running one and does not load (retried with backoff).",
                ),
            ),
            connections_refused: counters(
                &r,
                "tss_gateway_connections_refused_total",
                "Connections to listen closed unanswered, by reason.",
                &["reason"],
            ),
            events: counters(
                &r,
                "tss_gateway_events_total",
                "TSS Node events received, by event type (other: a type this gateway does not know, or unreadable) and outcome.",
                &["type", "outcome"],
            ),
            event_deliveries: counters(
                &r,
                "tss_gateway_event_deliveries_total",
                "Attempts to deliver an event to an event server, by outcome; dropped once per event given up.",
                &["server", "outcome"],
            ),
            event_backlog: gauges(
                &r,
                "tss_gateway_event_backlog",
                "Events recorded and not yet delivered to the server.",
                &["server"],
            ),
            event_oldest_undelivered: register(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "tss_gateway_event_oldest_undelivered_seconds",
                        "Age of the oldest event not yet delivered to the server (0: none).",
                    ),
                    &["server"],
                ),
            ),
            unapproved_executions: counters(
                &r,
                "tss_gateway_unapproved_executions_total",
                "request.*.succeeded events for a request no gateway replica approved, by task type.",
                &["type"],
            ),
            approved_then_failed: counters(
                &r,
                "tss_gateway_approved_then_failed_total",
                "request.*.failed events for a request a gateway replica approved, by task type.",
                &["type"],
            ),
            recent: Arc::default(),
            registry: r,
        };
        // The trace exporter is one per process: its counter is shown by every registry.
        let _ = m
            .registry
            .register(Box::new(crate::ops::traces::SPANS_DROPPED.clone()));
        m.start_at_zero();
        m
    }

    /// Every label value exists from the start, so rate() and alerts see a zero rather than an
    /// absence, and the first increment shows as an increase.
    fn start_at_zero(&self) {
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for result in ["success", "failure"] {
            self.config_reloads.with_label_values(&[result]);
        }
        for reason in refused::ALL {
            self.connections_refused.with_label_values(&[reason]);
        }
        let outcomes = [
            outcome::APPROVED,
            outcome::REJECTED,
            outcome::FAILED,
            outcome::INVALID_TOKEN,
            outcome::INVALID_REQUEST,
            outcome::OVERLOADED,
        ];
        for kind in RequestType::ALL.iter().map(|t| t.name()).chain(["unknown"]) {
            for o in outcomes {
                self.requests.with_label_values(&[kind, o]);
            }
            self.request_duration.with_label_values(&[kind]);
            self.embedded_rejections.with_label_values(&[kind]);
        }
        for t in RequestType::ALL.iter().filter(|t| **t != RequestType::Ping) {
            self.unapproved_executions.with_label_values(&[t.name()]);
            self.approved_then_failed.with_label_values(&[t.name()]);
        }
        for t in crate::protocol::event::known_types()
            .iter()
            .map(String::as_str)
            .chain(["other"])
        {
            for o in event_outcome::ALL {
                self.events.with_label_values(&[t, o]);
            }
        }
    }

    /// Creates every series of one event server at zero (at start and when a reload adds it).
    pub(crate) fn register_event_server(&self, server: &str) {
        for o in delivery::ALL {
            self.event_deliveries.with_label_values(&[server, o]);
        }
        self.event_backlog.with_label_values(&[server]);
        self.event_oldest_undelivered.with_label_values(&[server]);
    }

    /// Deletes every series of an event server that left the config.
    pub(crate) fn forget_event_server(&self, server: &str) {
        forget(&self.event_deliveries, server);
        forget(&self.event_backlog, server);
        forget(&self.event_oldest_undelivered, server);
    }

    /// Counts one event received, `type` bounded to the known types and `other`.
    pub(crate) fn count_event(&self, event_type: &str, outcome: &str) {
        self.events
            .with_label_values(&[event_type_label(event_type), outcome])
            .inc();
    }

    /// Creates every series of one downstream server at zero (at start and when a reload adds it),
    /// and deletes its `downstream_up` series of another mode than `mode` (a reload switched it):
    /// alerts page for enforcing servers only, so a stale `mode="enforce"` series must not stay.
    pub(crate) fn register_server(&self, server: &str, mode: Mode) {
        {
            let _guard = self
                .downstream_up_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for other in [Mode::Enforce, Mode::Shadow] {
                if other != mode {
                    let _ = self
                        .downstream_up
                        .remove_label_values(&[server, other.as_str()]);
                }
            }
        }
        for o in Outcome::RECORDED {
            self.downstream_requests
                .with_label_values(&[server, o.as_str()]);
        }
        self.downstream_duration.with_label_values(&[server]);
        self.downstream_slot_wait.with_label_values(&[server]);
    }

    /// Deletes every series of a server that left the config, whatever its other labels.
    pub(crate) fn forget_server(&self, server: &str) {
        forget(&self.downstream_requests, server);
        forget(&self.downstream_duration, server);
        forget(&self.downstream_up, server);
        forget(&self.downstream_slot_wait, server);
    }

    /// Sets `tss_gateway_downstream_up{server,mode}` after a health check of `server`, in the
    /// mode `mode_now` gives it in the running config, read under the lock
    /// [`Metrics::register_server`] takes: a reload that switches the mode meanwhile either
    /// comes first (the check writes the new mode) or deletes what the check wrote. `None`: the
    /// server has left the config, and nothing is written.
    pub(crate) fn set_downstream_up(
        &self,
        server: &str,
        up: bool,
        mode_now: impl FnOnce() -> Option<Mode>,
    ) {
        let _guard = self
            .downstream_up_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(mode) = mode_now() {
            self.downstream_up
                .with_label_values(&[server, mode.as_str()])
                .set(i64::from(up));
        }
    }

    /// Counts one finished call in `tss_gateway_downstream_requests_total{server,outcome}` and,
    /// unless it was cancelled or skipped (it took no time of its own), its duration.
    pub(crate) fn record_call(&self, v: &Verdict) {
        self.downstream_requests
            .with_label_values(&[&v.server, v.outcome.as_str()])
            .inc();
        let took = !matches!(v.outcome, Outcome::Cancelled | Outcome::Skipped);
        if took {
            self.downstream_duration
                .with_label_values(&[&v.server])
                .observe(v.duration.as_secs_f64());
        }
        self.recent
            .call(&v.server, v.outcome.as_str(), took.then_some(v.duration));
    }

    /// Counts one delivery attempt (or a drop, `took: None`) to the event server `server` in
    /// `tss_gateway_event_deliveries_total{server,outcome}`; `error` says why it failed.
    pub(crate) fn record_delivery(
        &self,
        server: &Arc<str>,
        outcome: &'static str,
        took: Option<std::time::Duration>,
        error: &str,
    ) {
        self.event_deliveries
            .with_label_values(&[server, outcome])
            .inc();
        self.recent.delivery(server, outcome, took, error);
    }

    /// The audit writer's handles to its own metrics.
    pub(crate) fn audit(&self) -> crate::ops::audit::AuditMetrics {
        crate::ops::audit::AuditMetrics {
            seq: self.audit_seq.clone(),
            discontinuities: self.audit_discontinuities.clone(),
            last_discontinuity: self.audit_last_discontinuity.clone(),
            write_failures: self.audit_write_failures.clone(),
            recent: self.recent.clone(),
        }
    }

    /// Counts one connection closed unanswered, for `reason` (see [`refused`]).
    pub(crate) fn refuse_connection(&self, reason: &str) {
        self.connections_refused.with_label_values(&[reason]).inc();
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding metrics that are registered and well-formed into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The `type` label of an event: its type when this gateway knows it, else `other`.
pub(crate) fn event_type_label(t: &str) -> &str {
    crate::protocol::event::type_label(t)
}

/// Deletes the series of `vec` whose `server` label is `server`.
fn forget<T: MetricVecBuilder>(vec: &MetricVec<T>, server: &str) {
    for family in vec.collect() {
        for m in family.get_metric() {
            let labels: HashMap<&str, &str> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            if labels.get("server") == Some(&server) {
                let _ = vec.remove(&labels);
            }
        }
    }
}

/// Registers `metric`; the definitions are static, so an error is a bug caught by every test.
fn register<M: Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    let m = metric.expect("metric definitions are static and valid");
    registry
        .register(Box::new(m.clone()))
        .expect("each metric is registered once");
    m
}

/// A histogram over [`BUCKETS`].
fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(BUCKETS.to_vec());
    register(registry, HistogramVec::new(opts, labels))
}

/// A labelled counter.
fn counters(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(registry, IntCounterVec::new(Opts::new(name, help), labels))
}

/// A labelled gauge.
fn gauges(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(registry, IntGaugeVec::new(Opts::new(name, help), labels))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
