//! One gateway process: the state every connection and session shares, how it starts, serves,
//! reloads its secrets and certificate, and drains.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use ferry_codec::TunnelId;
use ferry_codec::control::GoAwayReason;
use ferry_transport::h1_server::HeadLimits;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::auth::{AuthFileError, Secrets};
use crate::cluster::Cluster;
use crate::config::GatewayConfig;
use crate::error::GatewayError;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::proxy::{ForwardSettings, Forwarding};
use crate::registry::Registry;
use crate::shards::{Handover, Inbox};
use crate::tls;

/// State shared by every connection and session of one gateway.
#[derive(Debug)]
pub struct Gateway {
    pub(crate) config: GatewayConfig,
    /// Live agent sessions.
    pub registry: Registry,
    /// HTTP/2 connections (and HTTP/1.1 ones are served by `http1`).
    pub(crate) http: auto::Builder<TokioExecutor>,
    /// What an HTTP/1.1 request head may hold.
    pub(crate) head_limits: HeadLimits,
    /// Public connections and the tasks of their requests.
    pub(crate) tracker: TaskTracker,
    /// One permit per open public connection, shared by every thread's accept loop.
    pub(crate) connection_slots: Arc<Semaphore>,
    /// Where connections are handed to each gateway thread (index 0: the main thread); set when
    /// the gateway runs on several (see `shards`).
    pub(crate) inboxes: std::sync::OnceLock<Vec<Inbox>>,
    /// The main thread's end of its inbox, taken by [`Gateway::serve`].
    pub(crate) main_inbox: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Handover>>>,
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
    /// This node's part in a cluster of gateways (`--cluster`).
    pub cluster: Option<Arc<Cluster>>,
    /// Public TCP ports leased to tunnels.
    pub tcp_ports: crate::tcp::TcpPorts,
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
        let cluster = match config.cluster.clone() {
            Some(cluster) => {
                metrics.enable_cluster();
                Some(Arc::new(Cluster::new(cluster, Arc::clone(&metrics)).map_err(GatewayError::Config)?))
            }
            None => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        Ok(Arc::new(Self {
            http: config.http_builder(),
            head_limits: HeadLimits {
                max_head_bytes: config.max_header_bytes,
                max_headers: config.max_headers,
                max_uri_length: config.max_uri_len,
            },
            registry: Registry::default(),
            tracker: TaskTracker::new(),
            inboxes: std::sync::OnceLock::new(),
            main_inbox: std::sync::Mutex::new(None),
            connection_slots: Arc::new(Semaphore::new(config.max_connections.min(Semaphore::MAX_PERMITS))),
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
            cluster,
            tcp_ports: crate::tcp::TcpPorts::default(),
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

    /// Reads the TLS certificates and keys (the public port's, the peer listener's) again (on
    /// SIGHUP): new connections get the new certificate, open ones keep theirs. On error the old
    /// certificate stays in force. Without TLS this does nothing.
    ///
    /// # Errors
    /// A file cannot be read, or the pair is invalid.
    pub fn reload_tls(&self) -> Result<(), tls::TlsError> {
        if let Some(tls) = &self.tls {
            tls.reload()?;
            info!("TLS certificate reloaded");
        }
        if let Some(cluster) = self.cluster.as_ref().filter(|c| c.peer_tls().is_some()) {
            cluster.reload_peer_tls()?;
            info!("peer listener's TLS certificate reloaded");
        }
        Ok(())
    }

    /// A request id unique to this gateway process: its instance prefix and a counter.
    pub(crate) fn next_request_id(&self) -> String {
        let n = self.request_counter.fetch_add(1, Ordering::Relaxed);
        // Sized for the longest id up front: one allocation, where `format!` grew the string.
        let mut id = String::with_capacity(8 + 1 + 16);
        let _ = write!(id, "{:08x}-{n:x}", self.request_prefix);
        id
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
            cluster: self.cluster.as_ref(),
            session_config: &self.config.session,
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
