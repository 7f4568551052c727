//! Where inbox records go and how they are found again: in arrival order while the index has
//! room, by hash past it or when another id holds the prefix, and both after a reopen.

use serde_json::json;
use store::{Store, StoreConfig};

use super::*;

fn record(at_ms: u64) -> InboxRecord {
    InboxRecord {
        body_sha256: "0".repeat(64),
        response: json!({"status": "applied", "at": at_ms}),
        at_ms,
    }
}

/// Writes a record for `hash` received at `at_ms` where the inbox places it, as a webhook does
/// (one received earlier than that counts as expired: the id is reused).
fn receive(inbox: &Inbox, records: &Records, hash: &IdHash, at_ms: u64) -> Place {
    let lookup = inbox.lookup(records, hash, at_ms).unwrap();
    let key = inbox.place(records, &lookup, hash);
    write(records, key.clone(), at_ms);
    place_of(&key)
}

fn write(records: &Records, key: RecordKey, at_ms: u64) {
    records
        .write(vec![Records::put_inbox(key, &record(at_ms))])
        .unwrap();
}

/// Where a key [`Inbox::place`] gave puts its record.
#[derive(Debug, PartialEq)]
enum Place {
    /// In arrival order, at this number.
    Arrival(u64),
    /// Under the id's hash.
    Hashed,
}

fn place_of(key: &RecordKey) -> Place {
    match Records::received_of(key) {
        Some((arrival, _)) => Place::Arrival(arrival),
        None => {
            assert!(key.in_space("connector.inbox"), "{key:?}");
            Place::Hashed
        }
    }
}

/// The records of a connector named `scheduler`, in a store in `dir`.
fn scheduler_records(dir: &std::path::Path) -> Records {
    Records::new(Store::open(StoreConfig::new(dir)).unwrap(), "scheduler")
}

/// A fresh store's `scheduler` records and their inbox, indexing at most `limit` ids.
fn opened(limit: usize) -> (tempfile::TempDir, Records, Inbox) {
    let dir = tempfile::tempdir().unwrap();
    let records = scheduler_records(dir.path());
    let inbox = Inbox::open(&records, limit).unwrap();
    (dir, records, inbox)
}

/// Two hashes with the same first 16 bytes: SHA-256 will not make them, a test can.
fn same_prefix() -> (IdHash, IdHash) {
    let mut bytes = [7; 32];
    bytes[31] = 8;
    (IdHash([7; 32]), IdHash(bytes))
}

/// Each id's record is found, received at the time given, before and after a reopen.
fn both_found(inbox: &Inbox, records: &Records, expected: [(&IdHash, u64); 2]) {
    let reopened = Inbox::open(records, 10).unwrap();
    for inbox in [inbox, &reopened] {
        for (hash, at_ms) in expected {
            assert_eq!(found(inbox, records, hash), Some(at_ms));
        }
    }
}

fn found(inbox: &Inbox, records: &Records, hash: &IdHash) -> Option<u64> {
    let lookup = inbox.lookup(records, hash, 0).unwrap();
    lookup.found.map(|record| record.at_ms)
}

#[test]
fn ids_go_in_arrival_order_until_the_index_is_full_and_are_all_found_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(StoreConfig::new(dir.path())).unwrap();
    let records = Records::new(store.clone(), "scheduler");
    let inbox = Inbox::open(&records, 2).unwrap();
    let ids: Vec<IdHash> = ["a", "b", "c", "d"].map(IdHash::of).to_vec();
    let places: Vec<Place> = ids
        .iter()
        .enumerate()
        .map(|(n, hash)| receive(&inbox, &records, hash, n as u64))
        .collect();
    assert_eq!(
        places,
        [
            Place::Arrival(0),
            Place::Arrival(1),
            Place::Hashed,
            Place::Hashed
        ]
    );
    assert_eq!(inbox.indexed(), 2);
    for (n, hash) in ids.iter().enumerate() {
        assert_eq!(found(&inbox, &records, hash), Some(n as u64));
    }
    assert_eq!(found(&inbox, &records, &IdHash::of("never")), None);

    // Reopened with room: the index holds what is in arrival order, and numbers go on.
    let reopened = Inbox::open(&records, 10).unwrap();
    assert_eq!(reopened.indexed(), 2);
    for (n, hash) in ids.iter().enumerate() {
        assert_eq!(found(&reopened, &records, hash), Some(n as u64));
    }
    assert_eq!(
        receive(&reopened, &records, &IdHash::of("e"), 4),
        Place::Arrival(2)
    );
    // Another connector's records are not its own.
    let other = Records::new(store, "scheduler-b");
    let other_inbox = Inbox::open(&other, 10).unwrap();
    assert_eq!(other_inbox.indexed(), 0);
    assert_eq!(found(&other_inbox, &other, &ids[0]), None);
}

#[test]
fn an_index_of_no_ids_keeps_every_record_by_hash() {
    let (_dir, records, inbox) = opened(0);
    let hash = IdHash::of("a");
    assert_eq!(receive(&inbox, &records, &hash, 7), Place::Hashed);
    assert_eq!(inbox.indexed(), 0);
    assert_eq!(found(&inbox, &records, &hash), Some(7));
}

#[test]
fn an_id_whose_prefix_another_id_holds_goes_by_hash_and_both_are_found() {
    let (_dir, records, inbox) = opened(10);
    let (first, second) = same_prefix();
    assert_eq!(receive(&inbox, &records, &first, 1), Place::Arrival(0));
    assert_eq!(found(&inbox, &records, &second), None);
    assert_eq!(receive(&inbox, &records, &second, 2), Place::Hashed);
    both_found(&inbox, &records, [(&first, 1), (&second, 2)]);
}

#[test]
fn of_two_ids_with_one_prefix_looked_up_at_once_the_second_placed_goes_by_hash() {
    let (_dir, records, inbox) = opened(10);
    let (first, second) = same_prefix();
    // Both look up before either is placed (they hold different locks).
    let first_lookup = inbox.lookup(&records, &first, 0).unwrap();
    let second_lookup = inbox.lookup(&records, &second, 0).unwrap();
    let second_key = inbox.place(&records, &second_lookup, &second);
    let first_key = inbox.place(&records, &first_lookup, &first);
    assert_eq!(
        (place_of(&second_key), place_of(&first_key)),
        (Place::Arrival(0), Place::Hashed)
    );
    write(&records, second_key, 2);
    write(&records, first_key, 1);
    both_found(&inbox, &records, [(&first, 1), (&second, 2)]);
}

#[test]
fn an_expired_indexed_record_does_not_hide_a_newer_one_kept_by_hash() {
    // As after going back to a build from before the arrival order and forward again.
    let (_dir, records, inbox) = opened(10);
    let hash = IdHash::of("x");
    assert_eq!(receive(&inbox, &records, &hash, 1_000), Place::Arrival(0));
    write(&records, records.inbox_key(&hash), 5_000);
    let lookup = inbox.lookup(&records, &hash, 2_000).unwrap();
    assert_eq!(lookup.found.map(|record| record.at_ms), Some(5_000));
    // Within the retention the indexed record answers, and is the one a repeat gets.
    let lookup = inbox.lookup(&records, &hash, 500).unwrap();
    assert_eq!(lookup.found.map(|record| record.at_ms), Some(1_000));
}

#[test]
fn a_placed_arrival_is_indexed_before_its_record_is_written() {
    let (_dir, records, inbox) = opened(1);
    let hash = IdHash::of("a");
    let lookup = inbox.lookup(&records, &hash, 0).unwrap();
    assert_eq!(
        place_of(&inbox.place(&records, &lookup, &hash)),
        Place::Arrival(0)
    );
    assert_eq!(inbox.indexed(), 1);
    // Its write failed: the entry points at no record, which reads as none, and the id's next
    // attempt goes by hash, as the entry is not known to be its own.
    assert_eq!(found(&inbox, &records, &hash), None);
    let lookup = inbox.lookup(&records, &hash, 0).unwrap();
    assert_eq!(
        place_of(&inbox.place(&records, &lookup, &hash)),
        Place::Hashed
    );
}

#[test]
fn the_clean_up_forgets_an_entry_only_when_it_is_the_deleted_records() {
    // Full after one id: the reused id still goes in arrival order, replacing its entry.
    let (_dir, records, inbox) = opened(1);
    let hash = IdHash::of("reused");
    assert_eq!(receive(&inbox, &records, &hash, 1_000), Place::Arrival(0));
    // It expires, and comes back before the clean-up deletes its first record.
    let expired = records.expired_inbox(2_000).unwrap();
    assert_eq!(expired, vec![records.received_key(0, &hash)]);
    assert_eq!(receive(&inbox, &records, &hash, 5_000), Place::Arrival(1));
    let deleted = records.delete_expired_inbox(&expired, 2_000).unwrap();
    assert_eq!(deleted, expired);
    inbox.forget(&deleted[0]);
    assert_eq!(inbox.indexed(), 1);
    assert_eq!(found(&inbox, &records, &hash), Some(5_000));
    // Once the fresh record goes too, so does its entry, and the index has room again.
    let deleted = records
        .delete_expired_inbox(&records.expired_inbox(6_000).unwrap(), 6_000)
        .unwrap();
    assert_eq!(deleted, vec![records.received_key(1, &hash)]);
    inbox.forget(&deleted[0]);
    assert_eq!(inbox.indexed(), 0);
    assert_eq!(found(&inbox, &records, &hash), None);
    assert_eq!(
        receive(&inbox, &records, &IdHash::of("next"), 7_000),
        Place::Arrival(2)
    );
    // A key of the other kind, or not an inbox key at all, is no index entry.
    inbox.forget(&records.inbox_key(&IdHash::of("next")));
    inbox.forget(&RecordKey::new("connector.received", &["scheduler", "zz"]));
    assert_eq!(inbox.indexed(), 1);
}

#[test]
fn a_key_that_is_not_an_arrival_and_a_hash_stops_the_index_from_opening() {
    let dir = tempfile::tempdir().unwrap();
    let records = scheduler_records(dir.path());
    records
        .write(vec![Records::put_inbox(
            RecordKey::new("connector.received", &["scheduler", "not-hex", "x"]),
            &record(1),
        )])
        .unwrap();
    let error = Inbox::open(&records, 10).err().expect("a corrupt key");
    assert!(
        error
            .to_string()
            .contains("connector.received/scheduler/not-hex/x"),
        "{error}"
    );
}

/// What docs/configuration.md says an index costs: the default bound fits a table of 2^20
/// slots of 25 bytes (an entry and its control byte), about 26 MB.
#[test]
fn the_default_bound_fits_a_table_of_a_million_slots() {
    assert_eq!(std::mem::size_of::<(Prefix, u64)>(), 24);
    let mut index = Index::default();
    for n in 0..crate::config::DEFAULT_INDEX_IDS as u64 {
        index.insert(IdHash::of(&n.to_string()).prefix(), n);
    }
    assert!(index.capacity() < 1 << 20, "{}", index.capacity());
    assert_eq!(index.len(), crate::config::DEFAULT_INDEX_IDS);
}
