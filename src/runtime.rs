//! A configuration with everything it names loaded: keys parsed, downstream clients built. One
//! `Runtime` is one config generation; a request uses the generation it started with.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, ConfigError, Mode, ServerConfig};
use crate::keys::{Signer, Verifier};
use crate::protocol::RequestType;

/// One downstream callback server, ready to call.
#[derive(Debug)]
pub struct Downstream {
    pub name: Arc<str>,
    pub url: reqwest::Url,
    pub verifier: Verifier,
    pub timeout: Duration,
    pub retries: u32,
    pub mode: Mode,
    pub config: ServerConfig,
    pub client: reqwest::Client,
    /// `max_concurrent` call slots; `None` = no limit.
    pub slots: Option<Arc<crate::admission::Slots>>,
}

/// A loaded configuration generation.
#[derive(Debug)]
pub struct Runtime {
    pub path: PathBuf,
    pub config: Config,
    pub generation: u64,
    pub signer: Signer,
    pub node_verifier: Verifier,
    pub downstreams: Vec<Arc<Downstream>>,
    /// Set when the config has `tls:`; each new connection uses the current generation's.
    pub tls: Option<crate::tls::Acceptor>,
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

// === impl Runtime ===

impl Runtime {
    /// Reads, validates and loads every key of the config at `path`.
    pub fn load(path: &Path, generation: u64) -> Result<Runtime, ConfigError> {
        let config = Config::load(path)?;
        Runtime::from_config(path, config, generation, None)
    }

    /// Loads the next generation. Servers whose connection settings did not change keep their
    /// HTTP client, so their warm keep-alive connections survive the reload.
    pub fn reload(path: &Path, previous: &Runtime) -> Result<Runtime, ConfigError> {
        let config = Config::load(path)?;
        Runtime::from_config(path, config, previous.generation + 1, Some(previous))
    }

    pub fn from_config(
        path: &Path,
        config: Config,
        generation: u64,
        previous: Option<&Runtime>,
    ) -> Result<Runtime, ConfigError> {
        let key_err = |field: String| {
            let path = path.to_owned();
            move |source| ConfigError::Key {
                path,
                field,
                source,
            }
        };
        let signer = Signer::load(&config.gateway_private_key)
            .map_err(key_err("gateway_private_key".into()))?;
        let node_verifier = Verifier::load(&config.tss_node_public_key)
            .map_err(key_err("tss_node_public_key".into()))?;
        let mut downstreams = Vec::with_capacity(config.callback_servers.len());
        for (i, s) in config.callback_servers.iter().enumerate() {
            let verifier = Verifier::load(&s.pubkey_path)
                .map_err(key_err(format!("callback_servers[{i}].pubkey_path")))?;
            let timeout = Duration::from_millis(s.timeout_ms);
            let reusable = previous
                .into_iter()
                .flat_map(|p| p.downstreams.iter())
                .find(|d| same_connection(&d.config, s));
            let client = match reusable {
                Some(d) => d.client.clone(),
                None => {
                    crate::tls::downstream_client(s, timeout).map_err(|e| ConfigError::Field {
                        path: path.to_owned(),
                        field: format!("callback_servers[{i}].{}", e.field),
                        message: e.message,
                    })?
                }
            };
            // The same server with the same limit keeps its slots, so calls still running on the
            // previous generation count against the limit too.
            let slots = previous
                .into_iter()
                .flat_map(|p| p.downstreams.iter())
                .find(|d| {
                    d.config.name == s.name
                        && d.config.service_address == s.service_address
                        && d.config.max_concurrent == s.max_concurrent
                })
                .map_or_else(
                    || crate::admission::Slots::new(s.max_concurrent),
                    |d| d.slots.clone(),
                );
            downstreams.push(Arc::new(Downstream {
                slots,
                name: s.name.as_str().into(),
                // Validated in Config::parse.
                url: reqwest::Url::parse(&s.service_address).map_err(|e| ConfigError::Field {
                    path: path.to_owned(),
                    field: format!("callback_servers[{i}].service_address"),
                    message: e.to_string(),
                })?,
                verifier,
                timeout,
                retries: s.retries,
                mode: s.mode,
                config: s.clone(),
                client,
            }));
        }
        let tls = match &config.tls {
            Some(t) => Some(crate::tls::acceptor(t).map_err(|e| ConfigError::Field {
                path: path.to_owned(),
                field: e.field.into(),
                message: e.message,
            })?),
            None => None,
        };
        Ok(Runtime {
            tls,
            path: path.to_owned(),
            config,
            generation,
            signer,
            node_verifier,
            downstreams,
        })
    }

    /// The servers a request of type `kind` goes to (`None`: a type no server subscribes to).
    pub fn subscribers(&self, kind: Option<RequestType>) -> impl Iterator<Item = &Arc<Downstream>> {
        self.downstreams
            .iter()
            .filter(move |d| kind.is_some_and(|k| d.config.subscribes(k)))
    }

    /// One line per server for `check-config` and start-up logs.
    pub fn summary(&self) -> String {
        let c = &self.config;
        let rules = if c.embedded_risk_control_rules.enable {
            "on"
        } else {
            "off"
        };
        let mut out = format!(
            "config {} OK (generation {})\n  listen {}  service_name {}  deadline {} ms  token_expire {} min  embedded rules {}\n",
            self.path.display(),
            self.generation,
            c.listen,
            c.service_name,
            c.deadline_ms,
            c.token_expire_minutes,
            rules
        );
        for d in &self.downstreams {
            let types: Vec<&str> = d
                .config
                .request_types
                .iter()
                .map(|&t| RequestType::from(t).name())
                .collect();
            out.push_str(&format!(
                "  server {} [{}] {} timeout {} ms retries {} types {}\n",
                d.name,
                d.mode.as_str(),
                d.url,
                d.config.timeout_ms,
                d.retries,
                types.join(",")
            ));
        }
        out
    }
}
