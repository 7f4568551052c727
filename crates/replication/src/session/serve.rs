//! The announcer's half of a session: offering the local feed to the peer, and answering its
//! sync requests for the announced entities.
//!
//! Up to [`BATCHES_IN_FLIGHT`] batches are in flight at a time, each of rows after the last
//! one announced, at most one per entity and at most `batch_entities`, leaving out rows whose
//! change came from this very peer (it has them; an optimisation only, since the peer skips
//! entities it is up to date on anyway), unless the peer may have lost them: it starts from the
//! beginning of the feed, or from behind what it last acknowledged (see [`Serve::start_at`]).
//! The peer acknowledges them in order. The sync states
//! for the peer's requests live until it acknowledges their batch. Deciding which entities to
//! ask for is `pull`'s business.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use store::{EntityKey, Seq, Store, SyncState};

use super::{rejected, Session};
use crate::error::{Error, Result};
use crate::frame::{Frame, Mode, ReplyEntry, Row, SyncEntry, BATCHES_IN_FLIGHT};

/// The announcer's state.
#[derive(Default)]
pub(super) struct Serve {
    /// How far the peer has consumed the local feed, as it last said; `None` before its hello.
    pub(super) their_cursor: Option<Seq>,
    /// The last local feed row announced.
    announced: Seq,
    /// Rows whose change came from the peer are announced too up to this one: the end of the
    /// feed at its hello when it may have lost them (see [`Serve::start_at`]), else none. Rows
    /// that arrive from it later it has.
    theirs_through: Seq,
    next_batch: u64,
    /// The batches announced and not yet acknowledged, oldest first.
    outstanding: VecDeque<Outstanding>,
}

/// A batch the peer is working on.
struct Outstanding {
    id: u64,
    /// The last feed row it covers.
    through: Seq,
    keys: HashSet<EntityKey>,
    /// The responder's sync state per entity the peer has asked about.
    states: HashMap<EntityKey, SyncState>,
}

impl Serve {
    /// Starts announcing after `cursor`, the peer's cursor of this site's feed, checked against
    /// `acked`, what it last acknowledged here:
    /// - past the end of the local feed: from the beginning (the peer remembers a store that
    ///   this one replaced);
    /// - past `acked`: from `acked`, since this store may have been restored from a backup and
    ///   have written other rows under the numbers the peer consumed (a crash that lost the
    ///   lazily written acknowledgement also lands here, and costs those batches again);
    /// - behind `acked`: from `cursor`, and the peer's own changes are announced back to it too,
    ///   since its store may have been replaced or restored and lost them (a crash that lost
    ///   its lazily written cursor also lands here, and costs a few rows);
    /// - at 0: from the beginning, the peer's own changes included, for the same reason.
    pub(super) fn start_at(&mut self, store: &Store, cursor: Seq, acked: Option<Seq>, peer: &str) {
        let last = store.last_seq();
        self.their_cursor = Some(cursor);
        // No acknowledgement on record says nothing of what the peer has: none was written yet
        // (it is written lazily, so a crash, or a backup taken right after one, can lose the
        // first), or this store was restored from a backup made before the first. Both are taken
        // as an acknowledgement of nothing, so the feed is announced again from the start.
        let acked = acked.unwrap_or(Seq::ZERO);
        let may_have_lost = cursor == Seq::ZERO || cursor < acked;
        self.theirs_through = if may_have_lost { last } else { Seq::ZERO };
        self.announced = if cursor > last {
            tracing::warn!(%peer, %cursor, %last, "the peer's cursor is past the end of the feed; announcing from the start");
            Seq::ZERO
        } else if cursor > acked {
            tracing::warn!(%peer, %cursor, %acked, "the peer's cursor is past what it acknowledged here (was this store restored from a backup, or is the acknowledgement not on record yet?); announcing again from there");
            acked
        } else {
            if may_have_lost && cursor > Seq::ZERO {
                tracing::warn!(%peer, %cursor, %acked, "the peer's cursor is behind what it acknowledged here (was its store replaced or restored?); announcing its own changes back to it too");
            }
            cursor
        };
    }

    pub(super) fn has_outstanding(&self) -> bool {
        !self.outstanding.is_empty()
    }
}

impl Session {
    /// Announces the next batches of the local feed, as many as may be in flight and as long as
    /// something is new.
    pub(super) fn announce(&mut self) -> Result<Vec<Frame>> {
        let mut out = Vec::new();
        while self.serve.their_cursor.is_some() && self.serve.outstanding.len() < BATCHES_IN_FLIGHT
        {
            match self.announce_one()? {
                Some(frame) => out.push(frame),
                None => break,
            }
        }
        Ok(out)
    }

    /// The next batch of the local feed, or `None` when nothing is new.
    fn announce_one(&mut self) -> Result<Option<Frame>> {
        let batch_entities = self.settings.batch_entities;
        let head = self.store.last_seq();
        if self.serve.announced >= head {
            return Ok(None);
        }
        let mut rows: BTreeMap<EntityKey, Row> = BTreeMap::new();
        let mut through = self.serve.announced;
        'scan: while through < head {
            let feed = self.store.feed(through, None, batch_entities)?;
            if feed.is_empty() {
                break;
            }
            for feed_row in feed {
                let key = EntityKey {
                    kind: feed_row.kind,
                    id: feed_row.id,
                };
                if rows.len() >= batch_entities && !rows.contains_key(&key) {
                    break 'scan;
                }
                through = feed_row.seq;
                if feed_row.origin == self.origin && feed_row.seq > self.serve.theirs_through {
                    continue;
                }
                rows.insert(
                    key.clone(),
                    Row {
                        key,
                        version: feed_row.version,
                        seq: feed_row.seq,
                    },
                );
            }
        }
        if through == self.serve.announced {
            return Ok(None);
        }
        let batch = self.serve.next_batch;
        self.serve.next_batch += 1;
        self.serve.announced = through;
        self.serve.outstanding.push_back(Outstanding {
            id: batch,
            through,
            keys: rows.keys().cloned().collect(),
            states: HashMap::new(),
        });
        Ok(Some(Frame::Rows {
            batch,
            rows: rows.into_values().collect(),
            through,
            head,
        }))
    }

    pub(super) fn answer_sync(
        &mut self,
        batch: u64,
        entries: Vec<SyncEntry>,
    ) -> Result<Vec<Frame>> {
        let store = self.store.clone();
        let origin = self.origin.clone();
        let Some(outstanding) = self
            .serve
            .outstanding
            .iter_mut()
            .find(|outstanding| outstanding.id == batch)
        else {
            return Err(Error::Protocol(format!(
                "a sync request for batch {batch}, which is not in flight"
            )));
        };
        let mut seen = HashSet::with_capacity(entries.len());
        for entry in &entries {
            if !outstanding.keys.contains(&entry.key) || !seen.insert(&entry.key) {
                return Err(Error::Protocol(format!(
                    "a sync request for {}, which batch {batch} did not announce (or twice)",
                    entry.key
                )));
            }
        }
        // Take the states out of the map, so one store call can apply every message.
        let mut work: Vec<(EntityKey, Mode, SyncState, Option<Vec<u8>>)> = entries
            .into_iter()
            .map(|entry| {
                let state = match entry.mode {
                    Mode::Sync => outstanding.states.remove(&entry.key).unwrap_or_default(),
                    Mode::Reset | Mode::Whole => {
                        outstanding.states.remove(&entry.key);
                        SyncState::default()
                    }
                };
                (entry.key, entry.mode, state, entry.message)
            })
            .collect();
        let incoming: Vec<(&EntityKey, &mut SyncState, &[u8])> = work
            .iter_mut()
            .filter(|(_, mode, _, _)| *mode != Mode::Whole)
            .filter_map(|(key, _, state, message)| {
                message.as_deref().map(|message| (&*key, state, message))
            })
            .collect();
        if !incoming.is_empty() {
            let keys: Vec<EntityKey> = incoming.iter().map(|(key, _, _)| (*key).clone()).collect();
            let outcomes = store.receive_sync_messages(incoming, &origin)?;
            for (key, outcome) in keys.iter().zip(outcomes) {
                outcome.map_err(|error| rejected(key, error))?;
            }
        }
        // The answer goes in parts of about `reply_bytes` each, so that the puller applies each
        // part while the rest is on the wire, and no batch's answer must fit in one frame.
        let frame_bytes = self.settings.reply_bytes;
        let mut frames = Vec::new();
        let mut replies = Vec::new();
        let mut bytes: usize = 0;
        for (key, mode, mut state, _) in work {
            let message = match mode {
                Mode::Whole => store.stored_document(&key)?,
                Mode::Sync | Mode::Reset => {
                    let message = store.generate_sync_message(&key, &mut state)?;
                    outstanding.states.insert(key.clone(), state);
                    message
                }
            };
            let reply = ReplyEntry { key, message };
            let size = reply.size();
            if !replies.is_empty() && bytes.saturating_add(size) > frame_bytes {
                frames.push(Frame::ReplyPart {
                    batch,
                    entries: std::mem::take(&mut replies),
                });
                bytes = 0;
            }
            bytes += size;
            replies.push(reply);
        }
        frames.push(Frame::Reply {
            batch,
            entries: replies,
        });
        Ok(frames)
    }

    pub(super) fn receive_done(&mut self, batch: u64, cursor: Seq) -> Result<Vec<Frame>> {
        // Batches are acknowledged in the order they were announced.
        let through = match self.serve.outstanding.front() {
            Some(oldest) if oldest.id == batch => oldest.through,
            _ => {
                return Err(Error::Protocol(format!(
                    "done for batch {batch}, which is not the oldest in flight"
                )))
            }
        };
        if cursor > through {
            return Err(Error::Protocol(format!(
                "done up to {cursor}, beyond the {through} batch {batch} covers"
            )));
        }
        self.serve.outstanding.pop_front();
        self.serve.their_cursor = Some(cursor);
        self.save_acked(cursor)?;
        self.announce()
    }
}
