//! One config generation: a configuration with everything it names loaded (keys parsed, downstream
//! clients built), and the signing of tokens with its keys. A request uses the generation it
//! started with from start to end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, ConfigError, EventServerConfig, Mode, ServerConfig};
use crate::protocol::keys::{self, Signer, Verifier};
use crate::protocol::{self, RequestType};

/// One downstream callback server, ready to call.
#[derive(Debug)]
pub struct Downstream {
    pub(crate) name: Arc<str>,
    pub(crate) url: reqwest::Url,
    pub(crate) verifier: Verifier,
    pub timeout: Duration,
    pub(crate) retries: u32,
    pub(crate) mode: Mode,
    pub(crate) config: ServerConfig,
    pub(crate) client: reqwest::Client,
    /// `max_concurrent` call slots; `None` = no limit.
    pub(crate) slots: Option<Arc<crate::inbound::admission::Slots>>,
    /// Shadow calls in flight to this server, kept across reloads under the same name, so the
    /// cap on them (see [`crate::outbound::fanout`]) counts the calls of older generations too.
    pub(crate) shadows: Arc<crate::inbound::admission::Admission>,
}

/// One event server, ready to deliver to.
#[derive(Debug)]
pub struct EventServer {
    pub(crate) name: Arc<str>,
    pub(crate) url: reqwest::Url,
    pub(crate) timeout: Duration,
    pub(crate) client: reqwest::Client,
    pub(crate) config: EventServerConfig,
}

// === impl EventServer ===

impl EventServer {
    /// Builds the server of `s`, keeping the previous generation's HTTP client when its address
    /// and timeout did not change.
    fn new(s: &EventServerConfig, previous: Option<&Generation>) -> Result<EventServer, String> {
        let timeout = Duration::from_millis(s.timeout_ms);
        let kept = previous
            .into_iter()
            .flat_map(|p| p.event_servers.iter())
            .find(|e| e.config.service_address == s.service_address && e.timeout == timeout)
            .map(|e| e.client.clone());
        let client = match kept {
            Some(c) => c,
            None => crate::outbound::client::builder(timeout)
                .build()
                .map_err(|e| format!("cannot build the HTTP client: {e}"))?,
        };
        Ok(EventServer {
            name: s.name.as_str().into(),
            // Validated in Config::parse.
            url: reqwest::Url::parse(&s.service_address).map_err(|e| e.to_string())?,
            timeout,
            client,
            config: s.clone(),
        })
    }

    /// Whether this server gets events of `event_type`: every type without a filter (types the
    /// gateway does not know included), else those listed.
    pub(crate) fn wants(&self, event_type: &str) -> bool {
        self.config
            .event_types
            .as_ref()
            .is_none_or(|types| types.iter().any(|t| t == event_type))
    }
}

/// Whom a token is for, which decides the key that signs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Audience {
    /// An answer to the TSS Node: `gateway_private_key`.
    Node,
    /// A request to the downstreams: `downstream_signing_key`, else `gateway_private_key`.
    Downstreams,
}

// === impl Downstream ===

impl Downstream {
    /// Builds the server of `s`, keeping the previous generation's HTTP client and call slots
    /// where they still fit. An error names the field of `s` at fault.
    fn new(
        s: &ServerConfig,
        verifier: Verifier,
        previous: Option<&Generation>,
        sources: &mut Sources,
    ) -> Result<Downstream, (String, String)> {
        let timeout = Duration::from_millis(s.timeout_ms);
        let before = || previous.into_iter().flat_map(|p| p.downstreams.iter());
        // TLS files are read by the TLS loader; their digest is taken just before.
        for p in [&s.ca_file, &s.client_cert, &s.client_key]
            .into_iter()
            .flatten()
        {
            let _ = sources.read(p);
        }
        let client = match before().find(|d| same_connection(&d.config, s)) {
            Some(d) => d.client.clone(),
            None => crate::outbound::tls::downstream_client(s, timeout)
                .map_err(|e| (e.field.to_owned(), e.message))?,
        };
        // The same server with the same limit keeps its slots, so calls still running on the
        // previous generation count against the limit too.
        let slots = before()
            .find(|d| {
                d.config.name == s.name
                    && d.config.service_address == s.service_address
                    && d.config.max_concurrent == s.max_concurrent
            })
            .map_or_else(
                || crate::inbound::admission::Slots::new(s.max_concurrent),
                |d| d.slots.clone(),
            );
        let shadows = before()
            .find(|d| d.config.name == s.name)
            .map_or_else(Arc::default, |d| d.shadows.clone());
        Ok(Downstream {
            slots,
            shadows,
            name: s.name.as_str().into(),
            // Validated in Config::parse.
            url: reqwest::Url::parse(&s.service_address)
                .map_err(|e| ("service_address".to_owned(), e.to_string()))?,
            verifier,
            timeout,
            retries: s.retries,
            mode: s.mode,
            config: s.clone(),
            client,
        })
    }
}

/// What an operator should hear about `config` at load: types approved with nothing checking
/// them, private key files readable by others.
fn warnings(config: &Config) -> Vec<String> {
    let mut warnings: Vec<String> = config
        .unchecked_types()
        .into_iter()
        .map(|t| {
            format!(
                "{} requests would be approved with nothing checking them: embedded_risk_control_rules has no rule for {} and no enforcing server subscribes to it",
                t.name(),
                t.name()
            )
        })
        .collect();
    let private_keys = [
        (
            "gateway_private_key".to_owned(),
            Some(&config.gateway_private_key),
        ),
        (
            "downstream_signing_key".to_owned(),
            config.downstream_signing_key.as_ref(),
        ),
        ("tls.key".to_owned(), config.tls.as_ref().map(|t| &t.key)),
    ]
    .into_iter()
    .chain(config.callback_servers.iter().enumerate().map(|(i, s)| {
        (
            format!("callback_servers[{i}].client_key"),
            s.client_key.as_ref(),
        )
    }));
    for (field, path) in private_keys {
        warnings.extend(path.and_then(|p| exposed_key(&field, p)));
    }
    if config.deadline_ms >= NODE_REQUEST_TIMEOUT_MS {
        warnings.push(format!(
            "deadline_ms {} is not below the TSS Node's default request_timeout ({NODE_REQUEST_TIMEOUT_MS} ms): the node may give up before the gateway answers; use 8000 or raise the node's request_timeout",
            config.deadline_ms
        ));
    }
    for (i, s) in config.callback_servers.iter().enumerate() {
        let at = format!("callback_servers[{i}]");
        let path_less =
            reqwest::Url::parse(&s.service_address).is_ok_and(|u| matches!(u.path(), "" | "/"));
        if path_less {
            warnings.push(format!(
                "{at}.service_address {} has no path: Cobo callback servers listen on /v2/check (older ones /v1/check)",
                crate::config::redact_address(&s.service_address)
            ));
        }
        if s.request_types.iter().all(|t| *t == RequestType::Ping) {
            warnings.push(format!(
                "{at}.request_types: server {} subscribes only to ping, so it checks no task; list the types it should check (omit request_types for all)",
                s.name
            ));
        }
    }
    for (i, s) in config.event_servers.iter().enumerate() {
        for (j, t) in s.event_types.iter().flatten().enumerate() {
            if !crate::protocol::event::is_known(t) {
                warnings.push(format!(
                    "event_servers[{i}].event_types[{j}]: {t:?} is not an event type this gateway knows; it is kept for a type the node may send"
                ));
            }
        }
    }
    if !config.event_servers.is_empty() && config.tss_node_event_public_key.is_none() {
        warnings.push(
            "event_servers are configured but tss_node_event_public_key is not: no event will be received or delivered"
                .into(),
        );
    }
    warnings
}

/// The TSS Node's default HTTP `request_timeout`: a `deadline_ms` at or above it lets the node
/// give up first.
const NODE_REQUEST_TIMEOUT_MS: u64 = 10_000;

/// The files one generation was loaded from, each with the SHA-256 of the bytes actually read
/// (`None`: unreadable). Comparing it with the disk tells a reload whether a write landed while
/// it was loading.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Sources(BTreeMap<PathBuf, Option<[u8; 32]>>);

// === impl Sources ===

impl Sources {
    /// Reads a file and records the digest of what was read.
    fn read(&mut self, path: &Path) -> Result<Vec<u8>, keys::KeyError> {
        let bytes = keys::read(path)?;
        self.record(path, &bytes);
        Ok(bytes)
    }

    /// The private key at `path`, read and parsed.
    fn signer(&mut self, path: &Path) -> Result<Signer, keys::KeyError> {
        self.read(path)
            .and_then(|bytes| Signer::from_pem(path, &bytes))
    }

    /// The public key(s) at `path`, read and parsed.
    fn verifier(&mut self, path: &Path) -> Result<Verifier, keys::KeyError> {
        self.read(path)
            .and_then(|bytes| Verifier::from_pem(path, &bytes))
    }

    fn record(&mut self, path: &Path, bytes: &[u8]) {
        self.0
            .insert(path.to_owned(), Some(crate::inbound::dedup::digest(bytes)));
    }

    /// The same files as they are on disk now.
    pub(crate) fn on_disk<'a>(paths: impl IntoIterator<Item = &'a PathBuf>) -> Sources {
        Sources(
            paths
                .into_iter()
                .map(|p| {
                    let digest = std::fs::read(p)
                        .ok()
                        .map(|b| crate::inbound::dedup::digest(&b));
                    (p.clone(), digest)
                })
                .collect(),
        )
    }

    pub(crate) fn paths(&self) -> impl Iterator<Item = &PathBuf> {
        self.0.keys()
    }

    /// The recorded digest of `path`, if it is one of these files.
    pub fn get(&self, path: &Path) -> Option<Option<[u8; 32]>> {
        self.0.get(path).copied()
    }
}

impl FromIterator<(PathBuf, Option<[u8; 32]>)> for Sources {
    fn from_iter<I: IntoIterator<Item = (PathBuf, Option<[u8; 32]>)>>(files: I) -> Sources {
        Sources(files.into_iter().collect())
    }
}

/// A loaded configuration generation.
#[derive(Debug)]
pub struct Generation {
    pub(crate) path: PathBuf,
    pub config: Config,
    /// 1 at start, one more at each reload.
    pub number: u64,
    /// Signs the answers to the TSS Node (`gateway_private_key`).
    pub signer: Signer,
    /// Signs the requests to the downstreams (`downstream_signing_key`), when it is set.
    downstream_signer: Option<Signer>,
    pub(crate) node_verifier: Verifier,
    /// Verifies the node's events (`tss_node_event_public_key`); `None`: no `/v2/event`.
    pub(crate) event_verifier: Option<Verifier>,
    pub downstreams: Vec<Arc<Downstream>>,
    pub event_servers: Vec<Arc<EventServer>>,
    /// Set when the config has `tls:`; each new connection uses the current generation's.
    pub(crate) tls: Option<crate::inbound::tls::Acceptor>,
    /// What this generation was loaded from.
    pub(crate) sources: Sources,
    /// What an operator should hear about at load (check-config, start-up, reload): types
    /// approved with nothing checking them, private keys readable by others.
    pub warnings: Vec<String>,
    /// The status-20 answers, signed with this generation's key in advance.
    pub(crate) refusals: crate::inbound::refusal::Refusals,
    /// When this generation was loaded (for the status page).
    pub(crate) loaded_at: std::time::SystemTime,
}

/// A warning when the private key file at `path` is readable by its group or by others.
fn exposed_key(field: &str, path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o077 != 0).then(|| {
        format!(
            "{field}: private key file {} is readable by group or others (mode {:04o}); chmod 0600 it",
            path.display(),
            mode & 0o7777
        )
    })
}

/// Refuses an audit log path the gateway could not open, as `run` would, short of opening it:
/// a folder at the path, a file where a folder should be, or a folder missing more than one
/// level deep (the gateway creates the log's own folder, not a whole tree: a typo is not a
/// place to put evidence).
fn check_audit_log(log: &Path) -> Result<(), String> {
    if log.is_dir() {
        return Err(format!("{} is a folder, not a file", log.display()));
    }
    let Some(dir) = log.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    let not_a_folder = |d: &Path| {
        Err(format!(
            "{} is not a folder (audit log {})",
            d.display(),
            log.display()
        ))
    };
    if dir.exists() {
        return if dir.is_dir() {
            Ok(())
        } else {
            not_a_folder(dir)
        };
    }
    match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(up) if !up.exists() => Err(format!(
            "folder {} does not exist (audit log {}); create it first",
            up.display(),
            log.display()
        )),
        Some(up) if !up.is_dir() => not_a_folder(up),
        _ => Ok(()),
    }
}

/// Whether a client built for `a` serves `b` as well. Servers with TLS files never qualify: the
/// files may have changed on disk under the same names.
fn same_connection(a: &ServerConfig, b: &ServerConfig) -> bool {
    let no_tls_files =
        |s: &ServerConfig| s.ca_file.is_none() && s.client_cert.is_none() && s.client_key.is_none();
    a.service_address == b.service_address
        && a.timeout_ms == b.timeout_ms
        && a.http2 == b.http2
        && no_tls_files(a)
        && no_tls_files(b)
}

// === impl Generation ===

impl Generation {
    /// Reads, validates and loads every key of the config at `path`.
    pub fn load(path: &Path, number: u64) -> Result<Generation, ConfigError> {
        let (config, text) = Config::load_text(path)?;
        let mut g = Generation::from_config(path, config, number, None)?;
        g.sources.record(path, text.as_bytes());
        Ok(g)
    }

    /// Loads the next generation. Servers whose connection settings did not change keep their
    /// HTTP client, so their warm keep-alive connections survive the reload.
    pub fn reload(path: &Path, previous: &Generation) -> Result<Generation, ConfigError> {
        let (config, text) = Config::load_text(path)?;
        let mut g = Generation::from_config(path, config, previous.number + 1, Some(previous))?;
        g.sources.record(path, text.as_bytes());
        Ok(g)
    }

    fn from_config(
        path: &Path,
        config: Config,
        number: u64,
        previous: Option<&Generation>,
    ) -> Result<Generation, ConfigError> {
        let key_err = |field: &str| {
            let (path, field) = (path.to_owned(), field.to_owned());
            move |source| ConfigError::Key {
                path,
                field,
                source,
            }
        };
        if let Some(log) = &config.audit_log {
            check_audit_log(log).map_err(|message| ConfigError::Field {
                path: path.to_owned(),
                field: "audit_log".into(),
                message,
            })?;
        }
        // Each key file is read once, and the bytes parsed are the bytes fingerprinted.
        let mut sources = Sources::default();
        let signer = sources
            .signer(&config.gateway_private_key)
            .map_err(key_err("gateway_private_key"))?;
        let downstream_signer = match &config.downstream_signing_key {
            Some(p) => Some(
                sources
                    .signer(p)
                    .map_err(key_err("downstream_signing_key"))?,
            ),
            None => None,
        };
        let node_verifier = sources
            .verifier(&config.tss_node_public_key)
            .map_err(key_err("tss_node_public_key"))?;
        let event_verifier = match &config.tss_node_event_public_key {
            Some(p) => Some(
                sources
                    .verifier(p)
                    .map_err(key_err("tss_node_event_public_key"))?,
            ),
            None => None,
        };
        let mut event_servers = Vec::with_capacity(config.event_servers.len());
        for (i, s) in config.event_servers.iter().enumerate() {
            let server = EventServer::new(s, previous).map_err(|message| ConfigError::Field {
                path: path.to_owned(),
                field: format!("event_servers[{i}].service_address"),
                message,
            })?;
            event_servers.push(Arc::new(server));
        }
        let mut downstreams = Vec::with_capacity(config.callback_servers.len());
        for (i, s) in config.callback_servers.iter().enumerate() {
            let field = |f: &str| format!("callback_servers[{i}].{f}");
            let verifier = sources
                .verifier(&s.pubkey_path)
                .map_err(key_err(&field("pubkey_path")))?;
            let ds =
                Downstream::new(s, verifier, previous, &mut sources).map_err(|(f, message)| {
                    ConfigError::Field {
                        path: path.to_owned(),
                        field: field(&f),
                        message,
                    }
                })?;
            downstreams.push(Arc::new(ds));
        }
        if let Some(t) = &config.tls {
            for p in [&t.cert, &t.key] {
                let _ = sources.read(p);
            }
        }
        let tls = match &config.tls {
            Some(t) => Some(
                crate::inbound::tls::acceptor(t).map_err(|e| ConfigError::Field {
                    path: path.to_owned(),
                    field: e.field.into(),
                    message: e.message,
                })?,
            ),
            None => None,
        };
        Ok(Generation {
            warnings: warnings(&config),
            tls,
            path: path.to_owned(),
            config,
            number,
            signer,
            downstream_signer,
            node_verifier,
            event_verifier,
            downstreams,
            event_servers,
            sources,
            refusals: Default::default(),
            loaded_at: std::time::SystemTime::now(),
        })
    }

    /// Every file this generation was loaded from: the config, its keys and certificates.
    pub fn source_files(&self) -> impl Iterator<Item = &Path> {
        self.sources.paths().map(PathBuf::as_path)
    }

    /// Signs `package` into a token for `to`, with this generation's key for it, `service_name`
    /// and `token_expire_minutes`, on the bounded signing pool. An empty string (which no one
    /// accepts: fail closed) only if the signing job could not run.
    pub(crate) async fn sign(&self, to: Audience, package: Vec<u8>) -> String {
        let signer = match to {
            Audience::Node => &self.signer,
            Audience::Downstreams => self.request_signer(),
        };
        protocol::sign_token_pooled(
            signer,
            package,
            self.config.service_name.clone(),
            self.config.token_expire_minutes as i64 * 60,
        )
        .await
    }

    /// The key that signs requests to the downstreams: `downstream_signing_key`, else
    /// `gateway_private_key`.
    pub(crate) fn request_signer(&self) -> &Signer {
        self.downstream_signer.as_ref().unwrap_or(&self.signer)
    }

    /// The servers a request of type `kind` goes to (`None`: a type no server subscribes to).
    pub(crate) fn subscribers(
        &self,
        kind: Option<RequestType>,
    ) -> impl Iterator<Item = &Arc<Downstream>> {
        self.downstreams
            .iter()
            .filter(move |d| kind.is_some_and(|k| d.config.subscribes(k)))
    }

    /// What this generation runs with, for `check-config` and start-up logs: addresses, files,
    /// key fingerprints, then one line per server.
    pub fn summary(&self) -> String {
        let c = &self.config;
        let rules = if c.embedded_risk_control_rules.enable {
            "on"
        } else {
            "off"
        };
        let admin = c
            .admin_listen
            .map_or_else(|| "none (on listen)".to_owned(), |a| a.to_string());
        let audit = c
            .audit_log
            .as_ref()
            .map_or_else(|| "none".to_owned(), |p| p.display().to_string());
        let mut out = format!(
            "config {} OK\n  listen {}  admin_listen {}  service_name {}  deadline {} ms  token_expire {} min  embedded rules {}\n  audit_log {}\n",
            self.path.display(),
            c.listen,
            admin,
            c.service_name,
            c.deadline_ms,
            c.token_expire_minutes,
            rules,
            audit
        );
        let request_key = c
            .downstream_signing_key
            .as_ref()
            .unwrap_or(&c.gateway_private_key);
        out.push_str(&format!(
            "  answers signed with {} ({})  requests to downstreams signed with {} ({})\n",
            c.gateway_private_key.display(),
            self.signer.fingerprint(),
            request_key.display(),
            self.request_signer().fingerprint()
        ));
        out.push_str(&format!(
            "  node requests verified with {} ({})\n",
            c.tss_node_public_key.display(),
            self.node_verifier.fingerprints().join(", ")
        ));
        for d in &self.downstreams {
            let types: Vec<&str> = d.config.request_types.iter().map(|t| t.name()).collect();
            out.push_str(&format!(
                "  server {} [{}] {} timeout {} ms retries {} types {} key {}\n",
                d.name,
                d.mode.as_str(),
                crate::config::redact_address(d.url.as_str()),
                d.config.timeout_ms,
                d.retries,
                types.join(","),
                d.verifier.fingerprints().join(",")
            ));
        }
        match &c.tss_node_event_public_key {
            Some(k) => out.push_str(&format!(
                "  events: POST /v2/event verified with {}  retried {} h\n",
                k.display(),
                c.event_retry_hours
            )),
            None => out.push_str("  events: off (no tss_node_event_public_key)\n"),
        }
        for e in &self.event_servers {
            let types = e
                .config
                .event_types
                .as_ref()
                .map_or_else(|| "all".to_owned(), |t| t.join(","));
            out.push_str(&format!(
                "  event server {} {} timeout {} ms types {}\n",
                e.name,
                crate::config::redact_address(e.url.as_str()),
                e.config.timeout_ms,
                types
            ));
        }
        match c.state_store() {
            Some(at) => out.push_str(&format!(
                "  state store {}  approvals kept {} days\n",
                crate::state::describe(&at),
                c.approval_retention_days
            )),
            None => out.push_str("  state store: none (no approvals index)\n"),
        }
        match &c.tracing {
            Some(t) => out.push_str(&format!(
                "  traces: OTLP/HTTP to {}  sample_ratio {}\n",
                crate::config::redact_address(&t.traces_url()),
                t.sample_ratio
            )),
            None => out.push_str("  traces: off (no tracing)\n"),
        }
        out
    }

    /// The fingerprints of every key this generation uses, by role, for the reload log.
    pub(crate) fn key_fingerprints(&self) -> String {
        let mut parts = vec![
            format!("answers={}", self.signer.fingerprint()),
            format!("requests={}", self.request_signer().fingerprint()),
            format!("node={}", self.node_verifier.fingerprints().join("+")),
        ];
        parts.extend(
            self.downstreams
                .iter()
                .map(|d| format!("{}={}", d.name, d.verifier.fingerprints().join("+"))),
        );
        parts.join(" ")
    }
}
