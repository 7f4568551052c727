//! Webhook ids are forgotten only once older than the retention cutoff, and only the connector's
//! own.

use serde_json::json;
use store::StoreConfig;

use super::*;
use crate::inbox::IdHash;

fn received_at(at_ms: u64) -> InboxRecord {
    InboxRecord {
        body_sha256: "0".repeat(64),
        response: json!({"status": "applied"}),
        at_ms,
    }
}

#[test]
fn inbox_records_expire_after_the_cutoff_and_only_the_connectors_own() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(StoreConfig::new(dir.path())).unwrap();
    // A name that starts like the first one: its ids must not be taken for the first's.
    let (records, other) = (
        Records::new(store.clone(), "scheduler"),
        Records::new(store.clone(), "scheduler-b"),
    );
    records
        .write(vec![
            Records::put_inbox(records.inbox_key(&IdHash::of("old")), &received_at(1_000)),
            Records::put_inbox(
                records.inbox_key(&IdHash::of("at-cutoff")),
                &received_at(2_000),
            ),
            Records::put_inbox(records.inbox_key(&IdHash::of("new")), &received_at(3_000)),
            Records::put_inbox(other.inbox_key(&IdHash::of("old")), &received_at(1_000)),
        ])
        .unwrap();
    let expired = records.expired_inbox(2_000).unwrap();
    assert_eq!(expired, vec![records.inbox_key(&IdHash::of("old"))]);
    records.delete_expired_inbox(&expired, 2_000).unwrap();
    assert_eq!(
        records
            .inbox(&records.inbox_key(&IdHash::of("old")))
            .unwrap(),
        None
    );
    for kept in ["at-cutoff", "new"] {
        assert!(records
            .inbox(&records.inbox_key(&IdHash::of(kept)))
            .unwrap()
            .is_some());
    }
    assert_eq!(
        other.inbox(&other.inbox_key(&IdHash::of("old"))).unwrap(),
        Some(received_at(1_000))
    );
}

#[test]
fn an_id_reused_after_the_listing_keeps_its_fresh_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(StoreConfig::new(dir.path())).unwrap();
    let records = Records::new(store, "scheduler");
    let key = records.inbox_key(&IdHash::of("reused"));
    records
        .write(vec![Records::put_inbox(key.clone(), &received_at(1_000))])
        .unwrap();
    let expired = records.expired_inbox(2_000).unwrap();
    assert_eq!(expired, vec![key.clone()]);
    // The id comes back (its webhook applied again) before the clean-up deletes.
    records
        .write(vec![Records::put_inbox(key.clone(), &received_at(5_000))])
        .unwrap();
    records.delete_expired_inbox(&expired, 2_000).unwrap();
    assert_eq!(records.inbox(&key).unwrap(), Some(received_at(5_000)));
    // The clean-up locks a record of either kind by the name a webhook with that id locks
    // (`inbound`: the id's hash in hex).
    let hash = IdHash::of("reused");
    assert_eq!(hash.hex(), crate::state::sha256_hex(b"reused"));
    for key in [records.inbox_key(&hash), records.received_key(7, &hash)] {
        assert_eq!(Records::inbox_lock_name(&key), hash.hex(), "{key:?}");
    }
}

#[test]
fn records_in_arrival_order_are_read_up_to_the_first_young_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(StoreConfig::new(dir.path())).unwrap();
    let records = Records::new(store, "scheduler");
    let key = |arrival: u64| records.received_key(arrival, &IdHash::of(&arrival.to_string()));
    // Arrival 2 was timed a moment before arrival 1 and placed after it.
    records
        .write(
            [(0, 1_000), (1, 3_000), (2, 1_500), (3, 4_000)]
                .into_iter()
                .map(|(arrival, at_ms)| Records::put_inbox(key(arrival), &received_at(at_ms)))
                .collect(),
        )
        .unwrap();
    // The scan stops at arrival 1, the first received after the cutoff; arrival 2 waits.
    assert_eq!(records.expired_inbox(2_000).unwrap(), vec![key(0)]);
    assert_eq!(
        records.expired_inbox(3_500).unwrap(),
        vec![key(0), key(1), key(2)]
    );
    // A record dated hours ahead (the clock was set back since) does not hold the rest back.
    let ahead = store::now_ms() + 3 * 3_600_000;
    records
        .write(vec![
            Records::put_inbox(key(4), &received_at(ahead)),
            Records::put_inbox(key(5), &received_at(5_000)),
        ])
        .unwrap();
    assert_eq!(
        records.expired_inbox(6_000).unwrap(),
        vec![key(0), key(1), key(2), key(3), key(5)]
    );
}
