//! The `Store`: every change to every entity enters here, is persisted with its feed row in one
//! atomic set of writes (`atomic`), and is acknowledged only after a group flush.
//!
//! Concurrency: writers and readers of one entity take that entity's stripe lock, so a document
//! is edited by one thread at a time; different entities proceed in parallel. The short `commit`
//! lock orders feed rows: it is held only to number a row and apply its batch, never for
//! Automerge work or a flush. All methods block; async callers run them on a blocking thread.

use std::borrow::Cow;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use automerge::{ActorId, Automerge, Change, ChangeHash, ReadDoc, SaveOptions};
use serde::Serialize;
use serde_json::{Map, Value as Json};
use tokio::sync::watch;

use crate::atomic::{self, Applier};
use crate::batch::{self, Edit, WriteRequest};
use crate::cache::{
    CachedFields, DocCache, JsonCache, LoadedDoc, RecordCache, INDEXES_PER_DOCUMENT,
};
use crate::direct::{self, WriteIndex};
use crate::document::{self, FieldConflict};
use crate::durability::{Durability, FlushTicket, SyncMode};
use crate::error::{Error, Result};
use crate::feed::{FeedRow, RecentRows, Seq};
use crate::files::SyncedFiles;
use crate::key::{EntityId, EntityKey, Kind};
use crate::layout::{self, EntityRecord};
use crate::nested;
use crate::origin::Origin;
use crate::pieces;
use crate::records::{CommitView, RecordKey, RecordWrite};
use crate::version::{IfMatch, Version};

/// How a store is opened.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// The sled directory; created if missing.
    pub path: PathBuf,
    /// How many documents to keep loaded at most.
    pub cache_entries: usize,
    /// How much memory the loaded documents may take together, as estimated from their
    /// changes (see [`StoreStats::cached_document_bytes`]); the JSON fields kept of recently
    /// written entities may take a quarter of it more.
    pub cache_bytes: u64,
    /// Which failure an acknowledged write survives.
    pub sync_mode: SyncMode,
    /// Compact an entity's incremental chunks into a snapshot once it has this many.
    pub compact_after_chunks: u32,
    /// sled's own page cache, in bytes.
    pub sled_cache_bytes: u64,
    /// How many threads apply the writes queued with [`Store::submit`]. One, by default: on
    /// two cores a second writer only contended with the first (for stripes and sled's write
    /// lock) and made smaller batches; one writer gave 15-20% more durable writes a second.
    pub writer_threads: usize,
    /// Whether local edits of settled entities are built as changes without Automerge's
    /// transaction (see [`StoreStats::built_writes`]): the same changes, byte for byte, at a
    /// fraction of the CPU. On by default; off, every write takes the transaction, which is
    /// there to compare the two.
    pub build_writes: bool,
}

impl StoreConfig {
    /// Defaults for a store in `path`: 4,096 cached documents weighing 256 MiB at most, `flush` durability,
    /// compaction after 32 chunks, a 64 MiB sled cache and one writer thread.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            cache_entries: 4096,
            cache_bytes: 256 * 1024 * 1024,
            sync_mode: SyncMode::default(),
            compact_after_chunks: 32,
            sled_cache_bytes: 64 * 1024 * 1024,
            writer_threads: 1,
            build_writes: true,
        }
    }
}

/// An entity as read: its fields and the version they are at.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Entity {
    /// The entity's kind.
    pub kind: Kind,
    /// The entity's id.
    pub id: EntityId,
    /// Its version (the document heads).
    pub version: String,
    /// Its fields.
    pub data: Map<String, Json>,
}

/// What a write did.
#[derive(Clone, Debug, PartialEq)]
pub struct Written {
    /// The entity after the write; `None` when the write left it without fields (deleted), and
    /// from replication's batch merges, which do not read it (see `exists`).
    pub entity: Option<Entity>,
    /// Whether the entity has fields after the write.
    pub exists: bool,
    /// The version after the write (also set when the entity was deleted).
    pub version: String,
    /// Whether the entity did not exist before and does now.
    pub created: bool,
    /// The feed row written, or `None` when the write changed nothing.
    pub seq: Option<Seq>,
}

/// A write that is applied, and visible to readers of this store, but not yet known to be
/// durable: acknowledge it only after [`Unflushed::wait`] or [`Unflushed::wait_async`].
#[must_use = "a write may be acknowledged only after waiting for its flush"]
pub struct Unflushed<T> {
    value: T,
    ticket: FlushTicket,
    durability: Durability,
}

impl<T> Unflushed<T> {
    /// Blocks until the write is durable and returns what it did.
    ///
    /// # Errors
    /// [`Error::Closed`] when the flush failed or the store was closed first; the write may
    /// then be lost.
    pub fn wait(self) -> Result<T> {
        self.durability.wait_for(self.ticket)?;
        Ok(self.value)
    }

    /// Waits, without blocking a thread, until the write is durable, and returns what it did.
    ///
    /// # Errors
    /// As [`Unflushed::wait`].
    pub async fn wait_async(self) -> Result<T> {
        self.durability.wait_for_async(self.ticket).await?;
        Ok(self.value)
    }
}

impl<T> Unflushed<Vec<T>> {
    /// One [`Unflushed`] per item, each waiting for the same flush.
    pub(crate) fn split(self) -> impl Iterator<Item = Unflushed<T>> {
        let Self {
            value,
            ticket,
            durability,
        } = self;
        value.into_iter().map(move |value| Unflushed {
            value,
            ticket,
            durability: durability.clone(),
        })
    }
}

impl Written {
    /// Whether the write found the entity or left it with fields: false only for a delete of
    /// an entity that did not exist, which writes nothing.
    pub fn found(&self) -> bool {
        self.seq.is_some() || self.exists
    }
}

/// Who is writing and under which condition.
#[derive(Clone, Debug)]
pub struct WriteOptions {
    /// Recorded in the change and its feed row.
    pub origin: Origin,
    /// When set, the write fails with [`Error::VersionMismatch`] unless the entity exists (at
    /// this version, for [`IfMatch::At`]).
    pub if_match: Option<IfMatch>,
}

impl WriteOptions {
    /// An unconditional write from `origin`.
    pub fn new(origin: Origin) -> Self {
        Self {
            origin,
            if_match: None,
        }
    }
}

/// One change in an entity's history.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HistoryEntry {
    /// The version right after this change (readable with `get_at`).
    pub version: String,
    /// Where it came from to this store: the origin it arrived with from elsewhere
    /// (`peer:<name>`), or, for a change made here, its author.
    pub origin: Option<String>,
    /// Who made it, as recorded in the change by the replica that made it.
    pub author: Option<String>,
    /// When, in seconds since the Unix epoch, as recorded by the replica that made it.
    pub time: i64,
    /// The dotted paths of the fields it set or removed.
    pub fields: Vec<String>,
}

/// A page of entities of one kind, in id order.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Page {
    /// The entities on this page.
    pub items: Vec<Entity>,
    /// The cursor for the next page (`after`), when there may be more.
    pub next: Option<EntityId>,
}

/// Counters for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    /// Changes committed since the store was opened.
    pub writes: u64,
    /// Of those, local edits built without Automerge's transaction (see the `direct` module).
    pub built_writes: u64,
    /// Of those, the ones built from the write index of an evicted document, without loading
    /// the document.
    pub index_only_writes: u64,
    /// Flushes run since the store was opened (each covers a group of writes).
    pub flushes: u64,
    /// Files of large values and pages sled wrote (over about 128 KiB each) that were synced
    /// (see `sync_mode`).
    pub blob_syncs: u64,
    /// Document reads served from the cache.
    pub cache_hits: u64,
    /// Document reads that loaded from disk.
    pub cache_misses: u64,
    /// Documents loaded now.
    pub cached_documents: u64,
    /// What the loaded documents are estimated to take in memory: per document about 16 KiB
    /// plus 1.25 times its changes' uncompressed bytes (Automerge keeps every value ever
    /// written, overwritten ones included).
    pub cached_document_bytes: u64,
    /// Write indexes kept of evicted documents, from which their entities' next local writes
    /// are built without loading them (at most 16 times the document bound).
    pub cached_write_indexes: u64,
    /// The highest durable feed sequence number.
    pub feed_seq: u64,
}

/// How many of the last committed feed rows are kept in memory (see [`RecentRows`]): a few
/// seconds' worth at full write speed, about 1 MiB.
const RECENT_ROWS: usize = 4096;

/// The number of per-entity lock stripes; a power of two well above the number of concurrent writers.
const STRIPES: usize = 1024;

pub(crate) struct Inner {
    db: sled::Db,
    /// Applies every write to `db`, each set whole or not at all (see `atomic`).
    applier: Applier,
    /// The writer thread's queue (see `batch`).
    queue: batch::Queue,
    durability: Durability,
    cache: DocCache,
    /// The JSON of recently written entities (see `JsonCache`).
    json: JsonCache,
    /// The entity records of recently written or loaded entities (see `RecordCache`).
    records: RecordCache,
    stripes: Vec<Mutex<()>>,
    /// The last feed sequence number handed out; held while numbering and applying one batch.
    commit: Mutex<Seq>,
    /// The last feed row of each kind written lately (see [`KindSeqs`]).
    kind_seqs: Mutex<KindSeqs>,
    /// The feed rows committed last (see [`RecentRows`]).
    recent: RecentRows,
    actor: ActorId,
    config: StoreConfig,
    writes: AtomicU64,
    built_writes: AtomicU64,
    index_only_writes: AtomicU64,
}

impl Drop for Inner {
    /// Stops the flush thread when the last clone of the store goes away, so that it lets go of
    /// sled and the directory can be opened again; `close` has usually done this already.
    fn drop(&mut self) {
        // The only error is that a flush failed (already logged) or the store was closed before.
        let _ = self.durability.close();
    }
}

/// The most kinds [`KindSeqs`] remembers; past that it forgets them all and starts again.
const MAX_TRACKED_KINDS: usize = 4096;

/// The last feed row of each kind written after `since`, so that a reader of one kind's rows
/// can tell, without reading the feed, that none came (see [`Store::may_have_rows_after`]).
/// Rows up to `since` are not known here: those were written before the store was opened, or
/// before the map last outgrew [`MAX_TRACKED_KINDS`] and was emptied.
struct KindSeqs {
    since: Seq,
    last: HashMap<Kind, Seq>,
}

impl KindSeqs {
    fn after(since: Seq) -> Self {
        Self {
            since,
            last: HashMap::new(),
        }
    }

    fn record(&mut self, kind: &Kind, seq: Seq) {
        if let Some(last) = self.last.get_mut(kind) {
            *last = seq;
            return;
        }
        if self.last.len() >= MAX_TRACKED_KINDS {
            // Every row before this one becomes unknown.
            *self = Self::after(Seq(seq.0 - 1));
        }
        self.last.insert(kind.clone(), seq);
    }

    fn may_have_rows_after(&self, kind: &Kind, after: Seq) -> bool {
        after < self.since || self.last.get(kind).is_some_and(|last| *last > after)
    }
}

/// The durable entity store; cheap to clone, shared by every part of the server.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl Store {
    /// Opens (or creates) the store in `config.path`.
    ///
    /// # Errors
    /// [`Error::Storage`] when sled cannot open the directory (unreadable, or still in use by
    /// another process after a wait of two seconds).
    pub fn open(config: StoreConfig) -> Result<Self> {
        let db = open_sled(&config)?;
        let (applier, undone) = Applier::open(&db)?;
        if undone > 0 {
            tracing::warn!(
                keys = undone,
                "undid a write that a crash interrupted before it was acknowledged"
            );
        }
        let last_seq = db
            .scan_prefix([layout::FEED])
            .keys()
            .next_back()
            .transpose()?
            .and_then(|key| layout::parse_feed_key(&key))
            .unwrap_or(Seq::ZERO);
        let files = SyncedFiles::open(&config.path, config.sync_mode, &db)?;
        let durability = Durability::start(db.clone(), files, last_seq);
        let stripes = (0..STRIPES).map(|_| Mutex::new(())).collect();
        let (queue, jobs) = batch::queue();
        Ok(Self {
            inner: Arc::new_cyclic(|inner| {
                batch::start_writers(inner, jobs, config.writer_threads);
                Inner {
                    db,
                    applier,
                    queue,
                    durability,
                    cache: DocCache::new(config.cache_entries, config.cache_bytes),
                    // As many as the write indexes the document cache keeps: a write built from
                    // an index needs the entity's JSON and record too.
                    json: JsonCache::new(
                        config.cache_entries.saturating_mul(INDEXES_PER_DOCUMENT),
                        config.cache_bytes / 4,
                    ),
                    records: RecordCache::new(
                        config.cache_entries.saturating_mul(INDEXES_PER_DOCUMENT),
                    ),
                    stripes,
                    commit: Mutex::new(last_seq),
                    kind_seqs: Mutex::new(KindSeqs::after(last_seq)),
                    recent: RecentRows::new(RECENT_ROWS),
                    // A fresh actor per opening: a change that was applied but never flushed before a
                    // crash can then never collide with a different change under the same actor and seq.
                    actor: ActorId::random(),
                    config,
                    writes: AtomicU64::new(0),
                    built_writes: AtomicU64::new(0),
                    index_only_writes: AtomicU64::new(0),
                }
            }),
        })
    }

    pub(crate) fn from_inner(inner: Arc<Inner>) -> Self {
        Self { inner }
    }

    /// The writer thread's queue.
    pub(crate) fn queue(&self) -> &batch::Queue {
        &self.inner.queue
    }

    /// Applies an RFC 7386 JSON merge patch, creating the entity if it does not exist.
    ///
    /// Returns once the change and its feed row are durable.
    ///
    /// # Errors
    /// [`Error::UnwritableValue`] when the patch is not an object or would create an entity with no
    /// fields, [`Error::VersionMismatch`] when `if_match` is stale, storage errors otherwise.
    pub fn patch(&self, key: &EntityKey, patch: &Json, options: &WriteOptions) -> Result<Written> {
        self.write_one(key, Edit::MergePatch(patch.clone()), options)
    }

    /// Wraps what a write returned with the flush that makes it durable.
    pub(crate) fn unflushed<T>(&self, value: T) -> Result<Unflushed<T>> {
        Ok(Unflushed {
            value,
            ticket: self.inner.durability.request()?,
            durability: self.inner.durability.clone(),
        })
    }

    /// The entity's version, also when it is deleted; `None` when it never existed.
    ///
    /// # Errors
    /// Storage errors only.
    pub fn version(&self, key: &EntityKey) -> Result<Option<String>> {
        Ok(self.record(key)?.map(|record| record.version))
    }

    /// One side record.
    ///
    /// # Errors
    /// Storage errors only.
    pub fn read_record(&self, key: &RecordKey) -> Result<Option<Vec<u8>>> {
        Ok(self
            .inner
            .db
            .get(key.as_bytes())?
            .map(|value| value.to_vec()))
    }

    /// Every side record under `prefix` (its children, not `prefix` itself), in key order.
    ///
    /// # Errors
    /// Storage errors only.
    pub fn scan_records(&self, prefix: &RecordKey) -> Result<Vec<(RecordKey, Vec<u8>)>> {
        self.inner
            .db
            .scan_prefix(prefix.child_prefix())
            .map(|entry| {
                let (key, value) = entry?;
                Ok((RecordKey::from_bytes(&key), value.to_vec()))
            })
            .collect()
    }

    /// Calls `visit` with each side record under `prefix` (its children, not `prefix` itself), in
    /// key order, one at a time: for a scan of more records than should be held in memory at
    /// once. Stops when `visit` answers [`ControlFlow::Break`] or returns an error.
    ///
    /// # Errors
    /// Storage errors, and whatever `visit` returns.
    pub fn visit_records<E: From<Error>>(
        &self,
        prefix: &RecordKey,
        mut visit: impl FnMut(RecordKey, &[u8]) -> std::result::Result<ControlFlow<()>, E>,
    ) -> std::result::Result<(), E> {
        for entry in self.inner.db.scan_prefix(prefix.child_prefix()) {
            let (key, value) = entry.map_err(Error::from)?;
            if visit(RecordKey::from_bytes(&key), &value)?.is_break() {
                break;
            }
        }
        Ok(())
    }

    /// Writes side records as one atomic set and returns once it is durable.
    ///
    /// # Errors
    /// [`Error::Closed`] after [`Store::close`], storage errors otherwise.
    pub fn write_records(&self, writes: Vec<RecordWrite>) -> Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        self.apply_records(&writes)?;
        self.inner.durability.wait()
    }

    /// [`Store::write_records`] for async callers: applies the batch at once and waits for its
    /// flush without blocking a thread.
    ///
    /// # Errors
    /// As [`Store::write_records`].
    pub async fn write_records_async(&self, writes: Vec<RecordWrite>) -> Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        self.apply_records(&writes)?;
        self.unflushed(())?.wait_async().await
    }

    /// Writes side records as one atomic set without waiting for a flush: they become durable
    /// with the next flush anyone asks for. For records that a crash may lose at no cost but
    /// repeated work, such as a replication cursor written once what it covers is durable
    /// (sled keeps writes in order, so a record never outlives what was written before it).
    ///
    /// # Errors
    /// As [`Store::write_records`].
    pub fn write_records_lazily(&self, writes: Vec<RecordWrite>) -> Result<()> {
        self.apply_records(&writes)
    }

    /// Applies side records as one atomic set, without waiting for the flush.
    fn apply_records(&self, writes: &[RecordWrite]) -> Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        self.inner.durability.check()?;
        self.apply(writes.iter().map(RecordWrite::to_write).collect())
    }

    /// Applies `writes` to sled whole or not at all (`atomic`), without waiting for the flush.
    /// Should that fail part-way, the store refuses further writes as after a failed flush: a
    /// write that was applied in part is undone at the next start, never acknowledged.
    fn apply(&self, writes: Vec<atomic::Write>) -> Result<()> {
        self.inner
            .applier
            .apply(writes)
            .inspect_err(|error| self.inner.durability.fail(&format!("{error:?}")))
    }

    /// Replaces all fields of the entity with `fields`, creating it if it does not exist.
    ///
    /// # Errors
    /// As [`Store::patch`]; an empty object is refused (use [`Store::delete`]).
    pub fn replace(
        &self,
        key: &EntityKey,
        fields: &Json,
        options: &WriteOptions,
    ) -> Result<Written> {
        self.write_one(key, Edit::Replace(fields.clone()), options)
    }

    /// Removes every field, so the entity reads as absent; its history is kept.
    ///
    /// Returns `None` when the entity does not exist.
    ///
    /// # Errors
    /// [`Error::VersionMismatch`] when `if_match` is stale, storage errors otherwise.
    pub fn delete(&self, key: &EntityKey, options: &WriteOptions) -> Result<Option<Written>> {
        let written = self.write_one(key, Edit::Delete, options)?;
        Ok(written.found().then_some(written))
    }

    /// One write through [`Store::write_many`], waiting for its flush.
    fn write_one(&self, key: &EntityKey, edit: Edit, options: &WriteOptions) -> Result<Written> {
        let request = WriteRequest {
            key: key.clone(),
            edit,
            options: options.clone(),
        };
        let mut outcomes = self.write_many(std::slice::from_ref(&request))?.wait()?;
        outcomes.pop().expect("one outcome per request")
    }

    /// Merges Automerge data from elsewhere (a saved document, or one or more encoded changes)
    /// into the entity, recording `origin` in the feed and, for history, as where its new changes
    /// came from.
    ///
    /// Changes the entity already has are ignored; `seq` is `None` when nothing was new. Changes
    /// whose dependencies the entity lacks are dropped too: send them with their dependencies.
    ///
    /// # Errors
    /// [`Error::Decode`] when the bytes are not valid Automerge data, including inputs on which
    /// Automerge itself panics; the entity is left as it was. Catching those panics needs them to
    /// unwind: a binary built with `panic = "abort"`, or whose panic hook aborts (as fuzzers'
    /// do), crashes on such input instead. Bytes that are not Automerge data at all may also be
    /// ignored: `Ok` with `seq: None`, nothing merged. A document nested deeper than
    /// [`crate::MAX_DEPTH`] is refused with [`Error::Decode`] too.
    pub fn merge(&self, key: &EntityKey, bytes: &[u8], origin: &Origin) -> Result<Written> {
        let written = self.merge_unflushed(key, bytes, origin)?;
        self.wait_durable()?;
        Ok(written)
    }

    /// [`Store::merge`] without waiting for the flush.
    pub(crate) fn merge_unflushed(
        &self,
        key: &EntityKey,
        bytes: &[u8],
        origin: &Origin,
    ) -> Result<Written> {
        let guard = self.lock(key);
        let staged = self.stage_merge(key, bytes, origin, AfterJson::Read)?;
        let written = self.commit_one(staged);
        drop(guard);
        written
    }

    /// Merges `bytes` into the entity's document and stages the result (see [`Store::stage`]);
    /// the caller holds the entity's stripe lock until the stage is committed.
    pub(crate) fn stage_merge(
        &self,
        key: &EntityKey,
        bytes: &[u8],
        origin: &Origin,
        json: AfterJson,
    ) -> Result<Staged> {
        // Compressed parts are inflated under a bound first: Automerge would inflate them whole.
        crate::inflation::check([bytes])?;
        // Changes left out for lack of their dependencies are the sender's to send again, with
        // them (replication falls back to sending the whole document).
        self.stage_incoming(key, origin, json, "decoding the data", |doc| {
            doc.load_incremental(bytes).map(|_| ())
        })
        .map(|(staged, _)| staged)
    }

    /// Applies data from elsewhere to the entity's document with `apply`, checks the result and
    /// stages it (see [`Store::stage`]) with an arrival record naming `origin` for its new
    /// changes (see `layout::Arrival`); the caller holds the entity's stripe lock until the stage
    /// is committed. An error or a panic in `apply` is [`Error::Decode`] (a panic named by
    /// `doing`), and the half-updated document is dropped, so the next reader reloads it from disk.
    ///
    /// Also returns the dependencies of the changes left out because the document lacks them
    /// (see [`Store::vet_incoming`]), for the caller to ask for.
    pub(crate) fn stage_incoming(
        &self,
        key: &EntityKey,
        origin: &Origin,
        json: AfterJson,
        doing: &str,
        apply: impl FnOnce(&mut Automerge) -> std::result::Result<(), automerge::AutomergeError>,
    ) -> Result<(Staged, Vec<ChangeHash>)> {
        let mut doc = self.load(key)?;
        let before = doc.get_heads();
        let existed = document::has_fields(&doc);
        match catch_unwind(AssertUnwindSafe(|| apply(&mut doc))) {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(Error::Decode(error.to_string())),
            Err(_) => return Err(Error::Decode(format!("automerge panicked {doing}"))),
        }
        let Vetted {
            doc,
            changes,
            missing,
        } = self.vet_incoming(doc, &before)?;
        let mut staged = self.stage(
            key,
            doc,
            &before,
            changes,
            existed,
            origin,
            |_| Vec::new(),
            None,
            json,
        )?;
        // A change keeps the origin of the site that made it; history also says where it
        // came from to this one. One record per merge, under its first new change.
        if let Some((first, rest)) = staged.added.split_first() {
            let arrival = layout::Arrival {
                origin: origin.as_str().to_string(),
                also: rest.to_vec(),
            };
            staged.writes.push((
                layout::arrival_key(key, first),
                Some(serde_json::to_vec(&arrival).expect("an arrival always serializes")),
            ));
        }
        Ok((staged, missing))
    }

    /// Checks a document that has just taken in data from elsewhere (a merge, a sync message) and
    /// returns the document to persist, with the changes it gained since `before` when the check
    /// had to build them (for [`Store::stage`], which would build them again), and the
    /// dependencies of the changes it left out because the document lacks them.
    ///
    /// # Errors
    /// [`Error::Decode`] when the data nests objects deeper than [`crate::MAX_DEPTH`].
    pub(crate) fn vet_incoming(&self, doc: LoadedDoc, before: &[ChangeHash]) -> Result<Vetted> {
        // Local writes stop at MAX_DEPTH; deeper data from elsewhere would make reads of the
        // entity recurse that deep and its history cost the square of the depth.
        let changes = document::may_nest_deeper_than(&doc, document::MAX_DEPTH)
            .then(|| doc.get_changes(before));
        if let Some(changes) = &changes {
            if document::creates_deeper_than(&doc, changes, document::MAX_DEPTH) {
                return Err(Error::Decode(format!(
                    "objects are nested more than {} levels deep",
                    document::MAX_DEPTH
                )));
            }
        }
        let missing = doc.get_missing_deps(&[]);
        if !missing.is_empty() {
            // Changes whose dependencies this document lacks wait in Automerge's queue, unchecked:
            // their columns are only decoded once the dependencies arrive, maybe in a local write
            // outside `catch_unwind`. They are not persisted, so they are not kept either: a sync
            // session asks for `missing` by name and for the dropped changes again (see
            // `replica`), and a merge's sender sends them again with their dependencies.
            // What it keeps is what it had before plus what `Store::stage` counts in.
            let doc = LoadedDoc::new(without_orphans(&doc, &self.inner.actor)?, doc.history_bytes);
            return Ok(Vetted {
                doc,
                changes: None,
                missing,
            });
        }
        Ok(Vetted {
            doc,
            changes,
            missing,
        })
    }

    /// The entity as it is now, or `None` when it does not exist.
    ///
    /// # Errors
    /// Storage errors only.
    pub fn get(&self, key: &EntityKey) -> Result<Option<Entity>> {
        let _guard = self.lock(key);
        // An entity without a record never existed: there is nothing to read.
        let Some(record) = self.record_locked(key)? else {
            return Ok(None);
        };
        // A write leaves the entity's JSON in memory: when it is of the current version, the
        // document need not be read (nor take the changes pending in it, see `direct`).
        if let Some(fields) = self.inner.json.fields_at(key, &record.version) {
            return Ok(entity_of(key, &record.version, fields));
        }
        self.read_locked(key, |doc| Ok(entity_from(key, doc, None)))
    }

    /// The entity as it was at `version`, or `None` when it had no fields then.
    ///
    /// # Errors
    /// [`Error::UnknownVersion`] when the entity never had that version.
    pub fn get_at(&self, key: &EntityKey, version: &Version) -> Result<Option<Entity>> {
        self.read(key, |doc| {
            let known = version
                .heads()
                .iter()
                .all(|head| document::has_change(doc, head));
            if !known {
                return Err(Error::UnknownVersion {
                    key: key.clone(),
                    version: version.to_string(),
                });
            }
            Ok(entity_from(key, doc, Some(version.heads())))
        })
    }

    /// Every change of the entity, oldest first; `None` when it never existed.
    ///
    /// # Errors
    /// Storage errors only.
    pub fn history(&self, key: &EntityKey) -> Result<Option<Vec<HistoryEntry>>> {
        // A copy of the document and its arrival records, taken together under the entity's
        // lock (so a merge cannot land between the two reads); the entries are worked out after
        // the lock is let go, so writers of the entity do not wait for them.
        let (doc, arrivals) = self.read(key, |doc| Ok((doc.clone(), self.arrivals(key)?)))?;
        let changes = doc.get_changes(&[]);
        if changes.is_empty() {
            return Ok(None);
        }
        let fields = document::fields_of_changes(&changes);
        Ok(Some(
            changes
                .iter()
                .zip(fields)
                .filter(|(change, _)| !nested::is_structural(change))
                .map(|(change, fields)| {
                    let author = change.message().map(document::origin_of_message);
                    HistoryEntry {
                        version: change.hash().to_string(),
                        origin: arrivals.get(&change.hash()).cloned().or(author.clone()),
                        author,
                        time: change.timestamp(),
                        fields,
                    }
                })
                .collect(),
        ))
    }

    /// The origin each change merged from elsewhere arrived with, from the entity's arrival
    /// records (see `layout::Arrival`).
    fn arrivals(&self, key: &EntityKey) -> Result<HashMap<ChangeHash, String>> {
        let prefix = layout::arrival_prefix(key);
        let mut arrivals = HashMap::new();
        for entry in self.inner.db.scan_prefix(&prefix) {
            let (raw_key, value) = entry?;
            let corrupt = |detail: String| Error::Corrupt {
                what: format!("the arrival records of {key}"),
                detail,
            };
            let first = ChangeHash::try_from(&raw_key[prefix.len()..])
                .map_err(|_| corrupt("a key that does not end in a change hash".into()))?;
            let arrival: layout::Arrival =
                serde_json::from_slice(&value).map_err(|error| corrupt(error.to_string()))?;
            for hash in arrival.also {
                arrivals.insert(hash, arrival.origin.clone());
            }
            arrivals.insert(first, arrival.origin);
        }
        Ok(arrivals)
    }

    /// The fields whose concurrent values differ, with every value and the winner;
    /// `None` when the entity does not exist.
    ///
    /// # Errors
    /// Storage errors only.
    pub fn conflicts(&self, key: &EntityKey) -> Result<Option<Vec<FieldConflict>>> {
        self.read(key, |doc| {
            if !document::has_fields(doc) {
                return Ok(None);
            }
            Ok(Some(document::conflicts(doc)))
        })
    }

    /// The entity's document as Automerge `save()` bytes; `None` when it never existed.
    ///
    /// # Errors
    /// Storage errors only.
    pub fn save(&self, key: &EntityKey) -> Result<Option<Vec<u8>>> {
        self.read(key, |doc| Ok((!doc.is_empty()).then(|| save_document(doc))))
    }

    /// Up to `limit` existing entities of `kind` with ids after `after`, in id order.
    ///
    /// # Errors
    /// Storage errors only.
    pub fn list(&self, kind: &Kind, after: Option<&EntityId>, limit: usize) -> Result<Page> {
        let prefix = layout::kind_prefix(layout::ENTITY, kind);
        let start = match after {
            Some(id) => {
                let mut start = prefix.clone();
                start.extend_from_slice(id.as_str().as_bytes());
                // The smallest key after `after` itself: ids never contain `\0`.
                start.push(0);
                start
            }
            None => prefix.clone(),
        };
        let mut items = Vec::new();
        let mut next = None;
        for entry in self.inner.db.range(start..) {
            let (raw_key, raw_record) = entry?;
            if !raw_key.starts_with(&prefix) {
                break;
            }
            let record = decode_record(&raw_key, &raw_record)?;
            if !record.exists {
                continue;
            }
            let Some(key) = layout::parse_entity_key(&raw_key) else {
                continue;
            };
            if items.len() == limit {
                next = items.last().map(|entity: &Entity| entity.id.clone());
                break;
            }
            if let Some(entity) = self.get(&key)? {
                items.push(entity);
            }
        }
        Ok(Page { items, next })
    }

    /// Up to `limit` durable feed rows after `since`, optionally only those of `kind`.
    ///
    /// # Errors
    /// Storage errors, or [`Error::Corrupt`] when a row cannot be decoded.
    pub fn feed(&self, since: Seq, kind: Option<&Kind>, limit: usize) -> Result<Vec<FeedRow>> {
        if let Some(recent) = self.recent_feed(since, kind, limit) {
            return Ok(recent);
        }
        let durable = self.inner.durability.durable_seq();
        let mut rows = Vec::new();
        if since >= durable {
            return Ok(rows);
        }
        let start = layout::feed_key(since.next());
        let end = layout::feed_key(durable.next());
        for entry in self.inner.db.range(start..end) {
            if rows.len() >= limit {
                break;
            }
            let (_, raw_row) = entry?;
            let row: FeedRow =
                serde_json::from_slice(&raw_row).map_err(|error| Error::Corrupt {
                    what: "a feed row".into(),
                    detail: error.to_string(),
                })?;
            if kind.is_some_and(|kind| *kind != row.kind) {
                continue;
            }
            rows.push(row);
        }
        Ok(rows)
    }

    /// What [`Store::feed`] returns, when it can be had without reading the disk: the rows after
    /// `since` are among the last few thousand committed, which the store keeps in memory, as
    /// they are for a reader that keeps up with the feed. `None` when `feed` would read the disk.
    /// It takes no lock that a write holds for long, so an async task may call it.
    pub fn recent_feed(
        &self,
        since: Seq,
        kind: Option<&Kind>,
        limit: usize,
    ) -> Option<Vec<FeedRow>> {
        let durable = self.inner.durability.durable_seq();
        if since >= durable {
            return Some(Vec::new());
        }
        self.inner.recent.read(since, durable, kind, limit)
    }

    /// Whether the feed may hold rows of `kind` after `after`: `false` only when it is sure
    /// that it holds none, so that a reader following one kind need not read the feed for
    /// every flush of other kinds' rows.
    pub fn may_have_rows_after(&self, kind: &Kind, after: Seq) -> bool {
        self.inner
            .kind_seqs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .may_have_rows_after(kind, after)
    }

    /// A receiver of the highest durable feed sequence number; it changes after every group flush.
    pub fn subscribe(&self) -> watch::Receiver<Seq> {
        self.inner.durability.subscribe()
    }

    /// The highest durable feed sequence number.
    pub fn last_seq(&self) -> Seq {
        self.inner.durability.durable_seq()
    }

    /// Rewrites every entity that has incremental chunks as one snapshot.
    ///
    /// # Errors
    /// Storage errors only.
    pub fn compact_all(&self) -> Result<usize> {
        let mut compacted = 0;
        for entry in self.inner.db.scan_prefix([layout::ENTITY]) {
            let (raw_key, raw_record) = entry?;
            let record = decode_record(&raw_key, &raw_record)?;
            let Some(key) = layout::parse_entity_key(&raw_key) else {
                continue;
            };
            if record.chunks == 0 {
                continue;
            }
            let guard = self.lock(&key);
            let doc = self.load(&key)?;
            let mut writes = Vec::new();
            let mut record = self.record_locked(&key)?.unwrap_or(record);
            write_snapshot(&self.inner.db, &key, &doc, &mut record, &mut writes)?;
            record.history_bytes = Some(doc.history_bytes);
            writes.push((
                layout::entity_key(layout::ENTITY, &key),
                Some(encode_record(&record)),
            ));
            self.apply(writes)?;
            self.inner.records.put(key.clone(), record);
            self.inner.cache.put(key, doc);
            drop(guard);
            compacted += 1;
        }
        self.inner.durability.wait()?;
        Ok(compacted)
    }

    /// The entity's Automerge data as stored (its snapshot, if any, followed by its incremental
    /// chunks), without loading the document; `None` when it never existed. The bytes are a
    /// valid input to [`Store::merge`] and to Automerge's `load`, and cost a read, not a decode,
    /// which makes them the cheap way to hand a whole entity to a replica.
    ///
    /// # Errors
    /// Storage errors only.
    pub fn stored_document(&self, key: &EntityKey) -> Result<Option<Vec<u8>>> {
        // Under the entity's lock, so a compaction cannot swap the snapshot between the reads.
        let _guard = self.lock(key);
        if self.record(key)?.is_none() {
            return Ok(None);
        }
        let mut bytes = Vec::new();
        if let Some(snapshot) = self.snapshot(key)? {
            bytes.extend_from_slice(&snapshot);
        }
        for chunk in self.chunks(key)? {
            bytes.extend_from_slice(&chunk);
        }
        Ok(Some(bytes))
    }

    /// The bytes the store keeps for one entity's document (record, snapshot and chunks), for
    /// measurements; the arrival records history reads are left out.
    ///
    /// # Errors
    /// Storage errors only.
    pub fn stored_bytes(&self, key: &EntityKey) -> Result<u64> {
        let mut total = 0u64;
        for tag in [layout::ENTITY, layout::SNAPSHOT] {
            if let Some(value) = self.inner.db.get(layout::entity_key(tag, key))? {
                total += pieces::stored_length(&value);
            }
        }
        for entry in self.inner.db.scan_prefix(layout::chunk_prefix(key)) {
            total += pieces::stored_length(&entry?.1);
        }
        Ok(total)
    }

    /// Whether the store accepts writes: false after [`Store::close`] or a failed flush.
    pub fn is_open(&self) -> bool {
        self.writable().is_ok()
    }

    /// Whether the store accepts writes, and if not why.
    ///
    /// # Errors
    /// [`Error::Failed`] after a failed flush, [`Error::Closed`] after [`Store::close`].
    pub fn writable(&self) -> Result<()> {
        self.inner.durability.check()
    }

    /// Counters for metrics.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            writes: self.inner.writes.load(Ordering::Relaxed),
            built_writes: self.inner.built_writes.load(Ordering::Relaxed),
            flushes: self.inner.durability.flushes(),
            blob_syncs: self.inner.durability.blob_syncs(),
            cache_hits: self.inner.cache.hits.load(Ordering::Relaxed),
            cache_misses: self.inner.cache.misses.load(Ordering::Relaxed),
            cached_documents: self.inner.cache.len() as u64,
            cached_document_bytes: self.inner.cache.bytes(),
            cached_write_indexes: self.inner.cache.indexes() as u64,
            index_only_writes: self.inner.index_only_writes.load(Ordering::Relaxed),
            feed_seq: self.last_seq().0,
        }
    }

    /// Flushes everything and stops the flush thread; writes after this fail with [`Error::Closed`].
    ///
    /// # Errors
    /// [`Error::Closed`] when the last flush failed.
    pub fn close(&self) -> Result<()> {
        self.inner.durability.close()
    }

    pub(crate) fn lock(&self, key: &EntityKey) -> MutexGuard<'_, ()> {
        // A poisoned stripe only means another thread panicked while holding it; the document it
        // was editing was never put back in the cache, so the data behind the lock is sound.
        self.stripe(self.stripe_of(key))
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The number of the stripe lock that guards `key`.
    pub(crate) fn stripe_of(&self, key: &EntityKey) -> usize {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        (hasher.finish() as usize) % STRIPES
    }

    pub(crate) fn stripe(&self, stripe: usize) -> &Mutex<()> {
        &self.inner.stripes[stripe]
    }

    pub(crate) fn record(&self, key: &EntityKey) -> Result<Option<EntityRecord>> {
        let raw_key = layout::entity_key(layout::ENTITY, key);
        self.inner
            .db
            .get(&raw_key)?
            .map(|raw| decode_record(&raw_key, &raw))
            .transpose()
    }

    /// [`Error::VersionMismatch`] unless the entity meets `expected`; for a caller holding the
    /// entity's stripe lock.
    pub(crate) fn check_if_match(&self, key: &EntityKey, expected: &IfMatch) -> Result<()> {
        let current = self
            .record_locked(key)?
            .filter(|record| record.exists)
            .map(|record| Version::parse(&record.version))
            .transpose()
            .map_err(|error| Error::Corrupt {
                what: format!("the version of {key}"),
                detail: error.to_string(),
            })?;
        let exists = current.is_some();
        expected.check(key, exists, &current.unwrap_or_default())
    }

    /// [`Store::record`] for a caller holding the entity's stripe lock: from the record cache when
    /// it is there, and kept there when it is read from disk.
    fn record_locked(&self, key: &EntityKey) -> Result<Option<EntityRecord>> {
        if let Some(record) = self.inner.records.get(key) {
            return Ok(Some(record));
        }
        let record = self.record(key)?;
        if let Some(record) = &record {
            self.inner.records.put(key.clone(), record.clone());
        }
        Ok(record)
    }

    /// The entity's document from the cache or disk; a new empty one when it never existed.
    /// The caller holds the entity's stripe lock.
    pub(crate) fn load(&self, key: &EntityKey) -> Result<LoadedDoc> {
        self.load_as(key, Access::Edit)
    }

    /// [`Store::load`] for `access`: a document to edit comes without pending changes or an
    /// index (an edit other than a local one built from it would leave the index behind), and one
    /// to read keeps its index. A local write takes its document as it is instead
    /// ([`Store::load_to_build`]).
    pub(crate) fn load_as(&self, key: &EntityKey, access: Access) -> Result<LoadedDoc> {
        let Some(doc) = self.inner.cache.take(key) else {
            // The document loaded replaces the index of an evicted one.
            drop(self.inner.cache.take_hollow(key));
            return self.load_from_disk(key);
        };
        let mut doc = self.materialized(key, doc, &[])?;
        if access == Access::Edit {
            doc.index = None;
        }
        Ok(doc)
    }

    /// `doc` with its pending changes applied. Should Automerge refuse them (never seen: they are
    /// its own changes), the document as it is on disk, where every committed one is, plus
    /// `unsaved`, the changes staged with the document that are not on disk yet.
    fn materialized(
        &self,
        key: &EntityKey,
        mut doc: LoadedDoc,
        unsaved: &[Change],
    ) -> Result<LoadedDoc> {
        // A hollow document is the one on disk: it is loaded from there.
        if doc.is_hollow() {
            self.inner.cache.count(false);
        } else {
            if doc.materialize() {
                return Ok(doc);
            }
            tracing::error!(entity = %key, "automerge refused this replica's own changes; loading the entity from disk");
        }
        let history_bytes = doc.history_bytes;
        drop(doc);
        let mut fresh = self.load_from_disk(key)?;
        fresh
            .apply_changes(unsaved.iter().cloned())
            .map_err(|error| Error::Corrupt {
                what: key.to_string(),
                detail: error.to_string(),
            })?;
        fresh.history_bytes = history_bytes;
        Ok(fresh)
    }

    /// The entity's snapshot, if it has one, joined from its pieces (see `pieces`).
    fn snapshot(&self, key: &EntityKey) -> Result<Option<sled::IVec>> {
        let snapshot_key = layout::entity_key(layout::SNAPSHOT, key);
        match self.inner.db.get(&snapshot_key)? {
            Some(value) => Ok(Some(pieces::read(&self.inner.db, &snapshot_key, value)?)),
            None => Ok(None),
        }
    }

    /// The entity's incremental chunks in order, each joined from its pieces (see `pieces`).
    fn chunks(&self, key: &EntityKey) -> Result<Vec<sled::IVec>> {
        self.inner
            .db
            .scan_prefix(layout::chunk_prefix(key))
            .map(|entry| {
                let (chunk_key, value) = entry?;
                pieces::read(&self.inner.db, &chunk_key, value)
            })
            .collect()
    }

    /// The entity's document as stored; a new empty one when it never existed.
    fn load_from_disk(&self, key: &EntityKey) -> Result<LoadedDoc> {
        // The record says what there is to read: nothing at all for an entity that never
        // existed, which is every creation, and no chunk scan right after a compaction.
        let Some(record) = self.record_locked(key)? else {
            return Ok(LoadedDoc::new(
                Automerge::new().with_actor(self.inner.actor.clone()),
                0,
            ));
        };
        let snapshot = if record.snapshot_bytes > 0 {
            self.snapshot(key)?
        } else {
            None
        };
        let chunks = if record.chunks > 0 {
            self.chunks(key)?
        } else {
            Vec::new()
        };
        // Every change is loaded in the order it was written. Automerge sorts the changes of one
        // load topologically, which can apply them in another order than the document they were
        // written from, and `save()` would then return other bytes after a reopen: same heads,
        // another layout. So changes are loaded one at a time, except where the record says they
        // form a chain, which has only one order: all the chunks (`chain`), or the chunks after
        // the first (`linear`).
        let loaded = catch_unwind(AssertUnwindSafe(|| {
            let mut doc = match &snapshot {
                Some(snapshot) => Automerge::load(snapshot)?,
                None => Automerge::new(),
            };
            let one_by_one = if record.chain {
                0
            } else if record.linear {
                chunks.len().min(1)
            } else {
                chunks.len()
            };
            for chunk in &chunks[..one_by_one] {
                for change in split_changes(chunk) {
                    doc.load_incremental(change)?;
                }
            }
            if one_by_one < chunks.len() {
                doc.load_incremental(&chunks[one_by_one..].concat())?;
            }
            Ok::<_, automerge::AutomergeError>(doc)
        }));
        let corrupt = |detail: String| Error::Corrupt {
            what: key.to_string(),
            detail,
        };
        let doc = match loaded {
            Ok(Ok(doc)) => doc,
            Ok(Err(error)) => return Err(corrupt(error.to_string())),
            Err(_) => return Err(corrupt("automerge panicked loading it".into())),
        };
        // `load_incremental` skips what it cannot decode; the record says what must be there.
        let version = Version::from_heads(doc.get_heads()).to_string();
        if version != record.version {
            return Err(corrupt(format!(
                "loaded version {version}, the record says {}",
                record.version
            )));
        }
        let history_bytes = record
            .history_bytes
            .unwrap_or_else(|| history_bytes(&doc.get_changes(&[])));
        Ok(LoadedDoc::new(
            doc.with_actor(self.inner.actor.clone()),
            history_bytes,
        ))
    }

    pub(crate) fn read<T>(
        &self,
        key: &EntityKey,
        f: impl FnOnce(&Automerge) -> Result<T>,
    ) -> Result<T> {
        let _guard = self.lock(key);
        self.read_locked(key, f)
    }

    /// [`Store::read`] for a caller holding the entity's stripe lock.
    fn read_locked<T>(
        &self,
        key: &EntityKey,
        f: impl FnOnce(&Automerge) -> Result<T>,
    ) -> Result<T> {
        let doc = self.load_as(key, Access::Read)?;
        let result = f(&doc);
        self.put_back(key, doc);
        result
    }

    /// Loads the entity, checks `options.if_match`, applies `edit` and stages the result (see
    /// [`Store::stage`]). The caller holds the entity's stripe lock until the stage is committed.
    pub(crate) fn stage_write(
        &self,
        key: &EntityKey,
        options: &WriteOptions,
        edit: document::JsonEdit<'_>,
        records: impl FnOnce(&CommitView<'_>) -> Vec<RecordWrite>,
    ) -> Result<Staged> {
        let ToBuild {
            mut doc,
            before,
            cached,
        } = self.load_to_build(key)?;
        let stamp = document::Stamp {
            message: options.origin.to_string(),
            time: (now_ms() / 1000) as i64,
        };
        let version = Version::from_heads(before.clone());
        // Whether the entity exists is settled below (a built write needs fields to build on).
        let matches = options
            .if_match
            .as_ref()
            .is_none_or(|expected| expected.holds(!before.is_empty(), &version));
        if let (document::JsonEdit::MergePatch(patch), true) =
            (&edit, matches && self.inner.config.build_writes)
        {
            // The fields to build on: none for a new entity, the JSON cached, or, for an entity
            // just loaded from disk, its fields read with its index (less than the transaction's
            // lookups field by field).
            let read = match &cached {
                None if !before.is_empty() && doc.pending.is_empty() => match doc.index {
                    Some(_) => Some(document::fields(&doc, None)),
                    None => WriteIndex::with_fields(&doc).map(|(index, fields)| {
                        debug_assert_eq!(fields, document::fields(&doc, None));
                        doc.index = Some(Box::new(index));
                        fields
                    }),
                },
                _ => None,
            };
            let current = if before.is_empty() {
                // A new entity has no version an `If-Match` could name.
                options.if_match.is_none().then_some(None)
            } else {
                cached
                    .as_ref()
                    .map(|cached| &cached.fields)
                    .or(read.as_ref())
                    .map(Some)
            };
            if let Some(current) = current {
                match self.build_write(key, doc, &before, patch, current, &stamp, options) {
                    Ok((doc, staging)) => {
                        let writes =
                            side_writes(records, &staging.version, staging.entity.as_ref(), true);
                        return self.stage_changes(doc, staging, writes);
                    }
                    Err(unbuilt) => doc = unbuilt,
                }
            }
        }
        // The transaction edits the document itself: it takes what is pending first, and the
        // index, which would not follow the edit, goes.
        let mut doc = self.materialized(key, doc, &[])?;
        doc.index = None;
        let before = doc.get_heads();
        let existed = document::has_fields(&doc);
        if let Some(expected) = &options.if_match {
            let current = Version::from_heads(before.clone());
            if let Err(mismatch) = expected.check(key, existed, &current) {
                self.put_back(key, doc);
                if let Some(cached) = cached {
                    self.inner.json.put(key.clone(), cached);
                }
                return Err(mismatch);
            }
        }
        // Whether the entity's fields are settled (a new document is), with the JSON above.
        let (current_json, settled) = match cached {
            _ if before.is_empty() => (Some(Map::new()), true),
            cached if !edit.needs_current() => (
                Some(Map::new()),
                cached.is_some_and(|cached| cached.settled),
            ),
            Some(cached) => (Some(cached.fields), cached.settled),
            None => (None, false),
        };
        // On failure the document may hold part of the write: it is dropped, not cached, so the
        // next reader loads what is on disk.
        let current = current_json
            .as_ref()
            .map(|fields| document::Current { fields, settled });
        let touched = edit.apply_to(&mut doc, &stamp, current)?;
        let json_after = current_json.map(|current| edit.apply(current));
        if !existed && !document::has_fields(&doc) && doc.get_heads() != before {
            // Creating an entity with no fields would make a change nobody can read; refuse it.
            return Err(Error::UnwritableValue(
                "the entity does not exist and the write gives it no fields".into(),
            ));
        }
        self.stage(
            key,
            doc,
            &before,
            None,
            existed,
            &options.origin,
            records,
            touched.fields(),
            json_after.map_or(AfterJson::Read, |fields| AfterJson::Known {
                fields,
                settled,
            }),
        )
    }

    /// The entity's document for a local write, as it is in the cache, pending changes and all,
    /// and its JSON before the write when it is cached for exactly that version. An entity whose
    /// document was evicted comes hollow when its index and JSON are both still held and of the
    /// version on disk, and is loaded from disk otherwise.
    fn load_to_build(&self, key: &EntityKey) -> Result<ToBuild> {
        let cache = &self.inner.cache;
        let doc = match cache.take_uncounted(key) {
            Some(doc) => {
                cache.count(true);
                doc
            }
            None => match self.hollow(key)? {
                // Neither a hit nor a load: the document is not read at all.
                Some(hollow) => return Ok(hollow),
                None => {
                    cache.count(false);
                    self.load_from_disk(key)?
                }
            },
        };
        let before = doc.heads();
        let cached = if before.is_empty() {
            None
        } else {
            let version = Version::from_heads(before.clone()).to_string();
            self.inner.json.take(key, &version)
        };
        Ok(ToBuild {
            doc,
            before,
            cached,
        })
    }

    /// The entity's hollow document and its JSON, when the index of its evicted document and
    /// its JSON are of the version on disk. The index is dropped either way.
    fn hollow(&self, key: &EntityKey) -> Result<Option<ToBuild>> {
        // (Indexes exist only where writes are built: never with `build_writes` off.)
        let Some(hollow) = self.inner.cache.take_hollow(key) else {
            return Ok(None);
        };
        let before = hollow.heads().to_vec();
        let version = Version::from_heads(before.clone()).to_string();
        let on_disk = self.record_locked(key)?;
        if on_disk.is_none_or(|record| record.version != version) {
            return Ok(None);
        }
        let Some(cached) = self.inner.json.take(key, &version) else {
            return Ok(None);
        };
        Ok(Some(ToBuild {
            doc: LoadedDoc::hollow(hollow),
            before,
            cached: Some(cached),
        }))
    }

    /// Builds a local merge patch from the entity's index (see `direct`) and works out what
    /// staging it needs, or hands the document back when the index cannot build it (an entity
    /// with concurrent values, a patch that writes a list). `current` is the entity's fields,
    /// `None` for a new entity; `before` is the document's heads.
    #[allow(
        clippy::too_many_arguments,
        reason = "what the write is, on what, and for whom, as `stage_write` has them"
    )]
    fn build_write<'a>(
        &self,
        key: &'a EntityKey,
        mut doc: LoadedDoc,
        before: &[ChangeHash],
        patch: &Map<String, Json>,
        current: Option<&Map<String, Json>>,
        stamp: &document::Stamp,
        options: &'a WriteOptions,
    ) -> std::result::Result<(LoadedDoc, Staging<'a>), LoadedDoc> {
        if current.is_some_and(Map::is_empty) {
            return Err(doc);
        }
        let new = current.is_none();
        let (current, ordered) = match current {
            Some(current) => (current.clone(), Cow::Borrowed(patch)),
            None => match direct::prepare_new(&mut doc, patch, stamp) {
                Some(prepared) => (prepared.current, prepared.patch),
                None => return Err(self.empty_document()),
            },
        };
        // An index is only ever built of a document without concurrent values, and only built
        // writes follow, so a document with an index is settled, whatever the JSON cached says
        // (a write that settles a conflict does not know it did: see `document::Current`).
        if doc.index.is_none() && doc.pending.is_empty() {
            doc.index = WriteIndex::of(&doc).map(Box::new);
        }
        let built = doc
            .index
            .as_mut()
            .and_then(|index| index.merge_patch(&ordered, &current, stamp));
        let fields = document::JsonEdit::MergePatch(patch).apply(current);
        let Some((change, touched)) = built.filter(|_| !fields.is_empty()) else {
            // The caller takes the transaction's path, which drops the index (it may hold part
            // of the patch); a new entity starts again from nothing.
            return Err(if new { self.empty_document() } else { doc });
        };
        // The maps a new entity's write made come first in its chunk (the document holds them).
        let mut changes = if new {
            doc.get_changes(&[])
        } else {
            Vec::new()
        };
        changes.push(change.clone());
        doc.pending.push(change);
        let after = doc.heads();
        let version = Version::from_heads(after.clone()).to_string();
        #[cfg(debug_assertions)]
        {
            // The document the pending changes make reads as the fields worked out.
            let mut applied = match &doc.doc {
                Some(loaded) => (**loaded).clone(),
                None => *self
                    .load_from_disk(key)
                    .expect("a hollow document's entity loads")
                    .doc
                    .expect("a document loaded from disk is not hollow"),
            };
            applied
                .apply_changes_batch(doc.pending.clone())
                .expect("the pending changes apply");
            assert_eq!(applied.get_heads(), after);
            assert_eq!(document::fields(&applied, None), fields);
            assert!(document::fields_settled(&applied, None).1);
        }
        // A new entity's feed row lists all its fields, as for a write by the transaction.
        let written = if new {
            document::all_fields(&fields)
        } else {
            touched
                .fields()
                .expect("a built write knows the fields it wrote")
        };
        let staging = Staging {
            key,
            before: before.to_vec(),
            after,
            existed: !new,
            exists: !fields.is_empty(),
            entity: entity_of(key, &version, fields),
            version,
            settled: true,
            fields: written,
            changes,
            origin: &options.origin,
            built: true,
        };
        Ok((doc, staging))
    }

    /// The document of an entity that has none yet.
    fn empty_document(&self) -> LoadedDoc {
        LoadedDoc::new(Automerge::new().with_actor(self.inner.actor.clone()), 0)
    }

    /// Returns a document that a write left unchanged to the cache (unless it never existed).
    pub(crate) fn put_back(&self, key: &EntityKey, doc: LoadedDoc) {
        let empty = doc.doc.as_ref().is_some_and(|loaded| loaded.is_empty());
        if !doc.pending.is_empty() || !empty {
            self.inner.cache.put(key.clone(), doc);
        }
    }

    /// Refuses every write from now on, as after a failed flush, logging `cause` (see
    /// `Durability::fail`).
    pub(crate) fn refuse_writes(&self, cause: &str) {
        self.inner.durability.fail(cause);
    }

    /// Blocks until everything applied to sled before this call is flushed (see `durability`).
    ///
    /// # Errors
    /// [`Error::Closed`] when the store is closed, [`Error::Failed`] when a flush failed.
    pub(crate) fn wait_durable(&self) -> Result<()> {
        self.inner.durability.wait()
    }

    /// Blocks until every change a read of an entity has returned so far is durable: at once,
    /// without a flush, when every feed row applied is already flushed. A change is in memory
    /// (and in sled) before its flush, and a reader holds the entity's stripe lock, which the
    /// commit holds from applying the change to recording its feed row as applied (and to
    /// putting the document back in the cache): what a read saw is counted then.
    ///
    /// # Errors
    /// [`Error::Closed`] when the store is closed, [`Error::Failed`] when a flush failed.
    pub fn wait_changes_durable(&self) -> Result<()> {
        self.inner.durability.wait_applied()
    }

    /// Works out what persisting `doc` takes (its new chunk or a snapshot, its entity record, the
    /// side records `records` returns) without touching sled; [`Store::commit`] writes it with its
    /// feed row. The caller holds the entity's stripe lock until then, and stages an entity at
    /// most once per commit, because the entity record read here must still be the one on disk.
    /// `changes` are the changes `doc` gained since `before`, when the caller already built them
    /// (`doc.get_changes(before)`). `known_fields` are the fields the change wrote, when the caller knows them (see
    /// [`document::Touched`]); otherwise they come from a diff. `json` says whether the entity's
    /// fields after the change are known, to be read from `doc`, or not wanted.
    #[allow(
        clippy::too_many_arguments,
        reason = "the one place every kind of change is staged"
    )]
    pub(crate) fn stage(
        &self,
        key: &EntityKey,
        doc: LoadedDoc,
        before: &[ChangeHash],
        changes: Option<Vec<Change>>,
        existed: bool,
        origin: &Origin,
        records: impl FnOnce(&CommitView<'_>) -> Vec<RecordWrite>,
        known_fields: Option<Vec<String>>,
        json: AfterJson,
    ) -> Result<Staged> {
        let after = doc.get_heads();
        let version = Version::from_heads(after.clone()).to_string();
        let exists = document::has_fields(&doc);
        let (entity, settled) = match json {
            AfterJson::Skip => (None, false),
            AfterJson::Known { fields, settled } => {
                let entity = entity_of(key, &version, fields);
                debug_assert_eq!(
                    serde_json::to_string(&entity).ok(),
                    serde_json::to_string(&entity_from(key, &doc, None)).ok(),
                    "the JSON worked out for a write differs from the document's"
                );
                debug_assert!(
                    !settled || document::fields_settled(&doc, None).1,
                    "a write said to leave the fields settled left a conflict"
                );
                (entity, settled)
            }
            AfterJson::Read => {
                let (fields, settled) = document::fields_settled(&doc, None);
                (entity_of(key, &version, fields), settled)
            }
        };
        let writes = side_writes(records, &version, entity.as_ref(), after != before);
        if after == before {
            // Nothing new, but what the caller sees may still be in a group that is not flushed:
            // the caller waits for the flush all the same.
            return Ok(Staged {
                key: key.clone(),
                doc,
                writes,
                added: Vec::new(),
                record: None,
                row: None,
                settled,
                built: false,
                written: Written {
                    entity,
                    exists,
                    version,
                    created: false,
                    seq: None,
                },
            });
        }
        let known_fields = match &entity {
            // A document that had nothing gained every field it has now.
            Some(entity) if before.is_empty() => Some(document::all_fields(&entity.data)),
            None if before.is_empty() && exists => Some(document::field_paths(&doc)),
            _ => known_fields,
        };
        let fields = match known_fields {
            Some(fields) => {
                debug_assert_eq!(fields, document::changed_fields(&doc.diff(before, &after)));
                fields
            }
            None => document::changed_fields(&doc.diff(before, &after)),
        };
        // What `save_after(before)` returns, keeping the changes' hashes.
        let changes = changes.unwrap_or_else(|| doc.get_changes(before));
        self.stage_changes(
            doc,
            Staging {
                key,
                before: before.to_vec(),
                after,
                version,
                existed,
                exists,
                entity,
                settled,
                fields,
                changes,
                origin,
                built: false,
            },
            writes,
        )
    }

    /// The part of [`Store::stage`] that no longer needs the document: the chunk or snapshot, the
    /// entity record and the feed row of `change`, which `doc` holds (applied or pending).
    fn stage_changes(
        &self,
        mut doc: LoadedDoc,
        staging: Staging<'_>,
        mut writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    ) -> Result<Staged> {
        let (key, before, changes) = (staging.key, staging.before.as_slice(), &staging.changes);
        // A document with no changes was loaded (under the caller's stripe lock) from no record:
        // a new entity has none to read.
        let mut record = if before.is_empty() {
            debug_assert!(
                self.record(key)?.is_none(),
                "an entity with a record loaded as an empty document"
            );
            EntityRecord::default()
        } else {
            self.record_locked(key)?.unwrap_or_default()
        };
        let added: Vec<ChangeHash> = changes.iter().map(Change::hash).collect();
        let mut chunk = Vec::with_capacity(history_bytes(changes) as usize);
        for change in changes {
            chunk.extend_from_slice(change.raw_bytes());
        }
        doc.history_bytes += chunk.len() as u64;
        debug_assert!(
            !doc.pending.is_empty() || doc.history_bytes == history_bytes(&doc.get_changes(&[]))
        );
        record.history_bytes = Some(doc.history_bytes);
        if record.chunks + 1 >= self.inner.config.compact_after_chunks
            || record.chunk_bytes + chunk.len() as u64 > record.snapshot_bytes.max(4096)
        {
            doc = self.materialized(key, doc, changes)?;
            write_snapshot(&self.inner.db, key, &doc, &mut record, &mut writes)?;
        } else {
            // The first chunk is always loaded one change at a time; the second starts the
            // chain when it is one change; a later one goes on with it when it is one change that
            // depends on the last: with a single head before and after, the head before is the
            // last chunk's change, and the new change depends on it.
            let single = changes.len() == 1;
            record.linear = match record.chunks {
                0 => true,
                1 => single,
                _ => record.linear && single && before.len() == 1 && staging.after.len() == 1,
            };
            // The chain goes on when this write's first change depends on the last chunk's last
            // change (the single head before it) and each of its changes on the one before; with
            // a single head after, that head is this write's last change.
            let after_last_chunk = match (before, changes.first()) {
                ([head], Some(first)) => first.deps().contains(head),
                _ => false,
            };
            let follows = record.chunks == 0 || (record.chain && after_last_chunk);
            let chained = changes
                .windows(2)
                .all(|pair| pair[1].deps().contains(&pair[0].hash()));
            record.chain = follows && chained && staging.after.len() == 1;
            record.chunk_bytes += chunk.len() as u64;
            pieces::put_over_whole(
                layout::chunk_key(key, record.next_chunk),
                chunk,
                &mut writes,
            );
            record.next_chunk += 1;
            record.chunks += 1;
        }
        record.version = staging.version.clone();
        record.exists = staging.exists;
        writes.push((
            layout::entity_key(layout::ENTITY, key),
            Some(encode_record(&record)),
        ));
        Ok(Staged {
            key: key.clone(),
            doc,
            writes,
            added,
            settled: staging.settled,
            built: staging.built,
            row: Some(StagedRow {
                origin: staging.origin.clone(),
                fields: staging.fields,
                exists: record.exists,
            }),
            record: Some(record),
            written: Written {
                created: !staging.existed && staging.exists,
                entity: staging.entity,
                exists: staging.exists,
                version: staging.version,
                seq: None,
            },
        })
    }

    /// [`Store::commit`] of one staged write.
    pub(crate) fn commit_one(&self, staged: Staged) -> Result<Written> {
        let mut written = self.commit(vec![staged])?;
        Ok(written
            .pop()
            .expect("commit returns one result per staged write"))
    }

    /// Numbers the feed rows of `staged` and applies them with everything staged as one atomic
    /// set (`atomic`), then puts the documents in the cache. Returns once applied, not flushed.
    ///
    /// # Errors
    /// [`Error::Closed`] after [`Store::close`], storage errors otherwise; then nothing of
    /// `staged` is acknowledged and its documents are dropped, so readers load what is on disk.
    /// An error while sled applied the set may have left part of it there: the store then
    /// refuses further writes, and the next start undoes what of the set was applied.
    pub(crate) fn commit(&self, staged: Vec<Staged>) -> Result<Vec<Written>> {
        let rows = staged.iter().filter(|staged| staged.row.is_some()).count();
        let touches_sled = staged.iter().any(|staged| !staged.writes.is_empty());
        if touches_sled {
            // Refuse before touching sled: a write that reports an error must not show up later.
            self.inner.durability.check()?;
        }
        let mut staged = staged;
        if touches_sled {
            let mut writes = Vec::new();
            for item in &mut staged {
                writes.append(&mut item.writes);
            }
            let mut last_seq = self.inner.commit.lock().unwrap_or_else(|p| p.into_inner());
            let mut seq = *last_seq;
            let at_ms = now_ms();
            let mut committed = Vec::with_capacity(staged.len());
            for item in &mut staged {
                let Some(row) = &item.row else { continue };
                seq = seq.next();
                let row = FeedRow {
                    seq,
                    kind: item.key.kind.clone(),
                    id: item.key.id.clone(),
                    version: item.written.version.clone(),
                    origin: row.origin.clone(),
                    fields: row.fields.clone(),
                    exists: row.exists,
                    at_ms,
                };
                let encoded = serde_json::to_vec(&row).expect("a feed row always serializes");
                writes.push((layout::feed_key(seq).to_vec(), Some(encoded)));
                item.written.seq = Some(seq);
                committed.push(row);
            }
            self.apply(writes)?;
            *last_seq = seq;
            // Before the rows can become durable: a reader that sees them durable must find
            // them in memory and among the kinds' last rows.
            self.inner.recent.push(committed);
            {
                let mut kinds = self
                    .inner
                    .kind_seqs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                for item in &staged {
                    if let Some(seq) = item.written.seq {
                        kinds.record(&item.key.kind, seq);
                    }
                }
            }
            self.inner.durability.applied(seq);
        }
        self.inner.writes.fetch_add(rows as u64, Ordering::Relaxed);
        let built = staged.iter().filter(|staged| staged.built).count();
        self.inner
            .built_writes
            .fetch_add(built as u64, Ordering::Relaxed);
        let index_only = staged
            .iter()
            .filter(|staged| staged.doc.is_hollow())
            .count();
        self.inner
            .index_only_writes
            .fetch_add(index_only as u64, Ordering::Relaxed);
        Ok(staged
            .into_iter()
            .map(|item| {
                if let Some(record) = item.record {
                    self.inner.records.put(item.key.clone(), record);
                }
                if let Some(entity) = &item.written.entity {
                    let cached = CachedFields {
                        version: item.written.version.clone(),
                        fields: entity.data.clone(),
                        settled: item.settled,
                    };
                    self.inner.json.put(item.key.clone(), cached);
                }
                let mut doc = item.doc;
                if doc.is_hollow() {
                    // What it built is on disk now, where a hollow document's changes are.
                    doc.pending.clear();
                }
                self.put_back(&item.key, doc);
                item.written
            })
            .collect())
    }
}

/// A change to an entity for [`Store::stage_changes`] to persist, worked out from the entity's
/// document ([`Store::stage`]) or built from its index ([`Store::build_write`]).
struct Staging<'a> {
    key: &'a EntityKey,
    before: Vec<ChangeHash>,
    after: Vec<ChangeHash>,
    version: String,
    existed: bool,
    exists: bool,
    entity: Option<Entity>,
    settled: bool,
    /// The fields the change wrote, as the feed row lists them.
    fields: Vec<String>,
    /// The changes since `before`, in the order they were made.
    changes: Vec<Change>,
    origin: &'a Origin,
    /// Whether they were built from the entity's index.
    built: bool,
}

/// An entity's document as a local write takes it (see [`Store::load_to_build`]).
struct ToBuild {
    doc: LoadedDoc,
    /// The document's heads.
    before: Vec<ChangeHash>,
    /// Its JSON at those heads, when it is cached.
    cached: Option<CachedFields>,
}

/// What [`Store::load_as`] loads a document for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Any edit of the document: it comes with nothing pending and no index.
    Edit,
    /// Reading it: nothing pending, its index kept.
    Read,
}

/// The entity's JSON after a change, for [`Store::stage`].
pub(crate) enum AfterJson {
    /// Worked out by the caller, and whether they are settled (see `document::Current`).
    Known {
        fields: Map<String, Json>,
        settled: bool,
    },
    /// To be read from the document.
    Read,
    /// Not wanted: the written entity is left out (replication's batch merges, which only need
    /// to know the outcome; turning every document into JSON cost as much as the merge). Side
    /// records would then see no fields in their `CommitView`; no caller that skips the JSON
    /// writes side records.
    Skip,
}

/// A write worked out by [`Store::stage`] and not yet applied to sled.
pub(crate) struct Staged {
    key: EntityKey,
    doc: LoadedDoc,
    /// The sled keys to set (`Some`) or remove (`None`), feed row aside.
    writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// The changes the write adds to the document.
    added: Vec<ChangeHash>,
    /// The entity record among `writes`, for the record cache once it is applied.
    record: Option<EntityRecord>,
    /// Whether the fields in `written` are settled (see `document::Current`).
    settled: bool,
    /// Whether the change was built from the entity's index (see `direct`).
    built: bool,
    /// The feed row's content, when the write changed the document.
    row: Option<StagedRow>,
    written: Written,
}

/// A document that took in data from elsewhere, checked (see [`Store::vet_incoming`]).
pub(crate) struct Vetted {
    doc: LoadedDoc,
    /// The changes it gained, when the check had to build them.
    changes: Option<Vec<Change>>,
    /// The dependencies of the changes left out because the document lacks them.
    missing: Vec<ChangeHash>,
}

struct StagedRow {
    origin: Origin,
    fields: Vec<String>,
    exists: bool,
}

/// How long `open` waits for a lock that the last handle of the same directory still holds.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// Opens sled, waiting a little for its file lock.
///
/// sled releases the lock on its data file only when its background threads let go of the last
/// handle, a moment after the last `Db` is dropped; reopening a directory in the same process
/// right after closing it (a restart, a test) would otherwise fail now and then. Another process
/// that holds the directory still makes `open` fail, after [`LOCK_WAIT`].
pub(crate) fn open_sled(config: &StoreConfig) -> Result<sled::Db> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        let opened = sled::Config::new()
            .path(&config.path)
            .cache_capacity(config.sled_cache_bytes)
            .open();
        match opened {
            Err(sled::Error::Io(error))
                if error.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return Ok(other?),
        }
    }
}

/// The Automerge chunks (changes, here) that a stored chunk concatenates, in order.
///
/// Each starts with a header: 4 magic bytes, a 4-byte checksum, a type byte and the length of the
/// rest as unsigned LEB128. Whatever cannot be split is returned whole, for Automerge to judge.
fn split_changes(bytes: &[u8]) -> Vec<&[u8]> {
    let mut pieces = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let Some(length) = chunk_length(rest) else {
            pieces.push(rest);
            break;
        };
        let (piece, after) = rest.split_at(length);
        pieces.push(piece);
        rest = after;
    }
    pieces
}

/// The length of the Automerge chunk at the start of `bytes`, header included, if it is whole.
fn chunk_length(bytes: &[u8]) -> Option<usize> {
    const FIXED_HEADER: usize = 9;
    let mut data_length: u64 = 0;
    for (index, byte) in bytes.get(FIXED_HEADER..)?.iter().take(10).enumerate() {
        data_length |= u64::from(byte & 0x7f).checked_shl(7 * index as u32)?;
        if byte & 0x80 == 0 {
            let total = FIXED_HEADER + index + 1 + usize::try_from(data_length).ok()?;
            return (total <= bytes.len()).then_some(total);
        }
    }
    None
}

/// The bytes of `changes` as Automerge encodes them uncompressed.
fn history_bytes(changes: &[Change]) -> u64 {
    changes.iter().map(|c| c.raw_bytes().len() as u64).sum()
}

/// The document's `save()` bytes, leaving out changes still waiting for their dependencies.
fn save_document(doc: &Automerge) -> Vec<u8> {
    doc.save_with_options(SaveOptions {
        retain_orphans: false,
        ..SaveOptions::default()
    })
}

/// The document without the changes waiting in its queue for dependencies it lacks.
fn without_orphans(doc: &Automerge, actor: &ActorId) -> Result<Automerge> {
    let reloaded = Automerge::load(&save_document(doc)).map_err(|error| Error::Corrupt {
        what: "a merged document".into(),
        detail: error.to_string(),
    })?;
    Ok(reloaded.with_actor(actor.clone()))
}

/// Adds a snapshot of `doc` to `writes` and removes the chunks it replaces.
fn write_snapshot(
    db: &sled::Db,
    key: &EntityKey,
    doc: &Automerge,
    record: &mut EntityRecord,
    writes: &mut Vec<(Vec<u8>, Option<Vec<u8>>)>,
) -> Result<()> {
    let snapshot = save_document(doc);
    for entry in db.scan_prefix(layout::chunk_prefix(key)) {
        let (chunk_key, value) = entry?;
        pieces::remove(&chunk_key, &value, writes);
    }
    // A snapshot of at most a piece was stored whole: there are no pieces of it to read.
    let whole_before = record.snapshot_bytes <= pieces::PIECE_BYTES as u64;
    record.snapshot_bytes = snapshot.len() as u64;
    record.chunks = 0;
    record.chunk_bytes = 0;
    record.linear = true;
    record.chain = true;
    let snapshot_key = layout::entity_key(layout::SNAPSHOT, key);
    if whole_before {
        pieces::put_over_whole(snapshot_key, snapshot, writes);
    } else {
        pieces::put(db, &snapshot_key, snapshot, writes)?;
    }
    Ok(())
}

fn entity_from(key: &EntityKey, doc: &Automerge, heads: Option<&[ChangeHash]>) -> Option<Entity> {
    let data = document::fields(doc, heads);
    if data.is_empty() {
        return None;
    }
    let version = match heads {
        Some(heads) => Version::from_heads(heads.to_vec()),
        None => Version::from_heads(doc.get_heads()),
    };
    entity_of(key, &version.to_string(), data)
}

/// The side records a write's caller asks for (see [`Store::submit_with`]), as sled writes.
fn side_writes(
    records: impl FnOnce(&CommitView<'_>) -> Vec<RecordWrite>,
    version: &str,
    entity: Option<&Entity>,
    changed: bool,
) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let no_fields = Map::new();
    records(&CommitView {
        version,
        data: entity.map_or(&no_fields, |entity| &entity.data),
        changed,
    })
    .into_iter()
    .map(|write| (write.key.as_bytes().to_vec(), write.value))
    .collect()
}

/// The entity with `data` at `version`; `None` when it has no fields (it reads as absent).
fn entity_of(key: &EntityKey, version: &str, data: Map<String, Json>) -> Option<Entity> {
    (!data.is_empty()).then(|| Entity {
        kind: key.kind.clone(),
        id: key.id.clone(),
        version: version.to_string(),
        data,
    })
}

fn encode_record(record: &EntityRecord) -> Vec<u8> {
    serde_json::to_vec(record).expect("an entity record always serializes")
}

fn decode_record(raw_key: &[u8], raw: &[u8]) -> Result<EntityRecord> {
    serde_json::from_slice(raw).map_err(|error| Error::Corrupt {
        what: String::from_utf8_lossy(raw_key).into_owned(),
        detail: error.to_string(),
    })
}

/// Milliseconds since the Unix epoch by the system clock (0 should the clock read before it),
/// as every crate stamps records and counts ages.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
