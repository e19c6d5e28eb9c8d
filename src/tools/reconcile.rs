//! `reconcile --audit FILE...`: the reconciliation of [`crate::ops::reconcile`], offline, over
//! the audit files of every replica (rotated ones included, in any order).
//!
//! - An executed request (an `event` record of type `request.*.succeeded`) with no APPROVE
//!   decision record (status 0, action APPROVE, same `request_id`) in any file is listed:
//!   exit 1.
//! - An approval with no `succeeded` or `failed` event, older than `--grace`, is listed for
//!   information (the node may not send events, or they went to another gateway).
//!
//! A file given twice (or under two names) is read once; records are sets, so overlapping
//! files count nothing twice.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::io::BufRead;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::protocol::event::{request_stage, Stage};

/// Why the files could not be reconciled (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An executed request no record approves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unapproved {
    pub request_id: String,
    pub event_id: String,
    pub event_type: String,
    pub node_id: String,
    /// `file:line` of its event record.
    pub at: String,
}

/// An approval with no outcome event after the grace period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfinished {
    pub request_id: String,
    pub approved_at: String,
    pub at: String,
}

/// What the files show.
#[derive(Debug, Default)]
pub struct Report {
    pub files: usize,
    pub approvals: usize,
    pub executions: usize,
    pub unapproved: Vec<Unapproved>,
    pub unfinished: Vec<Unfinished>,
}

/// Reads `files` and reconciles them; approvals younger than `grace` are not listed as
/// unfinished.
pub fn reconcile(files: &[PathBuf], grace: Duration) -> Result<Report, ReconcileError> {
    let mut seen_files = HashSet::new();
    let mut approved: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut finished: BTreeSet<String> = BTreeSet::new();
    let mut executed: BTreeMap<String, Unapproved> = BTreeMap::new();
    let mut report = Report::default();
    for path in files {
        let read = |source| ReconcileError::Read {
            path: path.clone(),
            source,
        };
        let real = std::fs::canonicalize(path).map_err(read)?;
        if !seen_files.insert(real) {
            continue;
        }
        report.files += 1;
        let file = std::fs::File::open(path).map_err(read)?;
        for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(read)?;
            // Lines that are not JSON objects (a torn last line) are `audit verify`'s business.
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let at = format!("{}:{}", path.display(), n + 1);
            let text = |v: &serde_json::Value, k: &str| {
                v.get(k)
                    .and_then(|x| x.as_str())
                    .unwrap_or_default()
                    .to_owned()
            };
            if let Some(e) = v.get("event") {
                let event_type = text(e, "event_type");
                let request_id = text(e, "request_id");
                match request_stage(&event_type) {
                    Some((_, Stage::Succeeded)) => {
                        finished.insert(request_id.clone());
                        executed.entry(request_id.clone()).or_insert(Unapproved {
                            request_id,
                            event_id: text(e, "event_id"),
                            event_type,
                            node_id: text(e, "node_id"),
                            at,
                        });
                    }
                    Some((_, Stage::Failed)) => {
                        finished.insert(request_id);
                    }
                    _ => {}
                }
            } else if v.get("status").and_then(|s| s.as_i64()) == Some(0)
                && v.get("action").and_then(|a| a.as_str()) == Some("APPROVE")
                && v.get("type").and_then(|t| t.as_str()) != Some("ping")
            {
                let id = text(&v, "request_id");
                if !id.is_empty() {
                    approved.entry(id).or_insert((text(&v, "ts"), at));
                }
            }
        }
    }
    report.approvals = approved.len();
    report.executions = executed.len();
    report.unapproved = executed
        .into_values()
        .filter(|x| !approved.contains_key(&x.request_id))
        .collect();
    let cutoff = SystemTime::now()
        .checked_sub(grace)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    report.unfinished = approved
        .into_iter()
        .filter(|(id, _)| !finished.contains(id))
        .filter(|(_, (ts, _))| humantime::parse_rfc3339(ts).is_ok_and(|t| t < cutoff))
        .map(|(request_id, (approved_at, at))| Unfinished {
            request_id,
            approved_at,
            at,
        })
        .collect();
    Ok(report)
}

// === impl Report ===

impl Report {
    /// Every execution was approved.
    pub fn clean(&self) -> bool {
        self.unapproved.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for u in &self.unapproved {
            writeln!(
                f,
                "UNAPPROVED EXECUTION request_id={} event_id={} event_type={} node_id={} at {}",
                u.request_id, u.event_id, u.event_type, u.node_id, u.at
            )?;
        }
        for u in &self.unfinished {
            writeln!(
                f,
                "info: approved with no succeeded/failed event yet: request_id={} approved {} at {}",
                u.request_id, u.approved_at, u.at
            )?;
        }
        write!(
            f,
            "{} file(s): {} approval(s), {} execution(s), {} unapproved, {} approval(s) without an outcome",
            self.files,
            self.approvals,
            self.executions,
            self.unapproved.len(),
            self.unfinished.len()
        )
    }
}
