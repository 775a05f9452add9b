//! The ferry gateway: the public side of a tunnel.
//!
//! ```text
//! public clients ──▶ server (hyper, h1 + h2c) ──▶ routes ──▶ proxy ──▶ registry ──▶ session ══▶ agent
//!                                                   │                                 ▲
//!                                                   └──▶ GET /ws ──▶ tunnel (handshake)┘
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
//! - `tunnel` — the agent endpoint, the handshake and the session lifecycle.
//! - [`registry`] — live sessions by tunnel id.
//! - [`session`] — one session as the rest of the gateway sees it.
//! - `admin` — `GET /` and `GET /connections`.
//! - [`error`] — [`GatewayError`] and [`ProxyError`] (the JSON errors clients see).
#![forbid(unsafe_code)]
#![warn(clippy::unwrap_used)]

mod admin;
pub mod config;
pub mod error;
mod proxy;
pub mod registry;
mod routes;
mod server;
pub mod session;
mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_codec::TunnelId;
use http::{HeaderMap, Request, Response, header};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub use config::GatewayConfig;
pub use error::{GatewayError, ProxyError};
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
}

impl Gateway {
    /// A gateway that stops accepting when `shutdown` fires. Serve it with [`Gateway::serve`].
    ///
    /// # Errors
    /// The configuration is invalid.
    pub fn new(config: GatewayConfig, shutdown: CancellationToken) -> Result<Arc<Self>, GatewayError> {
        config.session.validate().map_err(GatewayError::Config)?;
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
        }))
    }

    /// Accepts on `listener` until shutdown, then drains: lets in-flight requests finish (up to
    /// the drain timeout), then closes the agent sessions.
    pub async fn serve(self: &Arc<Self>, listener: TcpListener) {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, domain = self.config.domain.as_deref().unwrap_or("-"), "gateway listening");
        }
        warn!("no agent secret configured: any well-formed tunnel id is accepted");
        server::accept_loop(Arc::clone(self), listener).await;
        info!("shutting down: draining requests in flight");
        self.tracker.close();
        if tokio::time::timeout(self.config.drain_timeout, self.tracker.wait()).await.is_err() {
            warn!("drain deadline passed with requests still in flight");
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
        "http"
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
    ) -> Response<ResponseBody> {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| request.uri().authority().map(|a| a.as_str()))
            .map(normalize_host);
        let path_and_query = request.uri().path_and_query().map_or("/", |p| p.as_str());
        let route = route(self.config.domain.as_deref(), host.as_deref(), path_and_query);
        let request_id = self.next_request_id();
        let is_read = matches!(*request.method(), http::Method::GET | http::Method::HEAD);
        let result = match route {
            Route::Tunnel { id, target } => {
                return match proxy::forward(self, request, peer, &id, target, &request_id).await {
                    Ok(response) => response,
                    Err(err) => {
                        debug!(%err, tunnel_id = %id, request_id, "request answered by the gateway");
                        err.to_response(&request_id).map(Either::Left)
                    }
                };
            }
            Route::AgentConnect => tunnel::accept(self, request, peer),
            Route::Health if is_read => Ok(admin::health(self)),
            Route::Connections if is_read => Ok(admin::connections(self, None)),
            Route::TunnelConnections(id) if is_read => Ok(admin::connections(self, Some(&id))),
            Route::Health | Route::Connections | Route::TunnelConnections(_) => {
                Err(ProxyError::MethodNotAllowed)
            }
            Route::InvalidTunnelId(text) => Err(ProxyError::InvalidTunnelId(text)),
            Route::NotFound => Err(ProxyError::NotFound),
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
