//! Version strings: sorted and deduplicated heads, the round trip, and hostile input.

use super::*;

fn hash(byte: u8) -> ChangeHash {
    ChangeHash([byte; 32])
}

#[test]
fn round_trips_sorted_and_deduplicated() {
    let version = Version::from_heads(vec![hash(3), hash(1), hash(3)]);
    assert_eq!(version.heads(), &[hash(1), hash(3)]);
    let text = version.to_string();
    assert_eq!(text, format!("{}.{}", "01".repeat(32), "03".repeat(32)));
    assert_eq!(Version::parse(&text).unwrap(), version);
    // An ETag comes back quoted and maybe padded.
    assert_eq!(Version::parse(&format!(" \"{text}\" ")).unwrap(), version);
    // Order of the parts does not matter.
    let swapped = format!("{}.{}", "03".repeat(32), "01".repeat(32));
    assert_eq!(Version::parse(&swapped).unwrap(), version);
}

#[test]
fn refuses_malformed_versions() {
    let good = "ab".repeat(32);
    let too_many = vec![good.as_str(); 65].join(".");
    for value in [
        "",
        "\"\"",
        "abc",
        &"zz".repeat(32),
        &"ab".repeat(33),
        &format!("{good}."),
        &format!(".{good}"),
        &format!("{good}..{good}"),
        &too_many,
        "é".repeat(32).as_str(),
        // Quotes come in pairs, once.
        &format!("\"{good}"),
        &format!("{good}\""),
        &format!("\"\"{good}\"\""),
    ] {
        assert!(
            matches!(
                Version::parse(value),
                Err(Error::Invalid {
                    what: "version",
                    ..
                })
            ),
            "{value:?} was accepted"
        );
    }
    assert!(Version::parse(&vec![good.as_str(); 64].join(".")).is_ok());
}

#[test]
fn empty_version_displays_as_empty() {
    assert_eq!(Version::default().to_string(), "");
    assert!(Version::default().heads().is_empty());
}

#[test]
fn an_error_does_not_echo_a_long_input_whole() {
    let long = "x".repeat(60_000);
    let Err(Error::Invalid { detail, .. }) = Version::parse(&long) else {
        panic!("a 60,000-byte version was accepted");
    };
    assert!(detail.len() < 200, "{} bytes of detail", detail.len());
    assert!(detail.contains("60000 bytes"), "{detail}");
    // A multi-byte character where the cut falls does not panic.
    let Err(Error::Invalid { detail, .. }) = Version::parse(&"é".repeat(100)) else {
        panic!("accepted");
    };
    assert!(detail.contains("200 bytes"), "{detail}");
}
