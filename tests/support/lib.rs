//! Support for the end-to-end tests: `TestServer` runs the real server (`server::run_with_store`)
//! on `127.0.0.1:0` over a real sled directory in a `TempDir` it owns, and the helpers here give
//! every wait a deadline.
//!
//! No helper sleeps to wait for a condition: `within` bounds a single await, and `poll_until`
//! retries a check until it holds or a deadline passes.
//!
//! # Layout
//! `TestServer` (start, requests, stop), the error-shape assertion `expect_error`, the SSE reader
//! `EventReader`, and the timing helpers `within` and `poll_until`. `sites` peers servers for
//! replication tests and runs release-binary processes; `webhooks` signs webhooks as a sender does.
//!
//! # Example
//! ```
//! use lockstep_tests::{within, TestServer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> anyhow::Result<()> {
//! let server = TestServer::start().await?;
//! let response = within("GET /healthz", server.client().get(server.url("/healthz")).send()).await??;
//! assert_eq!(response.status(), 200);
//! server.stop().await?;
//! # Ok(())
//! # }
//! ```

pub mod bench;
pub mod fake_api;
pub mod sites;
pub mod webhooks;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use futures::{Stream, StreamExt};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde_json::Value;
use server::{Config, ConfigSources};
use store::Store;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long any single step of a test may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(15);

/// How long `poll_until` pauses between two checks.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Awaits `future`, failing with `what` if it takes longer than [`TIMEOUT`].
///
/// # Errors
/// When the deadline passes first.
pub async fn within<F: Future>(what: &str, future: F) -> Result<F::Output> {
    within_for(TIMEOUT, what, future).await
}

/// Awaits `future`, failing with `what` if it takes longer than `limit` (a whole test's bound).
///
/// # Errors
/// When the deadline passes first.
pub async fn within_for<F: Future>(limit: Duration, what: &str, future: F) -> Result<F::Output> {
    tokio::time::timeout(limit, future)
        .await
        .with_context(|| format!("timed out after {limit:?}: {what}"))
}

/// Runs `check` until it returns `Some`, pausing briefly between attempts, for at most [`TIMEOUT`].
///
/// # Errors
/// When `check` fails, or the deadline passes without it returning `Some`.
pub async fn poll_until<T, F, Fut>(what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(value) = within(what, check()).await?? {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("gave up after {TIMEOUT:?}: {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The real server on `127.0.0.1:0`, over a sled directory in a `TempDir` it owns.
pub struct TestServer {
    address: SocketAddr,
    client: reqwest::Client,
    store: Option<Store>,
    shutdown: CancellationToken,
    running: Option<JoinHandle<server::Result<()>>>,
    dir: Option<TempDir>,
}

impl TestServer {
    /// Starts a server with the default configuration (no auth, default limits).
    ///
    /// # Errors
    /// When the directory, the store or the listener cannot be set up.
    pub async fn start() -> Result<Self> {
        Self::start_with("").await
    }

    /// Starts a server whose configuration file holds `toml` (e.g. `"[limits]\nmax_body_bytes = 64"`).
    ///
    /// # Errors
    /// As [`TestServer::start`], and when `toml` is not a valid configuration.
    pub async fn start_with(toml: &str) -> Result<Self> {
        Self::start_in(
            TempDir::new().context("creating a temporary directory")?,
            toml,
        )
        .await
    }

    /// Starts a server over the data in `dir` (from an earlier [`TestServer::stop`]).
    ///
    /// # Errors
    /// As [`TestServer::start_with`].
    pub async fn start_in(dir: TempDir, toml: &str) -> Result<Self> {
        let config_file = dir.path().join("lockstep.toml");
        std::fs::write(&config_file, toml).context("writing the configuration file")?;
        let config = Config::load(ConfigSources {
            file: Some(&config_file),
            data_dir: Some(dir.path().join("data")),
            ..ConfigSources::default()
        })
        .context("loading the test configuration")?;
        let store_config = config.store.store_config();
        let store = within(
            "opening the store",
            tokio::task::spawn_blocking(move || Store::open(store_config)),
        )
        .await???;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding 127.0.0.1:0")?;
        let address = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(server::run_with_store(
            Arc::new(config),
            store.clone(),
            listener,
            shutdown.clone(),
        ));
        let client = reqwest::Client::builder()
            .connect_timeout(TIMEOUT)
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            address,
            client,
            store: Some(store),
            shutdown,
            running: Some(running),
            dir: Some(dir),
        })
    }

    /// The address the server listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The full URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// An HTTP client for this server.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The server's store, for setting up what HTTP cannot (a merge from another replica) and for
    /// checking that a bad request changed nothing.
    ///
    /// # Panics
    /// Never: the store is only taken by [`TestServer::stop`], which consumes the server.
    pub fn store(&self) -> &Store {
        self.store
            .as_ref()
            .expect("the store is only taken by stop(), which consumes the server")
    }

    /// The directory the store lives in.
    ///
    /// # Panics
    /// Never: the directory is only taken by [`TestServer::stop`], which consumes the server.
    pub fn data_dir(&self) -> PathBuf {
        self.dir
            .as_ref()
            .expect("the directory is only taken by stop(), which consumes the server")
            .path()
            .join("data")
    }

    /// The token that shuts the server down, for tests that cancel it while requests are in flight.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The number of durable feed rows.
    pub fn feed_len(&self) -> u64 {
        self.store().last_seq().0
    }

    /// How many `/v1` requests the server is handling now, from `/metrics`.
    ///
    /// # Errors
    /// When `/metrics` cannot be read or lacks the gauge.
    pub async fn requests_in_flight(&self) -> Result<u64> {
        let response = self.get_response("/metrics").await?;
        let text = within("reading /metrics", response.text()).await??;
        text.lines()
            .find_map(|line| line.strip_prefix("lockstep_http_requests_in_flight "))
            .and_then(|value| value.trim().parse().ok())
            .context("/metrics has no lockstep_http_requests_in_flight")
    }

    /// Waits until the server is handling exactly `count` `/v1` requests.
    ///
    /// # Errors
    /// When the deadline passes first.
    pub async fn await_in_flight(&self, count: u64) -> Result<()> {
        poll_until(&format!("{count} requests in flight"), || async {
            Ok((self.requests_in_flight().await? == count).then_some(()))
        })
        .await
    }

    /// Opens a raw TCP connection and writes `bytes` on it, for requests no HTTP client would send
    /// (half a head, a body that stalls).
    ///
    /// # Errors
    /// When connecting or writing fails or times out.
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<tokio::net::TcpStream> {
        let mut stream = within("connecting", tokio::net::TcpStream::connect(self.address))
            .await?
            .context("connecting")?;
        write_raw(&mut stream, bytes).await?;
        Ok(stream)
    }

    /// Sends a request built from this server's client, within the deadline.
    ///
    /// # Errors
    /// When the request fails or times out.
    pub async fn send(&self, request: RequestBuilder) -> Result<Response> {
        within("sending a request", request.send())
            .await?
            .context("sending a request")
    }

    /// Sends a request and returns its status and JSON body.
    ///
    /// # Errors
    /// When the request fails or times out, or the body is not JSON.
    pub async fn json(&self, request: RequestBuilder) -> Result<(StatusCode, Value)> {
        let response = self.send(request).await?;
        let status = response.status();
        let body = within("reading a response body", response.text()).await??;
        let json = serde_json::from_str(&body)
            .with_context(|| format!("the {status} response is not JSON: {body:?}"))?;
        Ok((status, json))
    }

    /// A `PATCH path` request with a merge patch, for adding headers before sending it.
    pub fn patch_request(&self, path: &str, merge_patch: &Value) -> RequestBuilder {
        self.client
            .patch(self.url(path))
            .header("content-type", "application/merge-patch+json")
            .body(merge_patch.to_string())
    }

    /// `PATCH path` with a merge patch.
    ///
    /// # Errors
    /// As [`TestServer::json`].
    pub async fn patch(&self, path: &str, merge_patch: &Value) -> Result<(StatusCode, Value)> {
        self.json(self.patch_request(path, merge_patch)).await
    }

    /// `PUT path` with the entity's fields.
    ///
    /// # Errors
    /// As [`TestServer::json`].
    pub async fn put(&self, path: &str, fields: &Value) -> Result<(StatusCode, Value)> {
        self.json(
            self.client
                .put(self.url(path))
                .header("content-type", "application/json")
                .body(fields.to_string()),
        )
        .await
    }

    /// `GET path`.
    ///
    /// # Errors
    /// As [`TestServer::json`].
    pub async fn get(&self, path: &str) -> Result<(StatusCode, Value)> {
        self.json(self.client.get(self.url(path))).await
    }

    /// `GET path`, as the response itself (for its headers, or an error's shape).
    ///
    /// # Errors
    /// As [`TestServer::send`].
    pub async fn get_response(&self, path: &str) -> Result<Response> {
        self.send(self.client.get(self.url(path))).await
    }

    /// Shuts the server down gracefully and waits until it has closed the store; returns the
    /// directory so that a test can reopen the same data.
    ///
    /// # Errors
    /// When the server fails to shut down cleanly or in time.
    pub async fn stop(mut self) -> Result<TempDir> {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            within("the server shutting down", running)
                .await?
                .context("the server task panicked")?
                .context("the server shut down with an error")?;
        }
        // Drop our handle on the store, so the directory can be opened again.
        self.store.take();
        self.dir.take().context("the directory was already taken")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // A test that fails before `stop` still shuts its server down.
        self.shutdown.cancel();
    }
}

/// The value of header `name` in `response`, when it is there and readable as text.
pub fn header<'a>(response: &'a Response, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
}

/// Checks that `response` has `status` and a `{"code", "detail"}` body with `code`; returns the body.
///
/// # Errors
/// When the status, the shape or the code differ.
pub async fn expect_error(response: Response, status: u16, code: &str) -> Result<Value> {
    let actual = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = within("reading an error body", response.text()).await??;
    ensure!(
        actual.as_u16() == status,
        "expected {status}, got {actual}: {body}"
    );
    ensure!(
        content_type.starts_with("application/json"),
        "the {status} error is {content_type:?}, not JSON: {body}"
    );
    let json: Value = serde_json::from_str(&body).with_context(|| format!("not JSON: {body}"))?;
    let object = json
        .as_object()
        .context("the error body is not an object")?;
    ensure!(
        object.len() == 2,
        "the error body has other keys than code and detail: {json}"
    );
    ensure!(
        object.get("code").and_then(Value::as_str) == Some(code),
        "expected code {code:?}: {json}"
    );
    ensure!(
        object
            .get("detail")
            .and_then(Value::as_str)
            .is_some_and(|detail| !detail.is_empty()),
        "the error has no detail: {json}"
    );
    Ok(json)
}

/// One server-sent event.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Event {
    /// The `id:` field.
    pub id: Option<String>,
    /// The `event:` field.
    pub event: Option<String>,
    /// The `data:` lines, joined with newlines.
    pub data: String,
}

/// Reads server-sent events from a streaming response.
pub struct EventReader {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Vec<u8>>> + Send>>,
    buffer: String,
}

impl EventReader {
    /// Starts reading `response`, which must be a `text/event-stream`.
    ///
    /// # Errors
    /// When the response is not a successful event stream.
    pub fn new(response: Response) -> Result<Self> {
        ensure!(
            response.status().is_success(),
            "the event stream answered {}",
            response.status()
        );
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        ensure!(
            content_type.starts_with("text/event-stream"),
            "not an event stream: {content_type:?}"
        );
        Ok(Self {
            body: Box::pin(
                response
                    .bytes_stream()
                    .map(|chunk| chunk.map(|bytes| bytes.to_vec())),
            ),
            buffer: String::new(),
        })
    }

    /// The next event (comments are skipped), within [`TIMEOUT`].
    ///
    /// # Errors
    /// When the stream ends, fails or the deadline passes.
    pub async fn next_event(&mut self) -> Result<Event> {
        within("waiting for a server-sent event", self.read_event()).await?
    }

    async fn read_event(&mut self) -> Result<Event> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = Event::default();
                let mut has_field = false;
                for line in block.lines() {
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "" => continue,
                        "id" => event.id = Some(value.to_string()),
                        "event" => event.event = Some(value.to_string()),
                        "data" => {
                            if !event.data.is_empty() {
                                event.data.push('\n');
                            }
                            event.data.push_str(value);
                        }
                        _ => continue,
                    }
                    has_field = true;
                }
                if has_field {
                    return Ok(event);
                }
                continue;
            }
            match self.body.next().await {
                Some(chunk) => {
                    let chunk = chunk.context("reading the event stream")?;
                    self.buffer
                        .push_str(&String::from_utf8_lossy(&chunk).replace("\r\n", "\n"));
                }
                None => bail!("the event stream ended"),
            }
        }
    }
}

/// A response read off a raw TCP connection, for tests that speak HTTP/1.1 by hand
/// (half-sent heads and bodies that no HTTP client would produce).
#[derive(Debug)]
pub struct RawResponse {
    /// The status code.
    pub status: u16,
    /// The headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body (read by `Content-Length`).
    pub body: String,
}

impl RawResponse {
    /// The body as JSON.
    ///
    /// # Errors
    /// When it is not JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body).with_context(|| format!("not JSON: {:?}", self.body))
    }
}

/// Writes more `bytes` on a raw connection, within [`TIMEOUT`].
///
/// # Errors
/// When writing fails or times out.
pub async fn write_raw(stream: &mut tokio::net::TcpStream, bytes: &[u8]) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    within("writing to a raw connection", stream.write_all(bytes))
        .await?
        .context("writing to a raw connection")
}

/// Reads one HTTP/1.1 response with a `Content-Length` from `stream`, within [`TIMEOUT`].
///
/// # Errors
/// When the connection closes first, the response is malformed, or the deadline passes.
pub async fn read_raw_response(stream: &mut tokio::net::TcpStream) -> Result<RawResponse> {
    use tokio::io::AsyncReadExt;
    within("reading a raw response", async {
        let mut buffer = Vec::new();
        let head_end = loop {
            if let Some(position) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
                break position;
            }
            let mut chunk = [0u8; 4096];
            let read = stream.read(&mut chunk).await.context("reading")?;
            ensure!(read > 0, "the connection closed before a response head");
            buffer.extend_from_slice(&chunk[..read]);
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .with_context(|| format!("bad status line {status_line:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(name, _)| name == "content-length")
            .and_then(|(_, value)| value.parse().ok())
            .unwrap_or(0);
        let mut body = buffer[head_end + 4..].to_vec();
        while body.len() < length {
            let mut chunk = [0u8; 4096];
            let read = stream.read(&mut chunk).await.context("reading")?;
            ensure!(read > 0, "the connection closed in the middle of a body");
            body.extend_from_slice(&chunk[..read]);
        }
        Ok(RawResponse {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    })
    .await?
}
