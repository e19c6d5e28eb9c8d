//! A small downstream callback server in the style of Cobo's templates, for `demo` and the
//! benchmark: it verifies the gateway's token, applies a fixed policy after an optional delay and
//! answers a signed CallbackResponse.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use tokio::net::TcpListener;

use crate::protocol::keys::{Signer, Verifier};
use crate::protocol::{self, Action, CallbackRequest, CallbackResponse, RequestType, Status};

/// How a sample server decides.
#[derive(Debug, Clone)]
pub enum Policy {
    ApproveAll,
    /// KeySign only when every destination address in `extra_info.transaction.destination` is
    /// listed; every other type is approved.
    Whitelist(Vec<String>),
}

/// One sample server's behaviour.
#[derive(Debug)]
pub struct SampleServer {
    pub name: String,
    pub signer: Signer,
    /// The gateway's public key: the sample server sees the gateway as its TSS Node.
    pub gateway: Verifier,
    pub policy: Policy,
    pub delay: Duration,
    /// Answer the bare token (Python template) instead of a JSON string (Go template).
    pub raw_body: bool,
    /// Approvals signed ahead of time, by request_id (the benchmark's "instant" servers: their
    /// own RSA signature would otherwise compete with the gateway for the CPU). Used only when
    /// the policy approves that request.
    pub presigned: Option<Arc<RwLock<HashMap<String, String>>>>,
}

/// Streams one HTTP/2 connection may carry at once: enough for the benchmark's 1,000 requests
/// in flight over one connection (hyper's default of 200 would queue the rest).
const MAX_STREAMS: u32 = 10_000;

/// Serves `server` on a fresh loopback port until the runtime ends; returns the address. Speaks
/// HTTP/1.1 and HTTP/2 with prior knowledge (h2c), as many Go and Java servers do.
pub async fn start(server: SampleServer) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/v2/check", post(check))
        .with_state(Arc::new(server));
    let service = hyper_util::service::TowerToHyperService::new(app);
    let mut http =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    http.http2().max_concurrent_streams(MAX_STREAMS);
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "sample server: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (http, service) = (http.clone(), service.clone());
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = http.serve_connection(io, service).await {
                    tracing::debug!(error = %e, "sample server: connection ended with an error");
                }
            });
        }
    });
    Ok(addr)
}

async fn check(State(s): State<Arc<SampleServer>>, body: Bytes) -> Response {
    let deadline = Instant::now() + s.delay;
    let (http, response) = match decide(&s, &body) {
        Ok(response) => (StatusCode::OK, response),
        // Like Cobo's reference servers: their own check failed, HTTP 400 with a signed body.
        Err(response) => (StatusCode::BAD_REQUEST, response),
    };
    let token = presigned(&s, &response).unwrap_or_else(|| {
        let json = serde_json::to_vec(&response).unwrap_or_default();
        protocol::sign_token(&s.signer, &json, &s.name, 120)
    });
    if http == StatusCode::OK {
        sleep_until(deadline).await;
    }
    if s.raw_body {
        (http, token).into_response()
    } else {
        (
            http,
            [(header::CONTENT_TYPE, "application/json")],
            format!("\"{token}\""),
        )
            .into_response()
    }
}

/// An answer signed ahead of time for this approval, if there is one.
fn presigned(s: &SampleServer, response: &CallbackResponse) -> Option<String> {
    if !response.is_approval() {
        return None;
    }
    let answers = s.presigned.as_ref()?.read().ok()?;
    answers.get(&response.request_id).cloned()
}

/// Sleeps until `deadline` to within a fraction of a millisecond: tokio's timer wheel rounds up
/// to whole milliseconds, so the last stretch is slept by a blocking thread.
pub async fn sleep_until(deadline: Instant) {
    const SLACK: Duration = Duration::from_millis(2);
    if let Some(coarse) = deadline.checked_sub(SLACK) {
        tokio::time::sleep_until(coarse.into()).await;
    }
    let rest = deadline.saturating_duration_since(Instant::now());
    if !rest.is_zero() {
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(rest)).await;
    }
}

fn decide(s: &SampleServer, body: &[u8]) -> Result<CallbackResponse, CallbackResponse> {
    let fail = |status, error: String| CallbackResponse::new("", status, Action::Reject, error);
    let token = form_urlencoded::parse(body)
        .find(|(k, _)| k == protocol::FORM_FIELD)
        .map(|(_, v)| v)
        .ok_or_else(|| fail(Status::InvalidToken, "TSS_JWT_MSG missing".into()))?;
    let claims = protocol::verify_token(&token, &s.gateway, protocol::now_secs())
        .map_err(|e| fail(Status::InvalidToken, e.to_string()))?;
    let package = protocol::decode_package(&claims.package_data)
        .map_err(|e| fail(Status::InvalidRequest, e.to_string()))?;
    let req = CallbackRequest::parse(&package)
        .map_err(|e| fail(Status::InvalidRequest, e.to_string()))?;
    let verdict = match &s.policy {
        Policy::ApproveAll => Ok(()),
        Policy::Whitelist(allowed) if req.request_type == RequestType::KeySign.code() => {
            check_destinations(req.extra_info.as_deref().unwrap_or(""), allowed)
        }
        Policy::Whitelist(_) => Ok(()),
    };
    Ok(match verdict {
        Ok(()) => {
            CallbackResponse::new(&req.request_id, Status::Ok, Action::Approve, String::new())
        }
        Err(why) => CallbackResponse::new(&req.request_id, Status::Ok, Action::Reject, why),
    })
}

fn check_destinations(extra_info: &str, allowed: &[String]) -> Result<(), String> {
    let extra: serde_json::Value =
        serde_json::from_str(extra_info).map_err(|_| "extra_info is not JSON".to_owned())?;
    let mut addresses = Vec::new();
    collect_addresses(&extra["transaction"]["destination"], &mut addresses);
    if addresses.is_empty() {
        return Err("no destination address to check".into());
    }
    match addresses.iter().find(|a| !allowed.contains(a)) {
        Some(a) => Err(format!("destination {a} is not whitelisted")),
        None => Ok(()),
    }
}

fn collect_addresses(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match v {
                    serde_json::Value::String(s) if k == "address" => out.push(s.clone()),
                    _ => collect_addresses(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_addresses(v, out)),
        _ => {}
    }
}
