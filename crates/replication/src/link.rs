//! A link: one websocket with a peer, running one `Session` until the connection ends.
//!
//! The link moves frames between the socket and the session, runs each session step on a
//! blocking thread (sync work reads and writes the store), sends what accepting a frame produced
//! before applying it (so the peer prepares its next reply meanwhile), wakes the session when the local
//! feed grows, pings the peer, and ends the connection when nothing (not even a pong) has
//! arrived for the idle timeout. Any error closes the socket, telling the peer why in the close
//! frame; the session and its sync states die with it. Who dials whom, and reconnecting, is
//! `registry`'s business.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use store::Store;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::frame::Frame;
use crate::session::Session;
use crate::status::PeerState;

/// The largest frame accepted from a peer. A batch reply carries whole entities' changes, so
/// this is generous; it still stops a peer from making this site buffer without bound.
pub(crate) const MAX_FRAME_BYTES: usize = 256 * 1024 * 1024;

/// How long a close frame may take to go out before the socket is dropped anyway.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The websocket settings of every link, dialed or accepted.
pub(crate) fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES))
}

/// Counts a link as up for as long as it lives.
struct LinkUp<'a>(&'a PeerState);

impl<'a> LinkUp<'a> {
    fn new(peer: &'a PeerState) -> Self {
        peer.link_up();
        Self(peer)
    }
}

impl Drop for LinkUp<'_> {
    fn drop(&mut self) {
        self.0.link_down();
    }
}

/// Runs `session` over `socket` until `shutdown` (then `Ok`) or an error.
///
/// # Errors
/// Whatever ended the link: the peer's frames, the store, the socket, or silence.
pub(crate) async fn run<S>(
    socket: WebSocketStream<S>,
    session: Session,
    store: &Store,
    peer: &PeerState,
    idle_timeout: Duration,
    shutdown: &CancellationToken,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let _up = LinkUp::new(peer);
    let (mut sink, mut stream) = socket.split();
    let outcome = drive(
        &mut sink,
        &mut stream,
        session,
        store,
        peer,
        idle_timeout,
        shutdown,
    )
    .await;
    // Tell the peer why, so its status shows the reason too; never wait long for a dead socket.
    let close = match &outcome {
        Ok(()) => CloseFrame {
            code: CloseCode::Away,
            reason: "shutting down".into(),
        },
        Err(error) => CloseFrame {
            code: match error {
                Error::Malformed(_) | Error::Protocol(_) | Error::Rejected { .. } => {
                    CloseCode::Protocol
                }
                _ => CloseCode::Error,
            },
            reason: close_reason(&error.to_string()).into(),
        },
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, sink.send(Message::Close(Some(close)))).await;
    outcome
}

/// A close reason fits in 123 bytes; cut it at a character boundary.
fn close_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

async fn drive<S>(
    sink: &mut futures::stream::SplitSink<WebSocketStream<S>, Message>,
    stream: &mut futures::stream::SplitStream<WebSocketStream<S>>,
    session: Session,
    store: &Store,
    peer: &PeerState,
    idle_timeout: Duration,
    shutdown: &CancellationToken,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    send(
        sink,
        Message::binary(session.hello().encode()),
        idle_timeout,
    )
    .await?;
    let mut session = Some(session);
    let mut feed = store.subscribe();
    let mut reported = session.as_ref().map(Session::progress).unwrap_or_default();
    let mut silent_until = Instant::now() + idle_timeout;
    let mut ping = tokio::time::interval(idle_timeout / 3);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Biased: what the peer sent is read before the idle deadline is judged, so a long step
        // of our own never makes a waiting message look like silence.
        let outputs = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            message = stream.next() => {
                silent_until = Instant::now() + idle_timeout;
                match message {
                    None => return Err(Error::Closed(String::new())),
                    Some(Err(error)) => return Err(error.into()),
                    Some(Ok(Message::Binary(bytes))) => {
                        let frame = Frame::decode(&bytes)?;
                        step(&mut session, move |session| session.accept(frame)).await?
                    }
                    Some(Ok(Message::Close(frame))) => {
                        return Err(Error::Closed(
                            frame.map(|frame| frame.reason.to_string()).unwrap_or_default(),
                        ))
                    }
                    Some(Ok(Message::Text(_))) => {
                        return Err(Error::Malformed("a text message".into()))
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                }
            }
            changed = feed.changed() => {
                if changed.is_err() {
                    return Err(Error::from(store::Error::Closed));
                }
                step(&mut session, Session::poll_feed).await?
            }
            _ = ping.tick() => {
                send(sink, Message::Ping(Vec::new().into()), idle_timeout).await?;
                continue;
            }
            () = tokio::time::sleep_until(silent_until) => return Err(Error::Idle(idle_timeout)),
        };
        for frame in outputs {
            send(sink, Message::binary(frame.encode()), idle_timeout).await?;
        }
        // Replies are applied after what accepting them produced has gone out: the peer works
        // on the next batch meanwhile.
        while session.as_ref().is_some_and(Session::has_work) {
            for frame in step(&mut session, Session::work).await? {
                send(sink, Message::binary(frame.encode()), idle_timeout).await?;
            }
        }
        if let Some(session) = &session {
            let progress = session.progress();
            peer.record(&progress, &reported, session.is_idle());
            reported = progress;
        }
    }
}

/// Sends one message, giving up after `timeout` (a peer that stopped reading).
async fn send<S>(
    sink: &mut futures::stream::SplitSink<WebSocketStream<S>, Message>,
    message: Message,
    timeout: Duration,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    match tokio::time::timeout(timeout, sink.send(message)).await {
        Ok(sent) => sent.map_err(Error::from),
        Err(_) => Err(Error::Idle(timeout)),
    }
}

/// Runs one session step on a blocking thread: sync work reads and writes the store.
async fn step<F>(session: &mut Option<Session>, work: F) -> Result<Vec<Frame>>
where
    F: FnOnce(&mut Session) -> Result<Vec<Frame>> + Send + 'static,
{
    let mut taken = session
        .take()
        .expect("a session is only missing after a step failed, which ends the link");
    let (taken, outcome) = tokio::task::spawn_blocking(move || {
        let outcome = work(&mut taken);
        (taken, outcome)
    })
    .await
    .map_err(Error::Task)?;
    *session = Some(taken);
    outcome
}

/// The `Sec-WebSocket-Accept` value that answers a client's `Sec-WebSocket-Key`, for the
/// server's side of the upgrade.
pub fn accept_key(client_key: &[u8]) -> String {
    tokio_tungstenite::tungstenite::handshake::derive_accept_key(client_key)
}
