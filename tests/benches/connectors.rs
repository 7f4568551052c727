//! The issue-3 benchmark: durable signed-webhook ingest at 1 and 64 connections against the raw
//! sled insert+flush baseline, and outbound latency from a local edit to the receiver getting
//! its delta at 1,000 edits/s (the first second from a cold start reported apart).
//!
//! Run with `cargo bench -p lockstep-tests --bench connectors` (it builds the release `lockstep`
//! binary first). `LOCKSTEP_BENCH_SECONDS` sets each phase's length (default 5).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use axum::body::Bytes;
use axum::extract::State;
use connectors::WebhookSecret;
use lockstep_tests::bench::{
    closed_loop, env_number, ms, print_cpu_table, release_binary, sled_over_http, summarize,
    Baselines, CpuSample, Figures, Server,
};
use lockstep_tests::webhooks::{signed, unix_now, TEST_SECRET};
use serde_json::{json, Value};

fn connector(url: Option<&str>) -> String {
    let url = url.map_or(String::new(), |url| format!("url = \"{url}\"\n"));
    format!(
        r#"
[[connectors]]
name = "scheduler"
kind = "appointment"
id_field = "apptId"
webhook_secret = "{TEST_SECRET}"
{url}concurrency = 64
[connectors.fields]
scheduledDate = "date"
officeCode = "site.code"
"#
    )
}

/// Round `round` of connection `connection`'s webhook in the phase of `connections`: its id
/// and its body.
fn webhook(connections: u64, connection: u64, round: u64) -> (String, Vec<u8>) {
    let body = json!({
        "apptId": format!("w{connection}-{}", round % 500),
        "scheduledDate": format!("2027-01-{:02}", 1 + round % 28),
        "officeCode": format!("N{round}"),
    })
    .to_string();
    // Unique across phases too: the 64-connection phase's first connection must not replay the
    // 1-connection phase's ids (a replay is answered from the inbox, without a write, and would
    // flatter the figure).
    (
        format!("msg_{connections}_{connection}_{round}"),
        body.into_bytes(),
    )
}

/// `connections` tasks posting signed webhooks, each with a fresh id, for `seconds`.
async fn webhook_load(base: &str, connections: u64, seconds: u64) -> Result<Figures> {
    let secret = WebhookSecret::parse(TEST_SECRET)?;
    let url = format!("{base}/v1/connectors/scheduler/webhook");
    closed_loop(
        "webhooks",
        connections,
        seconds,
        move |client, connection, round| {
            let (id, body) = webhook(connections, connection, round);
            signed(client.post(&url), &secret, &id, unix_now(), body)
        },
    )
    .await
}

/// One connection sending again, for `seconds`, the first 500 webhooks of the 1-connection
/// phase (same ids, same bodies): each is verified and answered from the inbox, with no write.
async fn repeated_webhooks(base: &str, seconds: u64) -> Result<Figures> {
    let secret = WebhookSecret::parse(TEST_SECRET)?;
    let url = format!("{base}/v1/connectors/scheduler/webhook");
    closed_loop("repeated webhooks", 1, seconds, move |client, _, round| {
        let (id, body) = webhook(1, 0, round % 500);
        signed(client.post(&url), &secret, &id, unix_now(), body)
    })
    .await
}

/// One connection asking `GET /healthz` for `seconds`: HTTP there and back, nothing else.
async fn health_checks(base: &str, seconds: u64) -> Result<Figures> {
    let url = format!("{base}/healthz");
    closed_loop("health checks", 1, seconds, move |client, _, _| {
        client.get(&url)
    })
    .await
}

/// When each edit was sent, and when its delta arrived, keyed by the unique date value.
#[derive(Default)]
struct Timings {
    sent: HashMap<String, Instant>,
    received: HashMap<String, Instant>,
}

async fn receive(State(timings): State<Arc<Mutex<Timings>>>, body: Bytes) -> &'static str {
    let arrived = Instant::now();
    if let Ok(delta) = serde_json::from_slice::<Value>(&body) {
        if let Some(value) = delta["scheduledDate"].as_str() {
            let mut timings = timings.lock().expect("timings lock");
            timings.received.entry(value.to_string()).or_insert(arrived);
        }
    }
    "{}"
}

/// Outbound latency figures: the first second from a cold start, and the rest.
struct Outbound {
    /// The edits sent in the first second: the 200 entities are created, the connector's first
    /// deliveries open their connections.
    cold: Figures,
    /// The edits sent after it.
    steady: Figures,
    /// Edits whose own delta arrived (the others were coalesced into a later delta).
    delivered: usize,
}

/// PATCHes at `rate` per second over 200 entities for one second and then `seconds` more, from
/// a server just started; the latency of each edit is from sending its PATCH to its delta
/// arriving at the receiver.
async fn outbound_latency(binary: &std::path::Path, rate: u64, seconds: u64) -> Result<Outbound> {
    let timings = Arc::new(Mutex::new(Timings::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/sync", listener.local_addr()?);
    let app = axum::Router::new()
        .fallback(receive)
        .with_state(timings.clone());
    let receiver = tokio::spawn(async move { axum::serve(listener, app).await });
    let server = Server::start(binary, &connector(Some(&url))).await?;
    let client = reqwest::Client::new();
    let total = rate * (1 + seconds);
    let interval = Duration::from_secs(1) / rate as u32;
    let started = Instant::now();
    let mut edits = Vec::new();
    for index in 0..total {
        let due = started + interval * index as u32;
        tokio::time::sleep_until(due.into()).await;
        let value = format!("v{index}");
        timings
            .lock()
            .expect("timings lock")
            .sent
            .insert(value.clone(), Instant::now());
        let request = client
            .patch(format!(
                "{}/v1/entities/appointment/e{}",
                server.base,
                index % 200
            ))
            .header("content-type", "application/merge-patch+json")
            .body(json!({ "date": value }).to_string())
            .send();
        edits.push(tokio::spawn(request));
    }
    for edit in edits {
        edit.await??.error_for_status()?;
    }
    // Deltas coalesce: an edit overtaken by a later one to the same entity is never sent alone.
    let deadline = Instant::now() + Duration::from_secs(30);
    let last = format!("v{}", total - 1);
    while !timings
        .lock()
        .expect("timings lock")
        .received
        .contains_key(&last)
    {
        if Instant::now() > deadline {
            bail!("the last delta never arrived");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    let timings = timings.lock().expect("timings lock");
    let warm = started + Duration::from_secs(1);
    let (mut cold, mut steady) = (Vec::new(), Vec::new());
    for (value, arrived) in &timings.received {
        let Some(sent) = timings.sent.get(value) else {
            continue;
        };
        let latency = arrived.duration_since(*sent);
        if *sent < warm {
            cold.push(latency);
        } else {
            steady.push(latency);
        }
    }
    let delivered = cold.len() + steady.len();
    receiver.abort();
    Ok(Outbound {
        cold: summarize(cold, Duration::from_secs(1)),
        steady: summarize(steady, elapsed.saturating_sub(Duration::from_secs(1))),
        delivered,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let seconds = env_number("LOCKSTEP_BENCH_SECONDS", 5);
    let binary = release_binary()?;

    let baselines = Baselines::measure(seconds).await?;
    println!("measuring: raw sled insert+flush behind HTTP, 1 connection ({seconds} s)");
    let floor = sled_over_http(seconds).await?;
    let server = Server::start(&binary, &connector(None)).await?;
    webhook_load(&server.base, 8, 1).await?;
    println!("measuring: signed webhooks, 1 connection ({seconds} s)");
    let single = webhook_load(&server.base, 1, seconds).await?;
    println!("measuring: the same webhooks again, 1 connection ({seconds} s)");
    let repeated = repeated_webhooks(&server.base, seconds).await?;
    println!("measuring: GET /healthz, 1 connection ({seconds} s)");
    let health = health_checks(&server.base, seconds).await?;
    println!("measuring: signed webhooks, 64 connections ({seconds} s)");
    let before = CpuSample::take(&server)?;
    let many = webhook_load(&server.base, 64, seconds).await?;
    let many_cpu = CpuSample::take(&server)?.since(&before);
    server.finish().await?;
    println!("measuring: outbound latency at 1,000 edits/s (1 s cold, then {seconds} s)");
    let outbound = outbound_latency(&binary, 1000, seconds).await?;

    println!();
    // A single connection part by part: HTTP alone, HTTP with a raw sled insert+flush and
    // nothing else, a webhook verified and answered from the inbox with nothing written, then
    // the whole of it.
    baselines.print_table(&[
        ("1 connection: GET /healthz, HTTP alone", &health),
        (
            "1 connection: raw sled insert+flush behind HTTP, nothing else (the floor of a durable write)",
            &floor,
        ),
        (
            "1 connection: a webhook sent again (verified, answered from the inbox, no write)",
            &repeated,
        ),
        ("signed webhook ingest, 1 connection", &single),
        ("signed webhook ingest, 64 connections", &many),
    ]);
    println!(
        "A signed webhook at 1 connection ran at {:.2}x of the floor (raw sled insert+flush behind HTTP, nothing else).",
        single.ops_per_sec / floor.ops_per_sec
    );
    println!();
    print_cpu_table(&baselines, &[("webhooks", &many, &many_cpu)]);
    println!();
    println!(
        "| outbound, local edit to receiver, 1,000 edits/s over 200 entities | edits | p50 | p99 |"
    );
    println!("|---|---|---|---|");
    println!(
        "| the {seconds} s after the first | {} | {} | {} |",
        1000 * seconds,
        ms(outbound.steady.p50),
        ms(outbound.steady.p99)
    );
    println!(
        "| the first second, from a cold start (entities created, connections opened) | 1000 | {} | {} |",
        ms(outbound.cold.p50),
        ms(outbound.cold.p99)
    );
    println!(
        "({} of {} edits had a delta of their own; an edit overtaken by a later edit of the same entity is coalesced into its delta)",
        outbound.delivered,
        1000 * (1 + seconds)
    );
    Ok(())
}
