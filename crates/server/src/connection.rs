//! Accepting TCP connections and serving HTTP/1.1 on each, with a header-read timeout and
//! graceful shutdown.
//!
//! axum's own `serve` sets no header-read timeout, so a client that sends half a request head could
//! hold a connection forever. This loop serves each connection with hyper's HTTP/1 builder, whose
//! `header_read_timeout` (driven by a tokio timer) closes a connection that has not sent a complete
//! request head in time; it applies to every request on a keep-alive connection, so it also bounds
//! how long an idle connection stays open. HTTP/2 is not served.
//!
//! With `[tls]` set, each connection first does its TLS handshake, which must also finish within
//! the header-read timeout, and HTTP is served over it; a connection whose handshake fails is
//! closed (a plain-HTTP client gets no answer it could read).
//!
//! hyper answers a request head it cannot parse itself, with an empty body; [`JsonParseErrors`]
//! gives that answer our JSON body.
//!
//! On shutdown the loop stops accepting, and each connection finishes the request in progress and
//! closes. A connection still busy when the grace period ends is dropped (`force`).
//!
//! Nor does hyper bound how long a response may wait for a client that stopped reading (a change
//! feed stream whose client went quiet would hold its connection, and the kernel's buffers, for
//! ever): [`WriteTimeout`] fails a write that has made no progress for `limits.write_timeout`,
//! which ends the connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::Limits;
use crate::parse_errors::JsonParseErrors;
use crate::tls::Acceptor;

/// How long to pause accepting after an error such as running out of file descriptors,
/// so the loop does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `app` on connections from `listener` until `shutdown` is cancelled; connection tasks go
/// on `tasks` and end gracefully, or at once when `force` is cancelled.
pub(crate) async fn accept(
    listener: TcpListener,
    tls: Option<Acceptor>,
    app: Router,
    limits: &Limits,
    shutdown: &CancellationToken,
    force: &CancellationToken,
    tasks: &TaskTracker,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                if !is_per_connection(&error) {
                    tracing::warn!(error = %error, "accepting a connection failed; pausing");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                }
                continue;
            }
        };
        let span = tracing::debug_span!("connection", %peer);
        // Responses are small and latency matters more than packet count.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(error = %error, "could not set TCP_NODELAY");
        }
        let stream = WriteTimeout::new(stream, limits.write_timeout);
        let (builder, app, shutdown, force) = (
            builder.clone(),
            app.clone(),
            shutdown.clone(),
            force.clone(),
        );
        match &tls {
            None => tasks.spawn(serve(stream, builder, app, shutdown, force).instrument(span)),
            Some(tls) => {
                let (tls, handshake_timeout) = (tls.tls.clone(), limits.header_read_timeout);
                tasks.spawn(
                    async move {
                        let handshake = tokio::time::timeout(handshake_timeout, tls.accept(stream));
                        let stream = tokio::select! {
                            () = shutdown.cancelled() => return,
                            handshake = handshake => match handshake {
                                Ok(Ok(stream)) => stream,
                                Ok(Err(error)) => {
                                    tracing::debug!(error = %error, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!("TLS handshake timed out");
                                    return;
                                }
                            },
                        };
                        serve(stream, builder, app, shutdown, force).await;
                    }
                    .instrument(span),
                )
            }
        };
    }
    // Dropping the listener here closes the socket: new connections are refused from now on.
}

async fn serve<S>(
    stream: S,
    builder: http1::Builder,
    app: Router,
    shutdown: CancellationToken,
    force: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connection = builder
        .serve_connection(
            TokioIo::new(JsonParseErrors::new(stream)),
            TowerToHyperService::new(app),
        )
        .with_upgrades();
    tokio::pin!(connection);
    let outcome = tokio::select! {
        outcome = connection.as_mut() => outcome,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                outcome = connection.as_mut() => outcome,
                () = force.cancelled() => {
                    tracing::debug!("dropping a connection still busy after the grace period");
                    return;
                }
            }
        }
    };
    if let Err(error) = outcome {
        // Clients that go away, and slow clients cut off by the header-read timeout, end up here.
        tracing::debug!(error = %error, "connection ended with an error");
    }
}

/// Whether an accept error concerns only the one connection (which is then simply skipped).
fn is_per_connection(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// A connection's byte stream whose writes fail once they have made no progress for `timeout`:
/// a write (or flush) that the client's side cannot take starts a timer, any progress stops it,
/// and when it runs out the pending write fails with `TimedOut`, which ends the connection. The
/// timer's wake-up makes hyper try the write again, so the failure is noticed even when nothing
/// else happens on the connection.
pub(crate) struct WriteTimeout<S> {
    inner: S,
    timeout: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> WriteTimeout<S> {
    pub(crate) fn new(inner: S, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            stalled: None,
        }
    }

    /// Passes on what a write or flush of the inner stream gave, timing how long it has been
    /// pending.
    fn watch<T>(
        &mut self,
        polled: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the other end took nothing of what was sent for {timeout:?}"),
            ))),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteTimeout<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(polled, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(polled, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.watch(polled, cx)
    }
}
