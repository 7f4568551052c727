//! Group commit: many writers, one `flush()` at a time, and the files it syncs beyond sled's
//! (`files`: in `fsync` mode an fdatasync of the log and sled's blob files).
//!
//! A writer applies its batch to sled, then asks for a flush and waits until a flush that
//! started after its batch has finished. One dedicated thread runs the flushes, so writers that
//! arrive while a flush is running all share the next one: durability costs one flush per group,
//! not per request. A finished flush wakes only the writers it covers, and writers on an async
//! runtime can wait without holding a thread ([`Durability::wait_for_async`]). The thread is a
//! plain OS thread rather than a tokio task because sled's `flush()` blocks, and
//! `flush_async()` was seen to hang with many concurrent callers.
//!
//! After each flush the thread publishes the highest feed sequence number that it covered, so
//! readers of the feed only ever see rows that are on disk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::feed::Seq;
use crate::files::{SharedBlobs, SyncedFiles};

/// Which failure an acknowledged write survives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// sled's `flush()`: the data is handed to the kernel before the write is acknowledged.
    /// Survives the process being killed at any moment; a power loss or kernel crash can lose
    /// writes from the last half second or so (sled fsyncs in the background every 500 ms).
    #[default]
    Flush,
    /// `flush()` followed by an fdatasync of the log file and an fsync of every file sled wrote a
    /// large value or page to (`files`), shared by the group: survives power loss.
    Fsync,
}

#[derive(Clone, Copy, Debug, Default)]
struct FlushState {
    /// Flushes started so far; while one runs, it is number `started`.
    started: u64,
    /// Flushes finished so far.
    completed: u64,
    /// Whether a writer asked for a flush that has not started yet.
    pending: bool,
    /// Set when a flush failed: every waiter from then on gets an error, because sled's state
    /// after a failed flush is unknown.
    failed: bool,
    closed: bool,
}

impl FlushState {
    /// Whether writes are still taken: [`Error::Failed`] after a failed flush, [`Error::Closed`]
    /// once closed.
    fn check(&self) -> Result<()> {
        if self.failed {
            Err(Error::Failed)
        } else if self.closed {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    /// Whether flush `ticket` has finished, or an error if it never will.
    fn reached(&self, ticket: FlushTicket) -> Result<bool> {
        if self.completed >= ticket.0 {
            Ok(true)
        } else {
            self.check().map(|()| false)
        }
    }
}

/// The number of the flush that covers a write: once that flush has finished, the write is durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FlushTicket(u64);

struct Shared {
    state: Mutex<FlushState>,
    /// Wakes the flusher when there is a request.
    work: Condvar,
    /// Wakes the writers waiting for a flush, by the flush number's parity: a finished flush wakes
    /// only its own waiters, not those already queued for the next one.
    done: [Condvar; 2],
    /// The state after every flush, for writers that wait without holding a thread.
    progress: watch::Sender<FlushState>,
    /// The highest feed row applied to sled (not necessarily flushed).
    applied_seq: AtomicU64,
    durable_seq: watch::Sender<Seq>,
    flushes: AtomicU64,
    /// The blob files' state, for the count of those synced (`files`).
    blobs: Arc<SharedBlobs>,
}

/// The group-commit coordinator; cheap to clone.
#[derive(Clone)]
pub(crate) struct Durability {
    shared: Arc<Shared>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl Durability {
    pub(crate) fn start(db: sled::Db, files: SyncedFiles, last_seq: Seq) -> Self {
        let (durable_seq, _) = watch::channel(last_seq);
        let (progress, _) = watch::channel(FlushState::default());
        let shared = Arc::new(Shared {
            state: Mutex::new(FlushState::default()),
            work: Condvar::new(),
            done: [Condvar::new(), Condvar::new()],
            progress,
            applied_seq: AtomicU64::new(last_seq.0),
            durable_seq,
            flushes: AtomicU64::new(0),
            blobs: files.blobs(),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("lockstep-flush".into())
            .spawn(move || run_flusher(worker, db, files))
            .expect("spawning the flush thread only fails when the OS is out of threads");
        Self {
            shared,
            thread: Arc::new(Mutex::new(Some(thread))),
        }
    }

    /// Records that the feed row `seq` has been applied to sled (call in commit order).
    pub(crate) fn applied(&self, seq: Seq) {
        self.shared.applied_seq.fetch_max(seq.0, Ordering::AcqRel);
    }

    /// Asks for a flush that covers everything applied to sled before this call, and returns
    /// its number for [`Durability::wait_for`] or [`Durability::wait_for_async`].
    pub(crate) fn request(&self) -> Result<FlushTicket> {
        let mut state = self.lock();
        state.check()?;
        state.pending = true;
        // A flush that is running may have started before the caller's batch was applied: only
        // the next one is sure to cover it.
        let ticket = FlushTicket(state.started + 1);
        self.shared.work.notify_one();
        Ok(ticket)
    }

    /// Blocks until flush `ticket` has finished.
    pub(crate) fn wait_for(&self, ticket: FlushTicket) -> Result<()> {
        let mut state = self.lock();
        while !state.reached(ticket)? {
            state = self.shared.done[(ticket.0 % 2) as usize]
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    /// Waits, without blocking a thread, until flush `ticket` has finished.
    pub(crate) async fn wait_for_async(&self, ticket: FlushTicket) -> Result<()> {
        let mut progress = self.shared.progress.subscribe();
        let mut outcome = Ok(false);
        // The sender lives as long as `self`, so `wait_for` cannot fail with a closed channel.
        let _ = progress
            .wait_for(|state| {
                outcome = state.reached(ticket);
                !matches!(outcome, Ok(false))
            })
            .await;
        outcome.map(|_| ())
    }

    /// Blocks until everything applied to sled before this call is flushed.
    pub(crate) fn wait(&self) -> Result<()> {
        self.wait_for(self.request()?)
    }

    /// Blocks until every feed row applied so far is flushed; at once, without a flush, when
    /// every one already is.
    pub(crate) fn wait_applied(&self) -> Result<()> {
        let applied = self.shared.applied_seq.load(Ordering::Acquire);
        if self.durable_seq().0 >= applied {
            return self.check();
        }
        self.wait()
    }

    fn lock(&self) -> MutexGuard<'_, FlushState> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether writes are still accepted: [`Error::Failed`] after a failed flush,
    /// [`Error::Closed`] once closed.
    pub(crate) fn check(&self) -> Result<()> {
        self.lock().check()
    }

    /// Refuses every write from now on, as after a failed flush: for a write that failed while
    /// it was being applied to sled, which may have left part of it there. `cause` is logged,
    /// the first time only.
    pub(crate) fn fail(&self, cause: &str) {
        let mut state = self.lock();
        if !state.failed {
            tracing::error!(%cause, "a write failed while it was applied; refusing further writes");
        }
        refuse_writes(&self.shared, &mut state);
        self.shared.progress.send_replace(*state);
    }

    /// A receiver of the highest feed sequence number known to be on disk.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Seq> {
        self.shared.durable_seq.subscribe()
    }

    pub(crate) fn durable_seq(&self) -> Seq {
        *self.shared.durable_seq.borrow()
    }

    pub(crate) fn flushes(&self) -> u64 {
        self.shared.flushes.load(Ordering::Relaxed)
    }

    /// Blob files synced since the store opened.
    pub(crate) fn blob_syncs(&self) -> u64 {
        self.shared.blobs.count()
    }

    /// Runs a last flush and stops the thread; later writes fail with [`Error::Closed`].
    pub(crate) fn close(&self) -> Result<()> {
        let result = self.wait();
        {
            let mut state = self.lock();
            state.closed = true;
            self.shared.work.notify_all();
            self.shared.done.iter().for_each(Condvar::notify_all);
            self.shared.progress.send_replace(*state);
        }
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
        result
    }
}

/// Marks the store failed and wakes every writer waiting for a flush, which then gets the error.
fn refuse_writes(shared: &Shared, state: &mut FlushState) {
    state.failed = true;
    shared.done.iter().for_each(Condvar::notify_all);
}

fn run_flusher(shared: Arc<Shared>, db: sled::Db, mut files: SyncedFiles) {
    loop {
        let number = {
            let mut state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            while !state.pending && !state.closed {
                state = shared.work.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            if state.closed && !state.pending {
                return;
            }
            state.pending = false;
            state.started += 1;
            state.started
        };
        // Every writer holding a ticket for this flush applied its batch before taking it,
        // so reading `applied_seq` now and flushing afterwards covers all of them.
        let covered = Seq(shared.applied_seq.load(Ordering::Acquire));
        let outcome = db
            .flush()
            .map_err(Error::from)
            .and_then(|_| files.after_flush(&db));
        shared.flushes.fetch_add(1, Ordering::Relaxed);
        let mut state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Ok(()) => {
                state.completed = number;
                shared.durable_seq.send_if_modified(|seq| {
                    if covered > *seq {
                        *seq = covered;
                        true
                    } else {
                        false
                    }
                });
                shared.done[(number % 2) as usize].notify_all();
            }
            Err(error) => {
                tracing::error!(error = %error, cause = ?std::error::Error::source(&error).map(ToString::to_string), "flush failed; refusing further writes");
                refuse_writes(&shared, &mut state);
            }
        }
        shared.progress.send_replace(*state);
    }
}
