//! What `server::run` can fail with. Request failures are `api_error::ApiError`'s business;
//! these are the failures that stop the server itself.

use std::path::PathBuf;

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store could not be opened (the directory is unreadable or in use by another process).
    #[error("could not open the store in {path}")]
    OpenStore {
        /// The data directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: store::Error,
    },
    /// The auth settings name a token that cannot be an origin (only for hand-built settings;
    /// `Config::load` refuses them earlier).
    #[error("invalid auth settings")]
    Auth(#[source] store::Error),
    /// The last flush on shutdown failed: writes acknowledged before it are durable, but the
    /// store did not close cleanly.
    #[error("could not close the store cleanly")]
    CloseStore(#[source] store::Error),
    /// A blocking task that opens or closes the store panicked.
    #[error("the store task panicked")]
    StoreTask(#[source] tokio::task::JoinError),
    /// The connectors' records (the webhook ids they remember) could not be read at start.
    #[error("could not read the connectors' records")]
    Connectors(#[source] connectors::Error),
    /// The thread that opens the store could not be started, or panicked.
    #[error("the thread that opens the store failed: {0}")]
    OpenThread(String),
}

/// The server's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
