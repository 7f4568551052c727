//! Lockstep's HTTP server: the REST API over `store::Store`, the change feed, auth, limits,
//! metrics and graceful shutdown.
//!
//! [`run`] is the only entry point: the `lockstep` binary passes it a listener and a token that
//! SIGINT/SIGTERM cancel, and the end-to-end tests pass their own. This is the only crate that
//! knows HTTP status codes; the store's errors become responses in `api_error`. It never reads the
//! process environment: [`Config::load`] takes the variables as an argument.
//!
//! # Layout
//! `config` is the configuration tree and its loader; `routes` composes the resource routers
//! (`entities`, `changes`, `health`, `metrics`) with the middleware in `telemetry`, `limits` and
//! `auth`; `extract` holds our extractors, so rejections come back in our error shape;
//! `connectors` serves webhooks and the connector admin API; `replication` accepts peers' websockets
//! and serves peer status;
//! `api_error` turns every failure into `{"code", "detail"}`; `state` is what handlers share;
//! `connection` accepts and serves connections with a header-read timeout and graceful shutdown.
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use server::{Config, ConfigSources};
//! use tokio_util::sync::CancellationToken;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let config = Config::load(ConfigSources {
//!     data_dir: Some(dir.path().join("data")),
//!     ..ConfigSources::default()
//! })?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let shutdown = CancellationToken::new();
//! let server = tokio::spawn(server::run(Arc::new(config), listener, shutdown.clone()));
//! // ... serve requests ...
//! shutdown.cancel();
//! server.await??;
//! # Ok(())
//! # }
//! ```

mod api_error;
mod auth;
mod changes;
mod config;
mod connection;
mod connectors;
mod entities;
mod error;
mod extract;
mod health;
mod limits;
mod metrics;
mod parse_errors;
mod replication;
mod routes;
mod state;
mod telemetry;
mod tls;

use std::sync::Arc;

use store::Store;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use config::{
    AuthSettings, Config, ConfigError, ConfigSources, Limits, Role, Secret, StoreSettings,
    TlsSettings, TokenSettings, DEFAULT_TOML,
};
pub use error::{Error, Result};

use crate::auth::Tokens;
use crate::metrics::Metrics;
use crate::state::{AppState, Shared};

/// The site name when `replication.site` is empty: the bound address, e.g. `127.0.0.1_7878`.
fn default_site(listener: &TcpListener) -> String {
    match listener.local_addr() {
        Ok(address) => address.to_string().replace([':', '[', ']'], "_"),
        Err(_) => "lockstep".into(),
    }
}

/// Opens the store in `config.store.data_dir`, then serves on `listener` as [`run_with_store`] does.
///
/// # Errors
/// [`Error::OpenStore`] when the store cannot be opened; otherwise as [`run_with_store`].
pub async fn run(
    config: Arc<Config>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let store_config = config.store.store_config();
    let path = store_config.path.clone();
    // On a thread of its own, not one of tokio's: the store's writer and flush threads start
    // from it and inherit its CPU priority, the process's, where tokio's threads may run lower
    // (`request_threads_nice`, set by the `lockstep` binary).
    let (opened, open) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("lockstep-open".into())
        .spawn(move || {
            // The receiver only goes away when `run` is dropped, and then nobody needs the store.
            let _ = opened.send(Store::open(store_config));
        })
        .map_err(|error| Error::OpenThread(error.to_string()))?;
    let store = open
        .await
        .map_err(|_| Error::OpenThread("it panicked".into()))?
        .map_err(|source| Error::OpenStore { path, source })?;
    tracing::info!(data_dir = %config.store.data_dir.display(), "store open");
    run_with_store(config, store, listener, shutdown).await
}

/// Serves the API over an open `store` on `listener` until `shutdown` is cancelled, then shuts
/// down gracefully: stops accepting, lets in-flight requests finish (for up to
/// `limits.shutdown_grace`), waits for every store call already started, and closes the store,
/// which flushes it. Returns once the store is closed.
///
/// The store's lifecycle passes to the server: it is closed on return, even when the caller
/// still holds clones of it.
///
/// # Errors
/// [`Error::CloseStore`] when the final flush fails.
pub async fn run_with_store(
    config: Arc<Config>,
    store: Store,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let tasks = TaskTracker::new();
    let force = CancellationToken::new();
    // Off the runtime's threads: it reads each connector's remembered webhook ids.
    let (reader, validated) = (store.clone(), config.validated_connectors.clone());
    let connectors =
        tokio::task::spawn_blocking(move || ::connectors::Connectors::new(reader, validated))
            .await
            .map_err(Error::StoreTask)?
            .map_err(Error::Connectors)?
            .with_task_tracker(tasks.clone());
    for (name, worker) in connectors.workers(shutdown.child_token()) {
        tasks.spawn(worker.instrument(tracing::info_span!("delivery", connector = %name)));
    }
    let site = match config.replication.site.as_str() {
        "" => default_site(&listener),
        site => site.to_string(),
    };
    let replication = ::replication::Replication::new(
        store.clone(),
        &site,
        config.replication.clone(),
        config.validated_peers.clone(),
    )
    .map_err(|source| Error::OpenStore {
        path: config.store.data_dir.clone(),
        source,
    })?;
    for (name, worker) in replication.dialers(&shutdown) {
        tasks.spawn(worker.instrument(tracing::info_span!("ws", peer = %name)));
    }
    tracing::info!(%site, peers = config.validated_peers.len(), "replication ready");
    let state = AppState::new(Shared {
        connectors,
        replication,
        store: store.clone(),
        tokens: Arc::new(Tokens::new(&config.auth).map_err(Error::Auth)?),
        metrics: Arc::new(Metrics::default()),
        admission: Arc::new(Semaphore::new(config.limits.max_concurrent_requests)),
        event_streams: Arc::new(Semaphore::new(config.limits.max_event_streams)),
        tasks: tasks.clone(),
        shutdown: shutdown.clone(),
        config: config.clone(),
    });
    let app = routes::app(state);
    if let Some(tls) = &config.tls_acceptor {
        tracing::info!(
            target: "lockstep",
            cert_file = %config.tls.cert_file.display(),
            "serving HTTPS only"
        );
        tls::warn_of_expiry(tls.validity(), &config.tls.cert_file);
        if !config.tls.reload_interval.is_zero() {
            tasks.spawn(tls::reload_on_change(
                tls.clone(),
                config.tls.reload_interval,
                shutdown.clone(),
            ));
        }
    }
    // Said only now that requests are served: a process that cannot open its store (another
    // one holds it) must not have announced an address first. Scripts and tests wait for this
    // line, under the binary's target, and read the port from it.
    match listener.local_addr() {
        Ok(address) => tracing::info!(target: "lockstep", "listening on {address}"),
        Err(error) => {
            tracing::warn!(target: "lockstep", %error, "serving, but the bound address cannot be read")
        }
    }
    connection::accept(
        listener,
        config.tls_acceptor.clone(),
        app,
        &config.limits,
        &shutdown,
        &force,
        &tasks,
    )
    .await;

    tracing::info!("shutting down: finishing in-flight requests");
    tasks.close();
    if tokio::time::timeout(config.limits.shutdown_grace, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            grace = ?config.limits.shutdown_grace,
            "requests still running after the grace period; dropping their connections"
        );
        force.cancel();
        // What remains are store calls already started; each ends after one flush.
        tasks.wait().await;
    }
    let closed = tokio::task::spawn_blocking(move || store.close())
        .await
        .map_err(Error::StoreTask)?;
    closed.map_err(Error::CloseStore)?;
    tracing::info!("store closed; shutdown complete");
    Ok(())
}
