//! Request limits that are middleware: the concurrency cap and the request timeout.
//!
//! The other limits live where they act: the body size in `extract::JsonBody` (with axum's
//! `DefaultBodyLimit` as the backstop), and the header-read timeout in `connection`, because only
//! hyper sees a request before its headers are complete.
//!
//! Both middlewares cover a request until its response starts. A change-feed stream therefore
//! holds a permit and a deadline only while it is being set up, not for as long as it streams.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::api_error::ApiError;
use crate::state::AppState;

/// Middleware: admits a request only if fewer than `limits.max_concurrent_requests` are in
/// progress, and refuses it with 503 otherwise, rather than letting requests queue without bound.
pub(crate) async fn admit(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Ok(_permit) = state.admission.clone().try_acquire_owned() else {
        return Err(ApiError::Overloaded);
    };
    Ok(next.run(request).await)
}

/// Middleware: answers 408 when a request takes longer than `limits.request_timeout`.
///
/// A write that was already handed to the store when the deadline passed still completes; the
/// client is told that it may or may not have been applied.
pub(crate) async fn time_limit(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let limit = state.config.limits.request_timeout;
    tokio::time::timeout(limit, next.run(request))
        .await
        .map_err(|_| ApiError::Timeout(limit))
}
