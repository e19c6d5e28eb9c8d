//! `run`: the listener, its connections, and the shutdown sequence.
//!
//! Shutdown guarantee: after SIGTERM or SIGINT no new connection is accepted, requests already
//! being decided finish (bounded by `deadline_ms` plus a grace second), the audit log is synced,
//! and `run` returns `Ok` so the process exits 0.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use super::routes;
use crate::config::ConfigError;
use crate::generation::Generation;
use crate::ops::metrics::Metrics;
use crate::Shared;

/// A client gets this long to send its request headers; slow-header clients are cut off.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Why `run` could not start or ended badly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("audit log: {0}")]
    Audit(std::io::Error),
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
    let shared = Shared::new(g, Metrics::new()).map_err(ServeError::Audit)?;
    let local = listener.local_addr().ok();
    for line in summary.lines() {
        tracing::info!("{}", line.trim());
    }
    for w in &warnings {
        tracing::warn!("{w}");
    }
    tracing::info!(listen = ?local, version = env!("CARGO_PKG_VERSION"), "gateway listening");

    tokio::spawn(crate::ops::health::run(shared.clone()));
    tokio::spawn(crate::ops::reload::watch(shared.clone(), path.to_owned()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    if let Some(admin) = admin {
        tracing::info!(admin_listen = ?admin.local_addr().ok(), "admin endpoints listening");
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

/// Serves the operator's endpoints (`/metrics`, `/readyz`, `/healthz`) on `admin_listen`, plain
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

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and logs both. Each request in flight holds
/// its inbound connection and, over HTTP/1.1, one outbound connection per server: with the
/// common soft limit of 1,024 and five servers, descriptors would run out at about 170.
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
    let needed = (g.config.max_in_flight * (1 + g.downstreams.len()) + 64) as u64;
    if raised < needed {
        tracing::warn!(
            limit = raised,
            needed,
            max_in_flight = g.config.max_in_flight,
            "the open-file limit is below max_in_flight x (1 + servers) + 64: connections may fail under load"
        );
    }
}

/// Serves `listener` until `shutdown` resolves, then drains in-flight connections. With
/// `admin_listen` set, only the node's routes are served here; see [`serve_admin`].
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let service = TowerToHyperService::new(listen_router(&shared));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
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
                let _ = stream.set_nodelay(true);
                let tls = shared.current.load().tls.clone();
                let (http, service, watcher) = (http.clone(), service.clone(), graceful.watcher());
                tokio::spawn(async move {
                    let result = match tls {
                        None => watcher.watch(http.serve_connection(TokioIo::new(stream), service)).await,
                        Some(acceptor) => {
                            let stream = match tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.0.accept(stream)).await {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(peer = %peer, "TLS handshake timed out");
                                    return;
                                }
                            };
                            watcher.watch(http.serve_connection(TokioIo::new(stream), service)).await
                        }
                    };
                    if let Err(e) = result {
                        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let grace =
        Duration::from_millis(shared.current.load().config.deadline_ms) + Duration::from_secs(1);
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
