//! The writer thread's failure paths that the public API cannot reach.

use serde_json::json;

use super::*;
use crate::origin::Origin;

fn job(id: &str) -> (Job, oneshot::Receiver<Result<Unflushed<Result<Written>>>>) {
    let (reply, outcome) = oneshot::channel();
    let request = WriteRequest {
        key: EntityKey::new("appointment", id).unwrap(),
        edit: Edit::MergePatch(json!({ "a": 1 })),
        options: WriteOptions::new(Origin::local("u").unwrap()),
    };
    let job = Job {
        request,
        records: None,
        reply,
    };
    (job, outcome)
}

/// A writer that finds its store gone (every handle dropped while writes were still queued)
/// answers each queued write `Closed` and ends, rather than writing or waiting.
#[test]
fn a_writer_whose_store_is_gone_answers_closed_and_stops() {
    let (queue, jobs) = queue();
    let (first, first_outcome) = job("1");
    let (second, second_outcome) = job("2");
    queue.send(first).unwrap();
    queue.send(second).unwrap();
    // Returns although the queue is still open: the store behind it is gone.
    run_writer(&Weak::new(), &Mutex::new(jobs));
    for outcome in [first_outcome, second_outcome] {
        assert!(matches!(outcome.blocking_recv(), Ok(Err(Error::Closed))));
    }
}

/// A write whose working out panics (here its caller's records) fails alone: its entity is left
/// as it was, writes queued with it and after it go through, and the writer thread lives on.
#[tokio::test]
async fn a_write_that_panics_while_staged_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(crate::StoreConfig::new(dir.path())).unwrap();
    let request = |id: &str, value: i64| WriteRequest {
        key: EntityKey::new("appointment", id).unwrap(),
        edit: Edit::MergePatch(json!({ "a": value })),
        options: WriteOptions::new(Origin::local("u").unwrap()),
    };
    store.submit(request("broken", 1)).await.unwrap();
    let (broken, calm) = tokio::join!(
        store.submit_with(
            request("broken", 2),
            Box::new(|_: &CommitView<'_>| panic!("a bug in the records"))
        ),
        store.submit(request("calm", 1)),
    );
    match broken {
        Err(Error::Panicked(message)) => assert!(message.contains("a bug"), "{message}"),
        other => panic!("expected a panic's error: {other:?}"),
    }
    calm.unwrap();
    assert!(store.is_open());
    store.submit(request("calm", 2)).await.unwrap();
    let key = EntityKey::new("appointment", "broken").unwrap();
    assert_eq!(store.get(&key).unwrap().unwrap().data["a"], json!(1));
    store.submit(request("broken", 3)).await.unwrap();
    assert_eq!(store.get(&key).unwrap().unwrap().data["a"], json!(3));
}
