//! Bad input: every malformed request gets a 4xx with a `{"code", "detail"}` body, changes
//! nothing in the store, and leaves the server serving.

use anyhow::Result;
use lockstep_tests::{expect_error, TestServer};
use reqwest::{Method, RequestBuilder};
use serde_json::{json, Value};

const ENTITY: &str = "/v1/entities/appointment/1";
const JSON: Option<&str> = Some("application/json");

/// A server holding one entity, and what it looked like before the bad requests.
struct Fixture {
    server: TestServer,
    entity: Value,
    feed_len: u64,
}

impl Fixture {
    async fn start() -> Result<Self> {
        let server = TestServer::start().await?;
        let (status, _) = server.put(ENTITY, &json!({"status": "booked"})).await?;
        assert_eq!(status, 201);
        let (_, entity) = server.get(ENTITY).await?;
        let feed_len = server.feed_len();
        Ok(Self {
            server,
            entity,
            feed_len,
        })
    }

    /// Sends `request` and checks the error; then that nothing changed and the server still serves.
    async fn refuses(&self, request: RequestBuilder, status: u16, code: &str) -> Result<()> {
        let response = self.server.send(request).await?;
        expect_error(response, status, code).await?;
        assert_eq!(
            self.server.feed_len(),
            self.feed_len,
            "{code}: the feed grew"
        );
        let (status, entity) = self.server.get(ENTITY).await?;
        assert_eq!(status, 200, "{code}: the server stopped serving the entity");
        assert_eq!(entity, self.entity, "{code}: the entity changed");
        Ok(())
    }

    /// `refuses` for a GET of `path`.
    async fn refuses_get(&self, path: &str, status: u16, code: &str) -> Result<()> {
        self.refuses(self.get(path), status, code).await
    }

    /// `refuses` for a write of `body` with `content_type`.
    async fn refuses_write(
        &self,
        (method, path): (Method, &str),
        (content_type, body): (Option<&str>, &str),
        (status, code): (u16, &str),
    ) -> Result<()> {
        self.refuses(self.write(method, path, content_type, body), status, code)
            .await
    }

    fn write(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: &str,
    ) -> RequestBuilder {
        let mut request = self
            .server
            .client()
            .request(method, self.server.url(path))
            .body(body.to_string());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request
    }

    fn get(&self, path: &str) -> RequestBuilder {
        self.server.client().get(self.server.url(path))
    }

    async fn stop(self) -> Result<()> {
        self.server.stop().await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_400() -> Result<()> {
    let fixture = Fixture::start().await?;
    for method in [Method::PUT, Method::PATCH] {
        for body in [
            r#"{"status": "#,
            "{status: 1}",
            "",
            "\u{0}",
            r#"{"a": 1} trailing"#,
        ] {
            let target = (method.clone(), ENTITY);
            fixture
                .refuses_write(target, (JSON, body), (400, "invalid_json"))
                .await?;
        }
    }
    fixture.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_are_not_objects_are_422() -> Result<()> {
    let mut fixture = Fixture::start().await?;
    // A deleted entity is as absent as one that never existed.
    let gone = "/v1/entities/appointment/gone";
    let (status, _) = fixture.server.put(gone, &json!({"a": 1})).await?;
    assert_eq!(status, 201);
    let deleted = fixture.write(Method::DELETE, gone, None, "");
    assert_eq!(fixture.server.send(deleted).await?.status(), 204);
    fixture.feed_len = fixture.server.feed_len();
    let deep = format!("{}1{}", "{\"a\":".repeat(40), "}".repeat(40));
    let mut cases = Vec::new();
    for method in [Method::PUT, Method::PATCH] {
        for body in ["[1, 2]", "\"text\"", "42", "null", "true"] {
            cases.push((method.clone(), ENTITY, body));
        }
    }
    cases.extend([
        // An entity needs a field; an empty key is no field name; nesting is bounded.
        (Method::PUT, ENTITY, "{}"),
        (Method::PUT, ENTITY, r#"{"a": null}"#),
        (Method::PATCH, ENTITY, r#"{"": 1}"#),
        (Method::PATCH, ENTITY, deep.as_str()),
        // A patch of only nulls, or of nothing, cannot create an entity, nor bring a deleted
        // one back.
        (
            Method::PATCH,
            "/v1/entities/appointment/new",
            r#"{"a": null}"#,
        ),
        (Method::PATCH, "/v1/entities/appointment/new", "{}"),
        (Method::PATCH, gone, r#"{"a": null}"#),
        (Method::PATCH, gone, "{}"),
    ]);
    for (method, path, body) in cases {
        let expected = (422, "unwritable_value");
        fixture
            .refuses_write((method, path), (JSON, body), expected)
            .await?;
    }
    assert_eq!(fixture.server.get(gone).await?.0, 404);
    fixture.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_json_by_content_type_is_415() -> Result<()> {
    let fixture = Fixture::start().await?;
    for method in [Method::PUT, Method::PATCH] {
        for content_type in [
            Some("text/plain"),
            Some("application/xml"),
            Some("application/x-www-form-urlencoded"),
            Some("application/json; charset=latin1"),
            Some("application/json; charset=\"utf-16\""),
            None,
        ] {
            let body = (content_type, r#"{"status": "moved"}"#);
            let expected = (415, "unsupported_media_type");
            fixture
                .refuses_write((method.clone(), ENTITY), body, expected)
                .await?;
        }
        // A body in an encoding nothing here decodes.
        for encoding in ["gzip", "br, identity"] {
            let request = fixture
                .write(method.clone(), ENTITY, JSON, r#"{"status": "moved"}"#)
                .header("content-encoding", encoding);
            fixture
                .refuses(request, 415, "unsupported_media_type")
                .await?;
        }
    }
    // UTF-8, however it is spelt, and an identity encoding are fine.
    for (content_type, encoding) in [
        ("application/json; charset=UTF-8", "identity"),
        ("application/merge-patch+json;charset=\"utf-8\"", "identity"),
    ] {
        let request = fixture
            .write(
                Method::PATCH,
                ENTITY,
                Some(content_type),
                r#"{"status": "booked"}"#,
            )
            .header("content-encoding", encoding);
        assert_eq!(fixture.server.send(request).await?.status(), 200);
    }
    fixture.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_kinds_and_ids_are_400() -> Result<()> {
    let fixture = Fixture::start().await?;
    let long_id = format!("/v1/entities/appointment/{}", "x".repeat(129));
    for (path, code) in [
        ("/v1/entities/bad%20kind/1", "invalid_kind"),
        ("/v1/entities/appointment/bad$id", "invalid_id"),
        (long_id.as_str(), "invalid_id"),
        ("/v1/entities/appointment/%C3%A9", "invalid_id"),
    ] {
        fixture.refuses_get(path, 400, code).await?;
        let body = (JSON, r#"{"a": 1}"#);
        fixture
            .refuses_write((Method::PATCH, path), body, (400, code))
            .await?;
    }
    for (path, code) in [
        ("/v1/entities/bad%2Fkind", "invalid_kind"),
        ("/v1/entities/appointment?after=bad$id", "invalid_id"),
        ("/v1/changes?kind=bad$kind", "invalid_kind"),
        // Segments that are not UTF-8 once decoded.
        ("/v1/connectors/%FF", "invalid_path"),
        ("/v1/connectors/%FF/dead-letters", "invalid_path"),
        ("/v1/peers/%FF", "invalid_path"),
        ("/v1/entities/%FF/1", "invalid_path"),
    ] {
        fixture.refuses_get(path, 400, code).await?;
    }
    let webhook = (Method::POST, "/v1/connectors/%FF/webhook");
    fixture
        .refuses_write(webhook, (JSON, "{}"), (400, "invalid_path"))
        .await?;
    fixture.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_version_strings_are_400() -> Result<()> {
    let fixture = Fixture::start().await?;
    let short = "ab".repeat(10);
    let not_hex = "zz".repeat(32);
    let weak = format!("W/\"{}\"", "ab".repeat(32));
    let current = fixture.entity["version"].as_str().unwrap().to_owned();
    let unbalanced = [format!("\"{current}"), format!("{current}\"\"")];
    for version in [
        "abc",
        &short,
        &not_hex,
        &weak,
        "\"\"",
        "a.b",
        &unbalanced[0],
        &unbalanced[1],
    ] {
        for (method, content_type, body) in [
            (Method::PATCH, JSON, r#"{"status": "x"}"#),
            (Method::DELETE, None, ""),
        ] {
            let request = fixture
                .write(method, ENTITY, content_type, body)
                .header("if-match", version);
            fixture.refuses(request, 400, "invalid_version").await?;
        }
    }
    for version in ["abc", &short, &not_hex, ""] {
        let path = format!("{ENTITY}?at={version}");
        fixture.refuses_get(&path, 400, "invalid_version").await?;
    }
    fixture.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_query_parameters_are_400() -> Result<()> {
    let fixture = Fixture::start().await?;
    for (path, code) in [
        ("/v1/entities/appointment?limit=0", "invalid_limit"),
        ("/v1/entities/appointment?limit=1001", "invalid_limit"),
        ("/v1/entities/appointment?limit=ten", "invalid_query"),
        ("/v1/entities/appointment?limt=10", "invalid_query"),
        ("/v1/changes?since=-1", "invalid_query"),
        ("/v1/changes?since=abc", "invalid_query"),
        ("/v1/changes?limit=0", "invalid_limit"),
        ("/v1/changes?limit=10001", "invalid_limit"),
        ("/v1/entities/appointment/1?when=now", "invalid_query"),
    ] {
        fixture.refuses_get(path, 400, code).await?;
    }
    // Routes that take no query refuse one rather than ignore it.
    for path in [
        "/v1/entities/appointment/1/history?limit=5",
        "/v1/entities/appointment/1/conflicts?all=true",
        "/v1/connectors?state=paused",
        "/v1/peers?name=north",
    ] {
        fixture.refuses_get(path, 400, "invalid_query").await?;
    }
    // The details name the parameter in plain words.
    let response = fixture.get("/v1/peers?name=north").send().await?;
    let body = expect_error(response, 400, "invalid_query").await?;
    assert_eq!(
        body["detail"], "this route takes no query parameters; `name` was given",
        "{body}"
    );
    let response = fixture.get("/v1/changes?since=abc").send().await?;
    let body = expect_error(response, 400, "invalid_query").await?;
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(detail.starts_with("bad query parameter: since: "), "{body}");
    let at = format!(
        "{ENTITY}?at={}",
        fixture.entity["version"].as_str().unwrap()
    );
    for method in [Method::PUT, Method::PATCH] {
        let body = (JSON, r#"{"status": "moved"}"#);
        fixture
            .refuses_write((method, &at), body, (400, "invalid_query"))
            .await?;
    }
    for last_event_id in ["yesterday", "+5", "-1", "", "1e3"] {
        let resume = fixture
            .get("/v1/changes")
            .header("accept", "text/event-stream")
            .header("last-event-id", last_event_id);
        fixture
            .refuses(resume, 400, "invalid_last_event_id")
            .await?;
    }
    fixture.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_are_404_and_wrong_methods_405() -> Result<()> {
    let fixture = Fixture::start().await?;
    for path in [
        "/",
        "/v2/entities/appointment/1",
        "/v1/entities",
        "/v1/entities/a/1/2/3",
        "/v1/changes/1",
    ] {
        fixture.refuses_get(path, 404, "no_route").await?;
    }
    for (method, path) in [
        (Method::POST, ENTITY),
        (Method::POST, "/v1/entities/appointment"),
        (Method::DELETE, "/v1/changes"),
        (Method::PUT, "/healthz"),
        (Method::POST, "/metrics"),
        (Method::PATCH, "/v1/entities/appointment/1/history"),
    ] {
        let request = fixture.write(method.clone(), path, JSON, "{}");
        let response = fixture.server.send(request).await?;
        assert!(
            response.headers().contains_key("allow"),
            "{method} {path} has no Allow header"
        );
        expect_error(response, 405, "method_not_allowed").await?;
    }
    fixture.stop().await
}
