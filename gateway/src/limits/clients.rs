//! Counts per client: open connections and requests in flight per tunnel.
//!
//! A "client" is an IPv4 address or an IPv6 /64: one IPv6 host routinely has a whole /64 to pick
//! addresses from, so counting single IPv6 addresses would let it through every per-client limit.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

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
