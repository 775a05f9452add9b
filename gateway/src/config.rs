//! [`GatewayConfig`]: everything the gateway library needs, validated; `main.rs` builds it from
//! flags. Defaults are named constants with the reason for their value.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use ferry_codec::Secret;
use ferry_codec::TunnelId;
use ferry_transport::SessionConfig;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;

use crate::auth::AuthSource;
use crate::tls::TlsFiles;

/// How long an agent has to complete the ferry handshake after its WebSocket is up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long opening a stream to an agent may take before the client gets 504 `agent_unresponsive`.
pub const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent may take to send the response head before 504 `upstream_timeout`. The
/// agent has its own, shorter upstream timeout; this one catches an agent that says nothing.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a client may take to send its request head (slowloris protection); for the first
/// request of a connection, counted from accept (a TLS handshake included), whatever the protocol.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a response may wait on a client that takes none of it before the connection is
/// closed (and the stream to the agent reset). Long enough for a phone that lost signal for a
/// while; short enough that non-reading clients cannot pile up.
pub const SEND_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Heartbeat period announced to agents (both sides ping this often on the control stream).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(20);
/// Heartbeats a peer may miss before it is declared dead (so 60 s by default).
pub const HEARTBEAT_MISSES: u32 = 3;
/// How long a request for a tunnel whose agent is reconnecting waits before 503 `tunnel_offline`.
pub const PENDING_TIMEOUT: Duration = Duration::from_secs(10);
/// Most requests waiting at once for one offline tunnel; beyond this they get 503 at once.
pub const MAX_PENDING: usize = 1024;
/// Most bytes of request head hyper buffers before answering 431. Larger than any sane browser
/// request (Cloudflare allows 32 KiB), well under the codec's head limit.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most header fields in a request before 431. hyper parses up to 100 on the stack; a higher
/// limit costs two heap allocations (4 KiB or more each) per request (measured with the counts
/// bench).
pub const MAX_HEADERS: usize = 100;
/// Most open client + agent connections; the accept loop waits for a free slot beyond this.
pub const MAX_CONNECTIONS: usize = 32_768;
/// Most open connections from one client address; more are closed at once. Generous enough for a
/// large NAT, small enough that one address cannot take the whole [`MAX_CONNECTIONS`].
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 1024;
/// Most agent WebSocket connections still in their handshake (not yet authenticated); more get 503.
pub const MAX_HANDSHAKES: usize = 1024;
/// Longest request target (path and query) before 414. Browsers send at most a few KiB;
/// Cloudflare allows 16 KiB.
pub const MAX_URI_LEN: usize = 16 * 1024;
/// Most requests in flight at once for one tunnel, over all its sessions, before 503
/// `tunnel_at_capacity` with `Retry-After`.
pub const MAX_TUNNEL_REQUESTS: usize = 10_240;
/// How long a client may pause in the middle of its request body (no byte at all) before the
/// request is cut (408 if no response started) and the upstream's request aborted.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most requests in flight at once from one client (IPv4 address or IPv6 /64) to one tunnel,
/// before 429 `client_at_capacity`. As many as that client may have connections, so a browser or
/// a load test from one host is never refused, while one host cannot take a whole tunnel.
pub const MAX_CLIENT_REQUESTS: usize = 1024;
/// Most concurrent HTTP/2 streams per public connection.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Most HTTP/2 streams a client may reset before the gateway has answered them, at once (the
/// "rapid reset" attack); beyond this hyper closes the connection with `ENHANCE_YOUR_CALM`.
pub const H2_MAX_PENDING_RESETS: usize = 32;
/// How long a client may take to complete the TLS handshake (slowloris protection before HTTP).
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a shutdown waits for in-flight requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings one tunnel gets instead of the gateway-wide ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunnelOverrides {
    /// Instead of [`GatewayConfig::response_timeout`].
    pub response_timeout: Option<Duration>,
    /// Instead of [`GatewayConfig::max_request_body`].
    pub max_request_body: Option<u64>,
}

/// Parses `TUNNEL_ID:key=value[,key=value]` with keys `response-timeout` and
/// `max-request-body`, for example
/// `agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_api:response-timeout=300s,max-request-body=1GiB`.
///
/// # Errors
/// A message saying what is wrong.
pub fn parse_tunnel_override(text: &str) -> Result<(TunnelId, TunnelOverrides), String> {
    let (id, settings) =
        text.split_once(':').ok_or_else(|| format!("{text:?} is not TUNNEL_ID:key=value[,key=value]"))?;
    let id: TunnelId = id.parse().map_err(|err| format!("{err}"))?;
    let mut overrides = TunnelOverrides::default();
    for setting in settings.split(',').filter(|s| !s.trim().is_empty()) {
        let (key, value) = setting.split_once('=').ok_or_else(|| format!("{setting:?} is not key=value"))?;
        match key.trim() {
            "response-timeout" => {
                overrides.response_timeout =
                    Some(humantime::parse_duration(value.trim()).map_err(|err| format!("{value:?}: {err}"))?);
            }
            "max-request-body" => overrides.max_request_body = Some(ferry_transport::cli::parse_size(value)?),
            other => {
                return Err(format!("unknown tunnel setting {other:?} (response-timeout, max-request-body)"));
            }
        }
    }
    Ok((id, overrides))
}

/// Gateway settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// With a domain, `{label}.{domain}` routes to the tunnel whose DNS label is `label`.
    /// Lowercase, without a trailing dot.
    pub domain: Option<String>,
    /// yamux limits for each agent session.
    pub session: SessionConfig,
    /// See [`HANDSHAKE_TIMEOUT`].
    pub handshake_timeout: Duration,
    /// See [`STREAM_OPEN_TIMEOUT`].
    pub stream_open_timeout: Duration,
    /// See [`RESPONSE_TIMEOUT`].
    pub response_timeout: Duration,
    /// See [`HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// See [`HEARTBEAT_INTERVAL`].
    pub heartbeat_interval: Duration,
    /// See [`HEARTBEAT_MISSES`].
    pub heartbeat_misses: u32,
    /// See [`PENDING_TIMEOUT`].
    pub pending_timeout: Duration,
    /// See [`MAX_PENDING`].
    pub max_pending: usize,
    /// Where agent secrets come from.
    pub auth: AuthSource,
    /// Bearer token for the admin endpoints (`None`: loopback clients only, if allowed).
    pub admin_token: Option<Secret>,
    /// Whether loopback clients may use the admin endpoints without the token. Turn it off when
    /// a reverse proxy on the same host forwards public traffic (every client looks local then).
    pub admin_loopback: bool,
    /// See [`MAX_HEADER_BYTES`].
    pub max_header_bytes: usize,
    /// See [`MAX_HEADERS`].
    pub max_headers: usize,
    /// See [`MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// See [`MAX_CONNECTIONS_PER_ADDRESS`].
    pub max_connections_per_address: usize,
    /// See [`MAX_HANDSHAKES`].
    pub max_handshakes: usize,
    /// See [`MAX_URI_LEN`].
    pub max_uri_len: usize,
    /// Largest request body, in bytes, before 413 `payload_too_large`; `None`: no limit.
    pub max_request_body: Option<u64>,
    /// See [`MAX_TUNNEL_REQUESTS`].
    pub max_tunnel_requests: usize,
    /// See [`MAX_CLIENT_REQUESTS`].
    pub max_client_requests: usize,
    /// See [`SEND_IDLE_TIMEOUT`].
    pub send_idle_timeout: Duration,
    /// Kernel send buffer (`SO_SNDBUF`) of each public connection; `None` leaves it to the
    /// kernel's autotuning (up to `net.ipv4.tcp_wmem`'s maximum, 4 MiB, per connection). A
    /// thousand clients that stop reading each park that much in the host's TCP memory; past
    /// `net.ipv4.tcp_mem` the kernel lets their writes trickle on as memory frees, which keeps
    /// their send-idle deadline from firing and slows every socket on the host.
    pub client_send_buffer: Option<usize>,
    /// See [`BODY_IDLE_TIMEOUT`].
    pub body_idle_timeout: Duration,
    /// Per-tunnel settings that replace the gateway-wide ones.
    pub tunnel_overrides: HashMap<TunnelId, TunnelOverrides>,
    /// Requests per tunnel (all clients together); `None`: no limit. Over it: 429.
    pub tunnel_rate: Option<Rate>,
    /// Requests per client address (all tunnels together); `None`: no limit. Over it: 429.
    pub client_rate: Option<Rate>,
    /// See [`DRAIN_TIMEOUT`].
    pub drain_timeout: Duration,
    /// Serve HTTPS and `wss://` with this certificate; `None` serves plain HTTP.
    pub tls: Option<TlsFiles>,
    /// How long a client may take to complete the TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Join a cluster of gateways through Redis; `None`: a node of its own.
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// Raw TCP endpoints: which public ports, for how long a lease lasts.
    pub tcp: crate::tcp::TcpConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            domain: None,
            session: SessionConfig::default(),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            stream_open_timeout: STREAM_OPEN_TIMEOUT,
            response_timeout: RESPONSE_TIMEOUT,
            header_read_timeout: HEADER_READ_TIMEOUT,
            heartbeat_interval: HEARTBEAT_INTERVAL,
            heartbeat_misses: HEARTBEAT_MISSES,
            pending_timeout: PENDING_TIMEOUT,
            max_pending: MAX_PENDING,
            auth: AuthSource::Open,
            admin_token: None,
            admin_loopback: true,
            max_header_bytes: MAX_HEADER_BYTES,
            max_headers: MAX_HEADERS,
            max_connections: MAX_CONNECTIONS,
            max_connections_per_address: MAX_CONNECTIONS_PER_ADDRESS,
            max_handshakes: MAX_HANDSHAKES,
            max_uri_len: MAX_URI_LEN,
            max_request_body: None,
            max_tunnel_requests: MAX_TUNNEL_REQUESTS,
            max_client_requests: MAX_CLIENT_REQUESTS,
            send_idle_timeout: SEND_IDLE_TIMEOUT,
            client_send_buffer: None,
            body_idle_timeout: BODY_IDLE_TIMEOUT,
            tunnel_overrides: HashMap::new(),
            tunnel_rate: None,
            client_rate: None,
            drain_timeout: DRAIN_TIMEOUT,
            tls: None,
            tls_handshake_timeout: TLS_HANDSHAKE_TIMEOUT,
            cluster: None,
            tcp: crate::tcp::TcpConfig::default(),
        }
    }
}

/// Normalises a `--domain` value: lowercase, no trailing dot, no port, each label valid DNS.
///
/// # Errors
/// A message saying what is wrong with the domain.
pub fn parse_domain(text: &str) -> Result<String, String> {
    let domain = text.trim().trim_end_matches('.').to_ascii_lowercase();
    if domain.is_empty() {
        return Err("the domain is empty".into());
    }
    if domain.len() > 253 - 64 {
        return Err("the domain is too long to leave room for a 63-octet tunnel label".into());
    }
    for label in domain.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "{label:?} is not a valid DNS label (letters, digits and inner hyphens; give the \
                 domain without scheme or port, like tunnel.example.com)"
            ));
        }
    }
    Ok(domain)
}

impl GatewayConfig {
    /// The hyper connection builder for the public port.
    pub(crate) fn http_builder(&self) -> auto::Builder<TokioExecutor> {
        let config = self;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout)
            .max_buf_size(config.max_header_bytes.max(8192))
            .max_headers(config.max_headers)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
            .keep_alive_interval(Some(Duration::from_secs(20)))
            .keep_alive_timeout(Duration::from_secs(20));
        builder
    }
}

/// A request rate: `count` per `per`, allowing bursts of up to `count` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Requests allowed per period (and the burst size).
    pub count: u32,
    /// The period.
    pub per: Duration,
}

impl Rate {
    /// Parses `N/s`, `N/m` or `N/h` (N ≥ 1).
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (count, unit) =
            text.split_once('/').ok_or_else(|| format!("{text:?} is not a rate like 100/s or 600/m"))?;
        let count: u32 = count
            .trim()
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{count:?} is not a positive whole number of requests"))?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            other => return Err(format!("{other:?} is not a rate unit (use s, m or h)")),
        };
        Ok(Self { count, per })
    }

    pub(crate) fn tokens_per_second(self) -> f64 {
        f64::from(self.count) / self.per.as_secs_f64()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_overrides_parse() {
        let (id, o) = parse_tunnel_override(
            "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_api:response-timeout=300s,max-request-body=1GiB",
        )
        .unwrap();
        assert_eq!(id.as_str(), "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_api");
        assert_eq!(o.response_timeout, Some(Duration::from_secs(300)));
        assert_eq!(o.max_request_body, Some(1 << 30));
        assert!(parse_tunnel_override("agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_api:speed=9").is_err());
        assert!(parse_tunnel_override("web:response-timeout=1s").is_err());
        assert!(parse_tunnel_override("agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_api").is_err());
    }

    #[test]
    fn domains_are_normalised_and_checked() {
        assert_eq!(parse_domain("Tunnel.Example.COM.").unwrap(), "tunnel.example.com");
        assert!(parse_domain("").is_err());
        assert!(parse_domain("http://x.com").is_err());
        assert!(parse_domain("x.com:443").is_err());
        assert!(parse_domain("a..b").is_err());
        assert!(parse_domain("-a.com").is_err());
    }
}
