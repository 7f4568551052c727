//! The whole route table: each resource's `router()`, with the middleware that applies to it.
//!
//! Layers, outermost first: `telemetry` (every request, answered or refused, is logged and counted),
//! the body limit, `api_error::failed_store` (a server fault while the store has failed is that
//! failure, 503), then for `/v1` only the concurrency cap, the request timeout and authentication
//! (connector webhooks are signed instead, so they skip authentication; the replication websocket
//! checks its own tokens and is exempt from the time limit and the concurrency cap).
//! `/healthz`, `/readyz` and `/metrics` sit outside the `/v1` limits and auth, so probes and scrapes
//! still work while the API is saturated. A path no route matches gets 404 JSON, and a known path
//! with the wrong method 405 JSON (with `Allow`).

use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
use axum::Router;

use crate::api_error::ApiError;
use crate::state::AppState;
use crate::{
    api_error, auth, changes, connectors, entities, health, limits, metrics, replication, telemetry,
};

/// Every route, with its middleware, ready to serve.
pub(crate) fn app(state: AppState) -> Router {
    let api = Router::new()
        .merge(entities::router())
        .merge(changes::router())
        .merge(connectors::router())
        .merge(replication::router())
        .layer(from_fn_with_state(state.clone(), auth::authenticate))
        .layer(from_fn_with_state(state.clone(), limits::time_limit))
        .layer(from_fn_with_state(state.clone(), limits::admit));
    // Webhooks prove who sent them with a signature, not a bearer token; limits still apply.
    let webhooks = connectors::webhook_router()
        .layer(from_fn_with_state(state.clone(), limits::time_limit))
        .layer(from_fn_with_state(state.clone(), limits::admit));
    Router::new()
        .merge(api)
        .merge(webhooks)
        // Peers authenticate with replication tokens, and the socket outlives any time limit.
        .merge(replication::endpoint_router())
        .merge(health::router())
        .merge(metrics::router())
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(from_fn_with_state(state.clone(), api_error::failed_store))
        .layer(DefaultBodyLimit::max(state.config.limits.max_body_bytes))
        .layer(axum::middleware::from_fn(limits::check_head))
        .layer(from_fn_with_state(state.clone(), telemetry::observe))
        .with_state(state)
}

async fn no_route() -> ApiError {
    ApiError::NotFound {
        code: "no_route",
        detail: "no endpoint has this path; see docs/http-api.md".into(),
    }
}

async fn wrong_method() -> ApiError {
    ApiError::MethodNotAllowed
}
