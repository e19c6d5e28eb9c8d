//! The state store (`state_store`): the event outbox ([`outbox`]), the approvals index
//! ([`approvals`]) and the alarms of reconciliation ([`alarms`]), in a SQLite file of this
//! replica's own or a PostgreSQL database shared by every replica, through one crate (`sqlx`)
//! with versioned migrations (`migrations/sqlite`, `migrations/postgres`) applied at start-up.
//!
//! Guarantees:
//! - A write that fails is an error to its caller, which fails closed: an approval that is not
//!   in the index is not given (status 30), an event that is not in the outbox is answered 503.
//! - While writes fail (or the heartbeat write does), [`Store::unready`] says why and `/readyz`
//!   answers 503; the next write that succeeds clears it.
//! - SQL is written once for both backends (`$1` placeholders work in both); only the outbox
//!   claim differs (PostgreSQL adds `FOR UPDATE SKIP LOCKED`, SQLite has one writer anyway).

pub(crate) mod alarms;
pub(crate) mod approvals;
pub(crate) mod outbox;

use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::config::{redact_address, StoreLocation};

/// How long a SQLite write waits for another connection's lock before it fails.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a request waits for a pooled connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// Every this often each replica writes its heartbeat: a store that stopped taking writes is
/// seen (and `/readyz` turns 503) even when no request comes.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(2);

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state_store {location}: {message}")]
    Open { location: String, message: String },
}

/// The two backends' pools.
#[derive(Debug, Clone)]
pub(crate) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$p` bound to the backend's pool: the same SQL for both.
macro_rules! on_pool {
    ($store:expr, $p:ident => $body:expr) => {
        match &$store.pool {
            $crate::state::Pool::Sqlite($p) => $body,
            $crate::state::Pool::Postgres($p) => $body,
        }
    };
}
pub(crate) use on_pool;

/// The opened store, shared by every generation (changing `state_store` needs a restart).
#[derive(Debug)]
pub struct Store {
    pub(crate) pool: Pool,
    /// Where it is, credentials redacted: for logs, `/readyz` and `check-config`.
    pub(crate) location: String,
    /// This replica's name in `approvals.replica` and outbox claims.
    pub(crate) replica: String,
    /// The last write error, until a write succeeds.
    failing: Mutex<Option<String>>,
    /// The approvals writer's queue (group commit).
    approvals: approvals::Queue,
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// This replica's name: `TSS_GATEWAY_REPLICA_ID` if set (a StatefulSet's pod name), else
/// `<hostname>-<pid>`.
pub fn replica_id() -> String {
    if let Ok(id) = std::env::var("TSS_GATEWAY_REPLICA_ID") {
        if !id.trim().is_empty() {
            return id.trim().to_owned();
        }
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}-{}", std::process::id())
}

/// Where a store is, for output: a SQLite path, or the PostgreSQL URL without its password.
pub fn describe(location: &StoreLocation) -> String {
    match location {
        StoreLocation::Sqlite(p) => format!("sqlite {}", p.display()),
        StoreLocation::Postgres(url) => format!("postgres {}", redact_address(url)),
    }
}

// === impl Store ===

impl Store {
    /// Connects, applies the migrations and starts the approvals writer.
    pub async fn open(location: &StoreLocation, replica: String) -> Result<Store, StoreError> {
        let described = describe(location);
        let fail = |message: String| StoreError::Open {
            location: described.clone(),
            message,
        };
        let pool = match location {
            StoreLocation::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
                }
                let options = SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    // Every commit reaches the disk: an approval or event acknowledged is kept.
                    .synchronous(SqliteSynchronous::Full)
                    .foreign_keys(true)
                    .busy_timeout(SQLITE_BUSY_TIMEOUT);
                let pool = SqlitePoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_with(options)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                sqlx::migrate!("./migrations/sqlite")
                    .run(&pool)
                    .await
                    .map_err(|e| fail(format!("migrations: {e}")))?;
                Pool::Sqlite(pool)
            }
            StoreLocation::Postgres(url) => {
                let options = PgConnectOptions::from_str(url)
                    .map_err(|e| fail(format!("not a valid postgres URL: {e}")))?;
                let pool = PgPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_with(options)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                sqlx::migrate!("./migrations/postgres")
                    .run(&pool)
                    .await
                    .map_err(|e| fail(format!("migrations: {e}")))?;
                Pool::Postgres(pool)
            }
        };
        let store = Store {
            approvals: approvals::Queue::start(pool.clone(), replica.clone()),
            pool,
            location: described.clone(),
            replica,
            failing: Mutex::new(None),
        };
        store
            .heartbeat()
            .await
            .map_err(|e| fail(format!("first write: {e}")))?;
        store
            .release_claims()
            .await
            .map_err(|e| fail(format!("releasing old claims: {e}")))?;
        Ok(store)
    }

    /// Why the gateway cannot approve now, as far as the store goes.
    pub fn unready(&self) -> Option<String> {
        lock(&self.failing)
            .as_ref()
            .map(|e| format!("state store {} unavailable: {e}", self.location))
    }

    /// Notes the outcome of a write: an error makes the store unready until a write succeeds.
    pub(crate) fn note<T, E: std::fmt::Display>(&self, result: &Result<T, E>) {
        let mut failing = lock(&self.failing);
        match result {
            Ok(_) => {
                if failing.take().is_some() {
                    tracing::info!(store = %self.location, "state store takes writes again");
                }
            }
            Err(e) => {
                if failing.is_none() {
                    tracing::error!(store = %self.location, error = %e, "state store write failed: approvals fail closed and events are answered 503 until it recovers");
                }
                *failing = Some(e.to_string());
            }
        }
    }

    /// Writes this replica's heartbeat row (and notes the outcome).
    pub(crate) async fn heartbeat(&self) -> Result<(), String> {
        let now = now_ms();
        let write = async {
            on_pool!(self, p => sqlx::query(
                "INSERT INTO replicas (replica, seen_ms) VALUES ($1, $2) \
                 ON CONFLICT (replica) DO UPDATE SET seen_ms = excluded.seen_ms",
            )
            .bind(&self.replica)
            .bind(now)
            .execute(p)
            .await
            .map(|_| ()))
        };
        let result = tokio::time::timeout(HEARTBEAT + ACQUIRE_TIMEOUT, write)
            .await
            .unwrap_or(Err(sqlx::Error::PoolTimedOut))
            .map_err(|e| e.to_string());
        self.note(&result);
        result
    }

    /// Gives back the outbox claims a previous run of this replica left (stopped mid-delivery),
    /// so they are retried at once rather than when their lease ends. A SQLite file has one
    /// gateway, so every claim in it is this replica's.
    async fn release_claims(&self) -> Result<u64, String> {
        const RELEASE: &str =
            "UPDATE outbox_deliveries SET claimed_by = NULL, claimed_until_ms = NULL WHERE claimed_by";
        let result = match &self.pool {
            Pool::Sqlite(p) => sqlx::query(&format!("{RELEASE} IS NOT NULL"))
                .execute(p)
                .await
                .map(|r| r.rows_affected()),
            Pool::Postgres(p) => sqlx::query(&format!("{RELEASE} = $1"))
                .bind(&self.replica)
                .execute(p)
                .await
                .map(|r| r.rows_affected()),
        };
        result.map_err(|e| e.to_string())
    }

    /// Deletes what is past keeping: approvals and alarms older than `retention`, finished
    /// deliveries and their events older than `event_keep` (a duplicate of an event older than
    /// that would be delivered again).
    pub(crate) async fn prune(
        &self,
        retention: Duration,
        event_keep: Duration,
    ) -> Result<u64, String> {
        let now = now_ms();
        let approvals_before = now - retention.as_millis() as i64;
        let events_before = now - event_keep.as_millis() as i64;
        on_pool!(self, p => {
            let mut n = 0;
            for (sql, before) in [
                ("DELETE FROM approvals WHERE approved_ms < $1", approvals_before),
                ("DELETE FROM alarms WHERE ts_ms < $1", approvals_before),
                ("DELETE FROM outbox_deliveries WHERE state <> 'pending' AND created_ms < $1", events_before),
                ("DELETE FROM outbox WHERE received_ms < $1 AND NOT EXISTS \
                  (SELECT 1 FROM outbox_deliveries d WHERE d.event_id = outbox.event_id)", events_before),
            ] {
                n += sqlx::query(sql)
                    .bind(before)
                    .execute(p)
                    .await
                    .map_err(|e| e.to_string())?
                    .rows_affected();
            }
            Ok(n)
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
