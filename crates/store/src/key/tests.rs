//! Kind and id validation: what is accepted, what is refused, and that a refusal names the part.

use super::*;

#[test]
fn accepts_names_in_the_grammar() {
    for name in [
        "a",
        "appointment",
        "A-1_b.c",
        "0",
        "..a",
        "a..",
        &"x".repeat(128),
    ] {
        assert_eq!(Kind::new(name).unwrap().as_str(), name);
        assert_eq!(EntityId::new(name).unwrap().as_str(), name);
    }
}

#[test]
fn refuses_names_outside_the_grammar() {
    let too_long = "x".repeat(129);
    for name in [
        "", ".", "..", "a/b", "a b", "a\0b", "é", "a:b", "a%2F", &too_long, "a\n",
    ] {
        assert!(
            matches!(Kind::new(name), Err(Error::Invalid { what: "kind", .. })),
            "{name:?} was accepted as a kind"
        );
        assert!(
            matches!(EntityId::new(name), Err(Error::Invalid { what: "id", .. })),
            "{name:?} was accepted as an id"
        );
    }
}

#[test]
fn entity_key_names_the_wrong_part() {
    assert!(matches!(
        EntityKey::new("bad kind", "1"),
        Err(Error::Invalid { what: "kind", .. })
    ));
    assert!(matches!(
        EntityKey::new("appointment", "bad/id"),
        Err(Error::Invalid { what: "id", .. })
    ));
    let key = EntityKey::new("appointment", "1").unwrap();
    assert_eq!(key.to_string(), "appointment/1");
}

#[test]
fn deserializing_validates() {
    let key: EntityKey = serde_json::from_str(r#"{"kind":"a","id":"b"}"#).unwrap();
    assert_eq!(key, EntityKey::new("a", "b").unwrap());
    assert!(serde_json::from_str::<EntityKey>(r#"{"kind":"a","id":"b/c"}"#).is_err());
    assert!(serde_json::from_str::<Kind>(r#""""#).is_err());
}
