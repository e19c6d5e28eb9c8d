//! The `config` record: what a loaded generation checks, and what changed since the one before.

use super::records::{ConfigRecord, ConfigSummary, EventServerSummary, ServerSummary};
use super::{hex, now_rfc3339};
use crate::config::Mode;
use crate::generation::{Downstream, Generation};

fn summary(d: &Downstream) -> ServerSummary {
    ServerSummary {
        name: d.name.to_string(),
        mode: d.mode.as_str(),
        request_types: d.config.request_types.iter().map(|t| t.name()).collect(),
    }
}

/// Lowercase hex SHA-256 of the config file's bytes `g` was loaded from (empty if unknown): the
/// `sha256` of its `config` record.
pub(crate) fn config_sha256(g: &Generation) -> String {
    g.sources
        .get(&g.path)
        .flatten()
        .map(|d| hex(&d))
        .unwrap_or_default()
}

/// The body of the `config` record of `next`, loaded after `old` (`None`: at start-up).
pub(crate) fn config_record(old: Option<&Generation>, next: &Generation, reason: &str) -> Vec<u8> {
    let before: &[std::sync::Arc<Downstream>] = old.map_or(&[], |o| &o.downstreams);
    let find = |list: &[std::sync::Arc<Downstream>], name: &str| {
        list.iter().find(|d| &*d.name == name).cloned()
    };
    let mut added = Vec::new();
    let mut changed = Vec::new();
    for d in &next.downstreams {
        match find(before, &d.name) {
            None => added.push(d.name.to_string()),
            Some(b) if b.config != d.config => changed.push(d.name.to_string()),
            Some(_) => {}
        }
    }
    let removed = before
        .iter()
        .filter(|b| find(&next.downstreams, &b.name).is_none())
        .map(|b| b.name.to_string())
        .collect();
    let config = ConfigSummary {
        generation: next.number,
        sha256: config_sha256(next),
        reason: reason.to_owned(),
        servers: next.downstreams.iter().map(|d| summary(d)).collect(),
        event_servers: next
            .event_servers
            .iter()
            .map(|e| EventServerSummary {
                name: e.name.to_string(),
                event_types: e.config.event_types.clone(),
            })
            .collect(),
        added,
        removed,
        changed,
    };
    serde_json::to_vec(&ConfigRecord {
        ts: now_rfc3339(),
        config: &config,
    })
    .unwrap_or_else(|_| b"{}".to_vec())
}

/// Logs a WARN for each enforcing server of `old` that `next` removes, switches to shadow, or
/// narrows (checks fewer request types): approvals it used to check now pass without it.
pub(crate) fn warn_if_weaker(old: &Generation, next: &Generation) {
    for b in old.downstreams.iter().filter(|d| d.mode == Mode::Enforce) {
        let Some(n) = next.downstreams.iter().find(|d| d.name == b.name) else {
            tracing::warn!(server = %b.name, "reload removed an enforcing callback server: what it checked is no longer checked by it");
            continue;
        };
        if n.mode != Mode::Enforce {
            tracing::warn!(server = %b.name, "reload switched an enforcing callback server to shadow: its answers no longer decide");
            continue;
        }
        let dropped: Vec<&str> = b
            .config
            .request_types
            .iter()
            .filter(|t| !n.config.request_types.contains(t))
            .map(|t| t.name())
            .collect();
        if !dropped.is_empty() {
            tracing::warn!(server = %b.name, dropped = ?dropped, "reload narrowed the request types an enforcing callback server checks");
        }
    }
}
