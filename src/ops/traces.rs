//! OpenTelemetry traces (`tracing:`): one trace per node request or event, exported in batches
//! over OTLP/HTTP, and the W3C `traceparent` that joins the node, the downstreams and the event
//! servers to it.
//!
//! Guarantees:
//! - Tracing never decides anything and never waits: a span that ends is handed to a bounded
//!   queue or dropped (counted in `tss_gateway_trace_spans_dropped_total{reason="queue_full"}`);
//!   a batch the collector does not take is dropped too (`reason="export_failed"`). Exports run
//!   on the SDK's own thread, never on a request's path.
//! - Without `tracing:` no exporter exists and the spans below are disabled at their call
//!   sites (an atomic load each): no ids, no `traceparent`, nothing recorded.
//! - Sampling: a trace the gateway starts (no `traceparent` from the node) is kept with
//!   probability `sample_ratio`, decided from its trace id (so services sharing a ratio keep the
//!   same traces). A node's `traceparent` gives the trace id and the parent; its sampled flag can
//!   only turn a trace off: flag 0 is never recorded, flag 1 is recorded within `sample_ratio`
//!   (by the same trace-id rule). `sample_ratio: 0` thus records nothing, whatever the node says.
//!   Spans within the gateway follow their parent's decision. `sample_ratio` is applied live on
//!   reload; the endpoint is fixed at start-up (see [`reload`]).
//! - The collector's URL may carry credentials: they are sent as HTTP basic auth and never
//!   printed (logs, `check-config`, errors).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SamplingDecision, SamplingResult,
    SdkTracerProvider, ShouldSample, Span as SdkSpan, SpanData, SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::{redact_address, TracingConfig};

/// The target of every span meant for traces. Log lines never show these spans (the log
/// filter turns the target off), and only they reach the exporter.
pub const TARGET: &str = "tss_gateway_traces";

/// Spans waiting for export at most; one more is dropped (and counted).
const MAX_QUEUE: usize = 2048;
/// How long one export may take before its batch is given up.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long spans wait to be batched.
const EXPORT_EVERY: Duration = Duration::from_secs(1);
/// How long a clean shutdown waits for the last spans to go out.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(3);

/// `sample_ratio` now, as f64 bits; 0 until an exporter starts.
static RATIO: AtomicU64 = AtomicU64::new(0);
/// The traces URL the running exporter posts to, as written and redacted, once one is started.
static STARTED: OnceLock<(String, String)> = OnceLock::new();

/// `tss_gateway_trace_spans_dropped_total{reason}`: one process, one exporter, one counter;
/// every [`crate::ops::metrics::Metrics`] registry shows it.
pub(crate) static SPANS_DROPPED: LazyLock<prometheus::IntCounterVec> = LazyLock::new(|| {
    let counter = prometheus::IntCounterVec::new(
        prometheus::Opts::new(
            "tss_gateway_trace_spans_dropped_total",
            "Spans not exported: the export queue was full, or the collector did not take their batch",
        ),
        &["reason"],
    )
    .expect("a valid metric definition");
    for reason in [QUEUE_FULL, EXPORT_FAILED] {
        counter.with_label_values(&[reason]);
    }
    counter
});

const QUEUE_FULL: &str = "queue_full";
const EXPORT_FAILED: &str = "export_failed";

/// The running exporter: its tracer provider, flushed at shutdown.
pub struct Exporter {
    provider: SdkTracerProvider,
}

/// Why the exporter could not start.
#[derive(Debug, thiserror::Error)]
#[error("tracing.otlp_endpoint {endpoint}: {message}")]
pub struct StartError {
    endpoint: String,
    message: String,
}

// === impl Exporter ===

impl Exporter {
    /// Builds the exporter for `config`; exports run on `runtime` (the gateway's own).
    pub fn start(
        config: &TracingConfig,
        service_name: &str,
        runtime: tokio::runtime::Handle,
    ) -> Result<Exporter, StartError> {
        let shown = redact_address(&config.traces_url());
        let fail = |message: String| StartError {
            endpoint: shown.clone(),
            message,
        };
        let mut url = reqwest::Url::parse(&config.traces_url()).map_err(|e| fail(e.to_string()))?;
        let credentials = (!url.username().is_empty()).then(|| {
            (
                percent_decoded(url.username()),
                url.password().map(percent_decoded),
            )
        });
        let _ = url.set_username("");
        let _ = url.set_password(None);
        let http = crate::outbound::client::builder(Duration::from_secs(2))
            .timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let client = Client {
            http,
            url: url.clone(),
            credentials,
            runtime,
        };
        let queued = Arc::new(AtomicUsize::new(0));
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_endpoint(url.as_str())
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let batch = BatchSpanProcessor::builder(Counted {
            inner: exporter,
            queued: queued.clone(),
        })
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(MAX_QUEUE)
                .with_scheduled_delay(EXPORT_EVERY)
                .build(),
        )
        .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Bounded {
                inner: batch,
                queued,
            })
            .with_sampler(Sampling)
            .with_resource(
                Resource::builder()
                    .with_service_name(service_name.to_owned())
                    .build(),
            )
            .build();
        set_ratio(config.sample_ratio);
        let _ = STARTED.set((config.traces_url(), shown));
        Ok(Exporter { provider })
    }

    /// The layer that turns [`TARGET`] spans into OpenTelemetry spans (and nothing else).
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use tracing_subscriber::Layer;
        let tracer = self.provider.tracer("tss-callback-gateway");
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_filter(tracing_subscriber::filter::filter_fn(|m| {
                m.is_span() && m.target() == TARGET
            }))
    }

    /// Sends the spans still queued, waiting at most a few seconds (a collector that is down
    /// does not hold the shutdown).
    pub fn shutdown(self) {
        let _ = self.provider.shutdown_with_timeout(SHUTDOWN_WAIT);
    }
}

/// A URL's user or password as sent in basic auth: percent-decoded (RFC 3986 userinfo, where
/// `+` is a plus, not a space as in a form).
fn percent_decoded(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

fn set_ratio(ratio: f64) {
    RATIO.store(ratio.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
}

fn ratio() -> f64 {
    f64::from_bits(RATIO.load(Ordering::Relaxed))
}

/// What a reload does to tracing: `sample_ratio` applies at once; the exporter (its endpoint)
/// is fixed at start-up, so adding `tracing:`, removing it or moving the endpoint takes effect
/// at restart (a WARN line says so); removing it stops recording new traces at once.
pub(crate) fn reload(old: Option<&TracingConfig>, new: Option<&TracingConfig>) {
    let Some(running) = STARTED.get() else {
        if new.is_some() {
            tracing::warn!("tracing added: traces are exported from the next restart");
        }
        return;
    };
    match new {
        Some(t) => {
            if old.map(|o| o.sample_ratio) != Some(t.sample_ratio) {
                tracing::info!(
                    sample_ratio = t.sample_ratio,
                    "tracing.sample_ratio applied"
                );
            }
            set_ratio(t.sample_ratio);
            if t.traces_url() != running.0 {
                tracing::warn!(
                    running = %running.1,
                    configured = %redact_address(&t.traces_url()),
                    "tracing.otlp_endpoint changed: takes effect at restart; spans go to the running endpoint until then"
                );
            }
        }
        None => {
            set_ratio(0.0);
            tracing::warn!(
                "tracing removed: no new trace is recorded; the exporter stops at restart"
            );
        }
    }
}

// === Sampling ===

/// See the module's guarantees: the trace-id ratio for traces the gateway starts and for a
/// node's sampled traces; a node's unsampled trace and local children follow their parent.
#[derive(Debug, Clone)]
struct Sampling;

impl ShouldSample for Sampling {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[opentelemetry::trace::Link],
    ) -> SamplingResult {
        let parent = parent
            .filter(|c| c.has_active_span())
            .map(|c| c.span().span_context().clone())
            .filter(|s| s.is_valid());
        let keep = match &parent {
            Some(p) if !p.is_remote() || !p.is_sampled() => p.is_sampled(),
            _ => {
                Sampler::TraceIdRatioBased(ratio())
                    .should_sample(None, trace_id, name, kind, attributes, links)
                    .decision
                    == SamplingDecision::RecordAndSample
            }
        };
        SamplingResult {
            decision: if keep {
                SamplingDecision::RecordAndSample
            } else {
                SamplingDecision::Drop
            },
            attributes: Vec::new(),
            trace_state: parent.map(|p| p.trace_state().clone()).unwrap_or_default(),
        }
    }
}

// === The queue bound and the drop counts ===

/// The batch processor with a bound of our own in front of it, so that a span it would drop
/// silently (queue full) is counted instead.
#[derive(Debug)]
struct Bounded {
    inner: BatchSpanProcessor,
    /// Spans handed to `inner` and not yet through an export.
    queued: Arc<AtomicUsize>,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut SdkSpan, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= MAX_QUEUE {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            SPANS_DROPPED.with_label_values(&[QUEUE_FULL]).inc();
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, counting the spans of each batch that did not go out.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    queued: Arc<AtomicUsize>,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let result = self.inner.export(batch).await;
        self.queued.fetch_sub(n, Ordering::AcqRel);
        if result.is_err() {
            SPANS_DROPPED
                .with_label_values(&[EXPORT_FAILED])
                .inc_by(n as u64);
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

// === The exporter's HTTP client ===

/// Posts OTLP batches with the gateway's own reqwest client, on the gateway's runtime (the
/// SDK's export thread has none), to the configured URL only.
#[derive(Debug)]
struct Client {
    http: reqwest::Client,
    url: reqwest::Url,
    credentials: Option<(String, Option<String>)>,
    runtime: tokio::runtime::Handle,
}

/// Collector answers read at most: an OTLP answer is a few bytes.
const MAX_COLLECTOR_ANSWER: usize = 64 * 1024;

#[async_trait::async_trait]
impl HttpClient for Client {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let mut post = self.http.post(self.url.clone()).body(body);
        for (name, value) in &parts.headers {
            post = post.header(name, value);
        }
        if let Some((user, password)) = &self.credentials {
            post = post.basic_auth(user, password.as_ref());
        }
        let sent = self.runtime.spawn(async move {
            let mut answer = post.send().await?;
            let status = answer.status();
            let mut body = Vec::new();
            while let Some(chunk) = answer.chunk().await? {
                if body.len() + chunk.len() > MAX_COLLECTOR_ANSWER {
                    break;
                }
                body.extend_from_slice(&chunk);
            }
            Ok::<_, reqwest::Error>((status, body))
        });
        let (status, body) = sent
            .await
            .map_err(|e| Box::new(e) as HttpError)?
            // Without the URL: the error must not carry credentials anywhere.
            .map_err(|e| Box::new(e.without_url()) as HttpError)?;
        Ok(Response::builder()
            .status(status.as_u16())
            .body(Bytes::from(body))?)
    }
}

// === Propagation and ids ===

/// The W3C `traceparent` (and `tracestate`) of `span`, if it has a trace: for a downstream's
/// or event server's request, and stored with an outbox entry.
pub(crate) fn traceparent(span: &tracing::Span) -> Option<String> {
    let mut carrier = headers_of(span);
    carrier.remove("traceparent")
}

/// The propagation headers of `span` (none when tracing is off).
pub(crate) fn headers_of(span: &tracing::Span) -> HashMap<String, String> {
    let mut carrier = HashMap::new();
    if span.is_disabled() {
        return carrier;
    }
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    }
    carrier
}

/// Adds the current span's `traceparent` (and `tracestate`) to an outgoing request.
pub(crate) fn propagate(request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    let span = tracing::Span::current();
    if span.is_disabled() {
        return request;
    }
    headers_of(&span)
        .into_iter()
        .fold(request, |r, (k, v)| r.header(k, v))
}

/// Makes the node's `traceparent` (in `headers`), if any, the parent of `span`, which must not
/// have been entered yet.
pub(crate) fn adopt(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    if span.is_disabled() || !headers.contains_key("traceparent") {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&HeaderCarrier(headers));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Makes a stored `traceparent` the parent of `span` (an event's delivery joins its trace).
pub(crate) fn adopt_stored(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(tp) = traceparent.filter(|_| !span.is_disabled()) else {
        return;
    };
    let carrier = HashMap::from([("traceparent".to_owned(), tp.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The trace id of `span` in hex, for log lines; `None` without tracing.
pub(crate) fn trace_id(span: &tracing::Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Records the HTTP version of an answer on the current span.
pub(crate) fn record_http_version(version: reqwest::Version) {
    let span = tracing::Span::current();
    if !span.is_disabled() {
        span.record("http.version", tracing::field::debug(version));
    }
}

/// Reads request headers for the propagator.
struct HeaderCarrier<'a>(&'a axum::http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceState};

    fn remote(sampled: bool) -> Context {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(7u128 << 64),
            SpanId::from(9u64),
            flags,
            true,
            TraceState::default(),
        ))
    }

    fn decide(parent: Option<&Context>, trace_id: u128) -> SamplingDecision {
        Sampling
            .should_sample(
                parent,
                TraceId::from(trace_id),
                "x",
                &SpanKind::Server,
                &[],
                &[],
            )
            .decision
    }

    #[test]
    fn collector_credentials_are_decoded_as_userinfo_not_as_a_form() {
        let url = reqwest::Url::parse("http://ops%40corp:a+b%2Fc%3D@collector:4318").unwrap();
        assert_eq!(percent_decoded(url.username()), "ops@corp");
        assert_eq!(percent_decoded(url.password().unwrap()), "a+b/c=");
    }

    /// The node can turn sampling off, never on beyond `sample_ratio`.
    #[test]
    fn sampling_follows_the_ratio_and_a_node_can_only_turn_it_off() {
        use SamplingDecision::*;
        let tid = 7u128 << 64;
        set_ratio(1.0);
        assert_eq!(decide(None, tid), RecordAndSample);
        assert_eq!(decide(Some(&remote(true)), tid), RecordAndSample);
        assert_eq!(decide(Some(&remote(false)), tid), Drop);
        set_ratio(0.0);
        assert_eq!(decide(None, tid), Drop);
        assert_eq!(decide(Some(&remote(true)), tid), Drop);
        set_ratio(1.0);
    }
}
