//! The event outbox: each verified event once, with the node's exact bytes, and one delivery
//! row per event server it goes to. Deliveries are claimed with a lease (`claimed_by`,
//! `claimed_until_ms`): on PostgreSQL with `FOR UPDATE SKIP LOCKED`, so replicas sharing the
//! database never claim the same row at once, and a dead replica's claims are taken over once
//! their lease ends.

use super::{now_ms, on_pool, Pool, Store};

/// One delivery claimed by this replica.
#[derive(Debug, Clone)]
pub(crate) struct Claimed {
    pub(crate) event_id: String,
    pub(crate) package: Vec<u8>,
    /// Attempts made before this one.
    pub(crate) attempts: i64,
    /// When the event was recorded (ms).
    pub(crate) created_ms: i64,
    /// The W3C `traceparent` of the span that recorded the event, if traced: each delivery
    /// joins that trace.
    pub(crate) traceparent: Option<String>,
}

/// What became of one attempt.
#[derive(Debug, Clone)]
pub(crate) enum Settled {
    Delivered,
    /// Try again at this time (ms).
    Retry {
        at_ms: i64,
        error: String,
    },
    /// Given up: past `event_retry_hours`.
    Dropped {
        error: String,
    },
}

const CLAIM: &str = "UPDATE outbox_deliveries SET claimed_by = $1, claimed_until_ms = $2 \
     WHERE (event_id, server) IN (SELECT event_id, server FROM outbox_deliveries \
       WHERE server = $3 AND state = 'pending' AND next_attempt_ms <= $4 \
         AND (claimed_until_ms IS NULL OR claimed_until_ms < $4) \
       ORDER BY created_ms LIMIT $5";

// === impl Store ===

impl Store {
    /// Records a verified event and its deliveries to `servers`, in one transaction. `false`:
    /// the event was already recorded (a node's retry), nothing more to deliver.
    pub(crate) async fn record_event(
        &self,
        event_id: &str,
        event_type: &str,
        package: &[u8],
        servers: &[&str],
        traceparent: Option<&str>,
    ) -> Result<bool, String> {
        let now = now_ms();
        let result: Result<bool, sqlx::Error> = on_pool!(self, p => async {
            let mut tx = p.begin().await?;
            let new = sqlx::query(
                "INSERT INTO outbox (event_id, event_type, package, received_ms, traceparent) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (event_id) DO NOTHING",
            )
            .bind(event_id)
            .bind(event_type)
            .bind(package)
            .bind(now)
            .bind(traceparent)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if new {
                for server in servers {
                    sqlx::query(
                        "INSERT INTO outbox_deliveries (event_id, server, state, attempts, created_ms, next_attempt_ms) \
                         VALUES ($1, $2, 'pending', 0, $3, $3)",
                    )
                    .bind(event_id)
                    .bind(*server)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            tx.commit().await?;
            Ok(new)
        }.await);
        let result = result.map_err(|e| e.to_string());
        self.note(&result);
        result
    }

    /// Claims up to `limit` deliveries to `server` that are due, for `lease_ms`.
    pub(crate) async fn claim(
        &self,
        server: &str,
        lease_ms: i64,
        limit: i64,
    ) -> Result<Vec<Claimed>, String> {
        let now = now_ms();
        let sql = match self.pool {
            Pool::Sqlite(_) => format!("{CLAIM}) RETURNING event_id, attempts, created_ms"),
            Pool::Postgres(_) => {
                format!("{CLAIM} FOR UPDATE SKIP LOCKED) RETURNING event_id, attempts, created_ms")
            }
        };
        let result: Result<Vec<Claimed>, sqlx::Error> = on_pool!(self, p => async {
            use sqlx::Row;
            let rows = sqlx::query(&sql)
                .bind(&self.replica)
                .bind(now + lease_ms)
                .bind(server)
                .bind(now)
                .bind(limit)
                .fetch_all(p)
                .await?;
            let mut claimed = Vec::with_capacity(rows.len());
            for row in rows {
                let event_id: String = row.try_get("event_id")?;
                let stored = sqlx::query("SELECT package, traceparent FROM outbox WHERE event_id = $1")
                    .bind(&event_id)
                    .fetch_optional(p)
                    .await?;
                let Some(stored) = stored else { continue };
                let package: Vec<u8> = stored.try_get("package")?;
                let traceparent: Option<String> = stored.try_get("traceparent")?;
                claimed.push(Claimed {
                    event_id,
                    package,
                    traceparent,
                    attempts: row.try_get("attempts")?,
                    created_ms: row.try_get("created_ms")?,
                });
            }
            Ok(claimed)
        }.await);
        let result = result.map_err(|e| e.to_string());
        self.note(&result);
        result
    }

    /// Records what became of a claimed delivery, and gives the claim back.
    pub(crate) async fn settle(
        &self,
        server: &str,
        event_id: &str,
        settled: &Settled,
    ) -> Result<(), String> {
        let (state, next, error) = match settled {
            Settled::Delivered => ("delivered", now_ms(), None),
            Settled::Retry { at_ms, error } => ("pending", *at_ms, Some(error.as_str())),
            Settled::Dropped { error } => ("dropped", now_ms(), Some(error.as_str())),
        };
        let result = on_pool!(self, p => sqlx::query(
            "UPDATE outbox_deliveries SET state = $1, attempts = attempts + 1, next_attempt_ms = $2, \
             last_error = $3, claimed_by = NULL, claimed_until_ms = NULL \
             WHERE event_id = $4 AND server = $5",
        )
        .bind(state)
        .bind(next)
        .bind(error)
        .bind(event_id)
        .bind(server)
        .execute(p)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string()));
        self.note(&result);
        result
    }

    /// Deliveries to `server` not yet made, and when the oldest of them was recorded (ms).
    pub(crate) async fn backlog(&self, server: &str) -> Result<(i64, Option<i64>), String> {
        on_pool!(self, p => async {
            use sqlx::Row;
            let row = sqlx::query(
                "SELECT COUNT(*) AS n, MIN(created_ms) AS oldest FROM outbox_deliveries \
                 WHERE server = $1 AND state = 'pending'",
            )
            .bind(server)
            .fetch_one(p)
            .await?;
            Ok::<_, sqlx::Error>((row.try_get("n")?, row.try_get("oldest")?))
        }.await)
        .map_err(|e| e.to_string())
    }
}
