//! What each peer's links report while they run, and the snapshot `GET /v1/peers` shows.
//!
//! Links write into a [`PeerState`] after every step; readers take a [`PeerStatus`] snapshot.
//! Counters only grow, for `/metrics`. How the numbers are rendered is `server`'s business.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use store::Seq;

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

    /// Records why a link ended or could not be set up.
    pub(crate) fn record_error(&self, error: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut observed = self.observed();
        observed.last_error = Some(error.to_string());
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}
