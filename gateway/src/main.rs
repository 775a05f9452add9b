//! `gateway`: the public side of a ferry tunnel. Parses flags, sets up logging and signals, and
//! runs the library.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ferry_codec::TunnelId;
use ferry_gateway::auth::AuthSource;
use ferry_gateway::cluster::ClusterConfig;
use ferry_gateway::config::{TunnelOverrides, parse_domain, parse_tunnel_override};
use ferry_gateway::limits::Rate;
use ferry_gateway::tls::TlsFiles;
use ferry_gateway::{Gateway, GatewayConfig};
use ferry_transport::cli::{load_secret, parse_size};
use tokio_util::sync::CancellationToken;

/// Public gateway of a ferry tunnel: serves HTTP on one port and forwards requests to the agents
/// that dial in to `/ws` on the same port.
///
/// Logging is controlled by RUST_LOG (default `info`), e.g. RUST_LOG=ferry_gateway=debug.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, args_override_self = true)]
struct Args {
    /// TOML file with any of these flags as keys (`listen = ":3000"`, `tls-cert = "..."`,
    /// `[[tunnel-override]]` tables); flags given on the command line win over the file.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,

    /// Address to listen on: `:PORT` (all IPv4 interfaces), `HOST:PORT`, or `[::]:PORT`.
    #[arg(long, default_value = ":3000", value_parser = parse_listen, value_name = "ADDR")]
    listen: SocketAddr,

    /// Route requests for `{label}.DOMAIN` to the tunnel whose DNS label is `label`
    /// (`agent-{uuid}-{purpose}`). Without it, only path routing (`/t/{tunnel_id}/...`) works.
    #[arg(long, value_parser = parse_domain, value_name = "DOMAIN")]
    domain: Option<String>,

    /// Most requests in flight at once on one agent session.
    #[arg(long, default_value_t = ferry_transport::SessionConfig::default().max_streams, value_name = "N")]
    max_streams: usize,

    /// How long the agent may take to return a response head before the client gets 504.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    response_timeout: Duration,

    /// Threads serving the port: `auto` (one per core this process may use) or a number. Each
    /// accepts connections of its own; 1 has the least overhead per request on a box shared with
    /// other busy processes.
    #[arg(long, default_value = "auto", value_name = "N|auto")]
    threads: ferry_transport::Threads,

    /// Log lines as `text` (for people) or `json` (one object per line, for log collectors).
    #[arg(long, default_value = "text", value_parser = ferry_transport::cli::parse_log_format, value_name = "text|json")]
    log_format: ferry_transport::cli::LogFormat,

    /// How long a shutdown (SIGINT/SIGTERM) waits for requests in flight.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    drain_timeout: Duration,

    /// File holding one secret every agent must prove it holds (or set FERRY_SECRET). Secrets
    /// are never taken from the command line.
    #[arg(long, value_name = "PATH", conflicts_with = "auth_file")]
    secret_file: Option<PathBuf>,

    /// TOML file with per-tunnel secrets (`[tunnels.<id>] secrets = ["..."]`, two while
    /// rotating). Reloaded on SIGHUP; sessions using a removed secret are closed.
    #[arg(long, value_name = "PATH")]
    auth_file: Option<PathBuf>,

    /// File holding the bearer token for the admin endpoints (or set FERRY_ADMIN_TOKEN).
    #[arg(long, value_name = "PATH")]
    admin_token_file: Option<PathBuf>,

    /// Require the admin token from loopback clients too (use behind a reverse proxy on the
    /// same host, where every client looks local).
    #[arg(long)]
    no_loopback_admin: bool,

    /// How long a request waits for a reconnecting agent before 503 `tunnel_offline`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pending_timeout: Duration,

    /// Public TCP ports any tunnel may get for its `agent --tcp` endpoints (`20000-20999`, or
    /// one port); off unless set (ports reserved in the auth file work without it). They listen
    /// on the --listen address.
    #[arg(long, value_parser = ferry_gateway::tcp::parse_port_range, value_name = "LOW-HIGH")]
    tcp_ports: Option<std::ops::RangeInclusive<u16>>,

    /// How long a TCP port stays reserved for its tunnel after the agent's session ended, so a
    /// reconnecting agent gets the same port back.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    tcp_lease: Duration,

    /// Serve HTTPS (and wss:// for agents) with this PEM certificate chain, server certificate
    /// first. Reloaded on SIGHUP.
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1). Reloaded on SIGHUP.
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// How long a client may take to send a request head (and, for HTTP/1.1, how long a
    /// keep-alive connection may sit idle between requests).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    header_read_timeout: Duration,

    /// How long the agent may take to accept a request's stream before 504 `agent_unresponsive`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    stream_open_timeout: Duration,

    /// Largest request head in bytes before 431 (e.g. 64KiB).
    #[arg(long, default_value = "64KiB", value_parser = parse_size, value_name = "SIZE")]
    max_header_bytes: u64,

    /// Most header fields in a request before 431.
    #[arg(long, default_value_t = ferry_gateway::config::MAX_HEADERS, value_name = "N")]
    max_headers: usize,

    /// Longest request target (path and query) in bytes before 414.
    #[arg(long, default_value_t = ferry_gateway::config::MAX_URI_LEN, value_name = "BYTES")]
    max_uri_length: usize,

    /// Largest request body (e.g. 100MiB) before 413; off by default.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    max_request_body: Option<u64>,

    /// Most requests in flight at once for one tunnel (all its agents) before 503.
    #[arg(long, default_value_t = ferry_gateway::config::MAX_TUNNEL_REQUESTS, value_name = "N")]
    max_tunnel_requests: usize,

    /// Most requests in flight at once from one client (IPv4 address or IPv6 /64) to one tunnel
    /// before 429 `client_at_capacity`.
    #[arg(long, default_value_t = ferry_gateway::config::MAX_CLIENT_REQUESTS, value_name = "N")]
    max_client_requests: usize,

    /// How long a response may wait on a client that takes none of it before the connection is
    /// closed and the request's stream reset.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    send_idle_timeout: Duration,

    /// Kernel send buffer of each public connection (e.g. 512KiB); by default the kernel sizes
    /// it (up to 4 MiB each on Linux). Bounding it bounds what clients that stop reading can
    /// park in the gateway host's memory, so their send-idle deadline is met on time.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    client_send_buffer: Option<u64>,

    /// How long a client may pause in the middle of its request body before the request is cut
    /// (408) and the upstream's request aborted.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    body_idle_timeout: Duration,

    /// Most open connections from one client (IPv4 address or IPv6 /64); more are closed at accept.
    #[arg(long, default_value_t = ferry_gateway::config::MAX_CONNECTIONS_PER_ADDRESS, value_name = "N")]
    max_connections_per_address: usize,

    /// Most agent WebSocket connections still in their handshake; more get 503.
    #[arg(long, default_value_t = ferry_gateway::config::MAX_HANDSHAKES, value_name = "N")]
    max_handshakes: usize,

    /// Settings for one tunnel instead of the gateway-wide ones:
    /// TUNNEL_ID:response-timeout=300s,max-request-body=1GiB (repeatable).
    #[arg(long, value_parser = parse_tunnel_override, value_name = "ID:SETTINGS")]
    tunnel_override: Vec<(TunnelId, TunnelOverrides)>,

    /// Request rate per tunnel, all clients together (e.g. 100/s, 6000/m); over it: 429.
    #[arg(long, value_parser = Rate::parse, value_name = "RATE")]
    tunnel_rate: Option<Rate>,

    /// Request rate per client address, all tunnels together (e.g. 20/s); over it: 429.
    #[arg(long, value_parser = Rate::parse, value_name = "RATE")]
    client_rate: Option<Rate>,

    /// How often both sides send a heartbeat on the control stream; three missed ones end the
    /// session.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    heartbeat_interval: Duration,

    /// Join a cluster of gateways through Redis (`redis://HOST:PORT/DB`, `rediss://` for TLS; or
    /// set FERRY_CLUSTER). A password goes in FERRY_REDIS_PASSWORD or --redis-password-file, or
    /// in the URL when it comes from FERRY_CLUSTER or the config file, never on the command line.
    #[arg(long, env = "FERRY_CLUSTER", value_name = "URL", hide_env_values = true)]
    cluster: Option<String>,

    /// File holding the Redis password (or set FERRY_REDIS_PASSWORD).
    #[arg(long, value_name = "PATH", requires = "cluster")]
    redis_password_file: Option<PathBuf>,

    /// Prefix of the cluster's keys and channel in Redis (several clusters can share one Redis).
    #[arg(long, default_value = ferry_gateway::cluster::PREFIX, value_name = "PREFIX", requires = "cluster")]
    cluster_prefix: String,

    /// This node's id in the cluster (letters, digits, '.', '_', '-'); default: a random one,
    /// kept for the life of the process.
    #[arg(long, value_name = "ID", requires = "cluster")]
    node_id: Option<String>,

    /// File holding the secret the nodes of the cluster present to each other (or set
    /// FERRY_CLUSTER_SECRET); the same on every node.
    #[arg(long, value_name = "PATH", requires = "cluster")]
    cluster_secret_file: Option<PathBuf>,

    /// Where other nodes connect to reach this node's agents (`:3001`, `10.0.0.2:3001`). Without
    /// it this node forwards to others but takes no forwards.
    #[arg(long, value_parser = parse_listen, value_name = "ADDR", requires = "cluster")]
    peer_listen: Option<SocketAddr>,

    /// How the other nodes reach the peer listener (`http://10.0.0.2:3001`, `https://` with
    /// --peer-tls-cert); default: the --peer-listen address when it names one host.
    #[arg(long, value_name = "URL", requires = "peer_listen")]
    peer_advertise: Option<String>,

    /// PEM certificate chain for the peer listener: links from other nodes are then TLS. The
    /// certificate names the host or address in --peer-advertise. Reloaded on SIGHUP.
    #[arg(long, value_name = "PATH", requires_all = ["peer_listen", "peer_tls_key"])]
    peer_tls_cert: Option<PathBuf>,

    /// PEM private key of --peer-tls-cert. Reloaded on SIGHUP.
    #[arg(long, value_name = "PATH", requires = "peer_tls_cert")]
    peer_tls_key: Option<PathBuf>,

    /// PEM file of the CA certificates that sign the nodes' peer certificates; without it,
    /// `https://` peers are checked against the system's roots.
    #[arg(long, value_name = "PATH", requires = "cluster")]
    peer_ca: Option<PathBuf>,

    /// How long a node that stopped refreshing (killed, cut off from Redis) still counts as
    /// alive; it refreshes every third of this.
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration, value_name = "DURATION", requires = "cluster")]
    cluster_ttl: Duration,
}

/// The keys a config file may have: every flag, in kebab-case, with its type. Only for checking
/// the file (unknown keys and wrong types are errors naming the line); the values reach the
/// flag parser through [`ferry_transport::cli::args_with_config_file`].
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
#[allow(dead_code)]
struct ConfigFile {
    listen: Option<String>,
    domain: Option<String>,
    max_streams: Option<u64>,
    response_timeout: Option<String>,
    threads: Option<toml::Value>,
    log_format: Option<String>,
    drain_timeout: Option<String>,
    secret_file: Option<PathBuf>,
    auth_file: Option<PathBuf>,
    admin_token_file: Option<PathBuf>,
    no_loopback_admin: Option<bool>,
    pending_timeout: Option<String>,
    tcp_ports: Option<String>,
    tcp_lease: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    header_read_timeout: Option<String>,
    stream_open_timeout: Option<String>,
    max_header_bytes: Option<toml::Value>,
    max_headers: Option<u64>,
    max_uri_length: Option<u64>,
    max_request_body: Option<toml::Value>,
    max_tunnel_requests: Option<u64>,
    max_client_requests: Option<u64>,
    send_idle_timeout: Option<String>,
    client_send_buffer: Option<toml::Value>,
    body_idle_timeout: Option<String>,
    max_connections_per_address: Option<u64>,
    max_handshakes: Option<u64>,
    tunnel_override: Option<Vec<TunnelOverrideTable>>,
    tunnel_rate: Option<String>,
    client_rate: Option<String>,
    heartbeat_interval: Option<String>,
    cluster: Option<String>,
    redis_password_file: Option<PathBuf>,
    cluster_prefix: Option<String>,
    node_id: Option<String>,
    cluster_secret_file: Option<PathBuf>,
    peer_listen: Option<String>,
    peer_advertise: Option<String>,
    peer_tls_cert: Option<PathBuf>,
    peer_tls_key: Option<PathBuf>,
    peer_ca: Option<PathBuf>,
    cluster_ttl: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
#[allow(dead_code)]
struct TunnelOverrideTable {
    tunnel_id: String,
    response_timeout: Option<String>,
    max_request_body: Option<toml::Value>,
}

/// Renders a `[[tunnel-override]]` table as the flag's `ID:key=value,...`.
fn render_table(key: &str, table: &toml::Table) -> Option<String> {
    if key != "tunnel-override" {
        return None;
    }
    let id = table.get("tunnel-id")?.as_str()?;
    let mut settings = Vec::new();
    for (k, v) in table.iter().filter(|(k, _)| *k != "tunnel-id") {
        let value = match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(n) => n.to_string(),
            _ => return None,
        };
        settings.push(format!("{k}={value}"));
    }
    Some(format!("{id}:{}", settings.join(",")))
}

/// Parses `:PORT`, `HOST:PORT`, `IP:PORT` and `[IPv6]:PORT`.
fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    if let Some(port) = text.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| format!("{port:?} is not a port number"))?;
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    text.to_socket_addrs()
        .map_err(|err| format!("{text:?} is not HOST:PORT ({err})"))?
        .next()
        .ok_or_else(|| format!("{text:?} resolves to no address"))
}

impl Args {
    fn into_config(self) -> anyhow::Result<GatewayConfig> {
        let mut config = GatewayConfig { domain: self.domain, ..GatewayConfig::default() };
        config.session = ferry_transport::SessionConfig::with_max_streams(self.max_streams);
        config.session.validate().map_err(anyhow::Error::msg).context("--max-streams")?;
        config.response_timeout = self.response_timeout;
        config.drain_timeout = self.drain_timeout;
        config.pending_timeout = self.pending_timeout;
        config.tcp = ferry_gateway::tcp::TcpConfig {
            ports: self.tcp_ports.clone(),
            lease: self.tcp_lease,
            bind: self.listen.ip(),
        };
        anyhow::ensure!(!self.heartbeat_interval.is_zero(), "--heartbeat-interval must be positive");
        config.heartbeat_interval = self.heartbeat_interval;
        let shared = load_secret(self.secret_file.as_deref(), "--secret-file", "FERRY_SECRET")
            .context("agent secret")?;
        config.auth = match (shared, self.auth_file) {
            (Some(_), Some(_)) => anyhow::bail!("FERRY_SECRET and --auth-file exclude each other"),
            (Some(secret), None) => AuthSource::Shared(secret),
            (None, Some(path)) => AuthSource::File(path),
            (None, None) => AuthSource::Open,
        };
        config.admin_token =
            load_secret(self.admin_token_file.as_deref(), "--admin-token-file", "FERRY_ADMIN_TOKEN")
                .context("admin token")?;
        config.admin_loopback = !self.no_loopback_admin;
        config.header_read_timeout = self.header_read_timeout;
        config.stream_open_timeout = self.stream_open_timeout;
        config.max_header_bytes = usize::try_from(self.max_header_bytes)
            .ok()
            .filter(|n| (1024..=ferry_codec::frame::MAX_HEAD_LEN / 2).contains(n))
            .context("--max-header-bytes must be between 1KiB and 128KiB")?;
        anyhow::ensure!(self.max_headers > 0, "--max-headers must be positive");
        config.max_headers = self.max_headers;
        anyhow::ensure!(self.max_uri_length > 0, "--max-uri-length must be positive");
        config.max_uri_len = self.max_uri_length;
        config.max_request_body = self.max_request_body;
        anyhow::ensure!(self.max_tunnel_requests > 0, "--max-tunnel-requests must be positive");
        config.max_tunnel_requests = self.max_tunnel_requests;
        anyhow::ensure!(self.max_client_requests > 0, "--max-client-requests must be positive");
        config.max_client_requests = self.max_client_requests;
        anyhow::ensure!(!self.send_idle_timeout.is_zero(), "--send-idle-timeout must be positive");
        config.send_idle_timeout = self.send_idle_timeout;
        config.client_send_buffer = self
            .client_send_buffer
            .map(|size| {
                usize::try_from(size)
                    .ok()
                    .filter(|n| (4096..=64 << 20).contains(n))
                    .context("--client-send-buffer must be between 4KiB and 64MiB")
            })
            .transpose()?;
        anyhow::ensure!(!self.body_idle_timeout.is_zero(), "--body-idle-timeout must be positive");
        config.body_idle_timeout = self.body_idle_timeout;
        anyhow::ensure!(
            self.max_connections_per_address > 0,
            "--max-connections-per-address must be positive"
        );
        config.max_connections_per_address = self.max_connections_per_address;
        anyhow::ensure!(self.max_handshakes > 0, "--max-handshakes must be positive");
        config.max_handshakes = self.max_handshakes;
        config.tunnel_overrides = self.tunnel_override.into_iter().collect();
        config.tunnel_rate = self.tunnel_rate;
        config.client_rate = self.client_rate;
        config.tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            _ => None,
        };
        config.cluster = self
            .cluster
            .as_deref()
            .map(|url| {
                anyhow::ensure!(
                    self.cluster_ttl >= Duration::from_millis(300),
                    "--cluster-ttl must be at least 300ms (the node refreshes every third of it)"
                );
                let mut cluster = cluster_config(url, self.redis_password_file.as_deref(), self.cluster_secret_file.as_deref())?;
                cluster.prefix = self.cluster_prefix.clone();
                if let Some(id) = &self.node_id {
                    cluster.node_id = id.clone();
                }
                cluster.peer_tls = match (&self.peer_tls_cert, &self.peer_tls_key) {
                    (Some(cert), Some(key)) => Some(TlsFiles { cert: cert.clone(), key: key.clone() }),
                    _ => None,
                };
                cluster.peer_ca = self.peer_ca.clone();
                let scheme = if cluster.peer_tls.is_some() { "https" } else { "http" };
                cluster.advertise = match (&self.peer_advertise, self.peer_listen) {
                    (Some(url), _) => Some(url.clone()),
                    (None, Some(addr)) if !addr.ip().is_unspecified() => Some(format!("{scheme}://{addr}")),
                    (None, Some(addr)) => anyhow::bail!(
                        "--peer-listen {addr} listens on every interface: say with --peer-advertise how other nodes reach it"
                    ),
                    (None, None) => None,
                };
                cluster.ttl = self.cluster_ttl;
                cluster.refresh = self.cluster_ttl / 3;
                cluster.stale_grace = cluster.stale_grace.max(self.cluster_ttl);
                cluster.validate().map_err(anyhow::Error::msg)?;
                anyhow::Ok(cluster)
            })
            .transpose()
            .context("--cluster")?;
        Ok(config)
    }
}

/// The cluster settings from the flags: the Redis password and the cluster secret from where
/// they may come.
fn cluster_config(
    url: &str,
    password_file: Option<&std::path::Path>,
    secret_file: Option<&std::path::Path>,
) -> anyhow::Result<ClusterConfig> {
    let secret = load_secret(secret_file, "--cluster-secret-file", "FERRY_CLUSTER_SECRET")
        .context("cluster secret")?
        .context("the nodes of a cluster prove themselves to each other with a shared secret: set FERRY_CLUSTER_SECRET or --cluster-secret-file")?;
    let mut config = ClusterConfig::new(url, secret).map_err(anyhow::Error::msg)?;
    let in_url = config.redis.redis_settings().password().is_some();
    if in_url && std::env::args().any(|arg| arg.contains(url)) {
        anyhow::bail!(
            "the Redis URL on the command line holds a password, which every user of this machine can read: \
             put it in FERRY_REDIS_PASSWORD or --redis-password-file (or the whole URL in FERRY_CLUSTER)"
        );
    }
    let password = load_secret(password_file, "--redis-password-file", "FERRY_REDIS_PASSWORD")
        .context("Redis password")?;
    if let Some(password) = password {
        anyhow::ensure!(
            !in_url,
            "the Redis password is given twice: in the URL and in a file or FERRY_REDIS_PASSWORD"
        );
        let password = std::str::from_utf8(password.expose()).context("the Redis password is not UTF-8")?;
        let settings = config.redis.redis_settings().clone().set_password(password);
        config.redis = config.redis.set_redis_settings(settings);
    }
    Ok(config)
}

fn main() -> anyhow::Result<()> {
    let argv = ferry_transport::cli::args_with_config_file::<ConfigFile>(
        std::env::args_os().collect(),
        render_table,
    )?;
    let args = Args::parse_from(argv);
    // The main thread's runtime is single-threaded; other threads get theirs in `spawn_shards`.
    let runtime = ferry_transport::runtime(1).context("cannot start the async runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    ferry_transport::cli::init_logging(args.log_format);
    let mut args = args;
    let listen = args.listen;
    // Bound before the configuration is built, so that `--peer-listen 127.0.0.1:0` advertises
    // the port it got.
    let peers = match args.peer_listen {
        Some(addr) => {
            let peers = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for other nodes on {addr}"))?;
            args.peer_listen = Some(peers.local_addr().context("the peer listener's address")?);
            Some(peers)
        }
        None => None,
    };
    let threads = args.threads.get();
    let config = args.into_config()?;
    let auth_file = matches!(config.auth, AuthSource::File(_));
    let tls = config.tls.is_some() || config.cluster.as_ref().is_some_and(|c| c.peer_tls.is_some());
    let mut listeners =
        ferry_gateway::bind(listen, threads).with_context(|| format!("cannot listen on {listen}"))?;
    let listener = listeners.remove(0);
    let shutdown = CancellationToken::new();
    tokio::spawn(
        ferry_transport::cli::cancel_on_signal(shutdown.clone(), "shutting down")
            .context("cannot listen for SIGINT and SIGTERM")?,
    );
    let gateway = Gateway::new(config, shutdown).context("cannot start the gateway")?;
    // Always handled: SIGHUP's default action would end the process.
    #[cfg(unix)]
    {
        let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot listen for SIGHUP (which reloads the auth file and certificate)")?;
        tokio::spawn(reload_on_sighup(std::sync::Arc::clone(&gateway), hangups, auth_file, tls));
    }
    if let Some(peers) = peers {
        if let Ok(addr) = peers.local_addr() {
            tracing::info!(%addr, "peer listener ready for other nodes");
        }
        let serving = std::sync::Arc::clone(&gateway);
        tokio::spawn(async move { serving.serve_peers(peers).await });
    }
    let shards = gateway.spawn_shards(listeners).context("cannot start the gateway's threads")?;
    tracing::info!(threads = shards.len() + 1, "threads serving the port");
    gateway.serve(listener).await;
    shards.stop();
    Ok(())
}

/// Reloads the auth file and the TLS certificate on every SIGHUP; a bad file leaves the old one
/// in force.
#[cfg(unix)]
async fn reload_on_sighup(
    gateway: std::sync::Arc<Gateway>,
    mut hangups: tokio::signal::unix::Signal,
    auth_file: bool,
    tls: bool,
) {
    while hangups.recv().await.is_some() {
        if !auth_file && !tls {
            tracing::info!("SIGHUP: nothing to reload (no --auth-file, no TLS)");
            continue;
        }
        tracing::info!("SIGHUP: reloading");
        if auth_file && let Err(err) = gateway.reload_auth().await {
            tracing::error!(
                err = format!("{:#}", anyhow::Error::new(err)),
                "auth file reload failed; the old secrets stay in force"
            );
        }
        if tls && let Err(err) = gateway.reload_tls() {
            tracing::error!(
                err = format!("{:#}", anyhow::Error::new(err)),
                "TLS reload failed; the old certificate stays in force"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn listen_forms() {
        assert_eq!(parse_listen(":3000").unwrap(), "0.0.0.0:3000".parse().unwrap());
        assert_eq!(parse_listen("127.0.0.1:80").unwrap(), "127.0.0.1:80".parse().unwrap());
        assert_eq!(parse_listen("[::]:3000").unwrap(), "[::]:3000".parse().unwrap());
        assert!(parse_listen(":http").is_err());
        assert!(parse_listen("3000").is_err());
    }

    #[test]
    fn the_example_config_file_parses_and_flags_win() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/gateway.toml");
        let argv = ["gateway", "--config", path, "--listen", "127.0.0.1:9"];
        let argv = ferry_transport::cli::args_with_config_file::<ConfigFile>(
            argv.iter().map(std::ffi::OsString::from).collect(),
            render_table,
        )
        .unwrap();
        let args = Args::try_parse_from(argv).unwrap();
        assert_eq!(args.listen, "127.0.0.1:9".parse().unwrap());
        assert_eq!(args.domain.as_deref(), Some("tunnel.example.com"));
        assert_eq!(args.max_request_body, Some(100 << 20));
        assert_eq!(args.client_rate.unwrap().to_string(), "50/s");
        let (id, overrides) = &args.tunnel_override[0];
        assert!(id.as_str().ends_with("_uploads"));
        assert_eq!(overrides.max_request_body, Some(2 << 30));
        assert_eq!(overrides.response_timeout, Some(Duration::from_secs(300)));
    }

    #[test]
    fn the_readme_shows_the_example_config_file() {
        assert!(include_str!("../../README.md").contains(include_str!("../../examples/gateway.toml")));
    }

    #[test]
    fn flags_are_consistent() {
        Args::command().debug_assert();
    }
}
