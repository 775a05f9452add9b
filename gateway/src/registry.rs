//! The registry of live agent sessions: tunnel id → sessions (several when replicas serve one
//! tunnel), plus what pending requests need: which tunnels went offline recently, and how many
//! requests wait for each. Std locks guard maps that are only touched for a few instructions at a
//! time and never across an `.await`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ferry_codec::{SessionId, TunnelId};
use tokio::sync::watch;

use crate::metrics::{LiveSession, LiveSessions};
use crate::session::{Changes, Session};

/// How long after its last session ended a tunnel counts as "offline" rather than unknown:
/// requests for it wait for an agent to come back instead of getting 404.
pub const OFFLINE_MEMORY: Duration = Duration::from_secs(600);
/// Most tunnels remembered as offline; older entries are forgotten first.
const MAX_OFFLINE: usize = 100_000;

/// Live sessions by tunnel.
#[derive(Debug)]
pub struct Registry {
    tunnels: RwLock<HashMap<TunnelId, Vec<Arc<Session>>>>,
    /// When each tunnel lost its last session.
    offline: Mutex<HashMap<TunnelId, Instant>>,
    /// Requests waiting for each offline tunnel.
    pending: Mutex<HashMap<TunnelId, usize>>,
    /// Bumped on every change, so waiters (pending requests, tests) wake up.
    changes: watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            tunnels: RwLock::default(),
            offline: Mutex::default(),
            pending: Mutex::default(),
            changes: watch::Sender::new(0),
        }
    }
}

/// What [`Registry::insert`] did.
#[derive(Debug, Default)]
pub struct Inserted {
    /// Older sessions of the same agent instance, now out of the registry: the agent reconnected
    /// and they are stale. The caller closes them.
    pub replaced: Vec<Arc<Session>>,
    /// Whether the tunnel had a session before (an agent coming back).
    pub reconnect: bool,
}

impl Registry {
    /// Adds a session that finished its handshake; a stale session of the same agent instance is
    /// taken out. A draining one stays: the agent opened this session to take over while the old
    /// one finishes its requests.
    pub fn insert(&self, session: Arc<Session>) -> Inserted {
        let mut tunnels = self.tunnels.write().unwrap_or_else(|e| e.into_inner());
        let sessions = tunnels.entry(session.tunnel_id().clone()).or_default();
        let (replaced, kept): (Vec<_>, Vec<_>) = sessions
            .drain(..)
            .partition(|s| s.identity.instance_id == session.identity.instance_id && s.accepts_requests());
        *sessions = kept;
        sessions.push(Arc::clone(&session));
        drop(tunnels);
        let was_offline = self.lock_offline().remove(session.tunnel_id()).is_some();
        self.changes.send_modify(|n| *n += 1);
        Inserted { reconnect: was_offline || !replaced.is_empty(), replaced }
    }

    /// Removes a session (when it ends). Unknown ids are ignored.
    pub fn remove(&self, tunnel_id: &TunnelId, session_id: SessionId) {
        let mut tunnels = self.tunnels.write().unwrap_or_else(|e| e.into_inner());
        let mut now_offline = false;
        if let Some(sessions) = tunnels.get_mut(tunnel_id) {
            let before = sessions.len();
            sessions.retain(|s| s.id() != session_id);
            if sessions.is_empty() {
                tunnels.remove(tunnel_id);
                now_offline = before > 0;
            }
        }
        drop(tunnels);
        if now_offline {
            let mut offline = self.lock_offline();
            if offline.len() >= MAX_OFFLINE {
                offline.retain(|_, since| since.elapsed() < OFFLINE_MEMORY);
            }
            if offline.len() < MAX_OFFLINE {
                offline.insert(tunnel_id.clone(), Instant::now());
            }
        }
        self.changes.send_modify(|n| *n += 1);
    }

    fn lock_offline(&self) -> std::sync::MutexGuard<'_, HashMap<TunnelId, Instant>> {
        self.offline.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the tunnel has sessions (perhaps all draining) or lost its last one within
    /// [`OFFLINE_MEMORY`]: an agent is expected back, so requests may wait for it.
    pub fn expects_agent(&self, tunnel_id: &TunnelId) -> bool {
        let has_sessions = self.tunnels.read().unwrap_or_else(|e| e.into_inner()).contains_key(tunnel_id);
        has_sessions
            || self.lock_offline().get(tunnel_id).is_some_and(|since| since.elapsed() < OFFLINE_MEMORY)
    }

    /// Reserves one of `max` places to wait for an offline tunnel; `None` when all are taken.
    pub fn pending_slot(&self, tunnel_id: &TunnelId, max: usize) -> Option<PendingSlot<'_>> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let count = pending.entry(tunnel_id.clone()).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        drop(pending);
        self.touch();
        Some(PendingSlot { registry: self, tunnel_id: tunnel_id.clone() })
    }

    /// Requests waiting now for the tunnel's agent to come back.
    pub fn waiting(&self, tunnel_id: &TunnelId) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).get(tunnel_id).copied().unwrap_or(0)
    }

    /// Wakes waiters (pending requests, tests) on the registry; also when what other nodes of
    /// the cluster hold changed.
    pub(crate) fn touch(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// A receiver that sees every change (the cluster layer publishes them).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// What a session uses to announce its own changes (draining, health, closed) to the
    /// registry's waiters.
    pub fn changes(&self) -> Changes {
        Changes::new(self.changes.clone())
    }

    /// Waits until `condition` holds for the registry (checked now and after every change).
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn wait_until(&self, condition: impl Fn(&Self) -> bool) {
        let mut changes = self.changes.subscribe();
        while !condition(self) {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// The session with the fewest requests in flight among those taking new requests.
    pub fn pick(&self, tunnel_id: &TunnelId) -> Option<Arc<Session>> {
        let tunnels = self.tunnels.read().unwrap_or_else(|e| e.into_inner());
        // Healthy (or not yet known) upstreams first, then the least loaded. An unhealthy one is
        // picked only when it is all there is; the caller answers 503 then.
        tunnels
            .get(tunnel_id)?
            .iter()
            .filter(|s| s.accepts_requests())
            .min_by_key(|s| (s.is_unhealthy(), s.in_flight()))
            .cloned()
    }

    /// Requests in flight over all sessions of a tunnel.
    pub fn in_flight(&self, tunnel_id: &TunnelId) -> u64 {
        let tunnels = self.tunnels.read().unwrap_or_else(|e| e.into_inner());
        tunnels.get(tunnel_id).map_or(0, |sessions| sessions.iter().map(|s| s.in_flight()).sum())
    }

    /// Every session, for listings.
    pub fn all(&self) -> Vec<Arc<Session>> {
        let tunnels = self.tunnels.read().unwrap_or_else(|e| e.into_inner());
        tunnels.values().flatten().cloned().collect()
    }

    /// The sessions of one tunnel.
    pub fn of(&self, tunnel_id: &TunnelId) -> Vec<Arc<Session>> {
        let tunnels = self.tunnels.read().unwrap_or_else(|e| e.into_inner());
        tunnels.get(tunnel_id).cloned().unwrap_or_default()
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        let tunnels = self.tunnels.read().unwrap_or_else(|e| e.into_inner());
        tunnels.values().map(Vec::len).sum()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of tunnels with a live session.
    pub fn tunnel_count(&self) -> usize {
        self.tunnels.read().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl LiveSessions for Registry {
    fn live_sessions(&self, each: &mut dyn FnMut(LiveSession<'_>)) {
        for session in self.all() {
            each(LiveSession {
                tunnel: session.tunnel_id(),
                in_flight: session.in_flight(),
                open_streams: session.open_streams() as u64,
                bytes_to_agent: session.counters.tx.load(Ordering::Relaxed),
                bytes_from_agent: session.counters.rx.load(Ordering::Relaxed),
            });
        }
    }

    fn live_tunnels(&self) -> usize {
        self.tunnel_count()
    }
}

/// A place among the requests waiting for an offline tunnel; given back on drop.
#[derive(Debug)]
pub struct PendingSlot<'a> {
    registry: &'a Registry,
    tunnel_id: TunnelId,
}

impl Drop for PendingSlot<'_> {
    fn drop(&mut self) {
        let mut pending = self.registry.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = pending.get_mut(&self.tunnel_id) {
            *count -= 1;
            if *count == 0 {
                pending.remove(&self.tunnel_id);
            }
        }
    }
}
