//! Merge patches from outside (PATCH bodies): the store's result equals the plain model's.
//!
//! An input that is a JSON object is one patch; a JSON array of objects is a sequence of patches
//! to one fresh entity. After every patch the entity reads exactly as `lockstep_fuzz::merge_patch`
//! applied to `serde_json` values (absent when it has no fields), or the store refused a value it
//! cannot hold (an empty field name, nesting deeper than `store::MAX_DEPTH`) and changed nothing.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value as Json};
use store::{Error, Origin, WriteOptions};

fuzz_target!(|data: &[u8]| {
    let Ok(input) = serde_json::from_slice::<Json>(data) else {
        return;
    };
    let patches = match input {
        Json::Object(_) => vec![input],
        Json::Array(items) => items.into_iter().filter(Json::is_object).collect(),
        _ => return,
    };
    let store = lockstep_fuzz::store();
    let entity = lockstep_fuzz::fresh_key("patch");
    let options = WriteOptions::new(Origin::local("fuzz").expect("a valid origin"));
    let mut model = Json::Object(Map::new());
    for patch in &patches {
        match store.patch(&entity, patch, &options) {
            Ok(_) => {
                assert!(lockstep_fuzz::is_writable(patch, 0), "accepted {patch}");
                lockstep_fuzz::merge_patch(&mut model, patch);
            }
            Err(Error::UnwritableValue(_)) => {
                assert!(!lockstep_fuzz::is_writable(patch, 0), "refused {patch}");
            }
            Err(other) => panic!("patch {patch} failed: {other}"),
        }
        let read = store.get(&entity).expect("reading back works");
        match (&model, read) {
            (Json::Object(fields), None) if fields.is_empty() => {}
            (expected, Some(entity)) => assert_eq!(&Json::Object(entity.data), expected),
            (expected, None) => panic!("expected {expected}, the entity is absent"),
        }
    }
});
