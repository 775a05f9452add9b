//! Request rates: token buckets per key, in a table whose size is bounded.
//! (`Rate`, the value a flag or config key gives, lives in `config`.)
//!
//! Written here rather than taken from `governor` (keyed GCRA): governor's keyed store adds any
//! new key on its first check, so the number of keys cannot be capped (a flood of addresses or
//! made-up tunnel ids would grow it without bound between `retain_recent` sweeps), and its check
//! cannot refuse a new key while the table is full, which is what keeps this one at 65,536
//! buckets (`buckets_stay_bounded_when_every_key_is_busy`). It would also add `dashmap` and
//! `quanta` to the tree for 60 lines of arithmetic.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Rate;

/// Token buckets by key: each holds up to `rate.count` tokens, refilled continuously; a request
/// takes one or is refused with the wait until the next.
#[derive(Debug)]
pub(crate) struct RateLimiter<K> {
    rate: Rate,
    buckets: Mutex<Buckets<K>>,
}

#[derive(Debug)]
struct Buckets<K> {
    by_key: HashMap<K, Bucket>,
    /// No sweep before this: a sweep scans every bucket, so it runs at most once a period.
    next_sweep: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Buckets kept before full ones (keys that went quiet) are swept out.
const SWEEP_AT: usize = 4096;
/// Most buckets kept at once (a few MiB). A new key beyond it, with every bucket still in use,
/// is refused for a period: memory stays bounded when very many addresses send at once.
const MAX_BUCKETS: usize = 65_536;

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    pub(crate) fn new(rate: Rate) -> Self {
        Self { rate, buckets: Mutex::new(Buckets { by_key: HashMap::new(), next_sweep: Instant::now() }) }
    }

    /// Takes a token for `key` at `now`; `Err(wait)` when the bucket is empty.
    pub(crate) fn check(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let capacity = f64::from(self.rate.count);
        let refill = self.rate.tokens_per_second();
        let mut guard = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let buckets = &mut *guard;
        let known = buckets.by_key.contains_key(key);
        if !known && buckets.by_key.len() >= SWEEP_AT && now >= buckets.next_sweep {
            buckets.by_key.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * refill < capacity
            });
            buckets.next_sweep = now + self.rate.per;
        }
        if !known && buckets.by_key.len() >= MAX_BUCKETS {
            return Err(self.rate.per);
        }
        let bucket = buckets.by_key.entry(key.clone()).or_insert(Bucket { tokens: capacity, updated: now });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * refill).min(capacity);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / refill))
        }
    }
}

#[cfg(test)]
mod rate_tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(Rate::parse("100/s").unwrap(), Rate { count: 100, per: Duration::from_secs(1) });
        assert_eq!(Rate::parse("600/m").unwrap().to_string(), "600/m");
        for bad in ["", "100", "0/s", "-1/s", "1.5/s", "10/d", "x/s"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let limiter = RateLimiter::new(Rate::parse("10/s").unwrap());
        let start = Instant::now();
        for _ in 0..10 {
            limiter.check(&"a", start).unwrap();
        }
        let wait = limiter.check(&"a", start).unwrap_err();
        assert!(wait > Duration::from_millis(90) && wait <= Duration::from_millis(100), "{wait:?}");
        limiter.check(&"b", start).unwrap();
        // 100 ms later one token is back, not two.
        let later = start + Duration::from_millis(100);
        limiter.check(&"a", later).unwrap();
        assert!(limiter.check(&"a", later).is_err());
    }

    #[test]
    fn quiet_keys_are_swept() {
        let limiter = RateLimiter::new(Rate::parse("1/s").unwrap());
        let start = Instant::now();
        for key in 0..SWEEP_AT {
            limiter.check(&key, start).unwrap();
        }
        limiter.check(&usize::MAX, start + Duration::from_secs(2)).unwrap();
        assert_eq!(limiter.buckets.lock().unwrap().by_key.len(), 1);
        // The next sweep waits a period: a burst of new keys does not rescan every bucket.
        assert!(limiter.buckets.lock().unwrap().next_sweep >= start + Duration::from_secs(3));
    }

    #[test]
    fn buckets_stay_bounded_when_every_key_is_busy() {
        let limiter = RateLimiter::new(Rate::parse("1/h").unwrap());
        let start = Instant::now();
        for key in 0..MAX_BUCKETS {
            limiter.check(&key, start).unwrap();
        }
        // Every bucket is still refilling: nothing can be swept, a new key is refused.
        assert!(limiter.check(&usize::MAX, start + Duration::from_secs(1)).is_err());
        assert_eq!(limiter.buckets.lock().unwrap().by_key.len(), MAX_BUCKETS);
        // A known key is still served by its own bucket (empty here).
        assert!(limiter.check(&0, start + Duration::from_secs(1)).is_err());
    }
}
