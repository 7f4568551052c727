//! The spec's test vector and the mutation matrix.

use super::*;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
const TIMESTAMP: i64 = 1_614_265_330;
const BODY: &[u8] = br#"{"test": 2432232314}"#;
const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

fn secret() -> WebhookSecret {
    WebhookSecret::parse(SECRET).expect("the spec's secret parses")
}

#[test]
fn signs_the_spec_test_vector() {
    assert_eq!(secret().sign(ID, TIMESTAMP, BODY), SIGNATURE);
}

#[test]
fn verifies_the_spec_test_vector() {
    assert_eq!(
        secret().verify(ID, "1614265330", SIGNATURE, BODY, TIMESTAMP, 300),
        Ok(())
    );
}

#[test]
fn rejects_every_mutation() {
    let secret = secret();
    let mutated_body = br#"{"test": 2432232315}"#;
    assert_eq!(
        secret.verify(ID, "1614265330", SIGNATURE, mutated_body, TIMESTAMP, 300),
        Err(SignatureError::NoMatchingSignature)
    );
    assert_eq!(
        secret.verify("msg_other", "1614265330", SIGNATURE, BODY, TIMESTAMP, 300),
        Err(SignatureError::NoMatchingSignature)
    );
    assert_eq!(
        secret.verify(ID, "1614265331", SIGNATURE, BODY, TIMESTAMP, 300),
        Err(SignatureError::NoMatchingSignature)
    );
    let flipped = SIGNATURE.replace("g0hM", "g0hN");
    assert_eq!(
        secret.verify(ID, "1614265330", &flipped, BODY, TIMESTAMP, 300),
        Err(SignatureError::NoMatchingSignature)
    );
    let other = WebhookSecret::parse("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").expect("valid");
    assert_eq!(
        other.verify(ID, "1614265330", SIGNATURE, BODY, TIMESTAMP, 300),
        Err(SignatureError::NoMatchingSignature)
    );
    // Another scheme version with the right bytes is not a v1 signature.
    let v2 = SIGNATURE.replace("v1,", "v2,");
    assert_eq!(
        secret.verify(ID, "1614265330", &v2, BODY, TIMESTAMP, 300),
        Err(SignatureError::NoMatchingSignature)
    );
    assert_eq!(
        secret.verify("", "1614265330", SIGNATURE, BODY, TIMESTAMP, 300),
        Err(SignatureError::MissingHeader("webhook-id"))
    );
}

#[test]
fn accepts_one_valid_signature_among_several() {
    let header = format!("v1,bm90IGEgc2lnbmF0dXJl v1a,xyz {SIGNATURE} v1,%%%");
    assert_eq!(
        secret().verify(ID, "1614265330", &header, BODY, TIMESTAMP, 300),
        Ok(())
    );
}

#[test]
fn timestamp_tolerance_is_300_seconds_either_way() {
    let secret = secret();
    for skew in [-299i64, 299, -300, 300] {
        let timestamp = TIMESTAMP + skew;
        let signature = secret.sign(ID, timestamp, BODY);
        assert_eq!(
            secret.verify(ID, &timestamp.to_string(), &signature, BODY, TIMESTAMP, 300),
            Ok(()),
            "skew {skew}"
        );
    }
    for skew in [-301i64, 301] {
        let timestamp = TIMESTAMP + skew;
        let signature = secret.sign(ID, timestamp, BODY);
        assert_eq!(
            secret.verify(ID, &timestamp.to_string(), &signature, BODY, TIMESTAMP, 300),
            Err(SignatureError::StaleTimestamp {
                skew_seconds: 301,
                tolerance_seconds: 300
            }),
            "skew {skew}"
        );
    }
}

#[test]
fn crafted_timestamps_are_errors_not_panics() {
    let secret = secret();
    for timestamp in [
        "",
        "abc",
        "1e9",
        "-",
        "9223372036854775808",
        "1614265330.5",
        "-9223372036854775808",
        " 1614265330",
    ] {
        assert_eq!(
            secret.verify(ID, timestamp, SIGNATURE, BODY, TIMESTAMP, 300),
            Err(SignatureError::InvalidTimestamp),
            "{timestamp:?}"
        );
    }
    assert!(matches!(
        secret.verify(ID, &i64::MAX.to_string(), SIGNATURE, BODY, TIMESTAMP, 300),
        Err(SignatureError::StaleTimestamp { .. })
    ));
    assert!(matches!(
        secret.verify(ID, "0", SIGNATURE, BODY, i64::MAX, u64::MAX),
        Err(SignatureError::NoMatchingSignature)
    ));
}

#[test]
fn malformed_secrets_are_refused() {
    for value in [
        "",
        "whsec_",
        "whsec_!!!",
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "whsec_AAAA",
    ] {
        assert_eq!(
            WebhookSecret::parse(value),
            Err(SignatureError::MalformedSecret),
            "{value:?}"
        );
    }
    assert_eq!(format!("{:?}", secret()), "***");
}

/// The signature covers the timestamp header's text: another spelling of the same number is
/// refused, even when signed over the number as the spec writes it.
#[test]
fn a_timestamp_is_only_accepted_as_plain_decimal_digits() {
    let secret = secret();
    let signature = secret.sign(ID, TIMESTAMP, BODY);
    for spelling in [
        format!("+{TIMESTAMP}"),
        format!("0{TIMESTAMP}"),
        format!("00{TIMESTAMP}"),
    ] {
        assert_eq!(
            secret.verify(ID, &spelling, &signature, BODY, TIMESTAMP, 300),
            Err(SignatureError::InvalidTimestamp),
            "{spelling:?}"
        );
    }
    assert_eq!(
        secret.verify(ID, &TIMESTAMP.to_string(), &signature, BODY, TIMESTAMP, 300),
        Ok(())
    );
}
