//! Exponential backoff with full jitter, so a fleet that lost its server does not reconnect in
//! lockstep when it comes back.

use std::time::{Duration, Instant};

use rand::Rng;

/// Retry pacing for one stretch of failures.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    failing_since: Option<Instant>,
}

impl Backoff {
    /// Waits start near `base` and double up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
            failing_since: None,
        }
    }

    /// The next wait: uniform in `[0, min(cap, base * 2^attempt)]`.
    pub fn next_delay(&mut self) -> Duration {
        self.failing_since.get_or_insert_with(Instant::now);
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(rand::rng().random_range(0.0..=1.0))
    }

    /// How long the current stretch of failures has lasted.
    pub fn failing_for(&self) -> Duration {
        self.failing_since.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// Starts the waits from `base` again within the same stretch of failures (it still counts
    /// towards giving up): for an answer that says where to go next, such as a standby naming
    /// the active server, after which a quick retry is the useful one.
    pub fn restart(&mut self) {
        self.attempt = 0;
    }

    /// Call after a success: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
        self.failing_since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_are_jittered_below_a_doubling_capped_ceiling() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for attempt in 0..8u32 {
            let ceiling = Duration::from_millis(100 * (1 << attempt)).min(Duration::from_secs(1));
            assert!(backoff.next_delay() <= ceiling, "attempt {attempt}");
        }
        let spread: std::collections::BTreeSet<_> = (0..20).map(|_| backoff.next_delay()).collect();
        assert!(spread.len() > 1, "jitter varies the delay");
        backoff.restart();
        assert!(
            backoff.next_delay() <= Duration::from_millis(100),
            "waits start over"
        );
        assert!(
            backoff.failing_for() > Duration::ZERO,
            "the stretch of failures goes on"
        );
        backoff.reset();
        assert_eq!(backoff.failing_for(), Duration::ZERO);
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
