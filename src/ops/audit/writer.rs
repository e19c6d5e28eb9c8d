//! The audit-writer thread and its handle: the only place the audit file is written.
//!
//! Guarantees: requests hand their record over a bounded channel and wait for it only until
//! their deadline (then fail closed); a record whose request stopped waiting before the writer
//! reached it is not written, so no record approves what was answered with status 30. Nobody
//! else waits on the disk: the admin endpoints read [`AuditLog::unready`], and shutdown waits at
//! most [`CLOSE_WAIT`] for the final checkpoint.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::chain::{load_head, Chain};
use super::records::{AuditRecord, Refused, RefusedRecord, Seal, Shadow, ShadowRecord};
use super::{now_rfc3339, AuditMetrics, Pending, SealPolicy, Ticket};
use crate::generation::Generation;
use crate::protocol::keys::Signer;

/// Records waiting for the writer; beyond this a request fails closed at once.
const BACKLOG: usize = 4096;

/// The longest shutdown waits for the final checkpoint.
pub(crate) const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// A write taking longer than this makes the gateway unready (a stalled disk).
const STALL: Duration = Duration::from_secs(2);

/// While writes fail, how often the writer tries again on its own (so readiness can return
/// without traffic, which an unready replica does not get).
const RETRY: Duration = Duration::from_secs(1);

/// Status-20 refusals recorded one by one per second; the rest are summed up.
const REFUSALS_PER_SECOND: u32 = 10;

/// The handle to one audit file's writer thread. Dropping the last handle ends the thread once
/// it has written what it was given.
#[derive(Debug)]
pub struct AuditLog {
    shared: Arc<State>,
    tx: SyncSender<Job>,
    metrics: AuditMetrics,
}

/// What the handle and the thread both see.
#[derive(Debug)]
struct State {
    path: PathBuf,
    /// When the job being written started, in ms since `epoch` (0: none).
    busy_since: AtomicU64,
    epoch: Instant,
    /// Why the last write failed, until one succeeds.
    failing: Mutex<Option<String>>,
    refusals: Mutex<Refusals>,
}

/// The per-second budget of status-20 records, and what was summed up beyond it.
#[derive(Debug)]
struct Refusals {
    window: Instant,
    recorded: u32,
    suppressed: u64,
    since: Option<String>,
}

/// What the writer is asked to do.
enum Job {
    /// Append one record (decision, config, shadow, ...). A `reply` that was dropped (the
    /// request stopped waiting) means: do not write it.
    Record {
        body: Vec<u8>,
        g: Arc<Generation>,
        reply: Option<oneshot::Sender<Result<(), String>>>,
    },
    /// The `config` record and a `start` checkpoint (one write), sync, save it as the head.
    Start { g: Arc<Generation>, config: Vec<u8> },
    /// A reload pointed `audit_log` elsewhere: close this file.
    Retire { g: Arc<Generation> },
    /// SIGHUP: follow a rotation now.
    Reopen { g: Arc<Generation> },
    /// Shutdown: seal, sync, save the head.
    Close {
        reply: std::sync::mpsc::Sender<Result<(), String>>,
    },
}

/// The writer thread's own state.
struct Writer {
    shared: Arc<State>,
    chain: Chain,
    pending: Arc<Pending>,
    metrics: AuditMetrics,
    /// The latest generation a job carried: its key signs, its config times the checkpoints.
    g: Option<Arc<Generation>>,
    last_idle: Option<Instant>,
    last_retry: Instant,
    last_summary: Instant,
}

// === impl AuditLog ===

impl AuditLog {
    /// Opens the log at `path` (setting aside a file that is not the chain whose head was saved
    /// beside it, signed by `signer`) and starts its writer thread.
    pub(crate) fn open(
        path: &Path,
        signer: &Signer,
        pending: Arc<Pending>,
        metrics: AuditMetrics,
    ) -> std::io::Result<AuditLog> {
        let saved = load_head(path, signer);
        // After a crash (a head saved at start-up, not at a clean close) the gateway knows no
        // head: a non-empty file is set aside and the new chain starts from 64 zeros. `seq`
        // still continues above the saved one, so it never goes backwards.
        let known = saved.as_ref().map(|(h, clean)| super::chain::Known {
            hash: if *clean { h.hash } else { super::GENESIS },
            seq: h.seq,
        });
        let saved = saved.filter(|(_, clean)| *clean).map(|(h, _)| h);
        let chain = Chain::open(path, known, saved, signer, &metrics)?;
        let shared = Arc::new(State {
            path: path.to_owned(),
            busy_since: AtomicU64::new(0),
            epoch: Instant::now(),
            failing: Mutex::new(None),
            refusals: Mutex::new(Refusals {
                window: Instant::now(),
                recorded: 0,
                suppressed: 0,
                since: None,
            }),
        });
        let (tx, rx) = sync_channel(BACKLOG);
        let now = Instant::now();
        let writer = Writer {
            shared: shared.clone(),
            chain,
            pending,
            metrics: metrics.clone(),
            g: None,
            last_idle: None,
            last_retry: now,
            last_summary: now,
        };
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(&rx))?;
        Ok(AuditLog {
            shared,
            tx,
            metrics,
        })
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Hands `record` to the writer and waits until it is written, or until `until`; an error
    /// says why the record is not (or may not be) in the file.
    pub(crate) async fn append(
        &self,
        record: &AuditRecord<'_>,
        g: &Arc<Generation>,
        ticket: Ticket,
        until: tokio::time::Instant,
    ) -> Result<(), String> {
        let body = serde_json::to_vec(record).map_err(|e| e.to_string())?;
        self.append_body(body, g, ticket, until).await
    }

    /// As [`AuditLog::append`], for a record of another kind (one JSON object) made by the caller.
    pub(crate) async fn append_body(
        &self,
        body: Vec<u8>,
        g: &Arc<Generation>,
        ticket: Ticket,
        until: tokio::time::Instant,
    ) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        // Given back before the hand-over: the writer seals as idle once none is pending.
        ticket.finish();
        let sent = self.send(Job::Record {
            body,
            g: g.clone(),
            reply: Some(reply),
        });
        let result = match sent {
            Ok(()) => match tokio::time::timeout_at(until, answer).await {
                Ok(Ok(result)) => return result,
                Ok(Err(_)) => Err("the audit writer dropped the record".to_owned()),
                Err(_) => Err(format!(
                    "{}: not written within the request's deadline (stalled disk?)",
                    self.path().display()
                )),
            },
            Err(e) => Err(e),
        };
        // The writer cannot say so itself while it hangs: counted and shown by `/readyz` until
        // a write succeeds.
        if let Err(e) = &result {
            self.metrics.write_failures.inc();
            *lock(&self.shared.failing) = Some(e.clone());
        }
        result
    }

    /// Whether a status-20 refusal is recorded one by one (else it is summed up in the next
    /// `refused` record).
    pub(crate) fn admit_refusal(&self) -> bool {
        let mut r = lock(&self.shared.refusals);
        if r.window.elapsed() >= Duration::from_secs(1) {
            r.window = Instant::now();
            r.recorded = 0;
        }
        if r.recorded < REFUSALS_PER_SECOND {
            r.recorded += 1;
            return true;
        }
        r.suppressed += 1;
        r.since.get_or_insert_with(now_rfc3339);
        false
    }

    /// Appends a `config` (or any other) record without waiting for it.
    pub(crate) fn record(&self, g: &Arc<Generation>, body: Vec<u8>) {
        if let Err(e) = self.send(Job::Record {
            body,
            g: g.clone(),
            reply: None,
        }) {
            tracing::error!(path = %self.path().display(), error = %e, "audit record dropped");
        }
    }

    /// Appends a `shadow` record: a shadow server's verdict that arrived after the answer.
    #[allow(dead_code)] // Called by the shadow fan-out once it records late verdicts.
    pub(crate) fn shadow(&self, g: &Arc<Generation>, shadow: Shadow<'_>) {
        let record = ShadowRecord {
            ts: now_rfc3339(),
            shadow,
        };
        match serde_json::to_vec(&record) {
            Ok(body) => self.record(g, body),
            Err(e) => tracing::error!(error = %e, "cannot serialize a shadow record"),
        }
    }

    /// Writes the `config` record of the first generation and a `start` checkpoint, and saves
    /// that checkpoint as the head once it is on disk.
    pub(crate) fn start(&self, g: &Arc<Generation>, config: Vec<u8>) {
        let _ = self.send(Job::Start {
            g: g.clone(),
            config,
        });
    }

    /// Closes this file with a checkpoint when a reload points `audit_log` elsewhere; a record
    /// that still arrives here is sealed at once.
    pub(crate) fn retire(&self, g: &Arc<Generation>) {
        let _ = self.send(Job::Retire { g: g.clone() });
    }

    /// Moves to a new file at the path if the open one was renamed or deleted (SIGHUP).
    pub(crate) fn reopen(&self, g: &Arc<Generation>) {
        let _ = self.send(Job::Reopen { g: g.clone() });
    }

    /// Seals the log, syncs it and saves the head (at shutdown), waiting at most
    /// [`CLOSE_WAIT`]: a stalled disk must not keep the process from exiting.
    pub fn close(&self) -> Result<(), String> {
        let (reply, done) = std::sync::mpsc::channel();
        let give_up = Instant::now() + CLOSE_WAIT;
        let mut job = Job::Close { reply };
        loop {
            match self.tx.try_send(job) {
                Ok(()) => break,
                Err(TrySendError::Full(j)) if Instant::now() < give_up => {
                    job = j;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(_) => return Err("the audit writer is stalled or gone".into()),
            }
        }
        match done.recv_timeout(give_up.saturating_duration_since(Instant::now())) {
            Ok(result) => result,
            Err(_) => Err(format!(
                "{}: the final checkpoint was not written within {} s (stalled disk?)",
                self.path().display(),
                CLOSE_WAIT.as_secs()
            )),
        }
    }

    /// Why the gateway cannot approve now, as far as the audit log goes: writes failing, or
    /// one stalled for longer than [`STALL`].
    pub fn unready(&self) -> Option<String> {
        let since = self.shared.busy_since.load(Ordering::Acquire);
        if since > 0 {
            let busy = (self.shared.epoch.elapsed().as_millis() as u64).saturating_sub(since);
            if busy >= STALL.as_millis() as u64 {
                return Some(format!(
                    "audit log {}: a write has been stalled for {} ms",
                    self.path().display(),
                    busy
                ));
            }
        }
        lock(&self.shared.failing)
            .as_ref()
            .map(|e| format!("audit log writes failing: {e}"))
    }

    fn send(&self, job: Job) -> Result<(), String> {
        self.tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => format!(
                "{}: {BACKLOG} records wait for the audit writer (stalled disk?)",
                self.path().display()
            ),
            TrySendError::Disconnected(_) => "the audit writer has stopped".into(),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn policy(g: &Generation) -> SealPolicy {
    SealPolicy {
        every: g.config.audit_checkpoint_every.max(1),
        within: (g.config.audit_checkpoint_ms > 0)
            .then(|| Duration::from_millis(g.config.audit_checkpoint_ms)),
    }
}

// === impl Writer ===

impl Writer {
    fn run(mut self, rx: &Receiver<Job>) {
        loop {
            let tick = self
                .g
                .as_ref()
                .and_then(|g| policy(g).within)
                .map_or(Duration::from_secs(1), |w| {
                    (w / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
                });
            match rx.recv_timeout(tick) {
                Ok(job) => {
                    self.busy(true);
                    self.handle(job);
                    self.busy(false);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.busy(true);
            self.maintain();
            self.busy(false);
        }
    }

    fn busy(&self, on: bool) {
        // At least 1 so that 0 keeps meaning "not busy".
        let now = if on {
            self.shared.epoch.elapsed().as_millis() as u64 + 1
        } else {
            0
        };
        self.shared.busy_since.store(now, Ordering::Release);
    }

    fn handle(&mut self, job: Job) {
        match job {
            Job::Record { body, g, reply } => {
                if reply.as_ref().is_some_and(oneshot::Sender::is_closed) {
                    // Its request stopped waiting and answered status 30: no record says otherwise.
                    return;
                }
                self.g = Some(g);
                let result = self.write_record(&body);
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Job::Start { g, config } => {
                self.g = Some(g.clone());
                let result = match self
                    .chain
                    .append(Some(&config), Some((Seal::Start, &g.signer)))
                {
                    Ok(()) => {
                        self.wrote(Some(Seal::Start));
                        self.chain
                            .sync()
                            .and_then(|()| self.chain.save_head())
                            .map_err(|e| self.failed(&e, "cannot save the audit chain head"))
                    }
                    Err(e) => Err(self.failed(&e, "audit log start checkpoint failed")),
                };
                if let Err(e) = result {
                    tracing::error!(error = %e, "audit log not started cleanly");
                }
            }
            Job::Retire { g } => {
                self.g = Some(g);
                self.chain.retired = true;
                // Sealed and saved as the head, so the file is continued if a later reload
                // points `audit_log` back here.
                let result = self.checkpoint(Seal::Reconfigured).and_then(|()| {
                    self.chain
                        .sync()
                        .and_then(|()| self.chain.save_head())
                        .map_err(|e| self.failed(&e, "cannot save the audit chain head"))
                });
                if let Err(e) = result {
                    tracing::error!(error = %e, "the old audit log was not closed cleanly");
                }
            }
            Job::Reopen { g } => {
                if let Err(e) = self.chain.follow(&g.signer) {
                    let _ = self.failed(&e, "cannot reopen the audit log");
                }
                self.g = Some(g);
            }
            Job::Close { reply } => {
                let _ = reply.send(self.close());
            }
        }
    }

    /// Writes one record, and in the same write the checkpoint it calls for.
    fn write_record(&mut self, body: &[u8]) -> Result<(), String> {
        let Some(g) = self.g.clone() else {
            return Err("no generation".into());
        };
        if let Err(e) = self.chain.follow(&g.signer) {
            return Err(self.failed(&e, "cannot open the audit log"));
        }
        let p = policy(&g);
        let after = self.chain.unsealed + 1;
        let why = if self.chain.retired {
            Some(Seal::Reconfigured)
        } else if after >= p.every {
            Some(Seal::Interval)
        } else {
            p.within.and_then(|within| self.timed_seal(within, true))
        };
        match self.chain.append(Some(body), why.map(|w| (w, &g.signer))) {
            Ok(()) => {
                self.wrote(why);
                Ok(())
            }
            Err(e) => Err(self.failed(&e, "audit log write failed")),
        }
    }

    /// The time-based seal due now, if any: idle (no request pending, at most one per
    /// `within`) or elapsed (`within` since the first unsealed line). `adding`: a line is about
    /// to be written.
    fn timed_seal(&self, within: Duration, adding: bool) -> Option<Seal> {
        if self.chain.unsealed == 0 && !adding {
            return None;
        }
        let idle_ok = self.last_idle.is_none_or(|t| t.elapsed() >= within);
        if self.pending.is_idle() && idle_ok {
            Some(Seal::Idle)
        } else if self.chain.due(within) {
            Some(Seal::Elapsed)
        } else {
            None
        }
    }

    fn wrote(&mut self, why: Option<Seal>) {
        if why == Some(Seal::Idle) {
            self.last_idle = Some(Instant::now());
        }
        *lock(&self.shared.failing) = None;
    }

    /// Counts and logs a failed write and keeps it for `/readyz`; returns what the request's
    /// answer says.
    fn failed(&self, e: &std::io::Error, what: &str) -> String {
        self.metrics.write_failures.inc();
        let text = format!("{}: {e}", self.chain.path().display());
        tracing::error!(path = %self.chain.path().display(), error = %e, "{what}");
        *lock(&self.shared.failing) = Some(text.clone());
        text
    }

    fn checkpoint(&mut self, why: Seal) -> Result<(), String> {
        let Some(g) = self.g.clone() else {
            return Err("no generation".into());
        };
        if let Err(e) = self.chain.follow(&g.signer) {
            return Err(self.failed(&e, "cannot open the audit log"));
        }
        match self.chain.seal(&g.signer, why) {
            Ok(()) => {
                self.wrote(Some(why));
                Ok(())
            }
            Err(e) => Err(self.failed(&e, "audit log checkpoint failed")),
        }
    }

    /// Between jobs: retries a failing log, sums up refusals, seals on time.
    fn maintain(&mut self) {
        let Some(g) = self.g.clone() else { return };
        if lock(&self.shared.failing).is_some() {
            if self.last_retry.elapsed() >= RETRY {
                self.last_retry = Instant::now();
                if self.checkpoint(Seal::Idle).is_ok() {
                    tracing::info!(path = %self.chain.path().display(), "audit log writes work again");
                }
            }
            return;
        }
        if self.last_summary.elapsed() >= Duration::from_secs(1) {
            self.last_summary = Instant::now();
            if let Some(refused) = self.take_refusals() {
                let record = RefusedRecord {
                    ts: now_rfc3339(),
                    refused: &refused,
                };
                if let Ok(body) = serde_json::to_vec(&record) {
                    let _ = self.write_record(&body);
                }
            }
        }
        if let Some(why) = policy(&g)
            .within
            .and_then(|within| self.timed_seal(within, false))
        {
            let _ = self.checkpoint(why);
        }
    }

    fn take_refusals(&self) -> Option<Refused> {
        let mut r = lock(&self.shared.refusals);
        if r.suppressed == 0 {
            return None;
        }
        let count = std::mem::take(&mut r.suppressed);
        Some(Refused {
            count,
            status: 20,
            since: r.since.take().unwrap_or_else(now_rfc3339),
            peers: Vec::new(),
        })
    }

    fn close(&mut self) -> Result<(), String> {
        self.checkpoint(Seal::Shutdown)?;
        self.chain
            .sync()
            .and_then(|()| self.chain.save_head())
            .map_err(|e| self.failed(&e, "cannot sync the audit log or save its head"))
    }
}
