//! A link: one websocket with a peer, running one `Session` until the connection ends.
//!
//! The link moves frames between the socket and the session, runs each session step on a
//! blocking thread (sync work reads and writes the store), sends what accepting a frame produced
//! before applying it (so the peer prepares its next reply meanwhile), reads what the peer sends
//! while it sends (so two sides sending big frames at once never wait for each other), wakes the
//! session when the local feed grows, pings the peer, and ends the connection when nothing (not
//! even a pong) has arrived for the idle timeout. Any error closes the socket, telling the peer
//! why in the close frame; the session and its sync states die with it. Who dials whom, and
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

/// A bound on what [`send`] reads into the inbox: it reads on while both are below.
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
/// socket, or silence. How it ended is in `peer`'s status before the close frame goes out.
pub(crate) async fn run<S>(
    socket: WebSocketStream<S>,
    session: Session,
    store: &Store,
    peer: &PeerState,
    idle_timeout: Duration,
    shutdown: &CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let up = LinkUp::new(peer);
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
    let _ = tokio::time::timeout(CLOSE_GRACE, sink.send(Message::Close(Some(close)))).await;
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
    sink: &mut Sink<S>,
    stream: &mut Stream<S>,
    session: Session,
    store: &Store,
    peer: &PeerState,
    idle_timeout: Duration,
    shutdown: &CancellationToken,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut inbox = Inbox::new();
    let hello = vec![session.hello()];
    send_frames(sink, stream, &mut inbox, hello, idle_timeout).await?;
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
            message = next_message(&mut inbox, stream) => {
                silent_until = Instant::now() + idle_timeout;
                match message {
                    None => return Err(Error::Closed(String::new())),
                    Some(Err(error)) => return Err(error.into()),
                    Some(Ok(Message::Binary(bytes))) => {
                        let frame = Frame::decode(&bytes)?;
                        step(&mut session, move |session| session.accept(frame)).await?
                    }
                    // A peer going away (it shuts down) says so with this code; that ends
                    // the link, but is no error of it.
                    Some(Ok(Message::Close(Some(frame)))) if frame.code == CloseCode::Away => {
                        return Err(Error::PeerShutDown)
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
                let ping = Message::Ping(Vec::new().into());
                send(sink, stream, &mut inbox, ping, idle_timeout).await?;
                continue;
            }
            () = tokio::time::sleep_until(silent_until) => return Err(Error::Idle(idle_timeout)),
        };
        send_frames(sink, stream, &mut inbox, outputs, idle_timeout).await?;
        // Replies are applied after what accepting them produced has gone out: the peer works
        // on the next batch meanwhile.
        while session.as_ref().is_some_and(Session::has_work) {
            let outputs = step(&mut session, Session::work).await?;
            send_frames(sink, stream, &mut inbox, outputs, idle_timeout).await?;
        }
        if let Some(session) = &session {
            let progress = session.progress();
            peer.record(&progress, &reported, session.is_idle());
            reported = progress;
        }
    }
}

/// The next message from the peer: one read while sending first, then the socket.
async fn next_message<S>(
    inbox: &mut Inbox,
    stream: &mut Stream<S>,
) -> Option<std::result::Result<Message, tungstenite::Error>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    match inbox.pop_front() {
        Some(message) => message,
        None => stream.next().await,
    }
}

/// Sends `frames` in order, each as one binary message (see [`send`]).
async fn send_frames<S>(
    sink: &mut Sink<S>,
    stream: &mut Stream<S>,
    inbox: &mut Inbox,
    frames: Vec<Frame>,
    timeout: Duration,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    for frame in frames {
        send(
            sink,
            stream,
            inbox,
            Message::binary(frame.encode()),
            timeout,
        )
        .await?;
    }
    Ok(())
}

/// Sends one message, giving up after `timeout` (a peer that stopped reading).
///
/// While the message goes out, what the peer sends is read into `inbox` (up to
/// [`INBOX_LIMIT`]): both sides send big frames at times, and two sides that only sent would
/// each wait for the other to read once their socket buffers were full.
async fn send<S>(
    sink: &mut Sink<S>,
    stream: &mut Stream<S>,
    inbox: &mut Inbox,
    message: Message,
    timeout: Duration,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    send_within(sink, stream, inbox, message, timeout, INBOX_LIMIT).await
}

/// [`send`], reading at most `limit` into the inbox.
async fn send_within<S>(
    sink: &mut Sink<S>,
    stream: &mut Stream<S>,
    inbox: &mut Inbox,
    message: Message,
    timeout: Duration,
    limit: InboxLimit,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let sending = sink.send(message);
    tokio::pin!(sending);
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    // Counted once, then as messages come in: the inbox may hold thousands.
    let mut bytes: usize = inbox.iter().map(inbox_bytes).sum();
    loop {
        let readable = limit.admits(inbox, bytes);
        tokio::select! {
            sent = &mut sending => return sent.map_err(Error::from),
            received = stream.next(), if readable => {
                bytes += inbox_bytes(&received);
                inbox.push_back(received);
            }
            () = &mut deadline => return Err(Error::Idle(timeout)),
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
mod tests {
    use tokio_tungstenite::tungstenite::protocol::Role;

    use super::*;

    /// Two ends of one websocket over an in-memory pipe with small buffers.
    async fn pair() -> (
        WebSocketStream<tokio::io::DuplexStream>,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(16 * 1024);
        let config = Some(websocket_config());
        (
            WebSocketStream::from_raw_socket(a, Role::Client, config).await,
            WebSocketStream::from_raw_socket(b, Role::Server, config).await,
        )
    }

    /// How many of three 64 KiB messages from a peer that never reads end up in the inbox
    /// while this side tries to send it 1 MiB, reading within `limit`.
    async fn read_while_stuck(limit: InboxLimit) -> usize {
        let (a, b) = pair().await;
        let (mut b_sink, _b_stream) = b.split();
        let peer = tokio::spawn(async move {
            for fill in 0..3 {
                b_sink.send(Message::binary(vec![fill; 64 * 1024])).await?;
            }
            Ok::<_, tungstenite::Error>(b_sink)
        });
        let (mut sink, mut stream) = a.split();
        let mut inbox = Inbox::new();
        let big = Message::binary(vec![9; 1024 * 1024]);
        let timeout = Duration::from_millis(500);
        let sent = send_within(&mut sink, &mut stream, &mut inbox, big, timeout, limit).await;
        assert!(matches!(sent, Err(Error::Idle(_))), "{sent:?}");
        peer.abort();
        inbox.len()
    }

    #[tokio::test]
    async fn reading_while_sending_stops_at_the_inbox_byte_bound() {
        let bytes = |bytes| InboxLimit {
            messages: 16,
            bytes,
        };
        assert_eq!(read_while_stuck(bytes(64 * 1024)).await, 1);
        assert_eq!(read_while_stuck(bytes(100 * 1024)).await, 2);
        assert_eq!(read_while_stuck(bytes(MAX_FRAME_BYTES)).await, 3);
    }

    #[tokio::test]
    async fn two_sides_sending_big_frames_at_once_both_get_through() {
        let (a, b) = pair().await;
        let big = |fill: u8| Message::binary(vec![fill; 4 * 1024 * 1024]);
        let side = |socket: WebSocketStream<tokio::io::DuplexStream>, message: Message| async move {
            let (mut sink, mut stream) = socket.split();
            let mut inbox = Inbox::new();
            send(
                &mut sink,
                &mut stream,
                &mut inbox,
                message,
                Duration::from_secs(10),
            )
            .await?;
            // What arrived while sending is handed out first, then the socket.
            let received = next_message(&mut inbox, &mut stream).await;
            Ok::<_, Error>(received.and_then(|message| message.ok()).map(|m| m.len()))
        };
        let (from_b, from_a) = tokio::join!(side(a, big(1)), side(b, big(2)));
        assert_eq!(from_b.expect("a sent"), Some(4 * 1024 * 1024));
        assert_eq!(from_a.expect("b sent"), Some(4 * 1024 * 1024));
    }

    /// Both sides answering a request at once, each in many reply frames: each takes in all the
    /// other sends while it sends (with the inbox's old bound of 16 messages, both stopped
    /// reading and waited for each other until the idle timeout).
    #[tokio::test]
    async fn two_sides_sending_many_frames_at_once_both_get_through() {
        const FRAMES: usize = 100;
        let (a, b) = pair().await;
        let side = |socket: WebSocketStream<tokio::io::DuplexStream>, fill: u8| async move {
            let (mut sink, mut stream) = socket.split();
            let mut inbox = Inbox::new();
            for _ in 0..FRAMES {
                let message = Message::binary(vec![fill; 64 * 1024]);
                send(
                    &mut sink,
                    &mut stream,
                    &mut inbox,
                    message,
                    Duration::from_secs(5),
                )
                .await?;
            }
            let mut received = 0;
            while received < FRAMES {
                match next_message(&mut inbox, &mut stream).await {
                    Some(Ok(Message::Binary(bytes))) if bytes.len() == 64 * 1024 => received += 1,
                    other => panic!("not a frame of the peer's: {other:?}"),
                }
            }
            Ok::<_, Error>(received)
        };
        let (from_b, from_a) = tokio::join!(side(a, 1), side(b, 2));
        assert_eq!(from_b.expect("a sent all"), FRAMES);
        assert_eq!(from_a.expect("b sent all"), FRAMES);
    }
}
