//! The ferry agent: the private side of a tunnel.
//!
//! ```text
//! upstream ◀── hyper client (pooled) ◀── upstream ◀── session (yamux streams) ◀══ WebSocket ══ gateway
//!                                                          ▲
//!                                         connect (dial, handshake, reconnect with backoff)
//! ```
//!
//! The agent dials *out* to the gateway, so the service it exposes needs no inbound port. Each
//! stream the gateway opens carries one public request; the agent proxies it to the upstream and
//! streams the response back.
//!
//! # Layout
//!
//! - [`config`] — [`AgentConfig`], the upstream and gateway URL parsers, defaults.
//! - `connect` — dialling the gateway and the handshake.
//! - `session` — one session with the gateway: request streams, control stream, drain, go-away.
//! - `upstream` — the [`Forwarder`](upstream): one request stream to the upstream and back.
//! - [`filter`] — the agent's own checks (methods, paths, body size, concurrency).
//! - `health` — the circuit breaker and the health report (a state machine: no I/O, no clock).
//! - `probe` — what feeds it besides requests: reconnect attempts while open, the health probe.
//! - `metrics` — `GET /metrics` on `--metrics ADDR`: upstream times and answers, sessions.
//! - [`status`], [`console`] — what the agent is doing, and the screen that shows it on a terminal.
//! - [`inspect`] — the request inspector on `--inspect ADDR`: the last requests, a page, replay.
//! - [`tls`] — trust for `wss://` (CAs, the gateway's own certificate, key pins) and `https` upstreams.
//! - [`error`] — [`AgentError`] and [`ConnectError`].
#![forbid(unsafe_code)]
#![warn(clippy::unwrap_used)]

mod backoff;
pub mod config;
mod connect;
pub mod console;
pub mod error;
pub mod filter;
mod health;
pub mod inspect;
mod metrics;
mod pool;
mod probe;
pub mod rewrite;
mod session;
pub mod status;
mod tcp;
pub mod tls;
mod upstream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use ferry_codec::control::GoAwayReason;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

pub use config::AgentConfig;
pub use error::{AgentError, ConnectError};
use session::SessionEnd;

/// Wait before retrying after an error a person has to fix (bad secret, unknown tunnel): no point
/// hammering the gateway, but pick up a fix without a restart.
const ATTENTION_RETRY: Duration = Duration::from_secs(30);

/// Keeps the tunnel up until `shutdown` fires: connects, serves, reconnects with backoff.
///
/// # Errors
/// Invalid configuration, or `max_retries` failed attempts in a row.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    run_with(config, Extras::default(), shutdown).await
}

/// As [`run`], and serves `GET /metrics` on `metrics` (see `agent --metrics`).
///
/// # Errors
/// As [`run`].
pub async fn run_with_metrics(
    config: AgentConfig,
    metrics: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    run_with(config, Extras { metrics: Some(metrics), ..Extras::default() }, shutdown).await
}

/// What the agent serves and reports beside the tunnel; each is off when `None`.
#[derive(Debug, Default)]
pub struct Extras {
    /// `GET /metrics` (see `agent --metrics`).
    pub metrics: Option<tokio::net::TcpListener>,
    /// The request inspector (see `agent --inspect`): a page and a JSON API of the last
    /// requests, kept as [`AgentConfig::inspect`] says.
    pub inspect: Option<tokio::net::TcpListener>,
    /// Where the agent reports what it is doing (for [`console`]).
    pub status: Option<Arc<status::Status>>,
}

/// As [`run`], with what `listeners` asks for besides.
///
/// # Errors
/// As [`run`].
pub async fn run_with(
    config: AgentConfig,
    listeners: Extras,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    config.validate().map_err(AgentError::Config)?;
    let config = Arc::new(config);
    let extra_ca = tls::read_ca(config.upstream_ca.as_deref(), "--upstream-ca-file").await?;
    let pool = upstream::pool(&config, extra_ca.as_deref())?;
    let gateway_tls = if config.gateways().any(|g| g.tls) {
        let ca = tls::read_ca(config.ca_file.as_deref(), "--ca-file").await?;
        Some(tls::gateway_connector(ca.as_deref(), &config.pins)?)
    } else {
        None
    };
    let upstream = Arc::new(upstream::Forwarder {
        pool,
        config: Arc::clone(&config),
        in_flight: Default::default(),
        health: health::Health::new(config.breaker_failures, config.breaker_cooldown),
        metrics: metrics::AgentMetrics::new(config.tunnel_id.as_str()),
        inspector: listeners
            .inspect
            .is_some()
            .then(|| Arc::new(inspect::Inspector::new(config.inspect.clone()))),
        status: listeners.status.clone(),
    });
    // Background tasks beside the sessions (metrics server, breaker and probe loops): one token,
    // a child of `shutdown`, stops them; one tracker waits for them at the end.
    let background = TaskTracker::new();
    let stop_background = shutdown.child_token();
    let _stop_background = stop_background.clone().drop_guard();
    if let (Some(listener), Some(inspector)) = (listeners.inspect, upstream.inspector.clone()) {
        if let (Some(status), Ok(addr)) = (&listeners.status, listener.local_addr()) {
            status.set_inspector(format!("http://{addr}"));
        }
        background.spawn(inspect::server::serve(
            listener,
            inspector,
            Arc::clone(&upstream),
            stop_background.clone(),
        ));
    }
    if let Some(listener) = listeners.metrics {
        let forwarder = Arc::clone(&upstream);
        let render: metrics::Render = Arc::new(move || {
            let health = forwarder.health.subscribe().borrow().0;
            forwarder.metrics.render(forwarder.in_flight.load(std::sync::atomic::Ordering::Relaxed), health)
        });
        background.spawn(metrics::serve(listener, render, stop_background.clone()));
    }
    {
        let upstream = Arc::clone(&upstream);
        let stop = stop_background.clone();
        background.spawn(async move { probe::breaker_loop(&upstream.health, &upstream.config, stop).await });
    }
    {
        // Idle upstream connections past their timeout are closed even when no request comes.
        let upstream = Arc::clone(&upstream);
        let stop = stop_background.clone();
        background.spawn(async move {
            let mut ticks = tokio::time::interval(config::POOL_IDLE_TIMEOUT / 3);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = ticks.tick() => upstream.pool.reap(),
                }
            }
        });
    }
    if let Some(path) = config.health_path.clone() {
        let upstream = Arc::clone(&upstream);
        let stop = stop_background.clone();
        background.spawn(async move {
            probe::probe_loop(&upstream.health, &upstream.pool, &upstream.config, &path, stop).await;
        });
    }
    // Sessions the gateway sent away, finishing their requests beside the current one.
    let draining = TaskTracker::new();
    let result = serve_until_shutdown(&config, gateway_tls.as_ref(), &upstream, &shutdown, &draining).await;
    draining.close();
    if tokio::time::timeout(config.drain_timeout, draining.wait()).await.is_err() {
        warn!("sessions the gateway sent away still had requests at the drain deadline");
    }
    stop_background.cancel();
    background.close();
    background.wait().await;
    result
}

async fn serve_until_shutdown(
    config: &Arc<AgentConfig>,
    gateway_tls: Option<&tokio_rustls::TlsConnector>,
    upstream: &Arc<upstream::Forwarder>,
    shutdown: &CancellationToken,
    draining: &TaskTracker,
) -> Result<(), AgentError> {
    let gateways: Vec<String> = config.gateways().map(|g| g.uri.to_string()).collect();
    info!(
        tunnel_id = %config.tunnel_id,
        upstream = %config.upstream.as_ref().map_or_else(|| "-".to_owned(), ToString::to_string),
        tcp = %config.tcp.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(" "),
        gateway = %gateways.join(" "),
        connections = config.connections,
        "agent starting"
    );
    if config.connections == 1 {
        return serve_connection(0, config, gateway_tls, upstream, shutdown, draining, &Nodes::default())
            .await;
    }
    // Several connections: one loop each; the first to give up ends them all.
    let nodes = Nodes::default();
    let stop = shutdown.child_token();
    let slots = (0..config.connections).map(|slot| {
        let stop = stop.clone();
        let nodes = &nodes;
        async move {
            let result = serve_connection(slot, config, gateway_tls, upstream, &stop, draining, nodes).await;
            if result.is_err() {
                stop.cancel();
            }
            result
        }
    });
    futures_util::future::join_all(slots).await.into_iter().collect::<Result<Vec<()>, _>>().map(|_| ())
}

/// Which gateway node each connection is on (by node id, or by URL for a gateway on its own), so
/// two connections never share one: the gateway would take the second for a reconnect of the
/// first, and a node's death would cost both.
#[derive(Debug)]
struct Nodes {
    held: std::sync::Mutex<std::collections::HashMap<usize, String>>,
    /// Counts the places given up, so a connection waiting for one wakes when one is.
    released: tokio::sync::watch::Sender<u64>,
}

impl Default for Nodes {
    fn default() -> Self {
        Self { held: std::sync::Mutex::default(), released: tokio::sync::watch::Sender::new(0) }
    }
}

impl Nodes {
    /// Records that `slot` is on `node`; `Err(other slot)` when another connection is already there.
    fn claim(&self, slot: usize, node: &str) -> Result<NodeClaim<'_>, usize> {
        let mut nodes = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((&other, _)) = nodes.iter().find(|(other, n)| **other != slot && n.as_str() == node) {
            return Err(other);
        }
        nodes.insert(slot, node.to_owned());
        Ok(NodeClaim { nodes: self, slot })
    }
}

/// A connection's place on its node; given up when the session ends.
struct NodeClaim<'a> {
    nodes: &'a Nodes,
    slot: usize,
}

impl Drop for NodeClaim<'_> {
    fn drop(&mut self) {
        self.nodes.held.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.slot);
        self.nodes.released.send_modify(|count| *count += 1);
    }
}

/// One connection: connect, serve the session, reconnect, until shutdown. Connection `slot`
/// starts at gateway `slot` (modulo their number) and moves to the next one after a failure or
/// when it lands on a node another connection already uses.
#[allow(clippy::too_many_lines)]
async fn serve_connection(
    slot: usize,
    config: &Arc<AgentConfig>,
    gateway_tls: Option<&tokio_rustls::TlsConnector>,
    upstream: &Arc<upstream::Forwarder>,
    shutdown: &CancellationToken,
    draining: &TaskTracker,
    nodes: &Nodes,
) -> Result<(), AgentError> {
    let gateways: Vec<&config::GatewayUrl> = config.gateways().collect();
    let mut next = slot % gateways.len();
    let mut backoff = Backoff::new(config.reconnect_initial, config.reconnect_max);
    let mut failures = 0u32;
    // Gateway URLs found to be a gateway on its own (no node id) that another connection uses:
    // landing there again is certain while that connection holds it.
    let mut taken = std::collections::HashSet::new();
    let mut released = nodes.released.subscribe();
    loop {
        let gateway = gateways[next];
        // Seen before dialling: a place given up from here on wakes a wait below.
        released.borrow_and_update();
        let attempt = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            attempt = connect::connect(config, gateway, gateway_tls) => attempt,
        };
        let delay = match attempt {
            Ok((ws, accepted)) => {
                failures = 0;
                let node = accepted.node_id.clone().unwrap_or_else(|| gateway.uri.to_string());
                let claim = match nodes.claim(slot, &node) {
                    Ok(claim) => claim,
                    Err(other) => {
                        // Closed before any stream: the gateway sees a session that ended at once.
                        drop(ws);
                        next = (next + 1) % gateways.len();
                        if accepted.node_id.is_none() {
                            taken.insert(gateway.uri.to_string());
                        }
                        if gateways.iter().all(|g| taken.contains(&g.uri.to_string())) {
                            // Every URL is a gateway on its own that another connection holds:
                            // wait for one to be given up instead of dialling in vain.
                            info!(
                                connection = slot,
                                "every gateway is a single node another connection of this agent uses; \
                                 this connection waits until one is free (run the gateways with --cluster, \
                                 or give another --gateway)"
                            );
                            tokio::select! {
                                () = shutdown.cancelled() => return Ok(()),
                                _ = released.changed() => {}
                            }
                            taken.clear();
                            continue;
                        }
                        info!(
                            connection = slot,
                            node,
                            other_connection = other,
                            "landed on a gateway node another connection uses; trying again"
                        );
                        let delay = backoff.next_delay();
                        tokio::select! {
                            () = shutdown.cancelled() => return Ok(()),
                            () = tokio::time::sleep(delay) => {}
                        }
                        continue;
                    }
                };
                taken.clear();
                upstream.metrics.session_started();
                if let Some(status) = &upstream.status {
                    status.session_up(&accepted.public_urls);
                }
                info!(session_id = %accepted.session_id, connection = slot, node = accepted.node_id.as_deref().unwrap_or("-"), "tunnel is up");
                if slot == 0 {
                    if let Some(inspector) = &upstream.inspector {
                        inspector.set_public_url(accepted.public_urls.first().cloned());
                    }
                    for url in &accepted.public_urls {
                        info!(%url, "public URL");
                    }
                    for binding in &accepted.tcp {
                        if let Ok(port) = binding.port {
                            let url = if gateway.host.contains(':') {
                                format!("tcp://[{}]:{port}", gateway.host)
                            } else {
                                format!("tcp://{}:{port}", gateway.host)
                            };
                            info!(%url, endpoint = binding.name, "public TCP address");
                        }
                    }
                }
                let started = Instant::now();
                let end = session::serve(upstream, ws, &accepted, shutdown).await;
                drop(claim);
                if let Some(status) = &upstream.status {
                    status.session_down(match &end {
                        Ok(SessionEnd::Lost) => Some("the gateway closed the session".to_owned()),
                        Err(err) => Some(err.to_string()),
                        Ok(_) => None,
                    });
                }
                if started.elapsed() >= config.healthy_session {
                    backoff.reset();
                }
                match end {
                    Ok(SessionEnd::Shutdown) => return Ok(()),
                    Ok(SessionEnd::GoAway { reason, draining: rest }) => {
                        draining.spawn(rest);
                        if reason == GoAwayReason::AdminDrain {
                            info!(
                                connection = slot,
                                "session drained on the gateway's request; reconnecting"
                            );
                            Duration::ZERO
                        } else {
                            info!(
                                ?reason,
                                connection = slot,
                                "session closed on the gateway's request; reconnecting"
                            );
                            backoff.next_delay()
                        }
                    }
                    Ok(SessionEnd::Lost) => {
                        upstream.metrics.session_lost();
                        warn!(connection = slot, "the gateway closed the session; reconnecting");
                        next = (next + 1) % gateways.len();
                        backoff.next_delay()
                    }
                    Err(err) => {
                        upstream.metrics.session_lost();
                        warn!(%err, connection = slot, "connection to the gateway lost; reconnecting");
                        next = (next + 1) % gateways.len();
                        backoff.next_delay()
                    }
                }
            }
            Err(err) => {
                failures += 1;
                if let Some(status) = &upstream.status {
                    status.attempt_failed(error_chain(&err));
                }
                next = (next + 1) % gateways.len();
                if config.max_retries.is_some_and(|max| failures >= max) {
                    error!(err = %error_chain(&err), hint = err.hint(), "giving up");
                    return Err(AgentError::GaveUp { attempts: failures, last: err });
                }
                if err.needs_attention() {
                    error!(err = %error_chain(&err), hint = err.hint(), retry_in_secs = ATTENTION_RETRY.as_secs(), "connection refused by the gateway");
                    ATTENTION_RETRY
                } else {
                    let delay = backoff.next_delay().max(err.retry_after().unwrap_or_default());
                    warn!(err = %error_chain(&err), hint = err.hint(), gateway = %gateway.uri, retry_in_ms = delay.as_millis() as u64, "cannot connect to the gateway");
                    delay
                }
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        text.push_str(": ");
        text.push_str(&err.to_string());
        source = err.source();
    }
    text
}
