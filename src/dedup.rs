//! Duplicate-safe retries. A TSS Node retries a request it got no answer to; the retry must not
//! ask every downstream again, and must never get a different decision.
//!
//! Guarantees: concurrent requests with the same `request_id` and identical payload share one
//! evaluation; a definitive decision (approved, or rejected with status 0) is returned to
//! identical retries until it expires; status-30 failures are forgotten at once so a retry asks
//! again; the same `request_id` with a different payload is reported as a conflict. Memory is
//! bounded by `capacity` entries; when full of live entries, new requests are evaluated without
//! being remembered (correct, just not deduplicated).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio::time::Instant;

/// Entries kept at most; a full evaluation result is small (a few hundred bytes).
pub const DEFAULT_CAPACITY: usize = 20_000;

/// What the cache says about one request.
pub enum Lookup<T> {
    /// Evaluated (now, by a concurrent twin, or earlier) — `shared` is true if this caller did
    /// not run the evaluation itself.
    Done { value: T, shared: bool },
    /// The `request_id` was seen with a different payload.
    Conflict,
}

struct Entry<T> {
    digest: [u8; 32],
    cell: Arc<OnceCell<T>>,
    /// Set once the value is known and definitive.
    expires: Option<Instant>,
}

enum Claim<T> {
    Conflict,
    /// Full of live entries: evaluate without remembering.
    Full,
    Cell(Arc<OnceCell<T>>),
}

/// Remembers evaluations by `request_id`.
pub struct Dedup<T> {
    entries: Mutex<HashMap<String, Entry<T>>>,
    capacity: usize,
}

/// SHA-256 of a payload.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

// === impl Dedup ===

impl<T: Clone> Dedup<T> {
    pub fn new(capacity: usize) -> Self {
        Dedup {
            entries: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry<T>>> {
        // A panic while holding the lock cannot leave a map half-updated in a way that matters:
        // at worst an entry is missing, which only costs deduplication.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Evaluates `evaluate` once for all identical concurrent requests, or returns the
    /// remembered value. `definitive` says whether a value may be remembered for `ttl`.
    pub async fn run<F, Fut>(
        &self,
        request_id: &str,
        digest: [u8; 32],
        ttl: Duration,
        definitive: impl Fn(&T) -> bool,
        evaluate: F,
    ) -> Lookup<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let cell = match self.claim(request_id, digest) {
            Claim::Conflict => return Lookup::Conflict,
            Claim::Full => {
                return Lookup::Done {
                    value: evaluate().await,
                    shared: false,
                }
            }
            Claim::Cell(cell) => cell,
        };
        // Either this caller evaluates, or it waits for a twin that is evaluating (or has). If
        // the twin's caller goes away mid-evaluation, a waiting caller evaluates instead.
        let mut ran = false;
        let value = cell
            .get_or_init(|| {
                ran = true;
                evaluate()
            })
            .await
            .clone();
        if ran {
            self.settle(request_id, &cell, &value, ttl, &definitive);
        }
        Lookup::Done {
            value,
            shared: !ran,
        }
    }

    /// Finds or makes the cell for `request_id`.
    fn claim(&self, request_id: &str, digest: [u8; 32]) -> Claim<T> {
        let now = Instant::now();
        let mut entries = self.lock();
        if let Some(e) = entries.get(request_id) {
            if e.expires.is_some_and(|t| t <= now) {
                entries.remove(request_id);
            } else if e.digest != digest {
                return Claim::Conflict;
            } else {
                return Claim::Cell(e.cell.clone());
            }
        }
        if entries.len() >= self.capacity {
            entries.retain(|_, e| e.expires.is_none_or(|t| t > now));
        }
        if entries.len() >= self.capacity {
            return Claim::Full;
        }
        let cell = Arc::new(OnceCell::new());
        entries.insert(
            request_id.to_owned(),
            Entry {
                digest,
                cell: cell.clone(),
                expires: None,
            },
        );
        Claim::Cell(cell)
    }

    /// Keeps a definitive value until `ttl` from now; forgets anything else.
    fn settle(
        &self,
        request_id: &str,
        cell: &Arc<OnceCell<T>>,
        value: &T,
        ttl: Duration,
        definitive: &impl Fn(&T) -> bool,
    ) {
        let mut entries = self.lock();
        let Some(e) = entries.get_mut(request_id) else {
            return;
        };
        if !Arc::ptr_eq(&e.cell, cell) {
            return;
        }
        if definitive(value) {
            e.expires = Some(Instant::now() + ttl);
        } else {
            entries.remove(request_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn definitive(v: &i64) -> bool {
        *v != 30
    }

    #[tokio::test]
    async fn concurrent_twins_share_one_evaluation_and_failures_are_forgotten() {
        let d = Dedup::<i64>::new(10);
        let calls = AtomicUsize::new(0);
        let eval = |v: i64| {
            let calls = &calls;
            move || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                v
            }
        };
        let ttl = Duration::from_secs(60);
        let (a, b) = tokio::join!(
            d.run("r1", digest(b"x"), ttl, definitive, eval(0)),
            d.run("r1", digest(b"x"), ttl, definitive, eval(0))
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let shared: Vec<bool> = [a, b]
            .into_iter()
            .map(|l| match l {
                Lookup::Done { value: 0, shared } => shared,
                _ => panic!("unexpected"),
            })
            .collect();
        assert_eq!(shared.iter().filter(|s| **s).count(), 1);
        // Remembered: a later identical retry is not evaluated again.
        d.run("r1", digest(b"x"), ttl, definitive, eval(0)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // A different payload under the same id is a conflict.
        assert!(matches!(
            d.run("r1", digest(b"y"), ttl, definitive, eval(0)).await,
            Lookup::Conflict
        ));
        // A failure is not remembered.
        d.run("r2", digest(b"x"), ttl, definitive, eval(30)).await;
        d.run("r2", digest(b"x"), ttl, definitive, eval(30)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(d.len(), 1);
    }

    #[tokio::test]
    async fn memory_is_bounded_and_expired_entries_are_dropped() {
        let d = Dedup::<i64>::new(3);
        let ttl = Duration::from_millis(20);
        for i in 0..10 {
            d.run(&format!("r{i}"), digest(b"x"), ttl, definitive, || async {
                0
            })
            .await;
            assert!(d.len() <= 3);
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        let calls = AtomicUsize::new(0);
        // Expired: evaluated again.
        d.run("r9", digest(b"x"), ttl, definitive, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            0
        })
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
