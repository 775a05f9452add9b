//! Reconnect delays: exponential with full jitter (each wait is uniform in `0..=cap`), so a fleet
//! of agents that lost the same gateway does not come back in lockstep.

use std::time::Duration;

/// Exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delays start at `initial` and double up to `max`.
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max: max.max(initial), attempt: 0 }
    }

    /// The ceiling for the next delay, before jitter.
    pub(crate) fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay: uniform in `0..=ceiling`, and the ceiling doubles.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let mut bytes = [0u8; 8];
        // Without randomness, wait the whole ceiling: slower, never faster than intended.
        if getrandom::fill(&mut bytes).is_err() {
            return ceiling;
        }
        let fraction = (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64;
        ceiling.mul_f64(fraction)
    }

    /// Back to the first delay (after a healthy stretch).
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_max_and_delays_stay_under_them() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            let ceiling = backoff.ceiling();
            ceilings.push(ceiling.as_secs());
            assert!(backoff.next_delay() <= ceiling);
        }
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 30, 30, 30]);
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_secs(1));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut backoff = Backoff::new(Duration::from_secs(30), Duration::from_secs(30));
        let delays: Vec<Duration> = (0..32).map(|_| backoff.next_delay()).collect();
        let distinct = delays.iter().collect::<std::collections::HashSet<_>>().len();
        assert!(distinct > 16, "full jitter should rarely repeat: {delays:?}");
    }
}
