//! Reconnection backoff: exponential from a minimum to a cap, with jitter, so sites that lost
//! the same peer do not all knock at once when it returns.

use std::time::Duration;

use rand::Rng;

/// The pauses between reconnection attempts to one peer.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The next pause: `min * 2^attempt`, capped at `max`, then scaled by a random factor in
    /// `[0.5, 1.0]`, and never below `min`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(31));
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = self.min.saturating_mul(factor).min(self.max);
        let jitter = rand::thread_rng().gen_range(0.5..=1.0);
        ceiling.mul_f64(jitter).max(self.min)
    }

    /// Starts again from `min` (after a link that worked for a while).
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests;
