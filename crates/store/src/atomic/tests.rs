//! Writes applied whole, and undone after a crash at any point before their intent is removed.

use proptest::prelude::*;

use super::*;

/// sled in `dir`, as the store opens it: waiting a moment for the lock the last handle of a
/// reopened directory may still hold.
fn open(dir: &std::path::Path) -> sled::Db {
    crate::store::open_sled(&crate::StoreConfig::new(dir)).unwrap()
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
    db.insert("big", vec![1; BIG]).unwrap();
}

/// The size of a value that spreads an intent that keeps it over three parts.
const BIG: usize = 2 * PART_BYTES + 100;

fn assert_applied(db: &sled::Db) {
    assert_eq!(intent_parts(db), 0, "the intent is left behind");
    assert_eq!(value(db, "a").as_deref(), Some("new a"));
    assert_eq!(value(db, "b").as_deref(), Some("second b"));
    assert_eq!(value(db, "c").as_deref(), Some(""));
    assert_eq!(value(db, "gone"), None);
    assert_eq!(value(db, "untouched").as_deref(), Some("kept"));
}

/// The steps of `writes` over a store where no key has a value yet.
fn fresh_steps(writes: Vec<Write>) -> Vec<Step> {
    steps(writes, |_| Ok(None)).unwrap()
}

/// The steps of `writes` over `db` as it is now.
fn steps_over(db: &sled::Db, writes: Vec<Write>) -> Vec<Step> {
    steps(writes, |key| Ok(db.get(key)?.map(|value| value.to_vec()))).unwrap()
}

/// The state `before` made: none of the application.
fn assert_before(db: &sled::Db) {
    assert_eq!(intent_parts(db), 0, "the intent is left behind");
    assert_eq!(value(db, "a").as_deref(), Some("old a"));
    assert_eq!(value(db, "b"), None);
    assert_eq!(value(db, "c"), None);
    assert_eq!(value(db, "gone").as_deref(), Some("here"));
    assert_eq!(value(db, "untouched").as_deref(), Some("kept"));
    assert_eq!(db.get("big").unwrap().unwrap().len(), BIG);
}

fn intent(db: &sled::Db) -> sled::Tree {
    db.open_tree(INTENT_TREE).unwrap()
}

fn intent_parts(db: &sled::Db) -> usize {
    intent(db).len()
}

fn applier(db: &sled::Db) -> Applier {
    let (applier, recovered) = Applier::open(db).unwrap();
    assert_eq!(recovered, 0, "nothing was left to finish");
    applier
}

#[test]
fn an_application_lands_whole_and_leaves_no_intent() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    before(&db);
    applier(&db).apply(application()).unwrap();
    assert_applied(&db);
    drop(db);
    let db = open(dir.path());
    applier(&db);
    assert_applied(&db);
}

#[test]
fn one_write_or_none_goes_without_an_intent() {
    assert!(fresh_steps(vec![]).is_empty());
    let one = write("a", Some("1"));
    assert_eq!(
        fresh_steps(vec![one.clone()]),
        vec![Step::Write(one.clone())]
    );
    // Two writes of one key are one write: the last.
    let last = write("a", None);
    assert_eq!(
        fresh_steps(vec![one, last.clone()]),
        vec![Step::Write(last)]
    );
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let applier = applier(&db);
    applier.apply(vec![write("a", Some("1"))]).unwrap();
    applier.apply(vec![write("a", None)]).unwrap();
    assert_eq!(value(&db, "a"), None);
}

/// Only the last write of a key in a set is applied, so nothing in between is ever seen.
#[test]
fn of_several_writes_of_one_key_in_a_set_only_the_last_is_applied() {
    let steps = fresh_steps(application());
    let writes: Vec<&Write> = steps
        .iter()
        .filter_map(|step| match step {
            Step::Write(write) => Some(write),
            Step::Part(..) => None,
        })
        .collect();
    assert_eq!(
        writes,
        [
            &write("a", Some("new a")),
            &write("gone", None),
            &write("c", Some("")),
            &write("b", Some("second b")),
        ]
    );
}

/// An application whose intent takes several parts: it overwrites a value larger than two of
/// them (which the intent keeps, to put it back), and writes a new key with another (which the
/// intent only names).
fn large_application() -> Vec<Write> {
    let mut writes = application();
    writes.insert(1, write("big", Some("small now")));
    writes.insert(2, (b"large".to_vec(), Some(vec![7; BIG])));
    writes
}

/// A crash after each step of an application (sled keeps a prefix of what was written, flushed
/// or not): while the intent's parts are written, between the writes, while the parts are
/// removed. Whatever was kept, the next start ends with none of the writes, or with all of them
/// once the intent's removal had begun, and with no part of the intent.
#[test]
fn a_crash_after_any_step_of_an_application_leaves_it_whole_or_absent() {
    let steps = {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path());
        before(&db);
        steps_over(&db, large_application())
    };
    let parts = steps
        .iter()
        .take_while(|step| matches!(step, Step::Part(_, Some(_))))
        .count();
    let writes = steps.len() - 2 * parts;
    assert_eq!(
        parts, 3,
        "the large value spreads the intent over three parts"
    );
    for done in 0..=steps.len() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = open(dir.path());
            before(&db);
            let intent = intent(&db);
            for step in steps[..done].iter().cloned() {
                run(&db, &intent, step).unwrap();
            }
            db.flush().unwrap();
        }
        let db = open(dir.path());
        let (_, undone) = Applier::open(&db).unwrap();
        assert_eq!(intent_parts(&db), 0, "after {done} steps");
        if done <= parts + writes {
            // A whole intent puts every key of the set back; one cut short while its parts
            // were written had nothing to undo.
            let expected = if done < parts { 0 } else { writes };
            assert_eq!(undone, expected, "after {done} steps");
            assert_before(&db);
        } else {
            // Once the removals began the intent is cut short: every write had landed.
            assert_eq!(undone, 0, "after {done} steps");
            assert_applied(&db);
            assert_eq!(value(&db, "big").as_deref(), Some("small now"));
            assert_eq!(db.get("large").unwrap().unwrap().len(), BIG);
        }
        drop(db);
        // The recovery itself was flushed: a second start finds nothing left to do.
        let db = open(dir.path());
        applier(&db);
    }
}

/// A set that fails part-way leaves its intent for the next start, and no later set may
/// replace it: the applier refuses them all.
#[test]
fn after_a_set_fails_part_way_every_later_set_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let applier = applier(&db);
    // A panic while the lock is held is a set that failed part-way.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let _held = applier.failed.lock().unwrap();
                panic!("an application panicked");
            })
            .join()
            .unwrap_err();
    });
    assert!(matches!(applier.apply(application()), Err(Error::Failed)));
    assert!(matches!(
        applier.apply(vec![write("a", Some("1"))]),
        Err(Error::Failed)
    ));
    assert_eq!(value(&db, "a"), None);
}

#[test]
fn a_corrupt_intent_stops_the_recovery_and_says_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    // A gap between parts.
    before(&db);
    let intent = intent(&db);
    for step in steps_over(&db, large_application()).into_iter().take(3) {
        if !matches!(step, Step::Part(1, _)) {
            run(&db, &intent, step).unwrap();
        }
    }
    let error = Applier::open(&db).err().unwrap().to_string();
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
        prop_assert_eq!(whole(&encode(&writes)).unwrap(), Some(writes));
    }

    /// Bytes that are not an intent are an error, never a panic or a wrong list: an intent cut
    /// short is known as such, and its body cut anywhere, or with bytes after it, is refused.
    #[test]
    fn anything_else_is_refused_without_a_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..200),
        writes in writes(),
        cut in any::<prop::sample::Index>(),
    ) {
        let _ = whole(&bytes);
        let _ = decode(&bytes);
        let intent = encode(&writes);
        let short = &intent[..8 + cut.index(intent.len() - 8)];
        prop_assert_eq!(whole(short).unwrap(), None);
        prop_assert!(decode(&short[8..]).is_err());
        let mut longer = intent.clone();
        longer.push(0);
        prop_assert!(whole(&longer).is_err());
        prop_assert!(decode(&longer[8..]).is_err());
    }
}
