//! Replication end to end: real servers on loopback peered through `[[peers]]` and
//! `[[replication.tokens]]`, in process (`TestServer`) and as release-binary processes killed
//! with SIGKILL; a raw websocket client plays a hostile peer.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use futures::{SinkExt, StreamExt};
use lockstep_tests::fake_api::FakeApi;
use lockstep_tests::sites::{converged, free_port, release_binary, site_toml, Dial, Process};
use lockstep_tests::{expect_error, poll_until, within, within_for, TestServer};
use rand::{Rng, SeedableRng};
use replication::{Frame, Mode, SyncEntry};
use serde_json::{json, Value};
use store::{EntityKey, Seq};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// How long sites may take to agree once nothing is being written any more.
const CONVERGE: Duration = Duration::from_secs(10);

fn dial<'a>(name: &'a str, url: &'a str, token: &'a str) -> Dial<'a> {
    Dial { name, url, token }
}

async fn peer_status(server: &TestServer, name: &str) -> Result<Value> {
    let (status, body) = server.get(&format!("/v1/peers/{name}")).await?;
    ensure!(status == 200, "GET /v1/peers/{name}: {status} {body}");
    Ok(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_4_two_sites_replicate_both_ways_continuously_and_resume_after_a_restart(
) -> Result<()> {
    let north =
        TestServer::start_with(&site_toml("north", &[("south", "tok-south")], &[], "1s")).await?;
    let north_url = north.url("");
    let south_toml = site_toml(
        "south",
        &[],
        &[dial("north", &north_url, "tok-south")],
        "1s",
    );
    let south = TestServer::start_with(&south_toml).await?;

    north
        .patch("/v1/entities/appointment/1", &json!({"date": "2026-12-01"}))
        .await?;
    south
        .patch("/v1/entities/appointment/2", &json!({"room": "4"}))
        .await?;
    let bases = [north.url(""), south.url("")];
    let bases: Vec<&str> = bases.iter().map(String::as_str).collect();
    let both = converged(north.client(), &bases, "appointment", CONVERGE).await?;
    assert_eq!(both.len(), 2);

    // The feed and history say which site a change came from; history also keeps the author
    // recorded where the change was written.
    let changes = within(
        "the change feed",
        north.get_response("/v1/changes?since=0").await?.text(),
    )
    .await??;
    let arrived: Vec<Value> = changes
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert!(
        arrived
            .iter()
            .any(|row| row["id"] == "2" && row["origin"] == "peer:south"),
        "{changes}"
    );
    let (_, history) = north.get("/v1/entities/appointment/2/history").await?;
    assert_eq!(history["changes"][0]["origin"], "peer:south", "{history}");
    assert_eq!(
        history["changes"][0]["author"], "local:anonymous",
        "{history}"
    );

    // Continuous: a new write arrives on the other site promptly.
    let started = Instant::now();
    north
        .patch("/v1/entities/appointment/1", &json!({"date": "2026-12-24"}))
        .await?;
    poll_until("the new date on south", || async {
        let (_, body) = south.get("/v1/entities/appointment/1").await?;
        Ok((body["data"]["date"] == "2026-12-24").then_some(()))
    })
    .await?;
    let latency = started.elapsed();
    assert!(latency < Duration::from_secs(2), "took {latency:?}");

    // Status on both sides.
    let at_north = poll_until("north to see south caught up", || async {
        let status = peer_status(&north, "south").await?;
        let caught_up = status["behind_in"] == 0 && status["behind_out"] == 0;
        Ok(caught_up.then_some(status))
    })
    .await?;
    assert_eq!(at_north["connected"], true, "{at_north}");
    assert_eq!(at_north["remote_site"], "south", "{at_north}");
    assert_eq!(at_north["url"], Value::Null, "{at_north}");
    let at_south = peer_status(&south, "north").await?;
    assert_eq!(at_south["url"], north_url.as_str(), "{at_south}");
    assert!(at_south["cursor"].as_u64() >= Some(2), "{at_south}");
    assert!(
        at_south["entities_synced"].as_u64() >= Some(2),
        "{at_south}"
    );
    let (_, list) = south.get("/v1/peers").await?;
    assert_eq!(list["site"], "south");
    assert_eq!(list["peers"][0]["name"], "north");
    expect_error(
        south.get_response("/v1/peers/nobody").await?,
        404,
        "unknown_peer",
    )
    .await?;
    let metrics = within("metrics", south.get_response("/metrics").await?.text()).await??;
    assert!(
        metrics.contains("lockstep_replication_connected{peer=\"north\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("lockstep_replication_entities_synced_total{peer=\"north\"}"));
    // Two sites in step never had to restart a sync.
    assert_eq!(at_south["sync_fallbacks"], 0, "{at_south}");
    assert!(
        metrics.contains("lockstep_replication_sync_fallbacks_total{peer=\"north\"} 0"),
        "{metrics}"
    );

    // Cut: south stops; north keeps writing; south resumes from its stored cursor.
    let cursor_before = at_south["cursor"].as_u64().context("a cursor")?;
    let south_dir = south.stop().await?;
    // A peer that shut down cleanly said so in its close frame: that is no error of the link.
    let at_north = poll_until("north to see south gone", || async {
        let status = peer_status(&north, "south").await?;
        Ok((status["connected"] == false).then_some(status))
    })
    .await?;
    assert_eq!(at_north["errors"], 0, "{at_north}");
    assert_eq!(at_north["last_error"], Value::Null, "{at_north}");
    for index in 0..20 {
        north
            .patch(
                &format!("/v1/entities/appointment/cut-{index}"),
                &json!({"n": index}),
            )
            .await?;
    }
    let south = TestServer::start_in(south_dir, &south_toml).await?;
    let resumed = peer_status(&south, "north").await?;
    assert!(
        resumed["cursor"].as_u64() >= Some(cursor_before),
        "the cursor survives a restart: {resumed}"
    );
    let bases = [north.url(""), south.url("")];
    let bases: Vec<&str> = bases.iter().map(String::as_str).collect();
    let all = converged(north.client(), &bases, "appointment", CONVERGE).await?;
    assert_eq!(all.len(), 22);
    south.stop().await?;
    north.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_4_missing_wrong_and_api_tokens_are_refused_and_the_server_keeps_serving(
) -> Result<()> {
    let toml = format!(
        "{}[[auth.tokens]]\nname = \"ops\"\ntoken = \"api-token\"\nrole = \"write\"\n",
        site_toml("north", &[("south", "tok-south")], &[], "1s")
    );
    let north = TestServer::start_with(&toml).await?;
    let upgrade = |token| upgrade(&north, token);
    expect_error(north.send(upgrade(None)).await?, 401, "unauthenticated").await?;
    expect_error(
        north.send(upgrade(Some("nope"))).await?,
        401,
        "unauthenticated",
    )
    .await?;
    expect_error(
        north.send(upgrade(Some("api-token"))).await?,
        403,
        "forbidden",
    )
    .await?;
    let plain = north
        .client()
        .get(north.url("/v1/replication"))
        .bearer_auth("tok-south");
    expect_error(north.send(plain).await?, 400, "websocket_required").await?;
    // A replication token does not open the API.
    let api = north
        .client()
        .get(north.url("/v1/peers"))
        .bearer_auth("tok-south");
    expect_error(north.send(api).await?, 401, "unauthenticated").await?;

    // A peer with the wrong token sees the refusal in its status, and keeps retrying.
    let north_url = north.url("");
    let south = TestServer::start_with(&site_toml(
        "south",
        &[],
        &[dial("north", &north_url, "wrong-token")],
        "200ms",
    ))
    .await?;
    let status = poll_until("south to record the refusal", || async {
        let status = peer_status(&south, "north").await?;
        let refused = status["last_error"]
            .as_str()
            .is_some_and(|error| error.contains("401"));
        Ok((refused && status["errors"].as_u64() >= Some(2)).then_some(status))
    })
    .await?;
    assert_eq!(status["connected"], false, "{status}");

    // North still serves.
    let (status, _) = north
        .json(
            north
                .client()
                .get(north.url("/v1/peers"))
                .bearer_auth("api-token"),
        )
        .await?;
    assert_eq!(status, 200);
    assert_eq!(north.get_response("/healthz").await?.status(), 200);
    south.stop().await?;
    north.stop().await?;
    Ok(())
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the replication websocket of `server` as peer `south`.
async fn connect(server: &TestServer) -> Result<Socket> {
    within("connecting", connect_as(server, "tok-south")).await?
}

/// Opens the replication websocket of `server` with the replication token `token`.
async fn connect_as(server: &TestServer, token: &str) -> Result<Socket> {
    let mut request = format!("ws://{}/v1/replication", server.address()).into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let (socket, _) = tokio_tungstenite::connect_async(request).await?;
    Ok(socket)
}

/// The replication websocket's upgrade request over plain HTTP, with `token` if any: how the
/// server answers when it refuses the link.
fn upgrade(server: &TestServer, token: Option<&str>) -> reqwest::RequestBuilder {
    let request = server
        .client()
        .get(server.url("/v1/replication"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    }
}

/// Reads until the server closes the socket; returns the close reason.
async fn close_reason(socket: &mut Socket) -> Result<String> {
    within("the server closing the socket", async {
        while let Some(message) = socket.next().await {
            if let Message::Close(frame) = message? {
                return Ok(frame
                    .map(|frame| frame.reason.to_string())
                    .unwrap_or_default());
            }
        }
        Ok(String::new())
    })
    .await?
}

/// The next protocol frame from the server.
async fn next_frame(socket: &mut Socket) -> Result<Frame> {
    within("a frame from the server", async {
        while let Some(message) = socket.next().await {
            if let Message::Binary(bytes) = message? {
                return Ok(Frame::decode(&bytes)?);
            }
        }
        anyhow::bail!("the socket closed")
    })
    .await?
}

fn hello() -> Message {
    Message::binary(
        Frame::Hello {
            protocol: replication::PROTOCOL_VERSION,
            site: "south".into(),
            cursor: Seq::ZERO,
        }
        .encode(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_4_a_peer_sending_garbage_gets_an_error_and_the_server_keeps_serving() -> Result<()> {
    let north =
        TestServer::start_with(&site_toml("north", &[("south", "tok-south")], &[], "1s")).await?;
    north
        .patch("/v1/entities/appointment/1", &json!({"date": "2026-12-01"}))
        .await?;
    let version_before = north
        .store()
        .version(&EntityKey::new("appointment", "1")?)?;
    let feed_before = north.feed_len();

    // Bytes that are not a frame.
    let mut socket = connect(&north).await?;
    socket.send(Message::binary(vec![0xff, 0x01, 0x02])).await?;
    let reason = close_reason(&mut socket).await?;
    assert!(reason.contains("malformed"), "{reason}");

    // A text message.
    let mut socket = connect(&north).await?;
    socket.send(Message::text("hello?")).await?;
    assert!(close_reason(&mut socket).await?.contains("malformed"));

    // Frames out of turn.
    let mut socket = connect(&north).await?;
    socket.send(hello()).await?;
    socket.send(hello()).await?;
    assert!(close_reason(&mut socket).await?.contains("second hello"));

    // Garbage where an Automerge sync message should be.
    let mut socket = connect(&north).await?;
    socket.send(hello()).await?;
    let rows = loop {
        if let frame @ Frame::Rows { .. } = next_frame(&mut socket).await? {
            break frame;
        }
    };
    let Frame::Rows { batch, rows, .. } = rows else {
        unreachable!("the loop only breaks on rows")
    };
    assert_eq!(rows.len(), 1);
    let sync = Frame::Sync {
        batch,
        entries: vec![SyncEntry {
            key: rows[0].key.clone(),
            mode: Mode::Sync,
            message: Some(vec![0x42, 0x13, 0x37, 0x00, 0xff, 0xff]),
        }],
    };
    socket.send(Message::binary(sync.encode())).await?;
    let reason = close_reason(&mut socket).await?;
    assert!(reason.contains("could not be applied"), "{reason}");

    // Nothing changed, the peer's status says what happened, and the server still serves.
    assert_eq!(
        north
            .store()
            .version(&EntityKey::new("appointment", "1")?)?,
        version_before
    );
    assert_eq!(north.feed_len(), feed_before);
    let status = poll_until("the errors in the peer status", || async {
        let status = peer_status(&north, "south").await?;
        Ok(
            (status["errors"].as_u64() >= Some(4) && status["connected"] == false)
                .then_some(status),
        )
    })
    .await?;
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|error| error.contains("could not be applied")),
        "{status}"
    );
    let (status, body) = north.get("/v1/entities/appointment/1").await?;
    assert_eq!(
        (status.as_u16(), &body["data"]["date"]),
        (200, &json!("2026-12-01"))
    );
    north.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_4_a_connector_on_one_site_gets_changes_written_on_another_exactly_once() -> Result<()>
{
    let fake = FakeApi::start().await?;
    fake.keep_state("apptId");
    let connector = format!(
        r#"
[[connectors]]
name = "scheduler"
kind = "appointment"
id_field = "apptId"
url = "{}/appointments/sync"
timeout = "2s"
[connectors.fields]
scheduledDate = "date"
officeCode = "site.code"
[connectors.retry]
schedule = ["0s", "50ms", "100ms"]
jitter = 0.0
"#,
        fake.base
    );
    // Three sites, every pair linked: A accepts B and C, B accepts C; changes written on C
    // reach A directly and again through B.
    let a_toml = site_toml("a", &[("b", "tok-b"), ("c", "tok-c")], &[], "1s") + &connector;
    let a = TestServer::start_with(&a_toml).await?;
    let a_url = a.url("");
    let b = TestServer::start_with(&site_toml(
        "b",
        &[("c", "tok-cb")],
        &[dial("a", &a_url, "tok-b")],
        "1s",
    ))
    .await?;
    let b_url = b.url("");
    let c = TestServer::start_with(&site_toml(
        "c",
        &[],
        &[dial("a", &a_url, "tok-c"), dial("b", &b_url, "tok-cb")],
        "1s",
    ))
    .await?;

    c.patch(
        "/v1/entities/appointment/123",
        &json!({"date": "2026-12-01", "site": {"code": "N1"}, "notes": "internal"}),
    )
    .await?;
    fake.wait_for(CONVERGE, "the first delta", |received| !received.is_empty())
        .await?;
    c.patch(
        "/v1/entities/appointment/123",
        &json!({"date": "2026-12-02"}),
    )
    .await?;
    let bases = [a.url(""), b.url(""), c.url("")];
    let bases: Vec<&str> = bases.iter().map(String::as_str).collect();
    converged(a.client(), &bases, "appointment", CONVERGE).await?;
    poll_until("the scheduler to hold the new date", || async {
        let state = fake.state();
        let record = state.get("123").cloned().unwrap_or_default();
        Ok((record.get("scheduledDate") == Some(&json!("2026-12-02"))).then_some(()))
    })
    .await?;
    // Settle: the connector has read A's whole feed and has nothing pending.
    poll_until("the connector to settle", || async {
        let (_, status) = a.get("/v1/connectors/scheduler").await?;
        let settled = status["entities_pending"] == 0 && status["cursor"] == a.feed_len();
        Ok(settled.then_some(()))
    })
    .await?;
    let state = fake.state();
    let record = state
        .get("123")
        .context("the scheduler has the appointment")?;
    assert_eq!(
        json!(record),
        json!({"scheduledDate": "2026-12-02", "officeCode": "N1"})
    );
    // Once in effect: one delta per change on C, each sent once, never a repeat.
    let bodies: Vec<Value> = fake
        .acknowledged()
        .iter()
        .map(|request| request.json())
        .collect();
    assert_eq!(
        bodies,
        vec![
            json!({"apptId": "123", "scheduledDate": "2026-12-01", "officeCode": "N1"}),
            json!({"apptId": "123", "scheduledDate": "2026-12-02"}),
        ]
    );
    assert_eq!(fake.received().len(), 2);
    c.stop().await?;
    b.stop().await?;
    a.stop().await?;
    Ok(())
}

/// One acknowledged write in the multi-process test.
#[derive(Clone, Debug)]
struct Ack {
    id: String,
    field: String,
    value: u64,
    version: String,
}

/// Writes to `base` until `stop`, recording each 2xx; values grow per writer, so a later
/// acknowledged value never loses to an earlier one of the same field.
async fn write_until(
    client: reqwest::Client,
    base: String,
    writer: String,
    seed: u64,
    stop: Arc<Mutex<bool>>,
    acks: Arc<Mutex<Vec<Ack>>>,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut value = seed * 1_000_000;
    for _ in 0..10_000 {
        if *stop.lock().expect("no writer panics holding the lock") {
            return;
        }
        value += 1;
        let id = format!("e{}", rng.gen_range(0..40));
        // Each writer owns a field; every writer also fights over `shared`.
        let field = if rng.gen_bool(0.2) {
            "shared".to_string()
        } else {
            writer.clone()
        };
        let response = client
            .patch(format!("{base}/v1/entities/item/{id}"))
            .header("content-type", "application/merge-patch+json")
            .body(json!({ field.clone(): value }).to_string())
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        let Ok(response) = response else {
            // The site is down (killed): stop writing to it.
            return;
        };
        if !response.status().is_success() {
            return;
        }
        let Ok(body) = response.json::<Value>().await else {
            return;
        };
        acks.lock().expect("lock").push(Ack {
            id,
            field,
            value,
            version: body["version"].as_str().unwrap_or_default().to_string(),
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs writers on each base for `duration`, then stops them.
async fn write_for(
    client: &reqwest::Client,
    bases: &[(&str, &str)],
    duration: Duration,
    seed: &mut u64,
    acks: &Arc<Mutex<Vec<Ack>>>,
) -> Result<()> {
    let stop = Arc::new(Mutex::new(false));
    let mut writers = Vec::new();
    for (site, base) in bases {
        for index in 0..2 {
            *seed += 1;
            writers.push(tokio::spawn(write_until(
                client.clone(),
                base.to_string(),
                format!("{site}{index}"),
                *seed,
                stop.clone(),
                acks.clone(),
            )));
        }
    }
    tokio::time::sleep(duration).await;
    *stop.lock().expect("lock") = true;
    for writer in writers {
        within("a writer to stop", writer).await??;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue_4_three_processes_converge_after_one_is_killed_and_restarted() -> Result<()> {
    within_for(
        Duration::from_secs(55),
        "the three-process test",
        three_processes(),
    )
    .await?
}

async fn three_processes() -> Result<()> {
    let binary = release_binary()?;
    let root = tempfile::tempdir()?;
    let ports = [free_port()?, free_port()?, free_port()?];
    let urls: Vec<String> = ports
        .iter()
        .map(|port| format!("http://127.0.0.1:{port}"))
        .collect();
    // A ring: a dials b, b dials c, c dials a; with three sites every pair is linked.
    let names = ["a", "b", "c"];
    let mut configs = Vec::new();
    for index in 0..3 {
        let next = (index + 1) % 3;
        let previous = (index + 2) % 3;
        let token_in = format!("tok-{}", names[previous]);
        let token_out = format!("tok-{}", names[index]);
        let toml = site_toml(
            names[index],
            &[(names[previous], token_in.as_str())],
            &[dial(names[next], &urls[next], &token_out)],
            "500ms",
        );
        let path = root.path().join(format!("{}.toml", names[index]));
        std::fs::write(&path, toml)?;
        configs.push(path);
    }
    let data: Vec<_> = names
        .iter()
        .map(|name| root.path().join(format!("{name}-data")))
        .collect();
    let mut processes = Vec::new();
    for index in 0..3 {
        processes.push(Some(
            Process::start(&binary, &configs[index], &data[index], ports[index]).await?,
        ));
    }
    let client = reqwest::Client::new();
    let acks = Arc::new(Mutex::new(Vec::new()));
    let mut seed = 0u64;
    let all = [
        ("a", urls[0].as_str()),
        ("b", urls[1].as_str()),
        ("c", urls[2].as_str()),
    ];

    write_for(&client, &all, Duration::from_millis(1500), &mut seed, &acks).await?;
    // b dies mid-stream; a and c keep writing.
    let b = processes[1].take().context("b runs")?;
    b.kill().await?;
    let survivors = [all[0], all[2]];
    write_for(
        &client,
        &survivors,
        Duration::from_millis(1500),
        &mut seed,
        &acks,
    )
    .await?;
    processes[1] = Some(Process::start(&binary, &configs[1], &data[1], ports[1]).await?);
    write_for(&client, &all, Duration::from_millis(500), &mut seed, &acks).await?;

    // Healed: within 10 s every site holds the same versions of every entity.
    let bases: Vec<&str> = urls.iter().map(String::as_str).collect();
    let healed = Instant::now();
    let entities = converged(&client, &bases, "item", CONVERGE).await?;
    let took = healed.elapsed();
    let acks = acks.lock().expect("lock").clone();
    assert!(
        acks.len() > 100,
        "only {} writes were acknowledged",
        acks.len()
    );

    // No acknowledged write is lost anywhere: each site knows every acknowledged version, and
    // each writer's own field holds at least its last acknowledged value.
    let mut newest: BTreeMap<(String, String), u64> = BTreeMap::new();
    for ack in &acks {
        if ack.field != "shared" {
            let entry = newest
                .entry((ack.id.clone(), ack.field.clone()))
                .or_default();
            *entry = (*entry).max(ack.value);
        }
    }
    for ((id, field), value) in &newest {
        let (_, data) = entities
            .get(id)
            .with_context(|| format!("item/{id} is missing"))?;
        let stored = data[field.as_str()].as_u64().unwrap_or(0);
        assert!(
            stored >= *value,
            "item/{id}.{field} is {stored}, but {value} was acknowledged"
        );
    }
    for base in &bases {
        for ack in acks.iter().step_by(7) {
            let response = client
                .get(format!(
                    "{base}/v1/entities/item/{}?at={}",
                    ack.id, ack.version
                ))
                .timeout(Duration::from_secs(5))
                .send()
                .await?;
            assert_eq!(
                response.status(),
                200,
                "{base} does not know acknowledged version {} of item/{}",
                ack.version,
                ack.id
            );
        }
    }
    eprintln!(
        "three sites: {} acknowledged writes, {} entities, converged {took:?} after healing",
        acks.len(),
        entities.len()
    );
    for process in processes.into_iter().flatten() {
        process.kill().await?;
    }
    Ok(())
}

/// PUTs `item/<prefix><n>` for `n` in `0..count` at `base`.
async fn put_items(client: &reqwest::Client, base: &str, prefix: &str, count: u64) -> Result<()> {
    for n in 0..count {
        let response = client
            .put(format!("{base}/v1/entities/item/{prefix}{n}"))
            .json(&json!({ "n": n }))
            .timeout(Duration::from_secs(5))
            .send()
            .await?;
        ensure!(
            response.status().is_success(),
            "{prefix}{n}: {}",
            response.status()
        );
    }
    Ok(())
}

/// A site restored from a backup has lost what it wrote since, and writes new rows under the
/// feed numbers its peer had already consumed. Both are healed: its peer announces the lost
/// changes back (the site's cursor is behind what it acknowledged there), and the site
/// announces its feed again from what the peer had acknowledged here (the peer's cursor is past
/// that), so the new rows are not skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_4_a_site_restored_from_a_backup_gets_back_what_it_lost_and_sends_what_it_wrote(
) -> Result<()> {
    within_for(
        Duration::from_secs(55),
        "the backup test",
        restored_from_a_backup(),
    )
    .await?
}

async fn restored_from_a_backup() -> Result<()> {
    let binary = release_binary()?;
    let root = tempfile::tempdir()?;
    let (north_port, south_port) = (free_port()?, free_port()?);
    let (north_url, south_url) = (
        format!("http://127.0.0.1:{north_port}"),
        format!("http://127.0.0.1:{south_port}"),
    );
    // North dials south; north alone (no peer) is the same site cut off.
    let north_linked = root.path().join("north.toml");
    let north_alone = root.path().join("north-alone.toml");
    let south_config = root.path().join("south.toml");
    std::fs::write(
        &north_linked,
        site_toml(
            "north",
            &[],
            &[dial("south", &south_url, "tok-north")],
            "200ms",
        ),
    )?;
    std::fs::write(&north_alone, site_toml("north", &[], &[], "200ms"))?;
    std::fs::write(
        &south_config,
        site_toml("south", &[("north", "tok-north")], &[], "200ms"),
    )?;
    let (north_data, south_data, backup) = (
        root.path().join("north-data"),
        root.path().join("south-data"),
        root.path().join("north-backup"),
    );
    let client = reqwest::Client::new();
    let bases = [north_url.as_str(), south_url.as_str()];
    let south = Process::start(&binary, &south_config, &south_data, south_port).await?;
    let north = Process::start(&binary, &north_linked, &north_data, north_port).await?;
    put_items(&client, &north_url, "before", 10).await?;
    converged(&client, &bases, "item", CONVERGE).await?;

    // The backup: a copy of north's directory while it is stopped.
    north.kill().await?;
    copy_dir(&north_data, &backup)?;
    let north = Process::start(&binary, &north_linked, &north_data, north_port).await?;
    put_items(&client, &north_url, "lost", 10).await?;
    let before_restore = converged(&client, &bases, "item", CONVERGE).await?;
    ensure!(before_restore.len() == 20, "{} items", before_restore.len());

    // North is restored and, cut off, writes new rows under the numbers south has consumed.
    north.kill().await?;
    std::fs::remove_dir_all(&north_data)?;
    copy_dir(&backup, &north_data)?;
    let north = Process::start(&binary, &north_alone, &north_data, north_port).await?;
    put_items(&client, &north_url, "after", 15).await?;
    north.kill().await?;
    let north = Process::start(&binary, &north_linked, &north_data, north_port).await?;

    let healed = converged(&client, &bases, "item", CONVERGE).await?;
    let mut prefixes: BTreeMap<String, usize> = BTreeMap::new();
    for id in healed.keys() {
        let prefix = id.trim_end_matches(|c: char| c.is_ascii_digit());
        *prefixes.entry(prefix.to_string()).or_default() += 1;
    }
    let expected: BTreeMap<String, usize> = [("after", 15), ("before", 10), ("lost", 10)]
        .into_iter()
        .map(|(prefix, count)| (prefix.to_string(), count))
        .collect();
    assert_eq!(prefixes, expected);
    north.kill().await?;
    south.kill().await?;
    Ok(())
}

/// Copies a directory tree (a store's data directory) to `to`, which must not exist.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// One peer cannot take every accepted link slot: past `MAX_LINKS_PER_PEER` links its next
/// one is refused (503 `too_many_links`), while another peer still gets in; once one of its
/// links ends, it may open another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_4_one_peer_cannot_take_every_link() -> Result<()> {
    let north = TestServer::start_with(&site_toml(
        "north",
        &[("south", "tok-south"), ("west", "tok-west")],
        &[],
        "1s",
    ))
    .await?;
    let mut links = Vec::new();
    for _ in 0..replication::MAX_LINKS_PER_PEER {
        links.push(connect(&north).await?);
    }
    let refused = north.send(upgrade(&north, Some("tok-south"))).await?;
    assert!(refused.headers().contains_key("retry-after"));
    let body = expect_error(refused, 503, "too_many_links").await?;
    assert!(
        body["detail"].as_str().is_some_and(|d| d.contains("south")),
        "{body}"
    );

    let _west = within("west connecting", connect_as(&north, "tok-west")).await??;

    let mut ended = links.pop().context("a link")?;
    ended.close(None).await?;
    drop(ended);
    let _again = poll_until("south may link again", || async {
        Ok(connect_as(&north, "tok-south").await.ok())
    })
    .await?;
    north.stop().await?;
    Ok(())
}
