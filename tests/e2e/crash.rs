//! Crash safety: the release binary is killed with SIGKILL at random moments while concurrent
//! writers run; after every restart each write that got a 2xx is present and has a feed row.
//!
//! `issue_3_kill_9_loses_no_acknowledged_webhook_or_delivery_and_rekeys_nothing` does the same
//! with a connector delivering to a `FakeApi` and signed webhooks coming in.
//!
//! The binary is `target/release/lockstep`, which `.ci/run` builds before the tests
//! (`cargo build --release -p lockstep-cli`).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lockstep_tests::sites::release_binary;
use lockstep_tests::webhooks::{signed, unix_now, TEST_SECRET};
use lockstep_tests::{expect_error, within_for};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const CYCLES: usize = 5;
const WRITERS: usize = 16;

/// A running `lockstep serve` process and the address it listens on.
struct Process {
    child: Child,
    base: String,
}

async fn start(binary: &Path, data_dir: &Path) -> Result<Process> {
    start_with(binary, data_dir, &[]).await
}

async fn start_with(binary: &Path, data_dir: &Path, extra: &[&str]) -> Result<Process> {
    let mut command = Command::new(binary);
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(extra);
    spawn(command).await
}

/// Starts `command` (a `lockstep serve`, perhaps through a shell) and waits until it listens.
async fn spawn(mut command: Command) -> Result<Process> {
    let mut child = command
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting lockstep serve")?;
    let stderr = child.stderr.take().context("no stderr pipe")?;
    let mut lines = BufReader::new(stderr).lines();
    let address = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(address) = listening_address(&line) {
                return Ok(address);
            }
        }
        bail!("lockstep serve exited before it was listening")
    })
    .await
    .context("waiting for the listening line")??;
    // Keep draining stderr so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Process {
        child,
        base: format!("http://{address}"),
    })
}

/// The `127.0.0.1:<port>` in the server's "listening on" log line.
fn listening_address(line: &str) -> Option<String> {
    if !line.contains("listening") {
        return None;
    }
    let start = line.find("127.0.0.1:")?;
    let rest = &line[start + "127.0.0.1:".len()..];
    let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
    match port.parse::<u16>() {
        Ok(port) if port != 0 => Some(format!("127.0.0.1:{port}")),
        _ => None,
    }
}

/// One acknowledged write: the entity, the value this writer set, and the version the server returned.
#[derive(Clone, Debug)]
struct Ack {
    id: String,
    field: String,
    value: u64,
    version: String,
}

async fn writer(
    client: reqwest::Client,
    base: String,
    writer_index: usize,
    next_value: u64,
    acks: Arc<Mutex<Vec<Ack>>>,
) -> u64 {
    let mut value = next_value;
    loop {
        value += 1;
        // Half the writes go to an entity of their own, half to a field of an entity shared by all writers.
        let (id, field) = if value.is_multiple_of(2) {
            (format!("w{writer_index}-{value}"), "value".to_string())
        } else {
            ("shared".to_string(), format!("w{writer_index}"))
        };
        let url = format!("{base}/v1/entities/crash/{id}");
        let response = client
            .patch(&url)
            .header("content-type", "application/merge-patch+json")
            .body(json!({ field.clone(): value }).to_string())
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        let Ok(response) = response else {
            return value;
        };
        if !response.status().is_success() {
            return value;
        }
        let Ok(body) = response.json::<Value>().await else {
            return value;
        };
        let version = body["version"].as_str().unwrap_or_default().to_string();
        acks.lock()
            .expect("no writer panics while holding the lock")
            .push(Ack {
                id,
                field,
                value,
                version,
            });
    }
}

async fn feed_versions(client: &reqwest::Client, base: &str) -> Result<HashSet<(String, String)>> {
    let mut seen = HashSet::new();
    let mut since = 0u64;
    loop {
        let body = client
            .get(format!("{base}/v1/changes?since={since}&limit=1000"))
            .timeout(Duration::from_secs(30))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        let mut rows = 0;
        for line in body.lines().filter(|line| !line.trim().is_empty()) {
            let row: Value = serde_json::from_str(line).context("a feed line is JSON")?;
            since = row["seq"].as_u64().context("a feed row has a seq")?;
            seen.insert((
                row["id"].as_str().unwrap_or_default().to_string(),
                row["version"].as_str().unwrap_or_default().to_string(),
            ));
            rows += 1;
        }
        if rows == 0 {
            return Ok(seen);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue_2_kill_9_loses_no_acknowledged_write() -> Result<()> {
    within_for(Duration::from_secs(240), "the crash test", crash_cycles()).await?
}

async fn crash_cycles() -> Result<()> {
    let binary = release_binary()?;
    let data = tempfile::tempdir()?;
    let client = reqwest::Client::builder().build()?;
    let acks = Arc::new(Mutex::new(Vec::new()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x0010_c57e);
    let mut next_values = [0u64; WRITERS];
    for cycle in 0..CYCLES {
        let mut process = start(&binary, data.path()).await?;
        let before = acks.lock().expect("lock").len();
        let tasks = spawn_each(WRITERS, |index| {
            writer(
                client.clone(),
                process.base.clone(),
                index,
                // Leave a gap so a value that was in flight at the kill is never reused.
                next_values[index] + 10,
                acks.clone(),
            )
        });
        let run_for = Duration::from_millis(rng.gen_range(300..1500));
        let started = Instant::now();
        while started.elapsed() < run_for {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        process.child.start_kill().context("sending SIGKILL")?;
        process.child.wait().await?;
        for (index, task) in tasks.into_iter().enumerate() {
            next_values[index] = tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .context("a writer did not notice the kill")??;
        }
        let after = acks.lock().expect("lock").len();
        assert!(after > before, "cycle {cycle} acknowledged no write at all");
    }

    let process = start(&binary, data.path()).await?;
    let acks = acks.lock().expect("lock").clone();
    let feed = feed_versions(&client, &process.base).await?;
    // The newest acknowledged value per (entity, field): earlier ones may be overwritten by later ones.
    let mut newest: BTreeMap<(String, String), u64> = BTreeMap::new();
    for ack in &acks {
        assert!(
            feed.contains(&(ack.id.clone(), ack.version.clone())),
            "acknowledged write {ack:?} has no feed row"
        );
        let entry = newest
            .entry((ack.id.clone(), ack.field.clone()))
            .or_default();
        *entry = (*entry).max(ack.value);
    }
    for ((id, field), value) in &newest {
        let body = entity(&client, &process.base, "crash", id).await?;
        let stored = body["data"][field.as_str()]
            .as_u64()
            .with_context(|| format!("crash/{id} lost field {field}: {body}"))?;
        // A write that was in flight at the kill may have landed after the last acknowledged one.
        assert!(
            stored >= *value,
            "crash/{id}.{field} is {stored}, but {value} was acknowledged"
        );
    }
    assert!(
        acks.len() > 100,
        "only {} writes were acknowledged",
        acks.len()
    );
    Ok(())
}

/// Writes increasing values to a few entities until the process dies; returns the last value
/// acknowledged per entity.
async fn connector_writer(
    client: reqwest::Client,
    base: String,
    writer_index: usize,
    start: u64,
) -> BTreeMap<String, u64> {
    let mut acknowledged = BTreeMap::new();
    let mut value = start;
    loop {
        value += 1;
        let id = format!("c{writer_index}-{}", value % 3);
        let response = client
            .patch(format!("{base}/v1/entities/appointment/{id}"))
            .header("content-type", "application/merge-patch+json")
            .body(json!({ "date": format!("v{value}") }).to_string())
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        match response {
            Ok(response) if response.status().is_success() => {
                acknowledged.insert(id, value);
            }
            _ => return acknowledged,
        }
    }
}

/// `GET /v1/entities/{kind}/{id}` as JSON; an error unless it is 2xx.
async fn entity(client: &reqwest::Client, base: &str, kind: &str, id: &str) -> Result<Value> {
    Ok(client
        .get(format!("{base}/v1/entities/{kind}/{id}"))
        .timeout(Duration::from_secs(10))
        .send()
        .await?
        .error_for_status()
        .with_context(|| format!("reading acknowledged entity {kind}/{id}"))?
        .json()
        .await?)
}

/// Spawns `count` tasks, the `index`-th running `task(index)`.
fn spawn_each<F>(count: usize, task: impl Fn(usize) -> F) -> Vec<tokio::task::JoinHandle<F::Output>>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    (0..count).map(|index| tokio::spawn(task(index))).collect()
}

/// One acknowledged webhook: its id, its body and the version the server answered with.
#[derive(Clone, Debug)]
struct WebhookAck {
    webhook_id: String,
    body: Vec<u8>,
    version: String,
}

/// Posts signed webhooks, each for an entity of its own, until the process dies; returns those
/// acknowledged.
async fn webhook_writer(
    client: reqwest::Client,
    base: String,
    writer_index: usize,
    start: u64,
) -> Result<Vec<WebhookAck>> {
    let secret = connectors::WebhookSecret::parse(TEST_SECRET)?;
    let mut acknowledged = Vec::new();
    let mut value = start;
    loop {
        value += 1;
        let webhook_id = format!("msg-{writer_index}-{value}");
        let body = json!({"apptId": format!("h{writer_index}-{value}"), "scheduledDate": format!("h{value}")})
            .to_string()
            .into_bytes();
        let Ok(response) = post_webhook(&client, &base, &secret, &webhook_id, &body).await else {
            return Ok(acknowledged);
        };
        if !response.status().is_success() {
            return Ok(acknowledged);
        }
        let Ok(answer) = response.json::<Value>().await else {
            return Ok(acknowledged);
        };
        let version = answer["version"]
            .as_str()
            .with_context(|| {
                format!("webhook {webhook_id} was acknowledged without a version: {answer}")
            })?
            .to_string();
        acknowledged.push(WebhookAck {
            webhook_id,
            body,
            version,
        });
    }
}

/// Writes `dir/lockstep.toml` with one connector, `scheduler`, verifying webhooks with
/// `TEST_SECRET`, whose other keys and tables are `rest`; returns its path.
fn scheduler_config(dir: &Path, rest: &str) -> Result<std::path::PathBuf> {
    let config = dir.join("lockstep.toml");
    std::fs::write(
        &config,
        format!("[[connectors]]\nname = \"scheduler\"\nwebhook_secret = \"{TEST_SECRET}\"\n{rest}"),
    )?;
    Ok(config)
}

async fn post_webhook(
    client: &reqwest::Client,
    base: &str,
    secret: &connectors::WebhookSecret,
    webhook_id: &str,
    body: &[u8],
) -> reqwest::Result<reqwest::Response> {
    let request = client.post(format!("{base}/v1/connectors/scheduler/webhook"));
    signed(request, secret, webhook_id, unix_now(), body.to_vec())
        .timeout(Duration::from_secs(10))
        .send()
        .await
}

/// kill -9 while local edits are delivered and webhooks come in: no acknowledged edit or
/// webhook is lost, a webhook's idempotency record and shadow survive with it (a repeat is
/// answered as before, and its values are never sent back), and no acknowledged delta is sent
/// again under a new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue_3_kill_9_loses_no_acknowledged_webhook_or_delivery_and_rekeys_nothing() -> Result<()>
{
    within_for(
        Duration::from_secs(240),
        "the connector crash test",
        connector_crash_cycles(),
    )
    .await?
}

async fn connector_crash_cycles() -> Result<()> {
    use lockstep_tests::fake_api::{Behavior, FakeApi};
    let binary = release_binary()?;
    let data = tempfile::tempdir()?;
    let fake = FakeApi::start().await?;
    fake.keep_state("apptId");
    // Slow answers keep deliveries in flight when the kill comes.
    fake.set(Behavior::Stall(Duration::from_millis(150)));
    let config = scheduler_config(
        data.path(),
        &format!(
            r#"kind = "appointment"
id_field = "apptId"
url = "{}/sync"
timeout = "2s"
[connectors.fields]
scheduledDate = "date"
[connectors.retry]
schedule = ["0s", "50ms", "100ms"]
jitter = 0.0
"#,
            fake.base
        ),
    )?;
    let config_arg = config.to_str().context("a UTF-8 path")?.to_string();
    let extra = ["--config", config_arg.as_str()];
    let client = reqwest::Client::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x00c0_ffee);
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    let mut webhooks: Vec<WebhookAck> = Vec::new();
    let mut next_value = 0u64;
    for _ in 0..3 {
        let mut process = start_with(&binary, &data.path().join("data"), &extra).await?;
        let base = &process.base;
        let writers = spawn_each(4, |index| {
            connector_writer(client.clone(), base.clone(), index, next_value)
        });
        let senders = spawn_each(2, |index| {
            webhook_writer(client.clone(), base.clone(), index, next_value)
        });
        let run_for = Duration::from_millis(rng.gen_range(300..1200));
        tokio::time::sleep(run_for).await;
        process.child.start_kill().context("sending SIGKILL")?;
        process.child.wait().await?;
        for writer in writers {
            let acknowledged = tokio::time::timeout(Duration::from_secs(30), writer).await??;
            for (id, value) in acknowledged {
                let entry = expected.entry(id).or_default();
                *entry = (*entry).max(value);
            }
        }
        for sender in senders {
            webhooks.extend(tokio::time::timeout(Duration::from_secs(30), sender).await???);
        }
        // Values never repeat, so equal bodies can only be the same delta.
        next_value += 1_000_000;
    }
    assert!(
        !fake.received().is_empty(),
        "no delivery was under way during the kills"
    );
    assert!(!webhooks.is_empty(), "no webhook was acknowledged");
    fake.set(Behavior::Status(200));
    let process = start_with(&binary, &data.path().join("data"), &extra).await?;
    // Every acknowledged webhook is there, and its repeat is answered from its idempotency
    // record with the version it was first answered with, changing nothing.
    let secret = connectors::WebhookSecret::parse(TEST_SECRET)?;
    for ack in &webhooks {
        let sent: Value = serde_json::from_slice(&ack.body)?;
        let id = sent["apptId"].as_str().context("an id")?;
        let body = entity(&client, &process.base, "appointment", id).await?;
        assert_eq!(
            body["data"]["date"], sent["scheduledDate"],
            "acknowledged webhook {ack:?} was lost: {body}"
        );
        let repeat: Value =
            post_webhook(&client, &process.base, &secret, &ack.webhook_id, &ack.body)
                .await?
                .error_for_status()?
                .json()
                .await?;
        assert_eq!(repeat["version"], json!(ack.version), "{ack:?}: {repeat}");
        assert_eq!(repeat["status"], "applied", "{ack:?}: {repeat}");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        // Every entity ends with its current value; an in-flight write may have landed after the
        // last acknowledged one, so compare with the server rather than with `expected`.
        let mut settled = true;
        let state = fake.state();
        for (id, value) in &expected {
            let body = entity(&client, &process.base, "appointment", id).await?;
            let current = body["data"]["date"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let number: u64 = current.trim_start_matches('v').parse().unwrap_or(0);
            assert!(
                number >= *value,
                "appointment/{id} lost an acknowledged write: {current} < v{value}"
            );
            if state.get(id).and_then(|record| record.get("scheduledDate")) != Some(&json!(current))
            {
                settled = false;
            }
        }
        if settled {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the scheduler did not converge: {state:?}, expected {expected:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A webhook's values were never sent back to the system that sent them.
    for request in fake.received() {
        let sent_to = request.json()["apptId"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            !sent_to.starts_with('h'),
            "a webhook's entity was sent back: {request:?}"
        );
    }
    let mut keys_by_body: BTreeMap<Vec<u8>, HashSet<String>> = BTreeMap::new();
    for request in fake.acknowledged() {
        keys_by_body
            .entry(request.body.clone())
            .or_default()
            .insert(
                request
                    .header("idempotency-key")
                    .unwrap_or_default()
                    .to_string(),
            );
    }
    for (body, keys) in keys_by_body {
        assert_eq!(
            keys.len(),
            1,
            "{} was acknowledged under several keys: {keys:?}",
            String::from_utf8_lossy(&body)
        );
    }
    // The CLI reports the connector over the admin API.
    let output = tokio::process::Command::new(&binary)
        .args(["connectors", "--url", &process.base, "status", "scheduler"])
        .output()
        .await?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status: Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(status["name"], "scheduler");
    assert_eq!(status["entities_pending"], 0, "{status}");
    Ok(())
}

/// A server whose disk fills up (here: its files may not grow past 2 MiB) refuses writes from
/// the first failed flush on, with 503 `store_failed` and no `Retry-After` (only a restart
/// helps), and answers reads with 200, or 503 `store_failed` for pages sled will not read back,
/// never 500. The writes here are signed webhooks: the one whose flush failed is refused again
/// when it is sent again (its record is in sled, not on disk, and must not be answered as a
/// repeat), and so is an id reused with another body (not 409, which senders do not retry).
/// Nothing it acknowledged is lost: restarted with room again, every acknowledged write is
/// there, the refused webhook is taken, and it takes writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_writes_and_loses_no_acknowledged_one() -> Result<()> {
    let binary = release_binary()?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let config = scheduler_config(
        dir.path(),
        r#"kind = "doc"
id_field = "id"
[connectors.fields]
text = "text"
n = "n"
"#,
    )?;
    // `ulimit -f 4096` (blocks of 512 bytes in a POSIX shell) makes a write past 2 MiB fail
    // (EFBIG) as a full disk would (ENOSPC); the signal that would otherwise kill the process
    // for it is ignored, which `exec` keeps.
    let mut limited = Command::new("sh");
    limited
        .arg("-c")
        .arg(r#"ulimit -f 4096 && trap '' XFSZ && exec "$0" serve --listen 127.0.0.1:0 --data-dir "$1" --config "$2""#)
        .arg(&binary)
        .arg(&data)
        .arg(&config);
    let server = spawn(limited).await?;
    let client = reqwest::Client::new();
    let secret = connectors::WebhookSecret::parse(TEST_SECRET)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut acked: Vec<(String, u64)> = Vec::new();
    let mut refused = None;
    for n in 0..2_000u64 {
        // Random text, which neither Automerge nor sled can compress.
        let text: String = (0..16_000)
            .map(|_| char::from(rng.gen_range(b'a'..=b'z')))
            .collect();
        let id = format!("d{n}");
        let body = json!({"id": id, "text": text, "n": n}).to_string();
        let webhook_id = format!("msg-{n}");
        let response =
            post_webhook(&client, &server.base, &secret, &webhook_id, body.as_bytes()).await?;
        if response.status().is_success() {
            acked.push((id, n));
        } else {
            refused = Some((response, webhook_id, body.into_bytes()));
            break;
        }
    }
    let (refused, webhook_id, refused_body) = refused.context("2 MiB never filled up")?;
    assert!(
        refused.headers().get("retry-after").is_none(),
        "{:?}",
        refused.headers()
    );
    let body = expect_error(refused, 503, "store_failed").await?;
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|detail| detail.contains("until the server is restarted")),
        "{body}"
    );
    assert!(
        acked.len() > 10,
        "only {} writes before the disk was full",
        acked.len()
    );
    // The refused webhook, sent again, is refused again rather than answered as a repeat, and
    // an acknowledged id with another body is refused as the store's failure, not as a reuse.
    expect_error(
        post_webhook(&client, &server.base, &secret, &webhook_id, &refused_body).await?,
        503,
        "store_failed",
    )
    .await?;
    expect_error(
        post_webhook(
            &client,
            &server.base,
            &secret,
            "msg-0",
            br#"{"id":"d0","n":-1}"#,
        )
        .await?,
        503,
        "store_failed",
    )
    .await?;
    // Later writes are refused too, /readyz says so, and reads go on.
    let patch = |base: &str, id: &str, body: &'static str| {
        client
            .patch(format!("{base}/v1/entities/doc/{id}"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    expect_error(
        patch(&server.base, "d0", r#"{"more": 1}"#).await?,
        503,
        "store_failed",
    )
    .await?;
    let ready = client.get(format!("{}/readyz", server.base)).send().await?;
    expect_error(ready, 503, "store_failed").await?;
    // Reads go on, except of pages written since the last flush that worked, which sled will not
    // read back: those are 503 `store_failed` too, never a 500. `d0` was taken out of the cache
    // by the refused PATCH, so this read goes to sled.
    for id in ["d0", "d1"] {
        let read = client
            .get(format!("{}/v1/entities/doc/{id}", server.base))
            .send()
            .await?;
        if read.status() != 200 {
            expect_error(read, 503, "store_failed").await?;
        }
    }
    let mut child = server.child;
    child.kill().await?;

    let config = config.to_string_lossy().into_owned();
    let server = start_with(&binary, &data, &["--config", &config]).await?;
    for (id, n) in &acked {
        let response = client
            .get(format!("{}/v1/entities/doc/{id}", server.base))
            .send()
            .await?;
        assert_eq!(response.status(), 200, "acknowledged {id} is missing");
        let entity: Value = response.json().await?;
        assert_eq!(entity["data"]["n"], *n, "{id}");
    }
    let after = patch(&server.base, "after", r#"{"room": true}"#).await?;
    assert_eq!(after.status(), 201);
    // The webhook the failure refused is taken now that the sender retries it.
    let retried = post_webhook(&client, &server.base, &secret, &webhook_id, &refused_body).await?;
    assert_eq!(retried.status(), 200, "{}", retried.text().await?);
    Ok(())
}
