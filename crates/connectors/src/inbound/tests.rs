//! A webhook's handling runs to its end whether or not its request waits for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_util::task::TaskTracker;

use super::*;

fn outcome() -> WebhookOutcome {
    WebhookOutcome {
        response: json!({"status": "applied"}),
        replayed: false,
    }
}

#[tokio::test]
async fn polled_to_its_end_it_answers_in_place() {
    let answer = RunsToEnd::new(TaskTracker::new(), async {
        tokio::task::yield_now().await;
        Ok(outcome())
    })
    .await
    .unwrap();
    assert_eq!(answer, outcome());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_before_its_end_it_runs_on_by_itself_on_the_tracked_tasks() {
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let finished = Arc::new(AtomicBool::new(false));
    let flag = finished.clone();
    let tasks = TaskTracker::new();
    let work = RunsToEnd::new(tasks.clone(), async move {
        // Waits for something only the test gives, after it has dropped the request's future.
        released.await.ok();
        flag.store(true, Ordering::SeqCst);
        Ok(outcome())
    });
    let mut work = work;
    let mut cx = Context::from_waker(std::task::Waker::noop());
    assert!(
        Pin::new(&mut work).poll(&mut cx).is_pending(),
        "it had to wait"
    );
    drop(work);
    assert_eq!(
        tasks.len(),
        1,
        "the rest of it is one of the tracker's tasks"
    );
    release.send(()).unwrap();
    // It runs on the tracker's tasks, so waiting for those waits for it.
    tasks.close();
    tokio::time::timeout(Duration::from_secs(10), tasks.wait())
        .await
        .expect("the dropped work ended");
    assert!(
        finished.load(Ordering::SeqCst),
        "the dropped work ran to its end"
    );
}

#[tokio::test]
async fn a_panic_is_an_error_not_a_dead_request() {
    let failed = RunsToEnd::new(TaskTracker::new(), async {
        tokio::task::yield_now().await;
        panic!("a bug");
    })
    .await;
    assert!(matches!(failed, Err(Error::Panicked)), "{failed:?}");
}
