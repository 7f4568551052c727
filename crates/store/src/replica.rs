//! The store's side of Automerge's sync protocol with another replica, one entity at a time.
//!
//! A [`SyncState`] is what one side knows about what the other has, for one entity and one
//! peer; it lives only as long as a connection: after a reconnect, a lost message or a timeout,
//! both sides start again from [`SyncState::default`], because a sync session that resumes from
//! a state the other side no longer shares can loop forever. Which entities to sync, with whom,
//! and over which transport is the `replication` crate's business.

use std::panic::catch_unwind;

use automerge::sync::{self, SyncDoc};

use crate::document;
use crate::error::{Error, Result};
use crate::key::EntityKey;
use crate::origin::Origin;
use crate::store::{AfterJson, Staged, Store, Written};
use crate::version::Version;

/// What this replica knows about a peer's copy of one entity, during one connection.
#[derive(Debug, Default)]
pub struct SyncState(sync::State);

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
            Ok(doc
                .generate_sync_message(&mut state.0)
                .map(sync::Message::encode))
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
        self.stage_incoming(key, origin, json, "applying the sync message", |doc| {
            doc.receive_sync_message(&mut state.0, message)
        })
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
        let outcomes = self.apply_in_parallel(messages.into_iter().collect(), |chunk| {
            self.stage_and_commit(
                chunk,
                |(key, _, _)| (*key).clone(),
                |(key, state, message)| {
                    self.stage_receive(key, state, message, origin, AfterJson::Skip)
                },
            )
        });
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
        let outcomes = self.apply_in_parallel(items.into_iter().collect(), |chunk| {
            self.stage_and_commit(
                chunk,
                |(key, _)| (*key).clone(),
                |(key, bytes)| self.stage_merge(key, bytes, origin, AfterJson::Skip),
            )
        });
        self.wait_durable()?;
        Ok(outcomes)
    }

    /// Runs `apply` on the items in chunks, spread over one thread per core, and returns the
    /// outcomes in the order of `items`. Entities are independent (each chunk takes its own
    /// stripe locks, never waiting for one while it holds others), so a batch uses every core.
    fn apply_in_parallel<T: Send>(
        &self,
        mut items: Vec<T>,
        apply: impl Fn(Vec<T>) -> Vec<Result<Written>> + Sync,
    ) -> Vec<Result<Written>> {
        // Below this many items per thread, starting threads costs more than it saves.
        const MIN_PER_THREAD: usize = 16;
        let threads = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(items.len() / MIN_PER_THREAD)
            .max(1);
        if threads == 1 {
            return apply(items);
        }
        let per_thread = items.len().div_ceil(threads);
        let mut chunks = Vec::with_capacity(threads);
        while items.len() > per_thread {
            let rest = items.split_off(per_thread);
            chunks.push(std::mem::replace(&mut items, rest));
        }
        chunks.push(items);
        let apply = &apply;
        std::thread::scope(|scope| {
            let workers: Vec<_> = chunks
                .into_iter()
                .map(|chunk| scope.spawn(move || apply(chunk)))
                .collect();
            workers
                .into_iter()
                .flat_map(|worker| {
                    // A panic here is a bug in the store (bad input is an `Err`): pass it on.
                    worker
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests;
