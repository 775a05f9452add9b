//! [`AgentConfig`]: what the agent library needs, validated; `main.rs` builds it from flags.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use ferry_codec::{InstanceId, Secret, TunnelId};
use ferry_transport::SessionConfig;

use crate::filter::{Filters, path_matches};
use http::Uri;
use http::uri::{Authority, Scheme};

/// Where the agent dials when neither `--gateway` nor `GATEWAY_URL` says otherwise.
pub const DEFAULT_GATEWAY: &str = "ws://127.0.0.1:3000/ws";
/// TCP connect plus WebSocket and ferry handshakes to the gateway.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP connect to the upstream; a refused connection fails at once, this bounds a black hole.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the upstream may take to send its response head. Shorter than the gateway's 60 s
/// so the client gets a precise `upstream_timeout` from us rather than a generic one.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(55);
/// How long the upstream may pause in the middle of a response body (no byte at all) before the
/// response is cut (the client sees it incomplete) and the upstream connection closed. Longer than
/// the keep-alive comments server-sent-event streams send (15-30 s) and a typical long poll.
pub const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Most idle connections kept open to one upstream. After a burst of 10,000 requests the agent
/// would otherwise hold 10,000 idle sockets (and the upstream as many) for the idle timeout;
/// 1,024 covers a thousand clients in steady keep-alive use without reconnects.
pub const POOL_MAX_IDLE_PER_UPSTREAM: usize = 1024;
/// Idle pooled upstream connections are closed after this.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// A session that lasted this long resets the reconnect backoff.
pub const HEALTHY_SESSION: Duration = Duration::from_secs(60);
/// First reconnect delay (full jitter: the actual wait is uniform in `0..delay`).
pub const RECONNECT_INITIAL: Duration = Duration::from_secs(1);
/// Largest reconnect delay.
pub const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// How often the health probe runs (with `--health-path`).
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(10);
/// Upstream connection failures in a row that open the circuit breaker.
pub const BREAKER_FAILURES: u32 = 5;
/// How long an open breaker refuses requests before letting one through as a trial.
pub const BREAKER_COOLDOWN: Duration = Duration::from_secs(5);
/// How long in-flight requests may run after SIGINT/SIGTERM.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The local service: `http://host:port` or `https://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// `host:port`.
    pub authority: Authority,
    /// Each connection starts with a PROXY protocol header naming the public client; such
    /// connections are reused only for requests of the same client connection.
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// `,proxy-protocol=v1|v2` options after an address (`what` names the flag, for errors).
fn parse_options(options: &str, what: &str) -> Result<Option<ProxyProtocol>, String> {
    let mut proxy_protocol = None;
    for option in options.split(',').filter(|o| !o.is_empty()) {
        proxy_protocol = Some(match option {
            "proxy-protocol=v1" => ProxyProtocol::V1,
            "proxy-protocol=v2" => ProxyProtocol::V2,
            other => {
                return Err(format!("{what}: unknown option {other:?} (known: proxy-protocol=v1|v2)"));
            }
        });
    }
    Ok(proxy_protocol)
}

impl Upstream {
    /// Parses `host:port`, `http://host:port` or `https://host[:port]`, optionally followed by
    /// `,proxy-protocol=v1` or `v2`.
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (text, options) = text.split_once(',').unwrap_or((text, ""));
        let proxy_protocol = parse_options(options, text)?;
        let with_scheme = if text.contains("://") { text.to_owned() } else { format!("http://{text}") };
        let uri: Uri = with_scheme
            .parse()
            .map_err(|err| format!("{text:?} is not host:port or http(s)://host:port ({err})"))?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::HTTP,
            Some("https") => Scheme::HTTPS,
            other => {
                return Err(format!("unsupported upstream scheme {other:?} (use http or https)"));
            }
        };
        let authority = uri.authority().cloned().ok_or_else(|| format!("{text:?} has no host"))?;
        if authority.host().is_empty() {
            return Err(format!("{text:?} has no host"));
        }
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(format!("the upstream is an origin: drop the path {:?}", uri.path()));
        }
        if authority.as_str().contains('@') {
            return Err("the upstream may not contain credentials".into());
        }
        Ok(Self { scheme, authority, proxy_protocol })
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)?;
        match self.proxy_protocol {
            Some(ProxyProtocol::V1) => f.write_str(",proxy-protocol=v1"),
            Some(ProxyProtocol::V2) => f.write_str(",proxy-protocol=v2"),
            None => Ok(()),
        }
    }
}

/// Requests whose path is under `prefix` go to `upstream` (the longest matching prefix wins;
/// requests no route matches go to the agent's default upstream). The path is not rewritten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// A path prefix, matched on segment boundaries: `/api` takes `/api` and `/api/...`.
    pub prefix: String,
    /// Where those requests go.
    pub upstream: Upstream,
}

impl Route {
    /// Parses `PREFIX=ADDR`, for example `/api=127.0.0.1:8000`.
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (prefix, upstream) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?} is not PREFIX=ADDR (like /api=127.0.0.1:8000)"))?;
        Self::new(prefix, upstream)
    }

    /// A route from its two halves.
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn new(prefix: &str, upstream: &str) -> Result<Self, String> {
        if !prefix.starts_with('/') || prefix.contains(['?', '#', ' ']) {
            return Err(format!("route prefix {prefix:?} must be a path starting with / (no query)"));
        }
        Ok(Self { prefix: prefix.to_owned(), upstream: Upstream::parse(upstream)? })
    }
}

/// A raw TCP endpoint (`--tcp`): connections to a public port of the gateway become connections
/// to `host:port` here, byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpTarget {
    /// What the gateway knows it by: the address as written (`127.0.0.1:5432`). The gateway
    /// keeps the same public port for the same name across reconnects.
    pub name: String,
    /// Host to dial (a name is resolved at each connection).
    pub host: String,
    /// Port to dial.
    pub port: u16,
    /// The public port asked for; `None` takes any the gateway may give.
    pub public_port: Option<u16>,
    /// Send the upstream a PROXY protocol header with the public client's address first.
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// A PROXY protocol version (HAProxy's specification).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    /// The text header: `PROXY TCP4 client public cport pport\r\n`.
    V1,
    /// The binary header.
    V2,
}

impl TcpTarget {
    /// Parses `[PUBLIC_PORT=]HOST:PORT[,proxy-protocol=v1|v2]`, for example `127.0.0.1:5432`,
    /// `5432=db.local:5432` or `127.0.0.1:6379,proxy-protocol=v2`.
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (text, options) = text.split_once(',').unwrap_or((text, ""));
        let proxy_protocol = parse_options(options, &format!("--tcp {text}"))?;
        let (public_port, addr) = match text.split_once('=') {
            Some((port, addr)) => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("{port:?} in --tcp {text} is not a public port (1-65535)"))?;
                (Some(port), addr)
            }
            None => (None, text),
        };
        let bad = || format!("--tcp {text}: {addr:?} is not HOST:PORT (like 127.0.0.1:5432)");
        let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let port = port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?;
        if host.is_empty() || host.contains(['/', ' ', '@']) {
            return Err(bad());
        }
        if !ferry_codec::handshake::is_endpoint_name(addr) {
            return Err(format!("--tcp {text}: the address must be 1 to 64 printable characters"));
        }
        Ok(Self { name: addr.to_owned(), host: host.to_owned(), port, public_port, proxy_protocol })
    }
}

/// The gateway's agent endpoint: `ws://host:port/path` or `wss://…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayUrl {
    /// The full URL.
    pub uri: Uri,
    /// Whether to use TLS.
    pub tls: bool,
    /// Host to dial and to name in the TLS handshake.
    pub host: String,
    /// Port to dial.
    pub port: u16,
}

impl GatewayUrl {
    /// Parses `ws://host[:port][/path]` or `wss://…`; a missing path means `/ws`.
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let uri: Uri = text.parse().map_err(|err| format!("{text:?} is not a URL ({err})"))?;
        let tls = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            Some("http" | "https") => {
                return Err(format!(
                    "{text:?}: the gateway URL uses ws:// or wss:// (for example {DEFAULT_GATEWAY})"
                ));
            }
            _ => {
                return Err(format!("{text:?}: expected ws://host:port/ws or wss://host/ws"));
            }
        };
        let authority = uri.authority().ok_or_else(|| format!("{text:?} has no host"))?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
        if host.is_empty() {
            return Err(format!("{text:?} has no host"));
        }
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = match uri.path_and_query().map(|p| p.as_str()) {
            None | Some("" | "/") => "/ws",
            Some(path) => path,
        };
        let uri = Uri::builder()
            .scheme(if tls { "wss" } else { "ws" })
            .authority(authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|err| format!("{text:?}: {err}"))?;
        Ok(Self { uri, tls, host, port })
    }

    /// Whether the host is this machine: `localhost`, `127.0.0.0/8` or `::1`.
    pub fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self.host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

/// Most sessions an agent keeps at once (`--connections`).
pub const MAX_CONNECTIONS: usize = 16;

/// Agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The tunnel this agent serves.
    pub tunnel_id: TunnelId,
    /// The local service (requests no route matches); `None` for an agent that serves only
    /// `--tcp` endpoints (and routes, if any): other HTTP requests get 404 `no_upstream`.
    pub upstream: Option<Upstream>,
    /// Other local services by path prefix.
    pub routes: Vec<Route>,
    /// Raw TCP endpoints, each on a public port of the gateway.
    pub tcp: Vec<TcpTarget>,
    /// Client address blocks that may reach the tunnel (HTTP and TCP), enforced by the gateway;
    /// empty: any.
    pub allow_ip: Vec<ipnet::IpNet>,
    /// Client address blocks that may not; they win over `allow_ip`.
    pub deny_ip: Vec<ipnet::IpNet>,
    /// htpasswd lines (`user:bcrypt-hash`) the gateway checks public HTTP requests against
    /// (`Authorization: Basic`); empty: no authentication.
    pub basic_auth: Vec<String>,
    /// Header fields set and removed on the way to the upstream and back.
    pub headers: crate::rewrite::HeaderRules,
    /// Put `/t/{tunnel_id}` back in front of a path-routed target, for an application served
    /// under that base path.
    pub keep_path_prefix: bool,
    /// What the request inspector keeps, when it runs (see [`crate::Listeners::inspect`]).
    pub inspect: crate::inspect::InspectConfig,
    /// What the agent refuses before the upstream sees it.
    pub filters: Filters,
    /// Extra CA certificates (PEM) to trust for an `https` upstream, besides the system roots.
    pub upstream_ca: Option<PathBuf>,
    /// The gateway's agent endpoint.
    pub gateway: GatewayUrl,
    /// More endpoints (other nodes of a cluster, or balancers in front of it): connections are
    /// spread over all of them, and one that fails moves to the next.
    pub more_gateways: Vec<GatewayUrl>,
    /// Sessions kept at once, each to a different gateway node (see [`AgentConfig::connections`]).
    pub connections: usize,
    /// Extra CA certificates (PEM) to trust for a `wss://` gateway, besides the system roots; a
    /// certificate in it may also be the gateway's own (self-signed) certificate.
    pub ca_file: Option<PathBuf>,
    /// Keys the `wss://` gateway may present (SHA-256 of the SubjectPublicKeyInfo); when set,
    /// they replace every other check of its certificate.
    pub pins: Vec<crate::tls::Pin>,
    /// Allow `ws://` (no TLS) to a gateway that is not on loopback. The secret never crosses the
    /// wire, but requests and responses do, readable by anyone on the path.
    pub insecure_plaintext: bool,
    /// The tunnel's secret; `None` for a gateway that runs without authentication.
    pub secret: Option<Secret>,
    /// This process; stays the same across reconnects.
    pub instance_id: InstanceId,
    /// yamux limits (the agent's side of them).
    pub session: SessionConfig,
    /// See [`CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// See [`UPSTREAM_CONNECT_TIMEOUT`].
    pub upstream_connect_timeout: Duration,
    /// See [`UPSTREAM_TIMEOUT`].
    pub upstream_timeout: Duration,
    /// See [`UPSTREAM_IDLE_TIMEOUT`].
    pub upstream_idle_timeout: Duration,
    /// A session that lasted this long resets the reconnect backoff.
    pub healthy_session: Duration,
    /// Stop after this many failed connection attempts in a row; `None` retries forever.
    pub max_retries: Option<u32>,
    /// See [`RECONNECT_INITIAL`].
    pub reconnect_initial: Duration,
    /// See [`RECONNECT_MAX`].
    pub reconnect_max: Duration,
    /// See [`DRAIN_TIMEOUT`].
    pub drain_timeout: Duration,
    /// Path probed on every upstream (`GET`, 2xx/3xx pass); `None`: no probe.
    pub health_path: Option<String>,
    /// See [`HEALTH_INTERVAL`].
    pub health_interval: Duration,
    /// See [`BREAKER_FAILURES`].
    pub breaker_failures: u32,
    /// See [`BREAKER_COOLDOWN`].
    pub breaker_cooldown: Duration,
}

impl AgentConfig {
    /// Every gateway endpoint: `gateway`, then `more_gateways`.
    pub fn gateways(&self) -> impl Iterator<Item = &GatewayUrl> {
        std::iter::once(&self.gateway).chain(&self.more_gateways)
    }

    /// The upstream for a request path: the longest matching route, else the default (if any).
    pub fn upstream_for(&self, path: &str) -> Option<&Upstream> {
        self.routes
            .iter()
            .filter(|route| path_matches(path, &route.prefix))
            .max_by_key(|route| route.prefix.trim_end_matches('/').len())
            .map_or(self.upstream.as_ref(), |route| Some(&route.upstream))
    }

    /// Every distinct HTTP upstream: the default first, then the routes'.
    pub fn upstreams(&self) -> Vec<&Upstream> {
        let mut all: Vec<&Upstream> = self.upstream.iter().collect();
        for route in &self.routes {
            if !all.contains(&&route.upstream) {
                all.push(&route.upstream);
            }
        }
        all
    }

    /// Checks what the parsers alone cannot.
    ///
    /// # Errors
    /// A message saying what to change.
    pub fn validate(&self) -> Result<(), String> {
        self.session.validate()?;
        if self.inspect.max_requests == 0 || self.inspect.max_requests > crate::inspect::MAX_REQUESTS {
            return Err(format!("the inspector keeps 1 to {} requests", crate::inspect::MAX_REQUESTS));
        }
        if self.inspect.body_limit > crate::inspect::MAX_BODY_LIMIT {
            return Err(format!(
                "the inspector keeps at most {} MiB of each body",
                crate::inspect::MAX_BODY_LIMIT >> 20
            ));
        }
        for gateway in self.gateways() {
            if !gateway.tls && !gateway.is_loopback() && !self.insecure_plaintext {
                return Err(format!(
                    "refusing plain ws:// to {}: the tunnel's traffic would cross the network unencrypted; \
                     use wss:// (or pass --insecure-plaintext if something else encrypts the path)",
                    gateway.host
                ));
            }
        }
        if self.upstream.is_none() && self.routes.is_empty() && self.tcp.is_empty() {
            return Err("nothing to serve: give --upstream, a --route or a --tcp endpoint".into());
        }
        if self.allow_ip.len().max(self.deny_ip.len()) > ferry_codec::handshake::MAX_IP_RULES {
            return Err(format!(
                "at most {} --allow-ip and --deny-ip blocks each",
                ferry_codec::handshake::MAX_IP_RULES
            ));
        }
        let rules = [&self.headers.request.set.len(), &self.headers.request.remove.len()];
        let more = [&self.headers.response.set.len(), &self.headers.response.remove.len()];
        if rules.iter().chain(&more).any(|n| **n > crate::rewrite::MAX_RULES) {
            return Err(format!("at most {} header rules of each kind", crate::rewrite::MAX_RULES));
        }
        if self.tcp.len() > ferry_codec::handshake::MAX_TCP_ENDPOINTS {
            return Err(format!("at most {} --tcp endpoints", ferry_codec::handshake::MAX_TCP_ENDPOINTS));
        }
        for (i, target) in self.tcp.iter().enumerate() {
            if self.tcp[..i].iter().any(|t| t.name == target.name) {
                return Err(format!("--tcp {} is given twice", target.name));
            }
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.connections) {
            return Err(format!("--connections must be between 1 and {MAX_CONNECTIONS}"));
        }
        if let Some(path) = &self.health_path
            && (!path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err())
        {
            return Err(format!("--health-path {path:?} must be a path starting with /"));
        }
        if self.health_interval.is_zero() {
            return Err("--health-interval must be positive".into());
        }
        let any_tls = self.gateways().any(|g| g.tls);
        if self.ca_file.is_some() && !any_tls {
            return Err("--ca-file is for a wss:// gateway; this one is ws://".into());
        }
        if !self.pins.is_empty() && !any_tls {
            return Err("--pin-sha256 is for a wss:// gateway; this one is ws://".into());
        }
        if !self.pins.is_empty() && self.ca_file.is_some() {
            return Err(
                "--pin-sha256 replaces every other check of the gateway's certificate: drop --ca-file".into(),
            );
        }
        Ok(())
    }

    /// A configuration with every default, for `tunnel_id` → `upstream` via `gateway`.
    pub fn new(tunnel_id: TunnelId, upstream: Upstream, gateway: GatewayUrl) -> Self {
        Self::with_upstream(tunnel_id, Some(upstream), gateway)
    }

    /// As [`AgentConfig::new`], with or without a default HTTP upstream.
    pub fn with_upstream(tunnel_id: TunnelId, upstream: Option<Upstream>, gateway: GatewayUrl) -> Self {
        Self {
            tunnel_id,
            upstream,
            routes: Vec::new(),
            tcp: Vec::new(),
            allow_ip: Vec::new(),
            deny_ip: Vec::new(),
            basic_auth: Vec::new(),
            headers: crate::rewrite::HeaderRules::default(),
            keep_path_prefix: false,
            inspect: crate::inspect::InspectConfig::default(),
            filters: Filters::default(),
            upstream_ca: None,
            gateway,
            more_gateways: Vec::new(),
            connections: 1,
            ca_file: None,
            pins: Vec::new(),
            insecure_plaintext: false,
            secret: None,
            instance_id: InstanceId(uuid::Uuid::new_v4()),
            session: SessionConfig::default(),
            connect_timeout: CONNECT_TIMEOUT,
            upstream_connect_timeout: UPSTREAM_CONNECT_TIMEOUT,
            upstream_timeout: UPSTREAM_TIMEOUT,
            upstream_idle_timeout: UPSTREAM_IDLE_TIMEOUT,
            healthy_session: HEALTHY_SESSION,
            max_retries: None,
            reconnect_initial: RECONNECT_INITIAL,
            reconnect_max: RECONNECT_MAX,
            drain_timeout: DRAIN_TIMEOUT,
            health_path: None,
            health_interval: HEALTH_INTERVAL,
            breaker_failures: BREAKER_FAILURES,
            breaker_cooldown: BREAKER_COOLDOWN,
        }
    }
}

/// Reads an htpasswd file for `--basic-auth-file`: one `user:hash` line per user, bcrypt hashes
/// only (`htpasswd -B`, or `agent --hash-password USER`); blank lines and `#` comments are
/// skipped.
///
/// # Errors
/// The file cannot be read, or a line that is not a bcrypt entry (named by its number, never
/// printed), a user given twice, more than the handshake carries.
pub fn load_htpasswd(path: &std::path::Path) -> Result<Vec<String>, String> {
    use ferry_codec::handshake::{MAX_BASIC_AUTH_USERS, is_basic_auth_entry};
    let text = std::fs::read_to_string(path).map_err(|err| format!("{}: {err}", path.display()))?;
    let mut lines: Vec<String> = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{} line {}", path.display(), number + 1);
        if !is_basic_auth_entry(line) {
            return Err(format!(
                "{}: expected `user:hash` with a bcrypt hash ($2y$, $2b$ or $2a$): make one with \
                 `agent --hash-password USER` or `htpasswd -nB USER`",
                at()
            ));
        }
        let user = line.split_once(':').map(|(user, _)| user);
        if lines.iter().any(|l| l.split_once(':').map(|(u, _)| u) == user) {
            return Err(format!("{}: user {:?} is given twice", at(), user.unwrap_or_default()));
        }
        lines.push(line.to_owned());
    }
    if lines.is_empty() {
        return Err(format!("{}: no users", path.display()));
    }
    if lines.len() > MAX_BASIC_AUTH_USERS {
        return Err(format!("{}: at most {MAX_BASIC_AUTH_USERS} users", path.display()));
    }
    Ok(lines)
}

/// Parses an address block for `--allow-ip` / `--deny-ip`: `10.0.0.0/8`, `2001:db8::/32`, or one
/// address.
///
/// # Errors
/// A message saying what is wrong.
pub fn parse_ip_block(text: &str) -> Result<ipnet::IpNet, String> {
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map(|net| net.trunc())
        .map_err(|_| format!("{text:?} is not an address or a CIDR block (like 10.0.0.0/8 or 2001:db8::/32)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_forms() {
        let up = Upstream::parse("127.0.0.1:8000").unwrap();
        assert_eq!(up.to_string(), "http://127.0.0.1:8000");
        assert_eq!(Upstream::parse("http://localhost:5173").unwrap().to_string(), "http://localhost:5173");
        assert_eq!(Upstream::parse("https://svc.local").unwrap().scheme, Scheme::HTTPS);
        assert_eq!(Upstream::parse("[::1]:8000").unwrap().authority.as_str(), "[::1]:8000");
        assert!(Upstream::parse("ftp://x:1").is_err());
        assert!(Upstream::parse("http://x:1/api").is_err());
        assert!(Upstream::parse("http://user:pw@x:1").is_err());
        assert!(Upstream::parse("").is_err());
    }

    #[test]
    fn gateway_forms() {
        let gw = GatewayUrl::parse("ws://127.0.0.1:3000/ws").unwrap();
        assert_eq!((gw.host.as_str(), gw.port, gw.tls), ("127.0.0.1", 3000, false));
        let gw = GatewayUrl::parse("wss://tunnel.example.com").unwrap();
        assert_eq!(gw.uri.to_string(), "wss://tunnel.example.com/ws");
        assert_eq!((gw.port, gw.tls), (443, true));
        assert_eq!(GatewayUrl::parse("ws://[::1]:3000/").unwrap().host, "::1");
        assert!(GatewayUrl::parse("http://x/ws").is_err());
        assert!(GatewayUrl::parse("x:3000").is_err());
    }

    #[test]
    fn routes_pick_the_longest_prefix() {
        let id: TunnelId = "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_web".parse().unwrap();
        let mut config = AgentConfig::new(
            id,
            Upstream::parse("127.0.0.1:5173").unwrap(),
            GatewayUrl::parse(DEFAULT_GATEWAY).unwrap(),
        );
        config.routes = vec![
            Route::parse("/api=127.0.0.1:8000").unwrap(),
            Route::parse("/api/v2/=127.0.0.1:8002").unwrap(),
        ];
        let port = |path: &str| config.upstream_for(path).unwrap().authority.port_u16().unwrap();
        assert_eq!(port("/"), 5173);
        assert_eq!(port("/apix"), 5173);
        assert_eq!(port("/api"), 8000);
        assert_eq!(port("/api/v1/users"), 8000);
        assert_eq!(port("/api/v2/users"), 8002);
        assert_eq!(config.upstreams().len(), 3);
        assert!(Route::parse("api=127.0.0.1:1").is_err());
        assert!(Route::parse("/api").is_err());
        assert!(Route::parse("/api=ftp://x:1").is_err());
    }

    #[test]
    fn plaintext_only_to_loopback() {
        let id: TunnelId = "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_web".parse().unwrap();
        let up = Upstream::parse("127.0.0.1:8000").unwrap();
        let config = |url: &str| AgentConfig::new(id.clone(), up.clone(), GatewayUrl::parse(url).unwrap());
        for ok in ["ws://127.0.0.1:3000", "ws://localhost:3000", "ws://[::1]:3000", "wss://example.com"] {
            assert!(config(ok).validate().is_ok(), "{ok}");
        }
        let remote = config("ws://example.com:3000");
        assert!(remote.validate().unwrap_err().contains("--insecure-plaintext"));
        let mut allowed = remote;
        allowed.insecure_plaintext = true;
        assert!(allowed.validate().is_ok());
        let mut ca = config("ws://127.0.0.1:3000");
        ca.ca_file = Some("ca.pem".into());
        assert!(ca.validate().is_err());
        // Every gateway is held to the rule, not only the first.
        let mut more = config("wss://example.com");
        more.more_gateways = vec![GatewayUrl::parse("ws://example.net:3000").unwrap()];
        assert!(more.validate().unwrap_err().contains("example.net"));
        more.more_gateways = vec![GatewayUrl::parse("wss://example.net").unwrap()];
        assert!(more.validate().is_ok());
    }

    #[test]
    fn connections_are_bounded() {
        let id: TunnelId = "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_web".parse().unwrap();
        let up = Upstream::parse("127.0.0.1:8000").unwrap();
        let mut config = AgentConfig::new(id, up, GatewayUrl::parse("ws://127.0.0.1:3000").unwrap());
        for (n, ok) in
            [(0, false), (1, true), (2, true), (MAX_CONNECTIONS, true), (MAX_CONNECTIONS + 1, false)]
        {
            config.connections = n;
            assert_eq!(config.validate().is_ok(), ok, "{n}");
        }
    }

    #[test]
    fn htpasswd_files_hold_bcrypt_lines_only() {
        let dir = std::env::temp_dir().join(format!("ferry-htpasswd-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let hash = format!("$2y$05${}", "a".repeat(53));
        let good = file("good", &format!("# users\n\nalice:{hash}\n  bob:{hash}  \n"));
        assert_eq!(load_htpasswd(&good).unwrap(), [format!("alice:{hash}"), format!("bob:{hash}")]);
        let plain = file("plain", "alice:secret\n");
        let err = load_htpasswd(&plain).unwrap_err();
        assert!(err.contains("line 1") && !err.contains("secret"), "{err}");
        let md5 = file("md5", "alice:$apr1$abc$def\n");
        assert!(load_htpasswd(&md5).unwrap_err().contains("bcrypt"));
        let twice = file("twice", &format!("alice:{hash}\nalice:{hash}\n"));
        assert!(load_htpasswd(&twice).unwrap_err().contains("twice"));
        assert!(load_htpasswd(&file("empty", "# nobody\n")).unwrap_err().contains("no users"));
        let many: String = (0..17).map(|i| format!("u{i}:{hash}\n")).collect();
        assert!(load_htpasswd(&file("many", &many)).unwrap_err().contains("at most 16"));
        assert!(load_htpasswd(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_upstream_may_take_proxy_protocol() {
        let upstream = Upstream::parse("127.0.0.1:8080,proxy-protocol=v2").unwrap();
        assert_eq!(upstream.proxy_protocol, Some(ProxyProtocol::V2));
        assert_eq!(upstream.to_string(), "http://127.0.0.1:8080,proxy-protocol=v2");
        assert_eq!(Upstream::parse(&upstream.to_string()).unwrap(), upstream);
        assert_eq!(Upstream::parse("https://a.example").unwrap().proxy_protocol, None);
        let err = Upstream::parse("127.0.0.1:8080,proxy-protocol=v3").unwrap_err();
        assert!(err.contains("proxy-protocol=v1|v2"), "{err}");
        let route = Route::parse("/api=127.0.0.1:8000,proxy-protocol=v1").unwrap();
        assert_eq!(route.upstream.proxy_protocol, Some(ProxyProtocol::V1));
    }
}
