//! The puller's half of a session: consuming the peer's feed.
//!
//! For each announced batch: skip the entities whose version is already here, fetch whole the
//! ones never seen here, run Automerge's sync protocol for the others until each has the
//! announced version (many entities per round trip), then write the cursor and acknowledge the
//! batch. An entity that needs too many rounds is reset, then fetched whole; what the peer does
//! with its side of the sync is `serve`'s business.
//!
//! Up to [`BATCHES_IN_FLIGHT`] batches are announced at once, and acknowledged in order. A reply,
//! or a part of one, is accepted (checked against the oldest request of its batch on the wire)
//! as soon as it arrives, and applied by [`Session::work`]; accepting the last frame of an answer
//! starts the next batch when no request is on the wire, so the peer prepares the next reply
//! while this site applies the last one. A part applied before the rest of its answer arrived
//! may have asked again for some of its entities already; the next batch then waits for that
//! request's answer.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use store::{EntityKey, Seq, SyncState, Version};

use super::{rejected, Session};
use crate::error::{Error, Result};
use crate::frame::{
    Frame, Mode, ReplyEntry, Row, SyncEntry, BATCHES_IN_FLIGHT, MAX_BATCH_ENTITIES,
};

/// The puller's state.
pub(super) struct Pull {
    /// How far the peer's feed is consumed (on disk).
    pub(super) cursor: Seq,
    /// The peer's last feed row, as it last said.
    pub(super) their_head: Option<Seq>,
    /// The announced batches not yet acknowledged, oldest first.
    batches: VecDeque<PullBatch>,
    /// Replies accepted and not yet applied, oldest first: (batch, entries).
    replies: VecDeque<(u64, Vec<ReplyEntry>)>,
}

impl Pull {
    pub(super) fn starting_at(cursor: Seq) -> Self {
        Self {
            cursor,
            their_head: None,
            batches: VecDeque::new(),
            replies: VecDeque::new(),
        }
    }

    /// Whether no batch is announced, in progress or waiting to be applied.
    pub(super) fn is_idle(&self) -> bool {
        self.batches.is_empty() && self.replies.is_empty()
    }

    /// Whether an accepted reply waits to be applied.
    pub(super) fn has_work(&self) -> bool {
        !self.replies.is_empty()
    }

    fn batch_mut(&mut self, id: u64) -> Option<&mut PullBatch> {
        self.batches.iter_mut().find(|batch| batch.id == id)
    }

    /// Whether a request of any batch is on the wire.
    fn requesting(&self) -> bool {
        self.batches.iter().any(PullBatch::requesting)
    }
}

/// One announced batch, while its entities are synced.
struct PullBatch {
    id: u64,
    through: Seq,
    /// The announced rows, until the batch is started: its entities looked up here, and the
    /// ones not up to date requested.
    rows: Option<Vec<Row>>,
    /// The entities not yet at their announced version.
    entities: BTreeMap<EntityKey, Pending>,
    /// The requests on the wire, oldest first: the entities each asked for, in order, less those
    /// a part of its answer brought already. The peer answers them in order.
    requests: VecDeque<VecDeque<EntityKey>>,
}

impl PullBatch {
    /// Whether a request of the batch is on the wire (no request is kept once all of it is
    /// answered).
    fn requesting(&self) -> bool {
        !self.requests.is_empty()
    }

    fn is_complete(&self) -> bool {
        self.rows.is_none() && self.entities.is_empty()
    }
}

/// One entity being brought up to date.
struct Pending {
    /// The announced version it must reach.
    target: String,
    state: SyncState,
    /// Round trips in the current attempt.
    rounds: u32,
    stage: Stage,
}

/// Which attempt an entity is on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The first sync session.
    First,
    /// A second sync session from fresh states.
    Reset,
    /// The whole document.
    Whole,
}

impl Session {
    /// Takes an announced batch: checks it and queues it, then starts it if nothing else is
    /// being requested.
    pub(super) fn receive_rows(
        &mut self,
        batch: u64,
        rows: Vec<Row>,
        through: Seq,
        head: Seq,
    ) -> Result<Vec<Frame>> {
        if self.pull.batches.len() >= BATCHES_IN_FLIGHT {
            return Err(Error::Protocol(format!(
                "rows of a batch while {BATCHES_IN_FLIGHT} are in flight"
            )));
        }
        if self.pull.batches.iter().any(|known| known.id == batch) {
            return Err(Error::Protocol(format!("batch {batch} announced twice")));
        }
        // The announcer's `batch_entities` sizes its batches, not this site's: sites need not
        // agree on it. Only the protocol's bound applies (which decoding enforces already).
        if rows.len() > MAX_BATCH_ENTITIES {
            return Err(Error::Protocol(format!(
                "{} rows in one batch; at most {MAX_BATCH_ENTITIES} are allowed",
                rows.len(),
            )));
        }
        // A batch covers the feed after the one before it. The first one in flight may start
        // behind the cursor: a peer whose store was replaced announces its new feed from the
        // start, and the cursor follows it back.
        if let Some(last) = self
            .pull
            .batches
            .back()
            .filter(|last| through <= last.through)
        {
            return Err(Error::Protocol(format!(
                "batch {batch} ends at {through}, not after batch {} at {}",
                last.id, last.through
            )));
        }
        // Every row is checked now, so a bad one ends the session on this frame, not later.
        let mut seen = HashSet::with_capacity(rows.len());
        for row in &rows {
            if !seen.insert(&row.key) {
                return Err(Error::Protocol(format!("{} twice in one batch", row.key)));
            }
            Version::parse(&row.version).map_err(|error| {
                Error::Protocol(format!("{}: announced version: {error}", row.key))
            })?;
        }
        self.pull.their_head = Some(head);
        self.rows_received += rows.len() as u64;
        self.pull.batches.push_back(PullBatch {
            id: batch,
            through,
            rows: Some(rows),
            entities: BTreeMap::new(),
            requests: VecDeque::new(),
        });
        let mut out = self.start_next()?;
        out.extend(self.finish_batches()?);
        Ok(out)
    }

    /// Starts the oldest batch not yet started, unless a request is on the wire: looks its
    /// entities up and requests the ones not up to date. Returns the request, if any.
    fn start_next(&mut self) -> Result<Vec<Frame>> {
        if self.pull.requesting() {
            return Ok(Vec::new());
        }
        let store = self.store.clone();
        let Some(current) = self
            .pull
            .batches
            .iter_mut()
            .find(|batch| batch.rows.is_some())
        else {
            return Ok(Vec::new());
        };
        let rows = current.rows.take().expect("found by having rows");
        let mut entries = Vec::new();
        for row in rows {
            let exists = store.version(&row.key)?.is_some();
            if exists
                && store
                    .has_version(&row.key, &row.version)
                    .map_err(|error| rejected(&row.key, error))?
            {
                continue;
            }
            // An entity never seen here is fetched whole in one round trip: the sync protocol
            // would send every change of it anyway, after a round trip to find that out.
            let mut state = SyncState::default();
            let (mode, stage, message) = if exists {
                let message = store.generate_sync_message(&row.key, &mut state)?;
                (Mode::Sync, Stage::First, message)
            } else {
                (Mode::Whole, Stage::Whole, None)
            };
            entries.push(SyncEntry {
                key: row.key.clone(),
                mode,
                message,
            });
            current.entities.insert(
                row.key,
                Pending {
                    target: row.version,
                    state,
                    rounds: 0,
                    stage,
                },
            );
        }
        if entries.is_empty() {
            // Nothing to request: the batch is complete; the next one may start.
            return self.start_next();
        }
        current
            .requests
            .push_back(entries.iter().map(|entry| entry.key.clone()).collect());
        Ok(vec![Frame::Sync {
            batch: current.id,
            entries,
        }])
    }

    /// Takes a reply, or a part of one (`last` false): checks it against the oldest request of
    /// its batch on the wire and queues it for [`Session::work`], then starts the next batch if
    /// no other request is on the wire.
    pub(super) fn receive_reply(
        &mut self,
        batch: u64,
        replies: Vec<ReplyEntry>,
        last: bool,
    ) -> Result<Vec<Frame>> {
        let Some(current) = self.pull.batch_mut(batch) else {
            return Err(Error::Protocol(format!(
                "a reply for batch {batch}, which is not in progress"
            )));
        };
        let Some(request) = current.requests.front_mut() else {
            return Err(Error::Protocol(format!(
                "a reply for batch {batch}, which has no request on the wire"
            )));
        };
        // Check every entry before taking any, so a bad frame changes nothing. A part holds
        // some of the entities still to answer, the last frame all the rest, in request order.
        let fits = if last {
            replies.len() == request.len()
        } else {
            !replies.is_empty() && replies.len() < request.len()
        };
        if !fits {
            return Err(Error::Protocol(format!(
                "a {} of {} entries, where {} of the request are still to answer",
                if last { "reply" } else { "reply part" },
                replies.len(),
                request.len()
            )));
        }
        if let Some((reply, asked)) = replies
            .iter()
            .zip(request.iter())
            .find(|(reply, asked)| reply.key != **asked)
        {
            return Err(Error::Protocol(format!(
                "a reply for {}, where {asked} was asked for next",
                reply.key
            )));
        }
        request.drain(..replies.len());
        if last {
            current.requests.pop_front();
        }
        self.pull.replies.push_back((batch, replies));
        self.start_next()
    }

    /// Applies the oldest accepted reply: merges what it brought, asks again for the entities
    /// not yet at their announced version, and acknowledges the batches that are complete.
    pub(super) fn apply_reply(&mut self) -> Result<Vec<Frame>> {
        let Some((batch, replies)) = self.pull.replies.pop_front() else {
            return Ok(Vec::new());
        };
        let max_rounds = self.settings.max_rounds;
        let store = self.store.clone();
        let origin = self.origin.clone();
        let current = self
            .pull
            .batch_mut(batch)
            .expect("a reply is accepted only for a batch in progress, which it keeps");
        let answered: HashSet<EntityKey> = replies.iter().map(|reply| reply.key.clone()).collect();
        let mut messages: Vec<(EntityKey, Vec<u8>)> = Vec::new();
        let mut documents: Vec<(EntityKey, Vec<u8>)> = Vec::new();
        let mut empty: HashSet<EntityKey> = HashSet::new();
        for reply in replies {
            let stage = current
                .entities
                .get(&reply.key)
                .expect("every reply was checked to name an entity of a request on the wire")
                .stage;
            match (reply.message, stage) {
                (Some(document), Stage::Whole) => documents.push((reply.key, document)),
                (Some(message), _) => messages.push((reply.key, message)),
                (None, _) => {
                    empty.insert(reply.key);
                }
            }
        }
        // The version each entity reached, as the store reported it.
        let mut reached: HashMap<EntityKey, String> = HashMap::new();
        if !documents.is_empty() {
            let outcomes = store.merge_many(
                documents
                    .iter()
                    .map(|(key, document)| (key, document.as_slice())),
                &origin,
            )?;
            for ((key, _), outcome) in documents.into_iter().zip(outcomes) {
                let written = outcome.map_err(|error| rejected(&key, error))?;
                reached.insert(key, written.version);
            }
        }
        if !messages.is_empty() {
            let mut by_key: BTreeMap<&EntityKey, &[u8]> = messages
                .iter()
                .map(|(key, message)| (key, message.as_slice()))
                .collect();
            let work: Vec<(&EntityKey, &mut SyncState, &[u8])> = current
                .entities
                .iter_mut()
                .filter_map(|(key, pending)| {
                    by_key
                        .remove(key)
                        .map(|message| (key, &mut pending.state, message))
                })
                .collect();
            let keys: Vec<EntityKey> = work.iter().map(|(key, _, _)| (*key).clone()).collect();
            let outcomes = store.receive_sync_messages(work, &origin)?;
            for (key, outcome) in keys.into_iter().zip(outcomes) {
                let written = outcome.map_err(|error| rejected(&key, error))?;
                reached.insert(key, written.version);
            }
        }
        let mut entries = Vec::new();
        let mut synced = Vec::new();
        let mut fallbacks = 0;
        for (key, pending) in &mut current.entities {
            if !answered.contains(key) {
                continue;
            }
            // Reaching exactly the announced version is the common case; otherwise the entity
            // may still be past it, which only the document can tell.
            let done = reached.get(key) == Some(&pending.target)
                || store
                    .has_version(key, &pending.target)
                    .map_err(|error| rejected(key, error))?;
            if done {
                synced.push(key.clone());
                continue;
            }
            pending.rounds += 1;
            let mut message = None;
            if pending.stage != Stage::Whole && pending.rounds < max_rounds {
                message = store.generate_sync_message(key, &mut pending.state)?;
            }
            // Quiet on both sides without the announced version, or out of rounds: try again
            // from fresh states, then with the whole document, then give up.
            let stuck = pending.rounds >= max_rounds
                || pending.stage == Stage::Whole
                || (message.is_none() && empty.contains(key));
            let mode = if !stuck {
                Mode::Sync
            } else {
                match pending.stage {
                    Stage::First => {
                        tracing::debug!(%key, rounds = pending.rounds, "resetting a sync session");
                        fallbacks += 1;
                        pending.stage = Stage::Reset;
                        pending.rounds = 0;
                        pending.state = SyncState::default();
                        message = store.generate_sync_message(key, &mut pending.state)?;
                        Mode::Reset
                    }
                    Stage::Reset => {
                        tracing::debug!(%key, "fetching a whole document");
                        fallbacks += 1;
                        pending.stage = Stage::Whole;
                        pending.rounds = 0;
                        message = None;
                        Mode::Whole
                    }
                    Stage::Whole => {
                        return Err(Error::Stuck {
                            key: key.clone(),
                            rounds: max_rounds,
                        })
                    }
                }
            };
            entries.push(SyncEntry {
                key: key.clone(),
                mode,
                message,
            });
        }
        for key in &synced {
            current.entities.remove(key);
        }
        if !entries.is_empty() {
            current
                .requests
                .push_back(entries.iter().map(|entry| entry.key.clone()).collect());
        }
        self.entities_synced += synced.len() as u64;
        self.sync_fallbacks += fallbacks;
        let mut out = Vec::new();
        if !entries.is_empty() {
            out.push(Frame::Sync { batch, entries });
        }
        // Acknowledge what is complete before starting anything else, so a failure there
        // cannot cost a batch that is already applied its acknowledgement.
        out.extend(self.finish_batches()?);
        out.extend(self.start_next()?);
        // A batch just started may already be complete (every entity here at its version).
        out.extend(self.finish_batches()?);
        Ok(out)
    }

    /// Acknowledges the complete batches at the front, in order, once the cursor past them is
    /// on disk.
    fn finish_batches(&mut self) -> Result<Vec<Frame>> {
        let mut done = Vec::new();
        let mut cursor = self.pull.cursor;
        while self
            .pull
            .batches
            .front()
            .is_some_and(PullBatch::is_complete)
        {
            let batch = self.pull.batches.pop_front().expect("checked above");
            cursor = batch.through;
            done.push(Frame::Done {
                batch: batch.id,
                cursor,
            });
        }
        if !done.is_empty() {
            self.save_cursor(cursor)?;
            self.pull.cursor = cursor;
        }
        Ok(done)
    }
}
