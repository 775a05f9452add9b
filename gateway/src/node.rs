//! One gateway process: the state every connection and session shares, how it starts, serves,
//! reloads its secrets and certificate, and drains.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use ferry_codec::TunnelId;
use ferry_codec::control::GoAwayReason;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::auth::{AuthFileError, Secrets};
use crate::config::GatewayConfig;
use crate::error::GatewayError;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::proxy::{ForwardSettings, Forwarding};
use crate::registry::Registry;
use crate::{server, tls};

/// How long connections cut at the drain deadline get to close before the agents are let go.
const CUT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// State shared by every connection and session of one gateway.
#[derive(Debug)]
pub struct Gateway {
    pub(crate) config: GatewayConfig,
    /// Live agent sessions.
    pub registry: Registry,
    pub(crate) http: auto::Builder<TokioExecutor>,
    /// Public connections and the tasks of their requests.
    pub(crate) tracker: TaskTracker,
    /// Fires when the gateway stops accepting; public connections then drain.
    pub(crate) shutdown: CancellationToken,
    /// Fires at the drain deadline: connections still busy then close.
    pub(crate) cut: CancellationToken,
    /// Agent sessions and their control streams; they outlive `shutdown` until requests drained.
    pub(crate) session_tracker: TaskTracker,
    /// Closes every agent session.
    pub(crate) sessions: CancellationToken,
    /// How requests are forwarded (timeouts, the `Via` token that detects loops).
    pub(crate) forwarding: ForwardSettings,
    request_prefix: u32,
    request_counter: AtomicU64,
    /// The agent secrets in force; replaced whole on reload.
    secrets: RwLock<Arc<Secrets>>,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Every limit at the edge.
    pub(crate) limits: Limits,
    /// The certificate in force when the public port speaks TLS.
    pub(crate) tls: Option<tls::Tls>,
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
        if config.max_client_requests == 0 {
            return Err(GatewayError::Config("the requests in flight per client must be positive".into()));
        }
        let mut random = [0u8; 4];
        getrandom::fill(&mut random).map_err(|err| GatewayError::Io(std::io::Error::other(err)))?;
        let instance = u32::from_be_bytes(random);
        let metrics = Arc::new(Metrics::default());
        let scheme = if tls.is_some() { "https" } else { "http" };
        Ok(Arc::new(Self {
            http: server::http_builder(&config),
            registry: Registry::default(),
            tracker: TaskTracker::new(),
            shutdown,
            cut: CancellationToken::new(),
            session_tracker: TaskTracker::new(),
            sessions: CancellationToken::new(),
            forwarding: ForwardSettings::new(&config, scheme, format!("ferry-{instance:08x}")),
            request_prefix: instance,
            request_counter: AtomicU64::new(0),
            secrets: RwLock::new(Arc::new(secrets)),
            limits: Limits::new(&config, Arc::clone(&metrics)),
            metrics,
            tls,
            config,
        }))
    }

    /// The secrets in force now.
    pub(crate) fn secrets(&self) -> Arc<Secrets> {
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
            // Connections still busy (and uploads still running): what the deadline cuts. Counted
            // before they are told, so the count is what the deadline found.
            warn!(left = self.tracker.len(), "drain deadline passed; cutting the requests still in flight");
            self.cut.cancel();
            let _ = tokio::time::timeout(CUT_GRACE, self.tracker.wait()).await;
        }
        // Requests are done: now the agents can go.
        self.sessions.cancel();
        self.session_tracker.close();
        let _ = tokio::time::timeout(self.config.drain_timeout, self.session_tracker.wait()).await;
        info!("gateway stopped");
    }

    /// A request id unique to this gateway process: its instance prefix and a counter.
    pub(crate) fn next_request_id(&self) -> String {
        let n = self.request_counter.fetch_add(1, Ordering::Relaxed);
        format!("{:08x}-{n:x}", self.request_prefix)
    }

    /// `http`, or `https` once the gateway terminates TLS.
    pub(crate) fn public_scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// What forwarding a request needs.
    pub(crate) fn forwarding(&self) -> Forwarding<'_> {
        Forwarding {
            registry: &self.registry,
            limits: &self.limits,
            metrics: &self.metrics,
            tracker: &self.tracker,
            settings: &self.forwarding,
        }
    }

    /// The URLs a tunnel is reachable at, given the Host the agent dialled.
    pub(crate) fn public_urls(&self, id: &TunnelId, host: Option<&str>) -> Vec<String> {
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
}
