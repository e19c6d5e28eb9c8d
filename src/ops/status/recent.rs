//! What happened lately, kept in memory for the status page: per server, a bounded window of
//! calls (or event deliveries) with their outcome and duration; the last decisions; the last
//! audit checkpoint.
//!
//! Guarantees: every structure here is bounded ([`WINDOW_CAP`] samples per server,
//! [`DECISIONS`] decisions), and feeding it costs one short mutex lock and no I/O; summing up
//! (counts, quantiles) happens when the page is rendered, on a copy taken under the lock.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

/// How far back the page's outcome counts and latencies look.
pub(crate) const SPAN: Duration = Duration::from_secs(300);

/// Samples one server's window keeps at most: under heavier load than this in [`SPAN`], the
/// window covers less than [`SPAN`], and the page says so.
pub(crate) const WINDOW_CAP: usize = 4096;

/// Decisions the page lists.
pub(crate) const DECISIONS: usize = 50;

/// Refusals of callers whose token did not verify that the page lists, apart from the
/// decisions: anyone who can reach the listener can send junk, and must not push the node's
/// decisions off the page.
pub(crate) const REFUSALS: usize = 10;

/// Characters of a request id or a reason a decision row keeps.
const ROW_TEXT: usize = 300;

/// One call or delivery: when it ended, its outcome and, unless it took no time of its own
/// (cancelled, skipped, dropped), how long it took.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    outcome: &'static str,
    took: Option<Duration>,
}

/// The last attempt of an event delivery, the event server's health on the page.
#[derive(Debug, Clone)]
pub(crate) struct Last {
    pub(crate) at: SystemTime,
    pub(crate) outcome: &'static str,
    pub(crate) error: String,
}

#[derive(Debug, Default)]
struct Window {
    samples: VecDeque<Sample>,
    last: Option<Last>,
}

/// One server's window summed up.
#[derive(Debug, Clone, Default)]
pub(crate) struct Summary {
    /// Per outcome, in the order first seen, over the window.
    pub(crate) counts: Vec<(&'static str, usize)>,
    pub(crate) p50: Option<Duration>,
    pub(crate) p99: Option<Duration>,
    /// The window reached [`WINDOW_CAP`]: it covers less than [`SPAN`].
    pub(crate) capped: bool,
    pub(crate) last: Option<Last>,
}

/// The last audit checkpoint written: the chain's head as far as anyone outside the audit
/// folder can tell.
#[derive(Debug, Clone)]
pub(crate) struct Checkpoint {
    pub(crate) seq: u64,
    /// RFC 3339, as in the checkpoint record.
    pub(crate) ts: String,
}

/// Calls to downstreams and deliveries to event servers lately, and the last checkpoint. One
/// per process, fed through [`crate::ops::metrics::Metrics`] (where they are counted).
#[derive(Debug, Default)]
pub(crate) struct Recent {
    calls: Mutex<HashMap<Arc<str>, Window>>,
    deliveries: Mutex<HashMap<Arc<str>, Window>>,
    checkpoint: Mutex<Option<Checkpoint>>,
}

/// One decision as the page lists it.
#[derive(Debug, Clone)]
pub(crate) struct DecisionRow {
    pub(crate) at: SystemTime,
    pub(crate) request_id: String,
    pub(crate) kind: &'static str,
    pub(crate) status: i64,
    pub(crate) action: &'static str,
    /// The decision's error: the failing servers and why, or the rule.
    pub(crate) reason: String,
    pub(crate) duplicate: bool,
}

/// The last [`DECISIONS`] decisions on requests whose token verified, newest last; apart from
/// them the last [`REFUSALS`] refusals of unverified callers (status 20, or status 10 with no
/// request read) and how many there were.
#[derive(Debug, Default)]
pub(crate) struct Decisions {
    ring: Mutex<VecDeque<DecisionRow>>,
    refused: Mutex<VecDeque<DecisionRow>>,
    refused_total: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The first [`ROW_TEXT`] characters of `text`, marked with `…` when cut.
fn cut(text: &str) -> String {
    match text.char_indices().nth(ROW_TEXT) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

// === impl Window ===

impl Window {
    fn push(&mut self, s: Sample) {
        while self.samples.len() >= WINDOW_CAP
            || self
                .samples
                .front()
                .is_some_and(|f| s.at.saturating_duration_since(f.at) > SPAN)
        {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
    }
}

// === impl Recent ===

impl Recent {
    /// Notes one finished call to the downstream `server`.
    pub(crate) fn call(&self, server: &Arc<str>, outcome: &'static str, took: Option<Duration>) {
        let s = Sample {
            at: Instant::now(),
            outcome,
            took,
        };
        push(&self.calls, server, s, None);
    }

    /// Notes one delivery attempt to the event server `server` (`error`: why it failed).
    pub(crate) fn delivery(
        &self,
        server: &Arc<str>,
        outcome: &'static str,
        took: Option<Duration>,
        error: &str,
    ) {
        let s = Sample {
            at: Instant::now(),
            outcome,
            took,
        };
        let last = Last {
            at: SystemTime::now(),
            outcome,
            error: cut(error),
        };
        push(&self.deliveries, server, s, Some(last));
    }

    pub(crate) fn checkpoint(&self, seq: u64, ts: &str) {
        *lock(&self.checkpoint) = Some(Checkpoint {
            seq,
            ts: ts.to_owned(),
        });
    }

    pub(crate) fn last_checkpoint(&self) -> Option<Checkpoint> {
        lock(&self.checkpoint).clone()
    }

    /// The calls to `server` over the last [`SPAN`].
    pub(crate) fn calls_of(&self, server: &str) -> Summary {
        summarize(&self.calls, server)
    }

    /// The deliveries to `server` over the last [`SPAN`].
    pub(crate) fn deliveries_of(&self, server: &str) -> Summary {
        summarize(&self.deliveries, server)
    }

    /// Forgets the servers a reload removed (`keep` says which stay).
    pub(crate) fn retain(
        &self,
        keep_call: impl Fn(&str) -> bool,
        keep_event: impl Fn(&str) -> bool,
    ) {
        lock(&self.calls).retain(|name, _| keep_call(name));
        lock(&self.deliveries).retain(|name, _| keep_event(name));
    }
}

fn push(map: &Mutex<HashMap<Arc<str>, Window>>, server: &Arc<str>, s: Sample, last: Option<Last>) {
    let mut map = lock(map);
    // Cloning the name is a reference count, not an allocation.
    let w = map.entry(server.clone()).or_default();
    w.push(s);
    if last.is_some() {
        w.last = last;
    }
}

fn summarize(map: &Mutex<HashMap<Arc<str>, Window>>, server: &str) -> Summary {
    let since = Instant::now().checked_sub(SPAN);
    let (samples, capped, last) = {
        let map = lock(map);
        let Some(w) = map.get(server) else {
            return Summary::default();
        };
        let samples: Vec<Sample> = w
            .samples
            .iter()
            .filter(|s| since.is_none_or(|t| s.at >= t))
            .copied()
            .collect();
        (samples, w.samples.len() >= WINDOW_CAP, w.last.clone())
    };
    let mut counts: Vec<(&'static str, usize)> = Vec::new();
    for s in &samples {
        match counts.iter_mut().find(|(o, _)| *o == s.outcome) {
            Some((_, n)) => *n += 1,
            None => counts.push((s.outcome, 1)),
        }
    }
    let mut took: Vec<Duration> = samples.iter().filter_map(|s| s.took).collect();
    took.sort_unstable();
    Summary {
        counts,
        p50: quantile(&took, 0.50),
        p99: quantile(&took, 0.99),
        capped,
        last,
    }
}

/// The nearest-rank `q` quantile of `sorted` (`None` when empty).
fn quantile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

// === impl Decisions ===

impl Decisions {
    /// Adds one decision, forgetting the oldest beyond [`DECISIONS`].
    pub(crate) fn push(
        &self,
        request_id: &str,
        kind: &'static str,
        status: i64,
        action: &'static str,
        reason: &str,
        duplicate: bool,
    ) {
        // Built before the lock: the lock is held for two pointer moves.
        let row = DecisionRow {
            at: SystemTime::now(),
            request_id: cut(request_id),
            kind,
            status,
            action,
            reason: cut(reason),
            duplicate,
        };
        // Nothing verified about the caller: a token that did not verify (20), or a request
        // refused before its token was read (10 without a request id).
        let unverified = status == 20 || (status == 10 && request_id.is_empty());
        let (ring, cap) = if unverified {
            self.refused_total
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (&self.refused, REFUSALS)
        } else {
            (&self.ring, DECISIONS)
        };
        let mut ring = lock(ring);
        if ring.len() >= cap {
            ring.pop_front();
        }
        ring.push_back(row);
    }

    /// The decisions kept, newest first.
    pub(crate) fn latest(&self) -> Vec<DecisionRow> {
        lock(&self.ring).iter().rev().cloned().collect()
    }

    /// How many unverified callers were refused since start-up, and the last of them, newest
    /// first.
    pub(crate) fn refused(&self) -> (u64, Vec<DecisionRow>) {
        let rows = lock(&self.refused).iter().rev().cloned().collect();
        (
            self.refused_total
                .load(std::sync::atomic::Ordering::Relaxed),
            rows,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let d: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(quantile(&d, 0.5), Some(ms(50)));
        assert_eq!(quantile(&d, 0.99), Some(ms(99)));
        assert_eq!(quantile(&[ms(7)], 0.99), Some(ms(7)));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn a_window_counts_outcomes_and_stays_bounded() {
        let r = Recent::default();
        let a: Arc<str> = "a".into();
        for i in 0..WINDOW_CAP + 10 {
            let outcome = if i % 2 == 0 { "approved" } else { "timeout" };
            r.call(&a, outcome, Some(ms(10)));
        }
        r.call(&a, "cancelled", None);
        let s = r.calls_of("a");
        let total: usize = s.counts.iter().map(|(_, n)| n).sum();
        assert_eq!(total, WINDOW_CAP);
        assert!(s.capped);
        assert_eq!(s.counts[0].0, "timeout");
        assert_eq!(s.p50, Some(ms(10)));
        assert_eq!(r.calls_of("b").counts.len(), 0);
        r.retain(|n| n != "a", |_| true);
        assert!(r.calls_of("a").counts.is_empty());
    }

    #[test]
    fn decisions_keep_the_last_fifty_newest_first_with_texts_cut() {
        let d = Decisions::default();
        for i in 0..DECISIONS + 5 {
            d.push(&format!("req-{i}"), "key_sign", 0, "APPROVE", "", false);
        }
        d.push(&"x".repeat(1000), "key_sign", 0, "REJECT", "r", false);
        let rows = d.latest();
        assert_eq!(rows.len(), DECISIONS);
        assert_eq!(rows[0].request_id.chars().count(), ROW_TEXT + 1);
        assert_eq!(rows[1].request_id, format!("req-{}", DECISIONS + 4));
    }

    #[test]
    fn refusals_of_unverified_callers_never_push_decisions_out() {
        let d = Decisions::default();
        d.push("req-1", "key_sign", 0, "APPROVE", "", false);
        d.push("req-2", "key_sign", 10, "REJECT", "bad payload", false);
        for _ in 0..1000 {
            d.push("", "unknown", 20, "REJECT", "token", false);
            d.push("", "unknown", 10, "REJECT", "body too large", false);
        }
        let rows = d.latest();
        assert_eq!(
            rows.iter()
                .map(|r| r.request_id.as_str())
                .collect::<Vec<_>>(),
            ["req-2", "req-1"]
        );
        let (total, refused) = d.refused();
        assert_eq!(total, 2000);
        assert_eq!(refused.len(), REFUSALS);
    }

    #[test]
    fn a_delivery_keeps_its_last_attempt() {
        let r = Recent::default();
        let e: Arc<str> = "siem".into();
        r.delivery(&e, "transport_error", Some(ms(3)), "connection refused");
        r.delivery(&e, "delivered", Some(ms(5)), "");
        let s = r.deliveries_of("siem");
        assert_eq!(s.last.unwrap().outcome, "delivered");
        assert_eq!(s.counts, vec![("transport_error", 1), ("delivered", 1)]);
    }
}
