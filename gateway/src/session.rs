//! One agent session as the rest of the gateway sees it: identity, the handle to open streams,
//! counters for `/connections`, and the in-flight request accounting that picks replicas.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use std::sync::Mutex;
use std::time::Duration;

use ferry_codec::control::{GoAwayReason, HealthState};
use ferry_codec::{ControlMessage, InstanceId, SessionId, TunnelId};
use ferry_transport::control::ControlHandle;
use ferry_transport::{IoCounters, StreamOpener, StreamSlot, TransportError, multiplex};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::auth::Fingerprint;
use crate::metrics::TunnelMetrics;

/// A live agent session.
///
/// It holds all of a session's state and announces its own changes: marking it draining or
/// unhealthy, or closing it, wakes whoever waits on the registry (pending requests, tests), so no
/// caller has to remember to.
#[derive(Debug)]
pub struct Session {
    /// Who the agent is.
    pub identity: Identity,
    /// When the handshake completed.
    pub connected_at: SystemTime,
    started: Instant,
    opener: StreamOpener,
    in_flight: AtomicU64,
    /// Notified whenever `in_flight` drops to zero.
    idle: tokio::sync::Notify,
    streams_total: AtomicU64,
    /// Bytes over the WebSocket, both ways.
    pub counters: Arc<IoCounters>,
    draining: AtomicBool,
    /// Cancelling it ends the session; see [`Session::close`].
    cancel: CancellationToken,
    /// The control stream (heartbeat, go-away, admin pings).
    pub control: ControlHandle,
    /// What the agent last said about its upstream.
    health: Mutex<Health>,
    /// Wakes the registry's waiters.
    changes: Changes,
    /// This tunnel's series in `/metrics`.
    pub metrics: TunnelMetrics,
    /// The gateway thread the session runs on (see `shards`).
    shard: usize,
}

/// What the agent last said about its upstream.
#[derive(Debug, Clone)]
struct Health {
    state: HealthState,
    detail: String,
}

/// Who the agent is, as established by the handshake.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Chosen by the gateway.
    pub id: SessionId,
    /// The tunnel served.
    pub tunnel_id: TunnelId,
    /// The agent process.
    pub instance_id: InstanceId,
    /// The agent's build.
    pub agent_version: String,
    /// The agent's address.
    pub peer: SocketAddr,
    /// The secret it proved it holds (`None` without authentication).
    pub secret: Option<Fingerprint>,
    /// The public TCP ports its endpoints hold (released into their lease when the last clone
    /// goes, with the session).
    pub tcp: Option<Arc<crate::tcp::TcpClaims>>,
    /// Which clients may reach the tunnel through this session.
    pub ip_rules: crate::access::IpRules,
    /// The users a request must authenticate as (`None`: no authentication).
    pub basic_auth: Option<Arc<crate::basic_auth::BasicAuth>>,
}

impl Session {
    /// A session that completed its handshake, run by `link`'s task; cancelling `cancel` ends it.
    pub fn new(
        identity: Identity,
        link: &ferry_transport::Session,
        changes: Changes,
        metrics: TunnelMetrics,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            identity,
            connected_at: SystemTime::now(),
            started: Instant::now(),
            opener: link.opener.clone(),
            in_flight: AtomicU64::new(0),
            idle: tokio::sync::Notify::new(),
            streams_total: AtomicU64::new(0),
            shard: crate::shards::current(),
            counters: Arc::clone(&link.counters),
            draining: AtomicBool::new(false),
            cancel,
            control: link.control.clone(),
            health: Mutex::new(Health { state: HealthState::Unknown, detail: String::new() }),
            changes,
            metrics,
        }
    }

    /// The gateway thread this session runs on: its connections are best served there.
    pub(crate) fn shard(&self) -> usize {
        self.shard
    }

    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.identity.id
    }

    /// The tunnel it serves.
    pub fn tunnel_id(&self) -> &TunnelId {
        &self.identity.tunnel_id
    }

    /// Records what the agent said about its upstream.
    pub fn set_health(&self, state: HealthState, detail: String) {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if (health.state == HealthState::Unhealthy) != (state == HealthState::Unhealthy) {
            tracing::info!(tunnel_id = %self.identity.tunnel_id, session_id = %self.identity.id, ?state, detail, "upstream health changed");
        }
        *health = Health { state, detail };
        drop(health);
        // Routing preferences changed.
        self.changes.notify();
    }

    /// Whether the agent says its upstream is unhealthy.
    pub fn is_unhealthy(&self) -> bool {
        self.health.lock().unwrap_or_else(|e| e.into_inner()).state == HealthState::Unhealthy
    }

    /// What the agent last said about its upstream's trouble.
    pub fn health_detail(&self) -> String {
        self.health.lock().unwrap_or_else(|e| e.into_inner()).detail.clone()
    }

    /// Tells the agent to go away (it finishes what is in flight and reconnects); no new request
    /// is routed here from now on.
    pub async fn go_away(&self, reason: GoAwayReason, grace: Duration) {
        self.set_draining();
        // The session may be gone already; then there is nobody to tell.
        let _ = self.control.send(ControlMessage::GoAway { reason, grace }).await;
    }

    /// Whether new requests may go to this session.
    pub fn accepts_requests(&self) -> bool {
        !self.draining.load(Ordering::Relaxed) && !self.cancel.is_cancelled() && !self.opener.is_closed()
    }

    /// Stops routing new requests here (the agent asked to drain, or was told to go away).
    pub fn set_draining(&self) {
        if !self.draining.swap(true, Ordering::Relaxed) {
            self.changes.notify();
        }
    }

    /// Ends the session now: its connection closes, requests in flight on it fail.
    pub fn close(&self) {
        self.cancel.cancel();
        self.changes.notify();
    }

    /// Whether the session was closed (or is closing).
    pub fn is_closed(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Requests in flight on this session.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Waits until no request is in flight on this session.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Counts a request as in flight until the guard drops.
    pub fn begin_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.streams_total.fetch_add(1, Ordering::Relaxed);
        InFlight { session: Arc::clone(self) }
    }

    /// Opens a stream to the agent; it counts against the session's limit while its slot lives.
    ///
    /// # Errors
    /// The session is closed or at its stream limit.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn open_stream(&self) -> Result<(multiplex::Stream, StreamSlot), TransportError> {
        self.opener.open().await
    }

    /// Streams open to the agent now (requests in flight, and uploads still being sent).
    pub fn open_streams(&self) -> usize {
        self.opener.open_streams()
    }

    /// The `/connections` entry.
    pub fn to_json(&self) -> serde_json::Value {
        let since = self.connected_at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let Health { state, detail } = self.health.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let identity = &self.identity;
        let health = match state {
            HealthState::Unknown => "unknown",
            HealthState::Healthy => "healthy",
            HealthState::Unhealthy => "unhealthy",
        };
        let rtt_ms = self.control.rtt().map(|rtt| rtt.as_secs_f64() * 1000.0);
        serde_json::json!({
            "tunnel_id": identity.tunnel_id.as_str(),
            "session_id": identity.id.to_string(),
            "instance_id": identity.instance_id.to_string(),
            "agent_version": identity.agent_version,
            "peer": identity.peer.to_string(),
            "thread": self.shard,
            "connected_since": rfc3339(since),
            "connected_for_secs": self.started.elapsed().as_secs(),
            "in_flight": self.in_flight(),
            "streams_open": self.open_streams(),
            "requests_total": self.streams_total.load(Ordering::Relaxed),
            "bytes_to_agent": self.counters.tx.load(Ordering::Relaxed),
            "bytes_from_agent": self.counters.rx.load(Ordering::Relaxed),
            "draining": self.draining.load(Ordering::Relaxed),
            "heartbeat_rtt_ms": rtt_ms,
            "upstream_health": health,
            "upstream_health_detail": detail,
            "authenticated": identity.secret.is_some(),
            "ip_rules": identity.ip_rules.to_json(),
            "basic_auth_users": identity.basic_auth.as_ref().map(|auth| auth.users().collect::<Vec<_>>()),
            "tcp": identity.tcp.as_ref().map_or_else(Vec::new, |claims| {
                claims.bound.iter().map(|(endpoint, port)| serde_json::json!({ "endpoint": endpoint, "port": port })).collect()
            }),
        })
    }
}

/// Keeps a request counted in its session's in-flight total while alive.
#[derive(Debug)]
pub struct InFlight {
    session: Arc<Session>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.session.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.session.idle.notify_waiters();
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the Unix epoch (UTC, proleptic Gregorian).
pub(crate) fn rfc3339(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, (rem / 60) % 60, rem % 60)
}

/// Wakes the waiters of the registry a session is listed in (requests waiting for a tunnel,
/// the registry's own watchers); each session holds one and notifies it of its own changes.
#[derive(Debug, Clone)]
pub struct Changes(watch::Sender<u64>);

impl Changes {
    /// Wraps the registry's change counter.
    pub(crate) fn new(sender: watch::Sender<u64>) -> Self {
        Self(sender)
    }

    /// Something that matters to routing changed.
    pub fn notify(&self) {
        self.0.send_modify(|n| *n += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn formats_utc_timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
    }
}
