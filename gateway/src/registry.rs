//! The registry of live agent sessions: tunnel id → sessions (several when replicas serve one
//! tunnel). A std `RwLock` guards a map that is only touched for a few instructions at a time and
//! never across an `.await`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use ferry_codec::{SessionId, TunnelId};
use tokio::sync::watch;

use crate::session::Session;

/// Live sessions by tunnel.
#[derive(Debug)]
pub struct Registry {
    tunnels: RwLock<HashMap<TunnelId, Vec<Arc<Session>>>>,
    /// Bumped on every change, so waiters (tests, pending requests) wake up.
    changes: watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Self { tunnels: RwLock::default(), changes: watch::Sender::new(0) }
    }
}

impl Registry {
    /// Adds a session that finished its handshake.
    pub fn insert(&self, session: Arc<Session>) {
        let mut tunnels = self.tunnels.write().unwrap_or_else(|e| e.into_inner());
        tunnels.entry(session.tunnel_id.clone()).or_default().push(session);
        drop(tunnels);
        self.changes.send_modify(|n| *n += 1);
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

    /// Removes a session (when it ends). Unknown ids are ignored.
    pub fn remove(&self, tunnel_id: &TunnelId, session_id: SessionId) {
        let mut tunnels = self.tunnels.write().unwrap_or_else(|e| e.into_inner());
        if let Some(sessions) = tunnels.get_mut(tunnel_id) {
            sessions.retain(|s| s.id != session_id);
            if sessions.is_empty() {
                tunnels.remove(tunnel_id);
            }
        }
        drop(tunnels);
        self.changes.send_modify(|n| *n += 1);
    }

    /// The session with the fewest requests in flight among those taking new requests.
    pub fn pick(&self, tunnel_id: &TunnelId) -> Option<Arc<Session>> {
        let tunnels = self.tunnels.read().unwrap_or_else(|e| e.into_inner());
        tunnels.get(tunnel_id)?.iter().filter(|s| s.accepts_requests()).min_by_key(|s| s.in_flight()).cloned()
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
}
