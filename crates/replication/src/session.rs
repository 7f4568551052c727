//! The replication protocol between two sites, as a state machine without IO: frames in, frames
//! out, given a `Store`.
//!
//! One [`Session`] lives as long as one connection, on each side, and runs both directions at
//! once. As a *puller* it consumes the peer's feed: the peer announces changed entities in
//! batches ([`Frame::Rows`]); entities whose announced version the store already has are
//! skipped, entities it has never had are fetched whole (the sync protocol would send all their
//! changes anyway), and the others are brought up to date with Automerge's sync protocol, many
//! entities per round trip ([`Frame::Sync`] and [`Frame::Reply`]); once every entity of the
//! batch has the announced version on disk, the cursor is written (it reaches the disk with the
//! next flush) and the batch acknowledged ([`Frame::Done`]). As an *announcer* it does the same
//! for the local feed, for the peer. Up to [`crate::frame::BATCHES_IN_FLIGHT`] batches are in
//! flight, acknowledged in order.
//!
//! Sync states exist only inside a session, and only for the entities of the batches in
//! flight, so memory is bounded by the batch size, and a reconnect always starts both sides
//! afresh, as Automerge's sync protocol needs after a lost message. An entity whose session
//! does not reach the announced version within `max_rounds` round trips is reset (fresh states
//! on both sides) and, if that fails too, sent as a whole document; after that the session
//! fails with [`Error::Stuck`]. Anything unexpected from the peer is an error that ends the
//! session.
//! Moving frames over a websocket, timeouts and reconnecting are `link`'s business.

mod pull;
mod serve;

use store::{Origin, RecordKey, RecordWrite, Seq, Store};

use crate::error::{Error, Result};
use crate::frame::{Frame, PROTOCOL_VERSION, REPLY_BYTES};

/// How a session batches and bounds its work.
#[derive(Clone, Copy, Debug)]
pub struct SessionSettings {
    /// How many entities one batch brings up to date at most.
    pub batch_entities: usize,
    /// How many round trips one entity's sync session may take before it is reset.
    pub max_rounds: u32,
    /// How many bytes of messages one reply frame carries before the rest go in the next.
    pub reply_bytes: usize,
}

impl Default for SessionSettings {
    /// 256 entities per batch, 32 rounds per entity and [`REPLY_BYTES`] a reply frame.
    fn default() -> Self {
        Self {
            batch_entities: 256,
            max_rounds: 32,
            reply_bytes: REPLY_BYTES,
        }
    }
}

/// Where a session stands, for status and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// The peer's site name, once its hello has arrived.
    pub remote_site: Option<String>,
    /// How far this site has consumed the peer's feed (on disk).
    pub cursor: Seq,
    /// The peer's last feed row, as it last said.
    pub their_head: Option<Seq>,
    /// How far the peer has consumed this site's feed, as it last said.
    pub their_cursor: Option<Seq>,
    /// Feed rows received from the peer in this session.
    pub rows_received: u64,
    /// Entities this session brought up to date (rows whose version was already here excluded).
    pub entities_synced: u64,
    /// Times a sync of one entity stalled and was started again from fresh sync states, or
    /// then fell back to fetching the whole document (an entity never seen here is fetched
    /// whole from the start, which is not counted).
    pub sync_fallbacks: u64,
}

/// One side of one connection between two sites.
pub struct Session {
    store: Store,
    /// The peer's name here, and the origin its changes are recorded with.
    peer: String,
    origin: Origin,
    site: String,
    settings: SessionSettings,
    remote_site: Option<String>,
    pull: pull::Pull,
    serve: serve::Serve,
    rows_received: u64,
    entities_synced: u64,
    sync_fallbacks: u64,
}

/// The record space of the cursors: `replication.cursor/<peer>` holds how far this site has
/// consumed that peer's feed, as a decimal number.
const CURSOR_SPACE: &str = "replication.cursor";

/// The record space of the acknowledgements: `replication.acked/<peer>` holds how far that peer
/// last said it had consumed this site's feed (its last `Done`), as a decimal number.
const ACKED_SPACE: &str = "replication.acked";

/// How far this site has consumed `peer`'s feed, as last written to disk.
///
/// # Errors
/// Storage errors, or [`store::Error::Corrupt`] when the record is not a number.
pub fn stored_cursor(store: &Store, peer: &str) -> store::Result<Seq> {
    Ok(stored_seq(store, CURSOR_SPACE, peer, "replication cursor")?.unwrap_or(Seq::ZERO))
}

/// How far `peer` last acknowledged this site's feed, as last written to disk; `None` before
/// its first acknowledgement (or one made by a version that did not keep them), and when the
/// record is not a number (logged). Either way the feed is announced again from the start,
/// which is always safe (the peer skips what it has), and the next acknowledgement replaces
/// the record: a damaged record must not refuse every hello for ever, as a cursor's does.
fn stored_acked(store: &Store, peer: &str) -> store::Result<Option<Seq>> {
    // Only a record that is not a number is taken as none: a storage error still fails.
    match record_seq(store, ACKED_SPACE, peer)? {
        Some(None) => {
            tracing::warn!(
                %peer,
                "the replication acknowledgement of this peer is not a number: announcing the whole feed to it again"
            );
            Ok(None)
        }
        read => Ok(read.flatten()),
    }
}

fn stored_seq(store: &Store, space: &str, peer: &str, what: &str) -> store::Result<Option<Seq>> {
    match record_seq(store, space, peer)? {
        Some(None) => Err(store::Error::Corrupt {
            what: format!("the {what} of {peer}"),
            detail: "not a number".into(),
        }),
        read => Ok(read.flatten()),
    }
}

/// The record `space`/`peer` read as a number: `None` when there is no record, `Some(None)`
/// when it is not a number.
fn record_seq(store: &Store, space: &str, peer: &str) -> store::Result<Option<Option<Seq>>> {
    Ok(store
        .read_record(&RecordKey::new(space, &[peer]))?
        .map(|raw| {
            std::str::from_utf8(&raw)
                .ok()
                .and_then(|text| text.parse().ok())
        }))
}

impl Session {
    /// A session with `peer` (its name here), reading the cursor from the store.
    ///
    /// # Errors
    /// [`Error::Protocol`] when `peer` cannot be an origin name; storage errors.
    pub fn open(
        store: Store,
        peer: &str,
        site: &str,
        settings: SessionSettings,
    ) -> Result<Session> {
        let origin = Origin::parse(&format!("peer:{peer}"))
            .map_err(|error| Error::Protocol(format!("peer name {peer:?}: {error}")))?;
        let cursor = stored_cursor(&store, peer)?;
        Ok(Session {
            store,
            peer: peer.to_string(),
            origin,
            site: site.to_string(),
            settings: SessionSettings {
                batch_entities: settings.batch_entities.max(1),
                max_rounds: settings.max_rounds.max(1),
                reply_bytes: settings.reply_bytes.max(1),
            },
            remote_site: None,
            pull: pull::Pull::starting_at(cursor),
            serve: serve::Serve::default(),
            rows_received: 0,
            entities_synced: 0,
            sync_fallbacks: 0,
        })
    }

    /// The first frame to send.
    pub fn hello(&self) -> Frame {
        Frame::Hello {
            protocol: PROTOCOL_VERSION,
            site: self.site.clone(),
            cursor: self.pull.cursor,
        }
    }

    /// Handles one frame from the peer, applying what it brought, and returns the frames to send
    /// back, in order: [`Session::accept`], then [`Session::work`] until there is none left.
    ///
    /// # Errors
    /// As [`Session::accept`] and [`Session::work`].
    pub fn receive(&mut self, frame: Frame) -> Result<Vec<Frame>> {
        let mut out = self.accept(frame)?;
        while self.has_work() {
            out.extend(self.work()?);
        }
        Ok(out)
    }

    /// Takes one frame from the peer and returns the frames to send back at once, in order. A
    /// reply is only checked and queued here, and applied by [`Session::work`]: send these
    /// frames first, so the peer prepares its next reply while this site applies the last.
    ///
    /// # Errors
    /// Any error ends the session: [`Error::Protocol`] for a frame the protocol does not allow
    /// now, [`Error::Rejected`] for Automerge data the store refused, [`Error::Stuck`] for an
    /// entity that does not converge, and storage errors.
    pub fn accept(&mut self, frame: Frame) -> Result<Vec<Frame>> {
        let out = self.accept_frame(frame)?;
        self.durable_before_sent(out)
    }

    fn accept_frame(&mut self, frame: Frame) -> Result<Vec<Frame>> {
        if self.remote_site.is_none() && !matches!(frame, Frame::Hello { .. }) {
            return Err(Error::Protocol(format!(
                "a {} frame before the hello",
                frame.name()
            )));
        }
        match frame {
            Frame::Hello {
                protocol,
                site,
                cursor,
            } => {
                if self.remote_site.is_some() {
                    return Err(Error::Protocol("a second hello".into()));
                }
                // A later version than this site's is taken: its peer speaks this one.
                if protocol < PROTOCOL_VERSION {
                    return Err(Error::Protocol(format!(
                        "the peer speaks protocol version {protocol}, older than this \
                         site's {PROTOCOL_VERSION}: upgrade it"
                    )));
                }
                self.remote_site = Some(site);
                let acked = stored_acked(&self.store, &self.peer)?;
                self.serve.start_at(&self.store, cursor, acked, &self.peer);
                self.announce()
            }
            Frame::Rows {
                batch,
                rows,
                through,
                head,
            } => self.receive_rows(batch, rows, through, head),
            Frame::Sync { batch, entries } => self.answer_sync(batch, entries),
            Frame::Reply { batch, entries } => self.receive_reply(batch, entries, true),
            Frame::ReplyPart { batch, entries } => self.receive_reply(batch, entries, false),
            Frame::Done { batch, cursor } => self.receive_done(batch, cursor),
        }
    }

    /// Whether a reply waits to be applied by [`Session::work`].
    pub fn has_work(&self) -> bool {
        self.pull.has_work()
    }

    /// Applies the oldest reply [`Session::accept`] queued, and returns the frames to send.
    ///
    /// # Errors
    /// As [`Session::accept`].
    pub fn work(&mut self) -> Result<Vec<Frame>> {
        let out = self.apply_reply()?;
        self.durable_before_sent(out)
    }

    /// `out`, once every change it may carry is durable here. Sync messages and documents are
    /// read from memory, where a write is before its flush: sent sooner, a change that a crash
    /// then loses here would live on at the peer, which never announces it back (it came from
    /// here), and the sites would differ until the entity changed again.
    fn durable_before_sent(&self, out: Vec<Frame>) -> Result<Vec<Frame>> {
        let carries_changes = out.iter().any(|frame| match frame {
            Frame::Sync { entries, .. } => entries.iter().any(|entry| entry.message.is_some()),
            Frame::Reply { entries, .. } | Frame::ReplyPart { entries, .. } => {
                entries.iter().any(|entry| entry.message.is_some())
            }
            _ => false,
        });
        if carries_changes {
            self.store.wait_changes_durable()?;
        }
        Ok(out)
    }

    /// Called when the local feed has grown: announces new rows if the peer is ready for them.
    ///
    /// # Errors
    /// Storage errors.
    pub fn poll_feed(&mut self) -> Result<Vec<Frame>> {
        if self.remote_site.is_none() {
            return Ok(Vec::new());
        }
        self.announce()
    }

    /// Where the session stands.
    pub fn progress(&self) -> Progress {
        Progress {
            remote_site: self.remote_site.clone(),
            cursor: self.pull.cursor,
            their_head: self.pull.their_head,
            their_cursor: self.serve.their_cursor,
            rows_received: self.rows_received,
            entities_synced: self.entities_synced,
            sync_fallbacks: self.sync_fallbacks,
        }
    }

    /// Whether neither direction has a batch in flight or a reply to apply.
    pub fn is_idle(&self) -> bool {
        self.pull.is_idle() && !self.serve.has_outstanding()
    }

    /// Writes the cursor, without waiting for it to be durable: what it covers already is, and
    /// a crash that loses it only makes the peer announce those batches again.
    fn save_cursor(&self, cursor: Seq) -> Result<()> {
        self.save_seq(CURSOR_SPACE, cursor)
    }

    /// Writes how far the peer has acknowledged this site's feed, lazily too: a crash that loses
    /// it only makes a later hello look ahead of it, and the batches after it are announced
    /// again (see `Serve::start_at`).
    fn save_acked(&self, cursor: Seq) -> Result<()> {
        self.save_seq(ACKED_SPACE, cursor)
    }

    fn save_seq(&self, space: &str, seq: Seq) -> Result<()> {
        self.store.write_records_lazily(vec![RecordWrite::put(
            RecordKey::new(space, &[&self.peer]),
            seq.to_string(),
        )])?;
        Ok(())
    }
}

/// Maps a store error about data from the peer to [`Error::Rejected`], keeping others as they are.
fn rejected(key: &store::EntityKey, error: store::Error) -> Error {
    match error {
        store::Error::Decode(_) | store::Error::Invalid { .. } => Error::Rejected {
            key: key.clone(),
            source: Box::new(error),
        },
        other => Error::from(other),
    }
}

#[cfg(test)]
mod tests;
