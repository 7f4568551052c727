//! A bounded cache of loaded documents, so memory does not grow with the number of entities on disk.
//!
//! Documents are moved out while a writer edits them and moved back afterwards; the per-entity
//! lock in `store` makes sure only one thread does that for an entity at a time.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use automerge::{Automerge, Change, ChangeHash};
use lru::LruCache;
use serde_json::{Map, Value as Json};

use crate::direct::WriteIndex;
use crate::key::EntityKey;
use crate::layout::EntityRecord;

/// An LRU map from entities to `V`, bounded by entry count and by the total weight of its
/// entries (an estimate of the memory each holds): the one shape of every cache here.
struct Bounded<V> {
    // A std Mutex: it is held only for a map operation, never across I/O or an await.
    entries: Mutex<Entries<V>>,
    capacity: usize,
    max_weight: u64,
}

struct Entries<V> {
    map: LruCache<EntityKey, (V, u64)>,
    weight: u64,
}

impl<V> Bounded<V> {
    fn new(capacity: usize, max_weight: u64) -> Self {
        Self {
            // Unbounded to `lru`, which would reserve room for every entry up front; the count
            // bound is kept in `put`, so memory grows with the entries actually held.
            entries: Mutex::new(Entries {
                map: LruCache::unbounded(),
                weight: 0,
            }),
            capacity: capacity.max(1),
            max_weight,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries<V>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the entry of `key` out, with its weight.
    fn take(&self, key: &EntityKey) -> Option<(V, u64)> {
        let mut entries = self.lock();
        let taken = entries.map.pop(key);
        if let Some((_, weight)) = &taken {
            entries.weight -= weight;
        }
        taken
    }

    /// Puts an entry (back), evicting the least recently used ones while there are more than
    /// the count bound or they weigh more than the weight bound. An entry that alone weighs more
    /// than the weight bound is not kept. Returns the entries that left (`key`'s earlier one
    /// included), for the caller to drop outside the lock: dropping a large document takes a
    /// while.
    #[must_use = "the entries that left are the caller's to drop"]
    fn put(&self, key: EntityKey, value: V, weight: u64) -> Vec<(EntityKey, V)> {
        if weight > self.max_weight {
            let earlier = self.take(&key).map(|(old, _)| (key.clone(), old));
            return earlier.into_iter().chain([(key, value)]).collect();
        }
        let mut evicted = Vec::new();
        let mut entries = self.lock();
        // The entry `key` had, if any.
        if let Some((old_key, (old, old_weight))) = entries.map.push(key, (value, weight)) {
            entries.weight -= old_weight;
            evicted.push((old_key, old));
        }
        entries.weight += weight;
        while entries.map.len() > self.capacity || entries.weight > self.max_weight {
            let Some((old_key, (old, old_weight))) = entries.map.pop_lru() else {
                break;
            };
            entries.weight -= old_weight;
            evicted.push((old_key, old));
        }
        evicted
    }

    fn len(&self) -> usize {
        self.lock().map.len()
    }

    fn weight(&self) -> u64 {
        self.lock().weight
    }
}

impl<V: Clone> Bounded<V> {
    /// A copy of the entry of `key`, which stays.
    fn get(&self, key: &EntityKey) -> Option<V> {
        self.lock().map.get(key).map(|(value, _)| value.clone())
    }
}

/// What a loaded document is taken to weigh in memory, from the bytes of its changes as
/// Automerge encodes them uncompressed (`Change::raw_bytes`): its op set keeps every value ever
/// written, overwritten ones included. For documents of 10 to 1,000 fields, 1 to 400 changes and
/// values up to 200 KB this came to 0.66-1.25 times the memory they held with Automerge 0.12
/// (`cargo run --release -p lockstep-store --example document_memory`).
pub(crate) fn document_weight(history_bytes: u64) -> u64 {
    16 * 1024 + history_bytes.saturating_add(history_bytes / 4)
}

/// A document as the cache and the writers hold it, with the bytes of its changes (see
/// [`document_weight`]), which grow with every change committed to it.
///
/// Local edits of a settled entity are built from its [`WriteIndex`] without touching the
/// document (see `direct`); the document takes those changes later, all at once, when it is
/// needed itself ([`LoadedDoc::materialize`]). Until then `pending` holds them, in the order they
/// were built, and the index is the one that knows the entity's heads.
///
/// A hollow one ([`LoadedDoc::hollow`]) has no document at all: it stands for the document on
/// disk, for a local write built from the index alone; `pending` then holds only what that write
/// built, until it is committed.
pub(crate) struct LoadedDoc {
    // Boxed: an `Automerge` is 3.5 KiB, and a write moves its document in and out of the cache
    // and through its batch several times. `None` when hollow.
    pub(crate) doc: Option<Box<Automerge>>,
    pub(crate) history_bytes: u64,
    /// Changes committed to disk and not yet applied to `doc`; never any without `index`.
    pub(crate) pending: Vec<Change>,
    /// What building a local change needs, when it is known and up to date.
    pub(crate) index: Option<Box<WriteIndex>>,
}

impl LoadedDoc {
    /// A document with nothing pending and no index.
    pub(crate) fn new(doc: Automerge, history_bytes: u64) -> Self {
        Self {
            doc: Some(Box::new(doc)),
            history_bytes,
            pending: Vec::new(),
            index: None,
        }
    }

    /// The entity as it is on disk, without its document: what a local write built from the
    /// index needs, and nothing else. Anything that needs the document loads it from disk.
    pub(crate) fn hollow(hollow: Hollow) -> Self {
        Self {
            doc: None,
            history_bytes: hollow.history_bytes,
            pending: Vec::new(),
            index: Some(hollow.index),
        }
    }

    /// Whether the document is not loaded (see [`LoadedDoc::hollow`]).
    pub(crate) fn is_hollow(&self) -> bool {
        self.doc.is_none()
    }

    /// The entity's heads, counting the changes still pending.
    pub(crate) fn heads(&self) -> Vec<ChangeHash> {
        match (&self.doc, &self.index) {
            (Some(doc), _) if self.pending.is_empty() => doc.get_heads(),
            (_, Some(index)) => index.heads().to_vec(),
            (Some(doc), None) => doc.get_heads(),
            (None, None) => unreachable!("a hollow document always has its index"),
        }
    }

    /// Applies the pending changes to the document, in one batch. `false` when Automerge
    /// refuses them (never seen; they are its own changes), or when the document is hollow;
    /// the document must then be dropped and loaded from disk, where every committed change is.
    pub(crate) fn materialize(&mut self) -> bool {
        let Some(doc) = &mut self.doc else {
            return false;
        };
        if self.pending.is_empty() {
            return true;
        }
        let pending = std::mem::take(&mut self.pending);
        matches!(
            catch_unwind(AssertUnwindSafe(|| doc.apply_changes_batch(pending))),
            Ok(Ok(()))
        )
    }
}

/// The write index of an entity whose document is not loaded, and its history's bytes (see
/// [`LoadedDoc::hollow`]).
pub(crate) struct Hollow {
    index: Box<WriteIndex>,
    history_bytes: u64,
}

impl Hollow {
    /// The heads of the version the index is of.
    pub(crate) fn heads(&self) -> &[ChangeHash] {
        self.index.heads()
    }
}

impl std::ops::Deref for LoadedDoc {
    type Target = Automerge;

    fn deref(&self) -> &Automerge {
        debug_assert!(
            self.pending.is_empty(),
            "a document read with changes pending"
        );
        self.doc
            .as_deref()
            .expect("a hollow document is never read")
    }
}

impl std::ops::DerefMut for LoadedDoc {
    fn deref_mut(&mut self) -> &mut Automerge {
        debug_assert!(
            self.pending.is_empty(),
            "a document edited with changes pending"
        );
        self.doc
            .as_deref_mut()
            .expect("a hollow document is never edited")
    }
}

/// How many more write indexes than documents the cache keeps: an index weighs about a
/// twentieth of its document (a few hundred bytes for a few fields, against at least 16 KiB).
pub(crate) const INDEXES_PER_DOCUMENT: usize = 16;

/// The loaded documents, and the write indexes of documents evicted from them (see
/// [`LoadedDoc::hollow`]): a local write of an entity whose document was evicted is built from
/// its index, without loading the document, as long as its index and JSON are still held.
pub(crate) struct DocCache {
    documents: Bounded<LoadedDoc>,
    indexes: Bounded<Hollow>,
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
}

impl DocCache {
    /// At most `capacity` documents, weighing at most `max_bytes` together, and
    /// [`INDEXES_PER_DOCUMENT`] times as many write indexes weighing an eighth of that.
    pub(crate) fn new(capacity: usize, max_bytes: u64) -> Self {
        Self {
            documents: Bounded::new(capacity, max_bytes),
            indexes: Bounded::new(capacity.saturating_mul(INDEXES_PER_DOCUMENT), max_bytes / 8),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Takes a document out of the cache, counting the hit or miss.
    pub(crate) fn take(&self, key: &EntityKey) -> Option<LoadedDoc> {
        let taken = self.take_uncounted(key);
        self.count(taken.is_some());
        taken
    }

    /// Takes a document out of the cache; the caller counts the hit or miss ([`DocCache::count`]).
    pub(crate) fn take_uncounted(&self, key: &EntityKey) -> Option<LoadedDoc> {
        self.documents.take(key).map(|(doc, _)| doc)
    }

    /// Counts a document read served from the cache (`hit`) or loaded from disk.
    pub(crate) fn count(&self, hit: bool) {
        let counter = if hit { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes the write index of an evicted document out of the cache. It may be of an older
    /// version than the one on disk: the caller compares.
    pub(crate) fn take_hollow(&self, key: &EntityKey) -> Option<Hollow> {
        self.indexes.take(key).map(|(hollow, _)| hollow)
    }

    /// Puts a document (back) into the cache, evicting the least recently used ones if full;
    /// a hollow one keeps only its index. A document evicted to make room leaves its index
    /// behind, if it has one: every change a cached document holds, pending or not, is on disk.
    /// (A document that alone weighs more than the bound is not kept, and neither is its index.)
    pub(crate) fn put(&self, key: EntityKey, document: LoadedDoc) {
        if document.is_hollow() {
            debug_assert!(
                document.pending.is_empty(),
                "a hollow document cached with changes not on disk"
            );
            self.put_index(key, document);
            return;
        }
        let weight = document_weight(document.history_bytes);
        let evicted = self.documents.put(key.clone(), document, weight);
        for (evicted_key, evicted) in evicted {
            // Another document of the same entity is not evicted but replaced.
            if evicted_key != key {
                self.put_index(evicted_key, evicted);
            }
        }
    }

    /// Keeps the index of `document`, if it has one, and drops the rest.
    fn put_index(&self, key: EntityKey, document: LoadedDoc) {
        let LoadedDoc {
            index,
            history_bytes,
            ..
        } = document;
        if let Some(index) = index {
            // The index's own estimate, plus its box, the entity's key and the LRU's entry.
            let key_bytes = (key.kind.as_str().len() + key.id.as_str().len()) as u64;
            let weight = 128 + key_bytes + index.weight();
            let hollow = Hollow {
                index,
                history_bytes,
            };
            drop(self.indexes.put(key, hollow, weight));
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.documents.len()
    }

    /// How many write indexes of evicted documents are held.
    pub(crate) fn indexes(&self) -> usize {
        self.indexes.len()
    }

    /// What the documents held weigh together (see [`document_weight`]).
    pub(crate) fn bytes(&self) -> u64 {
        self.documents.weight()
    }
}

/// The fields of recently written entities as JSON, each with the version it is of, so that a
/// local write can work out the entity it leaves by applying its patch to them instead of
/// reading the whole document back. An entry only ever serves the exact version it was made
/// for; anything else is a miss, and the caller reads the document.
pub(crate) struct JsonCache {
    entries: Bounded<CachedFields>,
}

/// An entity's fields at one version.
pub(crate) struct CachedFields {
    /// The version the fields are of.
    pub(crate) version: String,
    /// The fields.
    pub(crate) fields: Map<String, Json>,
    /// Whether they are settled (see `document::Current`).
    pub(crate) settled: bool,
}

impl JsonCache {
    /// At most `capacity` entities' fields, weighing at most `max_bytes` together.
    pub(crate) fn new(capacity: usize, max_bytes: u64) -> Self {
        Self {
            entries: Bounded::new(capacity, max_bytes),
        }
    }

    /// Takes out the fields of `key` at `version`, if they are here.
    pub(crate) fn take(&self, key: &EntityKey, version: &str) -> Option<CachedFields> {
        self.entries
            .take(key)
            .map(|(cached, _)| cached)
            .filter(|cached| cached.version == version)
    }

    /// A copy of the fields of `key` at `version`, if they are here; they stay.
    pub(crate) fn fields_at(&self, key: &EntityKey, version: &str) -> Option<Map<String, Json>> {
        let mut entries = self.entries.lock();
        let (cached, _) = entries.map.get(key)?;
        (cached.version == version).then(|| cached.fields.clone())
    }

    /// Remembers the fields of `key` at a version.
    pub(crate) fn put(&self, key: EntityKey, fields: CachedFields) {
        let weight = 64 + fields.version.len() as u64 + map_weight(&fields.fields);
        drop(self.entries.put(key, fields, weight));
    }
}

/// The entity records of recently written or loaded entities, so that a write does not read its
/// entity's record from sled. An entry is only filled or replaced by a thread holding the
/// entity's stripe lock, from what is on disk or what it has just applied, so it always equals
/// the record on disk.
pub(crate) struct RecordCache {
    entries: Bounded<EntityRecord>,
}

impl RecordCache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            entries: Bounded::new(capacity, u64::MAX),
        }
    }

    /// The record of `key`, if it is here.
    pub(crate) fn get(&self, key: &EntityKey) -> Option<EntityRecord> {
        self.entries.get(key)
    }

    /// Remembers the record of `key` as it is on disk now.
    pub(crate) fn put(&self, key: EntityKey, record: EntityRecord) {
        // A record is small and of about one size; the count bounds them.
        drop(self.entries.put(key, record, 1));
    }
}

/// About what JSON fields hold in memory: each value's own bytes, what its strings hold and a
/// map entry's share of its map.
fn map_weight(fields: &Map<String, Json>) -> u64 {
    fields
        .iter()
        .map(|(key, value)| 48 + key.len() as u64 + value_weight(value))
        .sum()
}

fn value_weight(value: &Json) -> u64 {
    let own = std::mem::size_of::<Json>() as u64;
    own + match value {
        Json::String(text) => text.len() as u64,
        Json::Array(items) => items.iter().map(value_weight).sum(),
        Json::Object(fields) => map_weight(fields),
        Json::Null | Json::Bool(_) | Json::Number(_) => 0,
    }
}
