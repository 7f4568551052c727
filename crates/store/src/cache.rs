//! A bounded cache of loaded documents, so memory does not grow with the number of entities on disk.
//!
//! Documents are moved out while a writer edits them and moved back afterwards; the per-entity
//! lock in `store` makes sure only one thread does that for an entity at a time.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use automerge::Automerge;
use lru::LruCache;
use serde_json::{Map, Value as Json};

use crate::key::EntityKey;
use crate::layout::EntityRecord;

/// An LRU map from entities to `V`, bounded by entry count: the one shape of every cache here.
struct Bounded<V> {
    // A std Mutex: it is held only for a map operation, never across I/O or an await.
    entries: Mutex<LruCache<EntityKey, V>>,
}

impl<V> Bounded<V> {
    fn new(capacity: usize) -> Self {
        let capacity = NonZeroUsize::new(capacity.max(1)).expect("max(1) is never zero");
        Self {
            entries: Mutex::new(LruCache::new(capacity)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<EntityKey, V>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the entry of `key` out.
    fn take(&self, key: &EntityKey) -> Option<V> {
        self.lock().pop(key)
    }

    /// Puts an entry (back), evicting the least recently used one if full. The evicted entry is
    /// dropped outside the lock: dropping a large document takes a while.
    fn put(&self, key: EntityKey, value: V) {
        let evicted = self.lock().push(key, value);
        drop(evicted);
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

impl<V: Clone> Bounded<V> {
    /// A copy of the entry of `key`, which stays.
    fn get(&self, key: &EntityKey) -> Option<V> {
        self.lock().get(key).cloned()
    }
}

pub(crate) struct DocCache {
    // Boxed: an `Automerge` is 3.5 KiB, and a write moves its document in and out of the cache
    // and through its batch several times.
    documents: Bounded<Box<Automerge>>,
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
}

impl DocCache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            documents: Bounded::new(capacity),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Takes a document out of the cache, counting the hit or miss.
    pub(crate) fn take(&self, key: &EntityKey) -> Option<Box<Automerge>> {
        let taken = self.documents.take(key);
        let counter = if taken.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        taken
    }

    /// Puts a document (back) into the cache, evicting the least recently used one if full.
    pub(crate) fn put(&self, key: EntityKey, document: Box<Automerge>) {
        self.documents.put(key, document);
    }

    pub(crate) fn len(&self) -> usize {
        self.documents.len()
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
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            entries: Bounded::new(capacity),
        }
    }

    /// Takes out the fields of `key` at `version`, if they are here.
    pub(crate) fn take(&self, key: &EntityKey, version: &str) -> Option<CachedFields> {
        self.entries
            .take(key)
            .filter(|cached| cached.version == version)
    }

    /// Remembers the fields of `key` at a version.
    pub(crate) fn put(&self, key: EntityKey, fields: CachedFields) {
        self.entries.put(key, fields);
    }
}

/// The entity records of recently written or loaded entities, so that a write does not read its
/// entity's record from sled (a lookup that also waits while the writer applies a batch). An
/// entry is only filled or replaced by a thread holding the entity's stripe lock, from what is on
/// disk or what it has just applied, so it always equals the record on disk.
pub(crate) struct RecordCache {
    entries: Bounded<EntityRecord>,
}

impl RecordCache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            entries: Bounded::new(capacity),
        }
    }

    /// The record of `key`, if it is here.
    pub(crate) fn get(&self, key: &EntityKey) -> Option<EntityRecord> {
        self.entries.get(key)
    }

    /// Remembers the record of `key` as it is on disk now.
    pub(crate) fn put(&self, key: EntityKey, record: EntityRecord) {
        self.entries.put(key, record);
    }
}
