//! Two stores syncing an entity through the sync protocol, and hostile sync messages.

use serde_json::json;

use super::*;
use crate::{StoreConfig, WriteOptions};

fn open(dir: &tempfile::TempDir) -> Store {
    Store::open(StoreConfig::new(dir.path())).expect("a fresh store opens")
}

/// Two stores in temp dirs (kept alive by the first item) that each wrote `appointment/1`
/// without the other: `a` with `on_a`, `b` with `on_b`.
fn edited_apart(
    on_a: serde_json::Value,
    on_b: serde_json::Value,
) -> ([tempfile::TempDir; 2], Store, Store, EntityKey) {
    let dirs = [
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    ];
    let (a, b) = (open(&dirs[0]), open(&dirs[1]));
    let key = EntityKey::new("appointment", "1").expect("valid");
    a.patch(&key, &on_a, &alice()).expect("write a");
    b.patch(&key, &on_b, &alice()).expect("write b");
    (dirs, a, b, key)
}

fn alice() -> WriteOptions {
    WriteOptions::new(Origin::local("alice").expect("valid"))
}

/// Runs the protocol between `a` and `b` for `key` until both are quiet; returns the rounds taken.
fn sync_until_quiet(a: &Store, b: &Store, key: &EntityKey) -> usize {
    let (mut a_state, mut b_state) = (SyncState::default(), SyncState::default());
    let from_a = Origin::parse("peer:a").expect("valid");
    let from_b = Origin::parse("peer:b").expect("valid");
    for round in 1..=20 {
        let to_b = a
            .generate_sync_message(key, &mut a_state)
            .expect("generate");
        if let Some(message) = &to_b {
            b.receive_sync_message(key, &mut b_state, message, &from_a)
                .expect("receive");
        }
        let to_a = b
            .generate_sync_message(key, &mut b_state)
            .expect("generate");
        if let Some(message) = &to_a {
            a.receive_sync_message(key, &mut a_state, message, &from_b)
                .expect("receive");
        }
        if to_b.is_none() && to_a.is_none() {
            return round;
        }
    }
    panic!("sync did not go quiet in 20 rounds");
}

#[test]
fn two_stores_converge_through_the_sync_protocol() {
    let (_dirs, a, b, key) = edited_apart(json!({"date": "2026-12-01"}), json!({"room": "4"}));
    let rounds = sync_until_quiet(&a, &b, &key);
    assert!(rounds <= 4, "took {rounds} rounds");
    let (on_a, on_b) = (a.get(&key).expect("read"), b.get(&key).expect("read"));
    assert_eq!(on_a, on_b);
    assert_eq!(
        on_a.expect("exists").data,
        json!({"date": "2026-12-01", "room": "4"})
            .as_object()
            .cloned()
            .expect("object")
    );
    let version = a.version(&key).expect("read").expect("exists");
    assert!(b.has_version(&key, &version).expect("check"));
    // The change from the other side is recorded with the peer as its origin.
    let feed = a.feed(crate::Seq::ZERO, None, 10).expect("feed");
    assert_eq!(feed.last().expect("a row").origin.as_str(), "peer:b");
    // An entity only the peer has is created by syncing.
    let only_b = EntityKey::new("appointment", "2").expect("valid");
    b.patch(&only_b, &json!({"date": "2027-01-01"}), &alice())
        .expect("write");
    sync_until_quiet(&a, &b, &only_b);
    assert_eq!(a.get(&only_b).expect("read"), b.get(&only_b).expect("read"));
}

/// A store holding one entity, for hostile input to leave alone.
struct Target {
    _dir: tempfile::TempDir,
    store: Store,
    key: EntityKey,
    before: Option<crate::store::Entity>,
}

impl Target {
    fn open() -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let store = open(&dir);
        let key = EntityKey::new("appointment", "1").expect("valid");
        store
            .patch(&key, &json!({"date": "2026-12-01"}), &alice())
            .expect("write");
        let before = store.get(&key).expect("read");
        Self {
            _dir: dir,
            store,
            key,
            before,
        }
    }

    /// The entity is as it was, and the store still takes writes.
    fn is_unchanged_and_writable(&self) {
        assert_eq!(self.store.get(&self.key).expect("read"), self.before);
        self.store
            .patch(&self.key, &json!({"room": "1"}), &alice())
            .expect("still writable");
    }
}

fn evil() -> Origin {
    Origin::parse("peer:evil").expect("valid")
}

#[test]
fn hostile_sync_messages_are_errors_and_change_nothing() {
    let target = Target::open();
    let (store, key) = (&target.store, &target.key);
    let peer = evil();
    let fixture = include_bytes!("../../tests/fuzz-crashers/automerge-0.12.0-load-panic.bin");
    let mut garbage: Vec<Vec<u8>> = vec![Vec::new(), vec![0x42], vec![0x42; 64], fixture.to_vec()];
    let mut prefixed = vec![0x42];
    prefixed.extend_from_slice(fixture);
    garbage.push(prefixed);
    for bytes in garbage {
        let mut state = SyncState::default();
        let result = store.receive_sync_message(key, &mut state, &bytes, &peer);
        assert!(
            matches!(result, Err(Error::Decode(_))),
            "{bytes:?} gave {result:?}"
        );
    }
    target.is_unchanged_and_writable();
}

#[test]
fn a_bloom_filter_without_bits_is_an_error_when_the_reply_is_built() {
    let target = Target::open();
    let (store, key) = (&target.store, &target.key);
    // A version 1 sync message: no heads, no needs, one `have` whose Bloom filter claims one
    // entry at zero bits per entry (seven probes), no changes. It decodes and is received;
    // Automerge 0.12 then divides by zero building the reply.
    let message = [0x42, 0, 0, 1, 0, 3, 1, 0, 7, 0];
    let mut state = SyncState::default();
    store
        .receive_sync_message(key, &mut state, &message, &evil())
        .expect("received");
    let reply = store.generate_sync_message(key, &mut state);
    assert!(matches!(reply, Err(Error::Decode(_))), "{reply:?}");
    // The bad state is gone, the entity is as it was and the store still serves.
    assert!(store.generate_sync_message(key, &mut state).is_ok());
    target.is_unchanged_and_writable();
}

#[test]
fn a_sync_message_whose_changes_inflate_too_far_is_refused_unread() {
    let target = Target::open();
    let bomb = include_bytes!("../../tests/fuzz-crashers/compressed-change-inflating-to-96MiB.bin");
    // A version 1 sync message: no heads, needs or haves, and the bomb as its one change.
    let mut message = vec![0x42, 0, 0, 0, 1];
    crate::inflation::tests::uleb(bomb.len() as u64, &mut message);
    message.extend_from_slice(bomb);
    let mut state = SyncState::default();
    match target
        .store
        .receive_sync_message(&target.key, &mut state, &message, &evil())
    {
        Err(Error::Decode(detail)) => assert!(detail.contains("inflate"), "{detail}"),
        other => panic!("{other:?}"),
    }
    target.is_unchanged_and_writable();
}

#[test]
fn issue_2_writing_the_winning_value_settles_a_conflict() {
    let (_dirs, a, b, key) =
        edited_apart(json!({"date": "2026-12-01"}), json!({"date": "2026-12-02"}));
    sync_until_quiet(&a, &b, &key);
    assert_eq!(a.conflicts(&key).expect("read").expect("exists").len(), 1);
    let winner = a.get(&key).expect("read").expect("exists").data["date"].clone();
    let written = a
        .patch(&key, &json!({ "date": winner }), &alice())
        .expect("resolve");
    assert!(
        written.seq.is_some(),
        "writing the winner again must be a change"
    );
    assert!(a.conflicts(&key).expect("read").expect("exists").is_empty());
    sync_until_quiet(&a, &b, &key);
    assert!(b.conflicts(&key).expect("read").expect("exists").is_empty());
}

/// Local writes skip the document lookup for a field whose value they leave as it is while the
/// entity's fields are settled; a conflict brought by a merge must end that, in nested maps too.
#[test]
fn issue_2_writing_the_winning_value_settles_a_conflict_in_a_nested_map() {
    let (_dirs, a, b, key) = edited_apart(
        json!({"site": {"code": "A", "room": "1"}}),
        json!({"site": {"code": "B"}}),
    );
    // `a` settles on its own fields first, so its cached JSON is settled before the merge.
    a.patch(&key, &json!({"site": {"room": "2"}}), &alice())
        .expect("write a");
    a.patch(&key, &json!({"site": {"room": "2"}}), &alice())
        .expect("an equal write");
    sync_until_quiet(&a, &b, &key);
    assert_eq!(a.conflicts(&key).expect("read").expect("exists").len(), 1);
    let winner = a.get(&key).expect("read").expect("exists").data["site"]["code"].clone();
    let written = a
        .patch(
            &key,
            &json!({"site": {"code": winner, "room": "2"}}),
            &alice(),
        )
        .expect("resolve");
    assert!(
        written.seq.is_some(),
        "writing the winner again must be a change"
    );
    assert!(a.conflicts(&key).expect("read").expect("exists").is_empty());
    // Settled again: an equal write changes nothing.
    let again = a
        .patch(&key, &json!({"site": {"code": winner}}), &alice())
        .expect("equal write");
    assert!(
        again.seq.is_none(),
        "an equal write of a settled field is no change"
    );
    sync_until_quiet(&a, &b, &key);
    assert!(b.conflicts(&key).expect("read").expect("exists").is_empty());
}

#[test]
fn stored_documents_merge_into_an_empty_replica_at_the_same_version() {
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let mut config = StoreConfig::new(dir_a.path());
    config.compact_after_chunks = 3;
    let a = Store::open(config).expect("opens");
    let b = open(&dir_b);
    let options = WriteOptions::new(Origin::local("alice").expect("valid"));
    let from_a = Origin::parse("peer:a").expect("valid");
    // Chunks only, then a snapshot followed by chunks.
    for (id, edits) in [("chunks", 2), ("snapshot", 5)] {
        let key = EntityKey::new("appointment", id).expect("valid");
        for edit in 0..edits {
            a.patch(&key, &json!({"n": edit, "site": {"code": edit}}), &options)
                .expect("write");
        }
        let bytes = a.stored_document(&key).expect("read").expect("exists");
        b.merge(&key, &bytes, &from_a).expect("merge");
        assert_eq!(
            a.version(&key).expect("read"),
            b.version(&key).expect("read")
        );
        assert_eq!(a.get(&key).expect("read"), b.get(&key).expect("read"));
    }
    let missing = EntityKey::new("appointment", "missing").expect("valid");
    assert_eq!(a.stored_document(&missing).expect("read"), None);
}

/// Merges into documents with more operations than `MAX_DEPTH` build their new changes once, for
/// the nesting check, and persist those: what they persist must reopen as the same document.
#[test]
fn merges_into_large_documents_persist_every_change() {
    let (dirs, a, b, key) = edited_apart(json!({"n": 0}), json!({"m": 0}));
    let b_dir = dirs[1].path().to_path_buf();
    for round in 1..=3 {
        for edit in 0..(crate::MAX_DEPTH as u64) {
            a.patch(&key, &json!({"n": edit, "site": {"code": edit}}), &alice())
                .expect("write a");
        }
        b.patch(&key, &json!({"m": round}), &alice())
            .expect("write b");
        sync_until_quiet(&a, &b, &key);
    }
    let merged = a.stored_document(&key).expect("read").expect("exists");
    let other = EntityKey::new("appointment", "2").expect("valid");
    b.merge(&other, &merged, &Origin::parse("peer:a").expect("valid"))
        .expect("merge whole");
    let (version, entity, history) = (
        b.version(&key).expect("read"),
        b.get(&key).expect("read"),
        b.history(&key).expect("read"),
    );
    assert_eq!(version, a.version(&key).expect("read"));
    assert_eq!(b.version(&other).expect("read"), version);
    b.close().expect("close");
    drop(b);
    let reopened = Store::open(StoreConfig::new(&b_dir)).expect("reopens");
    assert_eq!(reopened.version(&key).expect("read"), version);
    assert_eq!(reopened.get(&key).expect("read"), entity);
    assert_eq!(reopened.history(&key).expect("read"), history);
    assert_eq!(reopened.version(&other).expect("read"), version);
}

#[test]
fn a_batch_merge_spread_over_threads_answers_each_entity_in_order() {
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let (a, b) = (open(&dir_a), open(&dir_b));
    let from_a = Origin::parse("peer:a").expect("valid");
    // Enough entities that the batch is split between threads; every seventh is garbage, and
    // one entity appears twice.
    let mut items: Vec<(EntityKey, Vec<u8>)> = (0..200)
        .map(|index| {
            let key = EntityKey::new("permit", format!("p{index}")).expect("valid");
            let bytes = if index % 7 == 3 {
                vec![0x42; 16]
            } else {
                a.patch(&key, &json!({ "n": index }), &alice())
                    .expect("write");
                a.stored_document(&key).expect("read").expect("exists")
            };
            (key, bytes)
        })
        .collect();
    items.push(items[11].clone());
    // In a pool of four, so the batch is split whatever the machine's core count.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .expect("a thread pool");
    let outcomes = pool
        .install(|| {
            b.merge_many(
                items.iter().map(|(key, bytes)| (key, bytes.as_slice())),
                &from_a,
            )
        })
        .expect("the batch is flushed");
    assert_eq!(outcomes.len(), items.len());
    for (position, ((key, _), outcome)) in items.iter().zip(&outcomes).enumerate() {
        if position % 7 == 3 && position < 200 {
            assert!(
                matches!(outcome, Err(Error::Decode(_))),
                "{key}: {outcome:?}"
            );
            assert_eq!(b.version(key).expect("read"), None);
            continue;
        }
        let written = outcome.as_ref().expect("a stored document merges");
        let version = a.version(key).expect("read").expect("exists");
        assert_eq!(written.version, version, "{key}");
        assert_eq!(b.get(key).expect("read"), a.get(key).expect("read"));
        // The repeat of an entity brings nothing new.
        assert_eq!(written.seq.is_none(), position == 200, "{key}");
    }
}

#[test]
fn history_says_which_peer_a_change_came_through_and_who_made_it() {
    let (dirs, a, b, key) = edited_apart(json!({"date": "2026-12-01"}), json!({"room": "4"}));
    sync_until_quiet(&a, &b, &key);
    let history = |store: &Store| -> Vec<(String, String)> {
        store
            .history(&key)
            .expect("read")
            .expect("exists")
            .into_iter()
            .map(|entry| {
                (
                    entry.origin.expect("an origin"),
                    entry.author.expect("an author"),
                )
            })
            .collect()
    };
    let ours = ("local:alice".to_string(), "local:alice".to_string());
    let theirs_on_a = ("peer:b".to_string(), "local:alice".to_string());
    let on_a = history(&a);
    assert_eq!(on_a.len(), 2);
    assert!(
        on_a.contains(&ours) && on_a.contains(&theirs_on_a),
        "{on_a:?}"
    );
    // It is on disk: a reopened store says the same.
    drop(a);
    let reopened = open(&dirs[0]);
    assert_eq!(history(&reopened), on_a);
    // A change arriving a second time, through another path, keeps where it came from first.
    let bytes = b.stored_document(&key).expect("read").expect("exists");
    reopened
        .merge(&key, &bytes, &Origin::parse("peer:c").expect("valid"))
        .expect("merge");
    assert_eq!(history(&reopened), on_a);
}

/// The hashes of every change the store's copy of `key` holds.
fn change_hashes(store: &Store, key: &EntityKey) -> Vec<automerge::ChangeHash> {
    store
        .read(key, |doc| {
            Ok(doc
                .get_changes(&[])
                .iter()
                .map(|change| change.hash())
                .collect())
        })
        .expect("read")
}

/// A's sync messages leave out the changes that B's Bloom filter says B has. A false positive
/// there makes A send a change without the change it depends on; B cannot keep such an orphan
/// (see `Store::vet_incoming`), so it must ask for the missing dependency by name, and have A
/// send the orphan again, or the two repeat the same pair of messages forever.
#[test]
fn a_change_withheld_by_a_bloom_false_positive_is_asked_for_by_name() {
    let (_dirs, a, b, key) = edited_apart(json!({"n": 0}), json!({"m": 0}));
    // A shared history, so that A sends the few changes B lacks rather than the whole document.
    for n in 1..30 {
        a.patch(&key, &json!({ "n": n }), &alice())
            .expect("write a");
    }
    sync_until_quiet(&a, &b, &key);
    a.patch(&key, &json!({"n": "withheld"}), &alice())
        .expect("write a");
    let version =
        Version::parse(&a.version(&key).expect("read").expect("exists")).expect("a version parses");
    let [withheld] = version.heads() else {
        panic!("one writer leaves one head")
    };
    // Writes on B until B's Bloom filter claims A's last change; a new sync session's filter
    // covers every change B has, and about 1 in 100 filters gives a given hash a false positive.
    let found = (1..5_000).any(|m| {
        b.patch(&key, &json!({ "m": m }), &alice())
            .expect("write b");
        automerge::sync::BloomFilter::from_hashes(change_hashes(&b, &key).iter())
            .contains_hash(withheld)
    });
    assert!(found, "no false positive within 5,000 writes");
    // The change that depends on it, which B's filter does not claim.
    a.patch(&key, &json!({"n": "last"}), &alice())
        .expect("write a");
    let version = a.version(&key).expect("read").expect("exists");
    let rounds = sync_until_quiet(&a, &b, &key);
    assert!(
        b.has_version(&key, &version).expect("check"),
        "B lacks A's last change"
    );
    assert!(change_hashes(&b, &key).contains(withheld));
    assert_eq!(a.get(&key).expect("read"), b.get(&key).expect("read"));
    assert!(rounds <= 6, "took {rounds} rounds");
}

/// A peer can send a change that depends on any number of changes this side lacks; the next
/// message asks for at most `MAX_WANTED` of them (besides the peer's heads).
#[test]
fn a_change_with_many_missing_dependencies_asks_for_a_bounded_number() {
    use automerge::transaction::Transactable;
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir);
    let key = EntityKey::new("appointment", "1").expect("valid");
    // 300 changes made apart, and one change that depends on all of them.
    let mut merged = automerge::Automerge::new();
    let mut forks = Vec::new();
    for n in 0..300 {
        let mut fork = automerge::Automerge::new();
        let mut tx = fork.transaction();
        tx.put(automerge::ROOT, format!("f{n}"), n).expect("put");
        tx.commit();
        merged.merge(&mut fork).expect("merge");
        forks.extend(fork.get_heads());
    }
    let mut tx = merged.transaction();
    tx.put(automerge::ROOT, "last", 1).expect("put");
    tx.commit();
    let last = merged.get_last_local_change().expect("a change");
    let message = automerge::sync::Message {
        heads: merged.get_heads(),
        need: Vec::new(),
        have: Vec::new(),
        changes: vec![last.raw_bytes().to_vec()].into(),
        flags: None,
        version: automerge::sync::MessageVersion::V1,
    };
    let mut state = SyncState::default();
    let from = Origin::parse("peer:hostile").expect("valid");
    store
        .receive_sync_message(&key, &mut state, &message.encode(), &from)
        .expect("an orphan is dropped, not an error");
    assert!(
        store.get(&key).expect("read").is_none(),
        "the orphan was kept"
    );
    let reply = store
        .generate_sync_message(&key, &mut state)
        .expect("generate")
        .expect("a reply that asks for what is missing");
    let need = automerge::sync::Message::decode(&reply)
        .expect("decodes")
        .need;
    assert_eq!(need.len(), MAX_WANTED + 1, "{need:?}");
    assert!(need.contains(&last.hash()), "the peer's head");
    assert!(
        need.iter()
            .filter(|hash| **hash != last.hash())
            .all(|hash| forks.contains(hash)),
        "only what the dropped change depends on"
    );
}
