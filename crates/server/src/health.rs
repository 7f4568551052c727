//! `/healthz` and `/readyz`: whether the process is alive, and whether it is taking requests.
//!
//! `/healthz` answers 200 for as long as the process serves HTTP at all. `/readyz` answers 200
//! while the store is open and the server accepts requests, and 503 once shutdown has begun or
//! after a failed flush closed the store, so a
//! load balancer stops sending traffic before the listener closes.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::api_error::ApiError;
use crate::state::AppState;

#[cfg(test)]
mod tests;

/// `GET /healthz` and `GET /readyz`.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    if state.shutdown.is_cancelled() {
        return Err(ApiError::ShuttingDown);
    }
    // After a failed flush the store refuses writes until the process is restarted.
    state.store.writable()?;
    Ok(Json(
        json!({ "status": "ready", "feed_seq": state.store.last_seq().0 }),
    ))
}
