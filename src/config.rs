//! The YAML configuration: schema, defaults and validation. Every refusal is one line that names
//! the field or file at fault.

use std::collections::BTreeSet;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::protocol::RequestType;
use crate::rules::RuleSet;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: field `{field}`: {message}")]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("config {path}: field `{field}`: {source}")]
    Key {
        path: PathBuf,
        field: String,
        source: crate::protocol::keys::KeyError,
    },
}

/// A refusal before it is placed in its file: the field at fault and why.
type FieldError = (String, String);

/// Largest config file accepted.
const MAX_CONFIG_BYTES: usize = 1 << 20;
/// Deepest `[`/`{` nesting accepted.
const MAX_FLOW_DEPTH: usize = 32;

/// The deepest nesting of YAML flow brackets, ignoring quoted strings and comments.
fn flow_depth(text: &str) -> usize {
    let (mut depth, mut max, mut quote, mut comment, mut prev) = (0usize, 0, None, false, ' ');
    for c in text.chars() {
        match (quote, c) {
            // Quoted scalars may span lines, so only the comment ends here.
            (_, '\n') => comment = false,
            _ if comment => {}
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '#') if prev.is_whitespace() => comment = true,
            (None, '\'' | '"') => quote = Some(c),
            (None, '[' | '{') => {
                depth += 1;
                max = max.max(depth);
            }
            (None, ']' | '}') => depth = depth.saturating_sub(1),
            _ => {}
        }
        prev = c;
    }
    max
}

/// A parsed and validated configuration, paths already resolved against the config's folder.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// When set, `/metrics`, `/readyz`, `/healthz` and `/status` are served here and not on `listen`.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    #[serde(default = "default_service_name")]
    pub service_name: String,
    pub tss_node_public_key: PathBuf,
    pub gateway_private_key: PathBuf,
    /// Signs the requests forwarded to downstreams (which hold its public key); answers to the
    /// node are signed with `gateway_private_key`, so neither token can stand in for the other.
    #[serde(default)]
    pub downstream_signing_key: Option<PathBuf>,
    #[serde(default = "default_token_expire_minutes")]
    pub token_expire_minutes: u64,
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    #[serde(default = "default_health_check_interval_ms")]
    pub health_check_interval_ms: u64,
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    /// Each audit record also carries the verified CallbackRequest (for `replay`).
    #[serde(default)]
    pub audit_payloads: bool,
    /// A signed checkpoint closes every this many audit records (and every file, at shutdown and
    /// rotation).
    #[serde(default = "default_audit_checkpoint_every")]
    pub audit_checkpoint_every: u64,
    /// Unsealed audit records get a checkpoint as soon as no request is being decided, and at
    /// most this long after the first of them under steady load; 0 = only the checkpoints above.
    #[serde(default = "default_audit_checkpoint_ms")]
    pub audit_checkpoint_ms: u64,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    #[serde(default)]
    pub embedded_risk_control_rules: RuleSet,
    #[serde(default)]
    pub callback_servers: Vec<ServerConfig>,
    /// Serve the TSS Node over HTTPS with this certificate chain and key.
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    /// Requests being decided at once; one more is answered at once with HTTP 503.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// A changed config or key file seen by the watcher is loaded only once the bytes of every
    /// watched file stayed the same this long, so a file written in place is never loaded half
    /// written. SIGHUP loads at once.
    #[serde(default = "default_reload_settle_ms")]
    pub reload_settle_ms: u64,
    /// From a request's first byte, its headers and body must arrive within this, else the
    /// connection is closed; a request holds no `max_in_flight` slot until its body is read.
    #[serde(default = "default_read_timeout_ms")]
    pub read_timeout_ms: u64,
    /// CIDR blocks (or single addresses) that may connect to `listen`; others are closed at
    /// accept, before TLS or HTTP. Absent: any peer. As written; see [`Config::allowed_nets`].
    #[serde(default)]
    pub allowed_clients: Option<Vec<String>>,
    /// The config's folder, against which a relative `state_store` resolves.
    #[serde(skip)]
    store_base: PathBuf,
    /// `allowed_clients` parsed, filled in by [`Config::parse`].
    #[serde(skip)]
    pub(crate) allowed_nets: Option<Vec<ipnet::IpNet>>,
    /// Connections open on `listen` at once; beyond it a new one is closed at accept. Default
    /// [`Config::max_connections`]: 4 x `max_in_flight`, at least 1024.
    #[serde(default, rename = "max_connections")]
    max_connections_written: Option<usize>,
    /// The node's event key (public): when set, `POST /v2/event` accepts events it signed.
    #[serde(default)]
    pub tss_node_event_public_key: Option<PathBuf>,
    /// Each gets every verified event (or those of its `event_types`), re-signed with the
    /// downstream signing key, at least once.
    #[serde(default)]
    pub event_servers: Vec<EventServerConfig>,
    /// As written: a SQLite file (relative to the config's folder) or a `postgres://` URL.
    /// See [`Config::state_store`] for when it is used.
    #[serde(default, rename = "state_store")]
    state_store_written: Option<String>,
    /// An undelivered event is retried this long, then dropped (audited).
    #[serde(default = "default_event_retry_hours")]
    pub event_retry_hours: u64,
    /// How long the approvals index keeps an approval for reconciliation.
    #[serde(default = "default_approval_retention_days")]
    pub approval_retention_days: u64,
    /// OpenTelemetry traces over OTLP/HTTP; absent: no exporter, spans cost nothing.
    #[serde(default)]
    pub tracing: Option<TracingConfig>,
}

/// `tracing:` — where spans go and how many traces are kept.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector's base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT`: spans go to
    /// `<base>/v1/traces`. May hold credentials: print it only through [`redact_address`].
    pub otlp_endpoint: String,
    /// The share of traces recorded, 0.0 to 1.0 (by trace id, so every service with the same
    /// ratio keeps the same traces).
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
}

impl TracingConfig {
    /// Where spans are posted: `<otlp_endpoint>/v1/traces`.
    pub fn traces_url(&self) -> String {
        format!("{}/v1/traces", self.otlp_endpoint.trim_end_matches('/'))
    }
}

/// One event server: it gets the node's events, re-signed by the gateway.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EventServerConfig {
    pub name: String,
    pub service_address: String,
    #[serde(default = "default_event_timeout_ms")]
    pub timeout_ms: u64,
    /// Only these event types (`request.keysign.succeeded`, `ping`); absent: every type,
    /// including ones this gateway does not know.
    #[serde(default)]
    pub event_types: Option<Vec<String>>,
}

/// Where the state store (event outbox, approvals index, alarms) lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A SQLite file, this replica's own.
    Sqlite(PathBuf),
    /// A PostgreSQL database shared by every replica (the URL may hold a password: print it
    /// only through [`redact_address`]).
    Postgres(String),
}

/// One downstream callback server.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub name: String,
    pub service_address: String,
    pub pubkey_path: PathBuf,
    /// Per attempt: the value written in the file, else min(5000, `deadline_ms`). Filled in by
    /// [`Config::parse`].
    #[serde(skip)]
    pub timeout_ms: u64,
    /// `timeout_ms` as written; only an explicit value above `deadline_ms` is refused.
    #[serde(default, rename = "timeout_ms")]
    timeout_ms_written: Option<u64>,
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default = "default_request_types")]
    /// By config name (`key_sign`); Ping is implied for every server.
    pub request_types: Vec<RequestType>,
    #[serde(default)]
    pub mode: Mode,
    /// PEM CA bundle that replaces the system roots for this `https` server.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS (with `client_key`).
    #[serde(default)]
    pub(crate) client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    #[serde(default)]
    pub(crate) client_key: Option<PathBuf>,
    /// Calls in flight to this server at once; 0 = no limit. A call beyond it waits for a slot,
    /// within the request's deadline.
    #[serde(default)]
    pub max_concurrent: usize,
    /// Which HTTP version to speak to this server.
    #[serde(default)]
    pub http2: Http2,
}

/// `tls:` — the listener's certificate chain and private key (PEM).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Whether a server's answer counts.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Its answer is waited for and must approve.
    #[default]
    Enforce,
    /// Called, measured and audited; never decides and never waited for.
    Shadow,
}

/// `http2:` of a server. HTTP/2 multiplexes every call in flight to a server over one
/// connection; HTTP/1.1 needs a connection per call in flight.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Http2 {
    /// HTTP/2 when an `https` server offers it by ALPN, else HTTP/1.1.
    #[default]
    Auto,
    /// HTTP/2 only: prior knowledge on `http` (h2c), ALPN `h2` alone on `https`.
    Always,
    /// HTTP/1.1 only.
    Never,
}

/// A TLS setting that could not be loaded: the config field and why.
#[derive(Debug)]
pub(crate) struct TlsError {
    pub(crate) field: &'static str,
    pub(crate) message: String,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 11020))
}
fn default_service_name() -> String {
    "tss-callback-gateway".into()
}
fn default_token_expire_minutes() -> u64 {
    2
}
fn default_deadline_ms() -> u64 {
    8000
}
fn default_health_check_interval_ms() -> u64 {
    10_000
}
fn default_audit_checkpoint_every() -> u64 {
    crate::ops::audit::DEFAULT_CHECKPOINT_EVERY
}
fn default_audit_checkpoint_ms() -> u64 {
    crate::ops::audit::DEFAULT_CHECKPOINT_MS
}
fn default_max_body_bytes() -> usize {
    1024 * 1024
}
fn default_max_in_flight() -> usize {
    1024
}
fn default_reload_settle_ms() -> u64 {
    1000
}
fn default_read_timeout_ms() -> u64 {
    2000
}
fn default_event_retry_hours() -> u64 {
    24
}
fn default_approval_retention_days() -> u64 {
    30
}
fn default_sample_ratio() -> f64 {
    1.0
}
fn default_event_timeout_ms() -> u64 {
    5000
}
/// `state_store` when the file does not say, relative to the config's folder.
pub const DEFAULT_STATE_STORE: &str = "state/gateway.db";
/// `timeout_ms` when the file does not say, unless `deadline_ms` is shorter.
const DEFAULT_TIMEOUT_MS: u64 = 5000;
fn default_retries() -> u32 {
    1
}
fn default_request_types() -> Vec<RequestType> {
    vec![
        RequestType::KeyGen,
        RequestType::KeySign,
        RequestType::KeyReshare,
        RequestType::KeyShareSign,
    ]
}

// === impl Mode ===

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Shadow => "shadow",
        }
    }
}

// === impl TlsError ===

impl TlsError {
    /// `field` is at fault: the file at `path` and why.
    pub(crate) fn at(field: &'static str, path: &Path, detail: impl std::fmt::Display) -> TlsError {
        TlsError {
            field,
            message: format!("{}: {detail}", path.display()),
        }
    }

    /// The bytes of the file `field` names.
    pub(crate) fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
        std::fs::read(path).map_err(|e| TlsError::at(field, path, e))
    }
}

// === impl Config ===

impl Config {
    /// Reads, parses and validates `path`. Keys are not loaded here; see [`crate::generation`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_text(path).map(|(config, _)| config)
    }

    /// As [`Config::load`], also returning the text read: the file is read once, so what was
    /// parsed is exactly what a reload fingerprints.
    pub(crate) fn load_text(path: &Path) -> Result<(Config, String), ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Config::parse(&text, path)?;
        Ok((config, text))
    }

    /// Parses YAML `text` as if read from `path` (relative paths resolve against its folder).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        // The YAML parser's time grows quadratically with flow nesting; a real config is a few
        // KiB and a few levels deep, so refuse anything far beyond that before parsing.
        if text.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: format!("larger than {MAX_CONFIG_BYTES} bytes"),
            });
        }
        if flow_depth(text) > MAX_FLOW_DEPTH {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: format!("brackets nested deeper than {MAX_FLOW_DEPTH} levels"),
            });
        }
        let mut config: Config = serde_norway::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            // serde_norway's message already names the field and its line; keep it one line.
            message: e.to_string().replace('\n', " "),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        let deadline_ms = config.deadline_ms;
        for s in &mut config.callback_servers {
            s.timeout_ms = s
                .timeout_ms_written
                .unwrap_or(DEFAULT_TIMEOUT_MS.min(deadline_ms));
        }
        config.validate(path)?;
        config.allowed_nets = config
            .allowed_clients
            .as_ref()
            .map(|list| list.iter().filter_map(|c| parse_net(c).ok()).collect());
        Ok(config)
    }

    /// Connections `listen` keeps open at once: `max_connections`, else 4 x `max_in_flight`
    /// and at least 1024 (idle keep-alive connections and slow callers beside the requests
    /// being decided).
    pub fn max_connections(&self) -> usize {
        self.max_connections_written
            .unwrap_or_else(|| self.max_in_flight.saturating_mul(4).max(1024))
    }

    /// Whether `peer` may connect to `listen` (`allowed_clients`).
    pub(crate) fn allows(&self, peer: std::net::IpAddr) -> bool {
        let peer = match peer {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, std::net::IpAddr::V4),
            v4 => v4,
        };
        self.allowed_nets
            .as_ref()
            .is_none_or(|nets| nets.iter().any(|n| n.contains(&peer)))
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.tss_node_public_key);
        resolve(&mut self.gateway_private_key);
        if let Some(p) = self.downstream_signing_key.as_mut() {
            resolve(p);
        }
        if let Some(p) = self.audit_log.as_mut() {
            resolve(p);
        }
        for s in &mut self.callback_servers {
            resolve(&mut s.pubkey_path);
            for p in [&mut s.ca_file, &mut s.client_cert, &mut s.client_key]
                .into_iter()
                .flatten()
            {
                resolve(p);
            }
        }
        if let Some(t) = self.tls.as_mut() {
            resolve(&mut t.cert);
            resolve(&mut t.key);
        }
        if let Some(p) = self.tss_node_event_public_key.as_mut() {
            resolve(p);
        }
        self.store_base = base.to_owned();
    }

    /// The state store, when one is used: `state_store` as written, or the default
    /// `state/gateway.db` beside the config when `tss_node_event_public_key` is set. Without
    /// either there is no store (no events, no approvals index).
    pub fn state_store(&self) -> Option<StoreLocation> {
        let written = self.state_store_written.as_deref();
        if written.is_none() && self.tss_node_event_public_key.is_none() {
            return None;
        }
        let text = written.unwrap_or(DEFAULT_STATE_STORE);
        if is_postgres_url(text) {
            return Some(StoreLocation::Postgres(text.to_owned()));
        }
        let text = text.strip_prefix("sqlite://").unwrap_or(text);
        let path = Path::new(text);
        Some(StoreLocation::Sqlite(if path.is_absolute() {
            path.to_owned()
        } else {
            self.store_base.join(path)
        }))
    }

    /// Every value within its bounds; the first refusal names its field.
    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        self.check().map_err(|(field, message)| ConfigError::Field {
            path: path.to_owned(),
            field,
            message,
        })
    }

    fn check(&self) -> Result<(), FieldError> {
        self.check_limits()?;
        let mut names = BTreeSet::new();
        for (i, s) in self.callback_servers.iter().enumerate() {
            let at = |f: &str| format!("callback_servers[{i}].{f}");
            s.check_name(&at)?;
            if !names.insert(s.name.as_str()) {
                return Err((at("name"), format!("duplicate server name {:?}", s.name)));
            }
            s.check(&at, self.deadline_ms)?;
        }
        self.check_events()?;
        if let Some(t) = &self.tracing {
            check_http_url(&t.otlp_endpoint, "tracing.otlp_endpoint")?;
            let redacted = redact_address(&t.otlp_endpoint);
            if let Ok(u) = reqwest::Url::parse(&t.otlp_endpoint) {
                if u.query().is_some() || u.fragment().is_some() {
                    return Err((
                        "tracing.otlp_endpoint".into(),
                        format!("{redacted:?}: a base URL without query or fragment (spans go to <base>/v1/traces)"),
                    ));
                }
            }
            if !(0.0..=1.0).contains(&t.sample_ratio) {
                return Err((
                    "tracing.sample_ratio".into(),
                    format!("{} must be between 0.0 and 1.0", t.sample_ratio),
                ));
            }
        }
        let enforcing = self
            .callback_servers
            .iter()
            .any(|s| s.mode == Mode::Enforce);
        if !self.embedded_risk_control_rules.enable && !enforcing {
            return Err((
                "callback_servers".into(),
                "nothing would be checked: embedded_risk_control_rules are off and no server has mode enforce"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The event fields: event servers, the store, retry and retention.
    fn check_events(&self) -> Result<(), FieldError> {
        let mut names = BTreeSet::new();
        for (i, s) in self.event_servers.iter().enumerate() {
            let at = |f: &str| format!("event_servers[{i}].{f}");
            check_name(&s.name, &at)?;
            if !names.insert(s.name.as_str()) {
                return Err((
                    at("name"),
                    format!("duplicate event server name {:?}", s.name),
                ));
            }
            check_http_url(&s.service_address, &at("service_address"))?;
            if s.timeout_ms == 0 || s.timeout_ms > 600_000 {
                return Err((at("timeout_ms"), "must be between 1 and 600000".into()));
            }
            if let Some(types) = &s.event_types {
                if types.is_empty() {
                    return Err((
                        at("event_types"),
                        "must list at least one type (omit it for all)".into(),
                    ));
                }
                for (j, t) in types.iter().enumerate() {
                    if !crate::protocol::event::is_event_type_shaped(t) {
                        return Err((
                            format!("event_servers[{i}].event_types[{j}]"),
                            format!("{t:?} is not an event type (ping or request.<kind>.<stage>, like request.keysign.succeeded)"),
                        ));
                    }
                }
            }
        }
        if let Some(text) = self.state_store_written.as_deref() {
            let text = text.trim();
            if text.is_empty() {
                return Err(("state_store".into(), "must not be empty".into()));
            }
            if text.contains("://") && !is_postgres_url(text) && !text.starts_with("sqlite://") {
                return Err((
                    "state_store".into(),
                    format!(
                        "{:?}: a SQLite file path or a postgres:// URL",
                        redact_address(text)
                    ),
                ));
            }
            if is_postgres_url(text) {
                reqwest::Url::parse(text)
                    .ok()
                    .filter(|u| u.host().is_some())
                    .ok_or_else(|| {
                        (
                            "state_store".to_owned(),
                            format!("{:?}: not a valid postgres URL", redact_address(text)),
                        )
                    })?;
            }
        }
        if self.event_retry_hours == 0 || self.event_retry_hours > 24 * 30 {
            return Err((
                "event_retry_hours".into(),
                "must be between 1 and 720".into(),
            ));
        }
        if self.approval_retention_days == 0 || self.approval_retention_days > 3650 {
            return Err((
                "approval_retention_days".into(),
                "must be between 1 and 3650".into(),
            ));
        }
        Ok(())
    }

    /// The top-level numbers and names.
    fn check_limits(&self) -> Result<(), FieldError> {
        let refuse = |field: &str, message: &str| Err((field.to_owned(), message.to_owned()));
        if self.service_name.trim().is_empty() {
            return refuse("service_name", "must not be empty");
        }
        if self.token_expire_minutes == 0 || self.token_expire_minutes > 60 {
            return refuse("token_expire_minutes", "must be between 1 and 60");
        }
        if self.deadline_ms == 0 || self.deadline_ms > 600_000 {
            return refuse("deadline_ms", "must be between 1 and 600000");
        }
        if self.audit_checkpoint_every == 0 {
            return refuse("audit_checkpoint_every", "must be at least 1");
        }
        if self.max_body_bytes < 1024 {
            return refuse("max_body_bytes", "must be at least 1024");
        }
        if self.max_in_flight == 0 || self.max_in_flight > 1_000_000 {
            return refuse("max_in_flight", "must be between 1 and 1000000");
        }
        if self.admin_listen == Some(self.listen) {
            return Err((
                "admin_listen".into(),
                format!(
                    "{} is also `listen`: give the admin endpoints an address of their own",
                    self.listen
                ),
            ));
        }
        if self.reload_settle_ms > 60_000 {
            return refuse("reload_settle_ms", "must be at most 60000");
        }
        if self.read_timeout_ms == 0 || self.read_timeout_ms > 600_000 {
            return refuse("read_timeout_ms", "must be between 1 and 600000");
        }
        if self
            .max_connections_written
            .is_some_and(|n| n == 0 || n > 4_000_000)
        {
            return refuse("max_connections", "must be between 1 and 4000000");
        }
        for (i, c) in self.allowed_clients.iter().flatten().enumerate() {
            parse_net(c).map_err(|e| (format!("allowed_clients[{i}]"), format!("{c:?}: {e}")))?;
        }
        Ok(())
    }

    /// The task types that would be approved with nothing checking them: embedded rules on but
    /// without a rule for the type, and no enforcing server subscribed (Cobo's semantics: such a
    /// type passes).
    pub(crate) fn unchecked_types(&self) -> Vec<RequestType> {
        let rules = &self.embedded_risk_control_rules;
        if !rules.enable {
            // With the rules off, a type nobody checks is rejected, not approved.
            return Vec::new();
        }
        RequestType::ALL
            .into_iter()
            .filter(|&t| t != RequestType::Ping)
            .filter(|&t| !rules.checks(t))
            .filter(|&t| {
                !self
                    .callback_servers
                    .iter()
                    .any(|s| s.mode == Mode::Enforce && s.subscribes(t))
            })
            .collect()
    }
}

/// One `allowed_clients` entry: a CIDR block (`10.1.2.0/24`, `fd00::/8`) or a single address.
fn parse_net(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    if text.contains('/') {
        text.parse::<ipnet::IpNet>()
            .map(|n| n.trunc())
            .map_err(|_| "not a CIDR block (like 10.1.2.0/24 or fd00::/8)".into())
    } else {
        text.parse::<std::net::IpAddr>()
            .map(ipnet::IpNet::from)
            .map_err(|_| "not an IP address or CIDR block".into())
    }
}

/// Whether `state_store` names a PostgreSQL database.
fn is_postgres_url(text: &str) -> bool {
    text.starts_with("postgres://") || text.starts_with("postgresql://")
}

/// A server name: 1-64 characters of `[a-z0-9_-]`; `at` names a field of its server.
fn check_name(name: &str, at: &dyn Fn(&str) -> String) -> Result<(), FieldError> {
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-';
    if name.is_empty() || name.len() > 64 || !name.bytes().all(allowed) {
        return Err((
            at("name"),
            format!("{name:?} must be 1-64 characters of [a-z0-9_-]"),
        ));
    }
    Ok(())
}

/// An `http` or `https` URL with a host; the refusal never shows its credentials.
fn check_http_url(address: &str, field: &str) -> Result<(), FieldError> {
    let redacted = redact_address(address);
    match reqwest::Url::parse(address) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        Ok(_) => Err((
            field.to_owned(),
            format!("{redacted:?}: scheme must be http or https"),
        )),
        Err(e) => Err((field.to_owned(), format!("{redacted:?}: {e}"))),
    }
}

/// `address` with any `user:pass@` credentials replaced by `***@`, for every output.
pub(crate) fn redact_address(address: &str) -> String {
    let Some((scheme, rest)) = address.split_once("://") else {
        return address.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => address.to_owned(),
    }
}

// === impl ServerConfig ===

impl ServerConfig {
    fn check_name(&self, at: &dyn Fn(&str) -> String) -> Result<(), FieldError> {
        check_name(&self.name, at)
    }

    /// Everything but the name; `at` names a field of this server.
    fn check(&self, at: &dyn Fn(&str) -> String, deadline_ms: u64) -> Result<(), FieldError> {
        let refuse = |f: &str, message: String| Err((at(f), message));
        self.check_address(at)?;
        match (&self.client_cert, &self.client_key) {
            (Some(_), None) => return refuse("client_key", "required with client_cert".into()),
            (None, Some(_)) => return refuse("client_cert", "required with client_key".into()),
            _ => {}
        }
        if self.timeout_ms == 0 {
            return refuse("timeout_ms", "must be above 0".into());
        }
        // A default never exceeds the deadline; only a value the user wrote can.
        if self.timeout_ms > deadline_ms {
            return refuse(
                "timeout_ms",
                format!("{} is above deadline_ms {deadline_ms}", self.timeout_ms),
            );
        }
        if self.max_concurrent > 1_000_000 {
            return refuse(
                "max_concurrent",
                "must be at most 1000000 (0 = no limit)".into(),
            );
        }
        if self.retries > 10 {
            return refuse("retries", "must be at most 10".into());
        }
        if self.request_types.is_empty() {
            return refuse(
                "request_types",
                "must list at least one type (omit it for all)".into(),
            );
        }
        Ok(())
    }

    /// `service_address` and the TLS files that only apply to `https`.
    fn check_address(&self, at: &dyn Fn(&str) -> String) -> Result<(), FieldError> {
        let only_https = |f: &str| Err((at(f), "only applies to an https service_address".into()));
        let redacted = redact_address(&self.service_address);
        // `127.0.0.1:11021/v2/check` is no URL at all, and `host:11021/...` parses with `host`
        // as its scheme: either way the fix is the scheme.
        if !self.service_address.contains("://") {
            return Err((
                at("service_address"),
                format!(
                    "`{redacted}` has no scheme; write http://{redacted} or https://{redacted}"
                ),
            ));
        }
        match reqwest::Url::parse(&self.service_address) {
            Ok(u) if u.scheme() == "http" && self.ca_file.is_some() => only_https("ca_file"),
            Ok(u) if u.scheme() == "http" && self.client_cert.is_some() => {
                only_https("client_cert")
            }
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
            Ok(u) if matches!(u.scheme(), "http" | "https") => Err((
                at("service_address"),
                format!("{redacted:?} has no host; write http://HOST:PORT/v2/check"),
            )),
            Ok(_) => Err((
                at("service_address"),
                format!("{redacted:?}: scheme must be http or https"),
            )),
            Err(e) => Err((at("service_address"), format!("{redacted:?}: {e}"))),
        }
    }

    /// Ping goes to every server; other types only where listed.
    pub(crate) fn subscribes(&self, t: RequestType) -> bool {
        t == RequestType::Ping || self.request_types.contains(&t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Config, String> {
        Config::parse(yaml, Path::new("/etc/gw/config.yaml")).map_err(|e| e.to_string())
    }

    const BASE: &str = "
tss_node_public_key: keys/node.pub
gateway_private_key: /abs/gw.pem
";

    fn with_server(extra: &str) -> String {
        format!(
            "{BASE}callback_servers:\n  - name: risk-engine\n    service_address: http://127.0.0.1:1/v2/check\n    pubkey_path: keys/r.pub\n{extra}"
        )
    }

    #[test]
    fn defaults_and_paths() {
        let c = parse(&with_server("")).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:11020");
        assert_eq!(c.service_name, "tss-callback-gateway");
        assert_eq!(c.token_expire_minutes, 2);
        assert_eq!(c.deadline_ms, 8000);
        assert_eq!(c.max_body_bytes, 1_048_576);
        assert_eq!(c.max_in_flight, 1024);
        assert_eq!(c.read_timeout_ms, 2000);
        assert_eq!(c.max_connections(), 4096);
        assert!(c.allows("203.0.113.9".parse().unwrap()));
        assert_eq!(
            c.tss_node_public_key,
            PathBuf::from("/etc/gw/keys/node.pub")
        );
        assert_eq!(c.gateway_private_key, PathBuf::from("/abs/gw.pem"));
        let s = &c.callback_servers[0];
        assert_eq!((s.timeout_ms, s.retries, s.mode), (5000, 1, Mode::Enforce));
        assert_eq!(s.max_concurrent, 0);
        assert_eq!(s.http2, Http2::Auto);
        assert_eq!(s.pubkey_path, PathBuf::from("/etc/gw/keys/r.pub"));
        assert!(s.subscribes(RequestType::Ping) && s.subscribes(RequestType::KeyShareSign));
    }

    #[test]
    fn refusals_name_the_field() {
        let cases: &[(String, &str)] = &[
            (format!("{BASE}bogus: 1\n"), "bogus"),
            (with_server("    colour: red\n"), "colour"),
            (
                with_server("    timeout_ms: 9000\n"),
                "callback_servers[0].timeout_ms",
            ),
            (with_server("    mode: loud\n"), "loud"),
            (with_server("    http2: sometimes\n"), "sometimes"),
            (with_server("    request_types: [key_sing]\n"), "key_sing"),
            (with_server("    request_types: []\n"), "request_types"),
            (
                with_server(
                    "  - name: risk-engine\n    service_address: http://x/\n    pubkey_path: k\n",
                ),
                "duplicate server name",
            ),
            (
                with_server("").replace("risk-engine", "Risk Engine"),
                "callback_servers[0].name",
            ),
            (
                with_server("").replace("http://127", "ftp://127"),
                "service_address",
            ),
            (BASE.to_string(), "nothing would be checked"),
            (
                with_server("    mode: shadow\n"),
                "nothing would be checked",
            ),
            (format!("{}listen: nowhere\n", with_server("")), "listen"),
            (
                "gateway_private_key: x\n".to_string(),
                "tss_node_public_key",
            ),
            (
                format!("{}token_expire_minutes: 0\n", with_server("")),
                "token_expire_minutes",
            ),
            (
                format!("{}max_in_flight: 0\n", with_server("")),
                "max_in_flight",
            ),
            (with_server("    max_concurrent: -1\n"), "max_concurrent"),
            (
                format!("{}read_timeout_ms: 0\n", with_server("")),
                "read_timeout_ms",
            ),
            (
                format!("{}max_connections: 0\n", with_server("")),
                "max_connections",
            ),
            (
                format!(
                    "{}allowed_clients: [10.0.0.0/8, 10.0.0.0/33]\n",
                    with_server("")
                ),
                "allowed_clients[1]",
            ),
            (
                format!("{}allowed_clients: [\"::1\", somewhere]\n", with_server("")),
                "allowed_clients[1]",
            ),
            (
                format!("{}event_servers:\n  - {{ name: siem, service_address: http://h/e }}\n  - {{ name: siem, service_address: http://h/f }}\n", with_server("")),
                "duplicate event server name",
            ),
            (
                format!("{}event_servers:\n  - {{ name: Siem, service_address: http://h/e }}\n", with_server("")),
                "event_servers[0].name",
            ),
            (
                format!("{}event_servers:\n  - {{ name: siem, service_address: \"ftp://u:s3cret@h/e\" }}\n", with_server("")),
                "event_servers[0].service_address",
            ),
            (
                format!("{}event_servers:\n  - {{ name: siem, service_address: http://h/e, timeout_ms: 0 }}\n", with_server("")),
                "event_servers[0].timeout_ms",
            ),
            (
                format!("{}event_servers:\n  - {{ name: siem, service_address: http://h/e, event_types: [] }}\n", with_server("")),
                "event_servers[0].event_types",
            ),
            (
                format!("{}event_servers:\n  - {{ name: siem, service_address: http://h/e, event_types: [ping, keysign] }}\n", with_server("")),
                "event_servers[0].event_types[1]",
            ),
            (
                format!("{}event_servers:\n  - {{ name: siem, service_address: http://h/e, colour: red }}\n", with_server("")),
                "colour",
            ),
            (
                format!("{}state_store: \"mysql://u:s3cret@db/x\"\n", with_server("")),
                "state_store",
            ),
            (format!("{}state_store: \"\"\n", with_server("")), "state_store"),
            (
                format!("{}event_retry_hours: 0\n", with_server("")),
                "event_retry_hours",
            ),
            (
                format!("{}approval_retention_days: 0\n", with_server("")),
                "approval_retention_days",
            ),
        ];
        for (yaml, needle) in cases {
            let err = parse(yaml).expect_err(needle);
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
            assert!(!err.contains('\n'), "multi-line error {err:?}");
            assert!(err.starts_with("config /etc/gw/config.yaml"), "{err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn the_state_store_is_used_with_events_or_when_written() {
        let c = parse(&with_server("")).unwrap();
        assert_eq!(c.state_store(), None);
        assert_eq!((c.event_retry_hours, c.approval_retention_days), (24, 30));
        let c = parse(&format!(
            "{}tss_node_event_public_key: keys/ev.pub\n",
            with_server("")
        ))
        .unwrap();
        assert_eq!(
            c.state_store(),
            Some(StoreLocation::Sqlite("/etc/gw/state/gateway.db".into()))
        );
        assert_eq!(
            c.tss_node_event_public_key,
            Some(PathBuf::from("/etc/gw/keys/ev.pub"))
        );
        let c = parse(&format!(
            "{}state_store: /var/lib/gw/s.db\n",
            with_server("")
        ))
        .unwrap();
        assert_eq!(
            c.state_store(),
            Some(StoreLocation::Sqlite("/var/lib/gw/s.db".into()))
        );
        let url = "postgres://gw:pw@db.internal:5432/gateway";
        let c = parse(&format!("{}state_store: \"{url}\"\n", with_server(""))).unwrap();
        assert_eq!(c.state_store(), Some(StoreLocation::Postgres(url.into())));
        let c = parse(&format!(
            "{}event_servers:\n  - {{ name: siem, service_address: http://h/e, event_types: [request.keysign.succeeded, request.wallet.created] }}\n",
            with_server("")
        ))
        .unwrap();
        assert_eq!(c.event_servers[0].timeout_ms, 5000);
    }

    #[test]
    fn allowed_clients_match_v4_v6_and_mapped_peers() {
        let c = parse(&format!(
            "{}allowed_clients: [10.1.2.0/24, \"fd00::/8\", 192.0.2.7]\nmax_in_flight: 10\n",
            with_server("")
        ))
        .unwrap();
        for (peer, allowed) in [
            ("10.1.2.200", true),
            ("10.1.3.1", false),
            ("192.0.2.7", true),
            ("192.0.2.8", false),
            ("fd12::1", true),
            ("fe80::1", false),
            ("::ffff:10.1.2.3", true),
            ("127.0.0.1", false),
        ] {
            assert_eq!(c.allows(peer.parse().unwrap()), allowed, "{peer}");
        }
        assert_eq!(c.max_connections(), 1024);
    }

    #[test]
    fn credentials_are_redacted() {
        for (address, want) in [
            ("http://u:p@h:1/v2/check", "http://***@h:1/v2/check"),
            ("https://u@h/x?a=b@c", "https://***@h/x?a=b@c"),
            ("http://u:p@ss@h", "http://***@h"),
            ("http://h:1/v2/check", "http://h:1/v2/check"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_address(address), want);
        }
        let err =
            parse(&with_server("").replace("http://127", "ftp://user:s3cret@127")).unwrap_err();
        assert!(!err.contains("s3cret") && err.contains("***@"), "{err}");
    }

    #[test]
    fn default_timeout_follows_a_shorter_deadline() {
        let c = parse(&format!("{}deadline_ms: 4000\n", with_server(""))).unwrap();
        assert_eq!(c.callback_servers[0].timeout_ms, 4000);
        let c = parse(&format!("{}deadline_ms: 9000\n", with_server(""))).unwrap();
        assert_eq!(c.callback_servers[0].timeout_ms, 5000);
        let c = parse(&format!(
            "{}deadline_ms: 4000\n",
            with_server("    timeout_ms: 3000\n")
        ))
        .unwrap();
        assert_eq!(c.callback_servers[0].timeout_ms, 3000);
        let err = parse(&format!(
            "{}deadline_ms: 4000\n",
            with_server("    timeout_ms: 5000\n")
        ))
        .unwrap_err();
        assert!(err.contains("5000 is above deadline_ms 4000"), "{err}");
        let err = parse(&with_server("    timeout_ms: 0\n")).unwrap_err();
        assert!(err.contains("callback_servers[0].timeout_ms"), "{err}");
    }

    #[test]
    fn rules_alone_are_enough() {
        let c = parse(&format!(
            "{BASE}embedded_risk_control_rules: {{ enable: true }}\n"
        ))
        .unwrap();
        assert!(c.callback_servers.is_empty());
        let c = parse(&with_server("    request_types: [key_sign]\n")).unwrap();
        assert_eq!(c.callback_servers[0].request_types, [RequestType::KeySign]);
    }
}
