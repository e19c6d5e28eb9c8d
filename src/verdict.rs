//! The data a request's answer is made of, and the pure function that makes it: each server's
//! [`Verdict`], the embedded rules' [`Embedded`] word, and the gateway's [`Decision`] from
//! [`decide`]. Values in, a [`Decision`] out: APPROVE is reachable only through one arm of
//! [`decide`]. No I/O here; the modules that call servers and write logs depend on this one, never
//! the other way round.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::config::Mode;
use crate::protocol::{Action, Status};
use crate::rules::RuleVerdict;

/// Longest error text kept per server (and for the gateway's own errors): in answers, in the
/// audit log and in the duplicate memory. A downstream may send a 64 KiB answer; its `error` is
/// not worth more than this anywhere.
pub(crate) const MAX_ERROR_BYTES: usize = 1024;

/// `text` cut to at most [`MAX_ERROR_BYTES`] (on a character boundary, marked with `…`), in an
/// allocation of its own size.
pub(crate) fn capped(text: &str) -> String {
    if text.len() <= MAX_ERROR_BYTES {
        return text.to_owned();
    }
    let mut end = MAX_ERROR_BYTES - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + '…'.len_utf8());
    out.push_str(&text[..end]);
    out.push('…');
    out
}

/// What became of one call to one server (the `outcome` label of
/// `tss_gateway_downstream_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Outcome {
    Approved,
    Rejected,
    Timeout,
    TransportError,
    HttpError,
    BadSignature,
    BadResponse,
    ErrorStatus,
    Cancelled,
    /// A shadow call not made: its server had as many shadow calls in flight as its cap.
    Skipped,
    /// A shadow call still running when the answer was sent.
    Pending,
}

/// One server's answer to one request.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Verdict {
    #[serde(rename = "name")]
    pub(crate) server: Arc<str>,
    pub(crate) mode: Mode,
    pub(crate) outcome: Outcome,
    #[serde(rename = "duration_ms")]
    #[serde(serialize_with = "ser_ms")]
    pub(crate) duration: Duration,
    /// The server's `error` for a rejection, or what went wrong.
    pub(crate) detail: String,
}

/// What the embedded rules said of a request: the audit record's `embedded` field, written as
/// `not_evaluated` (the token or payload was refused before the rules ran), `off`, `pass` or
/// `reject: <rule>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Embedded {
    NotEvaluated,
    Off,
    Pass,
    Reject(String),
}

/// `text` itself when it is within [`MAX_ERROR_BYTES`] (no copy), else [`capped`].
fn cap(text: String) -> String {
    if text.len() > MAX_ERROR_BYTES {
        capped(&text)
    } else {
        text
    }
}

/// The gateway's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decision {
    pub(crate) status: Status,
    pub(crate) action: Action,
    pub(crate) error: String,
}

/// The evaluation of one request: what the rules and the downstreams said, and the decision.
/// Shared between identical retries by the duplicate memory.
#[derive(Debug)]
pub struct Evaluation {
    pub(crate) decision: Decision,
    pub(crate) embedded: Embedded,
    pub(crate) verdicts: Vec<Verdict>,
    /// The shadow calls whose verdicts `verdicts` shows `pending`: each is handed on once it
    /// arrives and an answer's record is out ([`ShadowSlot::release`]).
    pub(crate) late: Vec<Arc<ShadowSlot>>,
}

/// Where a shadow verdict goes that arrived after the answer's record went out.
pub(crate) type LateSink = Box<dyn FnOnce(Verdict) + Send>;

/// One shadow call's verdict, as the answer sees it. The call fills it in whenever it
/// finishes; the answer takes it if it is there already, and otherwise its record shows the
/// call `pending` and the verdict is handed to a sink later, after that record.
///
/// Guarantees: a verdict goes either into the answer's verdicts or to one sink, exactly once
/// whichever side comes first; never to a sink before an answer's record was handed over
/// ([`ShadowSlot::release`]), so a late verdict always follows the record it completes.
#[derive(Default)]
pub(crate) struct ShadowSlot {
    state: Mutex<SlotState>,
}

#[derive(Default)]
enum SlotState {
    /// The call is running and no answer has looked yet.
    #[default]
    Running,
    /// The verdict arrived before the answer looked: the answer carries it.
    Done(Verdict),
    /// The answer showed the call `pending`; its verdict (once here) waits for the release.
    Missed(Option<Verdict>),
    /// An answer's record is out: the verdict goes to this sink when it arrives.
    Released(LateSink),
    /// Handed on (to the answer or a sink): nothing more to do.
    Finished,
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

// === impl Outcome ===

impl Outcome {
    /// The outcomes counted in `tss_gateway_downstream_requests_total` (not `pending`).
    pub(crate) const RECORDED: [Outcome; 10] = [
        Outcome::Approved,
        Outcome::Rejected,
        Outcome::Timeout,
        Outcome::TransportError,
        Outcome::HttpError,
        Outcome::BadSignature,
        Outcome::BadResponse,
        Outcome::ErrorStatus,
        Outcome::Cancelled,
        Outcome::Skipped,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Approved => "approved",
            Outcome::Rejected => "rejected",
            Outcome::Timeout => "timeout",
            Outcome::TransportError => "transport_error",
            Outcome::HttpError => "http_error",
            Outcome::BadSignature => "bad_signature",
            Outcome::BadResponse => "bad_response",
            Outcome::ErrorStatus => "error_status",
            Outcome::Cancelled => "cancelled",
            Outcome::Skipped => "skipped",
            Outcome::Pending => "pending",
        }
    }

    /// Outcomes that are neither an approval nor a definitive rejection.
    pub(crate) fn is_failure(self) -> bool {
        !matches!(self, Outcome::Approved | Outcome::Rejected)
    }
}

// === impl Verdict ===

impl Verdict {
    /// `detail` is capped at [`MAX_ERROR_BYTES`]: a verbose server's text is kept (in the answer,
    /// the audit log and the duplicate memory) only that far.
    pub(crate) fn new(
        server: Arc<str>,
        mode: Mode,
        outcome: Outcome,
        duration: Duration,
        detail: String,
    ) -> Verdict {
        Verdict {
            server,
            mode,
            outcome,
            duration,
            detail: cap(detail),
        }
    }
}

// === impl ShadowSlot ===

impl ShadowSlot {
    /// The call finished with `v` (the shadow call's task).
    pub(crate) fn finish(&self, v: Verdict) {
        let mut state = lock(&self.state);
        match std::mem::take(&mut *state) {
            SlotState::Running => *state = SlotState::Done(v),
            SlotState::Missed(_) => *state = SlotState::Missed(Some(v)),
            SlotState::Released(sink) => {
                *state = SlotState::Finished;
                drop(state);
                sink(v);
            }
            // A call finishes once; keep what is there.
            other => *state = other,
        }
    }

    /// The verdict for the answer, if it has arrived; otherwise `None`, and the answer's
    /// record shows the call `pending` (the verdict then waits for [`ShadowSlot::release`]).
    pub(crate) fn take(&self) -> Option<Verdict> {
        let mut state = lock(&self.state);
        match std::mem::take(&mut *state) {
            SlotState::Done(v) => {
                *state = SlotState::Finished;
                Some(v)
            }
            SlotState::Running => {
                *state = SlotState::Missed(None);
                None
            }
            other => {
                *state = other;
                None
            }
        }
    }

    /// An answer's record that shows the call `pending` was handed over: the verdict goes to
    /// `sink` now if it is here, else when it arrives. Only the first release counts (twins
    /// and remembered answers release the same slot).
    pub(crate) fn release(&self, sink: LateSink) {
        let mut state = lock(&self.state);
        match std::mem::take(&mut *state) {
            SlotState::Missed(Some(v)) => {
                *state = SlotState::Finished;
                drop(state);
                sink(v);
            }
            SlotState::Missed(None) => *state = SlotState::Released(sink),
            other => *state = other,
        }
    }
}

impl fmt::Debug for ShadowSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &*lock(&self.state) {
            SlotState::Running => "running",
            SlotState::Done(_) => "done",
            SlotState::Missed(_) => "missed",
            SlotState::Released(_) => "released",
            SlotState::Finished => "finished",
        };
        write!(f, "ShadowSlot({state})")
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// === impl Embedded ===

impl From<&RuleVerdict> for Embedded {
    fn from(rules: &RuleVerdict) -> Embedded {
        match rules {
            RuleVerdict::Off => Embedded::Off,
            RuleVerdict::Pass => Embedded::Pass,
            RuleVerdict::Reject(rule) => Embedded::Reject(rule.clone()),
        }
    }
}

impl Embedded {
    /// Heap bytes held, for the duplicate memory's byte bound.
    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            Embedded::Reject(rule) => rule.capacity(),
            _ => 0,
        }
    }
}

impl fmt::Display for Embedded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Embedded::NotEvaluated => f.write_str("not_evaluated"),
            Embedded::Off => f.write_str("off"),
            Embedded::Pass => f.write_str("pass"),
            Embedded::Reject(rule) => write!(f, "reject: {rule}"),
        }
    }
}

/// As the string [`fmt::Display`] writes: the audit log's bytes are those of a plain string.
impl Serialize for Embedded {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

// === impl Decision ===

impl Decision {
    /// A rejection; `error` is capped at [`MAX_ERROR_BYTES`].
    pub(crate) fn reject(status: Status, error: String) -> Decision {
        Decision {
            status,
            action: Action::Reject,
            error: cap(error),
        }
    }

    pub(crate) fn is_approval(&self) -> bool {
        self.status == Status::Ok && self.action == Action::Approve
    }

    /// The `outcome` label of `tss_gateway_requests_total`.
    pub(crate) fn metric_label(&self) -> &'static str {
        use crate::ops::metrics::outcome::*;
        match (self.status, self.action) {
            (Status::Ok, Action::Approve) => APPROVED,
            (Status::Ok, Action::Reject) => REJECTED,
            (Status::InvalidToken, _) => INVALID_TOKEN,
            (Status::InvalidRequest, _) => INVALID_REQUEST,
            (Status::InternalError, _) => FAILED,
        }
    }
}

/// Decides a request that passed token and payload checks. `verdicts` are the enforcing servers'
/// (empty when none subscribes to the type, or when the rules rejected and none was called).
pub(crate) fn decide(rules: &RuleVerdict, verdicts: &[Verdict]) -> Decision {
    if let RuleVerdict::Reject(rule) = rules {
        return Decision::reject(Status::Ok, format!("embedded risk control: {rule}"));
    }
    if verdicts.is_empty() {
        return match rules {
            RuleVerdict::Pass => approve(),
            // Nothing checked this request: that is never an approval.
            _ => Decision::reject(
                Status::Ok,
                "no check configured for this request type: embedded rules are off and no enforcing server subscribes to it".into(),
            ),
        };
    }
    if let Some(v) = verdicts.iter().find(|v| v.outcome == Outcome::Rejected) {
        return Decision::reject(Status::Ok, format!("{}: {}", v.server, v.detail));
    }
    if verdicts.iter().all(|v| v.outcome == Outcome::Approved) {
        return approve();
    }
    // Each failing server gets its own capped share of the error.
    let failures: Vec<String> = verdicts
        .iter()
        .filter(|v| v.outcome.is_failure())
        .map(|v| capped(&format!("{}: {}", v.server, v.detail)))
        .collect();
    Decision {
        status: Status::InternalError,
        action: Action::Reject,
        error: failures.join("; "),
    }
}

fn approve() -> Decision {
    Decision {
        status: Status::Ok,
        action: Action::Approve,
        error: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that keeps what it is given.
    fn sink(into: &Arc<Mutex<Vec<Outcome>>>) -> LateSink {
        let into = into.clone();
        Box::new(move |v: Verdict| into.lock().unwrap().push(v.outcome))
    }

    #[test]
    fn a_shadow_verdict_goes_to_the_answer_or_to_one_sink_after_the_release() {
        // Arrived before the answer looked: the answer carries it, no sink gets it.
        let got = Arc::new(Mutex::new(Vec::new()));
        let s = ShadowSlot::default();
        s.finish(v("s", Outcome::Rejected, "no"));
        assert_eq!(s.take().map(|v| v.outcome), Some(Outcome::Rejected));
        s.release(sink(&got));
        assert!(got.lock().unwrap().is_empty());

        // Arrived between the answer's look and its record: handed on at the release only.
        let s = ShadowSlot::default();
        assert!(s.take().is_none());
        s.finish(v("s", Outcome::Approved, ""));
        assert!(got.lock().unwrap().is_empty());
        s.release(sink(&got));
        s.release(sink(&got));
        assert_eq!(*got.lock().unwrap(), vec![Outcome::Approved]);

        // Arrived after the release (twice released, by twins): one sink gets it, once.
        got.lock().unwrap().clear();
        let s = ShadowSlot::default();
        assert!(s.take().is_none());
        s.release(sink(&got));
        s.release(sink(&got));
        assert!(got.lock().unwrap().is_empty());
        s.finish(v("s", Outcome::Timeout, "late"));
        assert_eq!(*got.lock().unwrap(), vec![Outcome::Timeout]);
    }

    fn v(server: &str, outcome: Outcome, detail: &str) -> Verdict {
        Verdict {
            server: server.into(),
            mode: Mode::Enforce,
            outcome,
            duration: Duration::from_millis(5),
            detail: detail.into(),
        }
    }

    #[test]
    fn table() {
        use Outcome::*;
        let pass = RuleVerdict::Pass;
        let off = RuleVerdict::Off;
        let approve = |e: &str| (Status::Ok, Action::Approve, e.to_owned());
        let reject = |s, e: &str| (s, Action::Reject, e.to_owned());
        let cases = vec![
            (RuleVerdict::Reject("key_gen not in allow_list".into()), vec![v("a", Approved, "")],
             reject(Status::Ok, "embedded risk control: key_gen not in allow_list")),
            (pass.clone(), vec![], approve("")),
            (off.clone(), vec![], reject(Status::Ok, "no check configured for this request type: embedded rules are off and no enforcing server subscribes to it")),
            (off.clone(), vec![v("a", Approved, ""), v("b", Approved, "")], approve("")),
            (pass.clone(), vec![v("a", Approved, ""), v("b", Rejected, "limit exceeded"), v("c", Cancelled, "cancelled")],
             reject(Status::Ok, "b: limit exceeded")),
            (pass.clone(), vec![v("a", Timeout, "timeout: no answer within 5 ms"), v("b", Rejected, "no")],
             reject(Status::Ok, "b: no")),
            (pass.clone(), vec![v("a", Approved, ""), v("b", Timeout, "timeout: no answer within 5 ms")],
             reject(Status::InternalError, "b: timeout: no answer within 5 ms")),
            (off.clone(), vec![v("a", BadSignature, "bad_signature: x"), v("b", ErrorStatus, "error_status: status 30"), v("c", Approved, "")],
             reject(Status::InternalError, "a: bad_signature: x; b: error_status: status 30")),
        ];
        for (rules, verdicts, (status, action, error)) in cases {
            let d = decide(&rules, &verdicts);
            assert_eq!(
                (d.status, d.action, d.error.as_str()),
                (status, action, error.as_str()),
                "{rules:?} {verdicts:?}"
            );
        }
    }

    #[test]
    fn error_texts_are_capped_per_server() {
        use Outcome::*;
        let long = "é".repeat(40_000);
        let d = decide(&RuleVerdict::Pass, &[v("a", Rejected, &long)]);
        assert!(d.error.len() <= MAX_ERROR_BYTES, "{}", d.error.len());
        assert!(d.error.starts_with("a: éé") && d.error.ends_with('…'));
        let d = decide(
            &RuleVerdict::Off,
            &[v("a", Timeout, &long), v("b", BadResponse, &long)],
        );
        assert_eq!(d.status, Status::InternalError);
        let parts: Vec<&str> = d.error.split("; ").collect();
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.len() <= MAX_ERROR_BYTES));
        assert!(parts[1].starts_with("b: "));
        assert_eq!(capped("short"), "short");
        assert!(Decision::reject(Status::InvalidToken, long).error.len() <= MAX_ERROR_BYTES);
    }

    /// Fail closed: over every combination of outcomes for three servers, APPROVE appears only
    /// when every one of them approved and the rules did not reject.
    #[test]
    fn approve_only_when_all_approve() {
        let mut all = Outcome::RECORDED.to_vec();
        all.push(Outcome::Pending);
        for rules in [
            RuleVerdict::Off,
            RuleVerdict::Pass,
            RuleVerdict::Reject("r".into()),
        ] {
            for &a in &all {
                for &b in &all {
                    for &c in &all {
                        let vs = [v("a", a, ""), v("b", b, ""), v("c", c, "")];
                        let d = decide(&rules, &vs);
                        let expect = !matches!(rules, RuleVerdict::Reject(_))
                            && [a, b, c].iter().all(|&o| o == Outcome::Approved);
                        assert_eq!(d.is_approval(), expect, "{rules:?} {a:?} {b:?} {c:?}");
                    }
                }
            }
        }
    }

    /// The audit log's `embedded` strings, byte for byte as before the type existed.
    #[test]
    fn embedded_serializes_as_the_audit_strings() {
        for (e, json) in [
            (Embedded::NotEvaluated, r#""not_evaluated""#),
            (Embedded::Off, r#""off""#),
            (Embedded::Pass, r#""pass""#),
            (
                Embedded::from(&RuleVerdict::Reject(
                    "key_gen \"x\" not in allow_list".into(),
                )),
                r#""reject: key_gen \"x\" not in allow_list""#,
            ),
        ] {
            assert_eq!(serde_json::to_string(&e).unwrap(), json);
        }
    }
}
