//! Hot reload: on SIGHUP, or when the config file or a key file it names changes on disk, load a
//! new generation and swap it in atomically.
//!
//! Guarantees: a request keeps the generation it started with; a new config that fails to load
//! changes nothing (the running one stays, the failure is logged and counted); a changed `listen`
//! is reported as needing a restart, because the socket is bound once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config::{Config, ConfigError};
use crate::generation::{Generation, Sources};
use crate::Shared;

/// File events closer together than this are one change (editors write in several steps).
const SETTLE: Duration = Duration::from_millis(150);

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
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
        Ok(generation) => {
            shared
                .metrics
                .config_reloads
                .with_label_values(&["success"])
                .inc();
            tracing::info!(generation, reason, "config reloaded");
        }
        Err(e) => {
            shared
                .metrics
                .config_reloads
                .with_label_values(&["failure"])
                .inc();
            tracing::error!(reason, error = %e, "config reload refused; keeping the running config");
        }
    }
    result
}

fn try_reload(shared: &Shared, path: &Path) -> Result<u64, ReloadError> {
    let old = shared.current.load_full();
    let next = Generation::reload(path, &old)?;
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
    let removed: Vec<Arc<str>> = old
        .downstreams
        .iter()
        .filter(|d| !next.downstreams.iter().any(|n| n.name == d.name))
        .map(|d| d.name.clone())
        .collect();
    let generation = next.number;
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
    shared.health.prune_gauges(shared, &removed);
    shared.set_config_gauges();
    Ok(generation)
}

/// The files a config depends on: itself and every key and certificate it names.
fn watched_files(path: &Path) -> BTreeSet<PathBuf> {
    let mut files = BTreeSet::from([path.to_owned()]);
    if let Ok(c) = Config::load(path) {
        files.insert(c.tss_node_public_key);
        files.insert(c.gateway_private_key);
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

/// Reloads one generation after another while the files on disk differ from what the last one
/// was loaded from (a write that landed mid-load), a few times at most; later writes are file
/// events of their own. Returns the files to watch and what they held when last loaded.
fn reload_until_current(shared: &Shared, path: &Path, reason: &str, before: &Sources) -> Sources {
    let mut reason = reason;
    for _ in 0..5 {
        if reload(shared, path, reason).is_err() {
            // Nothing was loaded. What the files held before this attempt is what counts as
            // seen, so a fix written meanwhile is still a change; files the refused config newly
            // names are taken as they are now.
            let files = watched_files(path);
            let now = Sources::on_disk(&files);
            return Sources::from_iter(files.iter().map(|f| {
                (
                    f.clone(),
                    before.get(f).unwrap_or_else(|| now.get(f).flatten()),
                )
            }));
        }
        let loaded = shared.current.load().sources.clone();
        if Sources::on_disk(loaded.paths()) == loaded {
            return loaded;
        }
        reason = "file changed while loading";
    }
    shared.current.load().sources.clone()
}

/// Reloads on SIGHUP and on changes to the config or its key files, until the process ends.
///
/// Directories are watched rather than files so that editors that replace a file, and
/// Kubernetes ConfigMap updates (a symlink swap of `..data`), are seen.
pub async fn watch(shared: Arc<Shared>, path: PathBuf) {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let watcher_tx = tx.clone();
    let mut watcher =
        match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| !e.kind.is_access()) {
                let _ = watcher_tx.send(());
            }
        }) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "file watching unavailable; reload with SIGHUP");
                None
            }
        };
    // The running generation's sources: a change made since it was loaded is a change.
    let mut seen = shared.current.load().sources.clone();
    let mut dirs = BTreeSet::new();
    let watch_dirs = |watcher: &mut Option<notify::RecommendedWatcher>,
                      files: &Sources,
                      dirs: &mut BTreeSet<PathBuf>| {
        let Some(w) = watcher else { return };
        let wanted: BTreeSet<PathBuf> = files
            .paths()
            .filter_map(|f| f.parent().map(Path::to_owned))
            .collect();
        for d in dirs.difference(&wanted) {
            let _ = w.unwatch(d);
        }
        for d in wanted.difference(dirs) {
            if let Err(e) = w.watch(d, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %d.display(), error = %e, "cannot watch directory");
            }
        }
        *dirs = wanted;
    };
    watch_dirs(&mut watcher, &seen, &mut dirs);

    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP");
            None
        }
    };
    loop {
        let forced = tokio::select! {
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            Some(()) = rx.recv() => false,
        };
        // Let a burst of writes settle, then drain the events it caused.
        tokio::time::sleep(SETTLE).await;
        while rx.try_recv().is_ok() {}
        let current = Sources::on_disk(seen.paths());
        if !forced && current == seen {
            continue;
        }
        let reason = if forced { "SIGHUP" } else { "file change" };
        // Follow the files the new config names, whether or not it loaded, so fixing a key file
        // named by a refused config also triggers a reload.
        seen = reload_until_current(&shared, &path, reason, &current);
        if forced {
            // SIGHUP is also logrotate's way to say the audit file was moved.
            shared.reopen_audit();
        }
        watch_dirs(&mut watcher, &seen, &mut dirs);
    }
}
