//! Every limit at the public edge, in one place: [`Limits`] has one method per check, in the
//! order a connection and its requests meet them. Each refusal is counted in
//! `ferry_limited_total{limit=...}` here, so no caller has to.
//!
//! | order | check | where it is called | answer |
//! |---|---|---|---|
//! | 1 | open connections per client | accept loop (`server`) | closed at accept |
//! | 2 | first request head within the head deadline; HTTP/2 streams, resets (hyper) | `server` | closed; `REFUSED_STREAM`, `GOAWAY` |
//! | 3 | request target length | routing (`routes`) | 414 |
//! | 4 | client rate, tunnel exists, tunnel rate, client's share of the tunnel | [`Limits::admit`] (`proxy`) | 429, 404, 429, 429 |
//! | 5 | requests in flight per tunnel (and per session, in the opener) | [`Limits::tunnel_capacity`] | 503 |
//! | 6 | announced body size; streamed body size | [`Limits::announced_body`]; [`Limits::body_limit`] (cut in the upload task, `proxy`) | 413 |
//! | 7 | a paused upload, a client that takes no response | `proxy`, `server` | 408; closed |
//!
//! Agents meet two of their own at `GET /ws`: failed handshakes per address and handshakes in
//! progress ([`Limits::handshake_allowed`], [`Limits::handshake`]).
//!
//! A "client" is an IPv4 address or an IPv6 /64 (see `clients`).

mod clients;
mod rate;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_codec::TunnelId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use crate::config::Rate;
pub(crate) use clients::{AddressSlot, ClientSlot, client_ip, client_key};

use crate::auth::FailureLimiter;
use crate::config::GatewayConfig;
use crate::error::PublicError;
use crate::metrics::{Limit, Metrics};
use crate::registry::Registry;
use crate::session::Session;
use clients::{AddressLimiter, ClientLoad};
use rate::RateLimiter;

/// 429 with the whole seconds to wait (at least 1) in `Retry-After`.
fn rate_limited(wait: Duration) -> PublicError {
    PublicError::RateLimited(wait.as_secs_f64().ceil().max(1.0) as u64)
}

/// The limits of one gateway; see the module docs.
#[derive(Debug)]
pub(crate) struct Limits {
    metrics: Arc<Metrics>,
    connections: AddressLimiter,
    max_uri_len: usize,
    client_rates: Option<RateLimiter<IpAddr>>,
    tunnel_rates: Option<RateLimiter<TunnelId>>,
    /// In a cluster the tunnel rate is counted in Redis, across nodes ([`Limits::cluster_rate`]);
    /// `tunnel_rates` is then the fallback while Redis cannot answer.
    cluster_rate: Option<Rate>,
    client_load: ClientLoad,
    max_tunnel_requests: u64,
    max_request_body: Option<u64>,
    body_overrides: HashMap<TunnelId, u64>,
    handshakes: Arc<Semaphore>,
    failures: FailureLimiter,
}

impl Limits {
    pub(crate) fn new(config: &GatewayConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            connections: AddressLimiter::new(config.max_connections_per_address),
            max_uri_len: config.max_uri_len,
            client_rates: config.client_rate.map(RateLimiter::new),
            tunnel_rates: config.tunnel_rate.map(RateLimiter::new),
            cluster_rate: config.tunnel_rate.filter(|_| config.cluster.is_some()),
            client_load: ClientLoad::new(config.max_client_requests),
            max_tunnel_requests: u64::try_from(config.max_tunnel_requests).unwrap_or(u64::MAX),
            max_request_body: config.max_request_body,
            body_overrides: config
                .tunnel_overrides
                .iter()
                .filter_map(|(id, o)| Some((id.clone(), o.max_request_body?)))
                .collect(),
            handshakes: Arc::new(Semaphore::new(config.max_handshakes.min(Semaphore::MAX_PERMITS))),
            failures: FailureLimiter::default(),
        }
    }

    fn refuse(&self, limit: Limit, error: PublicError) -> PublicError {
        self.metrics.limited(limit);
        error
    }

    /// Check 1: a new connection from `ip`: its slot among its client's connections, or `None` (close
    /// it) when the client has the most allowed.
    pub(crate) fn connection(&self, ip: IpAddr) -> Option<AddressSlot> {
        let slot = self.connections.try_open(ip);
        if slot.is_none() {
            self.metrics.limited(Limit::ConnectionsPerAddress);
        }
        slot
    }

    /// Check 2: a connection that sent no request head in time (the server closes it).
    pub(crate) fn missed_head_deadline(&self) {
        self.metrics.limited(Limit::HeadDeadline);
    }

    /// A request target over the limit, found while its head was read.
    pub(crate) fn uri_too_long(&self) -> PublicError {
        self.refuse(Limit::UriLength, PublicError::UriTooLong)
    }

    /// Check 3: the request target.
    pub(crate) fn target(&self, path_and_query: &str) -> Result<(), PublicError> {
        if path_and_query.len() > self.max_uri_len {
            return Err(self.refuse(Limit::UriLength, PublicError::UriTooLong));
        }
        Ok(())
    }

    /// Check 4: a request for tunnel `id` from `peer`, in order: its client's rate, whether the tunnel
    /// exists at all (a request for an unknown tunnel costs no tunnel state), the tunnel's rate,
    /// and its client's share of the tunnel. Returns the least-loaded session if one is live now
    /// (`None`: its agent is expected back) and the request's place in its client's share.
    pub(crate) fn admit(
        &self,
        registry: &Registry,
        id: &TunnelId,
        peer: SocketAddr,
        held_elsewhere: impl FnOnce() -> Result<(), PublicError>,
    ) -> Result<(Option<Arc<Session>>, ClientSlot), PublicError> {
        let now = Instant::now();
        if let Some(clients) = &self.client_rates {
            clients
                .check(&client_key(peer.ip()), now)
                .map_err(|wait| self.refuse(Limit::ClientRate, rate_limited(wait)))?;
        }
        let session = registry.pick(id);
        if session.is_none() && !registry.expects_agent(id) {
            held_elsewhere()?;
        }
        if self.cluster_rate.is_none() {
            self.tunnel_rate_here(id, now)?;
        }
        let slot = self
            .client_load
            .try_begin(id, peer.ip())
            .ok_or_else(|| self.refuse(Limit::ClientConcurrency, PublicError::ClientAtCapacity))?;
        Ok((session, slot))
    }

    /// The tunnel rate counted by this node alone.
    fn tunnel_rate_here(&self, id: &TunnelId, now: Instant) -> Result<(), PublicError> {
        if let Some(tunnels) = &self.tunnel_rates {
            tunnels.check(id, now).map_err(|wait| self.refuse(Limit::TunnelRate, rate_limited(wait)))?;
        }
        Ok(())
    }

    /// The tunnel rate to count across the cluster, when there is one.
    pub(crate) fn cluster_rate(&self) -> Option<Rate> {
        self.cluster_rate
    }

    /// The cluster's count of the tunnel's rate said wait `wait` (429); or, `None`, Redis could
    /// not count it and this node counts alone.
    pub(crate) fn tunnel_rate_counted(
        &self,
        id: &TunnelId,
        wait: Option<Duration>,
    ) -> Result<(), PublicError> {
        match wait {
            Some(wait) if wait.is_zero() => Ok(()),
            Some(wait) => Err(self.refuse(Limit::TunnelRate, rate_limited(wait))),
            None => self.tunnel_rate_here(id, Instant::now()),
        }
    }

    /// Check 5: requests in flight over all of a tunnel's sessions. (The session's own stream limit is
    /// checked when its stream opens: [`Limits::session_full`].)
    pub(crate) fn tunnel_capacity(&self, registry: &Registry, id: &TunnelId) -> Result<(), PublicError> {
        if registry.in_flight(id) >= self.max_tunnel_requests {
            return Err(self.refuse(Limit::TunnelConcurrency, PublicError::AtCapacity));
        }
        Ok(())
    }

    /// Check 5: the session is at its stream limit (`--max-streams`).
    pub(crate) fn session_full(&self) -> PublicError {
        self.refuse(Limit::TunnelConcurrency, PublicError::AtCapacity)
    }

    /// Check 6: the largest request body tunnel `id` takes (`u64::MAX`: no limit).
    pub(crate) fn body_limit(&self, id: &TunnelId) -> u64 {
        self.body_overrides.get(id).copied().or(self.max_request_body).unwrap_or(u64::MAX)
    }

    /// Check 6: a body that announces at least `len` bytes, before any of it is read.
    pub(crate) fn announced_body(&self, id: &TunnelId, len: u64) -> Result<(), PublicError> {
        if len > self.body_limit(id) {
            return Err(self.refuse(Limit::BodySize, PublicError::PayloadTooLarge));
        }
        Ok(())
    }

    // Checks 6 (a streamed body crossing the limit) and 7 (a paused upload) are seen by the upload
    // task in `proxy`, which counts them itself: it outlives the request that started it.

    /// Check 7: a client took no response for the send-idle timeout (the server closes it).
    pub(crate) fn send_idle(&self) {
        self.metrics.limited(Limit::SendIdle);
    }

    /// An agent at `GET /ws` from `ip`: refused for a while after too many failed handshakes.
    pub(crate) fn handshake_allowed(&self, ip: IpAddr) -> Result<(), PublicError> {
        match self.failures.blocked(client_key(ip)) {
            Some(wait) => Err(PublicError::RateLimited(wait.as_secs().max(1))),
            None => Ok(()),
        }
    }

    /// A well-formed upgrade: its slot among the handshakes in progress, or 503 while the most
    /// allowed are.
    pub(crate) fn handshake(&self) -> Result<OwnedSemaphorePermit, PublicError> {
        Arc::clone(&self.handshakes)
            .try_acquire_owned()
            .map_err(|_| self.refuse(Limit::Handshakes, PublicError::GatewayBusy))
    }

    /// An agent from `ip` failed its handshake (or broke the session's rules right after).
    pub(crate) fn handshake_failed(&self, ip: IpAddr) {
        self.failures.record(client_key(ip));
    }
}
