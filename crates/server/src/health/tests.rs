//! Readiness flips to 503 as soon as shutdown begins, while liveness stays 200.
//!
//! Over HTTP this is hard to observe (the listener closes at the same moment), so these tests
//! call the handlers with a state whose shutdown token is already cancelled.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use store::Store;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{healthz, readyz};
use crate::auth::Tokens;
use crate::config::{Config, ConfigSources};
use crate::metrics::Metrics;
use crate::state::{AppState, Shared};

fn state(dir: &std::path::Path) -> AppState {
    let config = Config::load(ConfigSources {
        data_dir: Some(dir.to_path_buf()),
        ..ConfigSources::default()
    })
    .expect("the defaults are valid");
    let store = Store::open(config.store.store_config()).expect("a fresh directory opens");
    AppState::new(Shared {
        connectors: ::connectors::Connectors::new(store.clone(), Vec::new()).unwrap(),
        replication: ::replication::Replication::new(
            store.clone(),
            "test",
            config.replication.clone(),
            Vec::new(),
        )
        .expect("no cursors to read"),
        store,
        tokens: Arc::new(Tokens::new(&config.auth).expect("no tokens are configured")),
        metrics: Arc::new(Metrics::default()),
        admission: Arc::new(Semaphore::new(1)),
        event_streams: Arc::new(Semaphore::new(1)),
        tasks: TaskTracker::new(),
        shutdown: CancellationToken::new(),
        config: Arc::new(config),
    })
}

#[tokio::test]
async fn readyz_is_503_once_shutdown_begins_and_healthz_stays_200() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let state = state(dir.path());
    let ready = readyz(State(state.clone())).await.into_response();
    assert_eq!(ready.status(), StatusCode::OK);

    state.shutdown.cancel();
    let ready = readyz(State(state.clone())).await.into_response();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(healthz().await.into_response().status(), StatusCode::OK);
    state.store.close().expect("the store closes");
}
