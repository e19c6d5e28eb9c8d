//! The gateway's answer from the embedded rules' verdict and the enforcing servers' verdicts.
//! Pure: values in, a [`Decision`] out. APPROVE is reachable only through one arm below.

use crate::fanout::{Outcome, Verdict};
use crate::protocol::{Action, Status};
use crate::rules::RuleVerdict;

/// Longest error text kept per server (and for the gateway's own errors): in answers, in the
/// audit log and in the duplicate memory. A downstream may send a 64 KiB answer; its `error` is
/// not worth more than this anywhere.
pub const MAX_ERROR_BYTES: usize = 1024;

/// `text` cut to at most [`MAX_ERROR_BYTES`] (on a character boundary, marked with `…`), in an
/// allocation of its own size.
pub fn capped(text: &str) -> String {
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

/// The gateway's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub status: Status,
    pub action: Action,
    pub error: String,
}

// === impl Decision ===

impl Decision {
    /// A rejection; `error` is capped at [`MAX_ERROR_BYTES`].
    pub fn reject(status: Status, error: String) -> Decision {
        let error = if error.len() > MAX_ERROR_BYTES {
            capped(&error)
        } else {
            error
        };
        Decision {
            status,
            action: Action::Reject,
            error,
        }
    }

    pub fn is_approval(&self) -> bool {
        self.status == Status::Ok && self.action == Action::Approve
    }

    /// The `outcome` label of `tss_gateway_requests_total`.
    pub fn outcome(&self) -> &'static str {
        use crate::metrics::outcome::*;
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
pub fn decide(rules: &RuleVerdict, verdicts: &[Verdict]) -> Decision {
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
    use crate::config::Mode;
    use std::time::Duration;

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
}
