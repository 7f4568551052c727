//! The entity endpoints: create, patch, replace, read, ETag and If-Match, delete, list, history,
//! time travel and conflicts, plus the health and metrics endpoints.

use anyhow::{Context, Result};
use lockstep_tests::{expect_error, header, within, TestServer};
use serde_json::{json, Value};
use store::{EntityKey, Origin, Store, StoreConfig, WriteOptions};

fn version_of(body: &Value) -> Result<String> {
    body["version"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no version in {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_creates_then_merges_and_get_returns_the_entity_with_its_etag() -> Result<()> {
    let server = TestServer::start().await?;
    let path = "/v1/entities/appointment/1";

    let (status, created) = server
        .patch(
            path,
            &json!({"date": "2026-12-01", "site": {"code": "N1", "room": "4"}}),
        )
        .await?;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["kind"], "appointment");
    assert_eq!(created["id"], "1");
    assert_eq!(created["data"]["site"]["room"], "4");

    let (status, patched) = server
        .patch(path, &json!({"site": {"room": null}, "date": "2026-12-02"}))
        .await?;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(
        patched["data"],
        json!({"date": "2026-12-02", "site": {"code": "N1"}})
    );

    let response = server.get_response(path).await?;
    assert_eq!(response.status(), 200);
    let etag = response
        .headers()
        .get("etag")
        .context("no ETag")?
        .to_str()?
        .to_string();
    let body: Value = within("reading the entity", response.json()).await??;
    assert_eq!(etag, format!("\"{}\"", version_of(&body)?));
    assert_eq!(version_of(&body)?, version_of(&patched)?);
    assert_eq!(body["data"], patched["data"]);
    assert_eq!(
        body.as_object().map(|object| object.len()),
        Some(4),
        "{body}"
    );
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_creates_then_replaces_every_field() -> Result<()> {
    let server = TestServer::start().await?;
    let path = "/v1/entities/permit/p-1";
    let (status, body) = server
        .put(path, &json!({"holder": "ana", "zone": 3}))
        .await?;
    assert_eq!(status, 201, "{body}");
    let (status, body) = server.put(path, &json!({"holder": "bo"})).await?;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server.get(path).await?;
    assert_eq!(status, 200);
    assert_eq!(body["data"], json!({"holder": "bo"}));
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_match_accepts_the_current_version_and_refuses_a_stale_one() -> Result<()> {
    let server = TestServer::start().await?;
    let path = "/v1/entities/appointment/7";
    let (_, first) = server.patch(path, &json!({"status": "booked"})).await?;
    let v1 = version_of(&first)?;
    let (_, second) = server.patch(path, &json!({"status": "moved"})).await?;
    let v2 = version_of(&second)?;

    let feed_before = server.feed_len();
    for (method, if_match) in [("PATCH", &v1), ("PUT", &v1), ("DELETE", &v1)] {
        let request = server
            .client()
            .request(method.parse()?, server.url(path))
            .header("content-type", "application/json")
            .header("if-match", format!("\"{if_match}\""));
        let request = if method == "DELETE" {
            request
        } else {
            request.body(r#"{"status": "stale"}"#)
        };
        expect_error(server.send(request).await?, 412, "version_mismatch").await?;
    }
    assert_eq!(
        server.feed_len(),
        feed_before,
        "a refused write changed the feed"
    );
    let (_, current) = server.get(path).await?;
    assert_eq!(current["data"]["status"], "moved");

    // The current version, quoted as an ETag or bare, is accepted; so is `*` for an existing entity.
    let mut current_version = v2;
    for (room, form) in [("1", "quoted"), ("2", "bare"), ("3", "any")] {
        let if_match = match form {
            "quoted" => format!("\"{current_version}\""),
            "bare" => current_version.clone(),
            _ => "*".to_string(),
        };
        let request = server
            .patch_request(path, &json!({ "room": room }))
            .header("if-match", if_match);
        let (status, body) = server.json(request).await?;
        assert_eq!(status, 200, "If-Match {form}: {body}");
        current_version = version_of(&body)?;
    }

    // `*` or a version on an entity that does not exist is a failed precondition, not a create.
    for if_match in ["*".to_string(), format!("\"{v1}\"")] {
        let request = server
            .patch_request("/v1/entities/appointment/absent", &json!({"status": "new"}))
            .header("if-match", if_match);
        expect_error(server.send(request).await?, 412, "version_mismatch").await?;
    }
    let (status, _) = server.get("/v1/entities/appointment/absent").await?;
    assert_eq!(status, 404);

    // The precondition is judged before the content: a body the store refuses (a PUT with no
    // fields, which no entity can take, a body that is not an object, an empty field name,
    // nesting past the limit) with a stale `If-Match`, or one on an absent entity, is 412 too;
    // at the current version it is the body's 422.
    let deep = format!("{}1{}", r#"{"a":"#.repeat(40), "}".repeat(40));
    let refused_bodies = [
        ("PUT", "{}".to_string()),
        ("PUT", "[1]".to_string()),
        ("PATCH", "[1]".to_string()),
        ("PATCH", r#"{"": 1}"#.to_string()),
        ("PATCH", deep),
    ];
    let refused = |method: &str, path: &str, if_match: String, body: &str| {
        server
            .client()
            .request(method.parse().expect("a method"), server.url(path))
            .header("content-type", "application/json")
            .header("if-match", if_match)
            .body(body.to_string())
    };
    let feed_before = server.feed_len();
    for (method, body) in &refused_bodies {
        for (target, if_match) in [
            (path, format!("\"{v1}\"")),
            ("/v1/entities/appointment/absent", format!("\"{v1}\"")),
            ("/v1/entities/appointment/absent", "*".to_string()),
        ] {
            expect_error(
                server.send(refused(method, target, if_match, body)).await?,
                412,
                "version_mismatch",
            )
            .await
            .with_context(|| format!("{method} {target} {body}"))?;
        }
        expect_error(
            server
                .send(refused(
                    method,
                    path,
                    format!("\"{current_version}\""),
                    body,
                ))
                .await?,
            422,
            "unwritable_value",
        )
        .await
        .with_context(|| format!("{method} {body} at the current version"))?;
    }
    assert_eq!(server.feed_len(), feed_before, "a refused body was written");
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_match_any_holds_for_an_entity_that_exists_however_busy_it_is() -> Result<()> {
    // `*` is judged by the store as the write is made. Read first and written at the version
    // read, it lost to every write that landed in between, and under this load some `*` writes
    // failed with 412 after their retries although the entity existed throughout.
    let server = TestServer::start_with("[store]\nwriter_threads = 2").await?;
    let path = "/v1/entities/slot/busy";
    let (status, body) = server.patch(path, &json!({"n": 0})).await?;
    assert_eq!(status, 201, "{body}");
    let shared = &server;
    let unconditional = (0..32).map(|writer| {
        let request = shared.patch_request(path, &json!({"plain": writer}));
        async move {
            for _ in 0..20 {
                let request = request.try_clone().context("cloning a request")?;
                let (status, body) = shared.json(request).await?;
                anyhow::ensure!(status == 200, "an unconditional write: {status} {body}");
            }
            anyhow::Ok(())
        }
    });
    let any_version = (0..32).map(|writer| {
        let request = shared
            .patch_request(path, &json!({"any": writer}))
            .header("if-match", "*");
        async move {
            let mut refused = 0;
            for _ in 0..20 {
                let request = request.try_clone().context("cloning a request")?;
                let (status, body) = shared.json(request).await?;
                match status.as_u16() {
                    200 => {}
                    412 => refused += 1,
                    _ => anyhow::bail!("an If-Match: * write: {status} {body}"),
                }
            }
            anyhow::Ok(refused)
        }
    });
    let (plain, any) = tokio::join!(
        futures::future::try_join_all(unconditional),
        futures::future::try_join_all(any_version)
    );
    plain?;
    let refused: u32 = any?.into_iter().sum();
    assert_eq!(
        refused, 0,
        "If-Match: * writes refused on an entity that exists"
    );
    // On an entity that does not exist, `*` is still 412 and writes nothing.
    let feed = server.feed_len();
    let absent = server
        .patch_request("/v1/entities/slot/absent", &json!({"n": 1}))
        .header("if-match", "*");
    expect_error(server.send(absent).await?, 412, "version_mismatch").await?;
    assert_eq!(server.feed_len(), feed);
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_makes_the_entity_404_and_keeps_its_history() -> Result<()> {
    let server = TestServer::start().await?;
    let path = "/v1/entities/slot/s1";
    server.put(path, &json!({"start": "09:00"})).await?;

    let response = server
        .send(server.client().delete(server.url(path)))
        .await?;
    assert_eq!(response.status(), 204);
    expect_error(server.get_response(path).await?, 404, "not_found").await?;
    // Deleting what does not exist is a 404, and writes nothing.
    let feed = server.feed_len();
    expect_error(
        server
            .send(server.client().delete(server.url(path)))
            .await?,
        404,
        "not_found",
    )
    .await?;
    assert_eq!(server.feed_len(), feed);

    let (status, history) = server.get(&format!("{path}/history")).await?;
    assert_eq!(status, 200, "{history}");
    let changes = history["changes"].as_array().context("changes")?;
    assert_eq!(changes.len(), 2, "{history}");
    // The entity as it was before the delete is still readable by version.
    let before_delete = changes[0]["version"].as_str().context("version")?;
    let (status, old) = server.get(&format!("{path}?at={before_delete}")).await?;
    assert_eq!(status, 200, "{old}");
    assert_eq!(old["data"], json!({"start": "09:00"}));

    let (_, page) = server.get("/v1/entities/slot").await?;
    assert_eq!(page["items"], json!([]));

    // It can be created again.
    let (status, _) = server.put(path, &json!({"start": "10:00"})).await?;
    assert_eq!(status, 201);
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_through_a_kind_in_id_order() -> Result<()> {
    let server = TestServer::start().await?;
    for id in ["e", "a", "d", "b", "c"] {
        server
            .put(&format!("/v1/entities/tour/{id}"), &json!({"name": id}))
            .await?;
    }
    server
        .put("/v1/entities/other/z", &json!({"name": "z"}))
        .await?;

    let mut seen = Vec::new();
    let mut path = "/v1/entities/tour?limit=2".to_string();
    loop {
        let (status, page) = server.get(&path).await?;
        assert_eq!(status, 200, "{page}");
        let items = page["items"].as_array().context("items")?;
        assert!(items.len() <= 2);
        for item in items {
            assert_eq!(item["kind"], "tour");
            assert!(item["version"].is_string());
            seen.push(item["id"].as_str().context("id")?.to_string());
        }
        match page["next"].as_str() {
            Some(next) => path = format!("/v1/entities/tour?limit=2&after={next}"),
            None => break,
        }
    }
    assert_eq!(seen, ["a", "b", "c", "d", "e"]);

    let (_, all) = server.get("/v1/entities/tour").await?;
    assert_eq!(all["items"].as_array().map(Vec::len), Some(5));
    assert_eq!(all["next"], Value::Null);
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_lists_every_change_with_its_origin_and_fields() -> Result<()> {
    let server = TestServer::start().await?;
    let path = "/v1/entities/appointment/h";
    server
        .patch(path, &json!({"date": "2026-12-01", "site": {"code": "N1"}}))
        .await?;
    server.patch(path, &json!({"date": "2026-12-02"})).await?;

    let (status, history) = server.get(&format!("{path}/history")).await?;
    assert_eq!(status, 200);
    assert_eq!(history["kind"], "appointment");
    assert_eq!(history["id"], "h");
    let changes = history["changes"].as_array().context("changes")?;
    assert_eq!(changes.len(), 2);
    for change in changes {
        assert_eq!(change["origin"], "local:anonymous", "{change}");
        assert!(change["time"].as_i64().is_some_and(|time| time > 0));
    }
    assert_eq!(changes[1]["fields"], json!(["date"]));
    expect_error(
        server
            .get_response("/v1/entities/appointment/never/history")
            .await?,
        404,
        "not_found",
    )
    .await?;
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_reads_an_earlier_version() -> Result<()> {
    let server = TestServer::start().await?;
    let path = "/v1/entities/appointment/t";
    let (_, first) = server.patch(path, &json!({"status": "booked"})).await?;
    let v1 = version_of(&first)?;
    server
        .patch(path, &json!({"status": "moved", "room": "2"}))
        .await?;

    let response = server.get_response(&format!("{path}?at={v1}")).await?;
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "etag"),
        Some(format!("\"{v1}\"").as_str())
    );
    let old: Value = within("reading", response.json()).await??;
    assert_eq!(old["data"], json!({"status": "booked"}));
    assert_eq!(old["version"], v1.as_str());

    // A well-formed version this entity never had.
    let unknown = "ab".repeat(32);
    expect_error(
        server.get_response(&format!("{path}?at={unknown}")).await?,
        404,
        "unknown_version",
    )
    .await?;
    server.stop().await?;
    Ok(())
}

/// Runs a blocking store call off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> store::Result<T> + Send + 'static,
) -> Result<T> {
    Ok(within("a store call", tokio::task::spawn_blocking(work)).await???)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_lists_concurrent_values_after_a_merge() -> Result<()> {
    let server = TestServer::start().await?;
    let path = "/v1/entities/appointment/c";
    let key = EntityKey::new("appointment", "c")?;
    server.put(path, &json!({"status": "booked"})).await?;

    // A second replica gets the entity, then both sides change `status` concurrently.
    let other_dir = tempfile::tempdir()?;
    let other = blocking({
        let path = other_dir.path().to_path_buf();
        move || Store::open(StoreConfig::new(path))
    })
    .await?;
    let ours = server.store().clone();
    let peer = Origin::parse("peer:north")?;
    let saved = blocking({
        let (ours, key) = (ours.clone(), key.clone());
        move || ours.save(&key)
    })
    .await?
    .context("the entity was saved")?;
    blocking({
        let (other, key, peer) = (other.clone(), key.clone(), peer.clone());
        move || {
            other.merge(&key, &saved, &peer)?;
            other.patch(
                &key,
                &json!({"status": "moved"}),
                &WriteOptions::new(peer.clone()),
            )
        }
    })
    .await?;
    let (status, _) = server.patch(path, &json!({"status": "confirmed"})).await?;
    assert_eq!(status, 200);
    let theirs = blocking({
        let (other, key) = (other.clone(), key.clone());
        move || other.save(&key)
    })
    .await?
    .context("the other side saved")?;
    let merged = blocking({
        let (ours, key, peer) = (ours.clone(), key.clone(), peer.clone());
        move || ours.merge(&key, &theirs, &peer)
    })
    .await?;
    assert!(merged.seq.is_some(), "the merge brought something new");

    let (status, body) = server.get(&format!("{path}/conflicts")).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["kind"], "appointment");
    assert_eq!(body["id"], "c");
    let conflicts = body["conflicts"].as_array().context("conflicts")?;
    assert_eq!(conflicts.len(), 1, "{body}");
    assert_eq!(conflicts[0]["field"], "status");
    let mut values: Vec<&str> = conflicts[0]["values"]
        .as_array()
        .context("values")?
        .iter()
        .filter_map(|value| value["value"].as_str())
        .collect();
    values.sort_unstable();
    assert_eq!(values, ["confirmed", "moved"]);
    let (_, entity) = server.get(path).await?;
    assert_eq!(entity["data"]["status"], conflicts[0]["winner"]);

    // The merge is in the feed with the peer's origin.
    let feed = server.get_response("/v1/changes").await?;
    let feed = within("reading the feed", feed.text()).await??;
    let last: Value = serde_json::from_str(feed.lines().last().context("a row")?)?;
    assert_eq!(last["origin"], "peer:north");

    // Resolving is just a new write; afterwards there is no conflict. (It writes a third value:
    // the store skips writing a field's current value, so re-writing the winner changes nothing.)
    server
        .patch(path, &json!({"status": "rescheduled"}))
        .await?;
    let (_, body) = server.get(&format!("{path}/conflicts")).await?;
    assert_eq!(body["conflicts"], json!([]));
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creation_on_two_replicas_keeps_both_sides_fields() -> Result<()> {
    let server = TestServer::start().await?;
    let key = EntityKey::new("appointment", "1")?;
    server
        .put("/v1/entities/appointment/1", &json!({"date": "2026-12-01"}))
        .await?;
    let other_dir = tempfile::tempdir()?;
    let theirs = blocking({
        let (path, key) = (other_dir.path().to_path_buf(), key.clone());
        move || {
            let other = Store::open(StoreConfig::new(path))?;
            let peer = Origin::parse("peer:south")?;
            other.replace(&key, &json!({"site": "S2"}), &WriteOptions::new(peer))?;
            other.save(&key)
        }
    })
    .await?
    .context("the other replica saved the entity")?;
    let ours = server.store().clone();
    blocking(move || ours.merge(&key, &theirs, &Origin::parse("peer:south")?)).await?;
    let (_, entity) = server.get("/v1/entities/appointment/1").await?;
    assert_eq!(
        entity["data"],
        json!({"date": "2026-12-01", "site": "S2"}),
        "{entity}"
    );
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_answer() -> Result<()> {
    let server = TestServer::start().await?;
    let (status, health) = server.get("/healthz").await?;
    assert_eq!((status.as_u16(), &health["status"]), (200, &json!("ok")));
    let (status, ready) = server.get("/readyz").await?;
    assert_eq!((status.as_u16(), &ready["status"]), (200, &json!("ready")));

    server
        .patch("/v1/entities/metric/m", &json!({"a": 1}))
        .await?;
    let response = server.get_response("/metrics").await?;
    assert_eq!(response.status(), 200);
    assert!(header(&response, "content-type").is_some_and(|value| value.starts_with("text/plain")));
    let text = within("reading metrics", response.text()).await??;
    for expected in [
        "lockstep_http_requests_total{route=\"/v1/entities/{kind}/{id}\",method=\"PATCH\",status=\"201\"} 1",
        "lockstep_http_request_duration_seconds_count{route=\"/v1/entities/{kind}/{id}\"} 1",
        "lockstep_store_writes_total 1",
        "lockstep_feed_seq 1",
        "# TYPE lockstep_store_flushes_total counter",
        "# TYPE lockstep_store_cache_hits_total counter",
        "# TYPE lockstep_store_cache_misses_total counter",
        "# TYPE lockstep_store_cached_documents gauge",
        "lockstep_store_cached_document_bytes 1",
        "# TYPE lockstep_store_index_only_writes_total counter",
        "lockstep_store_cached_write_indexes 0",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
    server.stop().await?;
    Ok(())
}

/// Numbers read back as the values written: a float as the same double (the body's text parsed
/// exactly, not one ulp off), and `-0.0` as `0.0` everywhere (Automerge compares floats as
/// numbers, so it could not tell `0.0` written over `-0.0` from no change; see
/// docs/http-api.md), whether the entity is read from the JSON its write left in memory, at a
/// version, or after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_read_back_exactly_as_written() -> Result<()> {
    let server = TestServer::start().await?;
    let path = "/v1/entities/appointment/n";
    let raw = |body: &'static str| {
        server
            .client()
            .patch(server.url(path))
            .header("content-type", "application/merge-patch+json")
            .body(body)
    };
    // 0.45169690784018524 is the shortest text of its double; the parser without
    // `float_roundtrip` lands on the next one, 0.4516969078401853.
    let exact: f64 = "0.45169690784018524".parse()?;
    let steps = [
        (r#"{"x": 0.45169690784018524}"#, true, json!({"x": exact})),
        (r#"{"x": -0.0}"#, true, json!({"x": 0.0})),
        (r#"{"x": 0.0}"#, false, json!({"x": 0.0})),
        (
            r#"{"y": [-0.0, {"z": -0.0}]}"#,
            true,
            json!({"x": 0.0, "y": [0.0, {"z": 0.0}]}),
        ),
        (
            r#"{"y": [0.0, {"z": 0.0}]}"#,
            false,
            json!({"x": 0.0, "y": [0.0, {"z": 0.0}]}),
        ),
    ];
    // Every float in `value`, with its sign: `assert_eq!` on JSON alone would take -0.0 for 0.0.
    fn floats(value: &Value, out: &mut Vec<(f64, bool)>) {
        match value {
            Value::Number(number) if number.is_f64() => {
                let float = number.as_f64().unwrap_or(f64::NAN);
                out.push((float, float.is_sign_negative()));
            }
            Value::Array(items) => items.iter().for_each(|item| floats(item, out)),
            Value::Object(fields) => fields.values().for_each(|field| floats(field, out)),
            _ => {}
        }
    }
    let signed = |value: &Value| {
        let mut out = Vec::new();
        floats(value, &mut out);
        out
    };
    let mut versions = Vec::new();
    let mut last = String::new();
    for (body, changes, expected) in &steps {
        let (status, written) = server.json(raw(body)).await?;
        assert!(status == 200 || status == 201, "{body}: {written}");
        let version = version_of(&written)?;
        assert_eq!(version != last, *changes, "{body}");
        last = version.clone();
        let (_, read) = server.get(path).await?;
        assert_eq!(read["data"], *expected, "{body}");
        assert_eq!(signed(&read["data"]), signed(expected), "{body}");
        versions.push((version, expected.clone()));
    }
    let dir = server.stop().await?;
    let server = TestServer::start_in(dir, "").await?;
    for (version, expected) in &versions {
        let (status, read) = server.get(&format!("{path}?at={version}")).await?;
        assert_eq!(status, 200, "{read}");
        assert_eq!(read["data"], *expected);
        assert_eq!(signed(&read["data"]), signed(expected));
    }
    Ok(())
}
