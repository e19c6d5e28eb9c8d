//! Admission control: at most `max_in_flight` callback requests are decided at once, and at most
//! `max_concurrent` calls are in flight to one downstream.
//!
//! Guarantees: a request takes its place only once its body is read (a slow caller holds none);
//! a request beyond `max_in_flight` is refused before any RSA work and calls nobody (one that
//! arrives while all places are taken is refused before its body is read, too); nothing waits in an unbounded queue (a call waiting for a
//! downstream slot is bounded by its request's deadline). Both limits are plain counters and
//! semaphores whose permits are owned values: a permit can move into a spawned task and is given
//! back when dropped, however that task ends.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Counts the requests being decided, across config generations (a reload that lowers
/// `max_in_flight` applies to the next request; those in flight finish).
#[derive(Debug, Default)]
pub struct Admission {
    in_flight: Arc<AtomicUsize>,
    /// The latest deadline of the requests admitted, in nanoseconds after [`epoch`]: shutdown
    /// waits for it, whatever the current config's `deadline_ms` says.
    latest_deadline: AtomicU64,
}

/// One admitted request. Dropping it frees its place.
#[derive(Debug)]
pub(crate) struct Permit(Arc<AtomicUsize>);

/// A downstream's call slots (`max_concurrent`), kept across reloads that leave it unchanged.
#[derive(Debug)]
pub(crate) struct Slots {
    pub(crate) limit: usize,
    semaphore: Arc<Semaphore>,
}

// === impl Admission ===

impl Admission {
    /// A place for one more request, or `None` when `limit` are being decided already.
    pub(crate) fn try_admit(&self, limit: usize) -> Option<Permit> {
        let admitted = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok();
        admitted.then(|| Permit(self.in_flight.clone()))
    }

    /// Requests admitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Notes the deadline of a request admitted.
    pub(crate) fn note_deadline(&self, deadline: Instant) {
        let nanos = deadline.saturating_duration_since(epoch()).as_nanos();
        self.latest_deadline
            .fetch_max(nanos.min(u64::MAX as u128) as u64, Ordering::AcqRel);
    }

    /// The latest deadline of any request admitted so far (a past one once they are done).
    pub(crate) fn latest_deadline(&self) -> Instant {
        epoch() + std::time::Duration::from_nanos(self.latest_deadline.load(Ordering::Acquire))
    }
}

/// The instant deadlines are counted from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

// === impl Slots ===

impl Slots {
    /// `None` for `limit` 0 (no limit).
    pub(crate) fn new(limit: usize) -> Option<Arc<Slots>> {
        (limit > 0).then(|| {
            Arc::new(Slots {
                limit,
                semaphore: Arc::new(Semaphore::new(limit)),
            })
        })
    }

    /// Waits for a free slot until `deadline`; `None` if none came free by then.
    pub(crate) async fn acquire(&self, deadline: Instant) -> Option<OwnedSemaphorePermit> {
        let wait = self.semaphore.clone().acquire_owned();
        match tokio::time::timeout_at(deadline, wait).await {
            Ok(Ok(permit)) => Some(permit),
            // The semaphore is never closed; a timeout is the only real way to get here.
            _ => None,
        }
    }
}
