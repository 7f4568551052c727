//! `FakeApi`: a recording stand-in for an external system's HTTP API, on 127.0.0.1:0.
//!
//! It records every request (method, path, headers, body) and answers with whatever the test
//! sets: a status, a stall longer than the client's timeout, or 410 Gone.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// One request the fake API received.
#[derive(Clone, Debug)]
pub struct Received {
    /// The HTTP method.
    pub method: String,
    /// The path and query.
    pub path: String,
    /// Headers, lower-cased names.
    pub headers: BTreeMap<String, String>,
    /// The raw body.
    pub body: Vec<u8>,
    /// The status the fake answered with.
    pub status: u16,
    /// Fields of this delta whose value the system already held when it arrived (an echo, or a
    /// redundant send); only tracked when the fake keeps state (see [`FakeApi::keep_state`]).
    pub redundant_fields: Vec<String>,
    /// When the request arrived.
    pub arrived: Instant,
    /// When the fake answered it; `None` while it is being answered, or when the client hung up
    /// during a stall.
    pub answered: Option<Instant>,
}

impl Received {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// One header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// How the fake answers the next requests.
#[derive(Clone, Debug, PartialEq)]
pub enum Behavior {
    /// Answer with this status (and an empty JSON object).
    Status(u16),
    /// Answer with this status and a `Retry-After` header in seconds.
    StatusRetryAfter(u16, u64),
    /// Wait this long before answering 200 (longer than the client's timeout simulates a hang).
    Stall(Duration),
    /// Answer 302 Found, redirecting to this path of the fake.
    Redirect(String),
}

/// The external system's own records: id -> field -> value.
pub type SystemState = BTreeMap<String, BTreeMap<String, Value>>;

#[derive(Default)]
struct Shared {
    received: Vec<Received>,
    behavior: Option<Behavior>,
    /// When set, the field that carries the record id; acknowledged deltas are applied to `state`.
    id_field: Option<String>,
    state: SystemState,
}

/// The running fake; stops when dropped.
///
/// A stalled request is recorded with status 0.
pub struct FakeApi {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    shared: Arc<Mutex<Shared>>,
    stop: CancellationToken,
}

impl FakeApi {
    /// Starts the fake on an ephemeral port, answering 200 until told otherwise.
    ///
    /// # Errors
    /// When the port cannot be bound.
    pub async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the fake API")?;
        let base = format!("http://{}", listener.local_addr()?);
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = CancellationToken::new();
        let app = axum::Router::new()
            .fallback(record)
            .with_state(shared.clone());
        let token = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await;
        });
        Ok(Self { base, shared, stop })
    }

    /// Sets how the next requests are answered.
    pub fn set(&self, behavior: Behavior) {
        self.shared.lock().expect("fake API lock").behavior = Some(behavior);
    }

    /// Makes the fake behave like a system of record: every delta it acknowledges is applied to
    /// its state (`null` removes a field), keyed by the value of `id_field`.
    pub fn keep_state(&self, id_field: &str) {
        self.shared.lock().expect("fake API lock").id_field = Some(id_field.to_string());
    }

    /// Changes a field in the system's own state, as a user of that system would; the caller
    /// then sends Lockstep the webhook for it.
    pub fn change_own(&self, id: &str, field: &str, value: Value) {
        let mut shared = self.shared.lock().expect("fake API lock");
        let record = shared.state.entry(id.to_string()).or_default();
        if value.is_null() {
            record.remove(field);
        } else {
            record.insert(field.to_string(), value);
        }
    }

    /// The system's records.
    pub fn state(&self) -> SystemState {
        self.shared.lock().expect("fake API lock").state.clone()
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.shared.lock().expect("fake API lock").received.clone()
    }

    /// The requests answered with a 2xx.
    pub fn acknowledged(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|request| (200..300).contains(&request.status))
            .collect()
    }

    /// Polls until `condition` holds for the received requests, or fails after `timeout`.
    ///
    /// # Errors
    /// When the deadline passes first.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        condition: impl Fn(&[Received]) -> bool,
    ) -> Result<Vec<Received>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let received = self.received();
            if condition(&received) {
                return Ok(received);
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("timed out waiting for {what}; received {received:#?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn record(
    State(shared): State<Arc<Mutex<Shared>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let behavior = shared
        .lock()
        .expect("fake API lock")
        .behavior
        .clone()
        .unwrap_or(Behavior::Status(200));
    let (status, retry_after, stall) = match &behavior {
        Behavior::Status(status) => (*status, None, None),
        Behavior::StatusRetryAfter(status, seconds) => (*status, Some(*seconds), None),
        Behavior::Stall(duration) => (200, None, Some(*duration)),
        Behavior::Redirect(_) => (302, None, None),
    };
    // Recorded before answering: a stalled request is recorded with status 0, since the client
    // gives up before the answer comes.
    let recorded_status = if stall.is_some() { 0 } else { status };
    let index = {
        let mut guard = shared.lock().expect("fake API lock");
        let redundant_fields = apply_delta(&mut guard, &body, recorded_status);
        guard.received.push(Received {
            method: method.to_string(),
            path: uri.to_string(),
            headers: headers
                .iter()
                .map(|(name, value)| {
                    (
                        name.as_str().to_string(),
                        value.to_str().unwrap_or_default().to_string(),
                    )
                })
                .collect(),
            body: body.to_vec(),
            status: recorded_status,
            redundant_fields,
            arrived: Instant::now(),
            answered: None,
        });
        guard.received.len() - 1
    };
    if let Some(duration) = stall {
        tokio::time::sleep(duration).await;
    }
    shared.lock().expect("fake API lock").received[index].answered = Some(Instant::now());
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, "{}").into_response();
    if let Behavior::Redirect(location) = &behavior {
        response.headers_mut().insert(
            "location",
            location.parse().expect("a path is a valid header value"),
        );
    }
    if let Some(seconds) = retry_after {
        response.headers_mut().insert(
            "retry-after",
            seconds
                .to_string()
                .parse()
                .expect("digits are a valid header value"),
        );
    }
    response
}

/// Applies an acknowledged delta to the system's state; returns the fields it already held.
fn apply_delta(shared: &mut Shared, body: &[u8], status: u16) -> Vec<String> {
    let Some(id_field) = shared.id_field.clone() else {
        return Vec::new();
    };
    if !(200..300).contains(&status) {
        return Vec::new();
    }
    let Ok(Value::Object(delta)) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    let id = match delta.get(&id_field) {
        Some(Value::String(id)) => id.clone(),
        Some(other) => other.to_string(),
        None => return Vec::new(),
    };
    let record = shared.state.entry(id).or_default();
    let mut redundant = Vec::new();
    for (field, value) in delta {
        if field == id_field {
            continue;
        }
        if record.get(&field) == Some(&value) || (value.is_null() && !record.contains_key(&field)) {
            redundant.push(field.clone());
        }
        if value.is_null() {
            record.remove(&field);
        } else {
            record.insert(field, value);
        }
    }
    redundant
}
