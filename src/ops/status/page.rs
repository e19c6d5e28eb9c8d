//! The status page's HTML, from a [`Snapshot`] (plain data, gathered in [`super`]).
//!
//! Guarantees: every dynamic string goes through maud's escaping (a `request_id` such as
//! `<script>` is text); free texts (errors, reasons) are also cleared of `user:pass@` in any URL
//! they quote; the page loads nothing (inline CSS only, no script, no image) and reloads itself
//! every [`REFRESH_SECS`].

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use maud::{html, Markup, PreEscaped, DOCTYPE};

use super::recent::{Checkpoint, DecisionRow, Summary, SPAN};
use crate::ops::health::HealthState;
use crate::state::alarms::Alarm;

/// The page reloads itself this often.
pub(crate) const REFRESH_SECS: u64 = 5;

/// Everything the page shows, read at one moment.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) now: SystemTime,
    pub(crate) service_name: String,
    pub(crate) version: &'static str,
    /// Why the gateway cannot approve now (`None`: ready), as `/readyz` says.
    pub(crate) unready: Option<String>,
    /// Why the config on disk does not load (the last good one keeps serving).
    pub(crate) config_error: Option<String>,
    pub(crate) generation: u64,
    /// SHA-256 of the config file's bytes, as in the audit `config` record.
    pub(crate) config_sha256: String,
    pub(crate) loaded_at: SystemTime,
    /// `health_check_interval_ms` (0: health checks are off).
    pub(crate) health_interval_ms: u64,
    pub(crate) servers: Vec<ServerView>,
    pub(crate) event_servers: Vec<EventServerView>,
    /// Newest first.
    pub(crate) decisions: Vec<DecisionRow>,
    /// Unverified callers refused since start-up, and the last of them (newest first).
    pub(crate) refused: (u64, Vec<DecisionRow>),
    /// `None`: no audit log configured.
    pub(crate) audit: Option<AuditView>,
    pub(crate) alarms: Result<Vec<Alarm>, String>,
}

/// One downstream callback server.
#[derive(Debug)]
pub(crate) struct ServerView {
    pub(crate) name: String,
    pub(crate) mode: &'static str,
    pub(crate) types: String,
    /// Redacted: no `user:pass@`, no query.
    pub(crate) address: String,
    pub(crate) health: Option<HealthState>,
    pub(crate) recent: Summary,
}

/// One event server.
#[derive(Debug)]
pub(crate) struct EventServerView {
    pub(crate) name: String,
    pub(crate) types: String,
    /// Redacted: no `user:pass@`, no query.
    pub(crate) address: String,
    pub(crate) recent: Summary,
    pub(crate) backlog: Backlog,
}

/// An event server's undelivered events, read from the state store.
#[derive(Debug, Clone)]
pub(crate) enum Backlog {
    /// The config has no state store.
    NoStore,
    /// The store did not answer in time, or failed: why.
    Unavailable(String),
    Known {
        count: i64,
        /// When the oldest undelivered event was recorded (ms since the epoch).
        oldest_ms: Option<i64>,
    },
}

/// The audit log and its chain head.
#[derive(Debug)]
pub(crate) struct AuditView {
    pub(crate) path: String,
    pub(crate) checkpoint: Option<Checkpoint>,
}

const CSS: &str = "\
*{box-sizing:border-box}\
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0 auto;padding:12px;max-width:1400px;color:#1a1a1a;background:#fafafa}\
h1{font-size:1.3em;margin:0 0 4px;overflow-wrap:anywhere}\
h2{font-size:1.08em;margin:22px 0 6px}\
.meta{color:#555;font-size:.9em}\
.badge{display:inline-block;padding:1px 9px;border-radius:10px;font-weight:600;color:#fff}\
.ok{background:#2e7d32}.bad{background:#c62828}\
.alarms{border:2px solid #c62828;background:#fdecea;color:#b71c1c;padding:8px 12px;border-radius:6px;margin-top:12px;overflow-wrap:anywhere}\
.alarms h2{margin:0 0 4px;color:#b71c1c}.alarms ul{margin:0;padding-left:1.2em}\
.calm{color:#2e7d32}.warn{color:#9a5b00}\
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;max-width:100%;border:1px solid #e3e3e3;border-radius:6px;background:#fff}\
table{border-collapse:collapse;width:100%;font-size:.92em}\
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eee;white-space:nowrap;vertical-align:top}\
th{background:#f3f3f3;font-weight:600}\
td.text{white-space:normal;min-width:18em;max-width:40em;overflow-wrap:anywhere}\
.up,.approve{color:#2e7d32;font-weight:600}.down,.reject{color:#c62828;font-weight:600}\
.unknown{color:#9a5b00}\
dl{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:2px 14px;margin:0}\
dt{color:#555}dd{margin:0;overflow-wrap:anywhere;min-width:0}\
code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.95em}\
";

/// The whole page.
pub(crate) fn render(s: &Snapshot) -> String {
    let title = format!("{} status", s.service_name);
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta http-equiv="refresh" content=(REFRESH_SECS);
                meta name="referrer" content="no-referrer";
                title { (title) }
                style { (PreEscaped(CSS)) }
            }
            body {
                (header(s))
                (alarms(s))
                h2 { "Callback servers" }
                (servers(s))
                h2 { "Event servers" }
                (event_servers(s))
                h2 { "Last decisions" }
                (decisions(s))
                (refused(s))
                h2 { "Config and audit" }
                (config_and_audit(s))
            }
        }
    }
    .into_string()
}

fn header(s: &Snapshot) -> Markup {
    html! {
        h1 { (s.service_name) }
        p.meta {
            @match &s.unready {
                None => span.badge.ok id="readiness" { "ready" },
                Some(why) => {
                    span.badge.bad id="readiness" { "not ready" }
                    " " span.down { (scrub(why)) }
                }
            }
            " · version " (s.version)
            " · config generation " (s.generation)
            " · " (rfc3339(s.now)) " · refreshes every " (REFRESH_SECS) " s"
        }
        @if let Some(e) = &s.config_error {
            p.warn { "The config on disk does not load; the last good one keeps serving: " (scrub(e)) }
        }
    }
}

fn alarms(s: &Snapshot) -> Markup {
    match &s.alarms {
        Ok(list) if list.is_empty() => html! {
            p.calm id="alarms" { "No alarms in the last 24 h." }
        },
        Ok(list) => html! {
            section.alarms id="alarms" {
                h2 { "ALARM: " (list.len()) " in the last 24 h" }
                ul {
                    @for a in list {
                        li {
                            strong { (alarm_kind(&a.kind)) }
                            ": request " code { (a.request_id) }
                            " executed without approval (event " code { (a.event_id) }
                            @if !a.event_type.is_empty() { ", " (a.event_type) }
                            @if !a.node_id.is_empty() { ", node " (a.node_id) }
                            ") at " (a.ts)
                        }
                    }
                }
            }
        },
        Err(e) => html! {
            section.alarms id="alarms" {
                h2 { "Alarms unavailable" }
                p { (scrub(e)) }
            }
        },
    }
}

fn alarm_kind(kind: &str) -> Cow<'_, str> {
    match kind {
        crate::ops::reconcile::UNAPPROVED_EXECUTION => "Unapproved execution".into(),
        other => other.into(),
    }
}

fn servers(s: &Snapshot) -> Markup {
    if s.servers.is_empty() {
        return html! { p.meta { "None configured." } };
    }
    html! {
        div.scroll {
            table id="servers" {
                // What matters most first: a phone shows the first columns without scrolling.
                thead { tr {
                    th { "Name" } th { "Health" } th { "Outcomes, " (span_label()) } th { "p50" }
                    th { "p99" } th { "Mode" } th { "Request types" } th { "Address" }
                } }
                tbody {
                    @for v in &s.servers {
                        tr data-server=(v.name) {
                            td { strong { (v.name) } }
                            (health_cell(v.health.as_ref(), s.health_interval_ms))
                            (recent_cells(&v.recent))
                            td { (v.mode) }
                            td { (v.types) }
                            td { code { (v.address) } }
                        }
                    }
                }
            }
        }
    }
}

fn health_cell(h: Option<&HealthState>, interval_ms: u64) -> Markup {
    match h {
        Some(h) if h.up => html! {
            td.text data-health="up" { span.up { "up" } " " span.meta { (h.latency_ms) " ms, " (h.checked_at) } }
        },
        Some(h) => html! {
            td.text data-health="down" {
                span.down { "down" } " (" (h.outcome) ") " (scrub(&h.error))
                " " span.meta { (h.checked_at) }
            }
        },
        None if interval_ms == 0 => html! {
            td.text data-health="unknown" { span.unknown { "not checked" } " " span.meta { "(health_check_interval_ms: 0)" } }
        },
        None => html! {
            td.text data-health="unknown" { span.unknown { "not checked yet" } }
        },
    }
}

fn event_servers(s: &Snapshot) -> Markup {
    if s.event_servers.is_empty() {
        return html! { p.meta { "None configured." } };
    }
    html! {
        div.scroll {
            table id="event-servers" {
                thead { tr {
                    th { "Name" } th { "Last delivery" } th { "Backlog" } th { "Oldest undelivered" }
                    th { "Outcomes, " (span_label()) } th { "p50" } th { "p99" }
                    th { "Event types" } th { "Address" }
                } }
                tbody {
                    @for v in &s.event_servers {
                        tr data-server=(v.name) {
                            td { strong { (v.name) } }
                            (last_delivery(v, s.now))
                            @match &v.backlog {
                                Backlog::NoStore => { td { "—" } td { "—" } },
                                Backlog::Unavailable(why) => {
                                    td.text.warn colspan="2" { "unavailable: " (scrub(why)) }
                                },
                                Backlog::Known { count, oldest_ms } => {
                                    td data-backlog=(count) { (count) }
                                    td { @match oldest_ms {
                                        Some(t) => (age(s.now, *t)),
                                        None => "—",
                                    } }
                                },
                            }
                            (recent_cells(&v.recent))
                            td { (v.types) }
                            td { code { (v.address) } }
                        }
                    }
                }
            }
        }
    }
}

fn last_delivery(v: &EventServerView, now: SystemTime) -> Markup {
    match &v.recent.last {
        None => html! { td data-health="unknown" { span.unknown { "none yet" } } },
        Some(l) if l.outcome == crate::ops::metrics::delivery::DELIVERED => html! {
            td data-health="up" { span.up { "delivered" } " " span.meta { (ago(now, l.at)) } }
        },
        Some(l) => html! {
            td.text data-health="down" {
                span.down { (l.outcome) } " " (scrub(&l.error)) " " span.meta { (ago(now, l.at)) }
            }
        },
    }
}

fn decisions(s: &Snapshot) -> Markup {
    if s.decisions.is_empty() {
        return html! { p.meta { "No decision since start-up." } };
    }
    html! {
        div.scroll {
            table id="decisions" {
                thead { tr {
                    th { "Time" } th { "Decision" } th { "request_id" } th { "Type" }
                    th { "Status" } th { "Failing server / reason" }
                } }
                tbody {
                    @for d in &s.decisions {
                        tr {
                            td { (rfc3339(d.at)) }
                            td { span class=(if d.action == "APPROVE" { "approve" } else { "reject" }) { (d.action) } }
                            td.text { code.rid { (d.request_id) } @if d.duplicate { " " span.meta { "(retry)" } } }
                            td { (d.kind) }
                            td { (d.status) " " span.meta { (status_word(d.status)) } }
                            td.text { (scrub(&d.reason)) }
                        }
                    }
                }
            }
        }
    }
}

/// Refusals of callers whose token did not verify: apart, so that junk cannot push the node's
/// decisions off the page.
fn refused(s: &Snapshot) -> Markup {
    let (total, rows) = &s.refused;
    if *total == 0 {
        return html! {};
    }
    html! {
        h2 { "Refused callers" }
        p.meta {
            (total) " request(s) refused since start-up before a token verified (status 20, or 10 "
            "with no request read); the last " (rows.len()) ":"
        }
        div.scroll {
            table id="refused" {
                thead { tr { th { "Time" } th { "Status" } th { "Reason" } } }
                tbody {
                    @for d in rows {
                        tr {
                            td { (rfc3339(d.at)) }
                            td { (d.status) " " span.meta { (status_word(d.status)) } }
                            td.text { (scrub(&d.reason)) }
                        }
                    }
                }
            }
        }
    }
}

fn status_word(status: i64) -> &'static str {
    match status {
        0 => "ok",
        10 => "invalid request",
        20 => "invalid token",
        30 => "internal error",
        _ => "",
    }
}

fn config_and_audit(s: &Snapshot) -> Markup {
    html! {
        dl {
            dt { "Config generation" } dd id="generation" { (s.generation) }
            dt { "Config sha256" } dd { code id="config-sha256" { (s.config_sha256) } }
            dt { "Loaded" } dd { (rfc3339(s.loaded_at)) " (" (ago(s.now, s.loaded_at)) ")" }
            @match &s.audit {
                None => { dt { "Audit log" } dd { "off (no audit_log)" } },
                Some(a) => {
                    dt { "Audit log" } dd { code { (a.path) } }
                    dt { "Audit head seq" }
                    dd id="audit-seq" { @match &a.checkpoint {
                        Some(c) => (c.seq),
                        None => "no checkpoint yet",
                    } }
                    dt { "Last checkpoint" }
                    dd { @match &a.checkpoint {
                        Some(c) => (c.ts),
                        None => "—",
                    } }
                },
            }
        }
    }
}

/// "approved 12 · timeout 1", or "none".
fn outcomes(s: &Summary) -> Markup {
    if s.counts.is_empty() {
        return html! { span.meta { "none" } };
    }
    html! {
        @for (i, (outcome, n)) in s.counts.iter().enumerate() {
            @if i > 0 { " · " }
            span class=(outcome_class(outcome)) { (outcome) } " " (n)
        }
        @if s.capped { " " span.meta { "(newest only)" } }
    }
}

fn outcome_class(outcome: &str) -> &'static str {
    match outcome {
        "approved" | "delivered" => "up",
        "cancelled" | "skipped" => "meta",
        _ => "down",
    }
}

fn span_label() -> String {
    format!("{} min", SPAN.as_secs() / 60)
}

/// The outcome counts, p50 and p99 cells of one server's recent window (both tables).
fn recent_cells(r: &Summary) -> Markup {
    html! {
        td { (outcomes(r)) }
        td { (ms(r.p50)) }
        td { (ms(r.p99)) }
    }
}

fn ms(d: Option<Duration>) -> String {
    match d {
        None => "—".into(),
        Some(d) if d < Duration::from_millis(10) => format!("{:.1} ms", d.as_secs_f64() * 1000.0),
        Some(d) => format!("{} ms", d.as_millis()),
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// How long before `now` the Unix time `ms` was.
fn age(now: SystemTime, ms: i64) -> String {
    let then = SystemTime::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    ago(now, then)
}

fn ago(now: SystemTime, then: SystemTime) -> String {
    let secs = now.duration_since(then).unwrap_or_default().as_secs();
    match secs {
        0..=119 => format!("{secs} s ago"),
        120..=7199 => format!("{} min ago", secs / 60),
        _ => format!("{} h ago", secs / 3600),
    }
}

/// `text` with the credentials of every URL it quotes replaced (`http://***@host/...`): error
/// texts come from libraries that may quote an address.
pub(crate) fn scrub(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        // The URL starts at its scheme, letters just before `://`.
        let start = rest[..at]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |i| i + 1);
        let len = rest[at..]
            .find(|c: char| {
                c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '(' | ')' | ',')
            })
            .unwrap_or(rest.len() - at);
        out.push_str(&rest[..start]);
        out.push_str(&crate::config::redact_address(&rest[start..at + len]));
        rest = &rest[at + len..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// An address as the page shows it: credentials redacted, query and fragment left out.
pub(crate) fn address(url: &reqwest::Url) -> String {
    let shown = crate::config::redact_address(url.as_str());
    match shown.find(['?', '#']) {
        Some(at) => format!("{}?…", &shown[..at]),
        None => shown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_hides_credentials_in_quoted_urls_only() {
        assert_eq!(scrub("plain text"), "plain text");
        assert_eq!(
            scrub("error sending (http://u:secret@h:1/x): refused, see https://h/y"),
            "error sending (http://***@h:1/x): refused, see https://h/y"
        );
        assert!(!scrub("a postgres://user:pw@db/x b").contains("pw"));
    }

    #[test]
    fn addresses_lose_credentials_and_query() {
        let u = reqwest::Url::parse("https://user:secret@risk:8443/v2/check?token=abc").unwrap();
        assert_eq!(address(&u), "https://***@risk:8443/v2/check?…");
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            now: SystemTime::now(),
            service_name: "gw".into(),
            version: "0.0.0",
            unready: None,
            config_error: None,
            generation: 3,
            config_sha256: "ab".repeat(32),
            loaded_at: SystemTime::now(),
            health_interval_ms: 0,
            servers: vec![],
            event_servers: vec![],
            decisions: vec![DecisionRow {
                at: SystemTime::now(),
                request_id: "<script>alert(1)</script>".into(),
                kind: "key_sign",
                status: 0,
                action: "REJECT",
                reason: "risk: <b>no</b>".into(),
                duplicate: false,
            }],
            refused: (0, vec![]),
            audit: None,
            alarms: Ok(vec![]),
        }
    }

    #[test]
    fn dynamic_text_is_escaped_and_the_page_refreshes_itself() {
        let page = render(&snapshot());
        assert!(!page.contains("<script>"));
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("&lt;b&gt;no&lt;/b&gt;"));
        assert!(page.contains(r#"<meta http-equiv="refresh" content="5">"#));
        assert!(page.contains("No alarms in the last 24 h."));
    }
}
