//! Admin operations that read and write the connector's state record do so under its lock.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use store::{Edit, Origin, StoreConfig, WriteOptions, WriteRequest};

use super::*;
use crate::config::{validate_all, ConnectorConfig};

/// One connector, `scheduler`, with a URL nothing listens on.
pub(crate) fn scheduler() -> Vec<Connector> {
    #[derive(Deserialize)]
    struct File {
        connectors: Vec<ConnectorConfig>,
    }
    // Nothing listens on port 9 and no worker runs: only the admin operations act here.
    let text = r#"
[[connectors]]
name = "scheduler"
kind = "appointment"
id_field = "apptId"
url = "http://127.0.0.1:9/sync"
[connectors.fields]
scheduledDate = "date"
"#;
    let configs = toml::from_str::<File>(text).expect("parses").connectors;
    validate_all(&configs, &BTreeMap::new()).expect("valid")
}

/// A replay reads the state record (for its cursor), works out the entities, and writes the
/// state back; a pause that lands in between must not be undone by that write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_during_a_replay_is_kept() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = Store::open(StoreConfig::new(dir.path())).expect("the store opens");
    let origin = Origin::parse("local:test").expect("an origin");
    // Enough entities that a replay of the whole feed takes a while to work out.
    for chunk in 0..12 {
        let requests: Vec<WriteRequest> = (0..256)
            .map(|n| WriteRequest {
                key: EntityKey::new("appointment", format!("a{chunk}-{n}")).expect("a key"),
                edit: Edit::MergePatch(json!({"date": "2026-12-01"})),
                options: WriteOptions::new(origin.clone()),
            })
            .collect();
        let outcomes = store.write_many(&requests).expect("written").wait();
        for outcome in outcomes.expect("durable") {
            outcome.expect("each write succeeds");
        }
    }
    let connectors = Connectors::new(store.clone(), scheduler()).unwrap();
    for round in 0..20u64 {
        connectors.resume("scheduler").await.expect("resumed");
        let replaying = connectors.clone();
        let replay = tokio::spawn(async move {
            replaying
                .replay("scheduler", Replay::SinceSeq(Seq::ZERO))
                .await
        });
        // Pauses at different moments of the replay, from before it starts to well into it.
        tokio::time::sleep(Duration::from_micros(round * 500)).await;
        let paused = connectors.pause("scheduler").await.expect("paused");
        assert_eq!(paused.state, "paused", "round {round}");
        assert_eq!(
            replay.await.expect("the replay task").expect("replayed"),
            3072
        );
        let status = connectors.status("scheduler").await.expect("a status");
        assert_eq!(
            status.state, "paused",
            "the replay undid the pause in round {round}"
        );
    }
}

/// The worker forgets expired webhook ids as it starts, of both kinds, on a thread of its own,
/// and keeps the ids still within the retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_forgets_expired_webhook_ids_as_it_starts() {
    use crate::inbox::IdHash;
    use crate::state::InboxRecord;

    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = Store::open(StoreConfig::new(dir.path())).expect("the store opens");
    let records = Records::new(store.clone(), "scheduler");
    let at = |at_ms: u64| InboxRecord {
        body_sha256: "0".repeat(64),
        response: json!({"status": "applied"}),
        at_ms,
    };
    let now = store::now_ms();
    let (old_received, old_hashed, young) = (
        records.received_key(0, &IdHash::of("old")),
        records.inbox_key(&IdHash::of("old-by-hash")),
        records.received_key(1, &IdHash::of("young")),
    );
    records
        .write(vec![
            Records::put_inbox(old_received.clone(), &at(1_000)),
            Records::put_inbox(old_hashed.clone(), &at(1_000)),
            Records::put_inbox(young.clone(), &at(now)),
        ])
        .expect("written");
    let connectors = Connectors::new(store.clone(), scheduler()).unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    for (_, worker) in connectors.workers(shutdown.clone()) {
        tokio::spawn(worker);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while records.inbox(&old_received).unwrap().is_some()
        || records.inbox(&old_hashed).unwrap().is_some()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the expired ids were not forgotten"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(records.inbox(&young).unwrap(), Some(at(now)));
    shutdown.cancel();
}

/// A clean-up that fails (here the store no longer takes writes) is reported as the connector's
/// last error rather than lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_clean_up_of_webhook_ids_is_the_connectors_last_error() {
    use crate::inbox::IdHash;
    use crate::state::InboxRecord;

    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = Store::open(StoreConfig::new(dir.path())).expect("the store opens");
    let records = Records::new(store.clone(), "scheduler");
    let old = records.received_key(0, &IdHash::of("old"));
    let record = InboxRecord {
        body_sha256: "0".repeat(64),
        response: json!({"status": "applied"}),
        at_ms: 1_000,
    };
    records
        .write(vec![Records::put_inbox(old.clone(), &record)])
        .expect("written");
    let connectors = Connectors::new(store.clone(), scheduler()).unwrap();
    store.close().expect("closed");
    let shutdown = tokio_util::sync::CancellationToken::new();
    for (_, worker) in connectors.workers(shutdown.clone()) {
        tokio::spawn(worker);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = connectors.status("scheduler").await.expect("a status");
        if let Some(error) = status.last_error {
            assert!(error.contains("closed"), "{error}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the failure was not reported"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        records.inbox(&old).unwrap(),
        Some(record),
        "nothing deleted"
    );
    shutdown.cancel();
}
