//! What the public API cannot show: how an entity is laid out in sled as it is edited and
//! compacted (chunks after a snapshot, then a snapshot alone).

use serde_json::json;

use super::*;

fn open(dir: &std::path::Path, compact_after_chunks: u32) -> Store {
    let mut config = StoreConfig::new(dir);
    config.compact_after_chunks = compact_after_chunks;
    config.sled_cache_bytes = 1024 * 1024;
    Store::open(config).unwrap()
}

fn chunk_count(store: &Store, key: &EntityKey) -> usize {
    store
        .inner
        .db
        .scan_prefix(layout::chunk_prefix(key))
        .count()
}

fn has_snapshot(store: &Store, key: &EntityKey) -> bool {
    store
        .inner
        .db
        .contains_key(layout::entity_key(layout::SNAPSHOT, key))
        .unwrap()
}

#[test]
fn edits_become_chunks_and_compaction_folds_them_into_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 8);
    let key = EntityKey::new("appointment", "1").unwrap();
    let options = WriteOptions::new(Origin::local("u").unwrap());
    store.patch(&key, &json!({"n": 0}), &options).unwrap();
    assert_eq!(chunk_count(&store, &key), 1);
    assert!(!has_snapshot(&store, &key));
    let mut max_chunks = 0;
    for n in 1..100 {
        store.patch(&key, &json!({ "n": n }), &options).unwrap();
        let chunks = chunk_count(&store, &key);
        max_chunks = max_chunks.max(chunks);
        let record = store.record(&key).unwrap().unwrap();
        assert_eq!(record.chunks as usize, chunks);
        assert!(record.exists);
    }
    assert!(max_chunks < 8, "{max_chunks} chunks built up");
    assert!(has_snapshot(&store, &key));
    let had_chunks = chunk_count(&store, &key) > 0;
    assert_eq!(store.compact_all().unwrap(), usize::from(had_chunks));
    assert_eq!(chunk_count(&store, &key), 0);
    let record = store.record(&key).unwrap().unwrap();
    assert_eq!(record.chunks, 0);
    assert_eq!(record.chunk_bytes, 0);
    let snapshot = store
        .inner
        .db
        .get(layout::entity_key(layout::SNAPSHOT, &key))
        .unwrap()
        .unwrap();
    assert_eq!(record.snapshot_bytes, snapshot.len() as u64);
    assert_eq!(record.version, store.get(&key).unwrap().unwrap().version);
}

#[test]
fn a_record_follows_the_entity_through_delete_and_recreate() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 32);
    let key = EntityKey::new("appointment", "1").unwrap();
    let options = WriteOptions::new(Origin::local("u").unwrap());
    store.patch(&key, &json!({"a": 1}), &options).unwrap();
    let deleted = store.delete(&key, &options).unwrap().unwrap();
    let record = store.record(&key).unwrap().unwrap();
    assert!(!record.exists);
    assert_eq!(record.version, deleted.version);
    store.patch(&key, &json!({"a": 2}), &options).unwrap();
    assert!(store.record(&key).unwrap().unwrap().exists);
}
