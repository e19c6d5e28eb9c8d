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

use crate::config::ConfigError;
use crate::metrics::Metrics;
use crate::runtime::Runtime;
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

/// Loads the config at `path` and serves until SIGTERM/SIGINT.
pub async fn run(path: &Path) -> Result<(), ServeError> {
    let rt = Runtime::load(path, 1)?;
    let listen = rt.config.listen;
    let summary = rt.summary();
    let shared = Shared::new(rt, Metrics::new()).map_err(ServeError::Audit)?;
    let listener = TcpListener::bind(&listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen.to_string(),
            source,
        })?;
    let local = listener.local_addr().ok();
    for line in summary.lines() {
        tracing::info!("{}", line.trim());
    }
    tracing::info!(listen = ?local, version = env!("CARGO_PKG_VERSION"), "gateway listening");

    tokio::spawn(crate::health::run(shared.clone()));
    tokio::spawn(crate::reload::watch(shared.clone(), path.to_owned()));
    serve(listener, shared.clone(), shutdown_signal()).await;

    if let Some(audit) = shared.audit.load_full() {
        // A signed checkpoint closes the file, so `audit verify` can tell it was not cut short.
        if let Err(e) = audit.close(&shared.runtime.load().signer) {
            tracing::error!(error = %e, "audit log checkpoint or sync failed at shutdown");
        }
    }
    tracing::info!("gateway stopped");
    Ok(())
}

/// Serves `listener` until `shutdown` resolves, then drains in-flight connections.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let service = TowerToHyperService::new(crate::server::router(shared.clone()));
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
                let tls = shared.runtime.load().tls.clone();
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
        Duration::from_millis(shared.runtime.load().config.deadline_ms) + Duration::from_secs(1);
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
pub async fn shutdown_signal() {
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
