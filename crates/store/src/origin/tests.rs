//! Origin parsing: the four sources, the name grammar, and the round trip through a string.

use super::*;

#[test]
fn parses_every_source() {
    for value in [
        "local:alice",
        "connector:scheduler",
        "peer:north",
        "client:tablet-7",
        "local:alice@example.org",
        &format!("local:{}", "n".repeat(128)),
    ] {
        let origin = Origin::parse(value).unwrap();
        assert_eq!(origin.as_str(), value);
        assert_eq!(origin.to_string(), value);
        assert_eq!(String::from(origin.clone()), value);
        assert_eq!(Origin::try_from(value.to_owned()).unwrap(), origin);
    }
    assert_eq!(Origin::local("bob").unwrap().as_str(), "local:bob");
}

#[test]
fn refuses_bad_origins() {
    let too_long = format!("local:{}", "n".repeat(129));
    for value in [
        "",
        "alice",
        "local",
        "local:",
        ":alice",
        "admin:alice",
        "LOCAL:alice",
        "local:al ice",
        "local:a:b",
        "local:a/b",
        "peer:é",
        &too_long,
    ] {
        assert!(
            matches!(
                Origin::parse(value),
                Err(Error::Invalid { what: "origin", .. })
            ),
            "{value:?} was accepted"
        );
    }
    assert!(Origin::local("").is_err());
    assert!(serde_json::from_str::<Origin>(r#""admin:x""#).is_err());
}
