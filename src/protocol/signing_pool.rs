//! The signing pool: the request path's RSA private-key operations run here, on one dedicated
//! thread per core, never on the async worker threads.
//!
//! Guarantees: at most one signature per core is computed at once; a job whose caller has gone
//! away is skipped; a job that panics fails its caller closed (the caller sees `None`) and the
//! thread lives on.
//!
//! A signature costs about a millisecond of CPU. Run inline, a burst of admitted requests would
//! hold the async worker threads, and accepting connections and shedding load would queue behind
//! it. Long-lived threads (rather than tokio's blocking pool) also keep their per-thread state:
//! aws-lc seeds a random generator per thread for RSA blinding, which costs tens of microseconds
//! on each new thread, and a hand-off to a waiting thread is cheaper than tokio's
//! `spawn_blocking` (measured in README "Benchmark", *The signing threads*). The threads run at the process's own priority: a lower one
//! (nice +10) was measured and made no difference to shedding under a flood, and on a host
//! without autogroups it would let any other process delay approvals.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};

use crate::ops::traces::TARGET as TRACES;

type Job = Box<dyn FnOnce() + Send>;

/// The queue of jobs; the threads are started with it and live as long as the process.
fn queue() -> &'static Mutex<Sender<Job>> {
    static QUEUE: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        for i in 0..cores {
            let rx = rx.clone();
            let started = std::thread::Builder::new()
                .name(format!("signing-{i}"))
                .spawn(move || run_jobs(&rx));
            if let Err(e) = started {
                // Fewer threads only means fewer signatures at once; with none at all every
                // caller gets `None` (its job is never run) and fails closed.
                tracing::error!(error = %e, "cannot start a signing thread");
            }
        }
        Mutex::new(tx)
    })
}

/// Starts the threads now rather than at the first signature, and lets each seed its random
/// generator (RSA blinding) before any request waits for it: the first use of aws-lc's random
/// generator in a process gathers CPU-jitter entropy for about 100 ms of CPU.
pub(crate) fn start() {
    let _ = queue();
}

fn run_jobs(rx: &Mutex<Receiver<Job>>) {
    let _ = aws_lc_rs::rand::fill(&mut [0u8; 16]);
    loop {
        // Only the waiting for a job holds the lock, never the job itself.
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(poisoned) => poisoned.into_inner().recv(),
        };
        let Ok(job) = job else { return };
        // A panicking job drops its answer channel, so its caller gets `None`; the thread goes on.
        let _ = catch_unwind(AssertUnwindSafe(job));
    }
}

/// Runs `work` (an RSA private-key operation) on the signing pool and waits for its result
/// asynchronously. `None` only if the job panicked or the pool has no thread; callers then fail
/// closed. If the returned future is dropped before the job starts, the job is skipped.
pub(crate) async fn run<T, F>(work: F) -> Option<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    // In a trace: the wait for a thread and the signature, each a span of the caller's.
    let parent = tracing::Span::current();
    let wait = if parent.is_none() {
        tracing::Span::none()
    } else {
        tracing::info_span!(target: TRACES, "signing_wait")
    };
    let job: Job = Box::new(move || {
        drop(wait);
        if !tx.is_closed() {
            let _sign = (!parent.is_none())
                .then(|| tracing::info_span!(target: TRACES, parent: &parent, "sign").entered());
            let _ = tx.send(work());
        }
    });
    let sent = match queue().lock() {
        Ok(q) => q.send(job).is_ok(),
        Err(poisoned) => poisoned.into_inner().send(job).is_ok(),
    };
    if !sent {
        return None;
    }
    rx.await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request path's RSA work leaves the async worker thread that asks for it: on a
    /// single-threaded runtime, inline signing would run on the caller's own thread.
    #[tokio::test(flavor = "current_thread")]
    async fn work_runs_off_the_calling_thread() {
        let caller = std::thread::current().id();
        let worker = run(|| std::thread::current().id()).await;
        assert_ne!(worker, Some(caller));
        assert!(worker.is_some());
    }

    /// At most one job per core runs at once, however many requests ask; every job completes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_most_one_job_per_core_and_every_job_completes() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let jobs: Vec<_> = (0..cores * 4 + 4)
            .map(|i| {
                let (now, peak) = (now.clone(), peak.clone());
                tokio::spawn(run(move || {
                    peak.fetch_max(now.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    now.fetch_sub(1, Ordering::SeqCst);
                    i
                }))
            })
            .collect();
        for (i, job) in jobs.into_iter().enumerate() {
            assert_eq!(job.await.unwrap(), Some(i));
        }
        let peak = peak.load(Ordering::SeqCst);
        assert!(peak >= 1 && peak <= cores, "peak {peak} with {cores} cores");
    }

    /// A job that panics fails its caller closed, and the pool still runs the next jobs.
    #[tokio::test(flavor = "current_thread")]
    async fn a_panicking_job_fails_closed_and_the_pool_lives_on() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        for _ in 0..cores + 1 {
            let r: Option<u8> = run(|| panic!("boom")).await;
            assert_eq!(r, None);
        }
        assert_eq!(run(|| 7).await, Some(7));
    }

    /// A job whose caller gave up before a thread took it is never run: a request that hung up
    /// costs no signature.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_whose_caller_is_gone_is_skipped() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::Duration;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Hold every thread until the abandoned job is queued behind them.
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        let busy: Vec<_> = (0..cores)
            .map(|_| {
                let rx = release_rx.clone();
                tokio::spawn(run(move || {
                    let _ = rx.lock().unwrap().recv_timeout(Duration::from_secs(10));
                }))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        let gave_up = tokio::time::timeout(
            Duration::from_millis(20),
            run(move || flag.store(true, Ordering::SeqCst)),
        )
        .await;
        assert!(gave_up.is_err(), "the pool was not busy");
        for _ in 0..cores {
            release_tx.send(()).unwrap();
        }
        for b in busy {
            b.await.unwrap();
        }
        // Every thread is free again; a later job runs, and the abandoned one did not.
        assert_eq!(run(|| 1).await, Some(1));
        assert_eq!(run(|| 2).await, Some(2));
        assert!(!ran.load(Ordering::SeqCst));
    }
}
