//! Hot reload: on SIGHUP, or when the config file or a key file it names changes on disk, load a
//! new generation and swap it in atomically.
//!
//! Guarantees: a request keeps the generation it started with; a new config that fails to load
//! changes nothing (the running one stays, the failure is logged and counted); a changed `listen`
//! is reported as needing a restart, because the socket is bound once.
//!
//! The watcher loads a change only once every watched file has kept the same bytes for
//! `reload_settle_ms`, so a file written in place is never loaded half written. What counts as
//! seen is what the running generation was loaded from: while the disk differs from it and does
//! not load, the load is retried with backoff and the failure stays visible
//! (`tss_gateway_config_reload_failing`, `/readyz` `config_error`, an ERROR line per attempt).

use std::collections::{BTreeSet, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::signal::unix::Signal;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::{Config, ConfigError};
use crate::generation::{Downstream, Generation, Sources};
use crate::ops::metrics::Metrics;
use crate::Shared;

/// The first retry of a config that did not load; each later one waits twice as long.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between two retries.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// Symlinks followed when working out which paths lead to a watched file (as the kernel's 40).
const MAX_LINKS: usize = 40;

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("state_store: {0}")]
    Store(String),
    #[error("audit log {path}: {source}")]
    Audit {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Loads the config at `path` as the next generation and swaps it in. On error the running
/// generation is untouched.
pub fn reload(shared: &Shared, path: &Path, reason: &str) -> Result<u64, ReloadError> {
    let result = try_reload(shared, path);
    match &result {
        Ok(done) => {
            shared
                .metrics
                .config_reloads
                .with_label_values(&["success"])
                .inc();
            shared.reload.clear(&shared.metrics);
            tracing::info!(
                generation = done.generation,
                reason,
                files_changed = %list(&done.files),
                servers_added = %list(&done.added),
                servers_removed = %list(&done.removed),
                servers_changed = %list(&done.changed),
                keys = %done.keys,
                "config reloaded"
            );
        }
        Err(e) => {
            shared
                .metrics
                .config_reloads
                .with_label_values(&["failure"])
                .inc();
            shared.reload.fail(&shared.metrics, e.to_string());
            tracing::error!(reason, error = %e, "config reload refused; keeping the running config");
        }
    }
    result.map(|done| done.generation)
}

/// What a reload changed, for its log line.
struct Reloaded {
    generation: u64,
    /// Files whose bytes differ from what the previous generation read (or that it did not read).
    files: Vec<String>,
    added: Vec<String>,
    removed: Vec<String>,
    /// Servers whose entry or key changed.
    changed: Vec<String>,
    /// Every key's fingerprint now in use, by role.
    keys: String,
}

/// `items` joined with commas, or `none`.
fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(",")
    }
}

/// What `next` changes against `old`.
fn changes(old: &Generation, next: &Generation) -> Reloaded {
    let files = next
        .sources
        .paths()
        .chain(
            old.sources
                .paths()
                .filter(|p| next.sources.get(p).is_none()),
        )
        .filter(|p| old.sources.get(p) != next.sources.get(p))
        .map(|p| p.display().to_string())
        .collect();
    let find =
        |g: &Generation, name: &str| g.downstreams.iter().find(|d| &*d.name == name).cloned();
    let mut added = Vec::new();
    let mut changed = Vec::new();
    for d in &next.downstreams {
        match find(old, &d.name) {
            None => added.push(d.name.to_string()),
            Some(b)
                if b.config != d.config
                    || b.verifier.fingerprints() != d.verifier.fingerprints() =>
            {
                changed.push(d.name.to_string())
            }
            Some(_) => {}
        }
    }
    let removed = old
        .downstreams
        .iter()
        .filter(|b| find(next, &b.name).is_none())
        .map(|b| b.name.to_string())
        .collect();
    Reloaded {
        generation: next.number,
        files,
        added,
        removed,
        changed,
        keys: next.key_fingerprints(),
    }
}

fn try_reload(shared: &Shared, path: &Path) -> Result<Reloaded, ReloadError> {
    let old = shared.current.load_full();
    let next = Generation::reload(path, &old)?;
    let (running, configured) = (old.config.state_store(), next.config.state_store());
    if running != configured {
        let show = |s: &Option<crate::config::StoreLocation>| {
            s.as_ref()
                .map_or_else(|| "none".to_owned(), crate::state::describe)
        };
        return Err(ReloadError::Store(format!(
            "changed from {} to {}: restart the gateway to change the state store (the running config is kept until then)",
            show(&running),
            show(&configured)
        )));
    }
    let audit = match &next.config.audit_log {
        Some(p) if old.config.audit_log.as_ref() == Some(p) => shared.audit.load_full(),
        Some(p) => Some(
            shared
                .open_audit(p, &next)
                .map_err(|source| ReloadError::Audit {
                    path: p.clone(),
                    source,
                })?,
        ),
        None => None,
    };
    if next.config.listen != old.config.listen {
        tracing::warn!(
            running = %old.config.listen,
            configured = %next.config.listen,
            "listen changed: restart the gateway to move the listener; it keeps the old address until then"
        );
    }
    if next.config.admin_listen != old.config.admin_listen {
        tracing::warn!("admin_listen changed: restart the gateway to move the admin endpoints");
    }
    for w in &next.warnings {
        tracing::warn!("{w}");
    }
    let removed: Vec<Arc<Downstream>> = old
        .downstreams
        .iter()
        .filter(|d| !next.downstreams.iter().any(|n| n.name == d.name))
        .cloned()
        .collect();
    let done = changes(&old, &next);
    crate::ops::traces::reload(old.config.tracing.as_ref(), next.config.tracing.as_ref());
    shared.current.store(Arc::new(next));
    let before = shared.audit.swap(audit);
    if let Some(before) = before {
        let same = shared
            .audit
            .load()
            .as_ref()
            .is_some_and(|now| Arc::ptr_eq(now, &before));
        if !same {
            // `audit_log` now names another file (or none): close this one with a checkpoint.
            before.retire(&shared.current.load_full());
        }
    }
    shared.audit_config(&old, "reload");
    // Their series go once their last call is done (see `Health::retire`).
    shared.health.retire(removed);
    shared.set_config_gauges();
    Ok(done)
}

/// How the config on disk stands against the running generation: the refusal of the last
/// attempt while the disk holds a config that does not load.
#[derive(Debug, Default)]
pub struct Status {
    error: Mutex<Option<String>>,
    /// Times the watcher read and hashed the watched files.
    disk_reads: AtomicU64,
}

// === impl Status ===

impl Status {
    /// Why the config on disk does not load, while it does not (for `/readyz`).
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many times the watcher has read and hashed every watched file: a debugging aid, and
    /// how tests see that writes to other files cost nothing.
    pub fn disk_reads(&self) -> u64 {
        self.disk_reads.load(Ordering::Relaxed)
    }

    fn fail(&self, metrics: &Metrics, error: String) {
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
        metrics.config_reload_failing.set(1);
    }

    fn clear(&self, metrics: &Metrics) {
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        metrics.config_reload_failing.set(0);
    }
}

/// The files the config at `path` depends on: itself and every key and certificate it names
/// (`audit_log` is written, not read, and is not one of them). A config that does not parse
/// names nothing but itself.
pub fn watched_files(path: &Path) -> BTreeSet<PathBuf> {
    let mut files = BTreeSet::from([path.to_owned()]);
    if let Ok(c) = Config::load(path) {
        files.insert(c.tss_node_public_key);
        files.insert(c.gateway_private_key);
        files.extend(c.downstream_signing_key);
        files.extend(c.tss_node_event_public_key);
        if let Some(t) = c.tls {
            files.extend([t.cert, t.key]);
        }
        for s in c.callback_servers {
            files.insert(s.pubkey_path);
            files.extend(
                [s.ca_file, s.client_cert, s.client_key]
                    .into_iter()
                    .flatten(),
            );
        }
    }
    files
}

/// What the watcher follows: the files the running generation was loaded from and those the
/// config on disk names; every path whose change can change what they read (the files, and each
/// symlink on the way to them: a ConfigMap update swaps `..data`); the folders holding those.
#[derive(Debug, Default)]
struct Watched {
    files: BTreeSet<PathBuf>,
    paths: HashSet<PathBuf>,
    dirs: BTreeSet<PathBuf>,
}

// === impl Watched ===

impl Watched {
    fn of(shared: &Shared, config: &Path) -> Watched {
        let mut files: BTreeSet<PathBuf> = shared.current.load().sources.paths().cloned().collect();
        files.extend(watched_files(config));
        let paths: HashSet<PathBuf> = files
            .iter()
            .filter_map(|f| std::path::absolute(f).ok())
            .flat_map(|f| resolution(&f))
            .collect();
        let dirs = paths
            .iter()
            .filter_map(|p| p.parent().map(Path::to_owned))
            .collect();
        Watched { files, paths, dirs }
    }

    /// Whether `event` may have changed a watched file. An error or a lost-events notice may
    /// hide anything, so it counts.
    fn concerns(&self, event: &notify::Result<notify::Event>) -> bool {
        match event {
            Err(_) => true,
            Ok(e) if e.need_rescan() => true,
            Ok(e) => !e.kind.is_access() && e.paths.iter().any(|p| self.paths.contains(p)),
        }
    }

    /// What the watched files hold now.
    fn read(&self, status: &Status) -> Sources {
        status.disk_reads.fetch_add(1, Ordering::Relaxed);
        Sources::on_disk(&self.files)
    }
}

/// `file`, each symlink met on the way to what it names, and what it finally names.
fn resolution(file: &Path) -> Vec<PathBuf> {
    let mut out = vec![file.to_owned()];
    let mut path = file.to_owned();
    for _ in 0..MAX_LINKS {
        let Some((link, target)) = first_link(&path) else {
            break;
        };
        out.push(link);
        path = target;
    }
    out.push(path);
    out
}

/// The first component of `path` that is a symlink, and `path` with it replaced by its target.
fn first_link(path: &Path) -> Option<(PathBuf, PathBuf)> {
    let mut prefix = PathBuf::new();
    let mut rest = path.components();
    while let Some(c) = rest.next() {
        prefix.push(c);
        let is_link = matches!(c, Component::Normal(_))
            && prefix
                .symlink_metadata()
                .is_ok_and(|m| m.file_type().is_symlink());
        if is_link {
            let target = std::fs::read_link(&prefix).ok()?;
            let base = prefix.parent().unwrap_or(Path::new("/"));
            // Nothing before `prefix` is a symlink, so `..` can be resolved by name.
            let resolved = lexical(&base.join(target).join(rest.as_path()));
            return Some((prefix, resolved));
        }
    }
    None
}

/// `path` with `.` and `..` resolved by name, as inotify reports paths.
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// Whether the disk differs from what the running generation was loaded from.
fn differs(loaded: &Sources, disk: &Sources) -> bool {
    loaded.paths().any(|p| disk.get(p) != loaded.get(p))
}

/// What woke the watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    Hangup,
    Change,
    Retry,
}

/// How waiting for the files to settle ended.
enum Settled {
    /// Every watched file kept these bytes for `reload_settle_ms`.
    Disk(Sources),
    /// SIGHUP came first: load at once.
    Hangup,
}

/// The next SIGHUP; never, if it cannot be listened for.
async fn hangup(hup: &mut Option<Signal>) {
    match hup.as_mut() {
        Some(h) => {
            if h.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Waits until the watched files keep the same bytes for `reload_settle_ms` (the running
/// config's), restarting the wait on any difference. The config may name other files by then,
/// so `watched` is brought up to date before each reading.
async fn settle(
    shared: &Shared,
    path: &Path,
    events: &mut mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
    hup: &mut Option<Signal>,
    watched: &mut Watched,
) -> Settled {
    *watched = Watched::of(shared, path);
    let mut before = watched.read(&shared.reload);
    loop {
        let wait = Duration::from_millis(shared.current.load().config.reload_settle_ms);
        tokio::select! {
            () = hangup(hup) => return Settled::Hangup,
            () = tokio::time::sleep(wait) => {}
        }
        // Events so far are covered by the reading below; later ones wake the watcher again.
        while events.try_recv().is_ok() {}
        *watched = Watched::of(shared, path);
        let now = watched.read(&shared.reload);
        if now == before {
            return Settled::Disk(now);
        }
        before = now;
    }
}

/// Watches the folders of `watched` (and stops watching those no longer needed). A folder that
/// cannot be watched (not there yet) is tried again next time; retries cover it meanwhile.
fn follow(
    watcher: &mut Option<notify::RecommendedWatcher>,
    watched: &Watched,
    dirs: &mut BTreeSet<PathBuf>,
) {
    let Some(w) = watcher else { return };
    for d in dirs.difference(&watched.dirs) {
        let _ = w.unwatch(d);
    }
    dirs.retain(|d| watched.dirs.contains(d));
    for d in &watched.dirs {
        if dirs.contains(d) {
            continue;
        }
        match w.watch(d, RecursiveMode::NonRecursive) {
            Ok(()) => {
                dirs.insert(d.clone());
            }
            Err(e) if d.exists() => {
                tracing::warn!(dir = %d.display(), error = %e, "cannot watch directory");
            }
            Err(e) => {
                tracing::debug!(dir = %d.display(), error = %e, "directory not there to watch")
            }
        }
    }
}

/// Reloads on SIGHUP and on changes to the config or its key files, until the process ends.
///
/// Directories are watched rather than files so that editors that replace a file, and
/// Kubernetes ConfigMap updates (a symlink swap of `..data`), are seen; events on other files
/// in them are ignored.
pub async fn watch(shared: Arc<Shared>, path: PathBuf) {
    let (tx, mut rx) = mpsc::unbounded_channel::<notify::Result<notify::Event>>();
    let mut watcher = match notify::recommended_watcher(move |event| {
        let _ = tx.send(event);
    }) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "file watching unavailable; reload with SIGHUP");
            None
        }
    };
    let mut watched = Watched::of(&shared, &path);
    let mut dirs = BTreeSet::new();
    follow(&mut watcher, &watched, &mut dirs);

    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP");
            None
        }
    };
    // The next retry of a config that did not load, and the wait before it.
    let mut retry: Option<(Instant, Duration)> = None;
    // A change written while the gateway was starting (after the config was read, before the
    // files were watched) raised no event: compare the disk once, and load it if it differs.
    {
        let running = shared.current.load();
        if differs(&running.sources, &Sources::on_disk(running.sources.paths())) {
            retry = Some((Instant::now(), FIRST_RETRY));
        }
    }
    loop {
        let wake = tokio::select! {
            () = hangup(&mut hup) => Wake::Hangup,
            Some(event) = rx.recv() => {
                if !watched.concerns(&event) {
                    continue;
                }
                Wake::Change
            }
            () = async {
                match retry {
                    Some((at, _)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => Wake::Retry,
        };
        let forced = wake == Wake::Hangup
            || match settle(&shared, &path, &mut rx, &mut hup, &mut watched).await {
                Settled::Hangup => true,
                Settled::Disk(disk) => {
                    if !differs(&shared.current.load().sources, &disk) {
                        // The disk holds what runs (a broken file was put back): nothing to load.
                        shared.reload.clear(&shared.metrics);
                        retry = None;
                        follow(&mut watcher, &watched, &mut dirs);
                        continue;
                    }
                    false
                }
            };
        let reason = match (forced, wake) {
            (true, _) => "SIGHUP",
            (false, Wake::Retry) => "retry after a refused reload",
            (false, _) => "file change",
        };
        let loaded = reload(&shared, &path, reason).is_ok();
        if forced {
            // SIGHUP is also logrotate's way to say the audit file was moved.
            shared.reopen_audit();
        }
        retry = match (loaded, retry) {
            (true, _) => None,
            (false, Some((_, wait))) if wake == Wake::Retry && !forced => {
                let wait = (wait * 2).min(MAX_RETRY);
                Some((Instant::now() + wait, wait))
            }
            (false, _) => Some((Instant::now() + FIRST_RETRY, FIRST_RETRY)),
        };
        watched = Watched::of(&shared, &path);
        follow(&mut watcher, &watched, &mut dirs);
    }
}
