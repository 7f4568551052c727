//! Many writes applied as one set, and the writer thread that gathers them.
//!
//! A write on its own costs an application to sled (an intent and its removal, see `atomic`), a
//! trip through the commit lock and a wake-up of the flush thread. Under load those costs, and
//! the thread switches between the callers that pay them, outweigh the Automerge work itself.
//! [`Store::write_many`] stages any number of writes and applies them as one set, and
//! [`Store::submit`] queues a write for the store's writer thread, which takes every write
//! waiting in the queue, applies them with `write_many`, and asks for one flush for all of them:
//! concurrent callers then share the application as well as the flush.

use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError, Weak};

use serde_json::{Map, Value as Json};
use tokio::sync::oneshot;

use crate::document;
use crate::error::{panic_message, Error, Result};
use crate::key::EntityKey;
use crate::records::{CommitView, RecordWrite};
use crate::store::{AfterJson, Inner, Staged, Store, Unflushed, WriteOptions, Written};

#[cfg(test)]
mod tests;

/// What a write does to an entity.
#[derive(Clone, Debug, PartialEq)]
pub enum Edit {
    /// Apply an RFC 7386 JSON merge patch, creating the entity if needed (as [`Store::patch`]).
    MergePatch(Json),
    /// Replace all fields, creating the entity if needed (as [`Store::replace`]).
    Replace(Json),
    /// Remove every field (as [`Store::delete`]).
    Delete,
}

/// One write: which entity, what it does, and who makes it under which condition.
#[derive(Clone, Debug)]
pub struct WriteRequest {
    /// The entity written.
    pub key: EntityKey,
    /// What the write does.
    pub edit: Edit,
    /// Its origin and precondition.
    pub options: WriteOptions,
}

/// The most writes the writer thread applies in one batch.
const MAX_BATCH: usize = 256;

/// Side records to write in the same batch as a change, worked out from what the change did
/// (see [`Store::submit_with`]); runs on the writer thread, with the entity locked.
pub type Records = Box<dyn FnOnce(&CommitView<'_>) -> Vec<RecordWrite> + Send>;

/// A queued write and where its outcome goes.
pub(crate) struct Job {
    request: WriteRequest,
    records: Option<Records>,
    reply: oneshot::Sender<Result<Unflushed<Result<Written>>>>,
}

/// The sending end of the writer thread's queue; the thread stops when it is dropped.
pub(crate) type Queue = Sender<Job>;

impl Store {
    /// Applies `requests` in order, in as few atomic sets of writes as possible, and returns
    /// every outcome (in the order of `requests`) once all are applied; they are durable once
    /// the returned [`Unflushed`] is waited for. Each write succeeds or fails on its own, as the
    /// single-write methods would: a stale `if_match` fails that write only.
    ///
    /// A delete of an entity that does not exist changes nothing: its outcome has no entity and
    /// no feed row (`entity` and `seq` are `None`).
    ///
    /// # Errors
    /// [`Error::Closed`] when the store is closed before the flush can be asked for; per-write
    /// errors are in the returned list.
    pub fn write_many(&self, requests: &[WriteRequest]) -> Result<Unflushed<Vec<Result<Written>>>> {
        let outcomes = self.stage_and_commit(
            requests.iter().collect(),
            |request| request.key.clone(),
            |request| self.stage_request(request, None),
        );
        self.unflushed(outcomes)
    }

    /// Stages every item with `stage` (under its entity's stripe lock) and commits them in as
    /// few atomic sets of writes as possible, returning each outcome in the order of `items`.
    /// Nothing is flushed: the caller waits for that.
    pub(crate) fn stage_and_commit<T>(
        &self,
        items: Vec<T>,
        key_of: impl Fn(&T) -> EntityKey,
        mut stage: impl FnMut(T) -> Result<Staged>,
    ) -> Vec<Result<Written>> {
        let mut outcomes: Vec<Option<Result<Written>>> = items.iter().map(|_| None).collect();
        // Reserved up front: a staged item holds its whole document, so growing the list by
        // doubling would copy them into ever larger allocations, each in freshly faulted pages.
        let mut pending = Pending {
            staged: Vec::with_capacity(items.len()),
            ..Pending::default()
        };
        for (index, item) in items.into_iter().enumerate() {
            let key = key_of(&item);
            if pending.keys.contains(&key) {
                // The entity record read while staging must be the one on disk: an entity is
                // staged once per batch.
                self.commit_pending(&mut pending, &mut outcomes);
            }
            self.hold_stripe(&key, &mut pending, &mut outcomes);
            // Staging only works in memory (an Automerge transaction, a caller's records): a
            // panic there fails this write alone, and the document it had taken is dropped, so
            // the next write of the entity loads it from disk.
            let staged = catch_unwind(AssertUnwindSafe(|| stage(item))).unwrap_or_else(|panic| {
                let message = panic_message(&*panic);
                tracing::error!(entity = %key, panic = %message, "working out a write panicked");
                Err(Error::Panicked(message))
            });
            match staged {
                Ok(staged) => {
                    pending.keys.insert(key);
                    pending.staged.push((index, staged));
                }
                Err(error) => outcomes[index] = Some(Err(error)),
            }
        }
        self.commit_pending(&mut pending, &mut outcomes);
        outcomes
            .into_iter()
            .map(|outcome| outcome.expect("every item is staged or failed"))
            .collect()
    }

    /// Queues `request` for the store's writer thread and waits, without blocking a thread,
    /// until it is durable. Concurrent submissions share applications to sled and flushes, which
    /// makes this the fastest way to write from many tasks at once.
    ///
    /// # Errors
    /// As the single-write methods; [`Error::Closed`] when the store is closed.
    pub async fn submit(&self, request: WriteRequest) -> Result<Written> {
        self.submit_job(request, None).await
    }

    /// [`Store::submit`] with side records written in the same atomic set as the change (or,
    /// when it changes nothing, in the same set as the writes it is applied with). `records`
    /// is called once, on the writer thread with the entity locked, after the edit is applied in
    /// memory and before anything is written.
    ///
    /// # Errors
    /// As [`Store::submit`]; on error no record is written.
    pub async fn submit_with(&self, request: WriteRequest, records: Records) -> Result<Written> {
        self.submit_job(request, Some(records)).await
    }

    async fn submit_job(&self, request: WriteRequest, records: Option<Records>) -> Result<Written> {
        let (reply, outcome) = oneshot::channel();
        self.queue()
            .send(Job {
                request,
                records,
                reply,
            })
            .map_err(|_| Error::Closed)?;
        let unflushed = outcome.await.map_err(|_| Error::Closed)??;
        unflushed.wait_async().await?
    }

    /// Checks and stages one request; the caller holds the entity's stripe lock.
    fn stage_request(&self, request: &WriteRequest, records: Option<Records>) -> Result<Staged> {
        let WriteRequest { key, edit, options } = request;
        let records =
            |view: &CommitView<'_>| records.map_or_else(Vec::new, |records| records(view));
        // The precondition is judged before the content (RFC 9110, 13.2.1): a stale `If-Match`
        // is a mismatch whatever the body holds, so a body refused for its content is checked
        // against it first.
        let refuse = |refused: Error| match &options.if_match {
            Some(expected) => self.check_if_match(key, expected).err().unwrap_or(refused),
            None => refused,
        };
        match edit {
            Edit::MergePatch(patch) => {
                let patch = writable_object(patch, "a merge patch").map_err(refuse)?;
                self.stage_write(key, options, document::JsonEdit::MergePatch(patch), records)
            }
            Edit::Replace(fields) => {
                let fields = writable_object(fields, "the entity's fields").map_err(refuse)?;
                if fields.values().all(Json::is_null) {
                    return Err(refuse(Error::UnwritableValue(
                        "an entity needs at least one field; use DELETE to remove it".into(),
                    )));
                }
                self.stage_write(key, options, document::JsonEdit::Replace(fields), records)
            }
            Edit::Delete => {
                if options.if_match.is_none() {
                    let doc = self.load(key)?;
                    if !document::has_fields(&doc) {
                        // Nothing to delete: staged as it is, which writes nothing but `records`.
                        let heads = doc.get_heads();
                        return self.stage(
                            key,
                            doc,
                            &heads,
                            None,
                            false,
                            &options.origin,
                            records,
                            None,
                            AfterJson::Read,
                        );
                    }
                    self.put_back(key, doc);
                }
                self.stage_write(
                    key,
                    options,
                    document::JsonEdit::Replace(&Map::new()),
                    records,
                )
            }
        }
    }

    /// Takes the stripe lock of `key` unless `pending` holds it already. It never waits for a
    /// lock while holding others: when the lock is busy, what is staged is committed and every
    /// lock let go first, so two batches cannot wait for each other.
    fn hold_stripe<'a>(
        &'a self,
        key: &EntityKey,
        pending: &mut Pending<'a>,
        outcomes: &mut [Option<Result<Written>>],
    ) {
        let stripe = self.stripe_of(key);
        if pending.locks.contains_key(&stripe) {
            return;
        }
        let guard = match self.stripe(stripe).try_lock() {
            Ok(guard) => guard,
            // See `Store::lock`: a poisoned stripe guards nothing unsound.
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                self.commit_pending(pending, outcomes);
                pending.locks.clear();
                self.stripe(stripe)
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
            }
        };
        pending.locks.insert(stripe, guard);
    }

    /// Commits what `pending` has staged and records the outcomes; the locks stay held.
    fn commit_pending(&self, pending: &mut Pending<'_>, outcomes: &mut [Option<Result<Written>>]) {
        pending.keys.clear();
        if pending.staged.is_empty() {
            return;
        }
        let (indices, staged): (Vec<usize>, Vec<Staged>) = pending.staged.drain(..).unzip();
        match self.commit(staged) {
            Ok(written) => {
                for (index, written) in indices.into_iter().zip(written) {
                    outcomes[index] = Some(Ok(written));
                }
            }
            Err(error) => {
                for index in indices {
                    outcomes[index] = Some(Err(error.duplicate()));
                }
            }
        }
    }
}

/// What `write_many` has staged and not yet committed, and the stripe locks it holds.
#[derive(Default)]
struct Pending<'a> {
    staged: Vec<(usize, Staged)>,
    keys: HashSet<EntityKey>,
    locks: HashMap<usize, MutexGuard<'a, ()>>,
}

/// `value` as a JSON object that may be written, or why not.
fn writable_object<'a>(value: &'a Json, what: &str) -> Result<&'a Map<String, Json>> {
    let object = value
        .as_object()
        .ok_or_else(|| Error::UnwritableValue(format!("{what} must be a JSON object")))?;
    document::check_writable(value)?;
    Ok(object)
}

/// Starts the writer threads for the store behind `inner`; they share the queue's receiving end.
///
/// The threads hold the store weakly, so they never keep a dropped store open: once the last
/// handle is gone the queue's sender goes with it, and the threads end.
pub(crate) fn start_writers(inner: &Weak<Inner>, jobs: Receiver<Job>, threads: usize) {
    let jobs = Arc::new(Mutex::new(jobs));
    for _ in 0..threads.max(1) {
        let inner = inner.clone();
        let jobs = jobs.clone();
        std::thread::Builder::new()
            .name("lockstep-writer".into())
            .spawn(move || run_writer(&inner, &jobs))
            .expect("spawning a writer thread only fails when the OS is out of threads");
    }
}

/// A queue and its receiving end, for [`start_writers`].
pub(crate) fn queue() -> (Queue, Receiver<Job>) {
    mpsc::channel()
}

/// The next batch of jobs: the first to arrive and whatever else is waiting, up to [`MAX_BATCH`];
/// `None` once the queue is closed.
fn next_batch(jobs: &Mutex<Receiver<Job>>) -> Option<Vec<Job>> {
    // The lock only guards the receiving end; a thread that panicked holding it left it sound.
    let jobs = jobs.lock().unwrap_or_else(|p| p.into_inner());
    let mut batch = vec![jobs.recv().ok()?];
    while batch.len() < MAX_BATCH {
        match jobs.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    Some(batch)
}

fn run_writer(inner: &Weak<Inner>, jobs: &Mutex<Receiver<Job>>) {
    while let Some(batch) = next_batch(jobs) {
        let (items, replies): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .map(|job| ((job.request, job.records), job.reply))
            .unzip();
        let Some(inner) = inner.upgrade() else {
            for reply in replies {
                // The caller may have given up waiting; then nobody needs the answer.
                let _ = reply.send(Err(Error::Closed));
            }
            return;
        };
        let store = Store::from_inner(Arc::clone(&inner));
        drop(inner);
        // A panic while staging fails its write alone (`stage_and_commit`); one while applying
        // the batch may have left part of it in sled, so the store then refuses writes, as after
        // a failed flush (the next start undoes the part), and this thread goes on answering.
        let committed = catch_unwind(AssertUnwindSafe(|| {
            let outcomes = store.stage_and_commit(
                items,
                |(request, _)| request.key.clone(),
                |(request, records)| store.stage_request(&request, records),
            );
            store.unflushed(outcomes)
        }));
        let committed = committed.unwrap_or_else(|panic| {
            let cause = format!(
                "applying a batch of writes panicked: {}",
                panic_message(&*panic)
            );
            store.refuse_writes(&cause);
            Err(Error::Failed)
        });
        match committed {
            Ok(unflushed) => {
                for (reply, outcome) in replies.into_iter().zip(unflushed.split()) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(error) => {
                for reply in replies {
                    let _ = reply.send(Err(error.duplicate()));
                }
            }
        }
    }
}
