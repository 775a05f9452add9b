//! `/metrics`: the gateway's counters, gauges and histograms, with `prometheus-client` (typed
//! families and labels, the OpenMetrics text format).
//!
//! Per-tunnel series (request durations, sessions, reconnects) are bounded: the first
//! [`MAX_TUNNEL_SERIES`] tunnels seen get their own series, the rest share `tunnel="other"`, so a
//! gateway serving a million tunnels still renders a page of a known size.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ferry_codec::{AuthErrorCode, TunnelId};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// Tunnels with series of their own; the others share `tunnel="other"`.
pub const MAX_TUNNEL_SERIES: usize = 256;
/// The label of the tunnels beyond [`MAX_TUNNEL_SERIES`].
const OTHER_TUNNELS: &str = "other";

/// A limit the gateway enforced, for `ferry_limited_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Limit {
    /// A connection over the per-address cap, closed at accept.
    ConnectionsPerAddress,
    /// An agent WebSocket over the cap of handshakes in progress.
    Handshakes,
    /// A request target over the URI length limit (414).
    UriLength,
    /// A request body over the body limit (413).
    BodySize,
    /// A request over a tunnel's concurrency limit (503).
    TunnelConcurrency,
    /// A request over its tunnel's rate (429).
    TunnelRate,
    /// A request over its client address's rate (429).
    ClientRate,
    /// A request over its client's share of a tunnel (429).
    ClientConcurrency,
    /// A connection that sent no request head in time, closed.
    HeadDeadline,
    /// A connection whose client stopped taking a response, closed.
    SendIdle,
    /// A request whose client stopped sending its body (408).
    BodyIdle,
}

impl Limit {
    /// Every limit, so each has a series (at 0) from the start.
    const ALL: [Self; 11] = [
        Self::ConnectionsPerAddress,
        Self::Handshakes,
        Self::UriLength,
        Self::BodySize,
        Self::TunnelConcurrency,
        Self::TunnelRate,
        Self::ClientRate,
        Self::ClientConcurrency,
        Self::HeadDeadline,
        Self::SendIdle,
        Self::BodyIdle,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::ConnectionsPerAddress => "connections_per_address",
            Self::Handshakes => "handshakes",
            Self::UriLength => "uri_length",
            Self::BodySize => "body_size",
            Self::TunnelConcurrency => "tunnel_concurrency",
            Self::TunnelRate => "tunnel_rate",
            Self::ClientRate => "client_rate",
            Self::ClientConcurrency => "client_concurrency",
            Self::HeadDeadline => "head_deadline",
            Self::SendIdle => "send_idle",
            Self::BodyIdle => "body_idle",
        }
    }
}

/// Every handshake error code, so each has a series from the start.
const AUTH_CODES: [AuthErrorCode; 9] = [
    AuthErrorCode::UnsupportedVersion,
    AuthErrorCode::Malformed,
    AuthErrorCode::InvalidTunnelId,
    AuthErrorCode::BadCredentials,
    AuthErrorCode::UnknownTunnel,
    AuthErrorCode::RateLimited,
    AuthErrorCode::Overloaded,
    AuthErrorCode::HandshakeTimeout,
    AuthErrorCode::BasicAuthRequired,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    class: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    rule: &'static str,
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelLabels {
    tunnel: String,
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Bucket bounds of the request duration: 1 ms to about 65 s, doubling.
fn duration_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 17)
}

/// The gateway's metrics. Cheap to update from any task; rendered on demand.
#[derive(Debug)]
pub struct Metrics {
    requests: Family<ClassLabels, Counter>,
    /// The counters of `requests`, one per status class, at hand for every request.
    by_class: [Counter; 5],
    handshake_failures: Family<CodeLabels, Counter>,
    sessions_started: Counter,
    /// Public connections handed to the thread of their tunnel's session.
    connections_moved: Counter,
    reconnects: Family<TunnelLabels, Counter>,
    pending: Family<OutcomeLabels, Counter>,
    /// Connections to TCP endpoints, by how they were handled.
    tcp_connections: Family<OutcomeLabels, Counter>,
    /// Requests and connections refused by a tunnel's access rules.
    access_refused: Family<RuleLabels, Counter>,
    limited: Family<LimitLabels, Counter>,
    request_duration: Family<TunnelLabels, Histogram, fn() -> Histogram>,
    /// WebSocket bytes of sessions that have ended, each way (live ones are added at render).
    closed_bytes_to_agents: AtomicU64,
    closed_bytes_from_agents: AtomicU64,
    /// The tunnels with series of their own.
    tunnels_with_series: Mutex<HashSet<TunnelId>>,
    /// Set when the gateway is a node of a cluster: its series are rendered then.
    cluster: std::sync::OnceLock<ClusterMetrics>,
}

/// The series of a cluster node.
#[derive(Debug)]
struct ClusterMetrics {
    nodes: Gauge,
    redis_errors: Counter,
    redis_seconds: Histogram,
    forwards: Family<DirectionLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let requests: Family<ClassLabels, Counter> = Family::default();
        let by_class = CLASSES.map(|class| requests.get_or_create_owned(&ClassLabels { class }));
        let metrics = Self {
            requests,
            by_class,
            handshake_failures: Family::default(),
            sessions_started: Counter::default(),
            connections_moved: Counter::default(),
            reconnects: Family::default(),
            pending: Family::default(),
            tcp_connections: Family::default(),
            access_refused: Family::default(),
            limited: Family::default(),
            request_duration: Family::new_with_constructor(|| Histogram::new(duration_buckets())),
            closed_bytes_to_agents: AtomicU64::new(0),
            closed_bytes_from_agents: AtomicU64::new(0),
            tunnels_with_series: Mutex::default(),
            cluster: std::sync::OnceLock::new(),
        };
        // Every fixed series exists from the start (at 0), so a rate over it is defined.
        for code in AUTH_CODES {
            drop(metrics.handshake_failures.get_or_create(&CodeLabels { code: code.as_str() }));
        }
        for limit in Limit::ALL {
            drop(metrics.limited.get_or_create(&LimitLabels { limit: limit.as_str() }));
        }
        for outcome in ["served", "expired"] {
            drop(metrics.pending.get_or_create(&OutcomeLabels { outcome }));
        }
        metrics
    }
}

/// The per-tunnel metrics a session updates; taken once per session, so a request touches no
/// label table.
#[derive(Debug, Clone)]
pub struct TunnelMetrics {
    request_duration: Histogram,
    reconnects: Counter,
}

impl TunnelMetrics {
    /// A request got its response head (or its error) after `elapsed`.
    pub fn request_done(&self, elapsed: Duration) {
        self.request_duration.observe(elapsed.as_secs_f64());
    }
}

impl Metrics {
    /// The label of tunnel `id`: its own id while fewer than [`MAX_TUNNEL_SERIES`] tunnels have
    /// series, else `other`.
    fn tunnel_label(&self, id: &TunnelId) -> TunnelLabels {
        let mut tunnels = self.tunnels_with_series.lock().unwrap_or_else(|e| e.into_inner());
        if tunnels.contains(id) || (tunnels.len() < MAX_TUNNEL_SERIES && tunnels.insert(id.clone())) {
            TunnelLabels { tunnel: id.as_str().to_owned() }
        } else {
            TunnelLabels { tunnel: OTHER_TUNNELS.to_owned() }
        }
    }

    /// A public connection went to the thread of its tunnel's session.
    pub(crate) fn connection_moved(&self) {
        self.connections_moved.inc();
    }

    /// Counts a tunnel request by the status class of its answer.
    pub fn request(&self, status: u16) {
        self.by_class[usize::from(status / 100).clamp(1, 5) - 1].inc();
    }

    /// Counts a connection or request refused by `limit`.
    pub fn limited(&self, limit: Limit) {
        self.limited.get_or_create(&LimitLabels { limit: limit.as_str() }).inc();
    }

    /// Counts a connection to a TCP endpoint: `ok` (carried to the agent), or why it was reset.
    pub fn tcp_connection(&self, outcome: &'static str) {
        self.tcp_connections.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// Counts a request (`http`) or connection (`tcp`) refused by a tunnel's `rule`.
    pub fn access_refused(&self, rule: &'static str, kind: &'static str) {
        self.access_refused.get_or_create(&RuleLabels { rule, kind }).inc();
    }

    /// Counts a failed handshake.
    pub fn handshake_failure(&self, code: AuthErrorCode) {
        self.handshake_failures.get_or_create(&CodeLabels { code: code.as_str() }).inc();
    }

    /// The metrics a new session of tunnel `id` updates.
    pub fn tunnel(&self, id: &TunnelId) -> TunnelMetrics {
        let labels = self.tunnel_label(id);
        TunnelMetrics {
            request_duration: self.request_duration.get_or_create_owned(&labels),
            reconnects: self.reconnects.get_or_create_owned(&labels),
        }
    }

    /// Counts a new session (listed now), and whether its tunnel had one before.
    pub fn session_started(&self, tunnel: &TunnelMetrics, reconnect: bool) {
        self.sessions_started.inc();
        if reconnect {
            tunnel.reconnects.inc();
        }
    }

    /// Adds the bytes of a session that ended.
    pub fn session_ended(&self, to_agent: u64, from_agent: u64) {
        self.closed_bytes_to_agents.fetch_add(to_agent, Ordering::Relaxed);
        self.closed_bytes_from_agents.fetch_add(from_agent, Ordering::Relaxed);
    }

    /// Turns on the cluster series (the gateway is a node of a cluster).
    pub fn enable_cluster(&self) {
        let _ = self.cluster.set(ClusterMetrics {
            nodes: Gauge::default(),
            redis_errors: Counter::default(),
            // 100 µs to about 3 s, doubling.
            redis_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
            forwards: Family::default(),
        });
        if let Some(cluster) = self.cluster.get() {
            for direction in ["in", "out"] {
                drop(cluster.forwards.get_or_create(&DirectionLabels { direction }));
            }
        }
    }

    /// A full read of the cluster took `elapsed` and found `nodes` live nodes (this one included).
    pub fn cluster_synced(&self, nodes: usize, elapsed: Duration) {
        if let Some(cluster) = self.cluster.get() {
            cluster.nodes.set(i64::try_from(nodes).unwrap_or(i64::MAX));
            cluster.redis_seconds.observe(elapsed.as_secs_f64());
        }
    }

    /// A request went to another node (`out`) or came from one (`!out`).
    pub fn cluster_forward(&self, out: bool) {
        if let Some(cluster) = self.cluster.get() {
            let direction = if out { "out" } else { "in" };
            cluster.forwards.get_or_create(&DirectionLabels { direction }).inc();
        }
    }

    /// A Redis command of the cluster layer failed.
    pub fn cluster_redis_error(&self) {
        if let Some(cluster) = self.cluster.get() {
            cluster.redis_errors.inc();
        }
    }

    /// Counts a request that found its session after waiting (`waited`); nothing otherwise.
    pub fn pending_outcome(&self, waited: bool, served: bool) {
        if waited {
            self.pending(served);
        }
    }

    /// Counts a request that waited for an agent: served, or given up.
    pub fn pending(&self, served: bool) {
        let outcome = if served { "served" } else { "expired" };
        self.pending.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// The OpenMetrics text exposition. Gauges (sessions, streams, bytes of live sessions) are
    /// read from the live sessions now (the registry).
    pub fn render(&self, live: &impl LiveSessions) -> String {
        let (mut sessions, mut in_flight, mut streams_open, mut live_to, mut live_from) =
            (0usize, 0u64, 0u64, 0u64, 0u64);
        let per_tunnel: Family<TunnelLabels, Gauge> = Family::default();
        {
            let tunnels = self.tunnels_with_series.lock().unwrap_or_else(|e| e.into_inner());
            live.live_sessions(&mut |session| {
                sessions += 1;
                in_flight += session.in_flight;
                streams_open += session.open_streams;
                live_to += session.bytes_to_agent;
                live_from += session.bytes_from_agent;
                let id = session.tunnel;
                let tunnel = if tunnels.contains(id) { id.as_str() } else { OTHER_TUNNELS };
                per_tunnel.get_or_create(&TunnelLabels { tunnel: tunnel.to_owned() }).inc();
            });
        }
        // Totals that include live sessions: a fresh counter set to the sum, each render.
        let bytes: Family<DirectionLabels, Counter> = Family::default();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        bytes
            .get_or_create(&DirectionLabels { direction: "to_agents" })
            .inc_by(load(&self.closed_bytes_to_agents) + live_to);
        bytes
            .get_or_create(&DirectionLabels { direction: "from_agents" })
            .inc_by(load(&self.closed_bytes_from_agents) + live_from);

        let mut out = prometheus_client::registry::Registry::default();
        out.register("ferry_sessions", "Live agent sessions", ConstGauge::new(sessions as i64));
        out.register(
            "ferry_tunnels",
            "Tunnels with at least one live session",
            ConstGauge::new(live.live_tunnels() as i64),
        );
        out.register("ferry_tunnel_sessions", "Live agent sessions per tunnel", per_tunnel);
        out.register(
            "ferry_streams_in_flight",
            "Requests in flight through tunnels",
            ConstGauge::new(i64::try_from(in_flight).unwrap_or(i64::MAX)),
        );
        out.register(
            "ferry_streams_open",
            "Streams the gateway holds open to agents (a request's stream lives until both its directions are done)",
            ConstGauge::new(i64::try_from(streams_open).unwrap_or(i64::MAX)),
        );
        out.register("ferry_requests", "Tunnel requests answered, by status class", self.requests.clone());
        out.register(
            "ferry_request_duration_seconds",
            "Time from a request's arrival to its response head, per tunnel, for requests a session took",
            self.request_duration.clone(),
        );
        out.register("ferry_bytes", "WebSocket payload bytes exchanged with agents", bytes);
        out.register(
            "ferry_handshake_failures",
            "Agent handshakes refused, by code",
            self.handshake_failures.clone(),
        );
        out.register(
            "ferry_tcp_connections",
            "Connections to TCP endpoints: ok (carried to the agent), or why they were reset",
            self.tcp_connections.clone(),
        );
        out.register(
            "ferry_access_refused",
            "Public requests (http) and connections (tcp) refused by a tunnel's access rules, by rule",
            self.access_refused.clone(),
        );
        out.register("ferry_sessions_started", "Agent sessions established", self.sessions_started.clone());
        out.register(
            "ferry_connections_moved",
            "Public connections handed to the gateway thread that runs their tunnel's session",
            self.connections_moved.clone(),
        );
        out.register(
            "ferry_reconnects",
            "Sessions of tunnels that had a session before, per tunnel",
            self.reconnects.clone(),
        );
        out.register(
            "ferry_pending_requests",
            "Requests that waited for an agent to come back",
            self.pending.clone(),
        );
        out.register("ferry_limited", "Connections and requests refused by a limit", self.limited.clone());
        if let Some(cluster) = self.cluster.get() {
            out.register(
                "ferry_cluster_nodes",
                "Live gateway nodes in the cluster at the last full read of Redis, this one included",
                cluster.nodes.clone(),
            );
            out.register(
                "ferry_cluster_redis_errors",
                "Redis commands of the cluster layer that failed or timed out",
                cluster.redis_errors.clone(),
            );
            out.register(
                "ferry_cluster_sync_seconds",
                "Time a refresh took: this node's entries rewritten and every node's read",
                cluster.redis_seconds.clone(),
            );
            out.register(
                "ferry_cluster_forwards",
                "Requests handed to another node (out) or taken from one (in)",
                cluster.forwards.clone(),
            );
        }
        let mut text = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &out);
        text
    }
}

/// What `/metrics` reads of one live session.
#[derive(Debug, Clone, Copy)]
pub struct LiveSession<'a> {
    /// Its tunnel.
    pub tunnel: &'a TunnelId,
    /// Requests in flight on it.
    pub in_flight: u64,
    /// Streams open on it.
    pub open_streams: u64,
    /// WebSocket payload bytes sent to its agent so far.
    pub bytes_to_agent: u64,
    /// WebSocket payload bytes received from its agent so far.
    pub bytes_from_agent: u64,
}

/// The live sessions the gauges of `/metrics` are read from: the registry. A trait so the
/// metrics need not know the registry (which holds sessions, which hold their metrics).
pub trait LiveSessions {
    /// Calls `each` with every live session.
    fn live_sessions(&self, each: &mut dyn FnMut(LiveSession<'_>));
    /// Tunnels with at least one live session.
    fn live_tunnels(&self) -> usize;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnels_beyond_the_cap_share_one_series() {
        let metrics = Metrics::default();
        for i in 0..MAX_TUNNEL_SERIES + 50 {
            let id: TunnelId = format!("agent_0b6f4c1e-8a51-4c3e-9d2a-{i:012}_web").parse().unwrap();
            let tunnel = metrics.tunnel(&id);
            metrics.session_started(&tunnel, true);
            tunnel.request_done(Duration::from_millis(3));
        }
        let text = metrics.render(&crate::registry::Registry::default());
        let series: HashSet<&str> = text
            .lines()
            .filter(|l| l.starts_with("ferry_reconnects_total{"))
            .filter_map(|l| l.split('"').nth(1))
            .collect();
        assert_eq!(series.len(), MAX_TUNNEL_SERIES + 1, "the first tunnels, and `other`");
        assert!(text.contains("ferry_reconnects_total{tunnel=\"other\"} 50"), "{text}");
        assert!(text.contains("ferry_request_duration_seconds_count{tunnel=\"other\"} 50"));
        assert!(text.contains(&format!("ferry_sessions_started_total {}", MAX_TUNNEL_SERIES + 50)));
    }
}
