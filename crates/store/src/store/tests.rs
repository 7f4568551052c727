//! What the public API cannot show: how an entity is laid out in sled as it is edited and
//! compacted (chunks after a snapshot, then a snapshot alone).

use serde_json::json;

use super::*;

fn open(dir: &std::path::Path, compact_after_chunks: u32) -> Store {
    open_with(dir, |config| {
        config.compact_after_chunks = compact_after_chunks
    })
}

/// A store in `dir` with a small sled cache and whatever else `configure` sets.
fn open_with(dir: &std::path::Path, configure: impl FnOnce(&mut StoreConfig)) -> Store {
    let mut config = StoreConfig::new(dir);
    config.sled_cache_bytes = 1024 * 1024;
    configure(&mut config);
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
    // The writes after a compaction start from the compacted record, not one remembered from
    // before it (the record cache), and the cache holds what is on disk.
    for n in [100, 101] {
        store.patch(&key, &json!({ "n": n }), &options).unwrap();
    }
    let record = store.record(&key).unwrap().unwrap();
    assert_eq!(record.chunks, 2);
    assert_eq!(chunk_count(&store, &key), 2);
    assert_eq!(store.inner.records.get(&key), Some(record));
}

#[test]
fn the_record_cache_holds_what_is_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 4);
    let options = WriteOptions::new(Origin::local("u").unwrap());
    let keys: Vec<_> = (0..3)
        .map(|id| EntityKey::new("appointment", id.to_string()).unwrap())
        .collect();
    for n in 0..10 {
        for key in &keys {
            store.patch(key, &json!({ "n": n }), &options).unwrap();
            assert_eq!(store.inner.records.get(key), store.record(key).unwrap());
        }
    }
    store.delete(&keys[0], &options).unwrap();
    assert_eq!(
        store.inner.records.get(&keys[0]),
        store.record(&keys[0]).unwrap()
    );
    // A write that fails its precondition changes neither.
    let stale = Version::parse(&store.record(&keys[1]).unwrap().unwrap().version).unwrap();
    store.patch(&keys[1], &json!({"n": -1}), &options).unwrap();
    let mut conditional = options.clone();
    conditional.if_match = Some(stale.into());
    assert!(store
        .patch(&keys[1], &json!({"n": -2}), &conditional)
        .is_err());
    assert_eq!(
        store.inner.records.get(&keys[1]),
        store.record(&keys[1]).unwrap()
    );
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

/// The entity's saved bytes once its document is reloaded from disk (the cache holds none).
fn saved_after_reopen(dir: &std::path::Path, key: &EntityKey) -> Vec<u8> {
    let store = open_with(dir, |config| config.cache_entries = 0);
    store.save(key).unwrap().unwrap()
}

/// Merges what `from` holds of `key` into `to`.
fn copy_entity(from: &Store, to: &Store, key: &EntityKey, origin: &str) {
    let bytes = from.save(key).unwrap().unwrap();
    to.merge(key, &bytes, &Origin::parse(origin).unwrap())
        .unwrap();
}

/// Ten local edits of `key`, the first creating a nested map: they form a chain.
fn edit_ten_times(store: &Store, key: &EntityKey, options: &WriteOptions) {
    for n in 0..10 {
        store
            .patch(key, &json!({ "n": n, "site": {"code": n} }), options)
            .unwrap();
    }
    assert!(
        store.record(key).unwrap().unwrap().linear,
        "local edits form a chain"
    );
}

#[test]
fn a_chain_of_local_edits_loads_in_one_call_and_concurrent_history_one_change_at_a_time() {
    let (here, there) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let key = EntityKey::new("appointment", "1").unwrap();
    let saved_here = {
        let store = open(here.path(), 32);
        let options = WriteOptions::new(Origin::local("here").unwrap());
        edit_ten_times(&store, &key, &options);
        // A concurrent edit from another replica: two heads, so the chain is broken, and it stays
        // broken for the local edits after it until the next snapshot.
        let other = open(there.path(), 32);
        let options_there = WriteOptions::new(Origin::local("there").unwrap());
        copy_entity(&store, &other, &key, "peer:here");
        store.patch(&key, &json!({ "n": 100 }), &options).unwrap();
        other
            .patch(&key, &json!({ "m": 1 }), &options_there)
            .unwrap();
        copy_entity(&other, &store, &key, "peer:there");
        store.patch(&key, &json!({ "n": 101 }), &options).unwrap();
        let record = store.record(&key).unwrap().unwrap();
        assert!(!record.linear && !record.chain);
        assert!(record.chunks > 10, "no snapshot in between");
        // Another entity edited only here, past the first chunk: its chain loads in one call.
        let chained = EntityKey::new("appointment", "2").unwrap();
        edit_ten_times(&store, &chained, &options);
        assert!(store.record(&chained).unwrap().unwrap().chain);
        // A new entity whose first write makes a nested map holds two changes in its first
        // chunk (the map's structural change, then the edit): still one chain.
        let nested = EntityKey::new("appointment", "3").unwrap();
        store
            .patch(
                &nested,
                &json!({ "site": { "code": "N1" }, "n": 1 }),
                &options,
            )
            .unwrap();
        store.patch(&nested, &json!({ "n": 2 }), &options).unwrap();
        let record = store.record(&nested).unwrap().unwrap();
        assert!(record.chain, "{record:?}");
        assert_eq!(record.chunks, 2);
        let saved = (
            store.save(&key).unwrap().unwrap(),
            store.save(&chained).unwrap().unwrap(),
            store.save(&nested).unwrap().unwrap(),
        );
        store.close().unwrap();
        saved
    };
    assert_eq!(saved_after_reopen(here.path(), &key), saved_here.0);
    let chained = EntityKey::new("appointment", "2").unwrap();
    assert_eq!(saved_after_reopen(here.path(), &chained), saved_here.1);
    let nested = EntityKey::new("appointment", "3").unwrap();
    assert_eq!(saved_after_reopen(here.path(), &nested), saved_here.2);
    // A snapshot starts a new chain.
    let store = open(here.path(), 32);
    store.compact_all().unwrap();
    let options = WriteOptions::new(Origin::local("here").unwrap());
    for n in [102, 103] {
        store.patch(&key, &json!({ "n": n }), &options).unwrap();
    }
    let record = store.record(&key).unwrap().unwrap();
    assert!(record.linear && record.chain, "{record:?}");
    let saved = store.save(&key).unwrap().unwrap();
    store.close().unwrap();
    drop(store);
    assert_eq!(saved_after_reopen(here.path(), &key), saved);
}

#[test]
fn a_damaged_arrival_record_makes_history_a_corruption_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 32);
    let key = EntityKey::new("appointment", "1").unwrap();
    let options = WriteOptions::new(Origin::local("alice").unwrap());
    let written = store
        .patch(&key, &json!({"date": "2026-12-01"}), &options)
        .unwrap();
    let head: ChangeHash = written.version.parse().unwrap();
    for (raw_key, value) in [
        // A key that does not end in a change hash.
        (
            [layout::arrival_prefix(&key), vec![1, 2, 3]].concat(),
            b"{}".to_vec(),
        ),
        // A value that is not an arrival record.
        (layout::arrival_key(&key, &head), b"not json".to_vec()),
    ] {
        store.inner.db.insert(&raw_key, value).unwrap();
        assert!(
            matches!(store.history(&key), Err(Error::Corrupt { .. })),
            "{:?}",
            store.history(&key)
        );
        store.inner.db.remove(&raw_key).unwrap();
    }
    assert_eq!(store.history(&key).unwrap().unwrap().len(), 1);
}

/// A value for the oracle test below: scalars, `null`, small lists and nested objects over a
/// few keys, so random edits on different stores write into the same places.
fn history_value() -> impl proptest::strategy::Strategy<Value = Json> {
    use proptest::prelude::*;
    let leaf = prop_oneof![
        3 => (0i64..3).prop_map(Json::from),
        1 => Just(Json::Null),
    ];
    leaf.prop_recursive(3, 10, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Json::Array),
            prop::collection::btree_map(prop_oneof![Just("x"), Just("y")], inner, 0..3).prop_map(
                |fields| {
                    Json::Object(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                }
            ),
        ]
    })
}

#[derive(Clone, Debug)]
enum HistoryStep {
    Patch(usize, Json),
    Replace(usize, Json),
    Delete(usize),
    Merge { from: usize, to: usize },
}

fn history_fields() -> impl proptest::strategy::Strategy<Value = Json> {
    use proptest::prelude::*;
    prop::collection::btree_map(
        prop_oneof![Just("a"), Just("site"), Just("tags")],
        history_value(),
        0..3,
    )
    .prop_map(|fields| Json::Object(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
}

fn history_step() -> impl proptest::strategy::Strategy<Value = HistoryStep> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0..3usize, history_fields()).prop_map(|(at, patch)| HistoryStep::Patch(at, patch)),
        1 => (0..3usize, history_fields()).prop_map(|(at, fields)| HistoryStep::Replace(at, fields)),
        1 => (0..3usize).prop_map(HistoryStep::Delete),
        3 => (0..3usize, 0..3usize).prop_map(|(from, to)| HistoryStep::Merge { from, to }),
    ]
}

/// The heads to diff an edit against so that the maps structural changes made for it count as
/// its own fields: its dependencies, each structural one replaced by its own dependencies.
fn edit_base(doc: &Automerge, deps: &[ChangeHash]) -> Vec<ChangeHash> {
    let mut base = Vec::new();
    let mut pending = deps.to_vec();
    while let Some(hash) = pending.pop() {
        match doc.get_change_by_hash(&hash) {
            Some(dep) if nested::is_structural(&dep) => pending.extend(dep.deps()),
            _ => base.push(hash),
        }
    }
    base.sort();
    base.dedup();
    base
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config {
        // As the integration tests' properties: `LOCKSTEP_PROPTEST_CASES` (CI sets 2000).
        cases: std::env::var_os("LOCKSTEP_PROPTEST_CASES")
            .and_then(|cases| cases.into_string().ok())
            .map_or(256, |cases| cases.parse().expect("LOCKSTEP_PROPTEST_CASES is a number")),
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    })]

    /// History names each change's fields from its operations; a diff of the change against its
    /// dependencies, each structural one replaced by its own (so the maps made for it count),
    /// names the same fields and is the oracle here, whatever mix of edits, deletes, replaces
    /// and merges made them.
    #[test]
    fn history_fields_from_operations_match_a_diff_of_each_change(
        steps in proptest::collection::vec(history_step(), 1..16)
    ) {
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let stores: Vec<Store> = dirs.iter().map(|dir| open(dir.path(), 4)).collect();
        let key = EntityKey::new("appointment", "1").unwrap();
        let options = WriteOptions::new(Origin::local("alice").unwrap());
        let peer = Origin::parse("peer:other").unwrap();
        for step in steps {
            // Refusals (an empty entity, a write of nothing) are part of the game.
            let _ = match step {
                HistoryStep::Patch(at, patch) => stores[at].patch(&key, &patch, &options).map(drop),
                HistoryStep::Replace(at, fields) => {
                    stores[at].replace(&key, &fields, &options).map(drop)
                }
                HistoryStep::Delete(at) => stores[at].delete(&key, &options).map(drop),
                HistoryStep::Merge { from, to } => match stores[from].save(&key).unwrap() {
                    Some(bytes) => stores[to].merge(&key, &bytes, &peer).map(drop),
                    None => Ok(()),
                },
            };
        }
        for store in &stores {
            let doc = store.read(&key, |doc| Ok(doc.clone())).unwrap();
            let changes = doc.get_changes(&[]);
            let fields = document::fields_of_changes(&changes);
            for (change, fields) in changes.iter().zip(fields) {
                if nested::is_structural(change) {
                    continue;
                }
                let base = edit_base(&doc, change.deps());
                let expected = document::changed_fields(&doc.diff(&base, &[change.hash()]));
                proptest::prop_assert_eq!(fields, expected, "change {}", change.hash());
            }
        }
    }
}

#[test]
fn the_feed_knows_which_kinds_it_may_have_rows_of() {
    let dir = tempfile::tempdir().unwrap();
    let kind = |name: &str| Kind::new(name).unwrap();
    let options = WriteOptions::new(Origin::local("u").unwrap());
    {
        let store = open(dir.path(), 8);
        // A fresh store knows every row it has.
        assert!(!store.may_have_rows_after(&kind("a"), Seq::ZERO));
        let a = EntityKey::new("a", "1").unwrap();
        let written = store.patch(&a, &json!({"n": 1}), &options).unwrap();
        let seq = written.seq.unwrap();
        assert!(store.may_have_rows_after(&kind("a"), Seq::ZERO));
        assert!(!store.may_have_rows_after(&kind("a"), seq));
        assert!(!store.may_have_rows_after(&kind("b"), Seq::ZERO));
        store.close().unwrap();
    }
    // Reopened, it cannot tell for rows written before, only for rows written since.
    let store = open(dir.path(), 8);
    let last = store.last_seq();
    assert!(store.may_have_rows_after(&kind("b"), Seq::ZERO));
    assert!(!store.may_have_rows_after(&kind("b"), last));
    let b = EntityKey::new("b", "1").unwrap();
    store.patch(&b, &json!({"n": 1}), &options).unwrap();
    assert!(store.may_have_rows_after(&kind("b"), last));
    assert!(!store.may_have_rows_after(&kind("a"), last));
}

#[test]
fn too_many_kinds_are_forgotten_and_then_read_again() {
    let kind = |n: usize| Kind::new(format!("k{n}")).unwrap();
    let mut kinds = KindSeqs::after(Seq::ZERO);
    for n in 0..MAX_TRACKED_KINDS {
        kinds.record(&kind(n), Seq(n as u64 + 1));
    }
    assert!(!kinds.may_have_rows_after(&kind(0), Seq(1)));
    let next = Seq(MAX_TRACKED_KINDS as u64 + 1);
    kinds.record(&kind(MAX_TRACKED_KINDS), next);
    assert_eq!(kinds.last.len(), 1);
    // Rows before the new one are unknown again, so a reader of any kind reads them.
    assert!(kinds.may_have_rows_after(&kind(0), Seq(1)));
    assert!(!kinds.may_have_rows_after(&kind(0), next));
    assert!(kinds.may_have_rows_after(&kind(MAX_TRACKED_KINDS), Seq(next.0 - 1)));
}

/// The bytes of every change `key`'s document has, worked out from the document itself.
fn history_bytes_of(store: &Store, key: &EntityKey) -> u64 {
    store
        .read(key, |doc| Ok(history_bytes(&doc.get_changes(&[]))))
        .unwrap()
}

#[test]
fn the_record_counts_the_bytes_of_the_history_whatever_made_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 4);
    let other_dir = tempfile::tempdir().unwrap();
    let other = open(other_dir.path(), 4);
    let key = EntityKey::new("appointment", "1").unwrap();
    let options = WriteOptions::new(Origin::local("u").unwrap());
    let check = |store: &Store| {
        let record = store.record(&key).unwrap().unwrap();
        assert_eq!(record.history_bytes, Some(history_bytes_of(store, &key)));
    };
    // Local writes, through compactions (every fourth chunk) and a delete.
    for n in 0..10 {
        store
            .patch(&key, &json!({ "n": n, "site": {"code": n} }), &options)
            .unwrap();
        check(&store);
    }
    store.delete(&key, &options).unwrap();
    check(&store);
    // Changes merged from another replica, some of them already known.
    for n in 0..3 {
        other.patch(&key, &json!({ "m": n }), &options).unwrap();
    }
    let theirs = other.stored_document(&key).unwrap().unwrap();
    let origin = Origin::parse("peer:other").unwrap();
    store.merge(&key, &theirs, &origin).unwrap();
    check(&store);
    let ours = store.stored_document(&key).unwrap().unwrap();
    other.merge(&key, &ours, &origin).unwrap();
    check(&other);
    store.compact_all().unwrap();
    check(&store);
}

#[test]
fn a_record_written_before_history_bytes_existed_gets_them_from_its_document() {
    let dir = tempfile::tempdir().unwrap();
    let key = EntityKey::new("appointment", "1").unwrap();
    let options = WriteOptions::new(Origin::local("u").unwrap());
    let store = open(dir.path(), 32);
    for n in 0..5 {
        store.patch(&key, &json!({ "n": n }), &options).unwrap();
    }
    let expected = history_bytes_of(&store, &key);
    // The record as an older version wrote it: without the field.
    let mut record = store.record(&key).unwrap().unwrap();
    record.history_bytes = None;
    let encoded = encode_record(&record);
    assert!(!String::from_utf8_lossy(&encoded).contains("history_bytes"));
    store
        .inner
        .db
        .insert(layout::entity_key(layout::ENTITY, &key), encoded)
        .unwrap();
    store.close().unwrap();
    drop(store);
    let store = open(dir.path(), 32);
    store.get(&key).unwrap().unwrap();
    assert_eq!(
        store.stats().cached_document_bytes,
        crate::cache::document_weight(expected)
    );
    // The next write records them.
    store.patch(&key, &json!({ "n": 5 }), &options).unwrap();
    let record = store.record(&key).unwrap().unwrap();
    assert_eq!(record.history_bytes, Some(history_bytes_of(&store, &key)));
}

#[test]
fn the_feed_reads_the_same_rows_from_memory_as_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let options = WriteOptions::new(Origin::local("u").unwrap());
    let kinds = ["appointment", "permit", "slot"];
    let store = open(dir.path(), 32);
    for n in 0..300u32 {
        let kind = kinds[(n % 7 % 3) as usize];
        let key = EntityKey::new(kind, (n % 40).to_string()).unwrap();
        store.patch(&key, &json!({ "n": n }), &options).unwrap();
    }
    let reads: Vec<(u64, Option<Kind>, usize)> = (0..=300)
        .step_by(7)
        .flat_map(|since| {
            [None, Some("permit"), Some("none")].map(|kind| {
                (
                    since,
                    kind.map(|kind| Kind::new(kind).unwrap()),
                    1 + since as usize % 50,
                )
            })
        })
        .collect();
    let read_all = |store: &Store| -> Vec<Vec<FeedRow>> {
        reads
            .iter()
            .map(|(since, kind, limit)| store.feed(Seq(*since), kind.as_ref(), *limit).unwrap())
            .collect()
    };
    // Every row is held in memory, so these come from there.
    assert!(store
        .inner
        .recent
        .read(Seq::ZERO, Seq(300), None, 1)
        .is_some());
    let from_memory = read_all(&store);
    assert!(from_memory.iter().any(|rows| rows.len() > 1));
    store.close().unwrap();
    drop(store);
    // A store just opened holds none: it reads them all from disk.
    let store = open(dir.path(), 32);
    assert!(store
        .inner
        .recent
        .read(Seq::ZERO, Seq(300), None, 1)
        .is_none());
    assert_eq!(read_all(&store), from_memory);
    // Rows written after the opening come from memory, those before from disk.
    let key = EntityKey::new("permit", "new").unwrap();
    store.patch(&key, &json!({"n": 1}), &options).unwrap();
    assert!(store
        .inner
        .recent
        .read(Seq(299), Seq(301), None, 10)
        .is_none());
    let after = store
        .inner
        .recent
        .read(Seq(300), Seq(301), None, 10)
        .unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(store.feed(Seq(300), None, 10).unwrap(), after);
    assert_eq!(store.feed(Seq(299), None, 10).unwrap().len(), 2);
}

fn built_writes(store: &Store) -> u64 {
    store.stats().built_writes
}

/// Updates of a settled entity are built from its index (see `direct`) and pending in the
/// cached document, and read back, reopen and save exactly as the transaction's would: a twin
/// store with `build_writes` off makes the same edits through the transaction, and the two
/// are compared. The creation is built too. A patch the index
/// cannot build, and a write to a field with concurrent values, take the transaction; the next
/// plain update is built again.
#[test]
fn updates_of_a_settled_entity_are_built_and_read_back_as_the_transaction_writes_them() {
    let dir = tempfile::tempdir().unwrap();
    let twin_dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 4);
    let twin = open_with(twin_dir.path(), |config| {
        config.compact_after_chunks = 4;
        config.build_writes = false;
    });
    let key = EntityKey::new("appointment", "1").unwrap();
    let options = WriteOptions::new(Origin::local("alice").unwrap());
    let patches = [
        (json!({"a": 1, "site": {"code": "x"}}), true),
        (json!({"a": 2}), true),
        (json!({"site": {"code": "y"}, "b": true}), true),
        (json!({"tags": [1, 2]}), false),
        (json!({"a": 3, "b": null}), true),
        (json!({"a": 4.5}), true),
        (json!({"site": {"more": {"x": 1}}}), false),
        (json!({"a": "five"}), true),
    ];
    for (patch, built) in &patches {
        let before = built_writes(&store);
        store.patch(&key, patch, &options).unwrap();
        assert_eq!(built_writes(&store) - before, u64::from(*built), "{patch}");
        twin.patch(&key, patch, &options).unwrap();
        assert_eq!(built_writes(&twin), 0);
    }
    // The same fields and history (the stores' actors differ, so their versions do), and the
    // same bytes after a reopen as before it.
    let entity = store.get(&key).unwrap().unwrap();
    assert_eq!(entity.data, twin.get(&key).unwrap().unwrap().data);
    assert_eq!(
        Json::Object(entity.data.clone()),
        json!({"a": "five", "site": {"code": "y", "more": {"x": 1}}, "tags": [1, 2]})
    );
    let outline = |store: &Store| -> Vec<(Option<String>, Vec<String>)> {
        let history = store.history(&key).unwrap().unwrap();
        history
            .into_iter()
            .map(|entry| (entry.origin, entry.fields))
            .collect()
    };
    assert_eq!(outline(&store).len(), patches.len());
    assert_eq!(outline(&store), outline(&twin));
    let saved = store.save(&key).unwrap().unwrap();
    store.close().unwrap();
    drop(store);
    assert_eq!(saved_after_reopen(dir.path(), &key), saved);

    // Concurrent values at `a`: the write that settles them is the transaction's.
    let store = open(dir.path(), 4);
    let other_dir = tempfile::tempdir().unwrap();
    let other = open(other_dir.path(), 4);
    copy_entity(&store, &other, &key, "peer:store");
    other
        .patch(&key, &json!({"a": "theirs"}), &options)
        .unwrap();
    store.patch(&key, &json!({"a": "ours"}), &options).unwrap();
    copy_entity(&other, &store, &key, "peer:other");
    assert_eq!(store.conflicts(&key).unwrap().unwrap().len(), 1);
    let before = built_writes(&store);
    store
        .patch(&key, &json!({"a": "settled"}), &options)
        .unwrap();
    assert_eq!(
        built_writes(&store),
        before,
        "a conflict is settled by the transaction"
    );
    assert!(store.conflicts(&key).unwrap().unwrap().is_empty());
    // Settled again, so built again.
    store.patch(&key, &json!({"a": "built"}), &options).unwrap();
    assert_eq!(built_writes(&store), before + 1);
    assert_eq!(store.get(&key).unwrap().unwrap().data["a"], json!("built"));
    // A document that got this replica's changes by applying them (a built creation, then a
    // compaction, which drops the index) does not know them as its own: the index built of it
    // again must still continue their sequence. And it all loads again after a reopen.
    let key = EntityKey::new("appointment", "2").unwrap();
    let before = built_writes(&store);
    for n in 0..6 {
        if n == 1 {
            store.compact_all().unwrap();
        }
        store.patch(&key, &json!({ "a": n }), &options).unwrap();
    }
    assert_eq!(built_writes(&store), before + 6);
    let saved = store.save(&key).unwrap().unwrap();
    store.close().unwrap();
    drop(store);
    assert_eq!(saved_after_reopen(dir.path(), &key), saved);
    let store = open(dir.path(), 4);
    assert_eq!(store.history(&key).unwrap().unwrap().len(), 6);
    assert_eq!(store.get(&key).unwrap().unwrap().data["a"], json!(5));
    // An entity loaded from disk, its JSON not cached: its fields are read from the document
    // and the write is built.
    store.patch(&key, &json!({"a": 6}), &options).unwrap();
    assert_eq!(built_writes(&store), 1);
    assert_eq!(store.history(&key).unwrap().unwrap().len(), 7);
}

/// Puts a change Automerge refuses among the pending changes of `key`'s cached document: one
/// of this replica's sequence numbers again, with another operation.
fn spoil_pending(store: &Store, key: &EntityKey) {
    use automerge::{legacy, ExpandedChange, ScalarValue};
    let mut doc = store.inner.cache.take(key).expect("the document is cached");
    assert!(!doc.pending.is_empty() && doc.index.is_some());
    let refused = Change::from(ExpandedChange {
        operations: vec![legacy::Op {
            action: legacy::OpType::Put(ScalarValue::Int(9)),
            obj: legacy::ObjectId::Root,
            key: legacy::Key::Map("spoiled".into()),
            pred: Vec::new().into_iter().collect(),
            insert: false,
        }],
        actor_id: store.inner.actor.clone(),
        hash: None,
        seq: 1,
        start_op: std::num::NonZeroU64::MIN,
        time: 0,
        message: None,
        deps: Vec::new(),
        extra_bytes: Vec::new(),
        author: None,
    });
    doc.pending.push(refused);
    store.inner.cache.put(key.clone(), doc);
}

/// Should Automerge ever refuse a document's own pending changes, the document is read from
/// disk instead: a read and a write by the transaction go on with the entity as committed, and
/// nothing refused shows. (A snapshot taken by a built write does the same, with the write's
/// own change added; in debug builds the check of every built write asserts first that its
/// pending changes apply, so this test cannot reach that path.)
#[test]
fn a_document_whose_pending_changes_are_refused_is_read_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 4);
    let key = EntityKey::new("appointment", "1").unwrap();
    let options = WriteOptions::new(Origin::local("alice").unwrap());
    store.patch(&key, &json!({ "n": 1 }), &options).unwrap();
    store.patch(&key, &json!({ "n": 2 }), &options).unwrap();
    spoil_pending(&store, &key);
    assert_eq!(store.history(&key).unwrap().unwrap().len(), 2);

    store.patch(&key, &json!({ "n": 3 }), &options).unwrap();
    spoil_pending(&store, &key);
    // A list takes the transaction.
    store.patch(&key, &json!({ "l": [1] }), &options).unwrap();
    assert_eq!(
        Json::Object(store.get(&key).unwrap().unwrap().data),
        json!({ "n": 3, "l": [1] })
    );

    // Built writes go on from the document read from disk.
    let before = built_writes(&store);
    store.patch(&key, &json!({ "n": 6 }), &options).unwrap();
    assert_eq!(built_writes(&store), before + 1);
    let entity = store.get(&key).unwrap().unwrap();
    assert_eq!(Json::Object(entity.data), json!({ "n": 6, "l": [1] }));
    let history = store.history(&key).unwrap().unwrap();
    assert!(history
        .iter()
        .all(|entry| !entry.fields.contains(&"spoiled".to_string())));
    let saved = store.save(&key).unwrap().unwrap();
    store.close().unwrap();
    drop(store);
    assert_eq!(saved_after_reopen(dir.path(), &key), saved);
}

/// A store that keeps `documents` documents loaded at most and compacts after 4 chunks.
fn open_small(dir: &std::path::Path, documents: usize, build_writes: bool) -> Store {
    open_with(dir, |config| {
        config.compact_after_chunks = 4;
        config.cache_entries = documents;
        config.build_writes = build_writes;
    })
}

/// An entity whose document the cache evicted keeps its write index, and its next local write
/// is built from that index alone, without loading the document; it reads back, compacts,
/// reopens and saves as the transaction's writes do (a twin store with `build_writes` off, the
/// same small cache, the same edits). In debug builds every such write is also checked against
/// the document loaded from disk with the write applied.
#[test]
fn an_evicted_entity_is_written_from_its_index_as_the_transaction_writes_it() {
    let dir = tempfile::tempdir().unwrap();
    let twin_dir = tempfile::tempdir().unwrap();
    // Two documents for five entities: every write finds its entity's document evicted.
    let store = open_small(dir.path(), 2, true);
    let twin = open_small(twin_dir.path(), 2, false);
    let keys: Vec<EntityKey> = (0..5)
        .map(|n| EntityKey::new("appointment", format!("{n}")).unwrap())
        .collect();
    let options = WriteOptions::new(Origin::local("alice").unwrap());
    for round in 0..12 {
        for (n, key) in keys.iter().enumerate() {
            let patch = match round % 4 {
                0 => json!({ "n": round, "site": { "code": format!("c{round}") } }),
                1 => json!({ "n": round, "gone": null, "note": format!("{n}") }),
                2 => json!({ "site": { "code": null, "room": round }, "note": null }),
                _ => json!({ "n": f64::from(round) + 0.5, "gone": true }),
            };
            let before = store.stats();
            store.patch(key, &patch, &options).unwrap();
            let after = store.stats();
            if after.index_only_writes > before.index_only_writes {
                // Not a document read: neither a hit nor a miss.
                assert_eq!(
                    (after.cache_hits, after.cache_misses),
                    (before.cache_hits, before.cache_misses)
                );
            }
            twin.patch(key, &patch, &options).unwrap();
            if round == 10 && n == 4 {
                // The three documents the cache let go left their indexes.
                assert_eq!(store.stats().cached_write_indexes, 3);
            }
        }
    }
    // Entities 0 to 2 find their documents evicted in every round after the first (3 and 4,
    // written last, are still loaded). Their writes are built from the index alone, except
    // every fourth, which also compacts the entity into a snapshot and so needs the document,
    // and the one after it, which loads the entity from disk and builds its index again: 18
    // of their 33 updates.
    let stats = store.stats();
    assert!(stats.index_only_writes >= 15, "{stats:?}");
    assert_eq!(twin.stats().index_only_writes, 0);
    let outline = |store: &Store, key: &EntityKey| -> Vec<(Option<String>, Vec<String>)> {
        let history = store.history(key).unwrap().unwrap();
        history
            .into_iter()
            .map(|entry| (entry.origin, entry.fields))
            .collect()
    };
    let mut saved = Vec::new();
    for key in &keys {
        let entity = store.get(key).unwrap().unwrap();
        assert_eq!(entity.data, twin.get(key).unwrap().unwrap().data);
        assert_eq!(outline(&store, key), outline(&twin, key));
        assert!(store.conflicts(key).unwrap().unwrap().is_empty());
        saved.push(store.save(key).unwrap().unwrap());
    }
    assert_eq!(
        Json::Object(store.get(&keys[4]).unwrap().unwrap().data),
        json!({ "n": 11.5, "gone": true, "site": { "room": 10 } })
    );
    store.close().unwrap();
    drop(store);
    for (key, saved) in keys.iter().zip(saved) {
        assert_eq!(saved_after_reopen(dir.path(), key), saved);
    }
}

/// An index left behind by an evicted document that is older than the entity on disk (its
/// document was taken out, the entity written again from disk, and then the old document
/// evicted), with JSON of its version still cached, is not built on: the write loads the entity
/// instead and keeps every field.
#[test]
fn an_index_older_than_the_entity_on_disk_is_not_built_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_small(dir.path(), 2, true);
    let options = WriteOptions::new(Origin::local("alice").unwrap());
    let key = EntityKey::new("appointment", "old").unwrap();
    store.patch(&key, &json!({ "a": 1 }), &options).unwrap();
    let old_entity = store
        .patch(&key, &json!({ "a": 2 }), &options)
        .unwrap()
        .entity
        .unwrap();
    let old = store
        .inner
        .cache
        .take(&key)
        .expect("the document is cached");
    assert!(old.index.is_some());
    // Written from disk meanwhile; then that document goes and the old one comes back.
    store.patch(&key, &json!({ "b": 3 }), &options).unwrap();
    drop(
        store
            .inner
            .cache
            .take(&key)
            .expect("the document is cached"),
    );
    store.inner.cache.put(key.clone(), old);
    for n in 0..2 {
        let other = EntityKey::new("appointment", format!("other{n}")).unwrap();
        store.patch(&other, &json!({ "x": n }), &options).unwrap();
    }
    assert!(store.inner.cache.indexes() >= 1);
    // Its JSON too, as a write whose JSON is not kept (a merge) would leave it.
    store.inner.json.put(
        key.clone(),
        CachedFields {
            version: old_entity.version,
            fields: old_entity.data,
            settled: true,
        },
    );
    let before = store.stats().index_only_writes;
    store.patch(&key, &json!({ "a": 4 }), &options).unwrap();
    assert_eq!(store.stats().index_only_writes, before);
    assert_eq!(
        Json::Object(store.get(&key).unwrap().unwrap().data),
        json!({ "a": 4, "b": 3 })
    );
    assert_eq!(store.history(&key).unwrap().unwrap().len(), 4);
    assert!(store.conflicts(&key).unwrap().unwrap().is_empty());
}

/// Every key and value in sled's default tree at `dir`.
fn dump(dir: &std::path::Path) -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
    let db = open_sled(&StoreConfig::new(dir)).unwrap();
    db.iter()
        .map(|entry| {
            let (key, value) = entry.unwrap();
            (key.to_vec(), value.to_vec())
        })
        .collect()
}

/// An update a crash interrupted part-way (its intent on disk with the first of its writes, the
/// rest missing) is undone when the store opens, before anything reads it: the entity, the feed
/// and everything else are as they were before it, and the store takes writes again.
#[test]
fn a_write_a_crash_interrupted_is_undone_when_the_store_opens() {
    let dir = tempfile::tempdir().unwrap();
    let key = EntityKey::new("appointment", "1").unwrap();
    let options = WriteOptions::new(Origin::local("u").unwrap());
    let first = {
        let store = open(dir.path(), 32);
        store
            .patch(&key, &json!({ "a": 1, "b": 1 }), &options)
            .unwrap();
        store.close().unwrap();
        store.stats().feed_seq
    };
    let before = dump(dir.path());
    {
        let store = open(dir.path(), 32);
        store.patch(&key, &json!({ "a": 2 }), &options).unwrap();
        store.close().unwrap();
    }
    let after = dump(dir.path());
    {
        // Take the update apart again as a crash during its application would have left it:
        // back to the state before it, then its intent and its first write.
        let db = open_sled(&StoreConfig::new(dir.path())).unwrap();
        let mut writes: Vec<atomic::Write> = after
            .iter()
            .filter(|(key, value)| before.get(*key) != Some(*value))
            .map(|(key, value)| (key.clone(), Some(value.clone())))
            .collect();
        writes.extend(
            before
                .keys()
                .filter(|key| !after.contains_key(*key))
                .map(|key| (key.clone(), None)),
        );
        assert!(writes.len() >= 3, "a chunk, the record and a feed row");
        for (key, _) in &writes {
            match before.get(key) {
                Some(value) => db.insert(key, value.as_slice()).unwrap(),
                None => db.remove(key).unwrap(),
            };
        }
        let steps = atomic::steps(writes.clone(), |key| {
            Ok(db.get(key)?.map(|value| value.to_vec()))
        })
        .unwrap();
        let parts = (steps.len() - writes.len()) / 2;
        let intent = db.open_tree("intent").unwrap();
        for step in steps.into_iter().take(parts + 1) {
            atomic::run(&db, &intent, step).unwrap();
        }
        db.flush().unwrap();
    }
    let store = open(dir.path(), 32);
    assert!(store.inner.db.open_tree("intent").unwrap().is_empty());
    assert_eq!(store.stats().feed_seq, first);
    assert_eq!(
        Json::Object(store.get(&key).unwrap().unwrap().data),
        json!({ "a": 1, "b": 1 })
    );
    store.close().unwrap();
    drop(store);
    assert_eq!(dump(dir.path()), before);
    let store = open(dir.path(), 32);
    store.patch(&key, &json!({ "a": 3 }), &options).unwrap();
    assert_eq!(
        Json::Object(store.get(&key).unwrap().unwrap().data),
        json!({ "a": 3, "b": 1 })
    );
}

/// A write that failed while it was applied may have left part of itself in sled: the store
/// then refuses every later write, as after a failed flush, so nothing after it is acknowledged.
#[test]
fn after_a_write_fails_part_way_the_store_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 32);
    let key = EntityKey::new("appointment", "1").unwrap();
    let options = WriteOptions::new(Origin::local("u").unwrap());
    store.patch(&key, &json!({ "a": 1 }), &options).unwrap();
    // The applier refuses as after a set that failed part-way; the store learns it from the
    // next write it applies, and refuses the rest itself.
    store.inner.applier.fail();
    let record = RecordWrite::put(RecordKey::new("test", &["a"]), b"1".to_vec());
    assert!(matches!(
        store.write_records_lazily(vec![record]),
        Err(Error::Failed)
    ));
    assert!(matches!(store.writable(), Err(Error::Failed)));
    assert!(matches!(
        store.patch(&key, &json!({ "a": 2 }), &options),
        Err(Error::Failed)
    ));
    assert!(!store.is_open());
}

/// `len` pseudo-random letters, which Automerge's deflate cannot shrink much, so that the
/// entity's stored bytes exceed sled's blob threshold (about 128 KiB).
fn incompressible(len: usize) -> String {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(len as u64);
    (0..len)
        .map(|_| char::from(rng.gen_range(b'a'..=b'z')))
        .collect()
}

fn blob_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("blobs")).map_or(0, Iterator::count)
}

/// Writes a side record of 300 KB, which sled keeps as a blob file (a document's data is stored
/// in pieces that never make one, see `pieces`; side records are not), and returns how many
/// blob files the store in `dir` has then.
fn write_a_blob(store: &Store, dir: &std::path::Path, id: &str) -> usize {
    store
        .write_records(vec![RecordWrite::put(
            RecordKey::new("test", &["blob", id]),
            incompressible(300_000),
        )])
        .unwrap();
    let files = blob_files(dir);
    assert!(files > 0, "the write made no blob file; the test needs one");
    files
}

#[test]
fn in_fsync_mode_every_blob_file_is_synced_before_the_write_returns() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), |config| config.sync_mode = SyncMode::Fsync);
    for id in ["1", "2"] {
        let files = write_a_blob(&store, dir.path(), id);
        assert!(
            store.stats().blob_syncs >= files as u64,
            "{} syncs of {files} blob files",
            store.stats().blob_syncs
        );
    }
    // A store opened over blob files syncs them before it takes a write (a process killed
    // before it synced them left them to the kernel).
    drop(store);
    let files = blob_files(dir.path());
    let store = open_with(dir.path(), |config| config.sync_mode = SyncMode::Fsync);
    assert!(store.stats().blob_syncs >= files as u64);
}

#[test]
fn in_flush_mode_a_thread_of_its_own_syncs_blob_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), |config| config.sync_mode = SyncMode::Flush);
    let files = write_a_blob(&store, dir.path(), "1");
    // A thread of its own syncs them every 500 ms, without a write to start it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.stats().blob_syncs < files as u64 {
        assert!(Instant::now() < deadline, "the blob files were not synced");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Snapshots and chunks over a piece are stored in pieces, so however large an entity's history
/// grows, no sled page passes its blob threshold (a page that does is kept in memory outside the
/// sled cache's bound once read, see `pieces`); read back after a reopen, every entity is whole,
/// and a compaction removes the pieces of the chunks it folds in.
#[test]
fn large_histories_are_stored_in_pieces_and_make_no_blob_page() {
    let dir = tempfile::tempdir().unwrap();
    let options = WriteOptions::new(Origin::local("u").unwrap());
    let keys: Vec<EntityKey> = (0..24)
        .map(|n| EntityKey::new("permit", format!("{n:02}")).unwrap())
        .collect();
    let mut expected = Vec::new();
    {
        let store = open(dir.path(), 32);
        for (n, key) in keys.iter().enumerate() {
            let mut data = serde_json::Map::new();
            for write in 0..6 {
                let field = format!("scan{write}");
                let value = json!(incompressible(40_000 + n * 100 + write));
                store
                    .patch(key, &json!({ field.clone(): value.clone() }), &options)
                    .unwrap();
                data.insert(field, value);
            }
            expected.push(Json::Object(data));
        }
        let pieces_of = |tag: u8| store.inner.db.scan_prefix([layout::PIECE, tag]).count();
        assert!(pieces_of(layout::SNAPSHOT) > 0, "no snapshot in pieces");
        assert!(pieces_of(layout::CHUNK) > 0, "no chunk in pieces");
        let stored: u64 = keys
            .iter()
            .map(|key| store.stored_bytes(key).unwrap())
            .sum();
        assert!(stored > 24 * 6 * 30_000, "{stored} bytes stored");
        store.close().unwrap();
    }
    assert_eq!(blob_files(dir.path()), 0, "sled wrote pages to blob files");
    let store = open(dir.path(), 32);
    for (key, data) in keys.iter().zip(&expected) {
        assert_eq!(&Json::Object(store.get(key).unwrap().unwrap().data), data);
        let whole = store.stored_document(key).unwrap().unwrap();
        let doc = Automerge::load(&whole).unwrap();
        assert_eq!(doc.get_heads().len(), 1);
    }
    store.compact_all().unwrap();
    assert_eq!(
        store
            .inner
            .db
            .scan_prefix([layout::PIECE, layout::CHUNK])
            .count(),
        0,
        "a compaction left the pieces of a chunk"
    );
    let snapshot_pieces: usize = keys
        .iter()
        .map(|key| {
            let snapshot = store.snapshot(key).unwrap().unwrap();
            snapshot.len().div_ceil(pieces::PIECE_BYTES)
        })
        .sum();
    assert_eq!(
        store.inner.db.scan_prefix([layout::PIECE]).count(),
        snapshot_pieces,
        "pieces left over from an earlier snapshot"
    );
    for (key, data) in keys.iter().zip(&expected) {
        assert_eq!(&Json::Object(store.get(key).unwrap().unwrap().data), data);
    }
}

/// A store written before pieces existed keeps large snapshots whole: they read as they are,
/// and the entity's next snapshot is stored in pieces.
#[test]
fn a_large_snapshot_stored_whole_by_an_earlier_version_reads_and_is_rewritten_in_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let options = WriteOptions::new(Origin::local("u").unwrap());
    let key = EntityKey::new("permit", "1").unwrap();
    let store = open(dir.path(), 32);
    store
        .patch(&key, &json!({ "scan": incompressible(50_000) }), &options)
        .unwrap();
    // Put the snapshot back as an earlier version stored it: whole, with no pieces.
    let snapshot_key = layout::entity_key(layout::SNAPSHOT, &key);
    let whole = store.snapshot(&key).unwrap().unwrap();
    let db = store.inner.db.clone();
    for entry in db.scan_prefix([layout::PIECE]).keys() {
        db.remove(entry.unwrap()).unwrap();
    }
    db.insert(&snapshot_key, whole.clone()).unwrap();
    store.close().unwrap();
    drop((store, db));

    let store = open(dir.path(), 32);
    let entity = store.get(&key).unwrap().unwrap();
    assert_eq!(entity.data["scan"], json!(incompressible(50_000)));
    assert_eq!(
        store.stored_document(&key).unwrap().unwrap(),
        whole.to_vec()
    );
    store
        .patch(&key, &json!({ "scan2": incompressible(60_000) }), &options)
        .unwrap();
    store.compact_all().unwrap();
    let stored = store.inner.db.get(&snapshot_key).unwrap().unwrap();
    assert_eq!(stored.len(), 16, "the new snapshot is a header");
    assert!(store.inner.db.scan_prefix([layout::PIECE]).count() > 20);
    let entity = store.get(&key).unwrap().unwrap();
    assert_eq!(entity.data["scan"], json!(incompressible(50_000)));
    assert_eq!(entity.data["scan2"], json!(incompressible(60_000)));
}

/// Waiting for the changes read so far to be durable runs no flush when every change already
/// is (replication asks before each frame that carries changes), and one when a change was
/// applied since the last flush.
#[test]
fn waiting_for_changes_to_be_durable_flushes_only_when_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 32);
    let key = EntityKey::new("appointment", "1").unwrap();
    let written = store
        .patch(
            &key,
            &json!({"a": 1}),
            &WriteOptions::new(Origin::local("u").unwrap()),
        )
        .unwrap();
    let flushes = store.stats().flushes;
    store.wait_changes_durable().unwrap();
    assert_eq!(
        store.stats().flushes,
        flushes,
        "a flush with nothing to flush"
    );
    assert!(store.last_seq() >= written.seq.unwrap());
    // Applied without waiting for its flush: the wait covers it.
    store.inner.durability.applied(Seq(store.last_seq().0 + 1));
    store.wait_changes_durable().unwrap();
    assert!(
        store.stats().flushes > flushes,
        "no flush for an applied row"
    );
    store.close().unwrap();
    assert!(matches!(store.wait_changes_durable(), Err(Error::Closed)));
}
