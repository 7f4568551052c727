//! What each peer's links report while they run, and the snapshot `GET /v1/peers` shows.
//!
//! Links write into a [`PeerState`] after every step; readers take a [`PeerStatus`] snapshot.
//! Counters only grow, for `/metrics`. How the numbers are rendered is `server`'s business.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;
use store::{now_ms, Seq};

use crate::error::{Error, Result};
use crate::session::Progress;

/// One peer's status, as `GET /v1/peers/{name}` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerStatus {
    /// The peer's name here (its changes are recorded as `peer:<name>`).
    pub name: String,
    /// The URL this site dials, when it dials the peer (`[[peers]]`); `None` when the peer only
    /// connects here (`[[replication.tokens]]`).
    pub url: Option<String>,
    /// Whether a link with the peer is up now.
    pub connected: bool,
    /// How many links are up (two when both sites dial each other).
    pub links: usize,
    /// The site name the peer gave in its hello.
    pub remote_site: Option<String>,
    /// When a frame last arrived from the peer, in Unix milliseconds.
    pub last_contact_at_ms: Option<u64>,
    /// How far this site has consumed the peer's feed (written to disk).
    pub cursor: Seq,
    /// The peer's last feed row, as it last said.
    pub their_head: Option<Seq>,
    /// Feed rows of the peer not yet consumed here (`their_head - cursor`), when known.
    pub behind_in: Option<u64>,
    /// How far the peer has consumed this site's feed, as it last said.
    pub their_cursor: Option<Seq>,
    /// This site's feed rows the peer has not consumed yet, when known.
    pub behind_out: Option<u64>,
    /// The last error on a link with the peer (cleared when a batch completes).
    pub last_error: Option<String>,
    /// When that error happened, in Unix milliseconds.
    pub last_error_at_ms: Option<u64>,
    /// Feed rows received from the peer since start.
    pub rows_received: u64,
    /// Entities brought up to date from the peer since start.
    pub entities_synced: u64,
    /// Since start, how often an entity's sync stalled and was started again or fell back to
    /// fetching the whole document. Rare when all is well: a count that keeps climbing points
    /// to a peer whose sync messages do not get its entities here.
    pub sync_fallbacks: u64,
    /// Links that ended with an error since start.
    pub errors: u64,
}

/// The live state of one peer, shared by its links and the status readers.
#[derive(Debug)]
pub struct PeerState {
    name: String,
    url: Option<String>,
    links: AtomicUsize,
    rows_received: AtomicU64,
    entities_synced: AtomicU64,
    sync_fallbacks: AtomicU64,
    errors: AtomicU64,
    // A std Mutex: held only to copy a few fields, never across an await.
    observed: Mutex<Observed>,
}

#[derive(Clone, Debug, Default)]
struct Observed {
    remote_site: Option<String>,
    last_contact_at_ms: Option<u64>,
    cursor: Seq,
    their_head: Option<Seq>,
    their_cursor: Option<Seq>,
    last_error: Option<String>,
    last_error_at_ms: Option<u64>,
}

impl PeerState {
    /// A peer that has not connected yet, whose feed is consumed up to `cursor`.
    pub(crate) fn new(name: &str, url: Option<String>, cursor: Seq) -> Self {
        Self {
            name: name.to_string(),
            url,
            links: AtomicUsize::new(0),
            rows_received: AtomicU64::new(0),
            entities_synced: AtomicU64::new(0),
            sync_fallbacks: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            observed: Mutex::new(Observed {
                cursor,
                ..Observed::default()
            }),
        }
    }

    fn observed(&self) -> std::sync::MutexGuard<'_, Observed> {
        // A poisoned lock only means a panic mid-update of plain fields; they are still usable.
        self.observed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The peer's name here.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn link_up(&self) {
        self.links.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn link_down(&self) {
        self.links.fetch_sub(1, Ordering::Relaxed);
    }

    /// Records a session's progress; `before` is what the same session reported last time, so
    /// the counters only add what is new.
    pub(crate) fn record(&self, progress: &Progress, before: &Progress, idle: bool) {
        self.rows_received.fetch_add(
            progress.rows_received - before.rows_received,
            Ordering::Relaxed,
        );
        self.entities_synced.fetch_add(
            progress.entities_synced - before.entities_synced,
            Ordering::Relaxed,
        );
        self.sync_fallbacks.fetch_add(
            progress.sync_fallbacks - before.sync_fallbacks,
            Ordering::Relaxed,
        );
        let mut observed = self.observed();
        observed.remote_site.clone_from(&progress.remote_site);
        observed.last_contact_at_ms = Some(now_ms());
        observed.cursor = progress.cursor;
        if progress.their_head.is_some() {
            observed.their_head = progress.their_head;
        }
        if progress.their_cursor.is_some() {
            observed.their_cursor = progress.their_cursor;
        }
        if idle && progress.cursor > before.cursor {
            // A batch went through: whatever failed before is over.
            observed.last_error = None;
            observed.last_error_at_ms = None;
        }
    }

    /// Logs how a link ended and, when it failed, records why.
    ///
    /// A link calls this before it sends its close frame, so a peer that reads the close reason
    /// and then asks for the status finds this link's error in it, not an earlier one.
    pub(crate) fn link_ended(&self, outcome: &Result<()>) {
        match outcome {
            Ok(()) => tracing::info!("replication link closed for shutdown"),
            Err(Error::PeerShutDown) => {
                tracing::info!("replication link closed by the peer, which is shutting down")
            }
            Err(error) => self.failed(error),
        }
    }

    /// Logs and records why a link ended or could not be set up.
    pub(crate) fn failed(&self, error: &Error) {
        let chain = cause_chain(error);
        tracing::warn!(error = %chain, "replication link failed");
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut observed = self.observed();
        observed.last_error = Some(chain);
        observed.last_error_at_ms = Some(now_ms());
    }

    /// A snapshot; `local_head` is this site's last feed row.
    pub fn status(&self, local_head: Seq) -> PeerStatus {
        let observed = self.observed().clone();
        let links = self.links.load(Ordering::Relaxed);
        PeerStatus {
            name: self.name.clone(),
            url: self.url.clone(),
            connected: links > 0,
            links,
            remote_site: observed.remote_site,
            last_contact_at_ms: observed.last_contact_at_ms,
            cursor: observed.cursor,
            their_head: observed.their_head,
            behind_in: observed
                .their_head
                .map(|head| head.0.saturating_sub(observed.cursor.0)),
            their_cursor: observed.their_cursor,
            behind_out: observed
                .their_cursor
                .map(|cursor| local_head.0.saturating_sub(cursor.0)),
            last_error: observed.last_error,
            last_error_at_ms: observed.last_error_at_ms,
            rows_received: self.rows_received.load(Ordering::Relaxed),
            entities_synced: self.entities_synced.load(Ordering::Relaxed),
            sync_fallbacks: self.sync_fallbacks.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

/// An error with every source after it: `a: b: c`.
///
/// A cause whose text the chain already holds is left out: tungstenite's errors, and the IO
/// errors rustls's come in, repeat their source's text in their own.
fn cause_chain(error: &Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    if let Some(hint) = scheme_hint(&text) {
        text.push_str(" (");
        text.push_str(hint);
        text.push(')');
    }
    text
}

/// What a failure says when the peer's url has the wrong scheme for what the peer serves.
fn scheme_hint(failure: &str) -> Option<&'static str> {
    if failure.contains("InvalidContentType") {
        Some("the peer does not answer in TLS: if it serves plain HTTP, use an http:// url")
    } else if failure.contains("invalid HTTP version") {
        Some("the peer does not answer in HTTP: if it serves HTTPS, use an https:// url")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_that_ends_for_a_shutdown_counts_no_error_and_one_that_fails_shows_why() {
        let peer = PeerState::new("south", None, Seq::ZERO);
        peer.link_ended(&Ok(()));
        peer.link_ended(&Err(Error::PeerShutDown));
        let status = peer.status(Seq::ZERO);
        assert_eq!((status.errors, status.last_error), (0, None));

        peer.link_ended(&Err(Error::Malformed("unknown frame tag 255".into())));
        peer.failed(&Error::Store(Box::new(store::Error::Closed)));
        let status = peer.status(Seq::ZERO);
        assert_eq!(status.errors, 2);
        // The latest failure, with its source after it.
        assert_eq!(
            status.last_error.as_deref(),
            Some(format!("the local store failed: {}", store::Error::Closed).as_str())
        );
        assert!(status.last_error_at_ms.is_some());
    }
}
