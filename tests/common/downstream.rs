//! Callback servers on loopback: the scripted [`Downstream`] that verifies the gateway's tokens
//! and answers as told, and [`serve`], the connection loop any test server can share.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use base64::Engine;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use super::keys::{keys, KeyPair};
use super::tokens::{form_token, now, token, token_with, CallbackResponse, Claims, B64};

/// What a downstream saw in one request it accepted.
#[derive(Clone, Debug)]
pub struct Seen {
    pub request_id: String,
    pub request_type: i64,
    /// The decoded `package_data`: must be the node's exact bytes.
    pub payload: Vec<u8>,
    pub iss: String,
}

/// How a downstream answers.
#[derive(Clone, Debug)]
pub enum Body {
    /// A signed CallbackResponse.
    Signed {
        status: i64,
        action: String,
        error: String,
        /// Answer for this request_id instead of the one asked about.
        request_id: Option<String>,
        /// JSON-string body (Go template) rather than the raw token (Python template).
        json: bool,
        /// Sign with this key instead of the server's own.
        key: Option<KeyPair>,
        alg: Algorithm,
        exp_offset: i64,
    },
    /// These exact bytes.
    Bytes(Vec<u8>),
    /// Never answer.
    Hang,
}

#[derive(Clone, Debug)]
pub struct Answer {
    pub delay: Duration,
    pub http: u16,
    pub body: Body,
}

impl Answer {
    pub fn signed(status: i64, action: &str, error: &str) -> Answer {
        Answer {
            delay: Duration::ZERO,
            http: 200,
            body: Body::Signed {
                status,
                action: action.into(),
                error: error.into(),
                request_id: None,
                json: true,
                key: None,
                alg: Algorithm::RS256,
                exp_offset: 120,
            },
        }
    }
    pub fn approve() -> Answer {
        Answer::signed(0, "APPROVE", "")
    }
    pub fn reject(error: &str) -> Answer {
        Answer::signed(0, "REJECT", error)
    }
    pub fn bytes(http: u16, body: &[u8]) -> Answer {
        Answer {
            delay: Duration::ZERO,
            http,
            body: Body::Bytes(body.to_vec()),
        }
    }
    pub fn hang() -> Answer {
        Answer {
            delay: Duration::ZERO,
            http: 200,
            body: Body::Hang,
        }
    }
    pub fn after(mut self, ms: u64) -> Answer {
        self.delay = Duration::from_millis(ms);
        self
    }
    pub fn http(mut self, code: u16) -> Answer {
        self.http = code;
        self
    }
    fn signed_mut(
        &mut self,
    ) -> (
        &mut Option<String>,
        &mut bool,
        &mut Option<KeyPair>,
        &mut Algorithm,
        &mut i64,
    ) {
        match &mut self.body {
            Body::Signed {
                request_id,
                json,
                key,
                alg,
                exp_offset,
                ..
            } => (request_id, json, key, alg, exp_offset),
            _ => panic!("not a signed answer"),
        }
    }
    pub fn raw(mut self) -> Answer {
        *self.signed_mut().1 = false;
        self
    }
    pub fn for_request(mut self, id: &str) -> Answer {
        *self.signed_mut().0 = Some(id.into());
        self
    }
    pub fn signed_by(mut self, key: &KeyPair) -> Answer {
        *self.signed_mut().2 = Some(key.clone());
        self
    }
    pub fn alg(mut self, alg: Algorithm) -> Answer {
        *self.signed_mut().3 = alg;
        self
    }
    pub fn expired(mut self) -> Answer {
        *self.signed_mut().4 = -60;
        self
    }
}

pub type Script = Arc<dyn Fn(&Seen) -> Answer + Send + Sync>;

pub fn always(answer: Answer) -> Script {
    Arc::new(move |_| answer.clone())
}

struct DsState {
    name: String,
    key: KeyPair,
    gateway: DecodingKey,
    script: Mutex<Script>,
    seen: Mutex<Vec<Seen>>,
    calls: AtomicUsize,
    unverified: AtomicUsize,
}

/// A downstream callback server on loopback.
#[derive(Clone)]
pub struct Downstream {
    pub name: String,
    pub addr: SocketAddr,
    pub key: KeyPair,
    state: Arc<DsState>,
    connections: Arc<AtomicUsize>,
    https: bool,
}

impl Downstream {
    /// Starts a server answering with `script`. The first `drop_connections` connections are
    /// closed without an answer (a transport failure for the caller).
    pub async fn start(
        name: &str,
        key: &KeyPair,
        script: Script,
        drop_connections: usize,
    ) -> Downstream {
        Downstream::start_with(name, key, script, drop_connections, None).await
    }

    /// As [`Downstream::start`], serving HTTPS through `tls` when given.
    pub async fn start_with(
        name: &str,
        key: &KeyPair,
        script: Script,
        drop_connections: usize,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Downstream {
        let state = Arc::new(DsState {
            name: name.into(),
            key: key.clone(),
            gateway: keys().gateway.decoding(),
            script: Mutex::new(script),
            seen: Mutex::new(Vec::new()),
            calls: AtomicUsize::new(0),
            unverified: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/v2/check", post(ds_check))
            .route("/v1/check", post(ds_check))
            .with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let https = tls.is_some();
        let connections = serve(listener, app, Versions::Http1, tls, drop_connections);
        Downstream {
            name: name.into(),
            addr,
            key: key.clone(),
            state,
            connections,
            https,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}/v2/check", self.addr)
    }
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
    /// Requests whose gateway token did not verify.
    pub fn unverified(&self) -> usize {
        self.state.unverified.load(Ordering::SeqCst)
    }
    pub fn set_script(&self, script: Script) {
        *self.state.script.lock().unwrap() = script;
    }
}

async fn ds_check(State(s): State<Arc<DsState>>, body: Bytes) -> Response {
    s.calls.fetch_add(1, Ordering::SeqCst);
    let inbound = form_token(&body);
    let data = match jsonwebtoken::decode::<Claims>(
        &inbound,
        &s.gateway,
        &Validation::new(Algorithm::RS256),
    ) {
        Ok(d) => d,
        Err(e) => {
            s.unverified.fetch_add(1, Ordering::SeqCst);
            let resp = CallbackResponse {
                request_id: String::new(),
                status: 20,
                action: "REJECT".into(),
                error: e.to_string(),
            };
            let t = token(
                &s.key.encoding(),
                &serde_json::to_vec(&resp).unwrap(),
                &s.name,
            );
            return (StatusCode::BAD_REQUEST, t).into_response();
        }
    };
    let payload = B64.decode(&data.claims.package_data).unwrap();
    let req: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    let seen = Seen {
        request_id: req["request_id"].as_str().unwrap_or_default().into(),
        request_type: req["request_type"].as_i64().unwrap_or(-1),
        payload,
        iss: data.claims.iss.clone(),
    };
    {
        // Bounded, so long soaks measure the gateway's memory rather than this record's.
        let mut record = s.seen.lock().unwrap();
        if record.len() >= 1000 {
            record.drain(..500);
        }
        record.push(seen.clone());
    }
    let script = s.script.lock().unwrap().clone();
    let answer = script(&seen);
    tokio::time::sleep(answer.delay).await;
    let status = StatusCode::from_u16(answer.http).unwrap();
    match answer.body {
        Body::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        Body::Bytes(b) => (status, b).into_response(),
        Body::Signed {
            status: st,
            action,
            error,
            request_id,
            json,
            key,
            alg,
            exp_offset,
        } => {
            let resp = CallbackResponse {
                request_id: request_id.unwrap_or(seen.request_id),
                status: st,
                action,
                error,
            };
            let payload = serde_json::to_vec(&resp).unwrap();
            let enc = match alg {
                Algorithm::HS256 => EncodingKey::from_secret(&s.key.public_pem()),
                _ => key.as_ref().unwrap_or(&s.key).encoding(),
            };
            let exp = (now() as i64 + exp_offset) as u64;
            let t = token_with(&enc, alg, &payload, &s.name, exp);
            if json {
                (
                    status,
                    [("content-type", "application/json")],
                    format!("\"{t}\""),
                )
                    .into_response()
            } else {
                (status, t).into_response()
            }
        }
    }
}

// === connections ===

/// The HTTP versions a test server speaks.
#[derive(Clone, Copy, Debug)]
pub enum Versions {
    /// HTTP/1.1 only, as the contract's callback templates do.
    Http1,
    /// HTTP/1.1 and HTTP/2: by ALPN over TLS, by prior knowledge (h2c) over plain TCP.
    Http1And2,
}

/// Any stream a connection is served over: plain TCP or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Serves `app` on `listener` for as long as the test's runtime runs, over TLS through `tls` when
/// given. The first `drop_connections` connections are closed without an answer (a transport
/// failure for the caller). Returns the count of connections accepted.
pub fn serve(
    listener: TcpListener,
    app: Router,
    versions: Versions,
    tls: Option<tokio_rustls::TlsAcceptor>,
    drop_connections: usize,
) -> Arc<AtomicUsize> {
    let connections = Arc::new(AtomicUsize::new(0));
    let accepted = connections.clone();
    tokio::spawn(async move {
        let service = TowerToHyperService::new(app);
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            if accepted.fetch_add(1, Ordering::SeqCst) < drop_connections {
                drop(stream);
                continue;
            }
            let (service, tls) = (service.clone(), tls.clone());
            tokio::spawn(async move {
                let stream: Box<dyn Io> = match tls {
                    None => Box::new(stream),
                    Some(acceptor) => match acceptor.accept(stream).await {
                        Ok(stream) => Box::new(stream),
                        Err(_) => return,
                    },
                };
                let io = TokioIo::new(stream);
                match versions {
                    Versions::Http1 => {
                        let http = hyper::server::conn::http1::Builder::new();
                        let _ = http.serve_connection(io, service).await;
                    }
                    Versions::Http1And2 => {
                        let http =
                            hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                        let _ = http.serve_connection(io, service).await;
                    }
                }
            });
        }
    });
    connections
}
