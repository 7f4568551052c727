//! Group commit: many writers, one `flush()` at a time, and an optional fdatasync.
//!
//! A writer applies its batch to sled, then asks for a flush and blocks until a flush that
//! started after its batch has finished. One dedicated thread runs the flushes, so writers that
//! arrive while a flush is running all share the next one: durability costs one flush per group,
//! not per request. The thread is a plain OS thread rather than a tokio task because sled's
//! `flush()` blocks, and `flush_async()` was seen to hang with many concurrent callers.
//!
//! After each flush the thread publishes the highest feed sequence number that it covered, so
//! readers of the feed only ever see rows that are on disk.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::feed::Seq;

/// Which failure an acknowledged write survives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// sled's `flush()`: the data is handed to the kernel before the write is acknowledged.
    /// Survives the process being killed at any moment; a power loss or kernel crash can lose
    /// writes from the last half second or so (sled fsyncs in the background every 500 ms).
    #[default]
    Flush,
    /// `flush()` followed by an fdatasync of the data file, shared by the group: survives power loss.
    Fsync,
}

#[derive(Default)]
struct FlushState {
    /// Flush requests handed out so far.
    requested: u64,
    /// The highest request covered by a finished flush.
    completed: u64,
    /// Set when a flush failed: every waiter from then on gets an error, because sled's state
    /// after a failed flush is unknown.
    failed: bool,
    closed: bool,
}

struct Shared {
    state: Mutex<FlushState>,
    /// Wakes the flusher when there is a request.
    work: Condvar,
    /// Wakes writers when a flush has completed.
    done: Condvar,
    /// The highest feed row applied to sled (not necessarily flushed).
    applied_seq: AtomicU64,
    durable_seq: watch::Sender<Seq>,
    flushes: AtomicU64,
}

/// The group-commit coordinator; cheap to clone.
#[derive(Clone)]
pub(crate) struct Durability {
    shared: Arc<Shared>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl Durability {
    pub(crate) fn start(
        db: sled::Db,
        data_file: Option<File>,
        mode: SyncMode,
        last_seq: Seq,
    ) -> Self {
        let (durable_seq, _) = watch::channel(last_seq);
        let shared = Arc::new(Shared {
            state: Mutex::new(FlushState::default()),
            work: Condvar::new(),
            done: Condvar::new(),
            applied_seq: AtomicU64::new(last_seq.0),
            durable_seq,
            flushes: AtomicU64::new(0),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("lockstep-flush".into())
            .spawn(move || run_flusher(worker, db, data_file, mode))
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

    /// Blocks until everything applied to sled before this call is flushed.
    pub(crate) fn wait(&self) -> Result<()> {
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.failed || state.closed {
            return Err(Error::Closed);
        }
        state.requested += 1;
        let ticket = state.requested;
        self.shared.work.notify_one();
        while state.completed < ticket {
            if state.failed || state.closed {
                return Err(Error::Closed);
            }
            state = self
                .shared
                .done
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    /// Whether writes are still accepted: the store is not closed and no flush has failed.
    pub(crate) fn is_open(&self) -> bool {
        let state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        !state.failed && !state.closed
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

    /// Runs a last flush and stops the thread; later writes fail with [`Error::Closed`].
    pub(crate) fn close(&self) -> Result<()> {
        let result = self.wait();
        {
            let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
            state.closed = true;
            self.shared.work.notify_all();
            self.shared.done.notify_all();
        }
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
        result
    }
}

fn run_flusher(shared: Arc<Shared>, db: sled::Db, data_file: Option<File>, mode: SyncMode) {
    loop {
        let target = {
            let mut state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            while state.requested == state.completed && !state.closed {
                state = shared.work.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            if state.closed && state.requested == state.completed {
                return;
            }
            state.requested
        };
        // Every writer holding a ticket up to `target` applied its batch before taking it,
        // so reading `applied_seq` now and flushing afterwards covers all of them.
        let covered = Seq(shared.applied_seq.load(Ordering::Acquire));
        let outcome =
            db.flush()
                .map(|_| ())
                .map_err(Error::from)
                .and_then(|()| match (&data_file, mode) {
                    (Some(file), SyncMode::Fsync) => file.sync_data().map_err(Error::Sync),
                    _ => Ok(()),
                });
        shared.flushes.fetch_add(1, Ordering::Relaxed);
        let mut state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Ok(()) => {
                state.completed = target;
                shared.durable_seq.send_if_modified(|seq| {
                    if covered > *seq {
                        *seq = covered;
                        true
                    } else {
                        false
                    }
                });
            }
            Err(error) => {
                tracing::error!(error = %error, "flush failed; refusing further writes");
                state.failed = true;
            }
        }
        shared.done.notify_all();
    }
}
