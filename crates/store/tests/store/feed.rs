//! The change feed: one row per change, readable from any point, filtered by kind, and waited on.

use std::time::Duration;

use serde_json::json;
use store::{Kind, Origin, Seq, WriteOptions};

use crate::harness::{key, local, Harness};

#[test]
fn every_change_gets_a_row_in_order() {
    let harness = Harness::open();
    let store = harness.store();
    let appointment = key("appointment", "1");
    let permit = key("permit", "9");
    let a = store
        .patch(
            &appointment,
            &json!({"a": 1, "s": {"x": 1}}),
            &local("alice"),
        )
        .unwrap();
    let connector = WriteOptions::new(Origin::parse("connector:crm").unwrap());
    let b = store
        .patch(&permit, &json!({"p": true}), &connector)
        .unwrap();
    let c = store
        .patch(&appointment, &json!({"s": {"y": 2}}), &local("alice"))
        .unwrap();
    let rows = store.feed(Seq::ZERO, None, 100).unwrap();
    assert_eq!(
        rows.iter().map(|row| row.seq).collect::<Vec<_>>(),
        vec![Seq(1), Seq(2), Seq(3)]
    );
    assert_eq!(
        [a.seq, b.seq, c.seq],
        [Some(Seq(1)), Some(Seq(2)), Some(Seq(3))]
    );
    assert_eq!(rows[0].kind.as_str(), "appointment");
    assert_eq!(rows[0].id.as_str(), "1");
    assert_eq!(rows[0].fields, vec!["a", "s", "s.x"]);
    assert_eq!(rows[0].version, a.version);
    assert!(rows[0].exists);
    assert_eq!(rows[1].origin.as_str(), "connector:crm");
    assert_eq!(rows[1].kind.as_str(), "permit");
    assert_eq!(rows[2].fields, vec!["s.y"]);
    assert_eq!(rows[2].version, c.version);
    assert!(rows.windows(2).all(|pair| pair[0].at_ms <= pair[1].at_ms));
    assert_eq!(store.last_seq(), Seq(3));
    assert_eq!(store.stats().feed_seq, 3);
}

#[test]
fn feed_reads_since_with_kind_and_limit() {
    let harness = Harness::open();
    let store = harness.store();
    for n in 0..10 {
        let kind = if n % 2 == 0 { "even" } else { "odd" };
        store
            .patch(&key(kind, &n.to_string()), &json!({ "n": n }), &local("u"))
            .unwrap();
    }
    let seqs = |rows: Vec<store::FeedRow>| rows.iter().map(|row| row.seq.0).collect::<Vec<_>>();
    assert_eq!(seqs(store.feed(Seq(7), None, 100).unwrap()), vec![8, 9, 10]);
    assert_eq!(seqs(store.feed(Seq(2), None, 3).unwrap()), vec![3, 4, 5]);
    assert_eq!(
        seqs(store.feed(Seq(10), None, 3).unwrap()),
        Vec::<u64>::new()
    );
    assert_eq!(
        seqs(store.feed(Seq(99), None, 3).unwrap()),
        Vec::<u64>::new()
    );
    let odd = Kind::new("odd").unwrap();
    assert_eq!(
        seqs(store.feed(Seq::ZERO, Some(&odd), 100).unwrap()),
        vec![2, 4, 6, 8, 10]
    );
    assert_eq!(seqs(store.feed(Seq(4), Some(&odd), 2).unwrap()), vec![6, 8]);
    let none = Kind::new("none").unwrap();
    assert!(store.feed(Seq::ZERO, Some(&none), 100).unwrap().is_empty());
}

#[test]
fn issue_2_feed_with_limit_zero_returns_no_rows() {
    let harness = Harness::open();
    let store = harness.store();
    store
        .patch(&key("a", "1"), &json!({"x": 1}), &local("u"))
        .unwrap();
    assert!(store.feed(Seq::ZERO, None, 0).unwrap().is_empty());
}

#[test]
fn subscribers_see_the_feed_advance() {
    let harness = Harness::open();
    let store = harness.store().clone();
    let mut receiver = store.subscribe();
    assert_eq!(*receiver.borrow_and_update(), Seq::ZERO);
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || {
            for n in 0..3 {
                store
                    .patch(&key("a", "1"), &json!({ "n": n }), &local("u"))
                    .unwrap();
            }
        })
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), async {
            while *receiver.borrow_and_update() < Seq(3) {
                receiver.changed().await.expect("the store is open");
            }
        })
        .await
        .expect("the feed reached 3 in time");
    });
    writer.join().unwrap();
    assert_eq!(store.feed(Seq::ZERO, None, 10).unwrap().len(), 3);
}

#[test]
fn the_feed_survives_a_reopen_and_keeps_counting() {
    let mut harness = Harness::open();
    for n in 0..3 {
        harness
            .store()
            .patch(&key("a", "1"), &json!({ "n": n }), &local("u"))
            .unwrap();
    }
    harness.reopen();
    let store = harness.store();
    assert_eq!(store.last_seq(), Seq(3));
    assert_eq!(store.feed(Seq::ZERO, None, 10).unwrap().len(), 3);
    let written = store
        .patch(&key("a", "2"), &json!({"n": 9}), &local("u"))
        .unwrap();
    assert_eq!(written.seq, Some(Seq(4)));
}
