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
//! before it is. In `flush` mode it syncs the new blob files at most every 500 ms, as sled syncs
//! its log, so a power loss costs about the last half second whatever the values' size. Finding
//! the new files lists the directory, which costs time with its number of files (about 3 ms for
//! 10,000 on this machine's ext4): in `fsync` mode, at every flush.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::durability::SyncMode;
use crate::error::{Error, Result};

/// How often `flush` mode syncs new blob files: as often as sled fsyncs its log.
const FLUSH_MODE_BLOB_INTERVAL: Duration = Duration::from_millis(500);

/// sled's files that a flush syncs, per [`SyncMode`].
pub(crate) struct SyncedFiles {
    mode: SyncMode,
    /// sled's log file, fdatasynced after every flush in `fsync` mode.
    log: File,
    blobs: BlobFiles,
    /// When `flush` mode last synced the blob files.
    blobs_synced_at: Instant,
}

impl SyncedFiles {
    /// sled's files in the store directory `dir`, which sled has opened (and so created).
    /// Syncs the directory itself once, so that the files sled created in it (the log, the
    /// `blobs` directory) survive a power loss.
    ///
    /// # Errors
    /// [`Error::Sync`] when the log file cannot be opened or the directory cannot be synced.
    pub(crate) fn open(dir: &Path, mode: SyncMode) -> Result<Self> {
        let log = File::open(dir.join("db")).map_err(Error::Sync)?;
        sync_directory(dir).map_err(Error::Sync)?;
        Ok(Self {
            mode,
            log,
            blobs: BlobFiles::new(dir.join("blobs")),
            blobs_synced_at: Instant::now(),
        })
    }

    /// Run after each `flush()` of sled, before the writes it covers are acknowledged.
    ///
    /// # Errors
    /// [`Error::Sync`] when a file cannot be synced: what the flush covers may not survive a
    /// power loss.
    pub(crate) fn after_flush(&mut self, db: &sled::Db) -> Result<()> {
        let settle = || db.flush().map(drop).map_err(Error::from);
        match self.mode {
            SyncMode::Fsync => {
                self.blobs.sync_new(settle)?;
                self.log.sync_data().map_err(Error::Sync)
            }
            SyncMode::Flush => {
                if self.blobs_synced_at.elapsed() >= FLUSH_MODE_BLOB_INTERVAL {
                    self.blobs.sync_new(settle)?;
                    self.blobs_synced_at = Instant::now();
                }
                Ok(())
            }
        }
    }

    /// How many blob files have been synced since the store opened.
    pub(crate) fn blob_syncs(&self) -> u64 {
        self.blobs.syncs
    }
}

/// The blob files of a store and which of them are synced.
struct BlobFiles {
    dir: PathBuf,
    /// The blob files synced (and still there when last listed).
    synced: HashSet<OsString>,
    syncs: u64,
}

impl BlobFiles {
    fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            synced: HashSet::new(),
            syncs: 0,
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
        self.syncs += new.len() as u64;
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
        let mut blobs = BlobFiles::new(dir.path().to_path_buf());
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
        assert_eq!(blobs.syncs, 3);
        assert_eq!(settled.get(), 2);
    }

    #[test]
    fn a_failed_settling_flush_syncs_nothing_and_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("100"), b"one").expect("write");
        let mut blobs = BlobFiles::new(dir.path().to_path_buf());
        assert!(blobs.sync_new(|| Err(Error::Failed)).is_err());
        assert_eq!(blobs.syncs, 0);
        assert!(blobs.synced.is_empty(), "the file is still to sync");
    }

    #[test]
    fn a_missing_blob_directory_has_nothing_to_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut blobs = BlobFiles::new(dir.path().join("blobs"));
        assert_eq!(blobs.sync_new(|| Ok(())).expect("no directory"), 0);
    }
}
