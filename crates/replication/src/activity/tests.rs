//! The activity stamps, on a paused clock.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

#[tokio::test(start_paused = true)]
async fn reads_and_writes_that_move_bytes_are_stamped_each_on_its_own() {
    let activity = Activity::default();
    let began = Instant::now();
    let (near, mut far) = tokio::io::duplex(64);
    let mut watched = activity.watch(near);
    tokio::time::advance(Duration::from_secs(3)).await;
    watched.write_all(b"out").await.expect("written");
    assert_eq!(activity.last_written(), began + Duration::from_secs(3));
    assert_eq!(activity.last_read(), began, "nothing came in yet");
    tokio::time::advance(Duration::from_secs(2)).await;
    far.write_all(b"in").await.expect("the far end writes");
    let mut two = [0; 2];
    watched.read_exact(&mut two).await.expect("read");
    assert_eq!(activity.last_read(), began + Duration::from_secs(5));
    assert_eq!(activity.last_written(), began + Duration::from_secs(3));
    // The end of the stream brings no bytes, and is no sign of life.
    drop(far);
    tokio::time::advance(Duration::from_secs(1)).await;
    let mut rest = Vec::new();
    watched.read_to_end(&mut rest).await.expect("the end");
    assert!(rest.is_empty());
    assert_eq!(activity.last_read(), began + Duration::from_secs(5));
}
