//! Bearer-token authentication for `/v1`, and the `Caller` it leaves for handlers.
//!
//! With no token configured every request is the anonymous writer `local:anonymous`. With tokens,
//! a request without `Authorization: Bearer <token>` or with an unknown token gets 401, and a read
//! token attempting a write gets 403. Tokens are compared in constant time and never logged; only
//! a token's name appears in logs and, as `local:<name>`, in the origin of the changes it writes.
//! The origin always comes from the token: no request header can choose it.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::{header, request::Parts, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::Response;
use store::Origin;
use subtle::ConstantTimeEq;

use crate::api_error::ApiError;
use crate::config::{AuthSettings, Role, Secret};
use crate::state::AppState;

/// The configured tokens, ready to check requests against.
pub(crate) struct Tokens {
    entries: Vec<Entry>,
}

struct Entry {
    secret: Secret,
    caller: Caller,
}

/// Who is making a request: the origin their writes get, and what they may do.
#[derive(Clone, Debug)]
pub(crate) struct Caller {
    pub(crate) origin: Origin,
    role: Role,
}

impl Tokens {
    /// # Errors
    /// [`store::Error::Invalid`] when a token's name is not a valid origin name;
    /// `Config::load` has already refused such names, so this only fires for hand-built settings.
    pub(crate) fn new(settings: &AuthSettings) -> store::Result<Self> {
        let entries = settings
            .tokens
            .iter()
            .map(|token| {
                Ok(Entry {
                    secret: token.token.clone(),
                    caller: Caller {
                        origin: Origin::local(&token.name)?,
                        role: token.role,
                    },
                })
            })
            .collect::<store::Result<_>>()?;
        Ok(Self { entries })
    }

    /// The caller a request's headers identify.
    pub(crate) fn identify(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        if self.entries.is_empty() {
            return Ok(Caller {
                origin: Origin::local("anonymous")?,
                role: Role::Write,
            });
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| {
                let (scheme, token) = value.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or(ApiError::Unauthenticated)?;
        // Compare against every token, so the time taken does not say which one matched.
        let mut found = None;
        for entry in &self.entries {
            let matches: bool = entry
                .secret
                .expose()
                .as_bytes()
                .ct_eq(presented.as_bytes())
                .into();
            if matches {
                found = Some(entry.caller.clone());
            }
        }
        found.ok_or(ApiError::Unauthenticated)
    }
}

/// Middleware: identifies the caller, refuses what their role may not do, and leaves a `Caller`
/// in the request's extensions.
pub(crate) async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let caller = state.tokens.identify(request.headers())?;
    // Into the request's span (see `telemetry`): its log lines name who made it.
    tracing::Span::current().record("caller", tracing::field::display(&caller.origin));
    let is_write = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if is_write && !caller.role.is_writer() {
        return Err(ApiError::Forbidden(format!(
            "{} may only read",
            caller.origin
        )));
    }
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::Internal {
                what: "a route that writes is not behind the authenticate middleware",
                source: "no Caller in the request".into(),
            })
    }
}
