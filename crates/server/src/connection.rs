//! Accepting TCP connections and serving HTTP/1.1 on each, with a header-read timeout and
//! graceful shutdown.
//!
//! axum's own `serve` sets no header-read timeout, so a client that sends half a request head could
//! hold a connection forever. This loop serves each connection with hyper's HTTP/1 builder, whose
//! `header_read_timeout` (driven by a tokio timer) closes a connection that has not sent a complete
//! request head in time; it applies to every request on a keep-alive connection, so it also bounds
//! how long an idle connection stays open. HTTP/2 is not served.
//!
//! On shutdown the loop stops accepting, and each connection finishes the request in progress and
//! closes. A connection still busy when the grace period ends is dropped (`force`).

use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::Limits;

/// How long to pause accepting after an error such as running out of file descriptors,
/// so the loop does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `app` on connections from `listener` until `shutdown` is cancelled; connection tasks go
/// on `tasks` and end gracefully, or at once when `force` is cancelled.
pub(crate) async fn accept(
    listener: TcpListener,
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
        tasks.spawn(
            serve(
                stream,
                builder.clone(),
                app.clone(),
                shutdown.clone(),
                force.clone(),
            )
            .instrument(span),
        );
    }
    // Dropping the listener here closes the socket: new connections are refused from now on.
}

async fn serve(
    stream: TcpStream,
    builder: http1::Builder,
    app: Router,
    shutdown: CancellationToken,
    force: CancellationToken,
) {
    // Responses are small and latency matters more than packet count.
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(error = %error, "could not set TCP_NODELAY");
    }
    let connection = builder
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app))
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
