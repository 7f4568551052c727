//! A link: one websocket with a peer, running one `Session` until the connection ends.
//!
//! The link moves frames between the socket and the session, runs each session step on a
//! blocking thread (sync work reads and writes the store), sends what accepting a frame produced
//! before applying it (so the peer prepares its next reply meanwhile), reads what the peer sends
//! while it sends, up to a bound (so two sides sending big frames at once do not wait for each
//! other unless both send more than that), wakes the session when the local feed grows, pings
//! the peer, and ends the connection when no byte (not even of a pong) has arrived for the idle
//! timeout, or a send has moved none for as long (see `activity`: a frame larger than a slow
//! link carries in that time still crosses). Any error closes the socket, telling the peer why
//! in the close frame; the session and its sync states die with it. Who dials whom, and
//! reconnecting, is `registry`'s business.

use std::collections::VecDeque;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use store::Store;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use crate::activity::Activity;
use crate::error::{Error, Result};
use crate::frame::Frame;
use crate::session::Session;
use crate::status::PeerState;

/// The largest frame accepted from a peer. A batch reply carries whole entities' changes, so
/// this is generous; it still stops a peer from making this site buffer without bound.
pub(crate) const MAX_FRAME_BYTES: usize = 256 * 1024 * 1024;

/// How long a close frame may take to go out before the socket is dropped anyway.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How much is read from the peer while sending, before reading waits for it to be handled.
/// A peer answers one request in as many reply frames as its size needs (about 1 MiB each), and
/// both sides may be answering at once: each must take in what the other sends before it reads
/// again, or both would wait for ever (until both answers pass this bound). This bounds what is
/// taken, in bytes by the largest frame and in messages by more parts than an answer has under
/// that, so a peer's frames hold at most 256 MiB and one more frame of memory here.
const INBOX_LIMIT: InboxLimit = InboxLimit {
    messages: 4096,
    bytes: MAX_FRAME_BYTES,
};

/// A bound on what [`Wire::send`] reads into the inbox: it reads on while both are below.
#[derive(Clone, Copy)]
struct InboxLimit {
    messages: usize,
    bytes: usize,
}

impl InboxLimit {
    /// Whether another message may be read into `inbox`, which holds `bytes` of messages:
    /// nothing is read after the end of the stream or an error (the loop reports those), nor
    /// once the inbox is full.
    fn admits(self, inbox: &Inbox, bytes: usize) -> bool {
        inbox.len() < self.messages
            && bytes < self.bytes
            && !matches!(inbox.back(), Some(None | Some(Err(_))))
    }
}

/// The bytes of a message read into the inbox.
fn inbox_bytes(message: &Option<std::result::Result<Message, tungstenite::Error>>) -> usize {
    match message {
        Some(Ok(message)) => message.len(),
        _ => 0,
    }
}

/// What the socket gave while this side was sending, in order; `None` is the end of the stream.
type Inbox = VecDeque<Option<std::result::Result<Message, tungstenite::Error>>>;

type Sink<S> = futures::stream::SplitSink<WebSocketStream<S>, Message>;
type Stream<S> = futures::stream::SplitStream<WebSocketStream<S>>;

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

/// Runs `session` over `socket` until `shutdown` or an error: the peer's frames, the store, the
/// socket, or silence. `activity` is stamped by the connection under `socket` (see
/// [`Activity::watch`]). How it ended is in `peer`'s status before the close frame goes out.
pub(crate) async fn run<S>(
    socket: WebSocketStream<S>,
    activity: Activity,
    session: Session,
    store: &Store,
    peer: &PeerState,
    idle_timeout: Duration,
    shutdown: &CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let up = LinkUp::new(peer);
    let mut wire = Wire::new(socket, activity, idle_timeout);
    let outcome = drive(&mut wire, session, store, peer, shutdown).await;
    drop(up);
    peer.link_ended(&outcome);
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
    let close = wire.sink.send(Message::Close(Some(close)));
    let _ = tokio::time::timeout(CLOSE_GRACE, close).await;
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
    wire: &mut Wire<S>,
    session: Session,
    store: &Store,
    peer: &PeerState,
    shutdown: &CancellationToken,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    wire.send_frames(vec![session.hello()]).await?;
    let mut session = Some(session);
    let mut feed = store.subscribe();
    let mut reported = session.as_ref().map(Session::progress).unwrap_or_default();
    let mut silent_until = Instant::now() + wire.timeout;
    let mut ping = tokio::time::interval(wire.timeout / 3);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Biased: what the peer sent is read before the idle deadline is judged, so a long step
        // of our own never makes a waiting message look like silence.
        let outputs = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            message = wire.next_message() => match message {
                None => return Err(Error::Closed(String::new())),
                Some(Err(error)) => return Err(error.into()),
                Some(Ok(Message::Binary(bytes))) => {
                    let frame = Frame::decode(&bytes)?;
                    step(&mut session, move |session| session.accept(frame)).await?
                }
                // A peer going away (it shuts down) says so with this code; that ends the
                // link, but is no error of it.
                Some(Ok(Message::Close(Some(frame)))) if frame.code == CloseCode::Away => {
                    return Err(Error::PeerShutDown)
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(Error::Closed(
                        frame.map(|frame| frame.reason.to_string()).unwrap_or_default(),
                    ))
                }
                Some(Ok(Message::Text(_))) => return Err(Error::Malformed("a text message".into())),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            },
            changed = feed.changed() => {
                if changed.is_err() {
                    return Err(Error::from(store::Error::Closed));
                }
                step(&mut session, Session::poll_feed).await?
            }
            _ = ping.tick() => {
                wire.send(Message::Ping(Vec::new().into())).await?;
                continue;
            }
            // Silence is judged by bytes, not whole messages: a frame that takes longer than
            // the timeout to arrive keeps the link up while its bytes keep coming.
            () = tokio::time::sleep_until(silent_until) => {
                silent_until = wire.activity.last_read() + wire.timeout;
                if silent_until <= Instant::now() {
                    return Err(Error::Idle {
                        timeout: wire.timeout,
                        sending: false,
                    });
                }
                continue;
            }
        };
        wire.send_frames(outputs).await?;
        // Replies are applied after what accepting them produced has gone out: the peer works
        // on the next batch meanwhile.
        while session.as_ref().is_some_and(Session::has_work) {
            let outputs = step(&mut session, Session::work).await?;
            wire.send_frames(outputs).await?;
        }
        if let Some(session) = &session {
            let progress = session.progress();
            peer.record(&progress, &reported, session.is_idle());
            reported = progress;
        }
    }
}

/// One link's websocket, split in two, with what was read from it while sending and when bytes
/// last moved over it.
struct Wire<S> {
    sink: Sink<S>,
    stream: Stream<S>,
    inbox: Inbox,
    /// The bytes of the messages in `inbox`.
    inbox_bytes: usize,
    activity: Activity,
    /// How long the peer may send nothing, and a send may move nothing.
    timeout: Duration,
}

impl<S> Wire<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    fn new(socket: WebSocketStream<S>, activity: Activity, timeout: Duration) -> Self {
        let (sink, stream) = socket.split();
        Self {
            sink,
            stream,
            inbox: Inbox::new(),
            inbox_bytes: 0,
            activity,
            timeout,
        }
    }

    /// The next message from the peer: one read while sending first, then the socket.
    async fn next_message(&mut self) -> Option<std::result::Result<Message, tungstenite::Error>> {
        match self.inbox.pop_front() {
            Some(message) => {
                self.inbox_bytes -= inbox_bytes(&message);
                message
            }
            None => self.stream.next().await,
        }
    }

    /// Sends `frames` in order, each as one binary message (see [`Wire::send`]).
    async fn send_frames(&mut self, frames: Vec<Frame>) -> Result<()> {
        for frame in frames {
            self.send(Message::binary(frame.encode())).await?;
        }
        Ok(())
    }

    /// Sends one message, giving up once no byte of it has gone out for the timeout (a peer
    /// that stopped reading).
    ///
    /// While the message goes out, what the peer sends is read into the inbox (up to
    /// [`INBOX_LIMIT`]): both sides send big frames at times, and two sides that only sent
    /// would each wait for the other to read once their socket buffers were full.
    async fn send(&mut self, message: Message) -> Result<()> {
        self.send_within(message, INBOX_LIMIT).await
    }

    /// [`Wire::send`], reading at most `limit` into the inbox.
    async fn send_within(&mut self, message: Message, limit: InboxLimit) -> Result<()> {
        let sending = self.sink.send(message);
        tokio::pin!(sending);
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(deadline);
        loop {
            let readable = limit.admits(&self.inbox, self.inbox_bytes);
            tokio::select! {
                sent = &mut sending => return sent.map_err(Error::from),
                received = self.stream.next(), if readable => {
                    self.inbox_bytes += inbox_bytes(&received);
                    self.inbox.push_back(received);
                }
                () = &mut deadline => {
                    let stuck_until = self.activity.last_written() + self.timeout;
                    if stuck_until <= Instant::now() {
                        return Err(Error::Idle {
                            timeout: self.timeout,
                            sending: true,
                        });
                    }
                    deadline.as_mut().reset(stuck_until);
                }
            }
        }
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

#[cfg(test)]
mod tests;
