//! A single store against a plain model: after any sequence of merge patches, replaces and
//! deletes, the entity reads exactly as `serde_json` values that RFC 7386 was applied to.
//!
//! The store's rules, which the model encodes:
//! - an entity is its root object; a root with no fields reads as absent (`get` is `None`), and
//!   a write that would create an entity with no fields changes nothing;
//! - every other value is kept as written, empty nested objects `{}` included;
//! - `replace(fields)` is the merge patch of `fields` onto an empty object, so `null` fields and
//!   `null` inside nested objects are dropped; a replace with no non-null field is refused;
//! - arrays are values, written whole with every element verbatim (`null` included);
//! - numbers keep their flavour: integers that fit `i64` read back as `i64`, larger ones as `u64`,
//!   and floats as floats (`1.0` stays `1.0`).

use proptest::prelude::*;
use serde_json::{Map, Value as Json};
use store::Error;

use crate::harness::{key, local, Harness};
use crate::rfc7386::merge_patch;
use crate::strategies;

#[derive(Clone, Debug)]
enum Write {
    Patch(Map<String, Json>),
    Replace(Map<String, Json>),
    Delete,
    Reopen,
}

fn write() -> impl Strategy<Value = Write> {
    prop_oneof![
        8 => strategies::patch().prop_map(Write::Patch),
        2 => strategies::patch().prop_map(Write::Replace),
        1 => Just(Write::Delete),
        1 => Just(Write::Reopen),
    ]
}

proptest! {
    #![proptest_config(strategies::config())]

    #[test]
    fn a_store_applies_merge_patches_like_the_model(writes in prop::collection::vec(write(), 1..12)) {
        let mut harness = Harness::open();
        let entity = key("model", "1");
        let mut model = Json::Object(Map::new());
        for write in &writes {
            let store = harness.store();
            match write {
                Write::Patch(patch) => {
                    let patch = Json::Object(patch.clone());
                    let before = model.clone();
                    merge_patch(&mut model, &patch);
                    let written = store.patch(&entity, &patch, &local("u")).unwrap();
                    prop_assert_eq!(written.seq.is_some(), before != model, "patch {}", patch);
                }
                Write::Replace(fields) => {
                    let fields = Json::Object(fields.clone());
                    let mut replaced = Json::Object(Map::new());
                    merge_patch(&mut replaced, &fields);
                    match store.replace(&entity, &fields, &local("u")) {
                        Err(Error::UnwritableValue(_)) => {
                            prop_assert_eq!(&replaced, &Json::Object(Map::new()));
                        }
                        Ok(written) => {
                            prop_assert_eq!(written.seq.is_some(), replaced != model);
                            model = replaced;
                        }
                        Err(other) => return Err(TestCaseError::fail(other.to_string())),
                    }
                }
                Write::Delete => {
                    let deleted = store.delete(&entity, &local("u")).unwrap();
                    prop_assert_eq!(deleted.is_some(), model != Json::Object(Map::new()));
                    model = Json::Object(Map::new());
                }
                Write::Reopen => {
                    // A reopen restores the entity byte for byte: same version, same saved bytes.
                    let saved = store.save(&entity).unwrap();
                    let version = store.get(&entity).unwrap().map(|entity| entity.version);
                    harness.reopen();
                    let store = harness.store();
                    prop_assert_eq!(store.save(&entity).unwrap(), saved);
                    prop_assert_eq!(store.get(&entity).unwrap().map(|entity| entity.version), version);
                }
            }
            let read = harness.store().get(&entity).unwrap();
            match &model {
                Json::Object(fields) if fields.is_empty() => prop_assert_eq!(read, None),
                _ => prop_assert_eq!(Json::Object(read.unwrap().data), model.clone()),
            }
        }
    }
}
