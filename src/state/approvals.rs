//! The approvals index: every APPROVE answer, written before the answer is sent, so that a
//! `succeeded` event can never arrive before the approval it needs (contract section 5).
//!
//! One writer task commits the approvals of concurrent requests together (group commit): one
//! transaction, one sync to disk, for all that arrived while the previous commit ran.

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{now_ms, on_pool, Pool, Store};

/// Approvals waiting for the writer; one more is refused at once (fail closed).
const QUEUE: usize = 8192;
/// Approvals committed in one transaction at most.
const BATCH: usize = 256;

/// One approval, as the index keeps it.
#[derive(Debug, Clone)]
pub(crate) struct Approval {
    pub(crate) request_id: String,
    pub(crate) request_type: i64,
    /// Lowercase hex SHA-256 of the CallbackRequest bytes approved.
    pub(crate) payload_sha256: String,
    pub(crate) config_generation: u64,
}

type Job = (Approval, oneshot::Sender<Result<(), String>>);

/// The writer's queue.
#[derive(Debug)]
pub(crate) struct Queue(mpsc::Sender<Job>);

// === impl Queue ===

impl Queue {
    /// Starts the writer task on the current runtime.
    pub(crate) fn start(pool: Pool, replica: String) -> Queue {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_batches(pool, replica, rx));
        Queue(tx)
    }
}

/// Takes every approval queued, commits them together and answers each.
async fn write_batches(pool: Pool, replica: String, mut rx: mpsc::Receiver<Job>) {
    let store = Batch { pool };
    let mut jobs = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut jobs, BATCH).await > 0 {
        let result = store.commit(&replica, &jobs).await;
        for (_, reply) in jobs.drain(..) {
            let _ = reply.send(result.clone());
        }
    }
}

/// The pool, seen by the writer.
struct Batch {
    pool: Pool,
}

impl Batch {
    async fn commit(&self, replica: &str, jobs: &[Job]) -> Result<(), String> {
        let now = now_ms();
        let result: Result<(), sqlx::Error> = on_pool!(self, p => async {
            let mut tx = p.begin().await?;
            for (a, _) in jobs {
                sqlx::query(
                    "INSERT INTO approvals (request_id, request_type, payload_sha256, approved_ms, config_generation, replica) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&a.request_id)
                .bind(a.request_type)
                .bind(&a.payload_sha256)
                .bind(now)
                .bind(a.config_generation as i64)
                .bind(replica)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await
        }.await);
        result.map_err(|e| e.to_string())
    }
}

// === impl Store ===

impl Store {
    /// Puts `approval` in the index, waiting for its commit until `until`. An error means it
    /// may not be there: the caller must not approve.
    pub(crate) async fn approve(&self, approval: Approval, until: Instant) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        let result = match self.approvals.0.try_send((approval, reply)) {
            Err(mpsc::error::TrySendError::Full(_)) => {
                Err(format!("{QUEUE} approvals wait for the store (stalled?)"))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err("the approvals writer has stopped".into())
            }
            Ok(()) => match tokio::time::timeout_at(until, answer).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err("the approvals writer dropped the approval".into()),
                Err(_) => Err("not written within the request's deadline".into()),
            },
        };
        self.note(&result);
        result
    }

    /// Whether any replica approved `request_id` (within the retention).
    pub(crate) async fn approved(&self, request_id: &str) -> Result<bool, String> {
        on_pool!(self, p => sqlx::query("SELECT 1 FROM approvals WHERE request_id = $1 LIMIT 1")
            .bind(request_id)
            .fetch_optional(p)
            .await
            .map(|row| row.is_some())
            .map_err(|e| e.to_string()))
    }
}
