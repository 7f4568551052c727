//! Activity: when bytes last moved each way over a link's connection.
//!
//! A link judges its peer silent, and a send stuck, by how long ago bytes moved, not by how long
//! ago a whole frame did: one frame may be larger than a slow link carries in `idle_timeout`, and
//! it must still cross while its bytes keep coming. [`Watched`] sits on the connection under the
//! websocket (on a dialed link under TLS too, whose bytes are as good a sign of life; on an
//! accepted one over the server's TLS) and stamps [`Activity`] on every read or write that moves
//! a byte. What counts as silence is `link`'s business.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When bytes last came in and last went out over one connection; clones share it.
#[derive(Clone, Debug)]
pub(crate) struct Activity(Arc<Moments>);

#[derive(Debug)]
struct Moments {
    /// What the two stamps count from.
    start: Instant,
    /// When a read last brought bytes, as microseconds after `start`.
    read: AtomicU64,
    /// When a write last took bytes, as microseconds after `start`.
    written: AtomicU64,
}

impl Default for Activity {
    /// Activity that starts now, as though bytes had just moved both ways: a connection is
    /// given its whole timeout before its first byte.
    fn default() -> Self {
        Self(Arc::new(Moments {
            start: Instant::now(),
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
        }))
    }
}

impl Activity {
    /// `io`, stamping this activity as bytes move over it.
    pub(crate) fn watch<S>(&self, io: S) -> Watched<S> {
        Watched {
            io,
            activity: self.clone(),
        }
    }

    /// When a read last brought bytes (or when this activity began).
    pub(crate) fn last_read(&self) -> Instant {
        self.at(&self.0.read)
    }

    /// When a write last took bytes (or when this activity began).
    pub(crate) fn last_written(&self) -> Instant {
        self.at(&self.0.written)
    }

    fn at(&self, stamp: &AtomicU64) -> Instant {
        self.0.start + Duration::from_micros(stamp.load(Ordering::Relaxed))
    }

    fn stamp(&self, stamp: &AtomicU64) {
        // A link lives far less than the 584,000 years of microseconds a u64 holds.
        let since = u64::try_from(self.0.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        stamp.fetch_max(since, Ordering::Relaxed);
    }
}

/// A connection that stamps its [`Activity`] whenever bytes move over it.
#[derive(Debug)]
pub(crate) struct Watched<S> {
    io: S,
    activity: Activity,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(context, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.stamp(&self.activity.0.read);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(context, buf);
        self.stamp_written(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(context, bufs);
        self.stamp_written(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(context)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(context)
    }
}

impl<S> Watched<S> {
    fn stamp_written(&self, polled: &Poll<io::Result<usize>>) {
        if matches!(polled, Poll::Ready(Ok(written)) if *written > 0) {
            self.activity.stamp(&self.activity.0.written);
        }
    }
}

#[cfg(test)]
mod tests;
