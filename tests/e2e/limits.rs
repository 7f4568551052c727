//! Limits: body size (413), the header-read timeout against slow clients, the request timeout
//! (408) and the concurrency cap (503). Requests that no HTTP client would send (half a head, a
//! body that stalls) are written by hand over TCP.

use std::time::Instant;

use anyhow::Result;
use lockstep_tests::{
    expect_error, header, read_raw_response, within, write_raw, TestServer, TIMEOUT,
};
use serde_json::json;
use tokio::io::AsyncReadExt;

/// A PUT head with a `Content-Length` of `length`, followed by the start of a JSON body.
fn put_head(path: &str, length: usize, body_start: &str) -> String {
    format!(
        "PUT {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n{body_start}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_413_and_writes_nothing() -> Result<()> {
    let server = TestServer::start().await?;
    // Declared too large: refused from the head alone, before any of the body is sent.
    let head = put_head("/v1/entities/big/1", 1024 * 1024 + 1, "");
    let mut stream = server.send_raw(head.as_bytes()).await?;
    let response = read_raw_response(&mut stream).await?;
    assert_eq!(response.status, 413, "{response:?}");
    assert_eq!(response.json()?["code"], "body_too_large");
    drop(stream);

    // Chunked, so the size is only known while reading: refused once it passes the limit.
    let server_small = TestServer::start_with("[limits]\nmax_body_bytes = 64\n").await?;
    let body = format!("{{\"padding\": \"{}\"}}", "x".repeat(200));
    let request = format!(
        "PATCH /v1/entities/big/2 HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    let mut stream = server_small.send_raw(request.as_bytes()).await?;
    let response = read_raw_response(&mut stream).await?;
    assert_eq!(response.status, 413, "{response:?}");
    assert_eq!(response.json()?["code"], "body_too_large");

    // A body within the limit, through a normal client, still works.
    let (status, _) = server_small
        .patch("/v1/entities/big/3", &json!({"a": 1}))
        .await?;
    assert_eq!(status, 201);
    assert_eq!(server.feed_len(), 0);
    assert_eq!(server_small.feed_len(), 1);
    let (status, _) = server.get("/healthz").await?;
    assert_eq!(status, 200);
    server.stop().await?;
    server_small.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_target_or_large_headers_get_json_errors() -> Result<()> {
    let server = TestServer::start().await?;
    let long_path = format!("/v1/entities/appointment/1?at={}", "a".repeat(9000));
    let big_header = "x".repeat(70 * 1024);
    for (request, status, code) in [
        (
            format!("GET {long_path} HTTP/1.1\r\nhost: test\r\n\r\n"),
            414,
            "uri_too_long",
        ),
        (
            format!("GET /healthz HTTP/1.1\r\nhost: test\r\nx-padding: {big_header}\r\n\r\n"),
            431,
            "headers_too_large",
        ),
    ] {
        let mut stream = server.send_raw(request.as_bytes()).await?;
        let response = read_raw_response(&mut stream).await?;
        assert_eq!(response.status, status, "{response:?}");
        assert_eq!(response.json()?["code"], code);
    }
    // Within the limits, both are served.
    let (status, _) = server.get(&format!("/healthz?{}", "a".repeat(100))).await?;
    assert_eq!(status, 200);
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_the_http_parser_refuses_get_json_errors_too() -> Result<()> {
    // hyper answers these before any route or middleware runs; they used to have empty bodies.
    let server = TestServer::start().await?;
    let many_headers: String = (0..101).map(|n| format!("x-h{n}: v\r\n")).collect();
    let cases = [
        (
            format!("GET /healthz HTTP/1.1\r\nhost: test\r\n{many_headers}\r\n"),
            431,
            "headers_too_large",
        ),
        (
            format!(
                "GET /v1/entities/a/{} HTTP/1.1\r\nhost: test\r\n\r\n",
                "b".repeat(70_000)
            ),
            414,
            "uri_too_long",
        ),
        (
            "GET /healthz HTTP/1.1\r\nhost: test\r\nnot a header\r\n\r\n".to_string(),
            400,
            "malformed_request",
        ),
        (
            "PUT /v1/entities/a/b HTTP/1.1\r\nhost: test\r\ncontent-length: 1x\r\n\r\n".to_string(),
            400,
            "malformed_request",
        ),
        (
            "GET / HTTP/9.9\r\n\r\n".to_string(),
            400,
            "malformed_request",
        ),
    ];
    for (request, status, code) in cases {
        let mut stream = server.send_raw(request.as_bytes()).await?;
        let response = read_raw_response(&mut stream).await?;
        assert_eq!(response.status, status, "{response:?}");
        assert!(
            response
                .headers
                .contains(&("content-type".into(), "application/json".into())),
            "{response:?}"
        );
        let body = response.json()?;
        assert_eq!(body["code"], code, "{body}");
        assert!(body["detail"].is_string(), "{body}");
    }
    // On a keep-alive connection, after a request that was served.
    let mut stream = server
        .send_raw(b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n")
        .await?;
    let response = read_raw_response(&mut stream).await?;
    assert_eq!(response.status, 200, "{response:?}");
    write_raw(&mut stream, b"GET /healthz HTTP/1.1\r\nbad header\r\n\r\n").await?;
    let response = read_raw_response(&mut stream).await?;
    assert_eq!(response.status, 400, "{response:?}");
    assert_eq!(response.json()?["code"], "malformed_request");
    // A head past the parser's buffer (about 400 KiB): the server answers before reading it all,
    // so the write may fail once the server has closed; the answer is still read.
    let mut stream = within(
        "connecting",
        tokio::net::TcpStream::connect(server.address()),
    )
    .await??;
    let head = format!(
        "GET /healthz HTTP/1.1\r\nhost: test\r\nx-big: {}\r\n\r\n",
        "x".repeat(450 * 1024)
    );
    let _ = write_raw(&mut stream, head.as_bytes()).await;
    let response = read_raw_response(&mut stream).await?;
    assert_eq!(response.status, 431, "{response:?}");
    assert_eq!(response.json()?["code"], "headers_too_large");
    // The server serves on.
    let (status, _) = server.get("/healthz").await?;
    assert_eq!(status, 200);
    assert_eq!(server.feed_len(), 0);
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_half_a_head_is_disconnected() -> Result<()> {
    let server = TestServer::start_with("[limits]\nheader_read_timeout = \"300ms\"\n").await?;
    let started = Instant::now();
    let mut slow = server
        .send_raw(b"GET /healthz HTTP/1.1\r\nhost: test\r\nx-slow: ")
        .await?;
    let mut silent = server.send_raw(b"").await?;

    // Both connections are closed by the server (read returns end of file) long before our deadline.
    for stream in [&mut slow, &mut silent] {
        let mut received = Vec::new();
        within(
            "waiting for the server to close",
            stream.read_to_end(&mut received),
        )
        .await??;
        assert!(
            !String::from_utf8_lossy(&received).contains("200 OK"),
            "a half-sent request was answered"
        );
    }
    assert!(started.elapsed() < TIMEOUT / 2);

    // Everyone else is still served.
    let (status, _) = server.get("/healthz").await?;
    assert_eq!(status, 200);
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_takes_too_long_is_408() -> Result<()> {
    let server = TestServer::start_with("[limits]\nrequest_timeout = \"300ms\"\n").await?;
    // The head is complete, but the body never is.
    let head = put_head("/v1/entities/slow/1", 100, r#"{"a":"#);
    let mut stream = server.send_raw(head.as_bytes()).await?;
    let response = read_raw_response(&mut stream).await?;
    assert_eq!(response.status, 408, "{response:?}");
    let body = response.json()?;
    assert_eq!(body["code"], "request_timeout");
    assert!(body["detail"].is_string());
    assert_eq!(server.feed_len(), 0);
    let (status, _) = server.get("/v1/entities/slow/1").await?;
    assert_eq!(status, 404);
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_concurrency_cap_get_503_at_once() -> Result<()> {
    let server = TestServer::start_with("[limits]\nmax_concurrent_requests = 1\n").await?;
    // This request holds the only slot: its handler waits for a body that is sent later.
    let head = put_head("/v1/entities/cap/1", 12, r#"{"a":"#);
    let mut holder = server.send_raw(head.as_bytes()).await?;

    // Once the holder is admitted, every other /v1 request is refused immediately.
    server.await_in_flight(1).await?;
    let refused = server.get_response("/v1/entities/cap/2").await?;
    assert_eq!(header(&refused, "retry-after"), Some("1"));
    expect_error(refused, 503, "overloaded").await?;
    // Probes are not subject to the cap.
    let (status, _) = server.get("/healthz").await?;
    assert_eq!(status, 200);

    // The holder finishes, and frees its slot.
    write_raw(&mut holder, b" 12345}").await?;
    let response = read_raw_response(&mut holder).await?;
    assert_eq!(response.status, 201, "{response:?}");
    let (status, _) = server.get("/v1/entities/cap/1").await?;
    assert_eq!(status, 200);
    server.stop().await?;
    Ok(())
}
