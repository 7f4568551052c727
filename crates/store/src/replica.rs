//! The store's side of Automerge's sync protocol with another replica, one entity at a time.
//!
//! A [`SyncState`] is what one side knows about what the other has, for one entity and one
//! peer; it lives only as long as a connection: after a reconnect, a lost message or a timeout,
//! both sides start again from [`SyncState::default`], because a sync session that resumes from
//! a state the other side no longer shares can loop forever. Which entities to sync, with whom,
//! and over which transport is the `replication` crate's business.

use std::panic::{catch_unwind, AssertUnwindSafe};

use automerge::sync::{self, SyncDoc};
use automerge::ChangeHash;
use rayon::iter::{IntoParallelIterator, ParallelIterator};

use crate::document;
use crate::error::{Error, Result};
use crate::key::EntityKey;
use crate::origin::Origin;
use crate::store::{AfterJson, Staged, Store, Written};
use crate::version::Version;

/// What this replica knows about a peer's copy of one entity, during one connection.
#[derive(Debug, Default)]
pub struct SyncState {
    automerge: sync::State,
    /// Changes the peer sent without one they depend on, which this side therefore dropped
    /// (see `Store::vet_incoming`): the missing dependencies, to ask for by name.
    wanted: Vec<ChangeHash>,
}

/// How many missing dependencies one sync state asks for at a time; a hostile peer could name
/// any number.
const MAX_WANTED: usize = 256;

impl Store {
    /// Whether the entity already contains every change of `version` (so there is nothing to fetch).
    ///
    /// # Errors
    /// [`Error::Invalid`] when `version` is not a version string; storage errors.
    pub fn has_version(&self, key: &EntityKey, version: &str) -> Result<bool> {
        if self.version(key)?.as_deref() == Some(version) {
            return Ok(true);
        }
        let version = Version::parse(version)?;
        self.read(key, |doc| {
            Ok(version
                .heads()
                .iter()
                .all(|head| document::has_change(doc, head)))
        })
    }

    /// The next sync message to send the peer for this entity, or `None` when there is nothing to
    /// say (the peer is up to date, or a reply is awaited).
    ///
    /// # Errors
    /// Storage errors only.
    pub fn generate_sync_message(
        &self,
        key: &EntityKey,
        state: &mut SyncState,
    ) -> Result<Option<Vec<u8>>> {
        self.read(key, |doc| {
            state.wanted.retain(|hash| !document::has_change(doc, hash));
            // A peer's message can hold a Bloom filter that decodes and is received without
            // complaint but that Automerge 0.12 divides by zero on (no bits per entry) when it
            // builds the reply from it: that panic is the peer's bad data, so an error too.
            let automerge_state = &mut state.automerge;
            let generated =
                catch_unwind(AssertUnwindSafe(|| doc.generate_sync_message(automerge_state)));
            let Ok(mut message) = generated else {
                state.automerge = sync::State::new();
                return Err(Error::Decode(
                    "automerge panicked building a reply to the peer's sync state (a malformed Bloom filter)"
                        .into(),
                ));
            };
            // Automerge asks only for the peer's heads it lacks. When the peer's Bloom filter test
            // of our changes gave a false positive, it sent a change without the one it depends
            // on; asking for that head again would bring the same change alone, forever.
            if let Some(message) = &mut message {
                message.need.extend(&state.wanted);
                // The encoding wants them sorted.
                message.need.sort_unstable();
                message.need.dedup();
            }
            Ok(message.map(sync::Message::encode))
        })
    }

    /// Applies a sync message from a peer, recording new changes with `origin` in the feed.
    ///
    /// # Errors
    /// [`Error::Decode`] when the message is not a valid sync message or carries invalid data,
    /// including inputs on which Automerge panics; the entity is left as it was and `state`
    /// should be reset by the caller.
    pub fn receive_sync_message(
        &self,
        key: &EntityKey,
        state: &mut SyncState,
        message: &[u8],
        origin: &Origin,
    ) -> Result<Written> {
        let written = self.receive_unflushed(key, state, message, origin)?;
        self.wait_durable()?;
        Ok(written)
    }

    /// [`Store::receive_sync_message`] without waiting for the flush.
    fn receive_unflushed(
        &self,
        key: &EntityKey,
        state: &mut SyncState,
        message: &[u8],
        origin: &Origin,
    ) -> Result<Written> {
        let guard = self.lock(key);
        let staged = self.stage_receive(key, state, message, origin, AfterJson::Read)?;
        let written = self.commit_one(staged);
        drop(guard);
        written
    }

    /// Applies a sync message to the entity's document and stages the result (see
    /// [`Store::stage`]); the caller holds the entity's stripe lock until it is committed.
    fn stage_receive(
        &self,
        key: &EntityKey,
        state: &mut SyncState,
        message: &[u8],
        origin: &Origin,
        json: AfterJson,
    ) -> Result<Staged> {
        let decoded = catch_unwind(|| sync::Message::decode(message));
        let message = match decoded {
            Ok(Ok(message)) => message,
            Ok(Err(error)) => return Err(Error::Decode(error.to_string())),
            Err(_) => {
                return Err(Error::Decode(
                    "automerge panicked decoding the sync message".into(),
                ))
            }
        };
        // Its changes (or the whole document a version 2 message may carry) are inflated under a
        // bound first: Automerge would inflate them whole.
        crate::inflation::check(message.changes.iter())?;
        let (staged, missing) =
            self.stage_incoming(key, origin, json, "applying the sync message", |doc| {
                doc.receive_sync_message(&mut state.automerge, message)
            })?;
        if !missing.is_empty() {
            state.wanted = missing;
            state.wanted.truncate(MAX_WANTED);
            // The peer counts the dropped changes as sent; the reset flag on our next message
            // has it forget what it sent, so it sends them again with what they depend on.
            state.automerge.needs_reset = true;
        }
        Ok(staged)
    }
}

/// Batched forms for replication, which brings many entities up to date per round trip.
impl Store {
    /// Applies one sync message per entity, as [`Store::receive_sync_message`] does, and returns
    /// once one flush covers all of them (rather than one flush each).
    ///
    /// Each entity's outcome is separate: a message that fails to decode leaves its entity as it
    /// was and does not stop the others. The outcomes leave the entity's JSON out (`entity` is
    /// `None`; `exists` says whether it has fields): reading it would cost as much as the merge.
    ///
    /// # Errors
    /// [`Error::Closed`] when the final flush fails; per-entity errors are in the returned list,
    /// in the order of `messages`.
    pub fn receive_sync_messages<'a>(
        &self,
        messages: impl IntoIterator<Item = (&'a EntityKey, &'a mut SyncState, &'a [u8])>,
        origin: &Origin,
    ) -> Result<Vec<Result<Written>>> {
        let messages = messages.into_iter().collect();
        let outcomes = self.apply_in_parallel(
            messages,
            |(key, _, _)| key,
            |chunk| {
                self.stage_and_commit(
                    chunk,
                    |(key, _, _)| (*key).clone(),
                    |(key, state, message)| {
                        self.stage_receive(key, state, message, origin, AfterJson::Skip)
                    },
                )
            },
        );
        self.wait_durable()?;
        Ok(outcomes)
    }

    /// Merges Automerge data (a saved document, or changes) into each entity, as
    /// [`Store::merge`] does, and returns once one flush covers all of them. As with
    /// [`Store::receive_sync_messages`], the outcomes leave the entity's JSON out.
    ///
    /// # Errors
    /// [`Error::Closed`] when the final flush fails; per-entity errors are in the returned list,
    /// in the order of `items`.
    pub fn merge_many<'a>(
        &self,
        items: impl IntoIterator<Item = (&'a EntityKey, &'a [u8])>,
        origin: &Origin,
    ) -> Result<Vec<Result<Written>>> {
        let items = items.into_iter().collect();
        let outcomes = self.apply_in_parallel(
            items,
            |(key, _)| key,
            |chunk| {
                self.stage_and_commit(
                    chunk,
                    |(key, _)| (*key).clone(),
                    |(key, bytes)| self.stage_merge(key, bytes, origin, AfterJson::Skip),
                )
            },
        );
        self.wait_durable()?;
        Ok(outcomes)
    }

    /// Runs `apply` on the items in parts, spread over rayon's pool (one thread per core), and
    /// returns the outcomes in the order of `items`.
    ///
    /// Items are split by their entity's stripe lock, so no two threads ever want the same
    /// stripe: `stage_and_commit` holds every stripe it has taken until it commits, and a thread
    /// meeting a stripe held by another would wait for that thread's whole part, which made two
    /// threads no faster than one. The pool's threads live on between batches: a thread started
    /// per batch would begin each one with an empty allocator heap, and fault in fresh pages.
    fn apply_in_parallel<T: Send>(
        &self,
        items: Vec<T>,
        key_of: impl Fn(&T) -> &EntityKey,
        apply: impl Fn(Vec<T>) -> Vec<Result<Written>> + Sync,
    ) -> Vec<Result<Written>> {
        // Below this many items per thread, handing work to another thread costs more than it
        // saves.
        const MIN_PER_THREAD: usize = 16;
        let threads = rayon::current_num_threads()
            .min(items.len() / MIN_PER_THREAD)
            .max(1);
        if threads == 1 {
            return apply(items);
        }
        let count = items.len();
        let mut parts: Vec<(Vec<usize>, Vec<T>)> =
            (0..threads).map(|_| (Vec::new(), Vec::new())).collect();
        for (index, item) in items.into_iter().enumerate() {
            let part = &mut parts[self.stripe_of(key_of(&item)) % threads];
            part.0.push(index);
            part.1.push(item);
        }
        // A panic in `apply` is a bug in the store (bad input is an `Err`): rayon passes it on.
        let done: Vec<(Vec<usize>, Vec<Result<Written>>)> = parts
            .into_par_iter()
            .map(|(indices, part)| (indices, apply(part)))
            .collect();
        let mut outcomes: Vec<Option<Result<Written>>> = (0..count).map(|_| None).collect();
        for (indices, part) in done {
            for (index, outcome) in indices.into_iter().zip(part) {
                outcomes[index] = Some(outcome);
            }
        }
        outcomes
            .into_iter()
            .map(|outcome| outcome.expect("every item is in one part"))
            .collect()
    }
}

#[cfg(test)]
mod tests;
