//! TSS Node events: a node that signs TSSEvents with its event key ([`event_body`], [`post_event`])
//! and an event server ([`EventPeer`]) that verifies the gateway's re-signed token with real
//! RS256 (`jsonwebtoken`) and keeps what it got. The peer can go down (its port closed, its
//! connections cut) and come back on the same port.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::http::http;
use super::keys::keys;
use super::tokens::{form_token, token, token_with, Claims, B64};

/// A TSSEvent as Cobo's SDK model serializes it.
pub fn tss_event(event_id: &str, event_type: &str, request_id: &str) -> Vec<u8> {
    let kind = event_type.split('.').nth(1).unwrap_or("keysign");
    let (data_type, request_type) = match kind {
        "keygen" => ("KeyGen", 1),
        "keyreshare" => ("KeyReshare", 3),
        "keysharesign" => ("KeyShareSign", 5),
        _ => ("KeySign", 2),
    };
    serde_json::to_vec(&serde_json::json!({
        "event_id": event_id,
        "created_timestamp": 1_764_547_200_000_i64,
        "node_id": "coboAbCdEf0123456789",
        "event_type": event_type,
        "data": {
            "data_type": data_type,
            "request_id": request_id,
            "request_type": request_type,
            "request_status": "Succeeded",
            "extra_info": "{}",
            "failed_reason": "",
            "request_detail": "{}",
            "result": "{}"
        }
    }))
    .unwrap()
}

/// The form body the node posts: `payload` signed RS256 with `key`.
pub fn event_form(key: &EncodingKey, payload: &[u8]) -> Vec<u8> {
    format!("TSS_JWT_MSG={}", token(key, payload, "tss-node")).into_bytes()
}

/// As [`event_form`], with the node's event key.
pub fn event_body(payload: &[u8]) -> Vec<u8> {
    event_form(&keys().node_event.encoding(), payload)
}

/// An event token that expired a minute ago.
pub fn expired_event_body(payload: &[u8]) -> Vec<u8> {
    let t = token_with(
        &keys().node_event.encoding(),
        Algorithm::RS256,
        payload,
        "tss-node",
        super::tokens::now() - 60,
    );
    format!("TSS_JWT_MSG={t}").into_bytes()
}

/// Posts a form body to the gateway's `/v2/event`: the HTTP status and the body text.
pub async fn post_event(gateway: SocketAddr, body: Vec<u8>) -> (u16, String) {
    let resp = http()
        .post(format!("http://{gateway}/v2/event"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// What an event server got, verified.
#[derive(Clone, Debug)]
pub struct Got {
    pub event_id: String,
    pub event_type: String,
    /// The decoded `package_data`: must be the node's exact bytes.
    pub package: Vec<u8>,
    pub iss: String,
}

struct PeerState {
    key: DecodingKey,
    got: Mutex<Vec<Got>>,
    /// HTTP status answered to a verified event.
    status: AtomicU16,
    /// Never answer.
    hang: AtomicBool,
    unverified: AtomicUsize,
    calls: AtomicUsize,
}

/// An event server on loopback that verifies the gateway's tokens with its public key.
pub struct EventPeer {
    pub name: String,
    pub port: u16,
    state: Arc<PeerState>,
    stop: Option<watch::Sender<bool>>,
}

impl EventPeer {
    /// Starts a peer on a port of its own.
    pub async fn start(name: &str) -> EventPeer {
        let port = super::gateway::free_port();
        let mut peer = EventPeer::down(name, port);
        peer.up().await;
        peer
    }

    /// A peer that is not listening yet (see [`EventPeer::up`]); its port is `port`.
    pub fn down(name: &str, port: u16) -> EventPeer {
        EventPeer {
            name: name.into(),
            port,
            state: Arc::new(PeerState {
                key: keys().gateway.decoding(),
                got: Mutex::new(Vec::new()),
                status: AtomicU16::new(200),
                hang: AtomicBool::new(false),
                unverified: AtomicUsize::new(0),
                calls: AtomicUsize::new(0),
            }),
            stop: None,
        }
    }

    /// Listens on its port (again).
    pub async fn up(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        let (tx, rx) = watch::channel(false);
        self.stop = Some(tx);
        let app = Router::new()
            .route("/v2/event", post(receive))
            .with_state(self.state.clone());
        tokio::spawn(async move {
            let service = TowerToHyperService::new(app);
            let mut stopped = rx.clone();
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stopped.wait_for(|s| *s) => return,
                };
                let Ok((stream, _)) = accepted else { continue };
                let (service, mut stop) = (service.clone(), rx.clone());
                tokio::spawn(async move {
                    let http = hyper::server::conn::http1::Builder::new();
                    let conn = http.serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.wait_for(|s| *s) => {}
                    }
                });
            }
        });
    }

    /// Closes its port and cuts every connection: calls to it fail with a transport error.
    pub fn go_down(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(true);
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v2/event", self.port)
    }

    /// Answer verified events with this HTTP status.
    pub fn answer(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    pub fn hang(&self, on: bool) {
        self.state.hang.store(on, Ordering::SeqCst);
    }

    pub fn got(&self) -> Vec<Got> {
        self.state.got.lock().unwrap().clone()
    }

    /// How many times it got `event_id`.
    pub fn count(&self, event_id: &str) -> usize {
        self.got().iter().filter(|g| g.event_id == event_id).count()
    }

    pub fn unverified(&self) -> usize {
        self.state.unverified.load(Ordering::SeqCst)
    }

    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }
}

impl Drop for EventPeer {
    fn drop(&mut self) {
        self.go_down();
    }
}

async fn receive(State(s): State<Arc<PeerState>>, body: Bytes) -> StatusCode {
    s.calls.fetch_add(1, Ordering::SeqCst);
    if s.hang.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    let token = form_token(&body);
    let claims =
        match jsonwebtoken::decode::<Claims>(&token, &s.key, &Validation::new(Algorithm::RS256)) {
            Ok(d) => d.claims,
            Err(_) => {
                s.unverified.fetch_add(1, Ordering::SeqCst);
                return StatusCode::BAD_REQUEST;
            }
        };
    let Ok(package) = base64::Engine::decode(&B64, &claims.package_data) else {
        s.unverified.fetch_add(1, Ordering::SeqCst);
        return StatusCode::BAD_REQUEST;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&package) else {
        s.unverified.fetch_add(1, Ordering::SeqCst);
        return StatusCode::BAD_REQUEST;
    };
    let status = StatusCode::from_u16(s.status.load(Ordering::SeqCst)).unwrap();
    if status.is_success() {
        s.got.lock().unwrap().push(Got {
            event_id: v["event_id"].as_str().unwrap_or_default().into(),
            event_type: v["event_type"].as_str().unwrap_or_default().into(),
            package,
            iss: claims.iss,
        });
    }
    status
}
