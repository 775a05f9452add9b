//! What this node knows of the other nodes: which are alive, how to reach them, and which tunnels
//! each holds sessions for. Fed by full reads of Redis (every refresh) and by pub/sub events in
//! between; read on every request for a tunnel with no local session.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ferry_codec::TunnelId;

/// One tunnel's sessions at one node, as that node published them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Holding {
    /// Sessions taking requests.
    pub sessions: u32,
    /// Of those, the ones whose upstream is not known to be failing.
    pub healthy: u32,
}

impl Holding {
    /// `sessions:healthy`, the form kept in Redis and sent in events.
    pub(crate) fn encode(self) -> String {
        format!("{}:{}", self.sessions, self.healthy)
    }

    /// The inverse of [`Holding::encode`]; `None` for anything else.
    pub(crate) fn decode(text: &str) -> Option<Self> {
        let (sessions, healthy) = text.split_once(':')?;
        let holding = Self { sessions: sessions.parse().ok()?, healthy: healthy.parse().ok()? };
        (holding.healthy <= holding.sessions).then_some(holding)
    }
}

/// Another node, as last read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteNode {
    /// Where its peer listener is reached (`--peer-advertise`), if it has one.
    pub advertise: Option<String>,
    /// The tunnels it holds sessions for.
    pub tunnels: HashMap<TunnelId, Holding>,
}

/// A node that holds sessions for a tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Its node id.
    pub node: String,
    /// Its peer listener.
    pub advertise: Option<String>,
    /// What it holds.
    pub holding: Holding,
}

/// The answer to "who else serves this tunnel?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owners {
    /// The nodes holding it, healthiest first; empty when no node does.
    Known(Vec<Owner>),
    /// The view is too old to trust (Redis unreachable for longer than the grace period).
    Unknown,
}

/// The other nodes, by id.
#[derive(Debug, Default)]
pub(super) struct View {
    nodes: HashMap<String, RemoteNode>,
    /// When Redis last answered a full read.
    synced: Option<Instant>,
    /// When each tunnel was last seen at another node, for tunnels no node holds now.
    gone: HashMap<TunnelId, Instant>,
}

/// Most tunnels remembered as recently gone elsewhere.
const MAX_GONE: usize = 100_000;

impl View {
    /// Replaces everything with a full read (other nodes only), taken at `now`.
    pub(super) fn replace(&mut self, nodes: HashMap<String, RemoteNode>, now: Instant) {
        let old = std::mem::replace(&mut self.nodes, nodes);
        for tunnel in old.into_values().flat_map(|node| node.tunnels.into_keys()) {
            if !self.held(&tunnel) {
                self.remember_gone(tunnel, now);
            }
        }
        self.synced = Some(now);
    }

    /// An event: `node` now holds `holding` of `tunnel` (no sessions: it holds none).
    /// Returns whether anything changed.
    pub(super) fn update(&mut self, node: &str, tunnel: TunnelId, holding: Holding, now: Instant) -> bool {
        if holding.sessions == 0 {
            let removed = self.nodes.get_mut(node).and_then(|n| n.tunnels.remove(&tunnel)).is_some();
            if removed && !self.held(&tunnel) {
                self.remember_gone(tunnel, now);
            }
            return removed;
        }
        let entry = self.nodes.entry(node.to_owned()).or_default();
        let changed = entry.tunnels.insert(tunnel.clone(), holding) != Some(holding);
        self.gone.remove(&tunnel);
        changed
    }

    /// An event: `node` left the cluster (it shut down).
    pub(super) fn remove_node(&mut self, node: &str, now: Instant) -> bool {
        let Some(old) = self.nodes.remove(node) else {
            return false;
        };
        for tunnel in old.tunnels.into_keys() {
            if !self.held(&tunnel) {
                self.remember_gone(tunnel, now);
            }
        }
        true
    }

    fn held(&self, tunnel: &TunnelId) -> bool {
        self.nodes.values().any(|node| node.tunnels.contains_key(tunnel))
    }

    fn remember_gone(&mut self, tunnel: TunnelId, now: Instant) {
        if self.gone.len() >= MAX_GONE {
            self.gone.retain(|_, since| now.duration_since(*since) < crate::registry::OFFLINE_MEMORY);
        }
        if self.gone.len() < MAX_GONE {
            self.gone.insert(tunnel, now);
        }
    }

    /// The nodes holding `tunnel`, healthiest and then least loaded first; `Unknown` when the
    /// last full read is older than `grace` (or there was none).
    pub(super) fn owners(&self, tunnel: &TunnelId, now: Instant, grace: Duration) -> Owners {
        if self.synced.is_none_or(|at| now.duration_since(at) >= grace) {
            return Owners::Unknown;
        }
        let mut owners: Vec<Owner> = self
            .nodes
            .iter()
            .filter_map(|(id, node)| {
                let holding = *node.tunnels.get(tunnel)?;
                Some(Owner { node: id.clone(), advertise: node.advertise.clone(), holding })
            })
            .collect();
        owners
            .sort_by_key(|o| (o.holding.healthy == 0, std::cmp::Reverse(o.holding.sessions), o.node.clone()));
        Owners::Known(owners)
    }

    /// Whether another node held `tunnel` within `memory`: its agent is expected back somewhere.
    pub(super) fn recently_held(&self, tunnel: &TunnelId, now: Instant, memory: Duration) -> bool {
        self.held(tunnel) || self.gone.get(tunnel).is_some_and(|since| now.duration_since(*since) < memory)
    }

    /// The other nodes known now.
    pub(super) fn nodes(&self) -> impl Iterator<Item = (&str, &RemoteNode)> {
        self.nodes.iter().map(|(id, node)| (id.as_str(), node))
    }

    /// When Redis last answered a full read.
    pub(super) fn synced(&self) -> Option<Instant> {
        self.synced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunnel(n: u32) -> TunnelId {
        format!("agent_0b6f4c1e-8a51-4c3e-9d2a-{n:012}_web").parse().unwrap()
    }

    fn node(advertise: &str, tunnels: &[(TunnelId, Holding)]) -> RemoteNode {
        RemoteNode { advertise: Some(advertise.into()), tunnels: tunnels.iter().cloned().collect() }
    }

    const GRACE: Duration = Duration::from_secs(30);

    #[test]
    fn holdings_round_trip_and_reject_nonsense() {
        let h = Holding { sessions: 3, healthy: 2 };
        assert_eq!(Holding::decode(&h.encode()), Some(h));
        for bad in ["", "3", "3:", ":2", "2:3", "a:b", "-1:0", "1:1:1"] {
            assert_eq!(Holding::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn owners_are_unknown_until_a_full_read_and_after_the_grace() {
        let mut view = View::default();
        let t0 = Instant::now();
        assert_eq!(view.owners(&tunnel(1), t0, GRACE), Owners::Unknown);
        view.replace(HashMap::new(), t0);
        assert_eq!(view.owners(&tunnel(1), t0, GRACE), Owners::Known(vec![]));
        assert_eq!(view.owners(&tunnel(1), t0 + GRACE, GRACE), Owners::Unknown);
    }

    #[test]
    fn healthy_owners_come_first_then_the_ones_with_more_sessions() {
        let mut view = View::default();
        let t = tunnel(1);
        let now = Instant::now();
        view.replace(
            HashMap::from([
                ("a".into(), node("http://a", &[(t.clone(), Holding { sessions: 2, healthy: 0 })])),
                ("b".into(), node("http://b", &[(t.clone(), Holding { sessions: 1, healthy: 1 })])),
                ("c".into(), node("http://c", &[(t.clone(), Holding { sessions: 2, healthy: 2 })])),
                ("d".into(), node("http://d", &[(tunnel(2), Holding { sessions: 1, healthy: 1 })])),
            ]),
            now,
        );
        let Owners::Known(owners) = view.owners(&t, now, GRACE) else { panic!("known") };
        let order: Vec<&str> = owners.iter().map(|o| o.node.as_str()).collect();
        assert_eq!(order, ["c", "b", "a"]);
        assert_eq!(owners[0].advertise.as_deref(), Some("http://c"));
    }

    #[test]
    fn events_move_tunnels_and_remember_the_ones_gone() {
        let mut view = View::default();
        let now = Instant::now();
        view.replace(HashMap::new(), now);
        let one = Holding { sessions: 1, healthy: 1 };
        assert!(view.update("a", tunnel(1), one, now));
        assert!(!view.update("a", tunnel(1), one, now), "the same holding again changes nothing");
        assert!(view.recently_held(&tunnel(1), now, GRACE));
        assert!(view.update("a", tunnel(1), Holding::default(), now));
        assert_eq!(view.owners(&tunnel(1), now, GRACE), Owners::Known(vec![]));
        assert!(view.recently_held(&tunnel(1), now, GRACE), "its agent is expected back");
        assert!(!view.recently_held(&tunnel(1), now + GRACE, GRACE));
        assert!(!view.recently_held(&tunnel(9), now, GRACE));

        view.update("b", tunnel(2), one, now);
        assert!(view.remove_node("b", now));
        assert!(!view.remove_node("b", now));
        assert!(view.recently_held(&tunnel(2), now, GRACE));
        view.update("c", tunnel(3), one, now);
        view.replace(HashMap::new(), now);
        assert!(view.recently_held(&tunnel(3), now, GRACE), "a node lapsed: its tunnels are expected back");
    }
}
