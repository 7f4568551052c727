//! The replication endpoints: the websocket peers connect to, peer status, and peer metrics.
//!
//! `GET /v1/replication` is a websocket upgrade authenticated with a `[[replication.tokens]]`
//! token (401 without a known token, 403 for an API token, which may not replicate); it is
//! mounted outside the `/v1` authentication, time limit and admission layers, because it is
//! neither an API call nor short-lived. The upgraded socket runs on the server's `TaskTracker`
//! and watches the shutdown token itself, since axum's graceful shutdown does not wait for
//! upgraded connections. `GET /v1/peers` and `GET /v1/peers/{name}` sit behind the usual `/v1`
//! layers. What runs over the socket is the `replication` crate's business.

use std::fmt::Write;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tracing::Instrument;

use crate::api_error::ApiError;
use crate::extract::{ApiPath, NoQuery};
use crate::state::AppState;

/// `GET /v1/replication`: the websocket peers connect to.
pub(crate) fn endpoint_router() -> Router<AppState> {
    Router::new().route(replication::ENDPOINT_PATH, get(accept))
}

/// `GET /v1/peers` and `GET /v1/peers/{name}`, behind the `/v1` bearer-token layer.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/peers", get(list))
        .route("/v1/peers/{name}", get(status))
}

async fn list(State(state): State<AppState>, _: NoQuery) -> Json<Value> {
    Json(json!({
        "site": state.replication.site(),
        "peers": state.replication.statuses(),
    }))
}

async fn status(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    _: NoQuery,
) -> Result<Json<Value>, ApiError> {
    let status = state
        .replication
        .status(&name)
        .ok_or_else(|| ApiError::NotFound {
            code: "unknown_peer",
            detail: format!("no peer is named {name:?}; GET /v1/peers lists them"),
        })?;
    Ok(Json(json!(status)))
}

/// The bearer token in `Authorization`, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn header_has(headers: &HeaderMap, name: header::HeaderName, wanted: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| item.trim().eq_ignore_ascii_case(wanted))
}

async fn accept(State(state): State<AppState>, mut request: Request) -> Result<Response, ApiError> {
    let headers = request.headers();
    let presented = bearer(headers).ok_or(ApiError::Unauthenticated)?;
    let Some(peer) = state.replication.identify(presented) else {
        // An API token is known but may not replicate; anything else is unknown.
        if !state.config.auth.tokens.is_empty() && state.tokens.identify(headers).is_ok() {
            return Err(ApiError::Forbidden(
                "this token may use the API but not replicate; peers present a [[replication.tokens]] token".into(),
            ));
        }
        return Err(ApiError::Unauthenticated);
    };
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|key| key.as_bytes().to_vec());
    let is_websocket = request.method() == Method::GET
        && header_has(headers, header::UPGRADE, "websocket")
        && header_has(headers, header::CONNECTION, "upgrade")
        && headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_some_and(|version| version == "13");
    let (true, Some(key)) = (is_websocket, key) else {
        return Err(ApiError::bad_request(
            "websocket_required",
            "this endpoint speaks the replication protocol over a websocket (version 13); see docs/replication.md",
        ));
    };
    let slot = state
        .replication
        .admit(&peer)
        .map_err(|refusal| match refusal {
            replication::Refusal::Full => ApiError::Overloaded,
            replication::Refusal::PeerFull => ApiError::TooManyLinks {
                peer: peer.clone(),
                limit: replication::MAX_LINKS_PER_PEER,
            },
        })?;
    let upgrade = hyper::upgrade::on(&mut request);
    let replication = state.replication.clone();
    let shutdown = state.shutdown.child_token();
    let span = tracing::info_span!("ws", %peer);
    state.tasks.spawn(
        async move {
            match upgrade.await {
                Ok(upgraded) => {
                    replication
                        .serve_upgraded(peer, TokioIo::new(upgraded), slot, shutdown)
                        .await;
                }
                Err(error) => tracing::warn!(error = %error, "a peer's websocket upgrade failed"),
            }
        }
        .instrument(span),
    );
    let accept = HeaderValue::from_str(&replication::accept_key(&key)).map_err(|error| {
        ApiError::Internal {
            what: "the websocket accept key is not a header value",
            source: Box::new(error),
        }
    })?;
    Ok((
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::UPGRADE, HeaderValue::from_static("websocket")),
            (header::CONNECTION, HeaderValue::from_static("upgrade")),
            (header::SEC_WEBSOCKET_ACCEPT, accept),
        ],
    )
        .into_response())
}

/// The peers' lines for `/metrics`, in Prometheus text format.
pub(crate) fn render_metrics(state: &AppState, out: &mut String) {
    let statuses = state.replication.statuses();
    type Read = fn(&replication::PeerStatus) -> u64;
    let families: [(&str, &str, &str, Read); 7] = [
        (
            "lockstep_replication_connected",
            "gauge",
            "Links up with the peer now.",
            |s| s.links as u64,
        ),
        (
            "lockstep_replication_rows_received_total",
            "counter",
            "Feed rows received from the peer.",
            |s| s.rows_received,
        ),
        (
            "lockstep_replication_entities_synced_total",
            "counter",
            "Entities brought up to date from the peer.",
            |s| s.entities_synced,
        ),
        (
            "lockstep_replication_sync_fallbacks_total",
            "counter",
            "Entity syncs with the peer that stalled and were restarted or fetched whole.",
            |s| s.sync_fallbacks,
        ),
        (
            "lockstep_replication_errors_total",
            "counter",
            "Links with the peer that ended with an error (or could not be set up).",
            |s| s.errors,
        ),
        (
            "lockstep_replication_behind_in",
            "gauge",
            "Feed rows of the peer not yet consumed here, as far as known.",
            |s| s.behind_in.unwrap_or(0),
        ),
        (
            "lockstep_replication_behind_out",
            "gauge",
            "Feed rows of this site the peer has not consumed yet, as far as known.",
            |s| s.behind_out.unwrap_or(0),
        ),
    ];
    for (name, kind, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for status in &statuses {
            // Peer names are [A-Za-z0-9_.@-], so they need no escaping.
            let _ = writeln!(out, "{name}{{peer=\"{}\"}} {}", status.name, value(status));
        }
    }
}
