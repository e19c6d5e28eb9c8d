//! `replay`: re-decides recorded requests under a candidate config's embedded rules and
//! `request_types` subscriptions, calling nobody.
//!
//! Each record that carries its `request` (`audit_payloads: true`) is decided again from what is
//! known without asking anyone: the candidate's rules, and the answers the servers gave at the
//! time. A server the candidate would ask that did not see the request makes the outcome
//! unknown; that is a change to look at, as are: a rejection by the rules, a rejection by a server
//! the candidate no longer asks, and a request no check would cover any more.
//!
//! A shadow call still running when the answer went out is recorded `pending` in the decision
//! record and its verdict later in a `shadow` record of its own: a first pass reads those, so a
//! shadow server the candidate switches to enforce is judged by the verdict it gave.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, Mode};
use crate::protocol::{self, Action, RequestType};
use crate::rules::{RejectOnly, RuleSet, RuleVerdict, Section};
use crate::verdict::{decide, Decision};
use crate::verdict::{Outcome, Verdict};

/// One decision that would change.
#[derive(Debug)]
pub struct Change {
    pub request_id: String,
    pub kind: &'static str,
    pub before: String,
    pub after: String,
    pub why: Vec<String>,
}

/// Counts for one request type.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Tally {
    pub(crate) replayed: u64,
    pub(crate) changed: u64,
}

/// What a replay found, besides the changes given to the caller one by one.
#[derive(Debug, Default)]
pub struct Report {
    pub(crate) by_type: BTreeMap<&'static str, Tally>,
    /// Request records without a `request` (recorded with `audit_payloads` off), or refused
    /// before any rule or server looked at them (status 10/20).
    pub skipped: u64,
}

/// Why a replay could not run (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is given more than once: each audit file counts once; list each file once, oldest first")]
    Twice(PathBuf),
    #[error("{path}:{line}: not a JSON audit record: {message}")]
    Record {
        path: PathBuf,
        line: u64,
        message: String,
    },
}

/// What the recorded answer was at the time.
struct Recorded<'a> {
    status: i64,
    action: &'a str,
    embedded: &'a str,
    /// Each server's (name, mode, outcome).
    servers: Vec<(&'a str, &'a str, String)>,
}

/// Where a line is: (file index, line number), in the order the files were given.
type Place = (usize, u64);

/// The `shadow` records: verdicts that arrived after their answer, by request and server.
#[derive(Default)]
struct LateVerdicts {
    /// (request_id, server) -> each late verdict's place and outcome, in order; `used` once a
    /// decision record took it.
    late: HashMap<(String, String), Vec<Late>>,
    /// (request_id, server) -> the outcome the last evaluation of it took (for its duplicates).
    last: HashMap<(String, String), String>,
}

struct Late {
    at: Place,
    outcome: String,
    used: bool,
}

// === impl Change / Report ===

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {} -> {}: {}",
            self.request_id,
            self.kind,
            self.before,
            self.after,
            self.why.join("; ")
        )
    }
}

impl Report {
    pub fn changed(&self) -> u64 {
        self.by_type.values().map(|t| t.changed).sum()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .by_type
            .iter()
            .map(|(k, t)| format!("{k} {} replayed, {} would change", t.replayed, t.changed))
            .collect();
        write!(
            f,
            "replay: {} would change; {}; {} records skipped (no payload recorded, or refused before any check)",
            self.changed(),
            if parts.is_empty() { "nothing replayed".to_owned() } else { parts.join("; ") },
            self.skipped
        )
    }
}

/// Replays every record of `files` under `candidate`, calling `on_change` for each decision that
/// would change.
pub fn replay(
    candidate: &Config,
    files: &[PathBuf],
    mut on_change: impl FnMut(&Change),
) -> Result<Report, ReplayError> {
    // The same file under two names (`f ./f`, a symlink) would count its records twice.
    let mut seen = std::collections::HashSet::new();
    for path in files {
        let canonical = std::fs::canonicalize(path).map_err(|source| ReplayError::Read {
            path: path.to_owned(),
            source,
        })?;
        if !seen.insert(canonical) {
            return Err(ReplayError::Twice(path.to_owned()));
        }
    }
    let mut late = LateVerdicts::default();
    for (i, path) in files.iter().enumerate() {
        each_record(path, |line, record| {
            if let Some(s) = record.get("shadow") {
                let text = |k: &str| s[k].as_str().unwrap_or("").to_owned();
                late.late
                    .entry((text("request_id"), text("server")))
                    .or_default()
                    .push(Late {
                        at: (i, line),
                        outcome: text("outcome"),
                        used: false,
                    });
            }
        })?;
    }
    let mut report = Report::default();
    for (i, path) in files.iter().enumerate() {
        each_record(path, |line, record| {
            replay_record(
                candidate,
                (i, line),
                &record,
                &mut late,
                &mut report,
                &mut on_change,
            );
        })?;
    }
    Ok(report)
}

/// Calls `each` with every line of `path` (its number and its JSON).
fn each_record(
    path: &Path,
    mut each: impl FnMut(u64, serde_json::Value),
) -> Result<(), ReplayError> {
    let read_err = |source| ReplayError::Read {
        path: path.to_owned(),
        source,
    };
    let mut reader = BufReader::with_capacity(1 << 20, File::open(path).map_err(read_err)?);
    let mut buf = Vec::new();
    let mut line = 0u64;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(read_err)? == 0 {
            return Ok(());
        }
        line += 1;
        let record: serde_json::Value =
            serde_json::from_slice(&buf).map_err(|e| ReplayError::Record {
                path: path.to_owned(),
                line,
                message: e.to_string(),
            })?;
        each(line, record);
    }
}

/// Replays one line, if it is a decision record that carries its request.
fn replay_record(
    candidate: &Config,
    at: Place,
    record: &serde_json::Value,
    late: &mut LateVerdicts,
    report: &mut Report,
    on_change: &mut impl FnMut(&Change),
) {
    // Only decision records are replayed; checkpoints, `config`, `refused`, `shadow` and
    // other kinds are not requests.
    if record.get("request_id").is_none() || record.get("status").is_none() {
        return;
    }
    let status = record["status"].as_i64().unwrap_or(-1);
    let Some(request) = record.get("request").filter(|_| matches!(status, 0 | 30)) else {
        report.skipped += 1;
        return;
    };
    let request_id = record["request_id"].as_str().unwrap_or("");
    let duplicate = record["duplicate"].as_bool().unwrap_or(false);
    let recorded = Recorded {
        status,
        action: record["action"].as_str().unwrap_or(""),
        embedded: record["embedded"].as_str().unwrap_or(""),
        servers: record["servers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                let (name, mode) = (
                    s["name"].as_str().unwrap_or(""),
                    s["mode"].as_str().unwrap_or(""),
                );
                let mut outcome = s["outcome"].as_str().unwrap_or("").to_owned();
                if mode == "shadow" && outcome == "pending" {
                    if let Some(o) = late.verdict(request_id, name, at, duplicate) {
                        outcome = o;
                    }
                }
                (name, mode, outcome)
            })
            .collect(),
    };
    let code = request["request_type"].as_i64();
    let kind = protocol::type_name(code);
    let tally = report.by_type.entry(kind).or_default();
    tally.replayed += 1;
    if let Some(change) = redecide(candidate, request, code, &recorded) {
        tally.changed += 1;
        on_change(&change);
    }
}

// === impl LateVerdicts ===

impl LateVerdicts {
    /// The late verdict of `server` for the decision record of `request_id` at `at`, whose
    /// record shows that server `pending`. An evaluation's verdict is recorded after its first
    /// record: a record of its own takes the first unused one after it; a duplicate (a twin or
    /// a remembered answer, which shares its evaluation) takes what that evaluation took, or,
    /// written before it, the next one without using it up.
    fn verdict(
        &mut self,
        request_id: &str,
        server: &str,
        at: Place,
        duplicate: bool,
    ) -> Option<String> {
        let key = (request_id.to_owned(), server.to_owned());
        if duplicate {
            if let Some(o) = self.last.get(&key) {
                return Some(o.clone());
            }
        }
        let list = self.late.get_mut(&key)?;
        let next = list.iter_mut().find(|l| !l.used && l.at > at)?;
        if duplicate {
            return Some(next.outcome.clone());
        }
        next.used = true;
        let outcome = next.outcome.clone();
        self.last.insert(key, outcome.clone());
        Some(outcome)
    }
}

/// The decision under `candidate`, as a change if it differs from the recorded one.
fn redecide(
    candidate: &Config,
    request: &serde_json::Value,
    code: Option<i64>,
    recorded: &Recorded<'_>,
) -> Option<Change> {
    let request_id = request["request_id"].as_str().unwrap_or("").to_owned();
    let kind_name = protocol::type_name(code);
    let code = code.unwrap_or(-1);
    let kind = RequestType::from_code(code);
    let detail = request["request_detail"].as_str().unwrap_or("");
    let rules = candidate.embedded_risk_control_rules.check(code, detail);
    let before = label(recorded.status, recorded.action);
    let mut why = Vec::new();

    let was_rule_rejected = recorded.embedded.starts_with("reject");
    match &rules {
        RuleVerdict::Reject(rule) if !was_rule_rejected => {
            why.push(format!("embedded rules would now reject it ({rule})"));
        }
        RuleVerdict::Off | RuleVerdict::Pass if was_rule_rejected => {
            why.push(format!(
                "embedded rules would no longer reject it (they said `{}`)",
                recorded.embedded
            ));
        }
        _ => {}
    }

    let subscribers: Vec<&str> = candidate
        .callback_servers
        .iter()
        .filter(|s| s.mode == Mode::Enforce && kind.is_some_and(|k| s.subscribes(k)))
        .map(|s| s.name.as_str())
        .collect();
    // Servers that decided against it then and that the candidate would not ask.
    for (name, mode, outcome) in &recorded.servers {
        if *mode == "enforce" && *outcome != "approved" && !subscribers.contains(name) {
            why.push(format!(
                "{name} had answered `{outcome}` and would no longer be asked (removed, shadow, or not subscribed to {kind_name})"
            ));
        }
    }
    let after = decide_again(&rules, &subscribers, recorded, &mut why);
    let had_check = was_rule_rejected || recorded.servers.iter().any(|(_, m, _)| *m == "enforce");
    if kind != Some(RequestType::Ping)
        && subscribers.is_empty()
        && !kind.is_some_and(|k| covers(&candidate.embedded_risk_control_rules, k))
        && had_check
    {
        why.push(format!(
            "no check would cover it: no enforcing server subscribes to {kind_name} and no embedded rule restricts it"
        ));
    }
    let decision_changed = !same(&before, &after);
    if !decision_changed && !why.iter().any(|w| w.starts_with("no check")) {
        return None;
    }
    if why.is_empty() {
        why.push("the recorded answers decide differently under the candidate".into());
    }
    Some(Change {
        request_id,
        kind: kind_name,
        before,
        after,
        why,
    })
}

/// The decision under the candidate's `rules` from the answers `subscribers` gave at the time:
/// `UNKNOWN` (with the reason in `why`) when one of them was not asked or its answer was not
/// recorded.
fn decide_again(
    rules: &RuleVerdict,
    subscribers: &[&str],
    recorded: &Recorded<'_>,
    why: &mut Vec<String>,
) -> String {
    let known = |name: &str| {
        recorded
            .servers
            .iter()
            .find(|(n, _, o)| *n == name && !matches!(o.as_str(), "pending" | "cancelled" | ""))
            .and_then(|(_, _, o)| Outcome::RECORDED.into_iter().find(|r| r.as_str() == o))
    };
    let unseen: Vec<&str> = subscribers
        .iter()
        .copied()
        .filter(|n| known(n).is_none())
        .collect();

    if let RuleVerdict::Reject(rule) = rules {
        label_decision(&decide(&RuleVerdict::Reject(rule.clone()), &[]))
    } else if let Some(rejecter) = subscribers
        .iter()
        .find(|n| known(n) == Some(Outcome::Rejected))
    {
        format!("REJECT (status 0, by {rejecter})")
    } else if !unseen.is_empty() {
        for n in &unseen {
            let cut_off = recorded.servers.iter().any(|(s, _, _)| s == n);
            why.push(if cut_off {
                format!(
                    "would now wait for {n}, whose answer was not recorded (cancelled or pending)"
                )
            } else {
                format!("would now be asked of {n}, which did not see it")
            });
        }
        format!("UNKNOWN (asks {})", unseen.join(", "))
    } else {
        let verdicts: Vec<Verdict> = subscribers
            .iter()
            .filter_map(|n| {
                known(n).map(|outcome| Verdict {
                    server: Arc::from(*n),
                    mode: Mode::Enforce,
                    outcome,
                    duration: Duration::ZERO,
                    detail: String::new(),
                })
            })
            .collect();
        label_decision(&decide(rules, &verdicts))
    }
}

/// Whether two labels are the same decision (ignoring who made it).
fn same(a: &str, b: &str) -> bool {
    let key = |s: &str| {
        s.split(", by ")
            .next()
            .unwrap_or(s)
            .trim_end_matches(')')
            .to_owned()
    };
    key(a) == key(b)
}

fn label(status: i64, action: &str) -> String {
    if status == 0 && action == Action::Approve.as_str() {
        "APPROVE".into()
    } else {
        format!("REJECT (status {status})")
    }
}

fn label_decision(d: &Decision) -> String {
    label(d.status.code(), d.action.as_str())
}

/// True when the enabled embedded rules restrict `kind` (reject it, or require an allow-list
/// match); a section that lets everything through is no check.
fn covers(rules: &RuleSet, kind: RequestType) -> bool {
    fn restricts<E>(s: &Option<Section<E>>) -> bool {
        s.as_ref()
            .is_some_and(|s| s.reject_all || s.allow_list.is_some())
    }
    fn rejects(s: &Option<RejectOnly>) -> bool {
        s.as_ref().is_some_and(|s| s.reject_all)
    }
    rules.enable
        && match kind {
            RequestType::Ping => true,
            RequestType::KeyGen => restricts(&rules.key_gen),
            RequestType::KeySign => rejects(&rules.key_sign),
            RequestType::KeyReshare => restricts(&rules.key_reshare),
            RequestType::KeyShareSign => rejects(&rules.key_share_sign),
        }
}
