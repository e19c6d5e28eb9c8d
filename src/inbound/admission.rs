//! Admission control: at most `max_in_flight` callback requests are decided at once, and at most
//! `max_concurrent` calls are in flight to one downstream.
//!
//! Guarantees: a request beyond `max_in_flight` is refused before its body is read, so shedding
//! costs no RSA work and calls nobody; nothing waits in an unbounded queue (a call waiting for a
//! downstream slot is bounded by its request's deadline). Both limits are plain counters and
//! semaphores whose permits are owned values: a permit can move into a spawned task and is given
//! back when dropped, however that task ends.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Counts the requests being decided, across config generations (a reload that lowers
/// `max_in_flight` applies to the next request; those in flight finish).
#[derive(Debug, Default)]
pub struct Admission {
    in_flight: Arc<AtomicUsize>,
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
