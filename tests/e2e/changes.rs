//! The change feed: JSON lines with `since`, `kind` and `limit`, and the event stream with its
//! backlog, live rows, kind filter and `Last-Event-ID` resume.

use anyhow::{Context, Result};
use lockstep_tests::{expect_error, header, within, EventReader, TestServer};
use serde_json::{json, Value};

async fn feed_lines(server: &TestServer, query: &str) -> Result<Vec<Value>> {
    let response = server.get_response(&format!("/v1/changes{query}")).await?;
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "content-type"),
        Some("application/x-ndjson")
    );
    let text = within("reading the feed", response.text()).await??;
    text.lines()
        .map(|line| serde_json::from_str(line).with_context(|| format!("not JSON: {line}")))
        .collect()
}

fn seqs(rows: &[Value]) -> Vec<u64> {
    rows.iter().filter_map(|row| row["seq"].as_u64()).collect()
}

async fn open_stream(
    server: &TestServer,
    query: &str,
    last_event_id: Option<&str>,
) -> Result<EventReader> {
    let mut request = server
        .client()
        .get(server.url(&format!("/v1/changes{query}")))
        .header("accept", "text/event-stream");
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    EventReader::new(server.send(request).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_honour_since_kind_and_limit() -> Result<()> {
    let server = TestServer::start().await?;
    for (kind, id) in [("a", "1"), ("b", "1"), ("a", "2"), ("b", "2"), ("a", "3")] {
        server
            .patch(&format!("/v1/entities/{kind}/{id}"), &json!({"n": id}))
            .await?;
    }
    let all = feed_lines(&server, "").await?;
    assert_eq!(seqs(&all), [1, 2, 3, 4, 5]);
    let first = &all[0];
    assert_eq!(first["kind"], "a");
    assert_eq!(first["id"], "1");
    assert_eq!(first["origin"], "local:anonymous");
    assert_eq!(first["fields"], json!(["n"]));
    assert_eq!(first["exists"], true);
    assert!(first["version"].is_string());

    assert_eq!(seqs(&feed_lines(&server, "?since=2").await?), [3, 4, 5]);
    assert_eq!(seqs(&feed_lines(&server, "?kind=b").await?), [2, 4]);
    assert_eq!(
        seqs(&feed_lines(&server, "?since=2&limit=2").await?),
        [3, 4]
    );
    assert_eq!(
        seqs(&feed_lines(&server, "?since=1&kind=a&limit=1").await?),
        [3]
    );
    assert!(feed_lines(&server, "?since=5").await?.is_empty());
    // An Accept that refuses the event stream (`q=0`) gets the JSON lines, which end.
    for accept in [
        "text/event-stream;q=0",
        "text/event-stream; q=0.0, application/x-ndjson",
    ] {
        let request = server
            .client()
            .get(server.url("/v1/changes?since=4"))
            .header("accept", accept);
        let response = server.send(request).await?;
        assert_eq!(
            response.headers()["content-type"],
            "application/x-ndjson",
            "{accept}"
        );
        let text = within("the JSON lines", response.text()).await??;
        assert_eq!(text.lines().count(), 1, "{accept}: {text}");
    }
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_stream_sends_the_backlog_then_rows_written_later() -> Result<()> {
    let server = TestServer::start().await?;
    server.patch("/v1/entities/a/1", &json!({"x": 1})).await?;
    server.patch("/v1/entities/a/2", &json!({"x": 2})).await?;

    let mut events = open_stream(&server, "?since=0", None).await?;
    for expected in ["1", "2"] {
        let event = events.next_event().await?;
        assert_eq!(event.id.as_deref(), Some(expected));
        assert_eq!(event.event.as_deref(), Some("change"));
        let row: Value = serde_json::from_str(&event.data)?;
        assert_eq!(row["seq"].as_u64(), expected.parse().ok());
    }

    // Written after the stream started: it arrives live.
    let (_, written) = server.patch("/v1/entities/a/3", &json!({"x": 3})).await?;
    let event = events.next_event().await?;
    assert_eq!(event.id.as_deref(), Some("3"));
    let row: Value = serde_json::from_str(&event.data)?;
    assert_eq!(row["id"], "3");
    assert_eq!(row["version"], written["version"]);
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_stream_resumes_after_last_event_id() -> Result<()> {
    let server = TestServer::start().await?;
    for id in ["1", "2", "3"] {
        server
            .patch(&format!("/v1/entities/a/{id}"), &json!({"x": id}))
            .await?;
    }
    // Last-Event-ID wins over `since`, as a reconnecting EventSource sends both.
    let mut events = open_stream(&server, "?since=0", Some("2")).await?;
    let event = events.next_event().await?;
    assert_eq!(event.id.as_deref(), Some("3"));
    server.patch("/v1/entities/a/4", &json!({"x": 4})).await?;
    assert_eq!(events.next_event().await?.id.as_deref(), Some("4"));
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_stream_filters_by_kind() -> Result<()> {
    let server = TestServer::start().await?;
    server.patch("/v1/entities/a/1", &json!({"x": 1})).await?;
    server.patch("/v1/entities/b/1", &json!({"x": 1})).await?;
    let mut events = open_stream(&server, "?kind=b", None).await?;
    assert_eq!(events.next_event().await?.id.as_deref(), Some("2"));
    server.patch("/v1/entities/a/2", &json!({"x": 2})).await?;
    server.patch("/v1/entities/b/2", &json!({"x": 2})).await?;
    let event = events.next_event().await?;
    assert_eq!(event.id.as_deref(), Some("4"));
    let row: Value = serde_json::from_str(&event.data)?;
    assert_eq!(row["kind"], "b");
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_event_stream_does_not_hold_up_shutdown() -> Result<()> {
    let server = TestServer::start().await?;
    server.patch("/v1/entities/a/1", &json!({"x": 1})).await?;
    let mut events = open_stream(&server, "", None).await?;
    assert_eq!(events.next_event().await?.id.as_deref(), Some("1"));
    // `stop` fails if the server does not finish within the deadline.
    server.stop().await?;
    let ended = events.next_event().await;
    assert!(
        ended.is_err(),
        "the stream should end on shutdown: {ended:?}"
    );
    Ok(())
}

/// Asks for an event stream of the whole feed, whatever the answer.
async fn try_stream(server: &TestServer) -> Result<reqwest::Response> {
    server
        .send(
            server
                .client()
                .get(server.url("/v1/changes"))
                .header("accept", "text/event-stream"),
        )
        .await
}

/// At most `limits.max_event_streams` event streams are open at once; one more gets 503
/// `too_many_streams` with `Retry-After`, and a closed stream makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_are_capped() -> Result<()> {
    let server = TestServer::start_with("[limits]\nmax_event_streams = 2\n").await?;
    let first = open_stream(&server, "?since=0", None).await?;
    let _second = open_stream(&server, "?since=0", None).await?;
    let refused = try_stream(&server).await?;
    assert_eq!(refused.status(), 503);
    assert_eq!(header(&refused, "retry-after"), Some("5"));
    expect_error(refused, 503, "too_many_streams").await?;
    // JSON lines are not streams and stay available.
    feed_lines(&server, "?since=0").await?;
    drop(first);
    lockstep_tests::poll_until("a stream's place to be free", || async {
        let response = try_stream(&server).await?;
        Ok((response.status() == 200).then_some(()))
    })
    .await?;
    Ok(())
}

/// A client that opens an event stream and stops reading is disconnected once the server has
/// been unable to send it anything for `limits.write_timeout`, instead of holding the connection
/// and its buffers for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_client_stopped_reading_is_closed_after_the_write_timeout() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let server = TestServer::start_with("[limits]\nwrite_timeout = \"1s\"\n").await?;
    // A small receive buffer, so that a few hundred kilobytes of events fill what the two
    // kernels will hold for a reader that does not read.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut stalled = within("connecting", socket.connect(server.address())).await??;
    stalled
        .write_all(
            b"GET /v1/changes?since=0 HTTP/1.1\r\nhost: test\r\naccept: text/event-stream\r\n\r\n",
        )
        .await?;
    // Rows with many long field names, about 11 KB per event: 1,000 of them are more than the
    // kernels buffer for a connection on loopback (4 MiB of send buffer at most, by default).
    let fields: serde_json::Map<String, Value> = (0..200)
        .map(|n| {
            (
                format!("a_rather_long_field_name_so_that_rows_are_big_{n:03}"),
                json!(n),
            )
        })
        .collect();
    let writers: Vec<_> = (0..4)
        .map(|writer| {
            let client = server.client().clone();
            let base = server.url("/v1/entities/wide");
            let body = Value::Object(fields.clone()).to_string();
            tokio::spawn(async move {
                for n in 0..250 {
                    let response = client
                        .patch(format!("{base}/w{writer}-{n}"))
                        .header("content-type", "application/merge-patch+json")
                        .body(body.clone())
                        .send()
                        .await?;
                    anyhow::ensure!(response.status() == 201, "{}", response.status());
                }
                Ok(())
            })
        })
        .collect();
    for writer in writers {
        within("the writes", writer).await???;
    }
    // Give the timeout time to run out, then read what was buffered: the server must have
    // closed the connection, so the reading ends instead of waiting for more events.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let mut received = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stalled.read_to_end(&mut received),
    )
    .await;
    assert!(
        matches!(read, Ok(Ok(_))),
        "the stalled stream was not closed: {read:?} after {} bytes",
        received.len()
    );
    let text = String::from_utf8_lossy(&received);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(200)]
    );
    assert!(
        text.matches("event: change").count() < 1_000,
        "every event arrived, so the client never stalled the server"
    );
    // The server is fine.
    let (status, _) = server
        .patch("/v1/entities/wide/after", &json!({"a": 1}))
        .await?;
    assert_eq!(status, 201);
    Ok(())
}
