//! Graceful shutdown: cancelling the server while writes are in flight loses no acknowledged
//! write, and a request already being handled is finished rather than cut off.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use lockstep_tests::{poll_until, read_raw_response, within, write_raw, TestServer};
use serde_json::{json, Value};
use tokio::net::TcpStream;

/// One write that got a 2xx: the entity, the value written and the version answered.
#[derive(Clone, Debug)]
struct Ack {
    id: String,
    value: u64,
    version: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_mid_writes_keeps_every_acknowledged_write() -> Result<()> {
    let server = TestServer::start().await?;
    let acks = Arc::new(Mutex::new(Vec::<Ack>::new()));
    let writers: Vec<_> = (0..16)
        .map(|writer| {
            let client = server.client().clone();
            let base = server.url("/v1/entities/shutdown");
            let acks = acks.clone();
            tokio::spawn(async move {
                for value in 0u64.. {
                    let id = format!("w{writer}-{value}");
                    let sent = within(
                        "a write",
                        client
                            .patch(format!("{base}/{id}"))
                            .header("content-type", "application/merge-patch+json")
                            .body(json!({ "value": value }).to_string())
                            .send(),
                    )
                    .await;
                    // The server is going away: connection refused or closed.
                    let Ok(Ok(response)) = sent else { return };
                    if !response.status().is_success() {
                        return;
                    }
                    let Ok(Ok(body)) = within("a write's body", response.json::<Value>()).await
                    else {
                        return;
                    };
                    let version = body["version"].as_str().unwrap_or_default().to_string();
                    acks.lock()
                        .expect("no writer panics holding the lock")
                        .push(Ack { id, value, version });
                }
            })
        })
        .collect();

    // Let writes get going, then shut down while they are in flight.
    poll_until("writes to be acknowledged", || async {
        Ok((acks.lock().expect("lock").len() >= 50).then_some(()))
    })
    .await?;
    server.shutdown_token().cancel();
    for writer in writers {
        within("a writer to stop", writer).await??;
    }
    let dir = server.stop().await?;
    let acks = acks.lock().expect("lock").clone();
    assert!(acks.len() >= 50);

    // Every acknowledged write is there after reopening the same directory, with a feed row.
    let reopened = TestServer::start_in(dir, "").await?;
    for ack in &acks {
        let (status, entity) = reopened
            .get(&format!("/v1/entities/shutdown/{}", ack.id))
            .await?;
        assert_eq!(status, 200, "acknowledged write {ack:?} is missing");
        assert_eq!(entity["data"]["value"], ack.value, "{ack:?}");
        assert_eq!(entity["version"], ack.version.as_str(), "{ack:?}");
    }
    let response = reopened
        .send(
            reopened
                .client()
                .get(reopened.url("/v1/changes?limit=10000")),
        )
        .await?;
    let feed = within("reading the feed", response.text()).await??;
    let rows: Vec<Value> = feed
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("feed rows are JSON")?;
    for ack in &acks {
        assert!(
            rows.iter()
                .any(|row| row["id"] == ack.id.as_str() && row["version"] == ack.version.as_str()),
            "acknowledged write {ack:?} has no feed row"
        );
    }
    reopened.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_progress_at_shutdown_is_finished() -> Result<()> {
    let server = TestServer::start().await?;
    let mut slow = server
        .send_raw(b"PUT /v1/entities/late/1 HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: 14\r\n\r\n{\"late\":")
        .await?;
    // The handler is now waiting for the rest of the body.
    server.await_in_flight(1).await?;

    server.shutdown_token().cancel();
    // New connections are refused once the server stops accepting.
    poll_until("the listener to close", || async {
        Ok(TcpStream::connect(server.address())
            .await
            .is_err()
            .then_some(()))
    })
    .await?;
    write_raw(&mut slow, b" true}").await?;
    let response = read_raw_response(&mut slow).await?;
    assert_eq!(response.status, 201, "{response:?}");

    let dir = server.stop().await?;
    let reopened = TestServer::start_in(dir, "").await?;
    let (status, entity) = reopened.get("/v1/entities/late/1").await?;
    assert_eq!(status, 200);
    assert_eq!(entity["data"], json!({"late": true}));
    reopened.stop().await?;
    Ok(())
}
