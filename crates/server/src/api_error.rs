//! `ApiError`: everything a request can fail with, and the one place that turns it into HTTP.
//!
//! The body is always `{"code": "...", "detail": "..."}`. `code` is stable and meant for programs;
//! `detail` is for people. Caller mistakes get a 4xx that says what to fix. A 5xx is logged here
//! with its cause chain and answered with a generic detail, so no internal state reaches a client.
//! Which store error means which status is decided here and nowhere else.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// A failed request.
#[derive(Debug)]
pub(crate) enum ApiError {
    /// The store refused or failed the operation.
    Store(store::Error),
    /// A connector refused or failed the operation (never `connectors::Error::Store`: `From`
    /// unwraps that into `Store`).
    Connector(connectors::Error),
    /// The request is malformed: a bad query, path, header or body.
    BadRequest { code: &'static str, detail: String },
    /// There is nothing at this path (an entity, or a route).
    NotFound { code: &'static str, detail: String },
    /// The route exists, but not for this method.
    MethodNotAllowed,
    /// No bearer token, or one that is not configured.
    Unauthenticated,
    /// The token is valid but its role may not do this.
    Forbidden(String),
    /// The body is larger than `limits.max_body_bytes`.
    PayloadTooLarge { limit: usize },
    /// The request target (path and query) is longer than `limit` bytes.
    UriTooLong { limit: usize },
    /// The request's headers are larger than `limit` bytes in all.
    HeadersTooLarge { limit: usize },
    /// The request's head is larger than the HTTP parser reads, or has too many headers (hyper
    /// answers it before any route; see `parse_errors`).
    HeadTooLarge,
    /// The body's `Content-Type` is not one this endpoint reads.
    UnsupportedMediaType(String),
    /// The request took longer than `limits.request_timeout`.
    Timeout(Duration),
    /// `limits.max_concurrent_requests` requests are already being handled.
    Overloaded,
    /// `limits.max_event_streams` change feed streams are already open.
    TooManyStreams { limit: usize },
    /// The replication peer already has its most links up here.
    TooManyLinks { peer: String, limit: usize },
    /// The server is shutting down.
    ShuttingDown,
    /// A bug or an environment failure outside the store (a panicked blocking task).
    Internal {
        what: &'static str,
        source: Box<dyn StdError + Send + Sync>,
    },
}

#[derive(Serialize)]
struct Body {
    code: String,
    detail: String,
}

impl ApiError {
    pub(crate) fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            detail: detail.into(),
        }
    }

    pub(crate) fn not_found(detail: impl Into<String>) -> Self {
        Self::NotFound {
            code: "not_found",
            detail: detail.into(),
        }
    }

    /// The JSON body of a client error, for an answer written outside axum (see
    /// `parse_errors`, which keeps hyper's status); `None` for a server fault, which only
    /// `into_response` answers.
    pub(crate) fn client_body(&self) -> Option<String> {
        let (_, code, detail) = self.parts();
        serde_json::to_string(&Body {
            code,
            detail: detail?,
        })
        .ok()
    }

    /// The status, the code and the detail a client sees; `None` as the detail for a server fault.
    fn parts(&self) -> (StatusCode, String, Option<String>) {
        let client = |status: StatusCode, code: &str, detail: String| {
            (status, code.to_string(), Some(detail))
        };
        match self {
            Self::Store(error) => match error {
                store::Error::Invalid { what, detail } => client(
                    StatusCode::BAD_REQUEST,
                    &format!("invalid_{what}"),
                    format!("invalid {what}: {detail}"),
                ),
                store::Error::UnwritableValue(detail) => client(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "unwritable_value",
                    detail.clone(),
                ),
                store::Error::VersionMismatch { .. } => client(
                    StatusCode::PRECONDITION_FAILED,
                    "version_mismatch",
                    error.to_string(),
                ),
                store::Error::UnknownVersion { .. } => {
                    client(StatusCode::NOT_FOUND, "unknown_version", error.to_string())
                }
                store::Error::Decode(_) => {
                    client(StatusCode::BAD_REQUEST, "undecodable", error.to_string())
                }
                store::Error::Closed => {
                    (StatusCode::SERVICE_UNAVAILABLE, "unavailable".into(), None)
                }
                store::Error::Failed => {
                    (StatusCode::SERVICE_UNAVAILABLE, "store_failed".into(), None)
                }
                store::Error::Storage(_)
                | store::Error::Panicked(_)
                | store::Error::Sync(_)
                | store::Error::Corrupt { .. }
                | store::Error::Automerge(_) => {
                    (StatusCode::INTERNAL_SERVER_ERROR, "internal".into(), None)
                }
            },
            Self::Connector(error) => {
                use connectors::{Error as C, MappingError as M, SignatureError as S};
                let detail = error.to_string();
                match error {
                    C::UnknownConnector(_) => {
                        client(StatusCode::NOT_FOUND, "unknown_connector", detail)
                    }
                    C::InboundDisabled(_) => {
                        client(StatusCode::NOT_FOUND, "inbound_disabled", detail)
                    }
                    C::OutboundDisabled(_) => {
                        client(StatusCode::CONFLICT, "outbound_disabled", detail)
                    }
                    C::Signature(S::StaleTimestamp { .. }) => {
                        client(StatusCode::UNAUTHORIZED, "stale_timestamp", detail)
                    }
                    C::Signature(_) => {
                        client(StatusCode::UNAUTHORIZED, "invalid_signature", detail)
                    }
                    C::InvalidJson(_) => client(StatusCode::BAD_REQUEST, "invalid_json", detail),
                    C::NotAnObject => {
                        client(StatusCode::UNPROCESSABLE_ENTITY, "not_an_object", detail)
                    }
                    C::Mapping(M::MissingId(_)) => {
                        client(StatusCode::UNPROCESSABLE_ENTITY, "missing_id", detail)
                    }
                    C::Mapping(_) => {
                        client(StatusCode::UNPROCESSABLE_ENTITY, "uncastable_value", detail)
                    }
                    C::IdReused { .. } => client(StatusCode::CONFLICT, "webhook_id_reused", detail),
                    C::NoDeadLetter(_) => client(StatusCode::NOT_FOUND, "no_dead_letter", detail),
                    C::WrongKind { .. } => client(StatusCode::BAD_REQUEST, "wrong_kind", detail),
                    // `From` turns a wrapped store error into `Self::Store`.
                    C::Store(_) | C::CorruptRecord { .. } | C::Task(_) | C::Panicked => {
                        (StatusCode::INTERNAL_SERVER_ERROR, "internal".into(), None)
                    }
                }
            }
            Self::BadRequest { code, detail } => {
                client(StatusCode::BAD_REQUEST, code, detail.clone())
            }
            Self::NotFound { code, detail } => client(StatusCode::NOT_FOUND, code, detail.clone()),
            Self::MethodNotAllowed => client(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this path does not accept this method; the Allow header lists those it does"
                    .into(),
            ),
            Self::Unauthenticated => client(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "send a configured token as `Authorization: Bearer <token>`".into(),
            ),
            Self::Forbidden(detail) => client(StatusCode::FORBIDDEN, "forbidden", detail.clone()),
            Self::PayloadTooLarge { limit } => client(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the request body is larger than {limit} bytes"),
            ),
            Self::UriTooLong { limit } => client(
                StatusCode::URI_TOO_LONG,
                "uri_too_long",
                format!("the path and query are longer than {limit} bytes"),
            ),
            Self::HeadersTooLarge { limit } => client(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                format!("the request's headers are larger than {limit} bytes in all"),
            ),
            Self::HeadTooLarge => client(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                format!(
                    "the request's head is larger than the HTTP parser reads (about 400 KiB) or \
                     has more than 100 headers; headers may take {} bytes in all",
                    crate::limits::MAX_HEADER_BYTES
                ),
            ),
            Self::UnsupportedMediaType(detail) => client(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                detail.clone(),
            ),
            Self::Timeout(after) => client(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request took longer than {}; a write may or may not have been applied",
                    humantime_serde::re::humantime::format_duration(*after)
                ),
            ),
            Self::Overloaded => client(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "too many requests are in progress; retry shortly".into(),
            ),
            Self::TooManyLinks { peer, limit } => client(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_links",
                format!(
                    "peer {peer} already has {limit} replication links open here; one is enough, \
                     and a link left behind by a reconnect ends at its idle timeout"
                ),
            ),
            Self::TooManyStreams { limit } => client(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_streams",
                format!(
                    "{limit} change feed streams are open, as many as limits.max_event_streams \
                     allows; retry later, or read the feed as JSON lines"
                ),
            ),
            Self::ShuttingDown => client(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the server is shutting down".into(),
            ),
            Self::Internal { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "internal".into(), None),
        }
    }
}

impl From<connectors::Error> for ApiError {
    fn from(error: connectors::Error) -> Self {
        match error {
            connectors::Error::Store(error) => Self::Store(error),
            other => Self::Connector(other),
        }
    }
}

impl From<store::Error> for ApiError {
    fn from(error: store::Error) -> Self {
        Self::Store(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, detail) = self.parts();
        let detail = match detail {
            Some(detail) => detail,
            None => {
                tracing::error!(status = status.as_u16(), error = %CauseChain(&self), "request failed");
                match &self {
                    Self::Store(store::Error::Failed) => {
                        "a flush failed (a full disk, say; see the server's log), so the store \
                         takes no more writes until the server is restarted; every write \
                         acknowledged before is kept, and reads go on for the data the failure \
                         did not touch"
                    }
                    _ if status == StatusCode::SERVICE_UNAVAILABLE => {
                        "the store is not taking writes: the server is shutting down"
                    }
                    _ => "an internal error occurred; it has been logged",
                }
                .to_string()
            }
        };
        let mut response = (status, Json(Body { code, detail })).into_response();
        let headers = response.headers_mut();
        match self {
            Self::Unauthenticated => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"lockstep\""),
                );
            }
            Self::Overloaded
            | Self::TooManyLinks { .. }
            | Self::ShuttingDown
            | Self::Store(store::Error::Closed) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Self::TooManyStreams { .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            _ => {}
        }
        response
    }
}

/// Formats an error with every source after it: `a: b: c`.
struct CauseChain<'a>(&'a ApiError);

impl fmt::Display for CauseChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let first: &(dyn StdError + 'static) = match self.0 {
            ApiError::Store(error) => error,
            ApiError::Connector(error) => error,
            ApiError::Internal { what, source } => {
                write!(f, "{what}")?;
                f.write_str(": ")?;
                source.as_ref()
            }
            other => return write!(f, "{other:?}"),
        };
        write!(f, "{first}")?;
        let mut source = first.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// Middleware: a server fault (500) while the store has failed is answered as that failure
/// (503 `store_failed`). After a failed flush, sled also refuses to read a page that was written
/// after the last successful flush (it would have to make that write durable first), so such a
/// read fails with the storage error; the cause is logged where it happened.
pub(crate) async fn failed_store(
    axum::extract::State(state): axum::extract::State<crate::state::AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let response = next.run(request).await;
    if response.status() == StatusCode::INTERNAL_SERVER_ERROR
        && matches!(state.store.writable(), Err(store::Error::Failed))
    {
        return ApiError::Store(store::Error::Failed).into_response();
    }
    response
}
