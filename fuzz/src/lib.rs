//! What the fuzz targets share: one store opened once per fuzzing process, fresh entity keys so
//! that every input starts from the same state, and the plain RFC 7386 model.
//!
//! Opening sled for every input would spend the fuzzing time on `open`; instead each input gets
//! entities of its own in one long-lived store, so runs stay independent and reproducible
//! (except `session_frames`, whose inputs name their entities: see its header).
//! The targets themselves live in `fuzz_targets/`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use serde_json::Value as Json;
use store::{EntityKey, Store, StoreConfig};

/// The store every input of this process writes to, in a temp dir that lives as long as it.
pub fn store() -> &'static Store {
    static STORE: OnceLock<(tempfile::TempDir, Store)> = OnceLock::new();
    &STORE
        .get_or_init(|| {
            // libfuzzer-sys installs a panic hook that aborts, which would turn the panics the
            // store catches (automerge 0.12 panics on some inputs) into crashes. A panic that
            // escapes the store still aborts: libfuzzer-sys catches it around every input.
            std::panic::set_hook(Box::new(|_| {}));
            let dir = tempfile::tempdir().expect("a temp dir for the fuzzing store");
            let mut config = StoreConfig::new(dir.path());
            config.cache_entries = 64;
            let store = Store::open(config).expect("the fuzzing store opens");
            (dir, store)
        })
        .1
}

/// A key no earlier input of this process has used.
pub fn fresh_key(kind: &str) -> EntityKey {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    EntityKey::new(kind, id.to_string()).expect("a kind from the targets and a number are valid")
}

// The same model the store's property tests use, so both check the store against one model.
#[path = "../../crates/store/tests/store/rfc7386.rs"]
mod rfc7386;

pub use rfc7386::merge_patch;

/// Whether the store accepts a value: no empty field name and at most `store::MAX_DEPTH` levels.
pub fn is_writable(value: &Json, depth: usize) -> bool {
    if depth > store::MAX_DEPTH {
        return false;
    }
    match value {
        Json::Object(fields) => fields
            .iter()
            .all(|(name, child)| !name.is_empty() && is_writable(child, depth + 1)),
        Json::Array(items) => items.iter().all(|item| is_writable(item, depth + 1)),
        _ => true,
    }
}
