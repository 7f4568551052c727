//! The connector endpoints: inbound webhooks, and the admin API over `connectors::Connectors`.
//!
//! Webhooks are authenticated by their Standard Webhooks signature, not by a bearer token, so
//! [`webhook_router`] is mounted outside the `/v1` authentication layer (but inside its limits).
//! What a webhook does, and how deliveries work, is the `connectors` crate's business.

use std::fmt::Write;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use connectors::{Replay, WebhookRequest};
use serde_json::{json, Value};
use store::{EntityKey, Seq};

use crate::api_error::ApiError;
use crate::extract::{ApiPath, JsonBody, NoQuery, RawJsonBody};
use crate::state::AppState;

/// `POST /v1/connectors/{name}/webhook`.
pub(crate) fn webhook_router() -> Router<AppState> {
    Router::new().route("/v1/connectors/{name}/webhook", post(receive_webhook))
}

/// The admin endpoints, behind the `/v1` bearer-token layer.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/connectors", get(list))
        .route("/v1/connectors/{name}", get(status))
        .route("/v1/connectors/{name}/pause", post(pause))
        .route("/v1/connectors/{name}/resume", post(resume))
        .route("/v1/connectors/{name}/dead-letters", get(dead_letters))
        .route(
            "/v1/connectors/{name}/dead-letters/{kind}/{id}/retry",
            post(retry_dead_letter),
        )
        .route("/v1/connectors/{name}/replay", post(replay))
        .route("/v1/connectors/{name}/preview/{kind}/{id}", get(preview))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

async fn receive_webhook(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    body: Result<RawJsonBody, ApiError>,
) -> Result<Response, ApiError> {
    // A body refused for its size or media type is a refused webhook of this connector too.
    let body = body
        .inspect_err(|_| state.connectors.count_rejected_webhook(&name))?
        .0;
    let request = WebhookRequest {
        id: header(&headers, "webhook-id"),
        timestamp: header(&headers, "webhook-timestamp"),
        signature: header(&headers, "webhook-signature"),
        body: &body,
    };
    let outcome = state.connectors.receive_webhook(&name, request).await?;
    let mut response = (StatusCode::OK, Json(outcome.response)).into_response();
    if outcome.replayed {
        response.headers_mut().insert(
            "lockstep-idempotent-replay",
            HeaderValue::from_static("true"),
        );
    }
    Ok(response)
}

async fn list(State(state): State<AppState>, _: NoQuery) -> Result<Json<Value>, ApiError> {
    let statuses = state.connectors.statuses().await?;
    Ok(Json(json!({ "connectors": statuses })))
}

async fn status(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    _: NoQuery,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(state.connectors.status(&name).await?)))
}

async fn pause(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    _: NoQuery,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(state.connectors.pause(&name).await?)))
}

async fn resume(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    _: NoQuery,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(state.connectors.resume(&name).await?)))
}

async fn dead_letters(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    _: NoQuery,
) -> Result<Json<Value>, ApiError> {
    let dead = state.connectors.dead_letters(&name).await?;
    Ok(Json(json!({ "dead_letters": dead })))
}

async fn retry_dead_letter(
    State(state): State<AppState>,
    ApiPath((name, kind, id)): ApiPath<(String, String, String)>,
    _: NoQuery,
) -> Result<Json<Value>, ApiError> {
    let entity = EntityKey::new(kind, id)?;
    state
        .connectors
        .retry_dead_letter(&name, entity.clone())
        .await?;
    Ok(Json(
        json!({ "retried": { "kind": entity.kind, "id": entity.id } }),
    ))
}

/// Reads `{"since_seq": N}`, `{"entity": {"kind", "id"}}` or `{"all": true}`.
fn replay_of(body: &Value) -> Result<Replay, ApiError> {
    let usage =
        "send {\"since_seq\": N}, {\"entity\": {\"kind\": K, \"id\": I}} or {\"all\": true}";
    let object = body
        .as_object()
        .filter(|object| object.len() == 1)
        .ok_or_else(|| ApiError::bad_request("invalid_replay", usage))?;
    if let Some(since) = object.get("since_seq") {
        let since = since.as_u64().ok_or_else(|| {
            ApiError::bad_request("invalid_replay", "since_seq must be a non-negative integer")
        })?;
        return Ok(Replay::SinceSeq(Seq(since)));
    }
    if let Some(entity) = object.get("entity") {
        let kind = entity.get("kind").and_then(Value::as_str);
        let id = entity.get("id").and_then(Value::as_str);
        let (Some(kind), Some(id)) = (kind, id) else {
            return Err(ApiError::bad_request(
                "invalid_replay",
                "entity needs string kind and id",
            ));
        };
        return Ok(Replay::Entity(EntityKey::new(kind, id)?));
    }
    if object.get("all") == Some(&Value::Bool(true)) {
        return Ok(Replay::All);
    }
    Err(ApiError::bad_request("invalid_replay", usage))
}

async fn replay(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    _: NoQuery,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let replay = replay_of(&body)?;
    let entities = state.connectors.replay(&name, replay).await?;
    Ok(Json(json!({ "entities": entities })))
}

async fn preview(
    State(state): State<AppState>,
    ApiPath((name, kind, id)): ApiPath<(String, String, String)>,
    _: NoQuery,
) -> Result<Json<Value>, ApiError> {
    let entity = EntityKey::new(kind, id)?;
    Ok(Json(json!(state.connectors.preview(&name, entity).await?)))
}

/// The connectors' lines for `/metrics`, in Prometheus text format.
pub(crate) fn render_metrics(state: &AppState, out: &mut String) {
    type Read = fn(&connectors::Counters) -> u64;
    let families: [(&str, &str, Read); 3] = [
        (
            "lockstep_connector_deliveries_total",
            "Deltas acknowledged by the external system.",
            |c| c.deliveries.get(),
        ),
        (
            "lockstep_connector_delivery_failures_total",
            "Delivery attempts that failed (retried or dead-lettered).",
            |c| c.delivery_failures.get(),
        ),
        (
            "lockstep_connector_dead_letters_total",
            "Deltas dead-lettered.",
            |c| c.dead_lettered.get(),
        ),
    ];
    for (name, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for handle in state.connectors.handles() {
            let _ = writeln!(
                out,
                "{name}{{connector=\"{}\"}} {}",
                handle.connector.name,
                value(&handle.counters)
            );
        }
    }
    let name = "lockstep_connector_webhooks_total";
    let _ = writeln!(
        out,
        "# HELP {name} Inbound webhooks by result.\n# TYPE {name} counter"
    );
    for handle in state.connectors.handles() {
        let counters = &handle.counters;
        for (result, count) in [
            ("applied", counters.webhooks_applied.get()),
            ("stale", counters.webhooks_stale.get()),
            ("duplicate", counters.webhooks_duplicate.get()),
            ("rejected", counters.webhooks_rejected.get()),
        ] {
            let _ = writeln!(
                out,
                "{name}{{connector=\"{}\",result=\"{result}\"}} {count}",
                handle.connector.name
            );
        }
    }
    let name = "lockstep_connector_webhook_ids_indexed";
    let _ = writeln!(
        out,
        "# HELP {name} Remembered webhook ids indexed in memory (bounded by dedupe_index_ids).\n# TYPE {name} gauge"
    );
    for handle in state.connectors.handles() {
        let _ = writeln!(
            out,
            "{name}{{connector=\"{}\"}} {}",
            handle.connector.name,
            handle.indexed_webhook_ids()
        );
    }
}
