//! Connectors end to end: the real server with `[[connectors]]`, a `FakeApi` as the external
//! system, signed webhooks over HTTP.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use connectors::WebhookSecret;
use lockstep_tests::fake_api::{Behavior, FakeApi, Received};
use lockstep_tests::webhooks::{signed, unix_now, TEST_SECRET};
use lockstep_tests::{expect_error, header, poll_until, read_raw_response, within, TestServer};
use serde_json::{json, Value};

/// A connector table for the appointment example, pointing at `url`.
fn connector(name: &str, url: &str, extra: &str) -> String {
    format!(
        r#"
[[connectors]]
name = "{name}"
kind = "appointment"
id_field = "apptId"
url = "{url}/appointments/sync"
signing_secret = "{TEST_SECRET}"
webhook_secret = "{TEST_SECRET}"
timeout = "500ms"
{extra}
[connectors.fields]
scheduledDate = "date"
officeCode = "site.code"
[connectors.retry]
schedule = ["0s", "50ms", "100ms"]
jitter = 0.0
"#
    )
}

/// Posts a webhook signed at `timestamp` (now when `None`).
async fn post_webhook(
    server: &TestServer,
    name: &str,
    id: &str,
    body: &Value,
    timestamp: Option<i64>,
) -> Result<reqwest::Response> {
    post_webhook_to(
        server,
        &format!("/v1/connectors/{name}/webhook"),
        id,
        body,
        timestamp,
    )
    .await
}

/// [`post_webhook`] to `path`, which may carry a query string.
async fn post_webhook_to(
    server: &TestServer,
    path: &str,
    id: &str,
    body: &Value,
    timestamp: Option<i64>,
) -> Result<reqwest::Response> {
    let request = server.client().post(server.url(path));
    server
        .send(signed(
            request,
            &WebhookSecret::parse(TEST_SECRET)?,
            id,
            timestamp.unwrap_or_else(unix_now),
            serde_json::to_vec(body)?,
        ))
        .await
}

/// The server's `/metrics` page.
async fn metrics_text(server: &TestServer) -> Result<String> {
    let response = server
        .send(server.client().get(server.url("/metrics")))
        .await?;
    Ok(response.text().await?)
}

/// Waits until the connector has nothing pending and has read the whole feed.
async fn settle(server: &TestServer, name: &str) -> Result<Value> {
    poll_until(&format!("connector {name} to settle"), || async {
        let (_, status) = server.get(&format!("/v1/connectors/{name}")).await?;
        let settled = status["entities_pending"] == 0 && status["cursor"] == server.feed_len();
        Ok(settled.then_some(status))
    })
    .await
}

fn bodies_by_key(received: &[Received]) -> BTreeMap<String, BTreeSet<String>> {
    let mut by_key: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for request in received {
        by_key
            .entry(
                request
                    .header("idempotency-key")
                    .unwrap_or_default()
                    .to_string(),
            )
            .or_default()
            .insert(String::from_utf8_lossy(&request.body).into_owned());
    }
    by_key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_3_booking_reaches_the_scheduler_and_its_reschedule_is_not_echoed() -> Result<()> {
    let fake = FakeApi::start().await?;
    fake.keep_state("apptId");
    let server = TestServer::start_with(&connector("state-scheduler", &fake.base, "")).await?;

    let (status, _) = server
        .patch(
            "/v1/entities/appointment/123",
            &json!({"date": "2026-12-01", "site": {"code": "N1"}, "notes": "internal"}),
        )
        .await?;
    assert_eq!(status, 201);
    let received = fake
        .wait_for(Duration::from_secs(10), "the first delta", |r| {
            !r.is_empty()
        })
        .await?;
    let first = &received[0];
    assert_eq!(first.method, "POST");
    assert_eq!(first.path, "/appointments/sync");
    assert_eq!(
        first.json(),
        json!({"apptId": "123", "scheduledDate": "2026-12-01", "officeCode": "N1"})
    );
    let key = first
        .header("idempotency-key")
        .context("an idempotency key")?;
    assert!(first.header("lockstep-version").is_some());
    assert_eq!(first.header("webhook-id"), Some(key));
    // The request is signed per Standard Webhooks with the signing secret.
    WebhookSecret::parse(TEST_SECRET)?.verify(
        key,
        first.header("webhook-timestamp").context("a timestamp")?,
        first.header("webhook-signature").context("a signature")?,
        &first.body,
        unix_now(),
        300,
    )?;

    // The scheduler reschedules and tells us.
    fake.change_own("123", "scheduledDate", json!("2026-12-02"));
    let response = post_webhook(
        &server,
        "state-scheduler",
        "msg_1",
        &json!({"apptId": "123", "scheduledDate": "2026-12-02"}),
        None,
    )
    .await?;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await?;
    assert_eq!(answer["status"], "applied", "{answer}");
    let (_, entity) = server.get("/v1/entities/appointment/123").await?;
    assert_eq!(entity["data"]["date"], "2026-12-02");
    let (_, history) = server.get("/v1/entities/appointment/123/history").await?;
    assert!(
        history.to_string().contains("connector:state-scheduler"),
        "{history}"
    );

    settle(&server, "state-scheduler").await?;
    assert_eq!(
        fake.received().len(),
        1,
        "the scheduler was sent its own date back: {:#?}",
        fake.received()
    );

    // A later local edit sends only what changed.
    server
        .patch(
            "/v1/entities/appointment/123",
            &json!({"site": {"code": "S2"}}),
        )
        .await?;
    let received = fake
        .wait_for(Duration::from_secs(10), "the second delta", |r| {
            r.len() == 2
        })
        .await?;
    assert_eq!(
        received[1].json(),
        json!({"apptId": "123", "officeCode": "S2"})
    );
    assert_eq!(
        received[1].header("lockstep-previous-version"),
        first.header("lockstep-version"),
    );
    Ok(())
}

/// A scheduler connector whose external system answers with `behavior`, and one edit of
/// `appointment/<id>` for it to deliver.
async fn edit_for_a_system_that_answers(
    behavior: Behavior,
    id: &str,
) -> Result<(FakeApi, TestServer)> {
    let fake = FakeApi::start().await?;
    fake.set(behavior);
    let server = TestServer::start_with(&connector("scheduler", &fake.base, "")).await?;
    server
        .patch(
            &format!("/v1/entities/appointment/{id}"),
            &json!({"date": "2027-06-01"}),
        )
        .await?;
    Ok((fake, server))
}

/// A 503 with `Retry-After` holds the next attempt back that long, though the connector's retry
/// schedule would try again after 50 ms; the retry carries the same idempotency key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_3_retry_after_holds_the_next_attempt_back() -> Result<()> {
    let (fake, _server) =
        edit_for_a_system_that_answers(Behavior::StatusRetryAfter(503, 1), "r1").await?;
    fake.wait_for(Duration::from_secs(10), "the first attempt", |r| {
        r.len() == 1
    })
    .await?;
    // Seen at most a poll after it was answered, so the real wait is at least this one.
    let refused_at = Instant::now();
    fake.set(Behavior::Status(200));
    let received = fake
        .wait_for(Duration::from_secs(10), "the retry", |r| r.len() == 2)
        .await?;
    let waited = refused_at.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "retried after {waited:?}, not after the 1 s Retry-After"
    );
    assert_eq!(
        received[0].headers["idempotency-key"],
        received[1].headers["idempotency-key"]
    );
    assert_eq!(received[1].status, 200);
    Ok(())
}

/// The retry schedule's first entry is the wait before a delta's first attempt, and each later
/// entry the wait after one more failure: with `["600ms", "300ms"]` the first attempt comes
/// 600 ms after the edit and the retries 300 ms apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_3_the_retry_schedule_starts_with_the_wait_before_the_first_attempt() -> Result<()> {
    let fake = FakeApi::start().await?;
    fake.set(Behavior::Status(500));
    let config = connector("scheduler", &fake.base, "")
        .replace(r#"["0s", "50ms", "100ms"]"#, r#"["600ms", "300ms"]"#);
    let server = TestServer::start_with(&config).await?;
    let edited_at = Instant::now();
    server
        .patch(
            "/v1/entities/appointment/s1",
            &json!({"date": "2027-06-01"}),
        )
        .await?;
    let received = fake
        .wait_for(Duration::from_secs(10), "two retries", |r| r.len() == 3)
        .await?;
    // The fake's own arrival times: the edit's answer came before the first attempt's.
    let first = received[0].arrived - edited_at;
    assert!(
        first >= Duration::from_millis(600),
        "the first attempt came {first:?} after the edit, before the schedule's 600 ms"
    );
    for pair in received.windows(2) {
        let gap = pair[1].arrived - pair[0].arrived;
        assert!(
            gap >= Duration::from_millis(300),
            "a retry came {gap:?} after the attempt before it, before the schedule's 300 ms"
        );
    }
    Ok(())
}

/// A redirect is not followed: the delta is dead-lettered, its reason names the status, and
/// nothing is sent where the redirect points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_3_a_redirect_is_a_dead_letter_and_is_not_followed() -> Result<()> {
    let (fake, server) =
        edit_for_a_system_that_answers(Behavior::Redirect("/elsewhere".into()), "d1").await?;
    let dead = poll_until("a dead letter", || async {
        let (_, dead) = server.get("/v1/connectors/scheduler/dead-letters").await?;
        Ok((dead["dead_letters"].as_array().map(Vec::len) == Some(1)).then_some(dead))
    })
    .await?;
    let reason = dead["dead_letters"][0]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("302"), "{dead}");
    let paths: Vec<String> = fake.received().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, vec!["/appointments/sync".to_string()]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_3_an_outage_ends_with_the_current_fields_and_stable_keys() -> Result<()> {
    let fake = FakeApi::start().await?;
    fake.keep_state("apptId");
    fake.set(Behavior::Status(500));
    let server = TestServer::start_with(&connector("scheduler", &fake.base, "")).await?;
    for round in 0..4 {
        for id in 0..5 {
            server
                .patch(
                    &format!("/v1/entities/appointment/a{id}"),
                    &json!({"date": format!("2026-12-{:02}", round + 1), "site": {"code": format!("R{round}")}}),
                )
                .await?;
        }
        if round == 1 {
            fake.set(Behavior::Stall(Duration::from_millis(800)));
        }
        fake.wait_for(Duration::from_secs(10), "failed attempts", |r| {
            r.len() >= 5 * (round + 1)
        })
        .await?;
    }
    let (_, status) = server.get("/v1/connectors/scheduler").await?;
    assert!(status["failures"].as_u64() > Some(0), "{status}");
    assert!(status["last_error"].is_string(), "{status}");
    fake.set(Behavior::Status(200));
    settle(&server, "scheduler").await?;
    let state = fake.state();
    for id in 0..5 {
        assert_eq!(
            state.get(&format!("a{id}")).cloned().unwrap_or_default(),
            BTreeMap::from([
                ("officeCode".to_string(), json!("R3")),
                ("scheduledDate".to_string(), json!("2026-12-04")),
            ]),
        );
    }
    for (key, bodies) in bodies_by_key(&fake.received()) {
        assert_eq!(
            bodies.len(),
            1,
            "key {key} carried different deltas: {bodies:?}"
        );
    }
    Ok(())
}

/// The most requests the fake was answering at one moment, among `requests`.
fn most_at_once(requests: &[&Received]) -> usize {
    requests
        .iter()
        .map(|request| {
            requests
                .iter()
                .filter(|other| {
                    other.arrived <= request.arrived
                        && other
                            .answered
                            .is_some_and(|answered| answered > request.arrived)
                })
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_3_deliveries_keep_each_entitys_order_and_the_connectors_concurrency() -> Result<()> {
    let fake = FakeApi::start().await?;
    // Every answer takes a while, so deliveries overlap whenever the connector lets them.
    fake.set(Behavior::Stall(Duration::from_millis(200)));
    let server =
        TestServer::start_with(&connector("scheduler", &fake.base, "concurrency = 2")).await?;
    let date = |day: u32| json!({ "date": format!("2027-07-{day:02}") });
    server
        .patch("/v1/entities/appointment/a1", &date(1))
        .await?;
    fake.wait_for(Duration::from_secs(10), "a1's first delta", |r| {
        !r.is_empty()
    })
    .await?;
    // Edited again while its first delta is on its way, and four other entities meanwhile.
    server
        .patch("/v1/entities/appointment/a1", &date(2))
        .await?;
    for id in 2..=5 {
        server
            .patch(&format!("/v1/entities/appointment/a{id}"), &date(id))
            .await?;
    }
    settle(&server, "scheduler").await?;
    let received = fake
        .wait_for(Duration::from_secs(10), "every delta answered", |r| {
            r.iter().all(|request| request.answered.is_some())
        })
        .await?;
    assert_eq!(received.len(), 6, "{received:#?}");
    let all: Vec<&Received> = received.iter().collect();
    assert_eq!(
        most_at_once(&all),
        2,
        "two entities in flight at once, never more: {received:#?}"
    );
    for id in 1..=5 {
        let of_entity: Vec<&Received> = received
            .iter()
            .filter(|request| request.json()["apptId"] == format!("a{id}"))
            .collect();
        assert_eq!(most_at_once(&of_entity), 1, "a{id}: one delta at a time");
        // Each entity ends with its last edit: a1 was edited to the 2nd, the others to their own day.
        let last_day = id.max(2);
        assert_eq!(
            of_entity
                .last()
                .map(|request| request.json()["scheduledDate"].clone()),
            Some(json!(format!("2027-07-{last_day:02}")))
        );
    }
    // a1's two deltas arrived in the order they were made, the second from where the first
    // left the system.
    let a1: Vec<&Received> = received
        .iter()
        .filter(|request| request.json()["apptId"] == "a1")
        .collect();
    assert_eq!(a1.len(), 2, "{a1:#?}");
    assert_eq!(a1[0].json()["scheduledDate"], "2027-07-01");
    assert_eq!(
        a1[1].header("lockstep-previous-version"),
        a1[0].header("lockstep-version")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_3_a_webhook_from_one_connector_reaches_the_other_only() -> Result<()> {
    let a = FakeApi::start().await?;
    let b = FakeApi::start().await?;
    let config = format!(
        "{}{}",
        connector("a", &a.base, ""),
        connector("b", &b.base, "")
    );
    let server = TestServer::start_with(&config).await?;
    let response = post_webhook(
        &server,
        "a",
        "msg_a1",
        &json!({"apptId": "7", "scheduledDate": "2027-01-05"}),
        None,
    )
    .await?;
    assert_eq!(response.status(), 200);
    let to_b = b
        .wait_for(Duration::from_secs(10), "b's delta", |r| !r.is_empty())
        .await?;
    assert_eq!(
        to_b[0].json(),
        json!({"apptId": "7", "scheduledDate": "2027-01-05"})
    );
    settle(&server, "a").await?;
    settle(&server, "b").await?;
    assert!(
        a.received().is_empty(),
        "a was sent its own change: {:#?}",
        a.received()
    );
    Ok(())
}

/// Senders' webhook URLs sometimes carry parameters of their own: the query string is ignored
/// (the signature covers the body), and a repeat of the id under another query string is still
/// a repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_3_a_query_string_on_the_webhook_url_is_ignored() -> Result<()> {
    let fake = FakeApi::start().await?;
    let server = TestServer::start_with(&connector("scheduler", &fake.base, "")).await?;
    let body = json!({"apptId": "31", "scheduledDate": "2027-04-04"});
    let path = "/v1/connectors/scheduler/webhook";
    let first = post_webhook_to(
        &server,
        &format!("{path}?source=crm&attempt=1"),
        "msg_q",
        &body,
        None,
    )
    .await?;
    assert_eq!(first.status(), 200);
    let first = first.json::<Value>().await?;
    assert_eq!(first["status"], "applied", "{first}");
    let (_, entity) = server.get("/v1/entities/appointment/31").await?;
    assert_eq!(entity["data"]["date"], "2027-04-04", "{entity}");
    let before = server.feed_len();
    let repeat =
        post_webhook_to(&server, &format!("{path}?attempt=2"), "msg_q", &body, None).await?;
    assert_eq!(repeat.status(), 200);
    assert_eq!(header(&repeat, "lockstep-idempotent-replay"), Some("true"));
    assert_eq!(repeat.json::<Value>().await?, first);
    assert_eq!(server.feed_len(), before, "a repeat changes nothing");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_3_after_a_concurrent_edit_the_system_gets_the_winner() -> Result<()> {
    let fake = FakeApi::start().await?;
    fake.keep_state("apptId");
    let server = TestServer::start_with(&connector("scheduler", &fake.base, "")).await?;
    server
        .patch("/v1/entities/appointment/9", &json!({"date": "2026-12-01"}))
        .await?;
    settle(&server, "scheduler").await?;
    // A replica edits the date while the scheduler reschedules it here.
    let replica_dir = tempfile::tempdir()?;
    let replica = store::Store::open(store::StoreConfig::new(replica_dir.path()))?;
    let key = store::EntityKey::new("appointment", "9")?;
    let saved = server.store().save(&key)?.context("saved")?;
    let peer = store::Origin::parse("peer:replica")?;
    replica.merge(&key, &saved, &peer)?;
    replica.patch(
        &key,
        &json!({"date": "2026-12-24"}),
        &store::WriteOptions::new(store::Origin::local("clerk")?),
    )?;
    fake.change_own("9", "scheduledDate", json!("2026-12-31"));
    let response = post_webhook(
        &server,
        "scheduler",
        "msg_9",
        &json!({"apptId": "9", "scheduledDate": "2026-12-31"}),
        None,
    )
    .await?;
    assert_eq!(response.status(), 200);
    let replica_bytes = replica.save(&key)?.context("replica doc")?;
    let store = server.store().clone();
    within(
        "merging the replica",
        tokio::task::spawn_blocking(move || store.merge(&key, &replica_bytes, &peer)),
    )
    .await???;
    settle(&server, "scheduler").await?;
    let (_, entity) = server.get("/v1/entities/appointment/9").await?;
    let (_, conflicts) = server.get("/v1/entities/appointment/9/conflicts").await?;
    assert_eq!(conflicts["conflicts"][0]["field"], "date", "{conflicts}");
    let winner = entity["data"]["date"].clone();
    assert_eq!(
        fake.state()["9"]["scheduledDate"],
        winner,
        "the system holds the loser"
    );
    for request in fake.acknowledged() {
        assert!(
            request.redundant_fields.is_empty(),
            "echo: {}",
            request.json()
        );
    }
    Ok(())
}

/// A webhook id is remembered for `dedupe_retention` and no longer: within it a repeat with
/// another body is a 409, after it the id is free again, though the hourly clean-up has not
/// removed its record yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_3_a_webhook_id_is_forgotten_after_the_retention() -> Result<()> {
    let fake = FakeApi::start().await?;
    let server = TestServer::start_with(&connector(
        "scheduler",
        &fake.base,
        // The retention may not be shorter than twice the timestamp tolerance.
        "dedupe_retention = \"2s\"\ntimestamp_tolerance = \"1s\"",
    ))
    .await?;
    let first = json!({"apptId": "7", "scheduledDate": "2027-07-01"});
    let second = json!({"apptId": "7", "scheduledDate": "2027-07-02"});
    let sent_at = Instant::now();
    assert_eq!(
        post_webhook(&server, "scheduler", "again", &first, None)
            .await?
            .status(),
        200
    );
    let reused = post_webhook(&server, "scheduler", "again", &second, None).await?;
    if sent_at.elapsed() < Duration::from_millis(1900) {
        expect_error(reused, 409, "webhook_id_reused").await?;
    }
    tokio::time::sleep(Duration::from_millis(2100).saturating_sub(sent_at.elapsed())).await;
    let response = post_webhook(&server, "scheduler", "again", &second, None).await?;
    assert_eq!(response.status(), 200);
    assert!(response
        .headers()
        .get("lockstep-idempotent-replay")
        .is_none());
    let (_, entity) = server.get("/v1/entities/appointment/7").await?;
    assert_eq!(entity["data"]["date"], "2027-07-02");
    Ok(())
}

/// The ids indexed in memory are bounded (`dedupe_index_ids`); ids past the bound are
/// remembered all the same, in the slower layout, and every id is still a repeat after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_3_webhook_ids_past_the_index_bound_are_remembered_across_a_restart() -> Result<()> {
    let fake = FakeApi::start().await?;
    let toml = connector("scheduler", &fake.base, "dedupe_index_ids = 2");
    let server = TestServer::start_with(&toml).await?;
    let bodies: Vec<Value> = (1..=4)
        .map(|n| json!({"apptId": n.to_string(), "scheduledDate": format!("2027-08-0{n}")}))
        .collect();
    let mut answers = Vec::new();
    for (n, body) in bodies.iter().enumerate() {
        let response = post_webhook(&server, "scheduler", &format!("w{n}"), body, None).await?;
        assert_eq!(response.status(), 200);
        answers.push(response.text().await?);
    }
    let indexed = "lockstep_connector_webhook_ids_indexed{connector=\"scheduler\"} 2";
    let metrics_now = metrics_text(&server).await?;
    assert!(metrics_now.contains(indexed), "{metrics_now}");
    let dir = server.stop().await?;
    let server = TestServer::start_in(dir, &toml).await?;
    let metrics_now = metrics_text(&server).await?;
    assert!(metrics_now.contains(indexed), "{metrics_now}");
    let before = server.feed_len();
    for (n, body) in bodies.iter().enumerate() {
        let id = format!("w{n}");
        let response = post_webhook(&server, "scheduler", &id, body, None).await?;
        assert_eq!(response.status(), 200);
        assert!(
            response
                .headers()
                .get("lockstep-idempotent-replay")
                .is_some(),
            "{id} was not taken for a repeat"
        );
        assert_eq!(response.text().await?, answers[n]);
        let other = json!({"apptId": "9", "scheduledDate": "2027-09-09"});
        let reused = post_webhook(&server, "scheduler", &id, &other, None).await?;
        expect_error(reused, 409, "webhook_id_reused").await?;
    }
    assert_eq!(server.feed_len(), before, "a repeat changed something");
    Ok(())
}

/// A remembered webhook id's record key that cannot be read stops the server from starting,
/// with an error that names the key, rather than let it forget the id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_3_an_unreadable_inbox_key_stops_the_start_and_names_the_key() -> Result<()> {
    let dir = tempfile::TempDir::new()?;
    let config_file = dir.path().join("lockstep.toml");
    std::fs::write(
        &config_file,
        connector("scheduler", "http://127.0.0.1:9", ""),
    )?;
    let config = server::Config::load(server::ConfigSources {
        file: Some(&config_file),
        data_dir: Some(dir.path().join("data")),
        ..server::ConfigSources::default()
    })?;
    let store = store::Store::open(config.store.store_config())?;
    let bad = store::RecordKey::new("connector.received", &["scheduler", "not-hex", "x"]);
    store.write_records(vec![store::RecordWrite::put(bad, b"{}".to_vec())])?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let started = server::run_with_store(
        std::sync::Arc::new(config),
        store,
        listener,
        tokio_util::sync::CancellationToken::new(),
    );
    let error = tokio::time::timeout(Duration::from_secs(10), started)
        .await?
        .expect_err("the server started over an unreadable inbox key");
    let said = format!("{:#}", anyhow::Error::from(error));
    assert!(
        said.starts_with("could not read the connectors' records: ")
            && said.contains("connector.received/scheduler/not-hex/x"),
        "{said}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue_3_one_webhook_id_posted_at_once_makes_one_change() -> Result<()> {
    let fake = FakeApi::start().await?;
    let server = TestServer::start_with(&connector("scheduler", &fake.base, "")).await?;
    let body = json!({"apptId": "5", "scheduledDate": "2027-02-02"});
    let before = server.feed_len();
    let posts: Vec<_> = (0..24)
        .map(|_| post_webhook(&server, "scheduler", "msg_same", &body, None))
        .collect();
    let mut answers = BTreeSet::new();
    for response in futures::future::join_all(posts).await {
        let response = response?;
        assert_eq!(response.status(), 200);
        answers.insert(response.text().await?);
    }
    assert_eq!(
        answers.len(),
        1,
        "every repeat gets the original answer: {answers:?}"
    );
    assert_eq!(server.feed_len(), before + 1);
    let without_id = json!({"scheduledDate": "2027-03-03"});
    for (id, body, status, code) in [
        // The known id with another body.
        (
            "msg_same",
            json!({"apptId": "5", "scheduledDate": "2027-03-03"}),
            409,
            "webhook_id_reused",
        ),
        // A known id is answered before its body is mapped: a body that could not be applied
        // at all (no id field) is still a reuse of the id, not a bad body.
        ("msg_same", without_id.clone(), 409, "webhook_id_reused"),
        // The same body under an id never seen is refused for what it is.
        ("msg_fresh", without_id, 422, "missing_id"),
    ] {
        let response = post_webhook(&server, "scheduler", id, &body, None).await?;
        expect_error(response, status, code).await?;
    }
    assert_eq!(server.feed_len(), before + 1);
    let (_, status) = server.get("/v1/connectors/scheduler").await?;
    assert_eq!(status["webhooks_duplicate"], 23, "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_3_bad_webhooks_are_refused_and_change_nothing() -> Result<()> {
    let fake = FakeApi::start().await?;
    let config = format!(
        "[limits]\nmax_body_bytes = 4096\n{}[[connectors]]\nname = \"outbound-only\"\nkind = \"appointment\"\nid_field = \"apptId\"\nurl = \"http://127.0.0.1:9/x\"\n[connectors.fields]\nscheduledDate = \"date\"\n[[connectors]]\nname = \"inbound-only\"\nkind = \"appointment\"\nid_field = \"apptId\"\nwebhook_secret = \"{TEST_SECRET}\"\n[connectors.fields]\nscheduledDate = \"date\"\n",
        connector("scheduler", &fake.base, ""),
    );
    let server = TestServer::start_with(&config).await?;
    let before = server.feed_len();
    let good = json!({"apptId": "1", "scheduledDate": "2027-01-01"});
    let url = server.url("/v1/connectors/scheduler/webhook");
    let raw = |id: &str, ts: String, signature: String, body: &str| {
        server
            .client()
            .post(&url)
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", ts)
            .header("webhook-signature", signature)
            .body(body.to_string())
    };
    let secret = WebhookSecret::parse(TEST_SECRET)?;
    let body = good.to_string();
    let ts = unix_now();
    // Signed for another body, id or timestamp; a bad signature; a missing header.
    expect_error(
        server
            .send(raw(
                "m1",
                ts.to_string(),
                secret.sign("m1", ts, b"{}"),
                &body,
            ))
            .await?,
        401,
        "invalid_signature",
    )
    .await?;
    expect_error(
        server
            .send(raw(
                "m2",
                ts.to_string(),
                secret.sign("other", ts, body.as_bytes()),
                &body,
            ))
            .await?,
        401,
        "invalid_signature",
    )
    .await?;
    expect_error(
        server
            .send(raw(
                "m3",
                ts.to_string(),
                secret.sign("m3", ts + 1, body.as_bytes()),
                &body,
            ))
            .await?,
        401,
        "invalid_signature",
    )
    .await?;
    expect_error(
        server
            .send(raw("m4", ts.to_string(), "v1,AAAA".into(), &body))
            .await?,
        401,
        "invalid_signature",
    )
    .await?;
    expect_error(
        server
            .send(
                server
                    .client()
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone()),
            )
            .await?,
        401,
        "invalid_signature",
    )
    .await?;
    // Not JSON by its media type, and too large (declared, or streamed without a length):
    // refused in our JSON shape, before the signature is even looked at.
    let text = server
        .client()
        .post(&url)
        .header("content-type", "text/plain")
        .header("webhook-id", "t1")
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", secret.sign("t1", ts, body.as_bytes()))
        .body(body.clone());
    expect_error(server.send(text).await?, 415, "unsupported_media_type").await?;
    // Written by hand over TCP, over this server's 4 KiB limit but small enough for the server
    // to read whole at once (hyper reads 8 KiB at first): a client still writing a large body
    // when the server answers and closes gets a broken pipe, or a reset that loses the answer,
    // instead of the 413. The declared one is refused from the head alone.
    let huge = format!(
        r#"{{"apptId": "1", "scheduledDate": "{}"}}"#,
        "x".repeat(5_000)
    );
    let webhook_head = |id: &str, framing: &str| {
        format!(
            "POST /v1/connectors/scheduler/webhook HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\nwebhook-id: {id}\r\nwebhook-timestamp: {ts}\r\nwebhook-signature: {}\r\n{framing}\r\n",
            secret.sign(id, ts, huge.as_bytes())
        )
    };
    let declared = webhook_head("h1", &format!("content-length: {}\r\n", huge.len()));
    let chunked = format!(
        "{}{:x}\r\n{huge}\r\n0\r\n\r\n",
        webhook_head("h2", "transfer-encoding: chunked\r\n"),
        huge.len()
    );
    for request in [declared, chunked] {
        let mut stream = server.send_raw(request.as_bytes()).await?;
        let response = read_raw_response(&mut stream).await?;
        assert_eq!(response.status, 413, "{response:?}");
        assert_eq!(response.json()?["code"], "body_too_large");
    }
    // Timestamps: 299 s either way is fine, 301 s is not.
    for skew in [-301, 301] {
        let response = post_webhook(
            &server,
            "scheduler",
            &format!("skew{skew}"),
            &good,
            Some(unix_now() + skew),
        )
        .await?;
        expect_error(response, 401, "stale_timestamp").await?;
    }
    // Bodies that verify but cannot be applied.
    let signed = |id: &str, body: &str| {
        let ts = unix_now();
        raw(
            id,
            ts.to_string(),
            secret.sign(id, ts, body.as_bytes()),
            body,
        )
    };
    expect_error(
        server.send(signed("b1", "{not json")).await?,
        400,
        "invalid_json",
    )
    .await?;
    expect_error(
        server.send(signed("b2", "[1,2]")).await?,
        422,
        "not_an_object",
    )
    .await?;
    expect_error(
        server
            .send(signed("b3", r#"{"scheduledDate": "x"}"#))
            .await?,
        422,
        "missing_id",
    )
    .await?;
    expect_error(
        server
            .send(signed("b4", r#"{"apptId": "bad id!"}"#))
            .await?,
        400,
        "invalid_id",
    )
    .await?;
    // Unknown connector, and one that takes no webhooks.
    expect_error(
        post_webhook(&server, "nobody", "x", &good, None).await?,
        404,
        "unknown_connector",
    )
    .await?;
    expect_error(
        post_webhook(&server, "outbound-only", "x", &good, None).await?,
        404,
        "inbound_disabled",
    )
    .await?;
    assert_eq!(
        server.feed_len(),
        before,
        "a refused webhook changed something"
    );
    // Every refusal for a known connector is counted: the four bad signatures, the missing
    // headers, the media type, the two sizes, the two stale timestamps and the four bodies.
    let (_, scheduler) = server.get("/v1/connectors/scheduler").await?;
    assert_eq!(scheduler["webhooks_rejected"], 14, "{scheduler}");
    assert_eq!(scheduler["webhooks_applied"], 0, "{scheduler}");
    let (_, outbound_only) = server.get("/v1/connectors/outbound-only").await?;
    assert_eq!(outbound_only["webhooks_rejected"], 1, "{outbound_only}");
    for skew in [-299, 299] {
        let response = post_webhook(
            &server,
            "scheduler",
            &format!("ok{skew}"),
            &good,
            Some(unix_now() + skew),
        )
        .await?;
        assert_eq!(response.status(), 200);
    }
    // An id alone, for an entity this site does not hold, changes nothing and has no version.
    let id_only = post_webhook(
        &server,
        "scheduler",
        "id-only",
        &json!({"apptId": "none"}),
        None,
    )
    .await?;
    assert_eq!(id_only.status(), 200);
    let answer: Value = id_only.json().await?;
    assert_eq!(
        (answer["status"].clone(), answer["version"].clone()),
        (json!("unchanged"), Value::Null),
        "{answer}"
    );
    assert_eq!(server.get("/v1/entities/appointment/none").await?.0, 404);
    // A connector without a url accepts webhooks but has nothing to replay.
    let inbound_only = post_webhook(&server, "inbound-only", "in1", &good, None).await?;
    assert_eq!(inbound_only.status(), 200);
    let (_, status) = server.get("/v1/connectors/inbound-only").await?;
    assert_eq!(status["state"], "inbound_only", "{status}");
    // It has no feed to follow, so it never lags behind one.
    assert!(server.feed_len() > 0);
    assert_eq!(status["feed_lag"], 0, "{status}");
    let replay = server
        .send(
            server
                .client()
                .post(server.url("/v1/connectors/inbound-only/replay"))
                .header("content-type", "application/json")
                .body(r#"{"all": true}"#),
        )
        .await?;
    expect_error(replay, 409, "outbound_disabled").await?;
    // Nor anything to preview.
    expect_error(
        server
            .get_response("/v1/connectors/inbound-only/preview/appointment/1")
            .await?,
        409,
        "outbound_disabled",
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_3_an_older_version_field_is_acknowledged_and_ignored() -> Result<()> {
    let fake = FakeApi::start().await?;
    let server = TestServer::start_with(&connector(
        "scheduler",
        &fake.base,
        "version_field = \"updatedAt\"",
    ))
    .await?;
    let newer =
        json!({"apptId": "4", "scheduledDate": "2027-04-04", "updatedAt": "2026-11-23T10:00:00Z"});
    let older =
        json!({"apptId": "4", "scheduledDate": "2027-01-01", "updatedAt": "2026-11-23T09:00:00Z"});
    assert_eq!(
        post_webhook(&server, "scheduler", "n", &newer, None)
            .await?
            .status(),
        200
    );
    let before = server.feed_len();
    let response = post_webhook(&server, "scheduler", "o", &older, None).await?;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await?;
    assert_eq!(answer["status"], "stale", "{answer}");
    assert_eq!(server.feed_len(), before);
    let (_, entity) = server.get("/v1/entities/appointment/4").await?;
    assert_eq!(entity["data"]["date"], "2027-04-04");
    // A version that cannot be ordered against the last one is refused, and changes nothing:
    // were it taken as the new mark, the older delta after it would be applied.
    for (id, mark) in [
        ("obj", json!({})),
        ("arr", json!([1])),
        ("num", json!(1)),
        ("bool", json!(true)),
    ] {
        let body = json!({"apptId": "4", "scheduledDate": "2027-02-02", "updatedAt": mark});
        let response = post_webhook(&server, "scheduler", id, &body, None).await?;
        expect_error(response, 422, "uncastable_value").await?;
    }
    assert_eq!(server.feed_len(), before);
    let response = post_webhook(&server, "scheduler", "o2", &older, None).await?;
    let answer: Value = response.json().await?;
    assert_eq!(answer["status"], "stale", "{answer}");
    let (_, entity) = server.get("/v1/entities/appointment/4").await?;
    assert_eq!(entity["data"]["date"], "2027-04-04");
    let metrics = metrics_text(&server).await?;
    assert!(
        metrics.contains(
            "lockstep_connector_webhooks_total{connector=\"scheduler\",result=\"stale\"} 2"
        ),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_3_a_replay_resends_dead_lettered_entities_too() -> Result<()> {
    let fake = FakeApi::start().await?;
    fake.keep_state("apptId");
    let server = TestServer::start_with(&connector("scheduler", &fake.base, "")).await?;
    let path = "/v1/connectors/scheduler";
    let dead_ids = || async {
        let (_, dead) = server.get(&format!("{path}/dead-letters")).await?;
        let ids: BTreeSet<String> = dead["dead_letters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|letter| letter["id"].as_str().map(str::to_owned))
            .collect();
        anyhow::Ok(ids)
    };
    let replay = |body: Value| {
        server
            .client()
            .post(server.url(&format!("{path}/replay")))
            .header("content-type", "application/json")
            .body(body.to_string())
    };
    let delivered = |id: &'static str| {
        move |received: &[Received]| {
            received
                .iter()
                .any(|q| q.json()["apptId"] == id && q.status == 200)
        }
    };

    // The system refuses two entities: both are dead letters.
    fake.set(Behavior::Status(422));
    for id in ["d1", "d2"] {
        let fields = json!({"date": format!("2027-06-0{}", &id[1..])});
        server
            .patch(&format!("/v1/entities/appointment/{id}"), &fields)
            .await?;
    }
    poll_until("two dead letters", || async {
        Ok((dead_ids().await?.len() == 2).then_some(()))
    })
    .await?;
    // A dead letter's reason names the system by scheme, host and port only: a URL's path or
    // query may hold a secret, and read tokens see reasons.
    let (_, dead) = server.get(&format!("{path}/dead-letters")).await?;
    let reason = dead["dead_letters"][0]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("answered 422"), "{reason}");
    assert!(reason.contains(fake.base.as_str()), "{reason}");
    assert!(!reason.contains("/appointments"), "{reason}");
    fake.set(Behavior::Status(200));

    // Replaying one entity sends it again, and it leaves the dead letters; replaying all counts
    // and sends the other, which the system never acknowledged.
    for (body, count, sent, still_dead) in [
        (
            json!({"entity": {"kind": "appointment", "id": "d1"}}),
            1,
            "d1",
            vec!["d2"],
        ),
        (json!({"all": true}), 2, "d2", vec![]),
    ] {
        let (status, answer) = server.json(replay(body)).await?;
        assert_eq!(
            (status.as_u16(), answer["entities"].clone()),
            (200, json!(count))
        );
        fake.wait_for(Duration::from_secs(10), sent, delivered(sent))
            .await?;
        settle(&server, "scheduler").await?;
        let still_dead: BTreeSet<String> = still_dead.into_iter().map(str::to_owned).collect();
        assert_eq!(dead_ids().await?, still_dead);
    }
    let received = fake.received();
    for id in ["d1", "d2"] {
        let keys: BTreeSet<&str> = received
            .iter()
            .filter(|q| q.json()["apptId"] == id)
            .filter_map(|q| q.header("idempotency-key"))
            .collect();
        assert!(
            keys.len() >= 2,
            "{id}: the replay reused the dead delta's key"
        );
    }
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_3_admin_pause_dead_letters_gone_replay_and_preview() -> Result<()> {
    let fake = FakeApi::start().await?;
    fake.keep_state("apptId");
    let server = TestServer::start_with(&connector("scheduler", &fake.base, "")).await?;
    let path = "/v1/connectors/scheduler";
    let post = |suffix: &str, body: Value| {
        server
            .client()
            .post(server.url(&format!("{path}{suffix}")))
            .header("content-type", "application/json")
            .body(body.to_string())
    };

    // Pause: edits wait; resume: they go.
    let (status, paused) = server.json(post("/pause", json!({}))).await?;
    assert_eq!(
        (status.as_u16(), paused["state"].clone()),
        (200, json!("paused"))
    );
    server
        .patch(
            "/v1/entities/appointment/p1",
            &json!({"date": "2027-05-01"}),
        )
        .await?;
    let (_, preview) = server
        .get(&format!("{path}/preview/appointment/p1"))
        .await?;
    assert_eq!(
        preview["delta"],
        json!({"apptId": "p1", "scheduledDate": "2027-05-01"}),
        "{preview}"
    );
    assert!(fake.received().is_empty());
    server.json(post("/resume", json!({}))).await?;
    fake.wait_for(Duration::from_secs(10), "the delta after resume", |r| {
        r.len() == 1
    })
    .await?;
    let (_, preview) = server
        .get(&format!("{path}/preview/appointment/p1"))
        .await?;
    assert_eq!(preview["delta"], Value::Null, "{preview}");

    // A 400 dead-letters that entity; another entity still flows.
    fake.set(Behavior::Status(400));
    server
        .patch(
            "/v1/entities/appointment/p2",
            &json!({"date": "2027-05-02"}),
        )
        .await?;
    poll_until("a dead letter", || async {
        let (_, dead) = server.get(&format!("{path}/dead-letters")).await?;
        Ok((dead["dead_letters"].as_array().map(Vec::len) == Some(1)).then_some(()))
    })
    .await?;
    fake.set(Behavior::Status(200));
    server
        .patch(
            "/v1/entities/appointment/p3",
            &json!({"date": "2027-05-03"}),
        )
        .await?;
    fake.wait_for(Duration::from_secs(10), "p3 while p2 is dead", |r| {
        r.iter()
            .any(|q| q.json()["apptId"] == "p3" && q.status == 200)
    })
    .await?;
    let (status, _) = server
        .json(post("/dead-letters/appointment/p2/retry", json!({})))
        .await?;
    assert_eq!(status, 200);
    fake.wait_for(Duration::from_secs(10), "p2 after retry", |r| {
        r.iter()
            .any(|q| q.json()["apptId"] == "p2" && q.status == 200)
    })
    .await?;
    let missing = server
        .send(post("/dead-letters/appointment/p2/retry", json!({})))
        .await?;
    expect_error(missing, 404, "no_dead_letter").await?;

    // 410 disables the connector until resumed.
    fake.set(Behavior::Status(410));
    server
        .patch(
            "/v1/entities/appointment/p4",
            &json!({"date": "2027-05-04"}),
        )
        .await?;
    poll_until("the connector to be disabled", || async {
        let (_, status) = server.get(path).await?;
        Ok((status["state"] == "disabled").then_some(()))
    })
    .await?;
    fake.set(Behavior::Status(200));
    server.json(post("/resume", json!({}))).await?;
    settle(&server, "scheduler").await?;

    // Replay resends what the system already has.
    let before = fake.received().len();
    let (status, replayed) = server
        .json(post(
            "/replay",
            json!({"entity": {"kind": "appointment", "id": "p1"}}),
        ))
        .await?;
    assert_eq!(
        (status.as_u16(), replayed["entities"].clone()),
        (200, json!(1))
    );
    let received = fake
        .wait_for(Duration::from_secs(10), "the replayed entity", |r| {
            r.len() == before + 1
        })
        .await?;
    let keys_for_p1: BTreeSet<&str> = received
        .iter()
        .filter(|request| request.json()["apptId"] == "p1" && request.status == 200)
        .filter_map(|request| request.header("idempotency-key"))
        .collect();
    assert_eq!(
        keys_for_p1.len(),
        2,
        "a replay must not reuse an acknowledged key"
    );
    settle(&server, "scheduler").await?;
    let before = fake.received().len();
    server.json(post("/replay", json!({"all": true}))).await?;
    fake.wait_for(Duration::from_secs(10), "every entity again", |r| {
        r.len() >= before + 4
    })
    .await?;
    expect_error(
        server.send(post("/replay", json!({"bogus": 1}))).await?,
        400,
        "invalid_replay",
    )
    .await?;
    // An entity of a kind the connector does not sync would never be delivered.
    let other_kind = json!({"entity": {"kind": "permit", "id": "p1"}});
    expect_error(
        server.send(post("/replay", other_kind)).await?,
        400,
        "wrong_kind",
    )
    .await?;
    expect_error(
        server
            .get_response(&format!("{path}/preview/permit/p1"))
            .await?,
        400,
        "wrong_kind",
    )
    .await?;
    let (_, list) = server.get("/v1/connectors").await?;
    assert_eq!(list["connectors"][0]["name"], "scheduler");
    expect_error(
        server.get_response("/v1/connectors/nobody").await?,
        404,
        "unknown_connector",
    )
    .await?;
    Ok(())
}
