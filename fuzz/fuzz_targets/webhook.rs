//! Webhook requests from outside: headers and body through signature verification and the
//! connector mapping.
//!
//! The input is `timestamp \n signature \n body`. Verification never panics, whatever the
//! headers. A body the mapping accepts gives a merge patch that is a fixed point of the round
//! trip: mapped back out and in again it is the same patch, so nothing a system sends us is
//! changed by passing through Lockstep twice.

#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use connectors::{FieldSpec, Mapping, WebhookSecret};
use libfuzzer_sys::fuzz_target;
use serde_json::Value as Json;

fn mapping() -> &'static Mapping {
    static MAPPING: OnceLock<Mapping> = OnceLock::new();
    MAPPING.get_or_init(|| {
        let fields: BTreeMap<String, FieldSpec> = toml::from_str(
            r#"
            scheduledDate = "date"
            officeCode = "site.code"
            slot = { field = "slot", entity = "number", external = "string" }
            confirmed = { field = "confirmed", entity = "boolean", external = "string" }
            visit = { field = "visit", entity_format = "%Y-%m-%d", external_format = "%d/%m/%Y" }
            "#,
        )
        .expect("the fixed mapping parses");
        Mapping::new("apptId", &fields).expect("the fixed mapping is valid")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |byte| *byte == b'\n');
    let timestamp = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let signature = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let body = parts.next().unwrap_or_default();
    let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("valid");
    let _ = secret.verify("msg_fuzz", &timestamp, &signature, body, 1_700_000_000, 300);

    let Ok(Json::Object(body)) = serde_json::from_slice::<Json>(body) else {
        return;
    };
    let Ok(inbound) = mapping().to_entity(&body) else {
        return;
    };
    let patch = inbound.patch.as_object().cloned().unwrap_or_default();
    let out = mapping()
        .to_external(&patch)
        .expect("a value that was cast in can be cast out");
    let mut again: serde_json::Map<String, Json> = out.into_iter().collect();
    again.insert("apptId".into(), Json::String(inbound.id.clone()));
    let twice = mapping()
        .to_entity(&again)
        .expect("what went out comes back in");
    assert_eq!(
        twice.patch, inbound.patch,
        "the round trip changed {body:?}"
    );
});
