//! Connector configuration parsing and validation.

use std::collections::BTreeMap;

use super::*;

fn parse(text: &str) -> Vec<ConnectorConfig> {
    #[derive(Deserialize)]
    struct File {
        connectors: Vec<ConnectorConfig>,
    }
    toml::from_str::<File>(text).expect("parses").connectors
}

const EXAMPLE: &str = r#"
[[connectors]]
name = "state-scheduler"
kind = "appointment"
id_field = "apptId"
url = "http://127.0.0.1:9000/appointments/sync"
method = "POST"
signing_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
webhook_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
headers = { Authorization = "Bearer ${SCHEDULER_TOKEN}" }
version_field = "updatedAt"
[connectors.fields]
scheduledDate = "date"
officeCode = "site.code"
[connectors.retry]
schedule = ["0s", "5s", "30s", "5m", "30m", "2h", "6h", "12h"]
"#;

fn env() -> BTreeMap<String, String> {
    BTreeMap::from([("SCHEDULER_TOKEN".to_string(), "t0ken".to_string())])
}

#[test]
fn the_documented_example_validates() {
    let connectors = validate_all(&parse(EXAMPLE), &env()).expect("valid");
    let connector = &connectors[0];
    assert_eq!(connector.name, "state-scheduler");
    assert_eq!(connector.headers[0].1 .0, "Bearer t0ken");
    assert_eq!(connector.retry_schedule[4], Duration::from_secs(1800));
    assert_eq!(
        connector.dedupe_retention,
        Duration::from_secs(4 * 86400 + 3600)
    );
    assert!(
        !format!("{connector:?}").contains("t0ken"),
        "secrets stay out of Debug"
    );
}

#[test]
fn errors_name_the_key() {
    let cases = [
        (
            "signing_secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"",
            "signing_secret = \"\"",
            "signing_secret",
        ),
        (
            "webhook_secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"",
            "webhook_secret = \"whsec_\"",
            "webhook_secret",
        ),
        ("kind = \"appointment\"", "kind = \"bad kind\"", "kind"),
        (
            "url = \"http://127.0.0.1:9000/appointments/sync\"",
            "url = \"ftp://x\"",
            "url",
        ),
        (
            "Bearer ${SCHEDULER_TOKEN}",
            "Bearer ${MISSING}",
            "headers.Authorization",
        ),
        (
            "officeCode = \"site.code\"",
            "officeCode = \"date\"",
            "fields",
        ),
        (
            "schedule = [\"0s\", \"5s\", \"30s\", \"5m\", \"30m\", \"2h\", \"6h\", \"12h\"]",
            "schedule = []",
            "retry.schedule",
        ),
        ("id_field = \"apptId\"", "id_field = \"\"", "id_field"),
        (
            "url = \"http://127.0.0.1:9000/appointments/sync\"",
            "url = \"http://127.0.0.1:99999/x\"",
            "url",
        ),
        (
            "url = \"http://127.0.0.1:9000/appointments/sync\"",
            "url = \"http://127.0.0.1:9000/a b\"",
            "url",
        ),
        (
            "Authorization = \"Bearer ${SCHEDULER_TOKEN}\"",
            "Idempotency-Key = \"fixed\"",
            "headers.Idempotency-Key",
        ),
        (
            "Authorization = \"Bearer ${SCHEDULER_TOKEN}\"",
            "lockstep-version = \"forged\"",
            "headers.lockstep-version",
        ),
        (
            "Authorization = \"Bearer ${SCHEDULER_TOKEN}\"",
            "Host = \"evil.example\"",
            "headers.Host",
        ),
        (
            "version_field = \"updatedAt\"",
            "version_field = \"scheduledDate\"",
            "version_field",
        ),
        (
            "version_field = \"updatedAt\"",
            "version_field = \"apptId\"",
            "version_field",
        ),
        (
            "version_field = \"updatedAt\"",
            "version_field = \"updatedAt\"\ndedupe_retention = \"0s\"",
            "dedupe_retention",
        ),
        (
            "version_field = \"updatedAt\"",
            "version_field = \"updatedAt\"\ntimestamp_tolerance = \"0s\"",
            "timestamp_tolerance",
        ),
        (
            "version_field = \"updatedAt\"",
            "version_field = \"updatedAt\"\ntimestamp_tolerance = \"1500ms\"",
            "timestamp_tolerance",
        ),
        (
            "version_field = \"updatedAt\"",
            "version_field = \"updatedAt\"\ndedupe_retention = \"9m\"\ntimestamp_tolerance = \"5m\"",
            "dedupe_retention",
        ),
        (
            "scheduledDate = \"date\"\nofficeCode = \"site.code\"\n",
            "",
            "fields",
        ),
    ];
    for (from, to, key) in cases {
        let text = EXAMPLE.replace(from, to);
        let error = validate_all(&parse(&text), &env()).expect_err(to);
        assert_eq!(error.key, key, "{to}: {error}");
        assert!(error.to_string().contains("state-scheduler"), "{error}");
    }
}

#[test]
fn unknown_keys_and_bad_durations_are_parse_errors() {
    #[derive(Debug, Deserialize)]
    #[allow(dead_code, reason = "only parsing is tested")]
    struct File {
        connectors: Vec<ConnectorConfig>,
    }
    let typo = EXAMPLE.replace("version_field", "versoin_field");
    let error = toml::from_str::<File>(&typo).expect_err("unknown key");
    assert!(error.to_string().contains("versoin_field"), "{error}");
    let bad = EXAMPLE.replace("\"30m\"", "\"soon\"");
    let error = toml::from_str::<File>(&bad).expect_err("bad duration");
    assert!(error.to_string().contains("soon"), "{error}");
    let negative = EXAMPLE.replace(
        "version_field = \"updatedAt\"",
        "version_field = \"updatedAt\"\ndedupe_index_ids = -1",
    );
    let error = toml::from_str::<File>(&negative).expect_err("a negative bound");
    assert!(error.to_string().contains("dedupe_index_ids"), "{error}");
}

#[test]
fn the_index_bound_defaults_and_may_be_zero() {
    let connectors = validate_all(&parse(EXAMPLE), &env()).expect("valid");
    assert_eq!(connectors[0].dedupe_index_ids, 900_000);
    let text = EXAMPLE.replace(
        "version_field = \"updatedAt\"",
        "version_field = \"updatedAt\"\ndedupe_index_ids = 0",
    );
    let connectors = validate_all(&parse(&text), &env()).expect("valid");
    assert_eq!(connectors[0].dedupe_index_ids, 0);
}

#[test]
fn dot_names_are_refused() {
    for name in [".", ".."] {
        let text = EXAMPLE.replace("name = \"state-scheduler\"", &format!("name = \"{name}\""));
        let error = validate_all(&parse(&text), &env()).expect_err(name);
        assert_eq!(error.key, "name", "{error}");
    }
}

#[test]
fn duplicate_names_are_refused() {
    let twice = format!("{EXAMPLE}\n{EXAMPLE}");
    let error = validate_all(&parse(&twice), &env()).expect_err("duplicate");
    assert_eq!(error.key, "name");
}

#[test]
fn a_connector_needs_a_direction() {
    let text = EXAMPLE
        .replace("url = \"http://127.0.0.1:9000/appointments/sync\"\n", "")
        .replace(
            "webhook_secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n",
            "",
        );
    let error = validate_all(&parse(&text), &env()).expect_err("neither direction");
    assert_eq!(error.key, "url");
}
