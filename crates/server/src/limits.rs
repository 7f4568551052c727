//! Request limits that are middleware: the size of a request's head, the concurrency cap and the
//! request timeout.
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

/// The longest request target (path and query) served: far more than any route needs.
pub(crate) const MAX_URI_BYTES: usize = 8 * 1024;
/// The most header bytes (names and values) a request may carry in all.
pub(crate) const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Middleware: refuses a request whose target or headers are larger than the limits above, with
/// our JSON errors (414, 431). Hyper refuses heads larger than its own buffer (about 400 KiB),
/// or with more than 100 headers, before any of this runs (see `parse_errors`).
pub(crate) async fn check_head(request: Request, next: Next) -> Result<Response, ApiError> {
    let target = request
        .uri()
        .path_and_query()
        .map_or(0, |target| target.as_str().len());
    if target > MAX_URI_BYTES {
        return Err(ApiError::UriTooLong {
            limit: MAX_URI_BYTES,
        });
    }
    let headers: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if headers > MAX_HEADER_BYTES {
        return Err(ApiError::HeadersTooLarge {
            limit: MAX_HEADER_BYTES,
        });
    }
    Ok(next.run(request).await)
}

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
