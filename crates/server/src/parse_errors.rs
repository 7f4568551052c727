//! JSON bodies for the answers hyper writes itself, to requests it cannot parse.
//!
//! hyper answers a request head it cannot read before any of our code sees the request: 400 for
//! a request line or header that is not HTTP/1.1, 414 for a target longer than it reads (64 KiB),
//! 431 for a head larger than its buffer (about 400 KiB) or with more than 100 headers. That
//! answer has `content-length: 0` and no body, and the connection closes after it. Every bad
//! input gets a `{"code","detail"}` body, so [`JsonParseErrors`] sits between hyper and the
//! connection and rewrites exactly that answer into one with a JSON body.
//!
//! It knows the answer by its bytes: a write that is a whole response head of one of those three
//! statuses, with `content-length: 0` and no `content-type`. Every answer of ours to a request
//! that reached the router carries a JSON body and its type, so nothing of ours looks like that.
//! Anything else passes through untouched, and once the connection has switched protocols (a
//! `101` head: the replication websocket) every write does: its bytes are not HTTP any more.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::api_error::ApiError;
use crate::limits::MAX_URI_BYTES;

#[cfg(test)]
mod tests;

/// hyper writes its answer's head in one piece, a hundred bytes or so; a write longer than this
/// is not one.
const MAX_ANSWER_HEAD: usize = 1024;

/// How the head of a `101 Switching Protocols` answer starts: after it, the connection carries
/// another protocol (the replication websocket), which is never looked at.
const SWITCHING_PROTOCOLS: &[u8] = b"HTTP/1.1 101 ";

/// A connection's byte stream whose writes of hyper's own parse-error answers get a JSON body.
pub(crate) struct JsonParseErrors<S> {
    inner: S,
    /// An answer rewritten, and how much of it the connection has taken.
    rewritten: Option<(Vec<u8>, usize)>,
    /// Whether the connection switched protocols: nothing is looked at after that.
    upgraded: bool,
}

impl<S> JsonParseErrors<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self {
            inner,
            rewritten: None,
            upgraded: false,
        }
    }
}

/// Our error for hyper's answer with this status.
fn error_for(status: u16) -> Option<ApiError> {
    Some(match status {
        400 => ApiError::bad_request(
            "malformed_request",
            "the request line or a header is not valid HTTP/1.1, so the request was not read",
        ),
        414 => ApiError::UriTooLong {
            limit: MAX_URI_BYTES,
        },
        431 => ApiError::HeadTooLarge,
        _ => return None,
    })
}

/// `written` with a JSON body, when it is hyper's answer to a request it could not parse.
fn rewrite(written: &[u8]) -> Option<Vec<u8>> {
    // Most writes are answers of ours, with a body after their head: those are told apart by
    // their ends before anything is parsed.
    if written.len() > MAX_ANSWER_HEAD
        || !written.starts_with(b"HTTP/1.")
        || !written.ends_with(b"\r\n\r\n")
    {
        return None;
    }
    let head = std::str::from_utf8(written)
        .ok()?
        .strip_suffix("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let rest = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))?;
    let error = error_for(rest.get(..3)?.parse().ok()?)?;
    let mut kept = Vec::new();
    let mut empty = false;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        if name.eq_ignore_ascii_case("content-length") {
            if value.trim() != "0" {
                return None;
            }
            empty = true;
        } else if name.eq_ignore_ascii_case("content-type")
            || name.eq_ignore_ascii_case("transfer-encoding")
        {
            return None;
        } else {
            kept.push(line);
        }
    }
    if !empty {
        return None;
    }
    let body = error.client_body()?;
    let mut answer = format!(
        "{status_line}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for line in kept {
        answer.push_str(line);
        answer.push_str("\r\n");
    }
    answer.push_str("\r\n");
    answer.push_str(&body);
    Some(answer.into_bytes())
}

impl<S: AsyncWrite + Unpin> JsonParseErrors<S> {
    /// Writes what is left of a rewritten answer; ready once all of it is written.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((answer, written)) = &mut self.rewritten {
            if *written == answer.len() {
                self.rewritten = None;
                break;
            }
            let wrote = ready!(Pin::new(&mut self.inner).poll_write(cx, &answer[*written..]))?;
            if wrote == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += wrote;
        }
        Poll::Ready(Ok(()))
    }

    /// Takes `written` as a rewritten answer when it is one of hyper's: the whole of it counts as
    /// written, and the answer goes out now or at the flush hyper makes next. Notes a switch of
    /// protocols, after which nothing is taken.
    fn take_answer(&mut self, written: &[u8], cx: &mut Context<'_>) -> Option<io::Result<usize>> {
        if self.upgraded {
            return None;
        }
        if written.starts_with(SWITCHING_PROTOCOLS) {
            self.upgraded = true;
            return None;
        }
        let answer = rewrite(written)?;
        self.rewritten = Some((answer, 0));
        match self.drain(cx) {
            Poll::Ready(Err(error)) => Some(Err(error)),
            _ => Some(Ok(written.len())),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonParseErrors<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonParseErrors<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        if let Some(taken) = this.take_answer(buf, cx) {
            return Poll::Ready(taken);
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        // hyper's own answer is a head with nothing after it: one piece, looked at in place.
        let mut pieces = bufs.iter().filter(|buf| !buf.is_empty());
        if let Some(first) = pieces.next() {
            if pieces.next().is_none() {
                if let Some(taken) = this.take_answer(first, cx) {
                    return Poll::Ready(taken);
                }
            } else if first.starts_with(SWITCHING_PROTOCOLS) {
                this.upgraded = true;
            }
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}
