//! `run`: the listener, its connections, and the shutdown sequence.
//!
//! Shutdown guarantee: after SIGTERM or SIGINT no new connection is accepted, requests already
//! being decided finish (bounded by the latest of their deadlines, whatever generation set it,
//! plus a grace second), the audit log is synced,
//! and `run` returns `Ok` so the process exits 0.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use super::admission::Admission;
use super::conn::{Conn, ConnRef, Timed};
use super::routes;
use crate::config::ConfigError;
use crate::generation::Generation;
use crate::ops::metrics::{refused, Metrics};
use crate::Shared;

/// A kept-alive connection may sit idle this long between two requests (or `read_timeout_ms`,
/// if longer); on `admin_listen`, a client gets this long to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Why `run` could not start or ended badly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Open(#[from] crate::OpenError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// Loads the config at `path` and serves until SIGTERM/SIGINT. The listeners are bound before
/// the audit log is opened, so a start that fails (a busy port) leaves the log and its saved
/// head untouched.
pub async fn run(path: &Path) -> Result<(), ServeError> {
    let g = Generation::load(path, 1)?;
    raise_open_file_limit(&g);
    ignore_file_size_signal();
    crate::protocol::signing_pool::start();
    let listen = g.config.listen;
    let admin_listen = g.config.admin_listen;
    let summary = g.summary();
    let warnings = g.warnings.clone();
    let listener = bind(listen).map_err(|source| ServeError::Bind {
        addr: listen.to_string(),
        source,
    })?;
    let admin = match admin_listen {
        Some(addr) => Some(bind(addr).map_err(|source| ServeError::Bind {
            addr: addr.to_string(),
            source,
        })?),
        None => None,
    };
    let shared = Shared::open(g, Metrics::new()).await?;
    let local = listener.local_addr().ok();
    for line in summary.lines() {
        tracing::info!("{}", line.trim());
    }
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let local = local.map_or_else(|| listen.to_string(), |a| a.to_string());
    tracing::info!(listen = %local, version = env!("CARGO_PKG_VERSION"), "gateway listening");

    tokio::spawn(crate::ops::health::run(shared.clone()));
    tokio::spawn(crate::ops::reload::watch(shared.clone(), path.to_owned()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    if let Some(admin) = admin {
        let at = admin.local_addr().map_or_else(
            |_| admin_listen.map(|a| a.to_string()).unwrap_or_default(),
            |a| a.to_string(),
        );
        tracing::info!(admin_listen = %at, "admin endpoints listening");
        let mut stopped = stopped.clone();
        tokio::spawn(serve_admin(admin, shared.clone(), async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
    }
    let shutdown = async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    };
    serve(listener, shared.clone(), shutdown).await;

    if let Some(audit) = shared.audit.load_full() {
        // A signed checkpoint closes the file, so `audit verify` can tell it was not cut short;
        // waited for a couple of seconds at most, so a stalled disk cannot hold the exit.
        let closed = tokio::task::spawn_blocking(move || audit.close()).await;
        match closed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "audit log not closed at shutdown: no final checkpoint or saved head")
            }
            Err(e) => tracing::error!(error = %e, "audit log not closed at shutdown"),
        }
    }
    tracing::info!("gateway stopped");
    Ok(())
}

/// A write beyond `RLIMIT_FSIZE` then fails with `EFBIG` (and the record's request with status
/// 30) instead of killing the process with `SIGXFSZ`.
fn ignore_file_size_signal() {
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// Serves the operator's endpoints (`/metrics`, `/readyz`, `/healthz`, `/status`) on `admin_listen`, plain
/// HTTP, until `shutdown` resolves.
pub async fn serve_admin(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let service = TowerToHyperService::new(routes::admin_router(shared));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let (http, service) = (http.clone(), service.clone());
                tokio::spawn(async move {
                    let _ = http.serve_connection(TokioIo::new(stream), service).await;
                });
            }
            () = &mut shutdown => break,
        }
    }
}

/// The routes `listen` serves: the node's only when `admin_listen` is set, else all of them.
fn listen_router(shared: &Arc<Shared>) -> axum::Router {
    if shared.current.load().config.admin_listen.is_some() {
        routes::node_router(shared.clone())
    } else {
        routes::router(shared.clone())
    }
}

/// Connections the kernel may hold for `accept` (capped by `net.core.somaxconn`). A burst beyond
/// the backlog would wait for the client's SYN retransmit (1 s, then 3 s) before even getting its
/// HTTP 503; tokio's default is 1,024.
const LISTEN_BACKLOG: u32 = 8192;

/// Binds the listener with [`LISTEN_BACKLOG`].
fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and logs both. `listen` holds at most
/// `max_connections` connections, and each request in flight (or shadow call, up to its cap)
/// one outbound connection per server over HTTP/1.1: with the common soft limit of 1,024 and
/// five servers, descriptors would run out at about 170 requests.
fn raise_open_file_limit(g: &Generation) {
    use rlimit::Resource;
    let (soft, hard) = match rlimit::getrlimit(Resource::NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit (RLIMIT_NOFILE)");
            return;
        }
    };
    let raised = if soft < hard {
        match rlimit::setrlimit(Resource::NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit (RLIMIT_NOFILE)");
                soft
            }
        }
    } else {
        soft
    };
    tracing::info!(
        soft_before = soft,
        soft = raised,
        hard,
        "open-file limit (RLIMIT_NOFILE)"
    );
    // Inbound: at most `max_connections`. Outbound, per server: at most `max_in_flight` calls,
    // enforcing (one per request in flight) or shadow (capped, see outbound::fanout).
    let c = &g.config;
    let per_server: usize = g
        .downstreams
        .iter()
        .map(|d| match d.mode {
            crate::config::Mode::Shadow => crate::outbound::fanout::shadow_cap(d, c.max_in_flight),
            crate::config::Mode::Enforce => c.max_in_flight,
        })
        .sum();
    let needed = (c.max_connections() + per_server + 64) as u64;
    if raised < needed {
        tracing::warn!(
            limit = raised,
            needed,
            max_connections = c.max_connections(),
            max_in_flight = c.max_in_flight,
            "the open-file limit is below max_connections + max_in_flight x servers + 64 (shadow calls included): connections may fail under load"
        );
    }
}

/// Serves `listener` until `shutdown` resolves, then drains in-flight connections. With
/// `admin_listen` set, only the node's routes are served here; see [`serve_admin`].
///
/// At accept, before TLS or HTTP: a peer outside `allowed_clients` is closed, and so is any
/// connection beyond `max_connections` (each counted in `tss_gateway_connections_refused_total`).
/// A request whose headers and body take longer than `read_timeout_ms` from its first byte has
/// its connection closed (see [`super::conn`]).
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let service = TowerToHyperService::new(listen_router(&shared));
    let graceful = GracefulShutdown::new();
    let open = Admission::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let g = shared.current.load();
                if !g.config.allows(peer.ip()) {
                    shared.metrics.refuse_connection(refused::NOT_ALLOWED);
                    tracing::debug!(peer = %peer, "connection refused: not in allowed_clients");
                    continue;
                }
                let Some(permit) = open.try_admit(g.config.max_connections()) else {
                    shared.metrics.refuse_connection(refused::TOO_MANY_CONNECTIONS);
                    tracing::debug!(peer = %peer, "connection refused: max_connections open");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let read_timeout = Duration::from_millis(g.config.read_timeout_ms);
                let tls = g.tls.clone();
                drop(g);
                let (service, watcher, shared) = (service.clone(), graceful.watcher(), shared.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let conn = Conn::new(peer);
                    let result = match tls {
                        None => serve_connection(stream, &conn, service, watcher, read_timeout).await,
                        Some(acceptor) => {
                            let stream = match tokio::time::timeout(read_timeout, acceptor.0.accept(stream)).await {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    shared.metrics.refuse_connection(refused::READ_TIMEOUT);
                                    tracing::debug!(peer = %peer, "TLS handshake timed out");
                                    return;
                                }
                            };
                            serve_connection(stream, &conn, service, watcher, read_timeout).await
                        }
                    };
                    match result {
                        Served::Late => {
                            shared.metrics.refuse_connection(refused::READ_TIMEOUT);
                            tracing::debug!(peer = %peer, "connection closed: request not read within read_timeout_ms");
                        }
                        Served::Ended(Err(e)) => {
                            tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                        }
                        Served::Ended(Ok(())) => {}
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    // Requests in flight may run on an older generation with a longer deadline than the
    // current one; a request still being read will be decided under the current one.
    let now = tokio::time::Instant::now();
    let last = shared
        .admission
        .latest_deadline()
        .max(now + Duration::from_millis(shared.current.load().config.deadline_ms));
    let grace = last.saturating_duration_since(now) + Duration::from_secs(1);
    tracing::info!(
        grace_ms = grace.as_millis() as u64,
        "shutting down: finishing requests in flight"
    );
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!("requests still in flight after the grace period; closing them");
        }
    }
}

/// How one connection ended.
enum Served {
    /// Closed by hyper or the peer.
    Ended(Result<(), hyper::Error>),
    /// Closed by the watchdog: a request was not read within `read_timeout_ms`.
    Late,
}

/// Serves HTTP/1.1 on one accepted connection (plain or TLS) until it ends or a request is late.
/// Every request carries a [`ConnRef`], so the handler knows when it began and can say when its
/// body is read.
async fn serve_connection<S>(
    stream: S,
    conn: &Arc<Conn>,
    service: TowerToHyperService<axum::Router>,
    watcher: hyper_util::server::graceful::Watcher,
    read_timeout: Duration,
) -> Served
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    // Between two requests hyper's header timer bounds the idle time of a kept-alive
    // connection; the request itself is timed by the watchdog, from its first byte.
    http.timer(TokioTimer::new())
        .header_read_timeout(read_timeout.max(HEADER_READ_TIMEOUT))
        .keep_alive(true);
    let tagged = conn.clone();
    let per_request = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let mut req = req.map(|body| tagged.watch(body));
        req.extensions_mut().insert(ConnRef(tagged.clone()));
        hyper::service::Service::call(&service, req)
    });
    let io = TokioIo::new(Timed::new(stream, conn.clone()));
    let serving = watcher.watch(http.serve_connection(io, per_request));
    tokio::select! {
        result = serving => Served::Ended(result),
        () = conn.late(read_timeout) => Served::Late,
    }
}

/// Resolves on the first SIGTERM or SIGINT.
pub(crate) async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
