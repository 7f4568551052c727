//! The store's one error type; `server` maps each variant to an HTTP status.

use crate::key::EntityKey;

/// Everything a store operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A kind, id, origin or version string that does not match its grammar.
    #[error("invalid {what}: {detail}")]
    Invalid {
        /// Which value was wrong (`kind`, `id`, `version`, ...).
        what: &'static str,
        /// Why, in words a caller can act on.
        detail: String,
    },
    /// The request body is not something the store can write (not an object, empty, too deep).
    #[error("{0}")]
    UnwritableValue(String),
    /// A conditional write named a version the entity is no longer at.
    #[error("{}", version_mismatch(key, expected, current))]
    VersionMismatch {
        /// The entity.
        key: EntityKey,
        /// The version the caller expected.
        expected: String,
        /// The version the entity is at now (empty when it does not exist).
        current: String,
    },
    /// A time-travel read named a version this entity never had.
    #[error("{key} has no version {version}")]
    UnknownVersion {
        /// The entity.
        key: EntityKey,
        /// The version asked for.
        version: String,
    },
    /// Bytes from outside (a replica, a client, the disk) are not a valid Automerge document or change.
    #[error("could not decode automerge data: {0}")]
    Decode(String),
    /// sled failed; the write was not applied.
    #[error("storage failure")]
    Storage(#[from] sled::Error),
    /// The disk could not be synced; the write may not be durable.
    #[error("could not sync the data directory to disk")]
    Sync(#[source] std::io::Error),
    /// Stored data could not be read back; the store is damaged.
    #[error("stored data for {what} is corrupt: {detail}")]
    Corrupt {
        /// What was being read.
        what: String,
        /// What was wrong with it.
        detail: String,
    },
    /// Automerge refused an operation it should have accepted (a bug in the store).
    #[error("automerge rejected an operation")]
    Automerge(#[from] automerge::AutomergeError),
    /// Working out a write panicked (a bug): that write failed and nothing of it was written.
    #[error("a write panicked while it was worked out (a bug): {0}")]
    Panicked(String),
    /// The store is shutting down or its flusher died; the write may not be durable.
    #[error("the store is closed")]
    Closed,
    /// A flush failed (a full disk, an I/O error). sled's state after a failed flush is
    /// unknown, so the store takes no more writes until it is opened again; every write
    /// acknowledged before the failure is on disk. The write may not be durable.
    #[error("a flush failed, so the store takes no more writes until it is opened again")]
    Failed,
}

/// The store's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn version_mismatch(key: &EntityKey, expected: &str, current: &str) -> String {
    if current.is_empty() {
        format!("{key} does not exist, so it is not at version {expected}")
    } else {
        format!("{key} is at version {current}, not {expected}")
    }
}

impl Error {
    /// The same error again, for each of the writes a shared failure (a batch that could not be
    /// applied, a store that closed) applies to. Only the variants such failures produce are
    /// copied exactly; anything else keeps its message.
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::Closed => Error::Closed,
            Error::Failed => Error::Failed,
            Error::Storage(error) => Error::Storage(error.clone()),
            Error::Sync(error) => Error::Sync(std::io::Error::new(error.kind(), error.to_string())),
            other => Error::Corrupt {
                what: "a batch of writes".into(),
                detail: other.to_string(),
            },
        }
    }
}

/// The message a panic was raised with, for an error or a log line.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(ToString::to_string)
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
