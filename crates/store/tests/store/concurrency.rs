//! Many writers at once: group commit shares flushes, and no write is lost.

use std::sync::{Arc, Barrier};

use serde_json::json;
use store::Seq;

use crate::harness::{key, local, Harness};

#[test]
fn concurrent_writers_share_flushes_and_lose_nothing() {
    const THREADS: usize = 16;
    const WRITES: usize = 25;
    let harness = Harness::open();
    let store = harness.store().clone();
    let barrier = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|thread| {
            let store = store.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                for write in 0..WRITES {
                    // Half the threads share one entity, so per-entity locking is exercised too.
                    let id = if thread % 2 == 0 {
                        "shared".to_string()
                    } else {
                        format!("t{thread}")
                    };
                    let written = store
                        .patch(
                            &key("a", &id),
                            &json!({ format!("t{thread}"): write }),
                            &local("u"),
                        )
                        .unwrap();
                    // Acknowledged means durable: the feed already shows the row.
                    assert!(store.last_seq() >= written.seq.unwrap());
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let stats = store.stats();
    let total = (THREADS * WRITES) as u64;
    assert_eq!(stats.writes, total);
    assert!(stats.flushes < stats.writes, "{stats:?}");
    assert_eq!(store.last_seq(), Seq(total));
    let rows = store.feed(Seq::ZERO, None, usize::MAX).unwrap();
    assert_eq!(rows.len() as u64, total);
    assert!(rows
        .iter()
        .enumerate()
        .all(|(n, row)| row.seq == Seq(n as u64 + 1)));
    let shared = store.get(&key("a", "shared")).unwrap().unwrap();
    for thread in (0..THREADS).step_by(2) {
        assert_eq!(shared.data[&format!("t{thread}")], WRITES - 1);
    }
}

#[test]
fn issue_2_writes_after_close_are_refused_and_leave_no_trace() {
    let harness = Harness::open();
    let store = harness.store();
    store
        .patch(&key("a", "1"), &json!({"x": 1}), &local("u"))
        .unwrap();
    store.close().unwrap();
    assert!(matches!(
        store.patch(&key("a", "1"), &json!({"x": 2}), &local("u")),
        Err(store::Error::Closed)
    ));
    // The refused write left no trace.
    assert_eq!(store.get(&key("a", "1")).unwrap().unwrap().data["x"], 1);
    assert_eq!(store.feed(Seq::ZERO, None, 10).unwrap().len(), 1);
}
