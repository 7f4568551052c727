//! The connector model test: random sequences of local edits, webhooks (including duplicates and
//! stale ones), external failures and restarts, against a `FakeApi` that keeps its own records.
//!
//! Invariants at the end: the external system holds exactly the mapped fields of every entity,
//! and it was never sent a value it already held (no echo). One exception is allowed, and
//! tracked exactly: while the system fails, it may set on its own the very value a local edit's
//! delivery is still retrying, and a retry already on its way then carries it once more.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use connectors::{
    validate_all, ConnectorConfig, Connectors, WebhookOutcome, WebhookRequest, WebhookSecret,
};
use futures::FutureExt;
use lockstep_tests::fake_api::{Behavior, FakeApi};
use lockstep_tests::webhooks::{unix_now, TEST_SECRET};
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use store::{EntityKey, Origin, Store, StoreConfig, WriteOptions};
use tokio_util::sync::CancellationToken;

const IDS: [&str; 3] = ["1", "2", "3"];

#[derive(Clone, Debug)]
enum Op {
    /// A local edit of one entity field (`None` removes it).
    Local {
        id: usize,
        field: usize,
        value: Option<u8>,
    },
    /// The external system changes a field and sends the webhook.
    Webhook {
        id: usize,
        field: usize,
        value: Option<u8>,
    },
    /// An earlier webhook is sent again (same id, same body): the one this many from the last.
    Duplicate(usize),
    /// A webhook whose `updatedAt` is older than the last one applied.
    Stale { id: usize, field: usize, value: u8 },
    /// The external system answers 500 until `Recover`.
    Fail,
    /// The external system answers 200 again.
    Recover,
    /// Stop the workers, close the store, reopen both.
    Restart,
}

/// (entity path, external name) of the mapped fields.
const FIELDS: [(&str, &str); 3] = [
    ("date", "scheduledDate"),
    ("site.code", "officeCode"),
    ("slot", "slot"),
];

fn op() -> impl Strategy<Value = Op> {
    let value = proptest::option::weighted(0.8, 0u8..6);
    prop_oneof![
        4 => (0..IDS.len(), 0..FIELDS.len(), value.clone()).prop_map(|(id, field, value)| Op::Local { id, field, value }),
        4 => (0..IDS.len(), 0..FIELDS.len(), value).prop_map(|(id, field, value)| Op::Webhook { id, field, value }),
        1 => (0usize..4).prop_map(Op::Duplicate),
        1 => (0..IDS.len(), 0..FIELDS.len(), 0u8..6).prop_map(|(id, field, value)| Op::Stale { id, field, value }),
        1 => Just(Op::Fail),
        1 => Just(Op::Recover),
        1 => Just(Op::Restart),
    ]
}

fn entity_value(field: usize, value: u8) -> Value {
    match field {
        0 => json!(format!("2026-12-0{}", value + 1)),
        1 => json!(format!("N{value}")),
        _ => json!(i64::from(value)),
    }
}

fn external_value(field: usize, value: u8) -> Value {
    match field {
        2 => json!(value.to_string()),
        _ => entity_value(field, value),
    }
}

fn config(url: &str) -> Result<ConnectorConfig> {
    let text = format!(
        r#"
        name = "scheduler"
        kind = "appointment"
        id_field = "apptId"
        url = "{url}/sync"
        signing_secret = "{TEST_SECRET}"
        webhook_secret = "{TEST_SECRET}"
        version_field = "updatedAt"
        # Two ids in the in-memory index, the rest kept under their hash: both kinds of record
        # are looked up by the duplicates, across restarts.
        dedupe_index_ids = 2
        timeout = "2s"
        [fields]
        scheduledDate = "date"
        officeCode = "site.code"
        slot = {{ field = "slot", entity = "number", external = "string" }}
        [retry]
        schedule = ["0s", "20ms", "50ms"]
        jitter = 0.0
        "#
    );
    Ok(toml::from_str(&text)?)
}

struct Running {
    store: Store,
    connectors: Connectors,
    shutdown: CancellationToken,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

async fn start(dir: &std::path::Path, config: &ConnectorConfig) -> Result<Running> {
    let store = Store::open(StoreConfig::new(dir))?;
    let connectors = Connectors::new(
        store.clone(),
        validate_all(std::slice::from_ref(config), &BTreeMap::new())?,
    )?;
    let shutdown = CancellationToken::new();
    let workers = connectors
        .workers(shutdown.clone())
        .into_iter()
        .map(|(_, worker)| tokio::spawn(worker))
        .collect();
    Ok(Running {
        store,
        connectors,
        shutdown,
        workers,
    })
}

async fn stop(running: Running) -> Result<()> {
    running.shutdown.cancel();
    for worker in running.workers {
        tokio::time::timeout(Duration::from_secs(10), worker)
            .await
            .context("a worker did not stop")??;
    }
    let Running {
        store, connectors, ..
    } = running;
    drop(connectors);
    tokio::task::spawn_blocking(move || store.close()).await??;
    Ok(())
}

async fn send_webhook(running: &Running, webhook_id: &str, body: &[u8]) -> Result<Value> {
    Ok(deliver_webhook(running, webhook_id, body).await?.response)
}

/// Signs `body` as webhook `webhook_id` and hands it to the connector, as the HTTP route does.
async fn deliver_webhook(
    running: &Running,
    webhook_id: &str,
    body: &[u8],
) -> Result<WebhookOutcome> {
    let secret = WebhookSecret::parse(TEST_SECRET)?;
    let now = unix_now();
    let signature = secret.sign(webhook_id, now, body);
    let timestamp = now.to_string();
    let outcome = running
        .connectors
        .receive_webhook(
            "scheduler",
            WebhookRequest {
                id: Some(webhook_id),
                timestamp: Some(&timestamp),
                signature: Some(&signature),
                body,
            },
        )
        .await
        .with_context(|| format!("webhook {webhook_id} was refused"))?;
    Ok(outcome)
}

/// Waits until the connector has nothing pending and has read the whole feed.
async fn quiesce(running: &Running) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = running.connectors.status("scheduler").await?;
        if status.entities_pending == 0 && status.cursor == running.store.last_seq() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the connector did not settle: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn run_case(ops: Vec<Op>) -> Result<()> {
    let fake = FakeApi::start().await?;
    fake.keep_state("apptId");
    let config = config(&fake.base)?;
    let dir = tempfile::tempdir()?;
    let mut running = Some(start(dir.path(), &config).await?);
    let origin = WriteOptions::new(Origin::local("model")?);
    let mut webhooks: Vec<(String, Vec<u8>)> = Vec::new();
    let mut counter = 0u64;
    let mut failing = false;
    // Local edits made while the system fails, which their deliveries keep retrying, and the
    // values the system then set on its own that equal one of them: a retry already on its way
    // when the system set the value cannot know it, and carries it once more. That is a
    // coincidence of two writers, not an echo of the system's own value.
    let mut unsent: BTreeMap<(usize, usize), Option<u8>> = BTreeMap::new();
    let mut coincidences: Vec<(String, String, Value)> = Vec::new();
    for op in ops {
        let current = running.as_ref().context("running")?;
        counter += 1;
        match op {
            Op::Local { id, field, value } => {
                if failing {
                    unsent.insert((id, field), value);
                }
                let (path, _) = FIELDS[field];
                let mut patch = Map::new();
                let leaf = value.map_or(Value::Null, |value| entity_value(field, value));
                match path.split_once('.') {
                    Some((outer, inner)) => {
                        patch.insert(outer.into(), json!({ inner: leaf }));
                    }
                    None => {
                        patch.insert(path.into(), leaf);
                    }
                }
                let key = EntityKey::new("appointment", IDS[id])?;
                let store = current.store.clone();
                let options = origin.clone();
                // A patch that would create an entity with no fields is refused; that is fine here.
                let _ = tokio::task::spawn_blocking(move || {
                    store.patch(&key, &Value::Object(patch), &options)
                })
                .await?;
            }
            Op::Webhook { id, field, value } => {
                let (_, external) = FIELDS[field];
                let external_value =
                    value.map_or(Value::Null, |value| external_value(field, value));
                if failing && unsent.get(&(id, field)) == Some(&value) {
                    coincidences.push((
                        IDS[id].to_string(),
                        external.to_string(),
                        external_value.clone(),
                    ));
                }
                // The system only sends webhooks for records it has, or creates with a value.
                fake.change_own(IDS[id], external, external_value.clone());
                let body = json!({ "apptId": IDS[id], external: external_value, "updatedAt": 1_000_000 + counter });
                let body = serde_json::to_vec(&body)?;
                let webhook_id = format!("msg_{counter}");
                let _ = send_webhook(current, &webhook_id, &body).await;
                webhooks.push((webhook_id, body));
            }
            Op::Duplicate(back) => {
                let earlier = webhooks.len().checked_sub(1 + back);
                if let Some((webhook_id, body)) = earlier.map(|index| &webhooks[index]) {
                    let before = current.store.last_seq();
                    let _ = send_webhook(current, webhook_id, body).await;
                    if current.store.last_seq() != before {
                        bail!("a duplicate webhook made a change");
                    }
                }
            }
            Op::Stale { id, field, value } => {
                let (_, external) = FIELDS[field];
                let body = serde_json::to_vec(
                    &json!({ "apptId": IDS[id], external: external_value(field, value), "updatedAt": 1 }),
                )?;
                let before = current.store.last_seq();
                let response = send_webhook(current, &format!("stale_{counter}"), &body).await;
                if let Ok(response) = response {
                    // Stale only once something newer was applied for this entity.
                    if response["status"] == "stale" && current.store.last_seq() != before {
                        bail!("a stale webhook made a change");
                    }
                    if response["status"] != "stale" {
                        fake.change_own(IDS[id], external, external_value(field, value));
                    }
                }
            }
            Op::Fail => {
                failing = true;
                fake.set(Behavior::Status(500));
            }
            Op::Recover => {
                failing = false;
                fake.set(Behavior::Status(200));
            }
            Op::Restart => {
                stop(running.take().context("running")?).await?;
                running = Some(start(dir.path(), &config).await?);
            }
        }
        if !failing {
            quiesce(running.as_ref().context("running")?).await?;
            unsent.clear();
        }
    }
    fake.set(Behavior::Status(200));
    let current = running.as_ref().context("running")?;
    quiesce(current).await?;
    // The system's records equal the mapped entities.
    let mapping = validate_all(std::slice::from_ref(&config), &BTreeMap::new())?
        .remove(0)
        .mapping;
    let system = fake.state();
    for id in IDS {
        let key = EntityKey::new("appointment", id)?;
        let data = current
            .store
            .get(&key)?
            .map(|entity| entity.data)
            .unwrap_or_default();
        let expected: BTreeMap<String, Value> = mapping.to_external(&data)?.into_iter().collect();
        let held = system.get(id).cloned().unwrap_or_default();
        if held != expected {
            bail!("system holds {held:?} for {id}, entity maps to {expected:?}");
        }
    }
    for request in fake.acknowledged() {
        let body = request.json();
        let id = body["apptId"].as_str().unwrap_or_default().to_string();
        let echoed: Vec<&String> = request
            .redundant_fields
            .iter()
            .filter(|field| {
                !coincidences.contains(&(
                    id.clone(),
                    (*field).clone(),
                    body[field.as_str()].clone(),
                ))
            })
            .collect();
        if !echoed.is_empty() {
            bail!("the system was sent values it already held: {echoed:?} in {body}");
        }
    }
    stop(running.take().context("running")?).await?;
    Ok(())
}

fn cases() -> u32 {
    // Each case runs real HTTP and sled; a tenth of the store tests' count is plenty in CI.
    std::env::var_os("LOCKSTEP_PROPTEST_CASES")
        .and_then(|value| value.to_str()?.parse::<u32>().ok())
        .map_or(16, |cases| (cases / 10).max(8))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn issue_3_connector_converges_without_echo(ops in proptest::collection::vec(op(), 1..25)) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
        let result = runtime.block_on(async { tokio::time::timeout(Duration::from_secs(120), run_case(ops)).await });
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(TestCaseError::fail(format!("{error:#}"))),
            Err(_) => return Err(TestCaseError::fail("the case took longer than 120 s")),
        }
    }
}

/// A webhook whose request goes away mid-flight (the client hangs up, the request times out)
/// still lands whole: its write, its inbox record and its shadow, with its locks held until then,
/// so that the sender's retry is a replay of it rather than a second change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_3_a_webhook_whose_request_is_dropped_still_lands_whole() -> Result<()> {
    let fake = FakeApi::start().await?;
    let dir = tempfile::tempdir()?;
    let running = start(dir.path(), &config(&fake.base)?).await?;
    // The request future is dropped as soon as it has to wait, long before the write is durable.
    // On a loaded machine the whole webhook may now and then be done by the time it is first
    // polled; then there was nothing to drop, and the next attempt uses another entity.
    let mut dropped = None;
    for attempt in 0..20 {
        let id = (7 + attempt).to_string();
        let body = json!({"apptId": id, "scheduledDate": "2027-03-04", "updatedAt": 1})
            .to_string()
            .into_bytes();
        let webhook_id = format!("msg-dropped-{attempt}");
        if send_webhook(&running, &webhook_id, &body)
            .now_or_never()
            .is_none()
        {
            dropped = Some((id, webhook_id, body, attempt));
            break;
        }
    }
    let (id, webhook_id, body, attempt) =
        dropped.context("every webhook finished within no time at all")?;
    let key = EntityKey::new("appointment", &id)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while running.store.get(&key)?.is_none() {
        if tokio::time::Instant::now() >= deadline {
            bail!("the dropped webhook never landed");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let retry = deliver_webhook(&running, &webhook_id, &body).await?;
    assert!(
        retry.replayed,
        "the retry applied the webhook again: {retry:?}"
    );
    assert_eq!(retry.response["status"], "applied");
    let history = running
        .store
        .history(&key)?
        .context("the entity has history")?;
    let from_connector = history
        .iter()
        .filter(|entry| entry.origin.as_deref() == Some("connector:scheduler"))
        .count();
    assert_eq!(
        from_connector, 1,
        "one change from the webhook: {history:?}"
    );
    // Counted once as applied (on its own task, though nobody waited for its answer), and its
    // retry once as a duplicate; the webhooks before it finished and count as applied too. The
    // retry waited for the dropped webhook's id lock, so its count is in by now.
    let status = running.connectors.status("scheduler").await?;
    assert_eq!(
        (
            status.webhooks_applied,
            status.webhooks_duplicate,
            status.webhooks_rejected
        ),
        (attempt + 1, 1, 0),
        "{status:?}"
    );
    stop(running).await
}
