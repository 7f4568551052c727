//! Per-request telemetry: a `request` span with the method, the route and the caller (the origin
//! its token names, recorded by `auth`), a log line with the status and latency, and the counts
//! and latencies `/metrics` reports.
//!
//! Request lines are logged at `debug` (`RUST_LOG=server=debug` shows them), so a busy server does
//! not spend its time writing access logs by default; failures are logged where they are turned
//! into responses, in `api_error`. Nothing from the headers is logged: they may carry a token.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use crate::state::AppState;

/// The route label of a request that matched no route.
const UNMATCHED: &str = "unmatched";

/// Middleware: times the request, logs it and records it in the metrics.
pub(crate) async fn observe(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|matched| matched.as_str().to_owned())
        .unwrap_or_else(|| UNMATCHED.to_owned());
    let method = request.method().clone();
    let span = tracing::info_span!(
        "request",
        %method,
        route = %route,
        caller = tracing::field::Empty
    );
    let response = next.run(request).instrument(span.clone()).await;
    let latency = started.elapsed();
    let status = response.status().as_u16();
    span.in_scope(|| {
        tracing::debug!(
            status,
            latency_ms = latency.as_secs_f64() * 1000.0,
            "request answered"
        );
    });
    state
        .metrics
        .record(&route, method_label(&method), status, latency);
    response
}

/// The method as a metrics label; any method outside the standard ones is `other`, so a client
/// cannot create series at will.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}
