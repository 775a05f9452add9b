//! Limits at the public edge that need shared state: open connections per client, requests in
//! flight per client and tunnel, and request rates (token buckets) per tunnel and per client.
//!
//! A "client" is an IPv4 address or an IPv6 /64: one IPv6 host routinely has a whole /64 to pick
//! addresses from, so counting single IPv6 addresses would let it through every per-client limit.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_codec::TunnelId;

/// The client's address as the upstream should see it: IPv4-mapped IPv6 addresses as IPv4.
pub(crate) fn client_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// What per-client limits are keyed by: the IPv4 address, or the IPv6 /64 (the rest zeroed).
pub(crate) fn client_key(ip: IpAddr) -> IpAddr {
    match client_ip(ip) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// Counts open connections per client address.
#[derive(Debug)]
pub(crate) struct AddressLimiter {
    max: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One open connection; frees its slot when dropped.
#[derive(Debug)]
pub(crate) struct AddressSlot {
    ip: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl AddressLimiter {
    pub(crate) fn new(max: usize) -> Self {
        Self { max, open: Arc::default() }
    }

    /// A slot for a new connection from `ip`, or `None` when its client already has the most
    /// allowed.
    pub(crate) fn try_open(&self, ip: IpAddr) -> Option<AddressSlot> {
        let ip = client_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(AddressSlot { ip, open: Arc::clone(&self.open) })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_per_address_are_counted_and_freed() {
        let limiter = AddressLimiter::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let first = limiter.try_open(a).unwrap();
        let _second = limiter.try_open(mapped).unwrap();
        assert!(limiter.try_open(a).is_none(), "the mapped address is the same client");
        assert!(limiter.try_open("192.0.2.2".parse().unwrap()).is_some());
        drop(first);
        assert!(limiter.try_open(a).is_some());
    }

    #[test]
    fn an_ipv6_slash_64_is_one_client() {
        let limiter = AddressLimiter::new(2);
        let _a = limiter.try_open("2001:db8:1:2::1".parse().unwrap()).unwrap();
        let _b = limiter.try_open("2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap()).unwrap();
        assert!(limiter.try_open("2001:db8:1:2:abcd::9".parse().unwrap()).is_none(), "same /64");
        assert!(limiter.try_open("2001:db8:1:3::1".parse().unwrap()).is_some(), "the next /64");
        assert_eq!(
            client_key("2001:db8:1:2:abcd::9".parse().unwrap()),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_key("::ffff:192.0.2.7".parse().unwrap()), "192.0.2.7".parse::<IpAddr>().unwrap());
        // The address given to the upstream keeps all its bits.
        assert_eq!(client_ip("2001:db8::9".parse().unwrap()), "2001:db8::9".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn requests_in_flight_are_counted_per_client_and_tunnel() {
        let load = ClientLoad::new(2);
        let web: TunnelId = "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_web".parse().unwrap();
        let api: TunnelId = "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_api".parse().unwrap();
        let client: IpAddr = "2001:db8::1".parse().unwrap();
        let neighbour: IpAddr = "2001:db8::2".parse().unwrap();
        let first = load.try_begin(&web, client).unwrap();
        let _second = load.try_begin(&web, neighbour).unwrap();
        assert!(load.try_begin(&web, client).is_none());
        assert!(load.try_begin(&api, client).is_some(), "another tunnel has its own count");
        assert!(load.try_begin(&web, "192.0.2.1".parse().unwrap()).is_some(), "another client too");
        drop(first);
        assert!(load.try_begin(&web, client).is_some());
        assert_eq!(load.len(), 1, "counts that fall to zero are forgotten");
    }
}

/// Requests in flight per (tunnel, client), so that one client cannot take all of a tunnel's
/// capacity (or all of its agent's upstream connections) by not reading its responses.
///
/// Keys are a keyed hash of the pair: no allocation per request, and a collision (one in 2^64)
/// only makes two clients share a count.
#[derive(Debug)]
pub(crate) struct ClientLoad {
    max: usize,
    hasher: RandomState,
    counts: Arc<Mutex<HashMap<u64, usize>>>,
}

/// One request counted in [`ClientLoad`]; uncounted when dropped.
#[derive(Debug)]
pub(crate) struct ClientSlot {
    key: u64,
    counts: Arc<Mutex<HashMap<u64, usize>>>,
}

impl ClientLoad {
    pub(crate) fn new(max: usize) -> Self {
        Self { max, hasher: RandomState::new(), counts: Arc::default() }
    }

    /// Counts a request of `ip` for `tunnel`, or `None` when that client already has the most.
    pub(crate) fn try_begin(&self, tunnel: &TunnelId, ip: IpAddr) -> Option<ClientSlot> {
        let key = self.hasher.hash_one((tunnel, client_key(ip)));
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(key).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(ClientSlot { key, counts: Arc::clone(&self.counts) })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// A request rate: `count` per `per`, allowing bursts of up to `count` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Requests allowed per period (and the burst size).
    pub count: u32,
    /// The period.
    pub per: Duration,
}

impl Rate {
    /// Parses `N/s`, `N/m` or `N/h` (N ≥ 1).
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (count, unit) =
            text.split_once('/').ok_or_else(|| format!("{text:?} is not a rate like 100/s or 600/m"))?;
        let count: u32 = count
            .trim()
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{count:?} is not a positive whole number of requests"))?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            other => return Err(format!("{other:?} is not a rate unit (use s, m or h)")),
        };
        Ok(Self { count, per })
    }

    fn tokens_per_second(self) -> f64 {
        f64::from(self.count) / self.per.as_secs_f64()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

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
