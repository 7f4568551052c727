//! Bytes from outside: crashers found by fuzzing (and the known automerge 0.12 `load` panic) are
//! replayed through `Store::merge`, on a new entity and on an existing one.

use std::path::PathBuf;

use serde_json::json;
use store::{Error, Origin};

use crate::harness::{key, local, Harness};

fn crashers() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-crashers");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("the crashers directory exists")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "bin"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    files
        .into_iter()
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect()
}

/// One file of `tests/fuzz-crashers`.
fn crasher(name: &str) -> Vec<u8> {
    std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fuzz-crashers")
            .join(name),
    )
    .unwrap()
}

fn peer() -> Origin {
    Origin::parse("peer:hostile").unwrap()
}

#[test]
fn issue_2_load_panic_is_a_decode_error_on_a_new_entity() {
    let harness = Harness::open();
    let store = harness.store();
    let bytes = crasher("automerge-0.12.0-load-panic.bin");
    let entity = key("appointment", "1");
    assert!(matches!(
        store.merge(&entity, &bytes, &peer()),
        Err(Error::Decode(_))
    ));
    assert_eq!(store.get(&entity).unwrap(), None);
    assert_eq!(store.save(&entity).unwrap(), None);
    assert_eq!(store.last_seq(), store::Seq::ZERO);
    // The store keeps working, for this entity too.
    let written = store.patch(&entity, &json!({"a": 1}), &local("u")).unwrap();
    assert!(written.created);
}

/// A 98 KB compressed change that inflates to 96 MiB (a megabyte of it inflates to gigabytes
/// just as well): refused before Automerge inflates it, which it would do whole.
#[test]
fn a_compressed_chunk_that_inflates_too_far_is_refused_unread() {
    let harness = Harness::open();
    let store = harness.store();
    let bomb = crasher("compressed-change-inflating-to-96MiB.bin");
    assert!(bomb.len() < 100_000);
    let existing = key("appointment", "existing");
    store
        .patch(&existing, &json!({"a": 1}), &local("u"))
        .unwrap();
    let before = store.get(&existing).unwrap();
    for entity in [key("appointment", "fresh"), existing.clone()] {
        match store.merge(&entity, &bomb, &peer()) {
            Err(Error::Decode(detail)) => assert!(
                detail.contains(&store::MAX_INFLATED_BYTES.to_string()),
                "{detail}"
            ),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(store.get(&existing).unwrap(), before);
    assert_eq!(store.get(&key("appointment", "fresh")).unwrap(), None);
}

#[test]
fn every_crasher_leaves_entities_unchanged() {
    let harness = Harness::open();
    let store = harness.store();
    let existing = key("appointment", "existing");
    store
        .patch(&existing, &json!({"a": 1, "s": {"b": 2}}), &local("u"))
        .unwrap();
    let saved = store.save(&existing).unwrap().unwrap();
    let current = store.get(&existing).unwrap();
    for (name, bytes) in crashers() {
        let fresh = key("appointment", "fresh");
        match store.merge(&fresh, &bytes, &peer()) {
            Err(Error::Decode(_)) => assert_eq!(store.save(&fresh).unwrap(), None, "{name}"),
            Ok(written) => assert_eq!(written.seq, None, "{name} was merged as a change"),
            Err(other) => panic!("{name}: {other:?}"),
        }
        // On an existing entity automerge takes another path (`load_incremental` of changes).
        match store.merge(&existing, &bytes, &peer()) {
            Ok(written) => assert_eq!(written.seq, None, "{name} was merged as a change"),
            Err(Error::Decode(_)) => {}
            Err(other) => panic!("{name}: {other:?}"),
        }
        assert_eq!(store.get(&existing).unwrap(), current, "{name}");
        assert_eq!(store.save(&existing).unwrap().unwrap(), saved, "{name}");
    }
    store
        .patch(&existing, &json!({"a": 2}), &local("u"))
        .unwrap();
    assert_eq!(store.get(&existing).unwrap().unwrap().data["a"], 2);
}

#[test]
fn garbage_and_truncated_documents_are_refused_or_ignored() {
    let harness = Harness::open();
    let store = harness.store();
    let source = key("appointment", "source");
    store
        .patch(&source, &json!({"a": 1, "list": [1, 2, 3]}), &local("u"))
        .unwrap();
    let saved = store.save(&source).unwrap().unwrap();
    let target = key("appointment", "target");
    store
        .patch(&target, &json!({"t": true}), &local("u"))
        .unwrap();
    let target_saved = store.save(&target).unwrap().unwrap();
    let mut inputs: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![0],
        vec![0x85, 0x6f, 0x4a, 0x83],
        b"{}".to_vec(),
    ];
    inputs.extend((1..saved.len()).step_by(7).map(|len| saved[..len].to_vec()));
    let mut flipped = saved.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0xff;
    inputs.push(flipped);
    for (index, bytes) in inputs.iter().enumerate() {
        for entity in [&target, &key("appointment", &format!("new{index}"))] {
            let before = store.save(entity).unwrap();
            match store.merge(entity, bytes, &peer()) {
                Ok(written) => assert_eq!(written.seq, None, "input {index} on {entity}"),
                Err(Error::Decode(_)) => {}
                Err(other) => panic!("input {index} on {entity}: {other:?}"),
            }
            assert_eq!(
                store.save(entity).unwrap(),
                before,
                "input {index} on {entity}"
            );
        }
    }
    assert_eq!(store.save(&target).unwrap().unwrap(), target_saved);
}

/// A document whose `deep` field holds maps nested `levels` deep below the root.
fn nested_document(levels: usize) -> Vec<u8> {
    use automerge::transaction::Transactable;
    let mut doc = automerge::Automerge::new();
    doc.transact::<_, _, automerge::AutomergeError>(|tx| {
        let mut obj = automerge::ROOT;
        for _ in 0..levels {
            obj = tx.put_object(&obj, "deep", automerge::ObjType::Map)?;
        }
        tx.put(&obj, "leaf", 1)?;
        Ok(())
    })
    .unwrap();
    doc.save()
}

#[test]
fn issue_2_a_deeply_nested_document_from_a_peer_does_not_overflow_the_stack() {
    // A peer can send a document nested far deeper than a local write may be; reading it
    // recursed once per level and overflowed the stack, killing the process.
    let harness = Harness::open();
    let store = harness.store();
    let bytes = nested_document(100_000);
    let fresh = key("appointment", "deep");
    assert!(matches!(
        store.merge(&fresh, &bytes, &peer()),
        Err(Error::Decode(_))
    ));
    assert_eq!(store.get(&fresh).unwrap(), None);
    let existing = key("appointment", "existing");
    store
        .patch(&existing, &json!({"a": 1}), &local("u"))
        .unwrap();
    let saved = store.save(&existing).unwrap();
    assert!(matches!(
        store.merge(&existing, &bytes, &peer()),
        Err(Error::Decode(_))
    ));
    assert_eq!(store.save(&existing).unwrap(), saved);
    // As deep as a local write may go is fine.
    let allowed = key("appointment", "allowed");
    let written = store
        .merge(&allowed, &nested_document(store::MAX_DEPTH), &peer())
        .unwrap();
    assert!(written.created);
    assert!(matches!(
        store.merge(&allowed, &nested_document(store::MAX_DEPTH + 1), &peer()),
        Err(Error::Decode(_))
    ));
}

/// Nests `levels` more maps under `obj`, in one change, and returns the deepest.
fn nest(doc: &mut automerge::Automerge, obj: automerge::ObjId, levels: usize) -> automerge::ObjId {
    use automerge::transaction::Transactable;
    doc.transact::<_, _, automerge::AutomergeError>(|tx| {
        let mut obj = obj;
        for _ in 0..levels {
            obj = tx.put_object(&obj, "deep", automerge::ObjType::Map)?;
        }
        Ok(obj)
    })
    .unwrap()
    .result
}

#[test]
fn issue_2_deep_nesting_is_refused_even_when_it_is_deleted_or_comes_in_pieces() {
    use automerge::transaction::Transactable;
    // A document that was deep once and no longer is: reading it at an earlier version, or
    // diffing across the deep one, took Automerge seconds for 4,000 levels and grows with the
    // square.
    let mut once_deep = automerge::Automerge::new();
    nest(&mut once_deep, automerge::ROOT, 50_000);
    once_deep
        .transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.delete(automerge::ROOT, "deep")?;
            tx.put(automerge::ROOT, "a", 1)
        })
        .unwrap();
    let harness = Harness::open();
    let store = harness.store();
    let entity = key("appointment", "once-deep");
    assert!(matches!(
        store.merge(&entity, &once_deep.save(), &peer()),
        Err(Error::Decode(_))
    ));
    assert_eq!(store.history(&entity).unwrap(), None);

    // Depth that builds up over several merges counts from where each piece hangs.
    let mut pieces = automerge::Automerge::new();
    let deepest = nest(&mut pieces, automerge::ROOT, store::MAX_DEPTH - 2);
    let entity = key("appointment", "pieces");
    store.merge(&entity, &pieces.save(), &peer()).unwrap();
    let heads = pieces.get_heads();
    let deepest = nest(&mut pieces, deepest, 2);
    store
        .merge(&entity, &pieces.save_after(&heads), &peer())
        .unwrap();
    let saved = store.save(&entity).unwrap();
    let heads = pieces.get_heads();
    nest(&mut pieces, deepest, 1);
    assert!(matches!(
        store.merge(&entity, &pieces.save_after(&heads), &peer()),
        Err(Error::Decode(_))
    ));
    assert_eq!(store.save(&entity).unwrap(), saved);
}

#[test]
fn issue_2_changes_missing_their_dependencies_are_not_kept() {
    use automerge::transaction::Transactable;
    // Found by the stored_bytes fuzz target: a change whose dependency the entity lacks waited
    // in Automerge's queue inside the cached document, undecoded, and showed up in `save`.
    let harness = Harness::open();
    let store = harness.store();
    let entity = key("appointment", "1");
    store.patch(&entity, &json!({"a": 1}), &local("u")).unwrap();
    let saved = store.save(&entity).unwrap();
    let mut remote = automerge::Automerge::new();
    let change = |doc: &mut automerge::Automerge, value: i64| {
        doc.transact::<_, _, automerge::AutomergeError>(|tx| tx.put(automerge::ROOT, "r", value))
            .unwrap();
        doc.get_last_local_change().unwrap().raw_bytes().to_vec()
    };
    let first = change(&mut remote, 1);
    let second = change(&mut remote, 2);
    let written = store.merge(&entity, &second, &peer()).unwrap();
    assert_eq!(written.seq, None);
    assert_eq!(store.save(&entity).unwrap(), saved);
    // The dependency alone brings only itself: the waiting change was not kept.
    store.merge(&entity, &first, &peer()).unwrap();
    assert_eq!(store.get(&entity).unwrap().unwrap().data["r"], 1);
    store.merge(&entity, &second, &peer()).unwrap();
    assert_eq!(store.get(&entity).unwrap().unwrap().data["r"], 2);
    // The same for an entity that does not exist here yet.
    let fresh = key("appointment", "fresh");
    assert_eq!(store.merge(&fresh, &second, &peer()).unwrap().seq, None);
    assert_eq!(store.save(&fresh).unwrap(), None);
    assert_eq!(store.get(&fresh).unwrap(), None);
}
