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
