//! Our extractors: axum's `Json`, `Query` and `Path`, wrapped so that a rejection comes back as an
//! `ApiError` in our `{"code", "detail"}` shape rather than axum's plain text.
//!
//! They also validate what they extract: a path's kind and id are `store::Kind`/`store::EntityId`
//! before a handler sees them, and a body is only read once its media type and size are acceptable.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::{header, request::Parts, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;
use store::{EntityKey, Kind};

use crate::api_error::ApiError;
use crate::state::AppState;

/// A JSON request body, of type `application/json` or any `application/*+json`
/// (`application/merge-patch+json` among them).
pub(crate) struct JsonBody(pub(crate) Value);

impl FromRequest<AppState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let RawJsonBody(bytes) = RawJsonBody::from_request(request, state).await?;
        if bytes.is_empty() {
            return Err(ApiError::bad_request(
                "invalid_json",
                "the request body is empty; send a JSON object",
            ));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|error| {
                ApiError::bad_request("invalid_json", format!("invalid JSON: {error}"))
            })
    }
}

/// A request body of a JSON media type, as raw bytes, for a handler that needs them exactly as
/// sent (a webhook's signature covers its bytes, not its JSON). Refused with our JSON errors:
/// 415 for another media type, 413 beyond the body limit, whether the length is declared or the
/// body is streamed.
pub(crate) struct RawJsonBody(pub(crate) Bytes);

impl FromRequest<AppState> for RawJsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        check_json_media_type(request.headers())?;
        let limit = state.config.limits.max_body_bytes;
        // Refuse a declared oversize body before reading any of it.
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        if declared.is_some_and(|length| length > limit as u64) {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        Bytes::from_request(request, state)
            .await
            .map(RawJsonBody)
            .map_err(|rejection| match rejection.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge { limit },
                _ => ApiError::bad_request("unreadable_body", rejection.body_text()),
            })
    }
}

/// A media type or range (`application/json; charset=utf-8`, `text/event-stream;q=0`): its
/// essence, trimmed, and its parameters as trimmed `(name, value)` pairs, a value's quotes
/// taken off.
pub(crate) fn media_type(value: &str) -> (&str, impl Iterator<Item = (&str, &str)>) {
    let mut parts = value.split(';');
    let essence = parts.next().unwrap_or_default().trim();
    let parameters = parts.map(|parameter| {
        let (name, value) = parameter.split_once('=').unwrap_or((parameter, ""));
        (name.trim(), value.trim().trim_matches('"'))
    });
    (essence, parameters)
}

/// A JSON media type, in UTF-8 (JSON's only encoding: RFC 8259), and a body that is not
/// compressed or otherwise encoded, since nothing here decodes one.
fn check_json_media_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let expected =
        "send Content-Type: application/json (or application/merge-patch+json for PATCH)";
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(ApiError::UnsupportedMediaType(format!(
            "the request has no Content-Type; {expected}"
        )));
    };
    let (essence, parameters) = media_type(value.to_str().unwrap_or_default());
    let essence = essence.to_ascii_lowercase();
    let is_json = essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"));
    if !is_json {
        return Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type {essence:?} is not JSON; {expected}"
        )));
    }
    for (name, charset) in parameters {
        if !name.eq_ignore_ascii_case("charset") {
            continue;
        }
        if !charset.eq_ignore_ascii_case("utf-8") && !charset.eq_ignore_ascii_case("utf8") {
            return Err(ApiError::UnsupportedMediaType(format!(
                "charset {charset:?} is not UTF-8; JSON bodies are UTF-8 (send charset=utf-8, or no charset)"
            )));
        }
    }
    for encoding in headers.get_all(header::CONTENT_ENCODING) {
        let encoding = encoding.to_str().unwrap_or("?").trim();
        if !encoding.eq_ignore_ascii_case("identity") {
            return Err(ApiError::UnsupportedMediaType(format!(
                "Content-Encoding {encoding:?} is not supported; send the body uncompressed"
            )));
        }
    }
    Ok(())
}

/// Query parameters, deserialized into `T`.
pub(crate) struct ApiQuery<T>(pub(crate) T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| ApiQuery(value))
            .map_err(|rejection| {
                // axum says "Failed to deserialize query string: " before what serde found.
                let text = rejection.body_text();
                let found = text
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&text);
                ApiError::bad_request("invalid_query", format!("bad query parameter: {found}"))
            })
    }
}

/// A route's path parameters, with a rejection (a segment that is not UTF-8 once decoded, say)
/// as a JSON `invalid_path` error.
pub(crate) struct ApiPath<T>(pub(crate) T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| ApiPath(value))
            .map_err(|rejection| ApiError::bad_request("invalid_path", rejection.body_text()))
    }
}

/// The query of a route that takes none: any parameter is an `invalid_query` error rather than
/// silently ignored (a misspelt or misplaced `?at=` on a write, say).
pub(crate) struct NoQuery;

impl<S: Send + Sync> FromRequestParts<S> for NoQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        match parts.uri.query().filter(|query| !query.is_empty()) {
            None => Ok(Self),
            Some(query) => {
                let name = query.split(['=', '&']).next().unwrap_or_default();
                let name: String = name.chars().take(40).collect();
                Err(ApiError::bad_request(
                    "invalid_query",
                    format!("this route takes no query parameters; `{name}` was given"),
                ))
            }
        }
    }
}

/// The `{kind}/{id}` of an entity route, validated.
pub(crate) struct EntityPath(pub(crate) EntityKey);

impl<S: Send + Sync> FromRequestParts<S> for EntityPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let ApiPath((kind, id)) =
            ApiPath::<(String, String)>::from_request_parts(parts, state).await?;
        Ok(Self(EntityKey::new(kind, id)?))
    }
}

/// The `{kind}` of a collection route, validated.
pub(crate) struct KindPath(pub(crate) Kind);

impl<S: Send + Sync> FromRequestParts<S> for KindPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let ApiPath(kind) = ApiPath::<String>::from_request_parts(parts, state).await?;
        Ok(Self(Kind::new(kind)?))
    }
}
