//! What the store keeps for each connector, as typed side records:
//!
//! | space | parts | value |
//! |---|---|---|
//! | `connector.state` | connector | [`ConnectorState`]: feed cursor, paused, disabled |
//! | `connector.shadow` | connector, kind, id | [`Shadow`]: the mapped fields the external system has |
//! | `connector.outbox` | connector, kind, id | [`Attempt`]: the one delta in flight for the entity |
//! | `connector.received` | connector, arrival number (16 hex digits), hash of the webhook id | [`InboxRecord`]: the first response to that id, in arrival order (see `inbox`) |
//! | `connector.inbox` | connector, hash of the webhook id | [`InboxRecord`]: the same, for ids not in the arrival order's index |
//! | `connector.replan` | connector, kind, id | empty: the entity changed while it was being delivered |
//!
//! The shadow and the outbox are what make delivery crash-safe: the delta to send is always
//! `mapped(entity) - shadow`, and an attempt, once written, is retried under the same key until
//! it is acknowledged, when it is deleted and the shadow advanced in one atomic write.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use sha2::{Digest, Sha256};
use store::{now_ms, EntityKey, RecordKey, RecordWrite, Seq, Store};

use crate::error::{Error, Result};
use crate::inbox::IdHash;

#[cfg(test)]
mod tests;

const STATE: &str = "connector.state";
const SHADOW: &str = "connector.shadow";
const OUTBOX: &str = "connector.outbox";
const INBOX: &str = "connector.inbox";
const RECEIVED: &str = "connector.received";
/// How far ahead of now an inbox record may be dated before the clean-up reads past it.
const CLOCK_SLACK_MS: u64 = 3_600_000;
const REPLAN: &str = "connector.replan";

/// A connector's persisted run state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectorState {
    /// The feed position up to which every change has been turned into an attempt (or needed none).
    pub cursor: Seq,
    /// Paused by an operator.
    pub paused: bool,
    /// Disabled because the external system answered 410 Gone; the reason.
    pub disabled: Option<String>,
}

/// What an external system is known to have for one entity.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Shadow {
    /// Mapped fields by external name, in the external system's representation.
    pub fields: BTreeMap<String, Json>,
    /// The entity version the system was last brought to by a delivery.
    pub version: Option<String>,
    /// The highest `version_field` value applied from this system's webhooks.
    pub inbound_mark: Option<Json>,
    /// How often an operator replayed this entity; part of its deltas' idempotency keys.
    #[serde(default)]
    pub replays: u64,
}

/// One outbound delta for one entity, retried under the same key until acknowledged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// The idempotency key: derived from connector, entity and target version.
    pub key: String,
    /// The request body: the changed mapped fields, removed ones as `null`, plus the id field.
    pub delta: Map<String, Json>,
    /// The entity version this delta brings the system to.
    pub version: String,
    /// The version the system was at before, if known.
    pub previous_version: Option<String>,
    /// Attempts made so far.
    pub attempts: u32,
    /// When the next attempt is due, in Unix milliseconds.
    pub next_at_ms: u64,
    /// When the attempt was created, in Unix milliseconds.
    pub created_at_ms: u64,
    /// The last failure, if any.
    pub last_error: Option<String>,
    /// Set when the delta was dead-lettered; the reason.
    pub dead: Option<String>,
}

/// The first response given to an inbound webhook id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InboxRecord {
    /// SHA-256 of the body, hex, to tell a repeat from a different body under the same id.
    pub body_sha256: String,
    /// The response body given (always with a 2xx status).
    pub response: Json,
    /// When it was received, in Unix milliseconds (for retention).
    pub at_ms: u64,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("connector records always serialize")
}

fn decode<T: DeserializeOwned>(key: &RecordKey, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|error| Error::CorruptRecord {
        key: format!("{key:?}"),
        detail: error.to_string(),
    })
}

fn read<T: DeserializeOwned>(store: &Store, key: &RecordKey) -> Result<Option<T>> {
    store
        .read_record(key)?
        .map(|bytes| decode(key, &bytes))
        .transpose()
}

/// Hex SHA-256 of some bytes.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Typed access to one connector's records.
#[derive(Clone)]
pub(crate) struct Records {
    store: Store,
    connector: String,
}

impl Records {
    pub(crate) fn new(store: Store, connector: &str) -> Self {
        Self {
            store,
            connector: connector.to_string(),
        }
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    fn entity_key(&self, space: &str, entity: &EntityKey) -> RecordKey {
        RecordKey::new(
            space,
            &[&self.connector, entity.kind.as_str(), entity.id.as_str()],
        )
    }

    pub(crate) fn state(&self) -> Result<ConnectorState> {
        Ok(read(&self.store, &RecordKey::new(STATE, &[&self.connector]))?.unwrap_or_default())
    }

    pub(crate) fn put_state(&self, state: &ConnectorState) -> RecordWrite {
        RecordWrite::put(RecordKey::new(STATE, &[&self.connector]), encode(state))
    }

    pub(crate) fn shadow(&self, entity: &EntityKey) -> Result<Shadow> {
        Ok(read(&self.store, &self.entity_key(SHADOW, entity))?.unwrap_or_default())
    }

    pub(crate) fn put_shadow(&self, entity: &EntityKey, shadow: &Shadow) -> RecordWrite {
        RecordWrite::put(self.entity_key(SHADOW, entity), encode(shadow))
    }

    /// `entity`'s shadow with what the system has forgotten (its fields and version), counting a
    /// replay; the caller writes it with [`Self::put_shadow`].
    pub(crate) fn forgotten_shadow(&self, entity: &EntityKey) -> Result<Shadow> {
        let shadow = self.shadow(entity)?;
        Ok(Shadow {
            fields: BTreeMap::new(),
            version: None,
            inbound_mark: shadow.inbound_mark,
            replays: shadow.replays + 1,
        })
    }

    /// Every shadow of this connector, as entity keys.
    pub(crate) fn shadowed_entities(&self) -> Result<Vec<EntityKey>> {
        self.scan_entities(SHADOW)
    }

    pub(crate) fn attempt(&self, entity: &EntityKey) -> Result<Option<Attempt>> {
        read(&self.store, &self.entity_key(OUTBOX, entity))
    }

    pub(crate) fn put_attempt(&self, entity: &EntityKey, attempt: &Attempt) -> RecordWrite {
        RecordWrite::put(self.entity_key(OUTBOX, entity), encode(attempt))
    }

    pub(crate) fn delete_attempt(&self, entity: &EntityKey) -> RecordWrite {
        RecordWrite::delete(self.entity_key(OUTBOX, entity))
    }

    /// Marks `entity` as changed while a delivery of it was in flight, so it is planned once
    /// the delivery ends (or after a restart), whatever that delivery's outcome.
    pub(crate) fn put_replan(&self, entity: &EntityKey) -> RecordWrite {
        RecordWrite::put(self.entity_key(REPLAN, entity), Vec::new())
    }

    pub(crate) fn delete_replan(&self, entity: &EntityKey) -> RecordWrite {
        RecordWrite::delete(self.entity_key(REPLAN, entity))
    }

    pub(crate) fn has_replan(&self, entity: &EntityKey) -> Result<bool> {
        Ok(self
            .store
            .read_record(&self.entity_key(REPLAN, entity))?
            .is_some())
    }

    /// Every entity marked by [`Records::put_replan`].
    pub(crate) fn replans(&self) -> Result<Vec<EntityKey>> {
        self.scan_entities(REPLAN)
    }

    /// Every attempt in this connector's outbox.
    pub(crate) fn attempts(&self) -> Result<Vec<(EntityKey, Attempt)>> {
        let prefix = RecordKey::new(OUTBOX, &[&self.connector]);
        let mut found = Vec::new();
        for (key, bytes) in self.store.scan_records(&prefix)? {
            if let Some(entity) = entity_of(&key) {
                found.push((entity, decode(&key, &bytes)?));
            }
        }
        Ok(found)
    }

    fn scan_entities(&self, space: &str) -> Result<Vec<EntityKey>> {
        let prefix = RecordKey::new(space, &[&self.connector]);
        Ok(self
            .store
            .scan_records(&prefix)?
            .into_iter()
            .filter_map(|(key, _)| entity_of(&key))
            .collect())
    }

    /// Where the inbox record of the id hashed to `hash` is kept when it is kept by hash.
    pub(crate) fn inbox_key(&self, hash: &IdHash) -> RecordKey {
        RecordKey::new(INBOX, &[&self.connector, &hash.hex()])
    }

    /// Where the inbox record of the id hashed to `hash` is kept when it arrived as number
    /// `arrival`: the numbers grow, so each new record is a key at the end of the range.
    pub(crate) fn received_key(&self, arrival: u64, hash: &IdHash) -> RecordKey {
        RecordKey::new(
            RECEIVED,
            &[&self.connector, &format!("{arrival:016x}"), &hash.hex()],
        )
    }

    /// The arrival number and id hash of a [`Self::received_key`]; `None` for any other key.
    pub(crate) fn received_of(key: &RecordKey) -> Option<(u64, IdHash)> {
        if !key.in_space(RECEIVED) {
            return None;
        }
        match key.parts().as_slice() {
            [_, arrival, hash] => Some((
                u64::from_str_radix(arrival, 16).ok()?,
                IdHash::from_hex(hash)?,
            )),
            _ => None,
        }
    }

    /// Calls `visit` with the arrival number and id hash of each of this connector's records
    /// in arrival order, from their keys alone.
    pub(crate) fn visit_received(&self, mut visit: impl FnMut(u64, IdHash)) -> Result<()> {
        let prefix = RecordKey::new(RECEIVED, &[&self.connector]);
        self.store.visit_records(&prefix, |key, _| {
            let (arrival, hash) = Self::received_of(&key).ok_or_else(|| Error::CorruptRecord {
                key: format!("{key:?}"),
                detail: "not an arrival number and an id hash".into(),
            })?;
            visit(arrival, hash);
            Ok::<_, Error>(ControlFlow::Continue(()))
        })
    }

    /// The inbox record at `key` (see [`Self::inbox_key`], [`Self::received_key`]).
    pub(crate) fn inbox(&self, key: &RecordKey) -> Result<Option<InboxRecord>> {
        read(&self.store, key)
    }

    /// Writes `record` at `key` (see [`Self::inbox_key`], [`Self::received_key`]).
    pub(crate) fn put_inbox(key: RecordKey, record: &InboxRecord) -> RecordWrite {
        RecordWrite::put(key, encode(record))
    }

    /// The keys of this connector's inbox records (of both kinds) received before `cutoff_ms`.
    /// They are only candidates: [`Self::delete_expired_inbox`] checks each again before
    /// deleting it.
    ///
    /// Records in arrival order are read only up to the first one received at or after the
    /// cutoff: the ones after it arrived later, so they are (nearly all) younger, and reading
    /// them all would cost as much as the ids retained. A record's arrival number is given when
    /// it is placed, and its time read a little later, on the writer, so a record behind the
    /// first young one may be a few moments older than it; it is forgotten at a later clean-up,
    /// after the retention all the same. A record dated more than an hour ahead of now (the
    /// clock was set back since) does not stop the reading, so that it cannot hold back the
    /// records after it. Records kept by hash are in no order and are all read.
    pub(crate) fn expired_inbox(&self, cutoff_ms: u64) -> Result<Vec<RecordKey>> {
        let far_ahead = now_ms().saturating_add(CLOCK_SLACK_MS);
        let mut expired = Vec::new();
        for space in [RECEIVED, INBOX] {
            let prefix = RecordKey::new(space, &[&self.connector]);
            self.store.visit_records(&prefix, |key, bytes| {
                let record: InboxRecord = decode(&key, bytes)?;
                if record.at_ms < cutoff_ms {
                    expired.push(key);
                    Ok::<_, Error>(ControlFlow::Continue(()))
                } else if space == RECEIVED && record.at_ms <= far_ahead {
                    Ok(ControlFlow::Break(()))
                } else {
                    Ok(ControlFlow::Continue(()))
                }
            })?;
        }
        Ok(expired)
    }

    /// Deletes those of `keys` whose inbox record is still older than `cutoff_ms`, in one write,
    /// and returns their keys. The caller holds their ids' locks (see [`Self::inbox_lock_name`]):
    /// a webhook that reused an expired id after `keys` were listed wrote a fresh record, which
    /// must stay.
    pub(crate) fn delete_expired_inbox(
        &self,
        keys: &[RecordKey],
        cutoff_ms: u64,
    ) -> Result<Vec<RecordKey>> {
        let mut deleted = Vec::new();
        for key in keys {
            if self
                .inbox(key)?
                .is_some_and(|record| record.at_ms < cutoff_ms)
            {
                deleted.push(key.clone());
            }
        }
        self.write(deleted.iter().cloned().map(RecordWrite::delete).collect())?;
        Ok(deleted)
    }

    /// The name a webhook id's lock goes by: the hash of the id, which ends both kinds of inbox
    /// record key, so the clean-up, which sees only records, can take the same lock.
    pub(crate) fn inbox_lock_name(key: &RecordKey) -> String {
        key.parts().last().cloned().unwrap_or_default()
    }

    /// Writes records atomically and durably.
    pub(crate) fn write(&self, writes: Vec<RecordWrite>) -> Result<()> {
        self.store.write_records(writes)?;
        Ok(())
    }

    /// [`Records::write`] for async callers.
    pub(crate) async fn write_async(&self, writes: Vec<RecordWrite>) -> Result<()> {
        self.store.write_records_async(writes).await?;
        Ok(())
    }
}

fn entity_of(key: &RecordKey) -> Option<EntityKey> {
    let parts = key.parts();
    match parts.as_slice() {
        [_, kind, id] => EntityKey::new(kind.clone(), id.clone()).ok(),
        _ => None,
    }
}
