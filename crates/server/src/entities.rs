//! `/v1/entities`: create, replace, patch, read (now or at a version), delete and list entities,
//! and read an entity's history and conflicts.
//!
//! An entity is answered as `{"kind", "id", "version", "data"}` with `ETag: "<version>"`; writes
//! accept `If-Match` with a version (quoted or bare) or `*`. Every write is done by the store with
//! the caller's origin, and is answered only once the store has made it durable. This module
//! only translates between HTTP and `store::Store`; merging and persistence are the store's.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use store::{
    Edit, Entity, EntityId, EntityKey, FieldConflict, HistoryEntry, IfMatch, Kind, Version,
    WriteOptions, WriteRequest,
};

use crate::api_error::ApiError;
use crate::auth::Caller;
use crate::extract::{ApiQuery, EntityPath, JsonBody, KindPath, NoQuery};
use crate::state::AppState;

/// The page size when `limit` is not given.
const DEFAULT_PAGE: usize = 100;
/// The largest page a client may ask for.
const MAX_PAGE: usize = 1000;

/// The entity routes.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/entities/{kind}", get(list))
        .route(
            "/v1/entities/{kind}/{id}",
            get(read).put(replace).patch(patch).delete(delete),
        )
        .route("/v1/entities/{kind}/{id}/history", get(history))
        .route("/v1/entities/{kind}/{id}/conflicts", get(conflicts))
}

/// The request's `If-Match`: `*` or one version, quoted or bare.
fn precondition(headers: &HeaderMap) -> Result<Option<IfMatch>, ApiError> {
    let mut values = headers.get_all(header::IF_MATCH).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::bad_request(
            "invalid_version",
            "send one If-Match header with one version",
        ));
    }
    let value = value.to_str().map_err(|_| {
        ApiError::bad_request("invalid_version", "If-Match is not a readable version")
    })?;
    if value.trim() == "*" {
        return Ok(Some(IfMatch::Exists));
    }
    Ok(Some(IfMatch::At(Version::parse(value)?)))
}

/// Runs a write under the request's precondition, with the caller's origin, through the store's
/// writer queue (so that concurrent requests share applications to sled and flushes). The store
/// judges the precondition under the entity's lock, `*` included.
async fn write_under(
    state: &AppState,
    key: &EntityKey,
    if_match: Option<IfMatch>,
    caller: Caller,
    edit: Edit,
) -> Result<store::Written, ApiError> {
    let mut options = WriteOptions::new(caller.origin);
    options.if_match = if_match;
    let request = WriteRequest {
        key: key.clone(),
        edit,
        options,
    };
    Ok(state.store.submit(request).await?)
}

/// An entity answered with its version as the `ETag`.
fn entity_response(status: StatusCode, entity: &Entity) -> Response {
    let mut response = (status, Json(entity)).into_response();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", entity.version)) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    response
}

/// The answer to a PUT or PATCH.
fn written_response(key: EntityKey, written: store::Written) -> Result<Response, ApiError> {
    if !written.exists && written.seq.is_none() {
        // The entity did not exist (never, or not since it was deleted) and the write changed
        // nothing: a patch of `{}` or of only nulls.
        return Err(store::Error::UnwritableValue(
            "the entity does not exist and the write gives it no fields".into(),
        )
        .into());
    }
    let status = if written.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let entity = written.entity.unwrap_or(Entity {
        kind: key.kind,
        id: key.id,
        version: written.version,
        data: Map::new(),
    });
    Ok(entity_response(status, &entity))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadQuery {
    at: Option<String>,
}

async fn read(
    State(state): State<AppState>,
    EntityPath(key): EntityPath,
    ApiQuery(query): ApiQuery<ReadQuery>,
) -> Result<Response, ApiError> {
    let at = query.at.as_deref().map(Version::parse).transpose()?;
    let lookup_key = key.clone();
    let entity = state
        .blocking(move |store| match &at {
            Some(version) => store.get_at(&lookup_key, version),
            None => store.get(&lookup_key),
        })
        .await?;
    match entity {
        Some(entity) => Ok(entity_response(StatusCode::OK, &entity)),
        None => Err(ApiError::not_found(match query.at {
            Some(at) => format!("{key} had no fields at version {at}"),
            None => format!("{key} does not exist"),
        })),
    }
}

/// How a PUT or PATCH body is applied.
#[derive(Clone, Copy)]
enum BodyWrite {
    /// PUT: the body is all of the entity's fields.
    Replace,
    /// PATCH: the body is an RFC 7386 merge patch.
    MergePatch,
}

async fn replace(
    State(state): State<AppState>,
    EntityPath(key): EntityPath,
    _: NoQuery,
    caller: Caller,
    headers: HeaderMap,
    JsonBody(fields): JsonBody,
) -> Result<Response, ApiError> {
    write_body(state, key, caller, &headers, fields, BodyWrite::Replace).await
}

async fn patch(
    State(state): State<AppState>,
    EntityPath(key): EntityPath,
    _: NoQuery,
    caller: Caller,
    headers: HeaderMap,
    JsonBody(merge_patch): JsonBody,
) -> Result<Response, ApiError> {
    write_body(
        state,
        key,
        caller,
        &headers,
        merge_patch,
        BodyWrite::MergePatch,
    )
    .await
}

async fn write_body(
    state: AppState,
    key: EntityKey,
    caller: Caller,
    headers: &HeaderMap,
    body: Value,
    how: BodyWrite,
) -> Result<Response, ApiError> {
    let precondition = precondition(headers)?;
    let edit = match how {
        BodyWrite::Replace => Edit::Replace(body),
        BodyWrite::MergePatch => Edit::MergePatch(body),
    };
    let written = write_under(&state, &key, precondition, caller, edit).await?;
    written_response(key, written)
}

async fn delete(
    State(state): State<AppState>,
    EntityPath(key): EntityPath,
    _: NoQuery,
    caller: Caller,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let precondition = precondition(&headers)?;
    let written = write_under(&state, &key, precondition, caller, Edit::Delete).await?;
    if written.found() {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("{key} does not exist")))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<usize>,
    after: Option<String>,
}

async fn list(
    State(state): State<AppState>,
    KindPath(kind): KindPath,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<store::Page>, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_limit",
            format!("limit must be between 1 and {MAX_PAGE}, got {limit}"),
        ));
    }
    let after = query.after.map(EntityId::new).transpose()?;
    let page = state
        .blocking(move |store| store.list(&kind, after.as_ref(), limit))
        .await?;
    Ok(Json(page))
}

#[derive(Serialize)]
struct HistoryBody {
    kind: Kind,
    id: EntityId,
    changes: Vec<HistoryEntry>,
}

async fn history(
    State(state): State<AppState>,
    EntityPath(key): EntityPath,
    _: NoQuery,
) -> Result<Json<HistoryBody>, ApiError> {
    let lookup_key = key.clone();
    let changes = state
        .blocking(move |store| store.history(&lookup_key))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("{key} has never existed")))?;
    Ok(Json(HistoryBody {
        kind: key.kind,
        id: key.id,
        changes,
    }))
}

#[derive(Serialize)]
struct ConflictsBody {
    kind: Kind,
    id: EntityId,
    conflicts: Vec<FieldConflict>,
}

async fn conflicts(
    State(state): State<AppState>,
    EntityPath(key): EntityPath,
    _: NoQuery,
) -> Result<Json<ConflictsBody>, ApiError> {
    let lookup_key = key.clone();
    let conflicts = state
        .blocking(move |store| store.conflicts(&lookup_key))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("{key} does not exist")))?;
    Ok(Json(ConflictsBody {
        kind: key.kind,
        id: key.id,
        conflicts,
    }))
}
