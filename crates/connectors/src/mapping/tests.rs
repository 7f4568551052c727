//! Mapping declarations, both directions, and the out-then-in round trip.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::{json, Map, Value as Json};

use super::*;

fn declare(toml_text: &str) -> BTreeMap<String, FieldSpec> {
    toml::from_str(toml_text).expect("the test declaration parses")
}

fn appointment() -> Mapping {
    Mapping::new(
        "apptId",
        &declare(
            r#"
            scheduledDate = "date"
            officeCode = "site.code"
            slot = { field = "slot", entity = "number", external = "string" }
            confirmed = { field = "confirmed", entity = "boolean", external = "string" }
            visit = { field = "visit", entity_format = "%Y-%m-%d", external_format = "%d/%m/%Y" }
            "#,
        ),
    )
    .expect("a valid mapping")
}

fn object(value: Json) -> Map<String, Json> {
    value.as_object().expect("an object").clone()
}

#[test]
fn maps_an_entity_out() {
    let data = object(json!({
        "date": "2026-12-02", "site": {"code": "N1", "room": 4}, "slot": 12,
        "confirmed": true, "visit": "2026-12-24", "internal": "not sent"
    }));
    assert_eq!(
        appointment().to_external(&data),
        Ok(BTreeMap::from([
            ("confirmed".to_string(), json!("true")),
            ("officeCode".to_string(), json!("N1")),
            ("scheduledDate".to_string(), json!("2026-12-02")),
            ("slot".to_string(), json!("12")),
            ("visit".to_string(), json!("24/12/2026")),
        ]))
    );
}

#[test]
fn maps_a_webhook_in_and_reports_unknown_fields() {
    let inbound = appointment()
        .to_entity(&object(json!({
            "apptId": "123", "scheduledDate": "2026-12-03", "officeCode": null,
            "slot": "7", "visit": "01/02/2027", "colour": "red"
        })))
        .expect("maps");
    assert_eq!(inbound.id, "123");
    assert_eq!(
        inbound.patch,
        json!({"date": "2026-12-03", "site": {"code": null}, "slot": 7, "visit": "2027-02-01"})
    );
    assert_eq!(inbound.unknown, vec!["colour".to_string()]);
}

#[test]
fn numeric_ids_are_accepted_and_bad_ids_refused() {
    let mapping = appointment();
    assert_eq!(
        mapping
            .to_entity(&object(json!({"apptId": 42})))
            .map(|i| i.id),
        Ok("42".into())
    );
    for body in [
        json!({}),
        json!({"apptId": ""}),
        json!({"apptId": 1.5}),
        json!({"apptId": [1]}),
    ] {
        assert!(matches!(
            mapping.to_entity(&object(body)),
            Err(MappingError::MissingId(_))
        ));
    }
}

#[test]
fn uncastable_values_are_named() {
    let mapping = appointment();
    let error = mapping
        .to_entity(&object(json!({"apptId": "1", "slot": "seven"})))
        .expect_err("not a number");
    assert!(
        matches!(error, MappingError::Uncastable { ref field, .. } if field == "slot"),
        "{error}"
    );
    let error = mapping
        .to_entity(&object(json!({"apptId": "1", "visit": "2026-12-01"})))
        .expect_err("wrong date format");
    assert!(
        matches!(error, MappingError::Uncastable { ref field, .. } if field == "visit"),
        "{error}"
    );
    let error = mapping
        .to_external(&object(json!({"slot": "twelve"})))
        .expect_err("entity holds a string where a number is declared");
    assert!(
        matches!(error, MappingError::Uncastable { ref field, .. } if field == "slot"),
        "{error}"
    );
}

#[test]
fn a_time_format_on_a_bare_date_is_an_error_not_a_panic() {
    let mapping = Mapping::new(
        "id",
        &declare(r#"when = { field = "when", entity_format = "%Y-%m-%dT%H:%M", external_format = "%Y-%m-%dT%H:%M" }"#),
    )
    .expect("valid");
    assert!(mapping
        .to_external(&object(json!({"when": "2026-12-01"})))
        .is_err());
}

/// Formats that cannot carry a value out and back unchanged are refused when declared: what
/// one sends, the other would refuse or lose part of.
#[test]
fn date_formats_must_carry_a_value_out_and_back() {
    for (entity, external) in [
        ("%Y-%m-%d", "%d/%m"),
        ("abc", "def"),
        ("%Y-%m-%d", "%Y-%m-%dT%H:%M"),
        ("%Y-%m-%dT%H:%M", "%Y-%m-%d"),
    ] {
        let text = format!(
            r#"when = {{ field = "when", entity_format = "{entity}", external_format = "{external}" }}"#
        );
        match Mapping::new("id", &declare(&text)) {
            Err(MappingError::Invalid { key, .. }) => assert_eq!(key, "when", "{text}"),
            other => panic!("{text} gave {other:?}"),
        }
    }
    for (entity, external) in [
        ("%Y-%m-%d", "%d/%m/%Y"),
        ("%Y-%m-%dT%H:%M:%S", "%d.%m.%Y %H:%M:%S"),
    ] {
        let text = format!(
            r#"when = {{ field = "when", entity_format = "{entity}", external_format = "{external}" }}"#
        );
        assert!(Mapping::new("id", &declare(&text)).is_ok(), "{text}");
    }
}

#[test]
fn inconsistent_declarations_name_the_field() {
    let cases = [
        ("a = \"\"", "a"),
        ("\"\" = \"x\"", ""),
        ("a = \"x..y\"", "a"),
        ("a = \"site\"\nb = \"site.code\"", "b"),
        ("a = \"x\"\nb = \"x\"", "b"),
        ("id = \"x\"", "id"),
        ("a = { field = \"x\", entity = \"number\", external = \"boolean\" }", "a"),
        ("a = { field = \"x\", entity_format = \"%Y\" }", "a"),
        ("a = { field = \"x\", entity_format = \"%Q\", external_format = \"%Y\" }", "a"),
        ("a = { field = \"x\", entity = \"number\", entity_format = \"%Y\", external_format = \"%Y\" }", "a"),
    ];
    for (text, key) in cases {
        match Mapping::new("id", &declare(text)) {
            Err(MappingError::Invalid { key: named, .. }) => assert_eq!(named, key, "{text}"),
            other => panic!("{text} gave {other:?}"),
        }
    }
    assert!(
        toml::from_str::<BTreeMap<String, FieldSpec>>("a = { field = \"x\", typo = 1 }").is_err()
    );
}

fn entity_value(field: &str) -> BoxedStrategy<Json> {
    match field {
        "slot" => (-1000i64..1000).prop_map(Json::from).boxed(),
        "confirmed" => any::<bool>().prop_map(Json::from).boxed(),
        "visit" => (2000i32..2100, 1u32..13, 1u32..29)
            .prop_map(|(y, m, d)| json!(format!("{y:04}-{m:02}-{d:02}")))
            .boxed(),
        _ => "[a-zA-Z0-9 ]{0,12}".prop_map(Json::from).boxed(),
    }
}

proptest! {
    #[test]
    fn out_then_in_returns_every_mapped_field(
        present in proptest::collection::vec(any::<bool>(), 5),
        date in entity_value("date"),
        code in entity_value("officeCode"),
        slot in entity_value("slot"),
        confirmed in entity_value("confirmed"),
        visit in entity_value("visit"),
    ) {
        let mapping = appointment();
        let values = [("date", date), ("site.code", code), ("slot", slot), ("confirmed", confirmed), ("visit", visit)];
        let mut entity = Map::new();
        for ((path, value), keep) in values.into_iter().zip(present) {
            if keep {
                insert_path(&mut entity, &path.split('.').map(str::to_string).collect::<Vec<_>>(), value);
            }
        }
        let external = mapping.to_external(&entity).expect("valid values map out");
        let mut body: Map<String, Json> = external.into_iter().collect();
        body.insert("apptId".into(), json!("1"));
        let inbound = mapping.to_entity(&body).expect("what went out comes back in");
        prop_assert_eq!(Json::Object(entity), inbound.patch);
        prop_assert!(inbound.unknown.is_empty());
    }
}
