//! Counters for `/metrics`, rendered in the Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_codec::AuthErrorCode;

use crate::registry::Registry;

/// Every handshake error code, in the order of the `handshake_failures` array.
const AUTH_CODES: [AuthErrorCode; 8] = [
    AuthErrorCode::UnsupportedVersion,
    AuthErrorCode::Malformed,
    AuthErrorCode::InvalidTunnelId,
    AuthErrorCode::BadCredentials,
    AuthErrorCode::UnknownTunnel,
    AuthErrorCode::RateLimited,
    AuthErrorCode::Overloaded,
    AuthErrorCode::HandshakeTimeout,
];

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

/// Gateway-wide counters. Gauges (sessions, streams in flight, bytes of live sessions) are read
/// from the registry when rendering.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Tunnel requests answered, by status class (index 0 = 1xx … 4 = 5xx).
    requests: [AtomicU64; 5],
    handshake_failures: [AtomicU64; AUTH_CODES.len()],
    /// Sessions established.
    sessions_total: AtomicU64,
    /// Sessions of a tunnel that had one before (an agent coming back).
    reconnects: AtomicU64,
    /// Requests that waited for an agent to come back.
    pending_served: AtomicU64,
    /// Requests that gave up waiting (503 `tunnel_offline`).
    pending_expired: AtomicU64,
    /// WebSocket bytes of sessions that have ended, each way.
    closed_bytes_to_agents: AtomicU64,
    closed_bytes_from_agents: AtomicU64,
    /// Connections and requests refused by a limit, in the order of [`Limit::ALL`].
    limited: [AtomicU64; Limit::ALL.len()],
}

impl Metrics {
    /// Counts a tunnel request by the status class of its answer.
    pub fn request(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection or request refused by `limit`.
    pub fn limited(&self, limit: Limit) {
        if let Some(i) = Limit::ALL.iter().position(|l| *l == limit) {
            self.limited[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a failed handshake.
    pub fn handshake_failure(&self, code: AuthErrorCode) {
        if let Some(i) = AUTH_CODES.iter().position(|c| *c == code) {
            self.handshake_failures[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a new session, and whether its tunnel had one before.
    pub fn session_started(&self, reconnect: bool) {
        self.sessions_total.fetch_add(1, Ordering::Relaxed);
        if reconnect {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Adds the bytes of a session that ended.
    pub fn session_ended(&self, to_agent: u64, from_agent: u64) {
        self.closed_bytes_to_agents.fetch_add(to_agent, Ordering::Relaxed);
        self.closed_bytes_from_agents.fetch_add(from_agent, Ordering::Relaxed);
    }

    /// Counts a request that waited for an agent: served, or given up.
    pub fn pending(&self, served: bool) {
        let counter = if served { &self.pending_served } else { &self.pending_expired };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, registry: &Registry) -> String {
        let sessions = registry.all();
        let in_flight: u64 = sessions.iter().map(|s| s.in_flight()).sum();
        let streams_open: u64 = sessions.iter().map(|s| s.open_streams() as u64).sum();
        let live_to: u64 = sessions.iter().map(|s| s.counters.tx.load(Ordering::Relaxed)).sum();
        let live_from: u64 = sessions.iter().map(|s| s.counters.rx.load(Ordering::Relaxed)).sum();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::with_capacity(2048);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        metric("ferry_sessions", "gauge", "Live agent sessions.", &[(String::new(), sessions.len() as u64)]);
        metric(
            "ferry_tunnels",
            "gauge",
            "Tunnels with at least one live session.",
            &[(String::new(), registry.tunnel_count() as u64)],
        );
        metric(
            "ferry_streams_in_flight",
            "gauge",
            "Requests in flight through tunnels.",
            &[(String::new(), in_flight)],
        );
        metric(
            "ferry_streams_open",
            "gauge",
            "Streams the gateway holds open to agents (a request's stream lives until both its directions are done).",
            &[(String::new(), streams_open)],
        );
        let classes: Vec<(String, u64)> =
            (0..5).map(|i| (format!("{{class=\"{}xx\"}}", i + 1), load(&self.requests[i]))).collect();
        metric("ferry_requests_total", "counter", "Tunnel requests answered, by status class.", &classes);
        let bytes = [
            ("{direction=\"to_agents\"}".to_owned(), load(&self.closed_bytes_to_agents) + live_to),
            ("{direction=\"from_agents\"}".to_owned(), load(&self.closed_bytes_from_agents) + live_from),
        ];
        metric("ferry_bytes_total", "counter", "WebSocket payload bytes exchanged with agents.", &bytes);
        let failures: Vec<(String, u64)> = AUTH_CODES
            .iter()
            .zip(&self.handshake_failures)
            .map(|(code, n)| (format!("{{code=\"{}\"}}", code.as_str()), load(n)))
            .collect();
        metric("ferry_handshake_failures_total", "counter", "Agent handshakes refused, by code.", &failures);
        metric(
            "ferry_sessions_total",
            "counter",
            "Agent sessions established.",
            &[(String::new(), load(&self.sessions_total))],
        );
        metric(
            "ferry_reconnects_total",
            "counter",
            "Sessions of tunnels that had a session before.",
            &[(String::new(), load(&self.reconnects))],
        );
        let pending = [
            ("{outcome=\"served\"}".to_owned(), load(&self.pending_served)),
            ("{outcome=\"expired\"}".to_owned(), load(&self.pending_expired)),
        ];
        metric(
            "ferry_pending_requests_total",
            "counter",
            "Requests that waited for an agent to come back.",
            &pending,
        );
        let limited: Vec<(String, u64)> = Limit::ALL
            .iter()
            .zip(&self.limited)
            .map(|(limit, n)| (format!("{{limit=\"{}\"}}", limit.as_str()), load(n)))
            .collect();
        metric("ferry_limited_total", "counter", "Connections and requests refused by a limit.", &limited);
        out
    }
}
