//! The routes: the TSS Node's (`/v2/check`, `/v1/check`, `/v2/event`, `/ping`) and the operator's (`/healthz`,
//! `/readyz`, `/metrics`, `/status`), which move to `admin_listen` when it is set.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::check::check;
use crate::state::alarms::Alarm;
use crate::Shared;

/// Every route: the node's and the operator's (no `admin_listen`).
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    node_router(shared.clone()).merge(admin_router(shared))
}

/// What the TSS Node calls: the callbacks and `/ping`.
pub(crate) fn node_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v2/check", post(check))
        .route("/v1/check", post(check))
        .route("/v2/event", post(super::event::event))
        .route("/ping", get(ping))
        .with_state(shared)
}

/// What operators, probes and Prometheus call; served on `admin_listen` when it is set.
pub(crate) fn admin_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(crate::ops::status::page))
        .with_state(shared)
}

async fn ping(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let g = shared.current.load();
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Json(serde_json::json!({ "server": g.config.service_name, "timestamp": ms }))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let g = shared.current.load();
    let unready = unready(&shared);
    let mut body = serde_json::json!({
        "ready": unready.is_none(),
        "config_generation": g.number,
        "servers": shared.health.report(&g),
    });
    match alarms(&shared, Duration::from_secs(1)).await {
        Ok(list) => body["alarms"] = serde_json::to_value(list).unwrap_or_default(),
        Err(e) => {
            body["alarms"] = serde_json::json!([]);
            body["alarms_error"] = e.into();
        }
    }
    let status = match unready {
        Some(reason) => {
            body["reason"] = reason.into();
            StatusCode::SERVICE_UNAVAILABLE
        }
        None => StatusCode::OK,
    };
    // The last good config keeps serving, so a config that does not load leaves readiness as
    // it is; the operator still sees why.
    if let Some(e) = shared.reload.error() {
        body["config_error"] = e.into();
    }
    (status, Json(body)).into_response()
}

/// Why the gateway cannot approve now (`None`: ready), read from the audit writer's and the
/// store's state, never waiting on the disk.
pub(crate) fn unready(shared: &Shared) -> Option<String> {
    shared
        .audit
        .load()
        .as_ref()
        .and_then(|a| a.unready())
        .or_else(|| shared.store.as_ref().and_then(|s| s.unready()))
}

/// The `unapproved_execution` alarms of the last 24 hours, from the store (every replica's,
/// across restarts), waited for at most `wait`.
pub(crate) async fn alarms(shared: &Shared, wait: Duration) -> Result<Vec<Alarm>, String> {
    let Some(store) = &shared.store else {
        return Ok(Vec::new());
    };
    let since = crate::state::now_ms() - 24 * 3_600_000;
    let read = store.alarms_since(crate::ops::reconcile::UNAPPROVED_EXECUTION, since, 100);
    match tokio::time::timeout(wait, read).await {
        Ok(Ok(list)) => Ok(list),
        Ok(Err(e)) => Err(format!("alarms unreadable: {e}")),
        Err(_) => Err(format!(
            "alarms unreadable: the state store did not answer within {} ms",
            wait.as_millis()
        )),
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        shared.metrics.render(),
    )
}
