//! `AppState`: what every handler shares, and the one way handlers run blocking store work.
//!
//! Every `Store` method blocks until a group flush, so handlers never call it on an async thread:
//! they go through [`AppState::blocking`], which runs the call on the blocking pool and tracks it on
//! the server's `TaskTracker`, so shutdown waits for it before closing the store.

use std::sync::Arc;

use store::Store;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api_error::ApiError;
use crate::auth::Tokens;
use crate::config::Config;
use crate::metrics::Metrics;

/// Shared by every handler and middleware. Cloning it is one reference count: axum clones the
/// state for every middleware and extractor of every request, and cloning each shared part on
/// its own cost a dozen atomic updates per clone on the request threads.
#[derive(Clone)]
pub(crate) struct AppState(Arc<Shared>);

/// What [`AppState`] shares; its fields read through `AppState` (`state.store`).
pub(crate) struct Shared {
    pub(crate) store: Store,
    /// The configured connectors (webhooks in, deliveries out, admin).
    pub(crate) connectors: connectors::Connectors,
    /// Replication with other sites (`[[peers]]`, `[replication]`).
    pub(crate) replication: replication::Replication,
    pub(crate) config: Arc<Config>,
    pub(crate) tokens: Arc<Tokens>,
    pub(crate) metrics: Arc<Metrics>,
    /// Caps concurrent `/v1` requests; see `limits`.
    pub(crate) admission: Arc<Semaphore>,
    /// Caps open change feed event streams (`limits.max_event_streams`); see `changes`.
    pub(crate) event_streams: Arc<Semaphore>,
    pub(crate) tasks: TaskTracker,
    /// Cancelled when the server starts shutting down; long-lived responses end on it.
    pub(crate) shutdown: CancellationToken,
}

impl AppState {
    pub(crate) fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }

    /// Runs `work` with the store on a blocking thread tracked by the server's `TaskTracker`.
    pub(crate) async fn blocking<T, F>(&self, work: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> store::Result<T> + Send + 'static,
    {
        let store = self.store.clone();
        match self.tasks.spawn_blocking(move || work(&store)).await {
            Ok(result) => result.map_err(ApiError::Store),
            Err(join_error) => Err(ApiError::Internal {
                what: "a store call panicked",
                source: Box::new(join_error),
            }),
        }
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}
