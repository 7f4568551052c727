//! A store in a temp dir that a test can close and reopen, and small helpers to build inputs.

use std::path::Path;

use serde_json::{Map, Value as Json};
use store::{EntityKey, Origin, Store, StoreConfig, Version, WriteOptions};
use tempfile::TempDir;

/// A store in its own temp dir; the dir lives as long as the harness.
pub struct Harness {
    pub dir: TempDir,
    store: Option<Store>,
}

impl Harness {
    pub fn open() -> Self {
        Self::with_config(|_| {})
    }

    pub fn with_config(adjust: impl Fn(&mut StoreConfig)) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Some(open_in(dir.path(), &adjust));
        Self { dir, store }
    }

    pub fn store(&self) -> &Store {
        self.store.as_ref().expect("the store is open")
    }

    /// Closes the store, drops it and opens the same directory again.
    pub fn reopen(&mut self) {
        self.reopen_with(|_| {});
    }

    pub fn reopen_with(&mut self, adjust: impl Fn(&mut StoreConfig)) {
        let store = self.store.take().expect("the store is open");
        store.close().expect("closing flushes");
        drop(store);
        self.store = Some(open_in(self.dir.path(), &adjust));
    }
}

pub fn open_in(path: &Path, adjust: &dyn Fn(&mut StoreConfig)) -> Store {
    let mut config = StoreConfig::new(path);
    config.sled_cache_bytes = 4 * 1024 * 1024;
    adjust(&mut config);
    Store::open(config).expect("the store opens")
}

pub fn key(kind: &str, id: &str) -> EntityKey {
    EntityKey::new(kind, id).expect("a valid key")
}

pub fn local(name: &str) -> WriteOptions {
    WriteOptions::new(Origin::local(name).expect("a valid origin"))
}

pub fn if_match(name: &str, version: &str) -> WriteOptions {
    let mut options = local(name);
    options.if_match = Some(Version::parse(version).expect("a valid version").into());
    options
}

pub fn object(value: Json) -> Map<String, Json> {
    match value {
        Json::Object(map) => map,
        other => panic!("{other} is not an object"),
    }
}

/// The fields of an entity that exists, as one JSON object.
pub fn data(store: &Store, entity: &EntityKey) -> Json {
    Json::Object(store.get(entity).unwrap().expect("the entity exists").data)
}
