//! Mapping declarations from configuration files: parsing and validation never panic, and a
//! mapping that validates maps any entity out, and its own output back in, without panicking.

#![no_main]

use std::collections::BTreeMap;

use connectors::{FieldSpec, Mapping};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(fields) = toml::from_str::<BTreeMap<String, FieldSpec>>(text) else {
        return;
    };
    let Ok(mapping) = Mapping::new("id", &fields) else {
        return;
    };
    let entity = json!({"date": "2026-12-01", "site": {"code": 7}, "slot": 3, "flag": true});
    let entity = entity.as_object().expect("an object");
    if let Ok(out) = mapping.to_external(entity) {
        let mut body: serde_json::Map<String, serde_json::Value> = out.into_iter().collect();
        body.insert("id".into(), json!("1"));
        let _ = mapping.to_entity(&body);
    }
});
