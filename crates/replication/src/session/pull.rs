//! The puller's half of a session: consuming the peer's feed.
//!
//! For each announced batch: skip the entities whose version is already here, fetch whole the
//! ones never seen here, run Automerge's sync protocol for the others until each has the
//! announced version (many entities per round trip), then write the cursor and acknowledge the
//! batch. An entity that needs too many rounds
//! is reset, then fetched whole; what the peer does with its side of the sync is `serve`'s
//! business.

use std::collections::{BTreeMap, HashMap, HashSet};

use store::{EntityKey, Seq, SyncState};

use super::{rejected, Session};
use crate::error::{Error, Result};
use crate::frame::{Frame, Mode, ReplyEntry, Row, SyncEntry};

/// The puller's state.
pub(super) struct Pull {
    /// How far the peer's feed is consumed (on disk).
    pub(super) cursor: Seq,
    /// The peer's last feed row, as it last said.
    pub(super) their_head: Option<Seq>,
    /// The batch being synced.
    pub(super) batch: Option<PullBatch>,
}

impl Pull {
    pub(super) fn starting_at(cursor: Seq) -> Self {
        Self {
            cursor,
            their_head: None,
            batch: None,
        }
    }
}

/// One announced batch, while its entities are synced.
pub(super) struct PullBatch {
    id: u64,
    through: Seq,
    /// The entities not yet at their announced version.
    entities: BTreeMap<EntityKey, Pending>,
}

/// One entity being brought up to date.
struct Pending {
    /// The announced version it must reach.
    target: String,
    state: SyncState,
    /// Round trips in the current attempt.
    rounds: u32,
    stage: Stage,
    /// Whether a request for it is on the wire.
    awaiting: bool,
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
    pub(super) fn receive_rows(
        &mut self,
        batch: u64,
        rows: Vec<Row>,
        through: Seq,
        head: Seq,
    ) -> Result<Vec<Frame>> {
        if self.pull.batch.is_some() {
            return Err(Error::Protocol(
                "rows while the previous batch is in progress".into(),
            ));
        }
        if rows.len() > self.settings.batch_entities {
            return Err(Error::Protocol(format!(
                "{} rows in one batch; at most {} were expected",
                rows.len(),
                self.settings.batch_entities
            )));
        }
        self.pull.their_head = Some(head);
        self.rows_received += rows.len() as u64;
        let mut entities = BTreeMap::new();
        let mut entries = Vec::new();
        for row in rows {
            if entities.contains_key(&row.key) {
                return Err(Error::Protocol(format!("{} twice in one batch", row.key)));
            }
            let exists = self.store.version(&row.key)?.is_some();
            if exists
                && self
                    .store
                    .has_version(&row.key, &row.version)
                    .map_err(|error| rejected(&row.key, error))?
            {
                continue;
            }
            // An entity never seen here is fetched whole in one round trip: the sync protocol
            // would send every change of it anyway, after a round trip to find that out.
            let mut state = SyncState::default();
            let (mode, stage, message) = if exists {
                let message = self.store.generate_sync_message(&row.key, &mut state)?;
                (Mode::Sync, Stage::First, message)
            } else {
                (Mode::Whole, Stage::Whole, None)
            };
            entries.push(SyncEntry {
                key: row.key.clone(),
                mode,
                message,
            });
            entities.insert(
                row.key,
                Pending {
                    target: row.version,
                    state,
                    rounds: 0,
                    stage,
                    awaiting: true,
                },
            );
        }
        self.pull.batch = Some(PullBatch {
            id: batch,
            through,
            entities,
        });
        if entries.is_empty() {
            return self.finish_batch();
        }
        Ok(vec![Frame::Sync { batch, entries }])
    }

    pub(super) fn receive_reply(
        &mut self,
        batch: u64,
        replies: Vec<ReplyEntry>,
    ) -> Result<Vec<Frame>> {
        let max_rounds = self.settings.max_rounds;
        let store = self.store.clone();
        let origin = self.origin.clone();
        let Some(current) = self.pull.batch.as_mut() else {
            return Err(Error::Protocol("a reply with no batch in progress".into()));
        };
        if current.id != batch {
            return Err(Error::Protocol(format!(
                "a reply for batch {batch} during batch {}",
                current.id
            )));
        }
        let awaited = current.entities.values().filter(|e| e.awaiting).count();
        if replies.len() != awaited {
            return Err(Error::Protocol(format!(
                "{} replies for {awaited} requests",
                replies.len()
            )));
        }
        // Check every reply before applying any, so a bad frame changes nothing.
        let mut answered = HashSet::with_capacity(replies.len());
        for reply in &replies {
            let awaiting = current
                .entities
                .get(&reply.key)
                .is_some_and(|pending| pending.awaiting);
            if !awaiting || !answered.insert(reply.key.clone()) {
                return Err(Error::Protocol(format!(
                    "a reply for {}, which was not asked for",
                    reply.key
                )));
            }
        }
        let mut messages: HashMap<EntityKey, Vec<u8>> = HashMap::new();
        let mut documents: Vec<(EntityKey, Vec<u8>)> = Vec::new();
        let mut empty: HashSet<EntityKey> = HashSet::new();
        for reply in replies {
            let pending = current
                .entities
                .get_mut(&reply.key)
                .expect("every reply was checked to name an awaited entity");
            pending.awaiting = false;
            match (reply.message, pending.stage) {
                (Some(document), Stage::Whole) => documents.push((reply.key, document)),
                (Some(message), _) => {
                    messages.insert(reply.key, message);
                }
                (None, _) => {
                    empty.insert(reply.key);
                }
            }
        }
        if !documents.is_empty() {
            let outcomes = store.merge_many(
                documents
                    .iter()
                    .map(|(key, document)| (key, document.as_slice())),
                &origin,
            )?;
            for ((key, _), outcome) in documents.iter().zip(outcomes) {
                outcome.map_err(|error| rejected(key, error))?;
            }
        }
        if !messages.is_empty() {
            let work: Vec<(&EntityKey, &mut SyncState, &[u8])> = current
                .entities
                .iter_mut()
                .filter_map(|(key, pending)| {
                    messages
                        .get(key)
                        .map(|message| (key, &mut pending.state, message.as_slice()))
                })
                .collect();
            let keys: Vec<EntityKey> = work.iter().map(|(key, _, _)| (*key).clone()).collect();
            let outcomes = store.receive_sync_messages(work, &origin)?;
            for (key, outcome) in keys.iter().zip(outcomes) {
                outcome.map_err(|error| rejected(key, error))?;
            }
        }
        let mut entries = Vec::new();
        let mut synced = Vec::new();
        for (key, pending) in &mut current.entities {
            if !answered.contains(key) {
                continue;
            }
            if store
                .has_version(key, &pending.target)
                .map_err(|error| rejected(key, error))?
            {
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
                        pending.stage = Stage::Reset;
                        pending.rounds = 0;
                        pending.state = SyncState::default();
                        message = store.generate_sync_message(key, &mut pending.state)?;
                        Mode::Reset
                    }
                    Stage::Reset => {
                        tracing::debug!(%key, "fetching a whole document");
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
            pending.awaiting = true;
            entries.push(SyncEntry {
                key: key.clone(),
                mode,
                message,
            });
        }
        for key in &synced {
            current.entities.remove(key);
        }
        self.entities_synced += synced.len() as u64;
        if current.entities.is_empty() {
            return self.finish_batch();
        }
        Ok(vec![Frame::Sync { batch, entries }])
    }

    /// Writes the cursor of the finished batch and acknowledges it.
    fn finish_batch(&mut self) -> Result<Vec<Frame>> {
        let Some(batch) = self.pull.batch.take() else {
            return Ok(Vec::new());
        };
        self.save_cursor(batch.through)?;
        self.pull.cursor = batch.through;
        Ok(vec![Frame::Done {
            batch: batch.id,
            cursor: batch.through,
        }])
    }
}
