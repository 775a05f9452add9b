//! The ferry gateway: the public side of a tunnel.
//!
//! ```text
//! public clients ──▶ server (hyper, h1 + h2c) ──▶ routes ──▶ proxy ──▶ registry ──▶ session ══▶ agent
//!                                                   │                                 ▲
//!                                                   └──▶ GET /ws ──▶ endpoint ──▶ lifecycle┘
//! ```
//!
//! Agents dial in to `GET /ws` on the same port as public traffic; after the handshake the
//! WebSocket carries a yamux session, and each public request becomes one stream on it.
//!
//! # Layout
//!
//! - [`config`] — [`GatewayConfig`] and its defaults.
//! - `server` — accept loop and per-connection serving.
//! - `routes` — Host and path routing rules.
//! - `proxy` — forwarding one request through a tunnel.
//! - `endpoint` — the agent endpoint: upgrade, handshake, refusals.
//! - `lifecycle` — one session from its handshake to its close: registration, control messages.
//! - [`registry`] — live sessions by tunnel id.
//! - [`session`] — one session as the rest of the gateway sees it.
//! - [`auth`] — agent secrets, MAC checks, the failed-attempt limiter.
//! - `admin` — `GET /`, the admin endpoints (`/connections`, actions, `/metrics`).
//! - [`metrics`] — counters and their Prometheus rendering.
//! - [`tls`] — HTTPS on the public port, certificate reload.
//! - [`limits`] — connections per address, request rates.
//! - [`error`] — [`GatewayError`] and [`PublicError`] (the JSON errors clients see).
#![forbid(unsafe_code)]
#![warn(clippy::unwrap_used)]

mod admin;
pub mod auth;
pub mod config;
mod endpoint;
pub mod error;
mod lifecycle;
pub mod limits;
pub mod metrics;
mod proxy;
pub mod registry;
mod routes;
mod server;
pub mod session;
pub mod tls;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use ferry_codec::TunnelId;
use http::{HeaderMap, Method, Request, Response, header};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use auth::{AuthFileError, FailureLimiter, Secrets};
pub use config::GatewayConfig;
pub use error::{GatewayError, PublicError};
use ferry_codec::control::GoAwayReason;
use metrics::Metrics;
use proxy::ResponseBody;
pub use registry::Registry;
use routes::{Route, normalize_host, route};

/// State shared by every connection and session of one gateway.
#[derive(Debug)]
pub struct Gateway {
    config: GatewayConfig,
    /// Live agent sessions.
    pub registry: Registry,
    http: auto::Builder<TokioExecutor>,
    /// Public connections and the tasks of their requests.
    tracker: TaskTracker,
    /// Fires when the gateway stops accepting; public connections then drain.
    shutdown: CancellationToken,
    /// Agent sessions and their control streams; they outlive `shutdown` until requests drained.
    session_tracker: TaskTracker,
    /// Closes every agent session.
    sessions: CancellationToken,
    /// Names this gateway in `Via`, to detect a request that loops back to it.
    via_token: String,
    request_prefix: u32,
    request_counter: AtomicU64,
    /// The agent secrets in force; replaced whole on reload.
    secrets: RwLock<Arc<Secrets>>,
    /// Failed handshakes per address.
    failures: FailureLimiter,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
    /// The certificate in force when the public port speaks TLS.
    tls: Option<tls::Tls>,
    /// Open public connections per client address.
    addresses: limits::AddressLimiter,
    /// Agent WebSocket connections still in their handshake.
    handshakes: Arc<tokio::sync::Semaphore>,
    /// Request rate per tunnel, when limited.
    tunnel_rates: Option<limits::RateLimiter<TunnelId>>,
    /// Request rate per client address, when limited.
    client_rates: Option<limits::RateLimiter<std::net::IpAddr>>,
    /// Requests in flight per client and tunnel.
    client_load: limits::ClientLoad,
}

impl Gateway {
    /// A gateway that stops accepting when `shutdown` fires. Serve it with [`Gateway::serve`].
    ///
    /// # Errors
    /// The configuration is invalid.
    pub fn new(config: GatewayConfig, shutdown: CancellationToken) -> Result<Arc<Self>, GatewayError> {
        config.session.validate().map_err(GatewayError::Config)?;
        if config.heartbeat_interval.is_zero() || config.heartbeat_misses == 0 {
            return Err(GatewayError::Config("the heartbeat interval and misses must be positive".into()));
        }
        let secrets = Secrets::load(&config.auth)?;
        let tls = config.tls.clone().map(tls::Tls::load).transpose()?;
        let addresses = limits::AddressLimiter::new(config.max_connections_per_address);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(
            config.max_handshakes.min(tokio::sync::Semaphore::MAX_PERMITS),
        ));
        let tunnel_rates = config.tunnel_rate.map(limits::RateLimiter::new);
        let client_rates = config.client_rate.map(limits::RateLimiter::new);
        if config.max_client_requests == 0 {
            return Err(GatewayError::Config("the requests in flight per client must be positive".into()));
        }
        let client_load = limits::ClientLoad::new(config.max_client_requests);
        let mut random = [0u8; 4];
        getrandom::fill(&mut random).map_err(|err| GatewayError::Io(std::io::Error::other(err)))?;
        let instance = u32::from_be_bytes(random);
        Ok(Arc::new(Self {
            http: server::http_builder(&config),
            config,
            registry: Registry::default(),
            tracker: TaskTracker::new(),
            shutdown,
            session_tracker: TaskTracker::new(),
            sessions: CancellationToken::new(),
            via_token: format!("ferry-{instance:08x}"),
            request_prefix: instance,
            request_counter: AtomicU64::new(0),
            secrets: RwLock::new(Arc::new(secrets)),
            failures: FailureLimiter::default(),
            metrics: Metrics::default(),
            tls,
            addresses,
            handshakes,
            tunnel_rates,
            client_rates,
            client_load,
        }))
    }

    /// The secrets in force now.
    fn secrets(&self) -> Arc<Secrets> {
        Arc::clone(&self.secrets.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Reloads the auth file (on SIGHUP). Sessions that authenticated with a secret that is no
    /// longer listed are told why and closed. On error the old secrets stay in force.
    ///
    /// # Errors
    /// The file cannot be read or is invalid.
    pub async fn reload_auth(&self) -> Result<(), AuthFileError> {
        let secrets = Arc::new(Secrets::load(&self.config.auth)?);
        *self.secrets.write().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&secrets);
        info!(tunnels = secrets.tunnel_count(), "agent secrets reloaded");
        for session in self.registry.all() {
            if !secrets.still_allows(&session.identity.tunnel_id, session.identity.secret.as_ref()) {
                warn!(tunnel_id = %session.identity.tunnel_id, session_id = %session.identity.id, "secret revoked; closing the session");
                session.go_away(GoAwayReason::CredentialsRevoked, std::time::Duration::ZERO).await;
                session.close();
            }
        }
        Ok(())
    }

    /// Reads the TLS certificate and key again (on SIGHUP): new connections get the new
    /// certificate, open ones keep theirs. On error the old certificate stays in force. Without
    /// TLS this does nothing.
    ///
    /// # Errors
    /// A file cannot be read, or the pair is invalid.
    pub fn reload_tls(&self) -> Result<(), tls::TlsError> {
        if let Some(tls) = &self.tls {
            tls.reload()?;
            info!("TLS certificate reloaded");
        }
        Ok(())
    }

    /// Accepts on `listener` until shutdown, then drains: lets in-flight requests finish (up to
    /// the drain timeout), then closes the agent sessions.
    pub async fn serve(self: &Arc<Self>, listener: TcpListener) {
        if let Ok(addr) = listener.local_addr() {
            info!(
                %addr,
                scheme = self.public_scheme(),
                domain = self.config.domain.as_deref().unwrap_or("-"),
                "gateway listening"
            );
        }
        let secrets = self.secrets();
        match (&*secrets, secrets.tunnel_count()) {
            (Secrets::Open, _) => {
                warn!(
                    "no agent secret configured: any well-formed tunnel id is accepted (set FERRY_SECRET, --secret-file or --auth-file)"
                );
            }
            (_, Some(tunnels)) => info!(tunnels, "agents authenticate with per-tunnel secrets"),
            (_, None) => info!("agents authenticate with the shared secret"),
        }
        if self.config.admin_token.is_none() && !self.config.admin_loopback {
            error!("admin endpoints are unreachable: no admin token and loopback access turned off");
        }
        server::accept_loop(Arc::clone(self), listener).await;
        info!("shutting down: telling agents to go away, draining requests in flight");
        for session in self.registry.all() {
            session.go_away(GoAwayReason::Shutdown, self.config.drain_timeout).await;
        }
        self.tracker.close();
        if tokio::time::timeout(self.config.drain_timeout, self.tracker.wait()).await.is_err() {
            // Connections still busy (and uploads still running): what the deadline cuts.
            warn!(left = self.tracker.len(), "drain deadline passed; cutting the requests still in flight");
        }
        // Requests are done: now the agents can go.
        self.sessions.cancel();
        self.session_tracker.close();
        let _ = tokio::time::timeout(self.config.drain_timeout, self.session_tracker.wait()).await;
        info!("gateway stopped");
    }

    /// A request id unique to this gateway process: its instance prefix and a counter.
    fn next_request_id(&self) -> String {
        let n = self.request_counter.fetch_add(1, Ordering::Relaxed);
        format!("{:08x}-{n:x}", self.request_prefix)
    }

    /// `http`, or `https` once the gateway terminates TLS.
    fn public_scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// Whether `Via` shows this request already passed through this gateway.
    fn seen_before(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(header::VIA)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.contains(self.via_token.as_str())))
    }

    /// The URLs a tunnel is reachable at, given the Host the agent dialled.
    fn public_urls(&self, id: &TunnelId, host: Option<&str>) -> Vec<String> {
        let Some(host) = host.filter(|h| h.bytes().all(|b| b.is_ascii_graphic())) else {
            return Vec::new();
        };
        let scheme = self.public_scheme();
        let mut urls = Vec::new();
        if let Some(domain) = &self.config.domain {
            let port = host
                .rsplit_once(':')
                .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(']'))
                .map(|(_, port)| format!(":{port}"))
                .unwrap_or_default();
            urls.push(format!("{scheme}://{}.{domain}{port}/", id.to_label()));
        }
        urls.push(format!("{scheme}://{host}/t/{id}/"));
        urls
    }

    /// Answers one public request.
    async fn handle(
        self: &Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
        conn: &server::ConnWatch,
    ) -> Response<ResponseBody> {
        // A request that already passed through this gateway (an agent whose upstream leads back
        // here) goes nowhere, not even to the gateway's own pages, where it would look local.
        if self.seen_before(request.headers()) {
            return PublicError::LoopDetected.to_response(&self.next_request_id()).map(Either::Left);
        }
        // One Host, or the request is ambiguous about where it goes (RFC 9112 §3.2: 400). The
        // target's authority, when it has one (absolute form, HTTP/2), is the one that counts.
        if request.headers().get_all(header::HOST).iter().nth(1).is_some() {
            return PublicError::BadRequest("more than one Host header")
                .to_response(&self.next_request_id())
                .map(Either::Left);
        }
        let host = request
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| request.headers().get(header::HOST).and_then(|h| h.to_str().ok()))
            .map(normalize_host);
        let path_and_query = request.uri().path_and_query().map_or("/", |p| p.as_str());
        if path_and_query.len() > self.config.max_uri_len {
            self.metrics.limited(metrics::Limit::UriLength);
            return PublicError::UriTooLong.to_response(&self.next_request_id()).map(Either::Left);
        }
        let route = route(self.config.domain.as_deref(), host.as_deref(), path_and_query);
        let request_id = self.next_request_id();
        if let Route::Tunnel { id, target } = route {
            let response = match proxy::forward(self, request, peer, conn, &id, target, &request_id).await {
                Ok(response) => response,
                Err(err) => {
                    debug!(%err, tunnel_id = %id, request_id, "request answered by the gateway");
                    err.to_response(&request_id).map(Either::Left)
                }
            };
            self.metrics.request(response.status().as_u16());
            return response;
        }
        let method = request.method().clone();
        let read = method == Method::GET || method == Method::HEAD;
        let admin = matches!(
            route,
            Route::Connections | Route::TunnelConnections(_) | Route::ConnectionAction(..) | Route::Metrics
        );
        let result = if admin && let Err(err) = admin::authorize(self, request.headers(), peer) {
            Err(err)
        } else {
            match route {
                // Forwarded above; never reaches this match.
                Route::Tunnel { .. } => Err(PublicError::NotFound),
                Route::AgentConnect => endpoint::accept(self, request, peer),
                Route::Health if read => Ok(admin::health(self)),
                Route::Connections if read => Ok(admin::connections(self, None)),
                Route::TunnelConnections(id) if read => Ok(admin::connections(self, Some(&id))),
                Route::TunnelConnections(id) if method == Method::DELETE => admin::close(self, &id),
                Route::ConnectionAction(id, action) if method == Method::POST => {
                    admin::act(self, &id, action).await
                }
                Route::Metrics if read => Ok(admin::metrics(self)),
                Route::Health
                | Route::Connections
                | Route::TunnelConnections(_)
                | Route::ConnectionAction(..)
                | Route::Metrics => Err(PublicError::MethodNotAllowed),
                Route::InvalidTunnelId(text) => Err(PublicError::InvalidTunnelId(text)),
                Route::NotFound => Err(PublicError::NotFound),
            }
        };
        result.unwrap_or_else(|err| err.to_response(&request_id)).map(Either::Left)
    }
}

/// Runs a gateway on `listener` until `shutdown` fires, then drains (see [`Gateway::serve`]).
///
/// # Errors
/// The configuration is invalid.
pub async fn run(
    config: GatewayConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    Gateway::new(config, shutdown)?.serve(listener).await;
    Ok(())
}
