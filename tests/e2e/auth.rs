//! Bearer tokens: 401 without or with an unknown token, 403 for a read token writing, the
//! token's name as the origin of every write it makes, and no token in the logs.

use anyhow::Result;
use lockstep_tests::sites::{free_port, release_binary, Process};
use lockstep_tests::{expect_error, header, within, TestServer};
use reqwest::{Method, RequestBuilder};
use serde_json::{json, Value};

const TOKENS: &str = r#"
[[auth.tokens]]
name = "alice"
token = "alice-secret-token"
role = "write"

[[auth.tokens]]
name = "reader"
token = "reader-secret-token"
role = "read"
"#;
const ALICE: &str = "alice-secret-token";
const READER: &str = "reader-secret-token";

/// A request to `path` with `token`, and a JSON body unless it is a GET.
fn request(server: &TestServer, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
    let mut request = server.client().request(method.clone(), server.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if method != Method::GET {
        request = request
            .header("content-type", "application/json")
            .body(r#"{"status": "booked"}"#);
    }
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_needs_a_known_bearer_token() -> Result<()> {
    let server = TestServer::start_with(TOKENS).await?;
    let path = "/v1/entities/appointment/1";
    let url = server.url(path);
    for authorization in [
        None,
        Some("Bearer wrong-token"),
        Some("Basic YWxpY2U6eA=="),
        Some("Bearer "),
    ] {
        let mut request = server.client().get(&url);
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let response = server.send(request).await?;
        assert_eq!(
            header(&response, "www-authenticate"),
            Some("Bearer realm=\"lockstep\"")
        );
        expect_error(response, 401, "unauthenticated").await?;
    }
    let response = server
        .send(request(&server, Method::PATCH, path, None))
        .await?;
    expect_error(response, 401, "unauthenticated").await?;
    assert_eq!(server.feed_len(), 0);

    // Probes and scrapes need no token.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let response = server.get_response(path).await?;
        assert_eq!(response.status(), 200, "{path}");
    }
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_token_reads_but_may_not_write() -> Result<()> {
    let server = TestServer::start_with(TOKENS).await?;
    let path = "/v1/entities/appointment/1";
    let (status, _) = server
        .json(request(&server, Method::PUT, path, Some(ALICE)))
        .await?;
    assert_eq!(status, 201);

    let (status, body) = server
        .json(request(&server, Method::GET, path, Some(READER)))
        .await?;
    assert_eq!(status, 200);
    assert_eq!(body["data"]["status"], "booked");
    let feed = request(&server, Method::GET, "/v1/changes", Some(READER));
    assert_eq!(server.send(feed).await?.status(), 200);

    let feed_len = server.feed_len();
    for method in [Method::PUT, Method::PATCH, Method::DELETE] {
        let response = server
            .send(request(&server, method, path, Some(READER)))
            .await?;
        expect_error(response, 403, "forbidden").await?;
    }
    assert_eq!(server.feed_len(), feed_len);
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_carry_the_token_name_as_origin_and_no_header_can_change_it() -> Result<()> {
    let server = TestServer::start_with(TOKENS).await?;
    let path = "/v1/entities/appointment/2";
    let write = request(&server, Method::PATCH, path, Some(ALICE))
        .header("x-lockstep-origin", "peer:mallory");
    let (status, _) = server.json(write).await?;
    assert_eq!(status, 201);

    let history = request(
        &server,
        Method::GET,
        &format!("{path}/history"),
        Some(ALICE),
    );
    let (_, history) = server.json(history).await?;
    assert_eq!(history["changes"][0]["origin"], "local:alice");
    let feed = request(&server, Method::GET, "/v1/changes", Some(ALICE));
    let response = server.send(feed).await?;
    let feed = within("reading the feed", response.text()).await??;
    let row: Value = serde_json::from_str(feed.trim())?;
    assert_eq!(row["origin"], json!("local:alice"));
    server.stop().await?;
    Ok(())
}

/// The release binary, logging everything (`RUST_LOG=trace`), is sent known, unknown and
/// refused tokens: its log names the token (`alice`) but holds no token itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_appear_in_the_logs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("lockstep.toml");
    std::fs::write(&config, TOKENS)?;
    let port = free_port()?;
    let server = Process::start_capturing(
        &release_binary()?,
        &config,
        &dir.path().join("data"),
        port,
        "trace",
    )
    .await?;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/entities/appointment/1", server.base);
    let unknown = "unknown-secret-token";
    let attempts = [
        (Some(ALICE), 201),
        (Some(READER), 403),
        (Some(unknown), 401),
        (None, 401),
    ];
    for (token, expected) in attempts {
        let mut request = client
            .patch(&url)
            .header("content-type", "application/json")
            .body(r#"{"status": "booked"}"#);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        assert_eq!(
            request.send().await?.status().as_u16(),
            expected,
            "{token:?}"
        );
    }
    let read = client.get(&url).bearer_auth(READER).send().await?;
    assert_eq!(read.status().as_u16(), 200);
    // The request lines are logged at debug, after the response: wait for the last one.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let log = loop {
        let log = server.log();
        if log
            .iter()
            .filter(|line| line.contains("/v1/entities"))
            .count()
            > attempts.len()
        {
            break log;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the request lines were not logged: {log:#?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(log.iter().any(|line| line.contains("alice")), "{log:#?}");
    for secret in [ALICE, READER, unknown] {
        let leaks: Vec<&String> = log.iter().filter(|line| line.contains(secret)).collect();
        assert!(leaks.is_empty(), "{secret} is in the log: {leaks:#?}");
    }
    server.kill().await
}
