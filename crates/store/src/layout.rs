//! How the store lays its data out in sled.
//!
//! Everything but the intent of `atomic` lives in the default tree, so that a change, its entity
//! record and its feed row are written as one set that a crash leaves whole or absent
//! (`atomic`). Keys start with a one-byte tag:
//!
//! | key | value |
//! |---|---|
//! | `e` kind `\0` id | the entity record (`EntityRecord`, JSON) |
//! | `s` kind `\0` id | the compacted snapshot (Automerge `save()` bytes) |
//! | `c` kind `\0` id `\0` n (u32 BE) | an incremental chunk of changes after the snapshot |
//! | `a` kind `\0` id `\0` change hash (32 bytes) | where the changes of one merge from elsewhere came from (`Arrival`, JSON: an origin such as `peer:north`), keyed by the first of them |
//! | `f` seq (u64 BE) | a feed row (`FeedRow`, JSON) |
//! | `r` space `\0` part `\0` ... | a side record of another crate (`records`) |
//! | `p` key n (u32 BE) | piece n of the snapshot or chunk stored under key, when that is over `pieces::PIECE_BYTES` (the key then holds a header: see `pieces`) |
//!
//! Kinds and ids never contain `\0` (see `key`), so prefixes never overlap. The one other tree,
//! `intent`, holds the intent of the set of writes being applied, while it is (`atomic`).

use serde::{Deserialize, Serialize};

use crate::feed::Seq;
use crate::key::{EntityId, EntityKey, Kind};

pub(crate) const ENTITY: u8 = b'e';
pub(crate) const SNAPSHOT: u8 = b's';
pub(crate) const CHUNK: u8 = b'c';
pub(crate) const ARRIVAL: u8 = b'a';
pub(crate) const FEED: u8 = b'f';
pub(crate) const RECORD: u8 = b'r';
pub(crate) const PIECE: u8 = b'p';

/// What the store keeps about an entity besides its document.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct EntityRecord {
    /// The version after the last change.
    pub version: String,
    /// Whether the entity has any field (an entity without fields reads as absent).
    pub exists: bool,
    /// The number of the next incremental chunk.
    pub next_chunk: u32,
    /// How many incremental chunks follow the snapshot.
    pub chunks: u32,
    /// The bytes of those chunks, to decide when to compact.
    pub chunk_bytes: u64,
    /// The bytes of the snapshot.
    pub snapshot_bytes: u64,
    /// Whether the chunks after the first (after the snapshot) form one chain: each holds a
    /// single change, and each change after the second chunk's depends on the one before it.
    /// Such chunks have one order, so they load in one call (several times faster than one call
    /// per change) without Automerge reordering them. Records written before this field existed
    /// read as `false`.
    #[serde(default)]
    pub linear: bool,
    /// Whether every change in the chunks, in the order the chunks hold them, depends on the one
    /// before it, the first chunk's included: then there is only one order to apply them in,
    /// and all of them load in one call. A new entity's first write often holds two changes (a
    /// nested map's structural change and the edit into it), which `linear` alone loads one at
    /// a time. Records written before this field existed read as `false`.
    #[serde(default)]
    pub chain: bool,
    /// The bytes of every change the entity has, as Automerge encodes a change uncompressed
    /// (`Change::raw_bytes`), which is what its document weighs in the cache (see
    /// `cache::document_weight`); `None` in records written before this field existed, for
    /// which loading the document works it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_bytes: Option<u64>,
}

pub(crate) fn entity_key(tag: u8, key: &EntityKey) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(2 + key.kind.as_str().len() + key.id.as_str().len());
    bytes.push(tag);
    bytes.extend_from_slice(key.kind.as_str().as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(key.id.as_str().as_bytes());
    bytes
}

pub(crate) fn chunk_key(key: &EntityKey, number: u32) -> Vec<u8> {
    let mut bytes = entity_key(CHUNK, key);
    bytes.push(0);
    bytes.extend_from_slice(&number.to_be_bytes());
    bytes
}

pub(crate) fn chunk_prefix(key: &EntityKey) -> Vec<u8> {
    let mut bytes = entity_key(CHUNK, key);
    bytes.push(0);
    bytes
}

/// The key of piece `number` of the value stored under `key`. The pieces of one key are adjacent
/// in key order, and a key of another value's pieces never falls between them: a snapshot key
/// that extends another one (an id that extends another id) goes on with an id's byte, never 0,
/// where the piece numbers of fewer than 2^24 pieces start with a 0 byte; chunk keys of one kind
/// and id have one length, and other tags another first byte.
pub(crate) fn piece_key(key: &[u8], number: u32) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(1 + key.len() + 4);
    bytes.push(PIECE);
    bytes.extend_from_slice(key);
    bytes.extend_from_slice(&number.to_be_bytes());
    bytes
}

/// The origin the changes of one merge from elsewhere arrived with, for history: stored under
/// the first change's hash, naming the others.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Arrival {
    pub origin: String,
    /// The hashes of the merge's other changes (in hex, as Automerge writes them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also: Vec<automerge::ChangeHash>,
}

/// The key of the arrival record of a merge whose first new change is `hash`.
pub(crate) fn arrival_key(key: &EntityKey, hash: &automerge::ChangeHash) -> Vec<u8> {
    let mut bytes = arrival_prefix(key);
    bytes.extend_from_slice(&hash.0);
    bytes
}

pub(crate) fn arrival_prefix(key: &EntityKey) -> Vec<u8> {
    let mut bytes = entity_key(ARRIVAL, key);
    bytes.push(0);
    bytes
}

pub(crate) fn kind_prefix(tag: u8, kind: &Kind) -> Vec<u8> {
    let mut bytes = vec![tag];
    bytes.extend_from_slice(kind.as_str().as_bytes());
    bytes.push(0);
    bytes
}

/// The entity key encoded in an `e` key, if it is one.
pub(crate) fn parse_entity_key(bytes: &[u8]) -> Option<EntityKey> {
    let rest = bytes.strip_prefix(&[ENTITY])?;
    let split = rest.iter().position(|byte| *byte == 0)?;
    let kind = std::str::from_utf8(&rest[..split]).ok()?;
    let id = std::str::from_utf8(&rest[split + 1..]).ok()?;
    Some(EntityKey {
        kind: Kind::new(kind).ok()?,
        id: EntityId::new(id).ok()?,
    })
}

pub(crate) fn feed_key(seq: Seq) -> [u8; 9] {
    let mut bytes = [0u8; 9];
    bytes[0] = FEED;
    bytes[1..].copy_from_slice(&seq.to_be_bytes());
    bytes
}

pub(crate) fn parse_feed_key(bytes: &[u8]) -> Option<Seq> {
    let rest = bytes.strip_prefix(&[FEED])?;
    let array: [u8; 8] = rest.try_into().ok()?;
    Some(Seq(u64::from_be_bytes(array)))
}
