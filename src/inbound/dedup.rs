//! Duplicate-safe retries. A TSS Node retries a request it got no answer to; the retry must not
//! ask every downstream again, and must never get a different decision.
//!
//! Guarantees:
//! - concurrent requests with the same `request_id`, identical payload and the same config
//!   generation share one evaluation; a definitive decision (approved, or rejected with status 0)
//!   is returned to identical retries of that generation until it expires;
//! - nothing of an older generation is reused: after a reload a retry is evaluated afresh (an
//!   emergency stop takes effect at once);
//! - status-30 failures are forgotten at once, so a retry asks again;
//! - the same `request_id` with a different payload is reported as a conflict;
//! - every entry ends: it expires, is forgotten when its evaluation fails, or is removed when
//!   every caller waiting for it has gone (a node that hung up mid-decision);
//! - memory is bounded both in entries (`capacity`) and in bytes (`max_bytes`, counted from each
//!   value's [`Footprint`]); expired entries are dropped as time passes, not only when full. When
//!   full, the remembered decisions that expire first make room for the new request, so the
//!   conflict check holds for every entry still in memory, the newest included. Only a request
//!   that cannot fit even so (every place held by a request still being decided) is evaluated
//!   without being remembered (correct, just not deduplicated).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio::time::Instant;

/// Entries kept at most.
pub(crate) const DEFAULT_CAPACITY: usize = 20_000;
/// Bytes kept at most, keys and values together (see [`Footprint`]).
pub(crate) const DEFAULT_MAX_BYTES: usize = 32 << 20;
/// What one entry costs besides its key and value: the map slot, the entry, its cell and its
/// place in the expiry index.
const ENTRY_OVERHEAD: usize = 256;

/// The heap and inline bytes a remembered value holds.
pub trait Footprint {
    fn footprint(&self) -> usize;
}

/// What the cache says about one request.
pub(crate) enum Lookup<T> {
    /// Evaluated (now, by a concurrent twin, or earlier) — `shared` is true if this caller did
    /// not run the evaluation itself.
    Done { value: T, shared: bool },
    /// The `request_id` was seen with a different payload.
    Conflict,
}

struct Entry<T> {
    digest: [u8; 32],
    generation: u64,
    cell: Arc<OnceCell<T>>,
    /// Set once the value is known and definitive.
    expires: Option<Instant>,
    /// This entry's share of [`Inner::bytes`].
    bytes: usize,
    /// Tells this entry from a later one under the same `request_id` in the expiry index.
    id: u64,
}

struct Inner<T> {
    entries: HashMap<String, Entry<T>>,
    /// Definitive entries by expiry time, so expired ones are dropped oldest first.
    expiry: BTreeMap<(Instant, u64), String>,
    bytes: usize,
    next_id: u64,
}

enum Claim<T> {
    Conflict,
    /// No room, or a newer generation already owns the id: evaluate without remembering.
    Alone,
    Cell(Arc<OnceCell<T>>),
}

/// Remembers evaluations by `request_id`.
pub struct Dedup<T> {
    inner: Mutex<Inner<T>>,
    capacity: usize,
    max_bytes: usize,
}

/// Removes a pending entry when the last caller waiting for it goes away mid-evaluation.
struct Abandon<'a, T> {
    dedup: &'a Dedup<T>,
    request_id: &'a str,
    cell: &'a Arc<OnceCell<T>>,
}

/// SHA-256 of a payload.
pub(crate) fn digest(bytes: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn key_bytes(request_id: &str) -> usize {
    // The key is held twice: in the map and in the expiry index.
    2 * request_id.len() + ENTRY_OVERHEAD
}

// === impl Inner ===

impl<T> Inner<T> {
    fn remove(&mut self, request_id: &str) {
        if let Some(e) = self.entries.remove(request_id) {
            self.bytes -= e.bytes;
            if let Some(t) = e.expires {
                self.expiry.remove(&(t, e.id));
            }
        }
    }

    /// Forgets the remembered decision that expires first; false if none is left (every entry
    /// is still being decided).
    fn evict_oldest(&mut self) -> bool {
        let Some(entry) = self.expiry.first_entry() else {
            return false;
        };
        let request_id = entry.remove();
        self.remove(&request_id);
        true
    }

    /// Drops every entry whose time is up.
    fn evict_expired(&mut self, now: Instant) {
        while let Some(entry) = self.expiry.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let request_id = entry.remove();
            self.remove(&request_id);
        }
    }
}

// === impl Dedup ===

impl<T: Clone + Footprint> Dedup<T> {
    pub(crate) fn new(capacity: usize, max_bytes: usize) -> Self {
        Dedup {
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                expiry: BTreeMap::new(),
                bytes: 0,
                next_id: 0,
            }),
            capacity,
            max_bytes,
        }
    }

    /// Entries held, pending or remembered.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held, as counted against `max_bytes`.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<T>> {
        // A panic while holding the lock cannot leave the map half-updated in a way that matters:
        // at worst an entry is missing, which only costs deduplication.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Evaluates `evaluate` once for all identical concurrent requests of one config
    /// `generation`, or returns the remembered value. `definitive` says whether a value may be
    /// remembered for `ttl`.
    pub(crate) async fn run<F, Fut>(
        &self,
        request_id: &str,
        generation: u64,
        digest: [u8; 32],
        ttl: Duration,
        definitive: impl Fn(&T) -> bool,
        evaluate: F,
    ) -> Lookup<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let cell = match self.claim(request_id, generation, digest) {
            Claim::Conflict => return Lookup::Conflict,
            Claim::Alone => {
                return Lookup::Done {
                    value: evaluate().await,
                    shared: false,
                }
            }
            Claim::Cell(cell) => cell,
        };
        // Either this caller evaluates, or it waits for a twin that is evaluating (or has). If
        // the twin's caller goes away mid-evaluation, a waiting caller evaluates instead; if
        // every caller goes away, `abandon` removes the entry.
        let abandon = Abandon {
            dedup: self,
            request_id,
            cell: &cell,
        };
        let mut ran = false;
        let value = cell
            .get_or_init(|| {
                ran = true;
                evaluate()
            })
            .await
            .clone();
        std::mem::forget(abandon);
        if ran {
            self.settle(request_id, &cell, &value, ttl, &definitive);
        }
        Lookup::Done {
            value,
            shared: !ran,
        }
    }

    /// Finds or makes the cell for `request_id`.
    fn claim(&self, request_id: &str, generation: u64, digest: [u8; 32]) -> Claim<T> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.evict_expired(now);
        if let Some(e) = inner.entries.get(request_id) {
            if e.digest != digest {
                return Claim::Conflict;
            }
            if e.generation == generation {
                return Claim::Cell(e.cell.clone());
            }
            if e.generation > generation {
                // This request arrived before a reload that a twin already runs under.
                return Claim::Alone;
            }
            // An older generation's decision, remembered or in flight, is never reused. Its
            // evaluation may still finish; `settle` then finds another cell and leaves it be.
            inner.remove(request_id);
        }
        let bytes = key_bytes(request_id);
        while inner.entries.len() >= self.capacity || inner.bytes + bytes > self.max_bytes {
            // A new request is where a conflicting twin would come: make room for it.
            if !inner.evict_oldest() {
                return Claim::Alone;
            }
        }
        let cell = Arc::new(OnceCell::new());
        let id = inner.next_id;
        inner.next_id += 1;
        inner.bytes += bytes;
        inner.entries.insert(
            request_id.to_owned(),
            Entry {
                digest,
                generation,
                cell: cell.clone(),
                expires: None,
                bytes,
                id,
            },
        );
        Claim::Cell(cell)
    }

    /// Keeps a definitive value until `ttl` from now, if it fits; forgets anything else.
    fn settle(
        &self,
        request_id: &str,
        cell: &Arc<OnceCell<T>>,
        value: &T,
        ttl: Duration,
        definitive: &impl Fn(&T) -> bool,
    ) {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.evict_expired(now);
        let Some(e) = inner.entries.get(request_id) else {
            return;
        };
        if !Arc::ptr_eq(&e.cell, cell) {
            return;
        }
        let weight = value.footprint();
        if !definitive(value) {
            inner.remove(request_id);
            return;
        }
        // This entry is not in the expiry index yet, so older ones make room, never itself.
        while inner.bytes + weight > self.max_bytes {
            if !inner.evict_oldest() {
                inner.remove(request_id);
                return;
            }
        }
        let expires = now + ttl;
        let Some(e) = inner.entries.get_mut(request_id) else {
            return;
        };
        e.expires = Some(expires);
        e.bytes += weight;
        let id = e.id;
        inner.bytes += weight;
        inner.expiry.insert((expires, id), request_id.to_owned());
    }
}

impl<T> Dedup<T> {
    /// Removes `cell`'s entry if it is still pending and no other caller holds it.
    fn abandon(&self, request_id: &str, cell: &Arc<OnceCell<T>>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = inner.entries.get(request_id) else {
            return;
        };
        // Callers take their clone of the cell under this lock, so the count is exact: the
        // map's and the departing caller's.
        if Arc::ptr_eq(&e.cell, cell) && cell.get().is_none() && Arc::strong_count(cell) <= 2 {
            inner.remove(request_id);
        }
    }
}

// === impl Abandon ===

impl<T> Drop for Abandon<'_, T> {
    fn drop(&mut self) {
        // Only reached when the caller's future is dropped mid-evaluation: on completion the
        // guard is forgotten.
        self.dedup.abandon(self.request_id, self.cell);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    impl Footprint for i64 {
        fn footprint(&self) -> usize {
            // Large enough for the byte bound to bite in tests.
            if *self >= 1000 {
                *self as usize
            } else {
                8
            }
        }
    }

    fn definitive(v: &i64) -> bool {
        *v != 30
    }

    const TTL: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn concurrent_twins_share_one_evaluation_and_failures_are_forgotten() {
        let d = Dedup::<i64>::new(10, 1 << 20);
        let calls = AtomicUsize::new(0);
        let eval = |v: i64| {
            let calls = &calls;
            move || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                v
            }
        };
        let (a, b) = tokio::join!(
            d.run("r1", 1, digest(b"x"), TTL, definitive, eval(0)),
            d.run("r1", 1, digest(b"x"), TTL, definitive, eval(0))
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
        d.run("r1", 1, digest(b"x"), TTL, definitive, eval(0)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // A different payload under the same id is a conflict.
        assert!(matches!(
            d.run("r1", 1, digest(b"y"), TTL, definitive, eval(0)).await,
            Lookup::Conflict
        ));
        // A failure is not remembered.
        d.run("r2", 1, digest(b"x"), TTL, definitive, eval(30))
            .await;
        d.run("r2", 1, digest(b"x"), TTL, definitive, eval(30))
            .await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(d.len(), 1);
    }

    #[tokio::test]
    async fn a_newer_generation_never_reuses_an_older_ones_value() {
        let d = Dedup::<i64>::new(10, 1 << 20);
        d.run("r", 1, digest(b"x"), TTL, definitive, || async { 0 })
            .await;
        let Lookup::Done { value, shared } = d
            .run("r", 2, digest(b"x"), TTL, definitive, || async { 7 })
            .await
        else {
            panic!("conflict")
        };
        assert_eq!((value, shared), (7, false));
        // And generation 2's value is what generation 2 retries get.
        let Lookup::Done { value, shared } = d
            .run("r", 2, digest(b"x"), TTL, definitive, || async { 9 })
            .await
        else {
            panic!("conflict")
        };
        assert_eq!((value, shared), (7, true));
        // A late request of generation 1 is evaluated alone, leaving generation 2's entry be.
        let Lookup::Done { value, .. } = d
            .run("r", 1, digest(b"x"), TTL, definitive, || async { 5 })
            .await
        else {
            panic!("conflict")
        };
        assert_eq!(value, 5);
        assert_eq!(d.len(), 1);
    }

    #[tokio::test]
    async fn an_abandoned_evaluation_leaves_no_entry() {
        let d = Dedup::<i64>::new(10, 1 << 20);
        for i in 0..5 {
            let id = format!("r{i}");
            let run = d.run(&id, 1, digest(b"x"), TTL, definitive, || async {
                std::future::pending::<i64>().await
            });
            // Polled once (entry made, evaluation started), then dropped.
            assert!(tokio::time::timeout(Duration::from_millis(5), run)
                .await
                .is_err());
        }
        assert_eq!((d.len(), d.bytes()), (0, 0));
        // A twin still waiting keeps the entry, and takes the evaluation over.
        let first = d.run("t", 1, digest(b"x"), TTL, definitive, || async {
            std::future::pending::<i64>().await
        });
        let second = d.run("t", 1, digest(b"x"), TTL, definitive, || async { 3 });
        tokio::pin!(second);
        tokio::select! {
            biased;
            _ = first => unreachable!(),
            _ = &mut second => unreachable!("the first caller evaluates"),
            () = std::future::ready(()) => {}
        }
        assert_eq!(d.len(), 1);
        let Lookup::Done { value, shared } = second.await else {
            panic!("conflict")
        };
        assert_eq!((value, shared), (3, false));
    }

    /// Evaluates a definitive request `id` whose evaluation is `value`, remembered for `ttl`.
    async fn remember(d: &Dedup<i64>, id: &str, ttl: Duration, value: i64) {
        d.run(
            id,
            1,
            digest(b"x"),
            ttl,
            definitive,
            || async move { value },
        )
        .await;
    }

    /// With the memory full, a new request takes the place of the decision that expires first,
    /// so a twin with another payload is caught whether it comes while the first is decided or
    /// after; and every entry still in memory is checked.
    #[tokio::test]
    async fn when_full_every_entry_in_memory_is_still_checked_for_conflicts() {
        let d = Dedup::<i64>::new(3, 1 << 20);
        for i in 0..3 {
            remember(&d, &format!("old{i}"), TTL, 0).await;
        }
        // Being decided, with the memory full.
        let mut first = Box::pin(d.run("new", 1, digest(b"x"), TTL, definitive, || async {
            std::future::pending::<i64>().await
        }));
        tokio::select! {
            biased;
            _ = &mut first => unreachable!(),
            () = std::future::ready(()) => {}
        }
        assert!(matches!(
            d.run("new", 1, digest(b"y"), TTL, definitive, || async { 0 })
                .await,
            Lookup::Conflict
        ));
        // Its caller hangs up: the entry goes.
        drop(first);
        assert_eq!(d.len(), 2);
        for i in 0..10 {
            remember(&d, &format!("later{i}"), TTL, 0).await;
            assert!(d.len() <= 3);
        }
        let in_memory: Vec<String> = d.lock().entries.keys().cloned().collect();
        assert_eq!(in_memory.len(), 3);
        for id in in_memory {
            assert!(
                matches!(
                    d.run(&id, 1, digest(b"other"), TTL, definitive, || async { 0 })
                        .await,
                    Lookup::Conflict
                ),
                "{id}"
            );
        }
        // Bytes too: a full memory makes room for the newest value that fits.
        let d = Dedup::<i64>::new(1000, 9_000);
        for i in 0..5 {
            remember(&d, &format!("b{i}"), TTL, 3000).await;
        }
        assert!(matches!(
            d.run("b4", 1, digest(b"y"), TTL, definitive, || async { 0 })
                .await,
            Lookup::Conflict
        ));
    }

    #[tokio::test]
    async fn memory_is_bounded_in_entries_and_bytes_and_expired_entries_go_continuously() {
        let d = Dedup::<i64>::new(3, 1 << 20);
        let ttl = Duration::from_millis(20);
        for i in 0..10 {
            remember(&d, &format!("r{i}"), ttl, 0).await;
            assert!(d.len() <= 3);
        }
        // Expired entries go at the next request even when the cache is far from full.
        let d = Dedup::<i64>::new(1000, 1 << 20);
        for i in 0..10 {
            remember(&d, &format!("r{i}"), ttl, 0).await;
        }
        assert_eq!(d.len(), 10);
        tokio::time::sleep(Duration::from_millis(30)).await;
        remember(&d, "fresh", TTL, 0).await;
        assert_eq!(d.len(), 1);
        assert_eq!(d.bytes(), key_bytes("fresh") + 8);
        // Bytes: values too large to fit are not remembered, and the total never exceeds the
        // bound.
        let max = 9_000;
        let d = Dedup::<i64>::new(1000, max);
        for i in 0..50 {
            remember(&d, &format!("b{i}"), TTL, 3000).await;
            assert!(d.bytes() <= max, "{}", d.bytes());
        }
        assert_eq!(d.len(), 2);
    }
}
