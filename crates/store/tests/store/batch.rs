//! Many writes at once: `write_many` applies them in one batch with each outcome on its own, and
//! `submit` lets concurrent tasks share batches and flushes through the writer thread.

use serde_json::json;
use store::{Edit, Seq, WriteRequest};

use crate::harness::{if_match, key, local, Harness};

fn request(id: &str, edit: Edit) -> WriteRequest {
    WriteRequest {
        key: key("a", id),
        edit,
        options: local("u"),
    }
}

#[test]
fn write_many_keeps_order_and_each_outcome_on_its_own() {
    let harness = Harness::open();
    let store = harness.store();
    let first = store
        .patch(&key("a", "1"), &json!({"x": 1}), &local("u"))
        .unwrap();
    let flushes_before = store.stats().flushes;
    let requests = vec![
        request("1", Edit::MergePatch(json!({"y": 2}))),
        // Stale: entity 1 is no longer at its first version once the write above is staged.
        WriteRequest {
            options: if_match("u", &first.version),
            ..request("1", Edit::MergePatch(json!({"z": 3})))
        },
        request("2", Edit::Replace(json!({"a": true}))),
        request("3", Edit::MergePatch(json!([1, 2]))),
        request("4", Edit::Delete),
        request("1", Edit::MergePatch(json!({"x": null}))),
        request("2", Edit::Delete),
    ];
    let outcomes = store.write_many(&requests).unwrap().wait().unwrap();
    assert_eq!(outcomes.len(), requests.len());
    let data = |n: usize| {
        outcomes[n]
            .as_ref()
            .unwrap()
            .entity
            .as_ref()
            .unwrap()
            .data
            .clone()
    };
    assert_eq!(json!(data(0)), json!({"x": 1, "y": 2}));
    assert!(matches!(
        outcomes[1],
        Err(store::Error::VersionMismatch { .. })
    ));
    assert_eq!(json!(data(2)), json!({"a": true}));
    assert!(outcomes[2].as_ref().unwrap().created);
    assert!(matches!(outcomes[3], Err(store::Error::UnwritableValue(_))));
    // A delete of an entity that never existed writes nothing.
    let absent = outcomes[4].as_ref().unwrap();
    assert!(absent.entity.is_none() && absent.seq.is_none() && !absent.found());
    assert_eq!(json!(data(5)), json!({"y": 2}));
    let deleted = outcomes[6].as_ref().unwrap();
    assert!(deleted.entity.is_none() && deleted.seq.is_some());

    // Four writes changed something: their feed rows follow the first write's, in order.
    let seqs: Vec<_> = [0, 2, 5, 6]
        .iter()
        .map(|&n| outcomes[n].as_ref().unwrap().seq.unwrap())
        .collect();
    assert_eq!(seqs, vec![Seq(2), Seq(3), Seq(4), Seq(5)]);
    let rows = store.feed(Seq(1), None, 10).unwrap();
    assert_eq!(rows.iter().map(|row| row.seq).collect::<Vec<_>>(), seqs);
    assert_eq!(rows[1].id.as_str(), "2");
    assert!(!rows[3].exists);
    // Acknowledged means durable, and one flush was enough for the whole batch.
    assert!(store.last_seq() >= Seq(5));
    assert_eq!(store.stats().flushes - flushes_before, 1);

    // What the batch wrote is what a reopened store reads.
    let mut harness = harness;
    harness.reopen();
    let store = harness.store();
    assert_eq!(
        json!(store.get(&key("a", "1")).unwrap().unwrap().data),
        json!({"y": 2})
    );
    assert!(store.get(&key("a", "2")).unwrap().is_none());
    assert!(store.get(&key("a", "4")).unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submissions_share_batches_and_lose_nothing() {
    const TASKS: usize = 64;
    const WRITES: usize = 20;
    let harness = Harness::open();
    let store = harness.store().clone();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let store = store.clone();
            tokio::spawn(async move {
                for write in 0..WRITES {
                    // Every fourth task writes one shared entity, so one batch often holds
                    // several writes of the same entity.
                    let id = if task % 4 == 0 {
                        "shared".to_string()
                    } else {
                        format!("t{task}")
                    };
                    let edit = Edit::MergePatch(json!({ format!("t{task}"): write }));
                    let written = if task % 8 == 4 {
                        // Some writers go around the queue, holding entity locks the writer
                        // thread then has to wait for.
                        let store = store.clone();
                        tokio::task::spawn_blocking(move || {
                            let Edit::MergePatch(patch) = edit else {
                                unreachable!()
                            };
                            store.patch(&key("a", "shared"), &patch, &local("u"))
                        })
                        .await
                        .unwrap()
                    } else {
                        store.submit(request(&id, edit)).await
                    }
                    .unwrap();
                    assert!(store.last_seq() >= written.seq.unwrap());
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let total = (TASKS * WRITES) as u64;
    let stats = store.stats();
    assert_eq!(stats.writes, total);
    assert!(stats.flushes < total / 2, "{stats:?}");
    let rows = store.feed(Seq::ZERO, None, usize::MAX).unwrap();
    assert_eq!(rows.len() as u64, total);
    let shared = store.get(&key("a", "shared")).unwrap().unwrap();
    for task in (0..TASKS).step_by(4) {
        assert_eq!(shared.data[&format!("t{task}")], WRITES - 1);
    }
}

#[tokio::test]
async fn a_submission_after_close_is_refused_and_leaves_no_trace() {
    let harness = Harness::open();
    let store = harness.store();
    store
        .submit(request("1", Edit::MergePatch(json!({"x": 1}))))
        .await
        .unwrap();
    store.close().unwrap();
    let refused = store
        .submit(request("1", Edit::MergePatch(json!({"x": 2}))))
        .await;
    assert!(matches!(refused, Err(store::Error::Closed)), "{refused:?}");
    assert_eq!(store.get(&key("a", "1")).unwrap().unwrap().data["x"], 1);
    assert_eq!(store.feed(Seq::ZERO, None, 10).unwrap().len(), 1);
}
