//! What a flush syncs beyond sled's own `flush()`.
//!
//! sled 0.34 writes its log to one file (`db`) and makes it stable with `sync_file_range`,
//! which reaches the device but not past its cache, and fsyncs it in the background every
//! 500 ms. A value or tree page over about 128 KiB (a quarter of its 512 KiB segment) it writes
//! instead to a file of its own under `blobs/`, named by its log position, with the log
//! pointing at it, and it never syncs those files or their directory. After a power loss, a
//! blob file the kernel had not yet written back (it waits up to 30 s by default) is missing or
//! torn: a missing one is skipped, so its value is lost, and a torn one fails its checksum,
//! where sled's recovery stops reading the log, so every write after it is lost too.
//!
//! [`SyncedFiles::after_flush`] closes that gap. In `fsync` mode, after every flush, it syncs
//! each blob file it has not synced yet (once whole: see [`BlobFiles::sync_new`]), then the
//! `blobs` directory, then the log (an fdatasync): an acknowledged write's blobs are on the disk
//! before it is. In `flush` mode a thread of its own syncs the new blob files every 500 ms, as
//! sled syncs its log, so a power loss costs about the last half second whatever the values'
//! size, and acknowledgements never wait for it. Finding
//! the new files lists the directory, which costs time with its number of files (about 3 ms for
//! 10,000 on this machine's ext4): in `fsync` mode, at every flush.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::durability::SyncMode;
use crate::error::{Error, Result};

/// How often `flush` mode syncs new blob files: as often as sled fsyncs its log.
const FLUSH_MODE_BLOB_INTERVAL: Duration = Duration::from_millis(500);

/// sled's files that a flush syncs, per [`SyncMode`].
pub(crate) struct SyncedFiles {
    /// `fsync` mode: sled's log file and its blob files, synced after every flush.
    after_flush: Option<(File, BlobFiles)>,
    /// `flush` mode: the thread that syncs new blob files every 500 ms, off the flush's path,
    /// and the sender whose drop stops it.
    background: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
    syncs: Arc<AtomicU64>,
}

impl SyncedFiles {
    /// sled's files in the store directory `dir`, which sled has opened (and so created) as
    /// `db`. Syncs the directory itself once, so that the files sled created in it (the log, the
    /// `blobs` directory) survive a power loss; in `flush` mode, starts the thread that syncs
    /// blob files.
    ///
    /// # Errors
    /// [`Error::Sync`] when the log file cannot be opened or the directory cannot be synced.
    pub(crate) fn open(dir: &Path, mode: SyncMode, db: &sled::Db) -> Result<Self> {
        let log = File::open(dir.join("db")).map_err(Error::Sync)?;
        sync_directory(dir).map_err(Error::Sync)?;
        let syncs = Arc::new(AtomicU64::new(0));
        let blobs = BlobFiles::new(dir.join("blobs"), Arc::clone(&syncs));
        let (after_flush, background) = match mode {
            SyncMode::Fsync => (Some((log, blobs)), None),
            SyncMode::Flush => {
                let (stop, stopped) = mpsc::channel();
                let db = db.clone();
                let thread = std::thread::Builder::new()
                    .name("lockstep-blob-sync".into())
                    .spawn(move || sync_in_background(&db, blobs, &stopped))
                    .map_err(Error::Sync)?;
                (None, Some((stop, thread)))
            }
        };
        Ok(Self {
            after_flush,
            background,
            syncs,
        })
    }

    /// Run after each `flush()` of sled, before the writes it covers are acknowledged.
    ///
    /// # Errors
    /// [`Error::Sync`] when a file cannot be synced: what the flush covers may not survive a
    /// power loss.
    pub(crate) fn after_flush(&mut self, db: &sled::Db) -> Result<()> {
        match &mut self.after_flush {
            Some((log, blobs)) => {
                blobs.sync_new(|| settle(db))?;
                log.sync_data().map_err(Error::Sync)
            }
            None => Ok(()),
        }
    }

    /// How many blob files have been synced since the store opened.
    pub(crate) fn syncs(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.syncs)
    }
}

impl Drop for SyncedFiles {
    /// Stops the background thread (it lets go of sled) and waits for it.
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.background.take() {
            drop(stop);
            let _ = thread.join();
        }
    }
}

/// Another `flush()`, after which every blob file listed before it is whole (see
/// [`BlobFiles::sync_new`]).
fn settle(db: &sled::Db) -> Result<()> {
    db.flush().map(drop).map_err(Error::from)
}

/// `flush` mode's thread: syncs new blob files every 500 ms until `stopped` is dropped. A
/// failure is logged and tried again; in this mode acknowledged writes never waited for it.
fn sync_in_background(db: &sled::Db, mut blobs: BlobFiles, stopped: &mpsc::Receiver<()>) {
    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(FLUSH_MODE_BLOB_INTERVAL) {
        if let Err(error) = blobs.sync_new(|| settle(db)) {
            tracing::error!(
                %error,
                "syncing sled's blob files failed; a power loss could lose large values written since"
            );
        }
    }
}

/// The blob files of a store and which of them are synced.
struct BlobFiles {
    dir: PathBuf,
    /// The blob files synced (and still there when last listed).
    synced: HashSet<OsString>,
    /// Blob files synced, counted for metrics.
    syncs: Arc<AtomicU64>,
}

impl BlobFiles {
    fn new(dir: PathBuf, syncs: Arc<AtomicU64>) -> Self {
        Self {
            dir,
            synced: HashSet::new(),
            syncs,
        }
    }

    /// Syncs every blob file not synced yet, then the directory, and forgets the files sled
    /// has removed; files sled removes while this runs are skipped. Returns how many files it
    /// synced.
    ///
    /// Run after a flush, the listing holds every blob file that flush covers, complete. It may
    /// also hold one sled is still writing (for a write the flush does not cover), so when there
    /// are new files, `settle` (another `flush()`) runs before they are synced: sled creates a
    /// blob file after it has reserved the file's place in the log, and a flush waits for every
    /// reservation made before it starts to be complete, so every listed file is then whole.
    fn sync_new(&mut self, settle: impl FnOnce() -> Result<()>) -> Result<usize> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            // sled makes the directory when it opens; should it be gone there is nothing to sync.
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(error) => return Err(Error::Sync(error)),
        };
        let mut present = HashSet::with_capacity(self.synced.len());
        let mut new = Vec::new();
        for entry in entries {
            let name = entry.map_err(Error::Sync)?.file_name();
            if !self.synced.contains(&name) {
                new.push(name.clone());
            }
            present.insert(name);
        }
        if !new.is_empty() {
            settle()?;
            for name in &new {
                match File::open(self.dir.join(name)) {
                    Ok(file) => file.sync_data().map_err(Error::Sync)?,
                    Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                    Err(error) => return Err(Error::Sync(error)),
                }
            }
            sync_directory(&self.dir).map_err(Error::Sync)?;
        }
        self.synced = present;
        self.syncs.fetch_add(new.len() as u64, Ordering::Relaxed);
        Ok(new.len())
    }
}

/// fsyncs a directory, so that the names made in it survive a power loss.
fn sync_directory(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[test]
    fn new_blob_files_are_synced_once_after_a_settling_flush_and_removed_ones_forgotten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut blobs = BlobFiles::new(dir.path().to_path_buf(), Arc::default());
        let settled = Cell::new(0);
        let settle = || {
            settled.set(settled.get() + 1);
            Ok(())
        };
        assert_eq!(blobs.sync_new(settle).expect("empty"), 0);
        assert_eq!(settled.get(), 0, "nothing new: no settling flush");

        std::fs::write(dir.path().join("100"), b"one").expect("write");
        std::fs::write(dir.path().join("200"), b"two").expect("write");
        assert_eq!(blobs.sync_new(settle).expect("two new files"), 2);
        assert_eq!(settled.get(), 1);
        assert_eq!(blobs.sync_new(settle).expect("nothing new"), 0);
        assert_eq!(settled.get(), 1);

        std::fs::remove_file(dir.path().join("200")).expect("remove");
        assert_eq!(blobs.sync_new(settle).expect("one removed"), 0);
        assert_eq!(blobs.synced.len(), 1);
        std::fs::write(dir.path().join("300"), b"three").expect("write");
        assert_eq!(blobs.sync_new(settle).expect("one new"), 1);
        assert_eq!(blobs.syncs.load(Ordering::Relaxed), 3);
        assert_eq!(settled.get(), 2);
    }

    #[test]
    fn a_failed_settling_flush_syncs_nothing_and_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("100"), b"one").expect("write");
        let mut blobs = BlobFiles::new(dir.path().to_path_buf(), Arc::default());
        assert!(blobs.sync_new(|| Err(Error::Failed)).is_err());
        assert_eq!(blobs.syncs.load(Ordering::Relaxed), 0);
        assert!(blobs.synced.is_empty(), "the file is still to sync");
    }

    #[test]
    fn a_missing_blob_directory_has_nothing_to_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut blobs = BlobFiles::new(dir.path().join("blobs"), Arc::default());
        assert_eq!(blobs.sync_new(|| Ok(())).expect("no directory"), 0);
    }
}
