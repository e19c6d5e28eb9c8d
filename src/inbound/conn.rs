//! One connection on `listen`: when its current request began, whether that request's body has
//! been read, and the watchdog that closes the connection when headers and body take longer than
//! `read_timeout_ms`.
//!
//! Guarantees: a request's clock starts at its first byte, so neither the idle time of a new
//! connection before its first request nor that of a kept-alive one between two requests counts
//! (hyper's idle timer bounds those, see the listener), nor does a `100 Continue` going out;
//! once the body has been read to its end by whatever route ([`Watched`]), or the handler has
//! given up on it ([`Conn::body_read`]), the request is no longer timed (deciding it is
//! bounded by `deadline_ms` instead); a connection whose request is late is closed unanswered,
//! which drops its handler and everything it holds.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The state of one connection, shared by its I/O, its watchdog and its handlers.
#[derive(Debug)]
pub(crate) struct Conn {
    /// The caller's address, for the log lines about its requests.
    pub(crate) peer: std::net::SocketAddr,
    opened: Instant,
    /// When the current request began, in nanoseconds after `opened`.
    began: AtomicU64,
    /// Counts requests begun, so the watchdog can tell one request from the next.
    requests: AtomicU64,
    /// A response was written: the next byte read begins a new request.
    between: AtomicBool,
    /// The handler has read the current request's body.
    read: AtomicBool,
    /// Wakes the watchdog when a request begins.
    began_one: Notify,
}

/// A request's handle on its connection, as a request extension.
#[derive(Debug, Clone)]
pub(crate) struct ConnRef(pub(crate) Arc<Conn>);

/// A request's body, telling [`Conn`] when it has been read to its end, whichever route reads
/// it: only the reading of a request is timed. (Dropped unread, it says nothing: a handler that
/// gives up on a body says so itself, and one that gave up because the body was late leaves
/// the connection to the watchdog.)
pub(crate) struct Watched<B> {
    inner: B,
    conn: Arc<Conn>,
    /// The request this body belongs to (see [`Conn::requests`]).
    request: u64,
}

/// The connection's stream, telling [`Conn`] when a request begins (its first byte after a
/// response) and when a response is written.
pub(crate) struct Timed<S> {
    inner: S,
    conn: Arc<Conn>,
}

// === impl Conn ===

impl Conn {
    /// A connection just accepted: idle until its first byte.
    pub(crate) fn new(peer: std::net::SocketAddr) -> Arc<Conn> {
        Arc::new(Conn {
            peer,
            opened: Instant::now(),
            began: AtomicU64::new(0),
            requests: AtomicU64::new(1),
            between: AtomicBool::new(true),
            read: AtomicBool::new(false),
            began_one: Notify::new(),
        })
    }

    /// When the current request began: its first byte.
    pub(crate) fn request_began(&self) -> Instant {
        self.opened + Duration::from_nanos(self.began.load(Ordering::Acquire))
    }

    /// The handler has the whole body (or gave up on it): the request is no longer timed.
    pub(crate) fn body_read(&self) {
        self.read.store(true, Ordering::Release);
    }

    /// Wraps the body of the request being read now.
    pub(crate) fn watch<B: hyper::body::Body>(self: &Arc<Self>, body: B) -> Watched<B> {
        if body.is_end_stream() {
            self.body_read();
        }
        Watched {
            inner: body,
            conn: self.clone(),
            request: self.requests.load(Ordering::Acquire),
        }
    }

    /// Whether bytes of a request are awaited: it began and its body is not read yet.
    fn awaiting(&self) -> bool {
        !self.between.load(Ordering::Acquire) && !self.read.load(Ordering::Acquire)
    }

    fn begin_request(&self) {
        let nanos = self.opened.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.began.store(nanos, Ordering::Release);
        self.read.store(false, Ordering::Release);
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.began_one.notify_one();
    }

    /// Resolves when a request's headers and body have taken longer than `limit` from its
    /// first byte; never while the connection is idle or a request is being decided.
    pub(crate) async fn late(&self, limit: Duration) {
        loop {
            let request = self.requests.load(Ordering::Acquire);
            if !self.awaiting() {
                // A stored wake-up (from `notify_one`) is not lost between the check and here.
                self.began_one.notified().await;
                continue;
            }
            tokio::time::sleep_until(self.request_began() + limit).await;
            if self.requests.load(Ordering::Acquire) == request && self.awaiting() {
                return;
            }
        }
    }
}

// === impl Watched ===

impl<B> Watched<B> {
    fn done(&self) {
        if self.conn.requests.load(Ordering::Acquire) == self.request {
            self.conn.body_read();
        }
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Watched<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.done();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

// === impl Timed ===

impl<S> Timed<S> {
    pub(crate) fn new(inner: S, conn: Arc<Conn>) -> Timed<S> {
        Timed { inner, conn }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Timed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(())))
            && buf.filled().len() > before
            && self.conn.between.swap(false, Ordering::AcqRel)
        {
            self.conn.begin_request();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Timed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) && !informational(buf) {
            self.conn.between.store(true, Ordering::Release);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) && !informational(first) {
            self.conn.between.store(true, Ordering::Release);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A `100 Continue` going out is not the response: the body it asks for is still timed.
fn informational(written: &[u8]) -> bool {
    written.starts_with(b"HTTP/1.1 1") || written.starts_with(b"HTTP/1.0 1")
}
