use std::sync::Arc;
use std::time::Duration;

use super::KeyedLocks;

#[tokio::test]
async fn different_keys_never_wait_for_each_other() {
    let locks = KeyedLocks::new();
    // Thousands of keys held at once: with stripes, some of them would have shared one.
    let mut guards = Vec::new();
    for index in 0..5_000 {
        let guard =
            tokio::time::timeout(Duration::from_secs(1), locks.lock(format!("msg_{index}")))
                .await
                .expect("a key nobody holds is granted at once");
        guards.push(guard);
    }
    assert_eq!(locks.len(), 5_000);
    drop(guards);
    assert_eq!(locks.len(), 0, "a key nobody holds keeps no mutex");
}

#[tokio::test]
async fn one_key_is_held_by_one_task_at_a_time() {
    let locks = Arc::new(KeyedLocks::new());
    let inside = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (locks, inside) = (locks.clone(), inside.clone());
            tokio::spawn(async move {
                let _guard = locks.lock("appointment/1".to_string()).await;
                let before = inside.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                inside.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                before
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(
            task.await.expect("the task ends"),
            0,
            "nobody else was inside"
        );
    }
    assert_eq!(locks.len(), 0);
}

#[tokio::test]
async fn a_waiter_that_gives_up_leaves_nothing_behind() {
    let locks = KeyedLocks::new();
    let held = locks.lock("a".to_string()).await;
    let waited = tokio::time::timeout(Duration::from_millis(20), locks.lock("a".to_string())).await;
    assert!(waited.is_err(), "the key is held, so the second lock waits");
    assert_eq!(locks.len(), 1, "the holder's mutex stays");
    drop(held);
    assert_eq!(
        locks.len(),
        0,
        "the waiter that gave up left no mutex behind"
    );
    // And the key can be taken again.
    let again = tokio::time::timeout(Duration::from_secs(1), locks.lock("a".to_string())).await;
    assert!(again.is_ok());
}

#[tokio::test]
async fn a_waiter_dropped_after_the_holder_let_go_leaves_nothing_behind() {
    use std::future::Future;
    let locks = KeyedLocks::new();
    let held = locks.lock("a".to_string()).await;
    let mut waiter = Box::pin(locks.lock("a".to_string()));
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(
        waiter.as_mut().poll(&mut context).is_pending(),
        "the waiter queues behind the holder"
    );
    // The holder lets go, which hands the key to the waiter; the waiter is dropped before it
    // runs again (its request went away at that moment).
    drop(held);
    assert_eq!(locks.len(), 1, "the waiter still has the key's mutex");
    drop(waiter);
    assert_eq!(locks.len(), 0, "the last one to let go removes the mutex");
}

#[test]
fn blocking_threads_lock_several_keys_in_one_order() {
    let locks = Arc::new(KeyedLocks::new());
    let (done, finished) = std::sync::mpsc::channel();
    // Two threads lock overlapping sets given in opposite orders, many times: taking them in
    // the order given could deadlock; sorted, it cannot.
    for keys in [vec![1, 2, 3, 2], vec![3, 2, 1]] {
        let (locks, done) = (locks.clone(), done.clone());
        std::thread::spawn(move || {
            for _ in 0..2_000 {
                let guards = locks.blocking_lock_all(&keys);
                assert_eq!(guards.len(), 3, "a key given twice is locked once");
            }
            done.send(()).expect("the test waits");
        });
    }
    for _ in 0..2 {
        finished
            .recv_timeout(Duration::from_secs(30))
            .expect("both threads finish: no deadlock, no panic");
    }
    assert_eq!(locks.len(), 0);
}
