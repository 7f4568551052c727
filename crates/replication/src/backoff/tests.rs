//! The backoff grows, stays within its bounds, and starts over after a reset.

use std::time::Duration;

use super::Backoff;

#[test]
fn delays_grow_to_the_cap_with_jitter_and_reset() {
    let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
    let mut backoff = Backoff::new(min, max);
    let delays: Vec<Duration> = (0..12).map(|_| backoff.next_delay()).collect();
    for (attempt, delay) in delays.iter().enumerate() {
        let ceiling = (min * 2u32.pow(attempt as u32)).min(max);
        assert!(
            *delay >= min,
            "attempt {attempt}: {delay:?} is below the minimum"
        );
        assert!(
            *delay <= ceiling,
            "attempt {attempt}: {delay:?} is above {ceiling:?}"
        );
        assert!(
            *delay >= (ceiling / 2).max(min),
            "attempt {attempt}: {delay:?} is below half of {ceiling:?}"
        );
    }
    assert!(delays[11] >= max / 2, "the cap is reached: {delays:?}");
    backoff.reset();
    assert!(
        backoff.next_delay() <= min,
        "a reset starts again from the minimum"
    );
}
