//! A configuration with everything it names loaded: keys parsed, downstream clients built. One
//! `Runtime` is one config generation; a request uses the generation it started with.

use std::collections::BTreeMap;
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

/// The files one generation was loaded from, each with the SHA-256 of the bytes actually read
/// (`None`: unreadable). Comparing it with the disk tells a reload whether a write landed while
/// it was loading.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources(BTreeMap<PathBuf, Option<[u8; 32]>>);

// === impl Sources ===

impl Sources {
    /// Reads a file and records the digest of what was read.
    fn read(&mut self, path: &Path) -> Result<Vec<u8>, crate::keys::KeyError> {
        let bytes = crate::keys::read(path)?;
        self.record(path, &bytes);
        Ok(bytes)
    }

    fn record(&mut self, path: &Path, bytes: &[u8]) {
        self.0
            .insert(path.to_owned(), Some(crate::dedup::digest(bytes)));
    }

    /// The same files as they are on disk now.
    pub fn on_disk<'a>(paths: impl IntoIterator<Item = &'a PathBuf>) -> Sources {
        Sources(
            paths
                .into_iter()
                .map(|p| {
                    let digest = std::fs::read(p).ok().map(|b| crate::dedup::digest(&b));
                    (p.clone(), digest)
                })
                .collect(),
        )
    }

    pub fn paths(&self) -> impl Iterator<Item = &PathBuf> {
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
pub struct Runtime {
    pub path: PathBuf,
    pub config: Config,
    pub generation: u64,
    /// Signs the answers to the TSS Node (`gateway_private_key`).
    pub signer: Signer,
    /// Signs the requests to the downstreams (`downstream_signing_key`), when it is set.
    downstream_signer: Option<Signer>,
    pub node_verifier: Verifier,
    pub downstreams: Vec<Arc<Downstream>>,
    /// Set when the config has `tls:`; each new connection uses the current generation's.
    pub tls: Option<crate::tls::Acceptor>,
    /// What this generation was loaded from.
    pub sources: Sources,
    /// What an operator should hear about at load (check-config, start-up, reload): types
    /// approved with nothing checking them, private keys readable by others.
    pub warnings: Vec<String>,
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
        let (config, text) = Config::load_text(path)?;
        let mut rt = Runtime::from_config(path, config, generation, None)?;
        rt.sources.record(path, text.as_bytes());
        Ok(rt)
    }

    /// Loads the next generation. Servers whose connection settings did not change keep their
    /// HTTP client, so their warm keep-alive connections survive the reload.
    pub fn reload(path: &Path, previous: &Runtime) -> Result<Runtime, ConfigError> {
        let (config, text) = Config::load_text(path)?;
        let mut rt = Runtime::from_config(path, config, previous.generation + 1, Some(previous))?;
        rt.sources.record(path, text.as_bytes());
        Ok(rt)
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
        // Each key file is read once, and the bytes parsed are the bytes fingerprinted.
        let mut sources = Sources::default();
        let mut signer_at = |field: &str, p: &Path| {
            sources
                .read(p)
                .and_then(|bytes| Signer::from_pem(p, &bytes))
                .map_err(key_err(field.to_owned()))
        };
        let signer = signer_at("gateway_private_key", &config.gateway_private_key)?;
        let downstream_signer = match &config.downstream_signing_key {
            Some(p) => Some(signer_at("downstream_signing_key", p)?),
            None => None,
        };
        let verifier_at = |sources: &mut Sources, field: String, p: &Path| {
            sources
                .read(p)
                .and_then(|bytes| Verifier::from_pem(p, &bytes))
                .map_err(key_err(field))
        };
        let node_verifier = verifier_at(
            &mut sources,
            "tss_node_public_key".into(),
            &config.tss_node_public_key,
        )?;
        let mut downstreams = Vec::with_capacity(config.callback_servers.len());
        for (i, s) in config.callback_servers.iter().enumerate() {
            let verifier = verifier_at(
                &mut sources,
                format!("callback_servers[{i}].pubkey_path"),
                &s.pubkey_path,
            )?;
            let timeout = Duration::from_millis(s.timeout_ms);
            let reusable = previous
                .into_iter()
                .flat_map(|p| p.downstreams.iter())
                .find(|d| same_connection(&d.config, s));
            // TLS files are read by the TLS loader; their digest is taken just before.
            for p in [&s.ca_file, &s.client_cert, &s.client_key]
                .into_iter()
                .flatten()
            {
                let _ = sources.read(p);
            }
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
        if let Some(t) = &config.tls {
            for p in [&t.cert, &t.key] {
                let _ = sources.read(p);
            }
        }
        let tls = match &config.tls {
            Some(t) => Some(crate::tls::acceptor(t).map_err(|e| ConfigError::Field {
                path: path.to_owned(),
                field: e.field.into(),
                message: e.message,
            })?),
            None => None,
        };
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
        Ok(Runtime {
            warnings,
            tls,
            path: path.to_owned(),
            config,
            generation,
            signer,
            downstream_signer,
            node_verifier,
            downstreams,
            sources,
        })
    }

    /// The key that signs requests to the downstreams: `downstream_signing_key`, else
    /// `gateway_private_key`.
    pub fn request_signer(&self) -> &Signer {
        self.downstream_signer.as_ref().unwrap_or(&self.signer)
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
        let request_key = c
            .downstream_signing_key
            .as_ref()
            .unwrap_or(&c.gateway_private_key);
        out.push_str(&format!(
            "  answers signed with {}  requests to downstreams signed with {}\n",
            c.gateway_private_key.display(),
            request_key.display()
        ));
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
                crate::config::redact_address(d.url.as_str()),
                d.config.timeout_ms,
                d.retries,
                types.join(",")
            ));
        }
        out
    }
}
