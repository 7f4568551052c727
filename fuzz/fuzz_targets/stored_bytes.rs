//! Automerge bytes from outside (replicas, clients, a damaged disk) through `Store::merge`.
//!
//! Whatever the bytes, `merge` returns `Ok` or `Err(Error::Decode)` and never panics, both on an
//! entity that does not exist yet (automerge's `load` path) and on one that does
//! (`load_incremental`); on `Err`, and on an `Ok` that merged nothing, the entity is unchanged.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::json;
use store::{EntityKey, Error, Origin, Store, WriteOptions};

/// The saved bytes of a small entity, which every input's "existing" entity starts from.
fn seed_document() -> &'static [u8] {
    static SEED: OnceLock<Vec<u8>> = OnceLock::new();
    SEED.get_or_init(|| {
        let store = lockstep_fuzz::store();
        let entity = lockstep_fuzz::fresh_key("seed");
        let options = WriteOptions::new(Origin::local("fuzz").expect("a valid origin"));
        store
            .patch(
                &entity,
                &json!({"a": 1, "site": {"code": "N"}, "tags": ["x"]}),
                &options,
            )
            .expect("the seed entity is written");
        store
            .save(&entity)
            .expect("the seed entity is read")
            .expect("the seed entity exists")
    })
}

fn check_merge(store: &Store, entity: &EntityKey, data: &[u8], origin: &Origin) {
    let before = store.save(entity).expect("reading works");
    match store.merge(entity, data, origin) {
        Ok(written) if written.seq.is_some() => {}
        Ok(_) | Err(Error::Decode(_)) => {
            assert_eq!(store.save(entity).expect("reading works"), before);
        }
        Err(other) => panic!("merge failed with {other}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let store = lockstep_fuzz::store();
    let origin = Origin::parse("peer:fuzz").expect("a valid origin");
    let seed = seed_document();
    check_merge(store, &lockstep_fuzz::fresh_key("new"), data, &origin);
    let existing = lockstep_fuzz::fresh_key("existing");
    store
        .merge(&existing, seed, &origin)
        .expect("the seed document merges");
    check_merge(store, &existing, data, &origin);
});
