//! Several gateways as one: each node publishes the tunnels it holds sessions for to Redis and
//! keeps a view of everyone else's, so a request for a tunnel whose agent dialled another node
//! can find it. Without `--cluster` nothing here runs.
//!
//! In Redis, under the prefix `P` (`ferry:` by default):
//!
//! - `P nodes` — a sorted set of node ids scored by when each lapses (Redis's clock, in ms). A node
//!   pushes its score [`ClusterConfig::ttl`] ahead every [`ClusterConfig::refresh`]; entries that
//!   lapsed are removed by the next node to refresh, and nobody reads them before that.
//! - `P node:{id}` — a hash with the node's `advertise` URL; `P tunnels:{id}` — a hash of tunnel id
//!   → `sessions:healthy`. Both expire after the TTL, so a killed node leaves nothing behind.
//! - `P events` — a pub/sub channel: `{node} {tunnel} {sessions:healthy}` when a node's holding of
//!   a tunnel changes (`0:0`: it holds none), `{node} - bye` when it leaves.
//!
//! Each refresh rewrites the node's entries whole (so a Redis restarted empty has them back
//! within one refresh) and reads everyone's (so a missed event is mended within one refresh);
//! events make the other nodes' views current in between.

pub(crate) mod peer;
mod view;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ferry_codec::{Secret, TunnelId};
use futures_util::StreamExt;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use peer::{PEER_PATH, PeerError};
use view::View;
pub use view::{Holding, Owner, Owners, RemoteNode};

use crate::config::Rate;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::tls::{Tls, TlsError, TlsFiles};

/// How often a node re-announces itself and re-reads the others.
pub const REFRESH: Duration = Duration::from_secs(2);
/// How long a node counts as alive after its last refresh.
pub const TTL: Duration = Duration::from_secs(6);
/// How long the last known owners are used while Redis cannot be read; after that a request for
/// a tunnel held elsewhere gets 503 `cluster_unavailable`.
pub const STALE_GRACE: Duration = Duration::from_secs(30);
/// Longest wait for one Redis command (or pipeline) before it counts as failed.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// The default key prefix.
pub const PREFIX: &str = "ferry:";

/// How a node joins the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Where Redis is, with its password and database.
    pub redis: redis::ConnectionInfo,
    /// Prefix of every key and channel.
    pub prefix: String,
    /// This node's id, unique in the cluster.
    pub node_id: String,
    /// How other nodes reach this node's peer listener.
    pub advertise: Option<String>,
    /// What nodes present to each other's peer listeners.
    pub secret: Secret,
    /// See [`REFRESH`].
    pub refresh: Duration,
    /// See [`TTL`].
    pub ttl: Duration,
    /// See [`STALE_GRACE`].
    pub stale_grace: Duration,
    /// The peer listener's certificate chain and key: with them it speaks TLS, and this node
    /// advertises an `https://` address.
    pub peer_tls: Option<TlsFiles>,
    /// PEM file of the CA certificates that sign the other nodes' peer certificates (a private
    /// cluster CA); without it, `https://` peers are checked against the system's roots.
    pub peer_ca: Option<PathBuf>,
}

impl ClusterConfig {
    /// A node of the cluster on `redis`, with a random id and the default timings.
    ///
    /// # Errors
    /// The URL is not a Redis URL (`redis://`, `rediss://`, `unix://`).
    pub fn new(redis: &str, secret: Secret) -> Result<Self, String> {
        let redis = redis::IntoConnectionInfo::into_connection_info(redis)
            .map_err(|err| format!("not a Redis URL ({err})"))?;
        Ok(Self {
            redis,
            prefix: PREFIX.to_owned(),
            node_id: random_node_id(),
            advertise: None,
            secret,
            refresh: REFRESH,
            ttl: TTL,
            stale_grace: STALE_GRACE,
            peer_tls: None,
            peer_ca: None,
        })
    }

    /// Checks what flags cannot.
    ///
    /// # Errors
    /// A message naming the bad setting.
    pub fn validate(&self) -> Result<(), String> {
        check_node_id(&self.node_id)?;
        if self.prefix.is_empty()
            || self.prefix.len() > 64
            || !self.prefix.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err("the cluster key prefix must be 1 to 64 printable characters without spaces".into());
        }
        if self.refresh.is_zero() || self.ttl < self.refresh * 2 {
            return Err("the cluster TTL must be at least twice the refresh interval".into());
        }
        if self.stale_grace < self.ttl {
            return Err("the grace for a stale view must be at least the TTL".into());
        }
        if let Some(url) = &self.advertise {
            let wanted = if self.peer_tls.is_some() { "https" } else { "http" };
            match peer::split_advertise(url) {
                Some((scheme, _)) if scheme.is_tls() == self.peer_tls.is_some() => {}
                Some(_) => {
                    return Err(format!(
                        "--peer-advertise {url:?}: the peer listener {}, so advertise {wanted}://HOST:PORT",
                        if self.peer_tls.is_some() {
                            "speaks TLS (--peer-tls-cert)"
                        } else {
                            "has no TLS certificate (--peer-tls-cert)"
                        }
                    ));
                }
                None => return Err(format!("--peer-advertise {url:?} is not {wanted}://HOST:PORT")),
            }
        }
        Ok(())
    }
}

/// Node ids: 1 to 64 letters, digits, `.`, `_` or `-` (they appear in keys and events).
///
/// # Errors
/// What is wrong with `id`.
pub fn check_node_id(id: &str) -> Result<(), String> {
    if ferry_codec::handshake::is_node_id(id) {
        Ok(())
    } else {
        Err(format!("node id {id:?}: use 1 to 64 letters, digits, '.', '_' or '-'"))
    }
}

/// `n-` and 12 random hex digits: kept for the process lifetime.
fn random_node_id() -> String {
    let mut bytes = [0u8; 6];
    // No randomness at all would make every node `n-000000000000`; the clock still tells them apart.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        bytes.copy_from_slice(&nanos.as_nanos().to_be_bytes()[10..]);
    }
    let mut id = String::from("n-");
    for b in bytes {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

/// This node's part in the cluster: its view of the others and the task that keeps it.
#[derive(Debug)]
pub struct Cluster {
    config: ClusterConfig,
    client: redis::Client,
    view: RwLock<View>,
    /// What this node last wrote to Redis (tunnel → holding).
    published: Mutex<HashMap<TunnelId, Holding>>,
    /// Links to the other nodes' peer listeners.
    links: peer::Links,
    /// The peer listener's TLS, with [`ClusterConfig::peer_tls`].
    peer_tls: Option<Tls>,
    /// The Redis connection, once [`Cluster::run`] has made it (for the requests' rate checks).
    conn: std::sync::OnceLock<ConnectionManager>,
    /// Fires when the node leaves; the background tasks end.
    leave: CancellationToken,
    /// Fires when [`Cluster::run`] has finished (its entries deleted, or given up on).
    left: CancellationToken,
    running: std::sync::atomic::AtomicBool,
    metrics: Arc<Metrics>,
}

impl Cluster {
    /// A node that has not joined yet: [`Cluster::run`] joins.
    ///
    /// # Errors
    /// The configuration is invalid.
    pub fn new(config: ClusterConfig, metrics: Arc<Metrics>) -> Result<Self, String> {
        config.validate()?;
        let client = redis::Client::open(config.redis.clone()).map_err(|err| format!("Redis: {err}"))?;
        let peer_tls = config
            .peer_tls
            .clone()
            .map(Tls::load_for_peers)
            .transpose()
            .map_err(|err| format!("--peer-tls-cert: {err}"))?;
        let links = peer::Links::new(config.peer_ca.as_deref())?;
        Ok(Self {
            config,
            client,
            view: RwLock::default(),
            links,
            peer_tls,
            conn: std::sync::OnceLock::new(),
            published: Mutex::default(),
            leave: CancellationToken::new(),
            left: CancellationToken::new(),
            running: std::sync::atomic::AtomicBool::new(false),
            metrics,
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.config.node_id
    }

    /// What nodes present to each other.
    pub(crate) fn secret(&self) -> &Secret {
        &self.config.secret
    }

    /// The peer listener's TLS, when it speaks TLS.
    pub(crate) fn peer_tls(&self) -> Option<&Tls> {
        self.peer_tls.as_ref()
    }

    /// Reads the peer listener's certificate and key again (on SIGHUP); on error the old ones
    /// stay in force. Without peer TLS this does nothing.
    pub(crate) fn reload_peer_tls(&self) -> Result<(), TlsError> {
        self.peer_tls.as_ref().map_or(Ok(()), Tls::reload)
    }

    /// A stream to `owner` on which it has opened a stream to one of its agent sessions of
    /// `tunnel`, for `client` (its address and `Authorization` value): write and read it as a
    /// local agent stream. `true` with it when the owner checked the credential.
    ///
    /// # Errors
    /// The node cannot be reached, or has no room or no session for the tunnel (its entry was
    /// stale); nothing reached an agent then.
    pub(crate) async fn open_to(
        &self,
        owner: &Owner,
        tunnel: &TunnelId,
        client: (std::net::IpAddr, Option<&[u8]>),
        session: &ferry_transport::SessionConfig,
    ) -> Result<(ferry_transport::multiplex::Stream, ferry_transport::StreamSlot, bool), PeerError> {
        let opened = self
            .links
            .open(
                &owner.node,
                owner.advertise.as_deref(),
                (tunnel, client),
                &self.config.secret,
                session,
                &self.leave,
            )
            .await?;
        self.metrics.cluster_forward(true);
        Ok(opened)
    }

    /// `node`'s own sessions (of `tunnel`, or all), as listed in its `/connections`.
    ///
    /// # Errors
    /// The node cannot be reached or answered nonsense.
    pub(crate) async fn sessions_of(
        &self,
        node: &str,
        advertise: Option<&str>,
        tunnel: Option<&TunnelId>,
        session: &ferry_transport::SessionConfig,
    ) -> Result<Vec<serde_json::Value>, PeerError> {
        self.links.sessions(node, advertise, tunnel, &self.config.secret, session, &self.leave).await
    }

    /// Takes one request from `tunnel`'s allowance of `rate`, counted in Redis for the whole
    /// cluster (GCRA: one key per tunnel holding its theoretical arrival time, on Redis's clock).
    /// `Some(zero)`: allowed; `Some(wait)`: over the rate, retry after `wait`; `None`: Redis could
    /// not answer (the caller counts on this node alone).
    pub(crate) async fn tunnel_rate(&self, tunnel: &TunnelId, rate: Rate) -> Option<Duration> {
        let mut conn = self.conn.get()?.clone();
        let interval = (rate.per.as_micros() / u128::from(rate.count.max(1))).max(1);
        let burst = interval * u128::from(rate.count.saturating_sub(1));
        let key = self.key(&["rate:", tunnel.as_str()]);
        let mut call = GCRA.key(key);
        call.arg(u64::try_from(interval).unwrap_or(u64::MAX)).arg(u64::try_from(burst).unwrap_or(u64::MAX));
        match self.timed(call.invoke_async::<i64>(&mut conn)).await {
            Ok(wait_us) => Some(Duration::from_micros(u64::try_from(wait_us).unwrap_or(0))),
            Err(err) => {
                self.metrics.cluster_redis_error();
                debug!(%err, "the cluster's rate count failed; counting on this node");
                None
            }
        }
    }

    /// The nodes other than this one that hold sessions for `tunnel`.
    pub fn owners(&self, tunnel: &TunnelId) -> Owners {
        self.read_view().owners(tunnel, Instant::now(), self.config.stale_grace)
    }

    /// Whether another node holds `tunnel` or did within `memory`.
    pub fn recently_held(&self, tunnel: &TunnelId, memory: Duration) -> bool {
        self.read_view().recently_held(tunnel, Instant::now(), memory)
    }

    /// The other nodes as last read: id, advertised URL, tunnels held.
    pub fn nodes(&self) -> Vec<(String, RemoteNode)> {
        self.read_view().nodes().map(|(id, node)| (id.to_owned(), node.clone())).collect()
    }

    /// Whether the view is recent enough to answer for other nodes.
    pub fn is_current(&self) -> bool {
        self.read_view().synced().is_some_and(|at| at.elapsed() < self.config.stale_grace)
    }

    fn read_view(&self) -> std::sync::RwLockReadGuard<'_, View> {
        self.view.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_view(&self) -> std::sync::RwLockWriteGuard<'_, View> {
        self.view.write().unwrap_or_else(|e| e.into_inner())
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut key = self.config.prefix.clone();
        key.push_str(&parts.concat());
        key
    }

    /// Joins and stays in the cluster until [`Cluster::leave`]: refreshes this node's entries,
    /// publishes its changes as they happen, and follows the other nodes'. Redis being down is
    /// logged and retried; local sessions are served all along.
    pub(crate) async fn run(self: Arc<Self>, gateway: Arc<crate::Gateway>) {
        let registry = &gateway.registry;
        self.running.store(true, std::sync::atomic::Ordering::Release);
        let _left = self.left.clone().drop_guard();
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1);
        let mut conn = match ConnectionManager::new_lazy_with_config(self.client.clone(), manager) {
            Ok(conn) => conn,
            Err(err) => {
                warn!(%err, "cannot set up the Redis connection; this node stays out of the cluster");
                return;
            }
        };
        let _ = self.conn.set(conn.clone());
        info!(
            node = %self.config.node_id,
            redis = %self.config.redis.addr(),
            prefix = %self.config.prefix,
            "joining the cluster"
        );
        let resync = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(Arc::clone(&self).follow(Arc::clone(&gateway), Arc::clone(&resync)));
        let mut changes = registry.subscribe();
        let mut tick = tokio::time::interval(self.config.refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut healthy = true;
        loop {
            tokio::select! {
                () = self.leave.cancelled() => break,
                _ = tick.tick() => {}
                () = resync.notified() => {}
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    if let Err(err) = self.publish_changes(&mut conn, registry).await {
                        self.failed("publishing a change", &err, &mut healthy);
                    }
                    continue;
                }
            }
            match self.refresh(&mut conn, registry).await {
                Ok(nodes) => {
                    if !healthy {
                        info!(nodes, "Redis reachable again; this node's tunnels are registered");
                        healthy = true;
                    }
                }
                Err(err) => self.failed("refreshing", &err, &mut healthy),
            }
            // Waiters re-check: the view changed, or grew older (and past its grace, it no longer
            // answers for other nodes).
            registry.touch();
        }
        if let Err(err) = self.depart(&mut conn).await {
            debug!(%err, "could not take this node out of Redis; its entries lapse after the TTL");
        }
    }

    fn failed(&self, doing: &str, err: &redis::RedisError, healthy: &mut bool) {
        self.metrics.cluster_redis_error();
        if std::mem::take(healthy) {
            warn!(%err, "Redis unreachable while {doing}: local sessions are served, other nodes' are known as last read");
        } else {
            debug!(%err, "Redis still unreachable while {doing}");
        }
    }

    /// Leaves the cluster: this node's entries are deleted and the others told (waits for that,
    /// a few seconds at most when Redis is away: the entries lapse by themselves then).
    pub async fn leave(&self) {
        self.leave.cancel();
        if self.running.load(std::sync::atomic::Ordering::Acquire) {
            let _ = tokio::time::timeout(REDIS_TIMEOUT * 2, self.left.cancelled()).await;
        }
    }

    /// What this node holds now: tunnels with at least one session taking requests.
    fn local_holdings(registry: &Registry) -> HashMap<TunnelId, Holding> {
        let mut holdings: HashMap<TunnelId, Holding> = HashMap::new();
        for session in registry.all().iter().filter(|s| s.accepts_requests()) {
            let holding = holdings.entry(session.tunnel_id().clone()).or_default();
            holding.sessions += 1;
            holding.healthy += u32::from(!session.is_unhealthy());
        }
        holdings
    }

    /// What differs between what was last published and `now`: (tunnel, holding), no sessions
    /// for a tunnel gone.
    fn changes_since_published(&self, now: &HashMap<TunnelId, Holding>) -> Vec<(TunnelId, Holding)> {
        let published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        let gone =
            published.keys().filter(|t| !now.contains_key(*t)).map(|t| (t.clone(), Holding::default()));
        let new = now.iter().filter(|(t, h)| published.get(*t) != Some(h)).map(|(t, h)| (t.clone(), *h));
        gone.chain(new).collect()
    }

    /// Adds an event per change to `pipe`.
    fn announce(&self, pipe: &mut redis::Pipeline, changed: &[(TunnelId, Holding)]) {
        let (id, events) = (&self.config.node_id, self.key(&["events"]));
        for (tunnel, holding) in changed {
            pipe.publish(&events, format!("{id} {tunnel} {}", holding.encode())).ignore();
        }
    }

    /// Writes and announces what changed since the last write.
    async fn publish_changes(
        &self,
        conn: &mut ConnectionManager,
        registry: &Registry,
    ) -> redis::RedisResult<()> {
        let now = Self::local_holdings(registry);
        let changed = self.changes_since_published(&now);
        if changed.is_empty() {
            return Ok(());
        }
        let tunnels_key = self.key(&["tunnels:", &self.config.node_id]);
        let mut pipe = redis::pipe();
        for (tunnel, holding) in &changed {
            if holding.sessions == 0 {
                pipe.hdel(&tunnels_key, tunnel.as_str()).ignore();
            } else {
                pipe.hset(&tunnels_key, tunnel.as_str(), holding.encode()).ignore();
            }
        }
        pipe.pexpire(&tunnels_key, millis(self.config.ttl)).ignore();
        self.announce(&mut pipe, &changed);
        self.timed(pipe.query_async::<()>(conn)).await?;
        tracing::trace!(node = %self.config.node_id, changed = changed.len(), "tunnel changes published");
        *self.published.lock().unwrap_or_else(|e| e.into_inner()) = now;
        Ok(())
    }

    /// Rewrites this node's entries whole and reads everyone's; returns how many nodes are live.
    async fn refresh(&self, conn: &mut ConnectionManager, registry: &Registry) -> redis::RedisResult<usize> {
        let started = Instant::now();
        let (secs, micros): (i64, i64) = self.timed(redis::cmd("TIME").query_async(conn)).await?;
        let now_ms = secs * 1000 + micros / 1000;
        let ttl = millis(self.config.ttl);
        let id = &self.config.node_id;
        let (nodes_key, node_key, tunnels_key) =
            (self.key(&["nodes"]), self.key(&["node:", id]), self.key(&["tunnels:", id]));
        let holdings = Self::local_holdings(registry);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .zadd(&nodes_key, id, now_ms + ttl)
            .ignore()
            .zrembyscore(&nodes_key, "-inf", format!("({now_ms}"))
            .ignore()
            .hset(&node_key, "advertise", self.config.advertise.as_deref().unwrap_or(""))
            .ignore()
            .pexpire(&node_key, ttl)
            .ignore()
            .del(&tunnels_key)
            .ignore();
        if !holdings.is_empty() {
            let fields: Vec<(&str, String)> =
                holdings.iter().map(|(t, h)| (t.as_str(), h.encode())).collect();
            pipe.hset_multiple(&tunnels_key, &fields).ignore().pexpire(&tunnels_key, ttl).ignore();
        }
        // Changes since the last publication (sessions that came while Redis was away, or before
        // this node's first refresh) are announced too.
        let changed = self.changes_since_published(&holdings);
        self.announce(&mut pipe, &changed);
        self.timed(pipe.query_async::<()>(conn)).await?;
        *self.published.lock().unwrap_or_else(|e| e.into_inner()) = holdings;

        let ids: Vec<String> = self.timed(conn.zrangebyscore(&nodes_key, now_ms, "+inf")).await?;
        let others: Vec<&String> = ids.iter().filter(|other| *other != id).collect();
        let mut pipe = redis::pipe();
        for other in &others {
            pipe.hget(self.key(&["node:", other]), "advertise").hgetall(self.key(&["tunnels:", other]));
        }
        let replies: Vec<redis::Value> =
            if others.is_empty() { Vec::new() } else { self.timed(pipe.query_async(conn)).await? };
        let mut nodes = HashMap::new();
        for (other, pair) in others.iter().zip(replies.chunks(2)) {
            let [advertise, tunnels] = pair else { continue };
            let advertise: Option<String> = redis::from_redis_value_ref(advertise).unwrap_or_default();
            let tunnels: HashMap<String, String> = redis::from_redis_value_ref(tunnels).unwrap_or_default();
            let tunnels = tunnels
                .into_iter()
                .filter_map(|(t, h)| Some((t.parse::<TunnelId>().ok()?, Holding::decode(&h)?)))
                .collect();
            nodes.insert(
                (*other).clone(),
                RemoteNode { advertise: advertise.filter(|a| !a.is_empty()), tunnels },
            );
        }
        self.write_view().replace(nodes, Instant::now());
        self.metrics.cluster_synced(ids.len(), started.elapsed());
        Ok(ids.len())
    }

    /// Takes this node out of Redis and tells the others.
    async fn depart(&self, conn: &mut ConnectionManager) -> redis::RedisResult<()> {
        let id = &self.config.node_id;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .zrem(self.key(&["nodes"]), id)
            .ignore()
            .del(self.key(&["node:", id]))
            .ignore()
            .del(self.key(&["tunnels:", id]))
            .ignore()
            .publish(self.key(&["events"]), format!("{id} - bye"))
            .ignore();
        self.timed(pipe.query_async::<()>(conn)).await?;
        info!(node = %id, "left the cluster");
        Ok(())
    }

    /// Follows the events channel until the node leaves, reconnecting when Redis goes away; every
    /// (re)subscription asks the main loop for a full read, since events may have been missed.
    async fn follow(self: Arc<Self>, gateway: Arc<crate::Gateway>, resync: Arc<tokio::sync::Notify>) {
        let channel = self.key(&["events"]);
        let mut delay = self.config.refresh / 4;
        while !self.leave.is_cancelled() {
            let subscribed = async {
                let mut pubsub = self.timed(self.client.get_async_pubsub()).await?;
                self.timed(pubsub.subscribe(&channel)).await?;
                redis::RedisResult::Ok(pubsub)
            };
            let pubsub = tokio::select! {
                () = self.leave.cancelled() => return,
                result = subscribed => result,
            };
            let mut pubsub = match pubsub {
                Ok(pubsub) => pubsub,
                Err(err) => {
                    debug!(%err, "cannot subscribe to cluster events; retrying");
                    tokio::select! {
                        () = self.leave.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(self.config.refresh);
                    continue;
                }
            };
            delay = self.config.refresh / 4;
            resync.notify_one();
            let mut messages = pubsub.on_message();
            loop {
                let message = tokio::select! {
                    () = self.leave.cancelled() => return,
                    message = messages.next() => message,
                };
                let Some(message) = message else { break };
                let Ok(payload) = message.get_payload::<String>() else { continue };
                tracing::trace!(node = %self.config.node_id, payload, "cluster event");
                match self.apply_event(&payload) {
                    Applied::Nothing => {}
                    Applied::Changed => gateway.registry.touch(),
                    // A node not read yet: its entry (how to reach it) comes with a full read.
                    Applied::NewNode => {
                        gateway.registry.touch();
                        resync.notify_one();
                    }
                }
            }
            debug!("cluster events connection closed; resubscribing");
        }
    }

    /// Applies one event of another node to the view.
    fn apply_event(&self, payload: &str) -> Applied {
        let mut words = payload.split(' ');
        let (Some(node), Some(tunnel), Some(what), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            debug!(payload, "ignoring a malformed cluster event");
            return Applied::Nothing;
        };
        if node == self.config.node_id || check_node_id(node).is_err() {
            return Applied::Nothing;
        }
        let now = Instant::now();
        if tunnel == "-" && what == "bye" {
            return if self.write_view().remove_node(node, now) {
                Applied::Changed
            } else {
                Applied::Nothing
            };
        }
        let (Ok(tunnel), Some(holding)) = (tunnel.parse::<TunnelId>(), Holding::decode(what)) else {
            debug!(payload, "ignoring a malformed cluster event");
            return Applied::Nothing;
        };
        let mut view = self.write_view();
        let known = view.nodes().any(|(id, _)| id == node);
        match view.update(node, tunnel, holding, now) {
            _ if !known && holding.sessions > 0 => Applied::NewNode,
            true => Applied::Changed,
            false => Applied::Nothing,
        }
    }

    async fn timed<T>(&self, call: impl Future<Output = redis::RedisResult<T>>) -> redis::RedisResult<T> {
        match tokio::time::timeout(REDIS_TIMEOUT, call).await {
            Ok(result) => result,
            Err(_) => Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "Redis did not answer in time",
            ))),
        }
    }
}

/// GCRA in one step: KEYS[1] holds the theoretical arrival time (µs, Redis's clock); ARGV[1] is
/// the emission interval and ARGV[2] the burst tolerance, in µs. Returns 0 when the request is
/// allowed (and counted), else the µs to wait.
static GCRA: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
if tat - burst > now then return tat - burst - now end
local next_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1000)
return 0
",
    )
});

/// What an event did to the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applied {
    Nothing,
    Changed,
    /// It named a node the view did not have.
    NewNode,
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> Cluster {
        let config = ClusterConfig {
            node_id: "me".into(),
            ..ClusterConfig::new("redis://127.0.0.1:1/0", secret()).unwrap()
        };
        Cluster::new(config, Arc::default()).unwrap()
    }

    fn secret() -> Secret {
        Secret::from_text("cluster secret").unwrap()
    }

    const T: &str = "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_web";

    #[test]
    fn settings_are_checked() {
        assert!(ClusterConfig::new("http://example.com", secret()).is_err());
        let good = ClusterConfig::new("redis://127.0.0.1:6379/2", secret()).unwrap();
        assert!(
            ClusterConfig { advertise: Some("http://10.0.0.2:3001".into()), ..good.clone() }
                .validate()
                .is_ok()
        );
        for url in ["http://[::1]:3001/", "http://node-b.internal:3001"] {
            assert!(
                ClusterConfig { advertise: Some(url.into()), ..good.clone() }.validate().is_ok(),
                "{url}"
            );
        }
        let tls = TlsFiles { cert: "c.pem".into(), key: "k.pem".into() };
        assert!(
            ClusterConfig {
                advertise: Some("https://node-b:3001".into()),
                peer_tls: Some(tls),
                ..good.clone()
            }
            .validate()
            .is_ok()
        );
        assert!(good.validate().is_ok());
        assert!(good.node_id.starts_with("n-") && good.node_id.len() == 14, "{}", good.node_id);
        for (bad, what) in [
            (ClusterConfig { node_id: "a b".into(), ..good.clone() }, "node id"),
            (ClusterConfig { node_id: String::new(), ..good.clone() }, "node id"),
            (ClusterConfig { prefix: String::new(), ..good.clone() }, "prefix"),
            (ClusterConfig { ttl: good.refresh, ..good.clone() }, "TTL"),
            (ClusterConfig { stale_grace: Duration::from_secs(1), ..good.clone() }, "grace"),
            (ClusterConfig { advertise: Some("node-b:4000".into()), ..good.clone() }, "peer-advertise"),
            (ClusterConfig { advertise: Some("http://node-b".into()), ..good.clone() }, "peer-advertise"),
            (ClusterConfig { advertise: Some("https://node-b:4000".into()), ..good.clone() }, "no TLS"),
            (ClusterConfig { advertise: Some("http://a@node-b:4000".into()), ..good.clone() }, "HOST:PORT"),
            (ClusterConfig { advertise: Some("http://node-b:0".into()), ..good.clone() }, "HOST:PORT"),
            (ClusterConfig { advertise: Some("http://::1:4000".into()), ..good.clone() }, "HOST:PORT"),
            (
                ClusterConfig {
                    advertise: Some("http://node-b:4000".into()),
                    peer_tls: Some(TlsFiles { cert: "c.pem".into(), key: "k.pem".into() }),
                    ..good.clone()
                },
                "speaks TLS",
            ),
        ] {
            let err = bad.validate().unwrap_err();
            assert!(err.contains(what), "{err}");
        }
    }

    #[test]
    fn events_of_other_nodes_update_the_view_and_bad_ones_are_ignored() {
        let cluster = cluster();
        cluster.write_view().replace(HashMap::new(), Instant::now());
        let tunnel: TunnelId = T.parse().unwrap();
        assert_eq!(cluster.apply_event(&format!("b {T} 2:1")), Applied::NewNode);
        assert_eq!(cluster.apply_event(&format!("b {T} 2:2")), Applied::Changed);
        assert_eq!(cluster.apply_event(&format!("b {T} 2:2")), Applied::Nothing);
        let Owners::Known(owners) = cluster.owners(&tunnel) else { panic!("known") };
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].holding, Holding { sessions: 2, healthy: 2 });
        for bad in [
            format!("me {T} 1:1"),
            format!("b {T} 1:2"),
            format!("b {T} 1:1 extra"),
            "b not-a-tunnel 1:1".to_owned(),
            format!("b\u{0} {T} 1:1"),
            String::new(),
            "b - hello".to_owned(),
        ] {
            assert_eq!(cluster.apply_event(&bad), Applied::Nothing, "{bad:?}");
        }
        assert_eq!(cluster.apply_event("b - bye"), Applied::Changed);
        assert_eq!(cluster.owners(&tunnel), Owners::Known(vec![]));
        assert!(cluster.recently_held(&tunnel, Duration::from_secs(60)));
    }
}
