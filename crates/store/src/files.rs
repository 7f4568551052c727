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
//! [`SyncedFiles`] closes that gap. In `fsync` mode, after every flush, it syncs each blob file
//! it has not synced yet (once whole: see [`BlobFiles::sync_new`]), then the `blobs`
//! directory, then the log (an fdatasync): an acknowledged write's blobs are on the disk before
//! it is. In both modes a thread of its own syncs new blob files every 500 ms, as sled fsyncs
//! its log: sled's own background work rewrites pages into new blob files without a write of
//! ours (in `flush` mode this is all there is, so a power loss costs about the last half second
//! whatever the values' size, and acknowledgements never wait for it). The files already there
//! are synced when the store opens (a process killed before they were synced left them to the
//! kernel), and once more when it closes. A failed sync is kept: the kernel may drop the data it
//! could not write and call the pages clean, so a later sync that succeeds proves nothing, and
//! the store refuses writes from the next flush on, as after a failed flush.
//!
//! Finding the new files lists the directory, which costs time with its number of files (about
//! 3 ms for 10,000 on this machine's ext4): in `fsync` mode, at every flush.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::durability::SyncMode;
use crate::error::{Error, Result};

/// How often the background thread syncs new blob files: as often as sled fsyncs its log.
const BACKGROUND_INTERVAL: Duration = Duration::from_millis(500);

/// sled's files that a flush syncs, per [`SyncMode`].
pub(crate) struct SyncedFiles {
    /// `fsync` mode: sled's log file, fdatasynced after every flush (after the blob files).
    log: Option<File>,
    blobs: Arc<SharedBlobs>,
    /// The thread that syncs new blob files every 500 ms, and the sender whose drop stops it.
    background: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
}

impl SyncedFiles {
    /// sled's files in the store directory `dir`, which sled has opened as `db`. Syncs the
    /// directory and its parent (the names sled made: the log, `blobs`, the directory itself)
    /// and every blob file already there, then starts the background thread.
    ///
    /// # Errors
    /// [`Error::Sync`] when a file cannot be opened or synced.
    pub(crate) fn open(dir: &Path, mode: SyncMode, db: &sled::Db) -> Result<Self> {
        let log = File::open(dir.join("db")).map_err(Error::Sync)?;
        sync_path(dir).map_err(Error::Sync)?;
        if let Some(parent) = dir.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            sync_path(parent).map_err(Error::Sync)?;
        }
        let blobs = Arc::new(SharedBlobs {
            files: Mutex::new(BlobFiles::new(dir.join("blobs"))),
            failure: Mutex::new(None),
            syncs: AtomicU64::new(0),
        });
        blobs.sync_new(db)?;
        let (stop, stopped) = mpsc::channel();
        let thread = {
            let (db, blobs) = (db.clone(), Arc::clone(&blobs));
            std::thread::Builder::new()
                .name("lockstep-blob-sync".into())
                .spawn(move || sync_in_background(&db, &blobs, &stopped))
                .map_err(Error::Sync)?
        };
        Ok(Self {
            log: (mode == SyncMode::Fsync).then_some(log),
            blobs,
            background: Some((stop, thread)),
        })
    }

    /// Run after each `flush()` of sled, before the writes it covers are acknowledged.
    ///
    /// # Errors
    /// [`Error::Sync`] when a file cannot be synced, now or earlier (see the module's comment):
    /// what the flush covers may not survive a power loss.
    pub(crate) fn after_flush(&mut self, db: &sled::Db) -> Result<()> {
        match &self.log {
            Some(log) => {
                self.blobs.sync_new(db)?;
                log.sync_data().map_err(Error::Sync)
            }
            None => self.blobs.check(),
        }
    }

    /// The blob files' state, shared (for [`SharedBlobs::count`]).
    pub(crate) fn blobs(&self) -> Arc<SharedBlobs> {
        Arc::clone(&self.blobs)
    }
}

impl Drop for SyncedFiles {
    /// Stops the background thread (it syncs the newest blob files once more and lets go of
    /// sled) and waits for it. The store's last flush has run by then.
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.background.take() {
            drop(stop);
            let _ = thread.join();
        }
    }
}

/// The blob files' state, shared by the flush thread and the background thread.
pub(crate) struct SharedBlobs {
    files: Mutex<BlobFiles>,
    /// The first failed sync, kept (see the module's comment).
    failure: Mutex<Option<(io::ErrorKind, String)>>,
    syncs: AtomicU64,
}

impl SharedBlobs {
    /// Blob files synced since the store opened.
    pub(crate) fn count(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// [`BlobFiles::sync_new`] with sled's `flush()` to settle, unless a sync failed before.
    fn sync_new(&self, db: &sled::Db) -> Result<()> {
        self.check()?;
        let mut files = lock(&self.files);
        match files.sync_new(|| settle(db), sync_path) {
            Ok(synced) => {
                self.syncs.fetch_add(synced as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(Error::Sync(error)) => {
                *lock(&self.failure) = Some((error.kind(), error.to_string()));
                Err(Error::Sync(error))
            }
            Err(other) => Err(other),
        }
    }

    /// The failure kept, if any, as an error.
    fn check(&self) -> Result<()> {
        match &*lock(&self.failure) {
            Some((kind, message)) => Err(Error::Sync(io::Error::new(
                *kind,
                format!("an earlier sync of sled's blob files failed: {message}"),
            ))),
            None => Ok(()),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Another `flush()`, after which every blob file listed before it is whole (see
/// [`BlobFiles::sync_new`]).
fn settle(db: &sled::Db) -> Result<()> {
    db.flush().map(drop).map_err(Error::from)
}

/// fsyncs a file or directory (a directory's sync makes the names in it survive a power loss).
fn sync_path(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// The background thread: syncs new blob files every 500 ms until `stopped` is dropped, then
/// once more. After a failure it stops; the flush thread reports the failure from then on.
fn sync_in_background(db: &sled::Db, blobs: &SharedBlobs, stopped: &mpsc::Receiver<()>) {
    let report = |error: Error| {
        tracing::error!(%error, cause = ?std::error::Error::source(&error).map(ToString::to_string), "syncing sled's blob files failed; refusing further writes");
    };
    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(BACKGROUND_INTERVAL) {
        if let Err(error) = blobs.sync_new(db) {
            return report(error);
        }
    }
    if let Err(error) = blobs.sync_new(db) {
        report(error);
    }
}

/// The blob files of a store and which of them are synced.
struct BlobFiles {
    dir: PathBuf,
    /// The blob files synced (and still there when last listed).
    synced: HashSet<OsString>,
}

impl BlobFiles {
    fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            synced: HashSet::new(),
        }
    }

    /// Syncs (with `sync`) every blob file not synced yet, then the directory, and forgets the
    /// files sled has removed; files sled removes while this runs are skipped. Returns how many
    /// files it synced.
    ///
    /// Run after a flush, the listing holds every blob file that flush covers, whole. It may
    /// also hold one sled is still writing (for a write the flush does not cover), so when there
    /// are new files, `settle` (another `flush()`) runs before they are synced: sled creates a
    /// blob file after it has reserved the file's place in the log (and published that place as
    /// reserved), and a flush waits for every reservation made before it starts to be complete,
    /// so every listed file is then whole.
    fn sync_new(
        &mut self,
        settle: impl FnOnce() -> Result<()>,
        mut sync: impl FnMut(&Path) -> io::Result<()>,
    ) -> Result<usize> {
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
        let mut synced = 0;
        if !new.is_empty() {
            settle()?;
            for name in &new {
                match sync(&self.dir.join(name)) {
                    Ok(()) => synced += 1,
                    Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                    Err(error) => return Err(Error::Sync(error)),
                }
            }
            sync(&self.dir).map_err(Error::Sync)?;
        }
        self.synced = present;
        Ok(synced)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// `sync_new` with recorders: what it did, in order.
    fn sync_recorded(blobs: &mut BlobFiles) -> (usize, Vec<String>) {
        let done = RefCell::new(Vec::new());
        let synced = blobs
            .sync_new(
                || {
                    done.borrow_mut().push("settle".to_string());
                    Ok(())
                },
                |path| {
                    let name = path.file_name().map(|name| name.to_string_lossy());
                    done.borrow_mut()
                        .push(format!("sync {}", name.unwrap_or_default()));
                    sync_path(path)
                },
            )
            .expect("synced");
        (synced, done.into_inner())
    }

    #[test]
    fn new_blob_files_are_synced_once_after_a_settling_flush_then_their_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs_dir = dir.path().join("blobs");
        std::fs::create_dir(&blobs_dir).expect("mkdir");
        let mut blobs = BlobFiles::new(blobs_dir.clone());
        assert_eq!(
            sync_recorded(&mut blobs),
            (0, vec![]),
            "nothing, not even a flush"
        );

        std::fs::write(blobs_dir.join("100"), b"one").expect("write");
        std::fs::write(blobs_dir.join("200"), b"two").expect("write");
        let (synced, mut done) = sync_recorded(&mut blobs);
        assert_eq!(synced, 2);
        done[1..3].sort();
        assert_eq!(done, ["settle", "sync 100", "sync 200", "sync blobs"]);
        assert_eq!(sync_recorded(&mut blobs), (0, vec![]));

        std::fs::remove_file(blobs_dir.join("200")).expect("remove");
        assert_eq!(sync_recorded(&mut blobs), (0, vec![]));
        assert_eq!(blobs.synced.len(), 1);
        std::fs::write(blobs_dir.join("300"), b"three").expect("write");
        let (synced, done) = sync_recorded(&mut blobs);
        assert_eq!(
            (synced, done),
            (
                1,
                vec!["settle".into(), "sync 300".into(), "sync blobs".into()]
            )
        );
    }

    #[test]
    fn a_file_removed_before_its_sync_is_not_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("100"), b"one").expect("write");
        let mut blobs = BlobFiles::new(dir.path().to_path_buf());
        let removed = blobs.sync_new(
            || Ok(()),
            |path| {
                if path.ends_with("100") {
                    Err(io::ErrorKind::NotFound.into())
                } else {
                    Ok(())
                }
            },
        );
        assert_eq!(removed.expect("skipped"), 0);
    }

    #[test]
    fn a_failed_settling_flush_syncs_nothing_and_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("100"), b"one").expect("write");
        let mut blobs = BlobFiles::new(dir.path().to_path_buf());
        assert!(blobs
            .sync_new(|| Err(Error::Failed), |_| panic!("nothing is synced"))
            .is_err());
        assert!(blobs.synced.is_empty(), "the file is still to sync");
    }

    #[test]
    fn a_failed_sync_is_kept_and_reported_at_every_later_flush() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new()
            .path(dir.path())
            .open()
            .expect("sled opens");
        let mut files = SyncedFiles::open(dir.path(), SyncMode::Flush, &db).expect("opened");
        files.after_flush(&db).expect("nothing failed yet");
        *lock(&files.blobs.failure) = Some((io::ErrorKind::Other, "EIO".into()));
        for _ in 0..2 {
            match files.after_flush(&db) {
                Err(Error::Sync(error)) => assert!(error.to_string().contains("EIO"), "{error}"),
                other => panic!("the failure is not kept: {other:?}"),
            }
        }
    }

    #[test]
    fn a_missing_blob_directory_has_nothing_to_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut blobs = BlobFiles::new(dir.path().join("blobs"));
        assert_eq!(
            blobs
                .sync_new(|| Ok(()), |_| panic!("nothing to sync"))
                .expect("no directory"),
            0
        );
    }
}
