//! The plain model of a JSON merge patch: RFC 7386 `MergePatch(target, patch)` on `serde_json`
//! values, with no store involved. The fuzz workspace includes this file too (`fuzz/src/lib.rs`),
//! so the property tests and the fuzz target check the store against one model.

use serde_json::{Map, Value as Json};

/// RFC 7386 `MergePatch(target, patch)`.
pub fn merge_patch(target: &mut Json, patch: &Json) {
    let Json::Object(patch_fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Json::Object(Map::new());
    }
    let Json::Object(target_fields) = target else {
        unreachable!("made an object above")
    };
    for (name, value) in patch_fields {
        if value.is_null() {
            target_fields.remove(name);
        } else {
            merge_patch(
                target_fields.entry(name.clone()).or_insert(Json::Null),
                value,
            );
        }
    }
}
