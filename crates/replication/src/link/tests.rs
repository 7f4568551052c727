//! Links over in-memory pipes: reading while sending, and timeouts judged by bytes moved.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use rand::{Rng, SeedableRng};
use serde_json::json;
use store::{EntityKey, Origin, Seq, StoreConfig, WriteOptions};
use tokio::io::{DuplexStream, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::Role;

use super::*;
use crate::activity::Watched;
use crate::session::SessionSettings;

/// Two ends of one websocket over an in-memory pipe with small buffers, each watched.
async fn pair() -> (Wired<DuplexStream>, Wired<DuplexStream>) {
    let (a, b) = tokio::io::duplex(16 * 1024);
    (wired(a, Role::Client).await, wired(b, Role::Server).await)
}

/// One end of a websocket, with the activity its connection stamps.
struct Wired<S> {
    socket: WebSocketStream<Watched<S>>,
    activity: Activity,
}

async fn wired<S>(io: S, role: Role) -> Wired<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let activity = Activity::default();
    let socket =
        WebSocketStream::from_raw_socket(activity.watch(io), role, Some(websocket_config())).await;
    Wired { socket, activity }
}

impl<S> Wired<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    fn wire(self, timeout: Duration) -> Wire<Watched<S>> {
        Wire::new(self.socket, self.activity, timeout)
    }
}

/// How many of three 64 KiB messages from a peer that never reads end up in the inbox while
/// this side tries to send it 1 MiB, reading within `limit`.
async fn read_while_stuck(limit: InboxLimit) -> usize {
    let (a, b) = pair().await;
    let (mut b_sink, _b_stream) = b.socket.split();
    let peer = tokio::spawn(async move {
        for fill in 0..3 {
            b_sink.send(Message::binary(vec![fill; 64 * 1024])).await?;
        }
        Ok::<_, tungstenite::Error>(b_sink)
    });
    let mut wire = a.wire(Duration::from_millis(500));
    let big = Message::binary(vec![9; 1024 * 1024]);
    let sent = wire.send_within(big, limit).await;
    assert!(
        matches!(sent, Err(Error::Idle { sending: true, .. })),
        "{sent:?}"
    );
    peer.abort();
    wire.inbox.len()
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
    let side = |wired: Wired<DuplexStream>, message: Message| async move {
        let mut wire = wired.wire(Duration::from_secs(10));
        wire.send(message).await?;
        // What arrived while sending is handed out first, then the socket.
        let received = wire.next_message().await;
        assert_eq!(
            wire.inbox_bytes, 0,
            "what was taken out is no longer counted"
        );
        Ok::<_, Error>(received.and_then(|message| message.ok()).map(|m| m.len()))
    };
    let (from_b, from_a) = tokio::join!(side(a, big(1)), side(b, big(2)));
    assert_eq!(from_b.expect("a sent"), Some(4 * 1024 * 1024));
    assert_eq!(from_a.expect("b sent"), Some(4 * 1024 * 1024));
}

/// Both sides answering a request at once, each in many reply frames: each takes in all the
/// other sends while it sends (with the inbox's old bound of 16 messages, both stopped reading
/// and waited for each other until the idle timeout).
#[tokio::test]
async fn two_sides_sending_many_frames_at_once_both_get_through() {
    const FRAMES: usize = 100;
    let (a, b) = pair().await;
    let side = |wired: Wired<DuplexStream>, fill: u8| async move {
        let mut wire = wired.wire(Duration::from_secs(5));
        for _ in 0..FRAMES {
            wire.send(Message::binary(vec![fill; 64 * 1024])).await?;
        }
        let mut received = 0;
        while received < FRAMES {
            match wire.next_message().await {
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

/// A connection that writes at most `chunk` bytes every `tick`: a slow network link.
struct Slow<S> {
    io: S,
    chunk: usize,
    tick: Duration,
    pause: Pin<Box<tokio::time::Sleep>>,
}

impl<S> Slow<S> {
    fn new(io: S, chunk: usize, tick: Duration) -> Self {
        Self {
            io,
            chunk,
            tick,
            pause: Box::pin(tokio::time::sleep(Duration::ZERO)),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Slow<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(context, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Slow<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        ready!(self.pause.as_mut().poll(context));
        let chunk = buf.len().min(self.chunk);
        let polled = Pin::new(&mut self.io).poll_write(context, &buf[..chunk]);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            let next = Instant::now() + self.tick;
            self.pause.as_mut().reset(next);
        }
        polled
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(context)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(context)
    }
}

/// Two ends of a websocket over a link that carries about 400 KB a second each way.
async fn slow_pair() -> (Wired<Slow<DuplexStream>>, Wired<Slow<DuplexStream>>) {
    slow_pair_of(Duration::from_millis(10)).await
}

/// Two ends of a websocket over a link that carries 4 KiB every `tick` each way.
async fn slow_pair_of(tick: Duration) -> (Wired<Slow<DuplexStream>>, Wired<Slow<DuplexStream>>) {
    let (a, b) = tokio::io::duplex(16 * 1024);
    let slow = |io| Slow::new(io, 4 * 1024, tick);
    (
        wired(slow(a), Role::Client).await,
        wired(slow(b), Role::Server).await,
    )
}

#[tokio::test(start_paused = true)]
async fn a_send_slower_than_the_timeout_goes_on_while_its_bytes_move_and_a_stuck_one_ends() {
    let (a, b) = slow_pair().await;
    let timeout = Duration::from_millis(200);
    let receiving = tokio::spawn(async move {
        let mut wire = b.wire(timeout);
        let message = wire.next_message().await;
        (
            wire,
            message.and_then(|message| message.ok()).map(|m| m.len()),
        )
    });
    let mut wire = a.wire(timeout);
    let started = Instant::now();
    wire.send(Message::binary(vec![7; 400 * 1024]))
        .await
        .expect("a send whose bytes keep moving is not stuck");
    let took = started.elapsed();
    assert!(
        took > 3 * timeout,
        "the pipe is slower than the timeout: {took:?}"
    );
    let (b, received) = receiving.await.expect("the receiver ran");
    assert_eq!(received, Some(400 * 1024));
    // Once the peer reads nothing more, a send fills the pipe and stops moving: it ends after
    // the timeout, not before.
    let started = Instant::now();
    let stuck = wire.send(Message::binary(vec![8; 400 * 1024])).await;
    assert!(
        matches!(stuck, Err(Error::Idle { sending: true, .. })),
        "{stuck:?}"
    );
    assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
    drop(b);
}

/// An entity whose document is larger than the link carries in the idle timeout: the link
/// stays up while the reply's bytes keep coming, and the entity arrives (with the idle timer
/// counting whole frames, the receiving side dropped the link in the middle of the reply, and
/// it never arrived).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_larger_than_the_link_carries_in_the_idle_timeout_still_crosses() {
    let open = || {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(StoreConfig::new(dir.path())).expect("a fresh store opens");
        (dir, store)
    };
    let ((_north_dir, north), (_south_dir, south)) = (open(), open());
    let key = EntityKey::new("permit", "large").expect("a valid key");
    // Random text, which no compression shrinks much.
    let mut random = rand::rngs::StdRng::seed_from_u64(7);
    let text: String = (0..600 * 1024)
        .map(|_| char::from(random.gen_range(b'!'..=b'~')))
        .collect();
    let options = WriteOptions::new(Origin::local("clerk").expect("a valid origin"));
    north
        .patch(&key, &json!({ "scan": text }), &options)
        .expect("the large write");
    let idle_timeout = Duration::from_secs(1);
    let shutdown = CancellationToken::new();
    // About 160 KB a second: the reply takes several idle timeouts to cross.
    let (a, b) = slow_pair_of(Duration::from_millis(25)).await;
    let link = |wired: Wired<Slow<DuplexStream>>, store: Store, peer: &'static str| {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let session = Session::open(store.clone(), peer, "here", SessionSettings::default())
                .expect("a session opens");
            let state = PeerState::new(peer, None, Seq::ZERO);
            run(
                wired.socket,
                wired.activity,
                session,
                &store,
                &state,
                idle_timeout,
                &shutdown,
            )
            .await;
            state.status(store.last_seq())
        })
    };
    let started = Instant::now();
    let north_link = link(a, north.clone(), "south");
    let south_link = link(b, south.clone(), "north");
    let arrived = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if south.get(&key).expect("a read").is_some() {
                return;
            }
            if south_link.is_finished() {
                panic!("the link ended before the entity arrived");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let took = started.elapsed();
    shutdown.cancel();
    let south_status = south_link.await.expect("the south link ran");
    north_link.await.expect("the north link ran");
    arrived.unwrap_or_else(|_| panic!("the entity never arrived: {south_status:?}"));
    assert!(
        took > 2 * idle_timeout,
        "the reply took longer than the idle timeout to cross: {took:?}"
    );
    assert_eq!(
        south
            .get(&key)
            .expect("a read")
            .map(|entity| entity.version),
        north
            .get(&key)
            .expect("a read")
            .map(|entity| entity.version),
    );
}

/// A peer that sends no byte at all (not even a pong) for the idle timeout ends the link, and
/// the peer's status says it was silent rather than that a send was stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_sends_nothing_for_the_idle_timeout_ends_the_link() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(StoreConfig::new(dir.path())).expect("a fresh store opens");
    let (a, silent) = pair().await;
    let session = Session::open(store.clone(), "south", "here", SessionSettings::default())
        .expect("a session opens");
    let state = PeerState::new("south", None, Seq::ZERO);
    let idle_timeout = Duration::from_millis(300);
    let started = Instant::now();
    let ran = tokio::time::timeout(
        Duration::from_secs(20),
        run(
            a.socket,
            a.activity,
            session,
            &store,
            &state,
            idle_timeout,
            &CancellationToken::new(),
        ),
    )
    .await;
    assert!(ran.is_ok(), "the link did not end");
    assert!(started.elapsed() >= idle_timeout, "{:?}", started.elapsed());
    let status = state.status(store.last_seq());
    assert_eq!(
        status.last_error.as_deref(),
        Some("no byte from the peer for 300ms"),
        "{status:?}"
    );
    // Held, never read nor written, until here.
    drop(silent);
}
