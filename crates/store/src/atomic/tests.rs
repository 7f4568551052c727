//! Writes applied whole, and finished after a crash from any point of their application.

use proptest::prelude::*;

use super::*;

fn open(dir: &std::path::Path) -> sled::Db {
    sled::Config::new().path(dir).open().unwrap()
}

fn write(key: &str, value: Option<&str>) -> Write {
    (
        key.as_bytes().to_vec(),
        value.map(|value| value.as_bytes().to_vec()),
    )
}

fn value(db: &sled::Db, key: &str) -> Option<String> {
    db.get(key)
        .unwrap()
        .map(|value| String::from_utf8(value.to_vec()).unwrap())
}

/// Three puts (one over an earlier value), a removal, and a second write of one key: the last
/// of the two must win.
fn application() -> Vec<Write> {
    vec![
        write("a", Some("new a")),
        write("b", Some("first b")),
        write("gone", None),
        write("c", Some("")),
        write("b", Some("second b")),
    ]
}

fn before(db: &sled::Db) {
    db.insert("a", "old a").unwrap();
    db.insert("gone", "here").unwrap();
    db.insert("untouched", "kept").unwrap();
}

fn assert_applied(db: &sled::Db) {
    assert_eq!(
        db.scan_prefix([INTENT]).count(),
        0,
        "the intent is left behind"
    );
    assert_eq!(value(db, "a").as_deref(), Some("new a"));
    assert_eq!(value(db, "b").as_deref(), Some("second b"));
    assert_eq!(value(db, "c").as_deref(), Some(""));
    assert_eq!(value(db, "gone"), None);
    assert_eq!(value(db, "untouched").as_deref(), Some("kept"));
}

fn intent_parts(db: &sled::Db) -> usize {
    db.scan_prefix([INTENT]).count()
}

#[test]
fn an_application_lands_whole_and_leaves_no_intent() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    before(&db);
    Applier::default().apply(&db, application()).unwrap();
    assert_applied(&db);
    assert_eq!(intent_parts(&db), 0);
    assert_eq!(recover(&db).unwrap(), 0, "nothing was left to finish");
}

#[test]
fn one_write_or_none_goes_without_an_intent() {
    assert!(operations(vec![]).is_empty());
    assert_eq!(
        operations(vec![write("a", Some("1"))]),
        vec![write("a", Some("1"))]
    );
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let applier = Applier::default();
    applier.apply(&db, vec![write("a", Some("1"))]).unwrap();
    applier.apply(&db, vec![write("a", None)]).unwrap();
    assert_eq!(value(&db, "a"), None);
}

/// An application whose intent takes several parts: a value larger than two of them.
fn large_application() -> Vec<Write> {
    let mut writes = application();
    writes.insert(1, (b"large".to_vec(), Some(vec![7; 2 * PART_BYTES + 100])));
    writes
}

/// A crash after each operation of an application (sled keeps a prefix of what was written,
/// flushed or not): while the intent's parts are written, between the writes, while the parts
/// are removed. Whatever was kept, the next start ends with all of the writes, or with none of
/// them when the intent never landed whole, and with no part of the intent.
#[test]
fn a_crash_after_any_operation_of_an_application_leaves_it_whole_or_absent() {
    let writes = large_application();
    let operations = operations(writes.clone());
    let parts = operations
        .iter()
        .take_while(|(key, value)| key[0] == INTENT && value.is_some())
        .count();
    assert_eq!(
        parts, 3,
        "the large value spreads the intent over three parts"
    );
    assert_eq!(operations.len(), 2 * parts + writes.len());
    for done in 0..=operations.len() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = open(dir.path());
            before(&db);
            for (key, value) in operations[..done].iter().cloned() {
                put(&db, key, value).unwrap();
            }
            db.flush().unwrap();
        }
        let db = open(dir.path());
        let applied = recover(&db).unwrap();
        assert_eq!(intent_parts(&db), 0, "after {done} operations");
        if done < parts {
            assert_eq!(applied, 0);
            assert_eq!(value(&db, "a").as_deref(), Some("old a"), "after {done}");
            assert_eq!(value(&db, "gone").as_deref(), Some("here"), "after {done}");
            assert!(!db.contains_key("large").unwrap());
        } else {
            // Once the removals began the intent is cut short: every write had landed.
            let again = if done <= parts + writes.len() {
                writes.len()
            } else {
                0
            };
            assert_eq!(applied, again, "after {done} operations");
            assert_applied(&db);
            assert_eq!(
                db.get("large").unwrap().unwrap().len(),
                2 * PART_BYTES + 100
            );
        }
        drop(db);
        // The recovery itself was flushed: a second start finds nothing left to do.
        let db = open(dir.path());
        assert_eq!(recover(&db).unwrap(), 0);
    }
}

#[test]
fn a_corrupt_intent_stops_the_recovery_and_says_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    // A gap between parts.
    for (key, value) in operations(large_application()).into_iter().take(3) {
        if key != part_key(1) {
            put(&db, key, value).unwrap();
        }
    }
    let error = recover(&db).unwrap_err().to_string();
    assert!(
        error.contains("the intent of an interrupted write") && error.contains("part 1 is missing"),
        "{error}"
    );
    // Left as it was, for whoever looks into it.
    assert_eq!(intent_parts(&db), 2);
    assert!(whole(&[1, 2]).is_err(), "shorter than its length");
    let mut longer = 1u64.to_le_bytes().to_vec();
    longer.extend_from_slice(&[FORMAT, 0]);
    assert!(whole(&longer).unwrap_err().contains("more than"));
    for bad in [
        &[][..],
        &[9][..],
        &[FORMAT, 1, 0, 0, 0, 1, 0, 0, 0, b'k', 7][..],
    ] {
        assert!(decode(bad).is_err(), "{bad:?}");
    }
}

fn writes() -> impl Strategy<Value = Vec<Write>> {
    prop::collection::vec(
        (
            prop::collection::vec(any::<u8>(), 0..40),
            prop::option::of(prop::collection::vec(any::<u8>(), 0..300)),
        ),
        0..12,
    )
}

proptest! {
    #[test]
    fn an_intent_reads_back_as_its_writes(writes in writes()) {
        prop_assert_eq!(decode(&encode(&writes)).unwrap(), writes);
    }

    /// Bytes that are not an intent are an error, never a panic or a wrong list: every proper
    /// prefix of an intent, and an intent with bytes after it, is refused.
    #[test]
    fn anything_else_is_refused_without_a_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..200),
        writes in writes(),
        cut in any::<prop::sample::Index>(),
    ) {
        let _ = decode(&bytes);
        let intent = encode(&writes);
        prop_assert!(decode(&intent[..cut.index(intent.len())]).is_err());
        let mut longer = intent.clone();
        longer.push(0);
        prop_assert!(decode(&longer).is_err());
    }
}
