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
//! each blob file it has not synced at its present length, then the `blobs` directory if any
//! was new, then the log (an fdatasync): an acknowledged write's blobs are on the disk before it
//! is. In `flush` mode it syncs the new blob files at most every 500 ms, as sled syncs its log,
//! so a power loss costs about the last half second whatever the values' size.

use std::collections::HashMap;
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
    pub(crate) fn after_flush(&mut self) -> Result<()> {
        match self.mode {
            SyncMode::Fsync => {
                self.blobs.sync_new().map_err(Error::Sync)?;
                self.log.sync_data().map_err(Error::Sync)
            }
            SyncMode::Flush => {
                if self.blobs_synced_at.elapsed() >= FLUSH_MODE_BLOB_INTERVAL {
                    self.blobs.sync_new().map_err(Error::Sync)?;
                    self.blobs_synced_at = Instant::now();
                }
                Ok(())
            }
        }
    }

    /// How many blob files have been synced since the store opened (a file synced again after
    /// it grew counts again).
    pub(crate) fn blob_syncs(&self) -> u64 {
        self.blobs.syncs
    }
}

/// The blob files of a store and which of them are synced.
struct BlobFiles {
    dir: PathBuf,
    /// Each blob file synced, with the length it had: sled writes a blob file once, from its
    /// start to its end, so a file still at that length has nothing left to sync, and one that
    /// was synced while sled was still writing it is synced again when seen longer.
    synced: HashMap<OsString, u64>,
    syncs: u64,
}

impl BlobFiles {
    fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            synced: HashMap::new(),
            syncs: 0,
        }
    }

    /// Syncs every blob file not synced at its present length, then the directory if any file
    /// was new to it, and forgets the files sled has removed. Files sled removes while this
    /// runs are skipped. Returns how many files it synced.
    fn sync_new(&mut self) -> io::Result<usize> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            // sled makes the directory when it opens; should it be gone there is nothing to sync.
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(error) => return Err(error),
        };
        let mut present = HashMap::with_capacity(self.synced.len());
        let mut new_names = false;
        let mut synced = 0;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let length = match entry.metadata() {
                Ok(metadata) => metadata.len(),
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => return Err(error),
            };
            let known = self.synced.get(&name).copied();
            if known != Some(length) {
                match File::open(entry.path()) {
                    Ok(file) => file.sync_data()?,
                    Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                    Err(error) => return Err(error),
                }
                synced += 1;
                new_names |= known.is_none();
            }
            present.insert(name, length);
        }
        if new_names {
            sync_directory(&self.dir)?;
        }
        self.synced = present;
        self.syncs += synced as u64;
        Ok(synced)
    }
}

/// fsyncs a directory, so that the names made in it survive a power loss.
fn sync_directory(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn a_blob_file_is_synced_once_unless_it_grows_and_removed_ones_are_forgotten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut blobs = BlobFiles::new(dir.path().to_path_buf());
        assert_eq!(blobs.sync_new().expect("empty"), 0);

        let mut first = File::create(dir.path().join("100")).expect("create");
        first.write_all(b"half of it").expect("write");
        std::fs::write(dir.path().join("200"), b"whole").expect("write");
        assert_eq!(blobs.sync_new().expect("two new files"), 2);
        assert_eq!(blobs.sync_new().expect("nothing new"), 0);

        // A file seen while it was being written is synced again once it is longer.
        first.write_all(b" and the rest").expect("write");
        assert_eq!(blobs.sync_new().expect("one grew"), 1);
        assert_eq!(blobs.sync_new().expect("nothing new"), 0);

        std::fs::remove_file(dir.path().join("200")).expect("remove");
        assert_eq!(blobs.sync_new().expect("one removed"), 0);
        assert_eq!(blobs.synced.len(), 1);
        assert_eq!(blobs.syncs, 3);
    }

    #[test]
    fn a_missing_blob_directory_has_nothing_to_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut blobs = BlobFiles::new(dir.path().join("blobs"));
        assert_eq!(blobs.sync_new().expect("no directory"), 0);
    }
}
