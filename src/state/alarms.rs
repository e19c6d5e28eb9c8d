//! Alarms raised by reconciliation, kept so that `/readyz` lists them across restarts and
//! replicas: one per kind and event (a node's retry of the event raises nothing new).

use serde::Serialize;

use super::{on_pool, Store};

/// One alarm, as `/readyz` lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Alarm {
    pub kind: String,
    pub request_id: String,
    pub event_id: String,
    /// RFC 3339 UTC.
    pub ts: String,
    #[serde(skip)]
    pub(crate) ts_ms: i64,
    #[serde(skip)]
    pub(crate) event_type: String,
    #[serde(skip)]
    pub(crate) node_id: String,
}

/// RFC 3339 (ms) of a Unix time in ms.
pub(crate) fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

// === impl Store ===

impl Store {
    /// Stores `alarm`; `false` if it was stored already.
    pub(crate) async fn raise(&self, alarm: &Alarm) -> Result<bool, String> {
        let result = on_pool!(self, p => sqlx::query(
            "INSERT INTO alarms (kind, event_id, request_id, event_type, node_id, ts_ms, replica) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (kind, event_id) DO NOTHING",
        )
        .bind(&alarm.kind)
        .bind(&alarm.event_id)
        .bind(&alarm.request_id)
        .bind(&alarm.event_type)
        .bind(&alarm.node_id)
        .bind(alarm.ts_ms)
        .bind(&self.replica)
        .execute(p)
        .await
        .map(|r| r.rows_affected() == 1)
        .map_err(|e| e.to_string()));
        self.note(&result);
        result
    }

    /// The alarms of `kind` raised since `since_ms`, newest first, at most `limit`.
    pub(crate) async fn alarms_since(
        &self,
        kind: &str,
        since_ms: i64,
        limit: i64,
    ) -> Result<Vec<Alarm>, String> {
        on_pool!(self, p => async {
            use sqlx::Row;
            let rows = sqlx::query(
                "SELECT kind, event_id, request_id, event_type, node_id, ts_ms FROM alarms \
                 WHERE kind = $1 AND ts_ms >= $2 ORDER BY ts_ms DESC LIMIT $3",
            )
            .bind(kind)
            .bind(since_ms)
            .bind(limit)
            .fetch_all(p)
            .await?;
            rows.iter()
                .map(|r| {
                    let ts_ms: i64 = r.try_get("ts_ms")?;
                    Ok(Alarm {
                        kind: r.try_get("kind")?,
                        event_id: r.try_get("event_id")?,
                        request_id: r.try_get("request_id")?,
                        event_type: r.try_get("event_type")?,
                        node_id: r.try_get("node_id")?,
                        ts: rfc3339(ts_ms),
                        ts_ms,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
        }.await)
        .map_err(|e| e.to_string())
    }
}
