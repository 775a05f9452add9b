//! [`AgentError`] (the agent cannot go on) and [`ConnectError`] (one connection attempt failed).

use ferry_codec::{AuthErrorCode, CodecError};
use ferry_transport::TransportError;

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// `--max-retries` attempts in a row failed; the last failure is the source.
    #[error("gave up after {attempts} failed connection attempts")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        #[source]
        last: ConnectError,
    },
    /// TLS setup (for the gateway or the upstream) failed.
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

/// Why one attempt to connect to the gateway failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// TCP connect (or DNS) failed.
    #[error("cannot reach the gateway at {addr}")]
    Dial {
        /// `host:port`.
        addr: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake with the gateway failed (often: its certificate is not trusted).
    #[error("TLS handshake with the gateway {host} failed")]
    Tls {
        /// The host dialled.
        host: String,
        /// What failed (a `rustls::Error` inside when the certificate was refused).
        #[source]
        source: std::io::Error,
    },
    /// The whole connect took longer than the connect timeout.
    #[error("connecting to the gateway timed out")]
    Timeout,
    /// The WebSocket upgrade failed (not a ferry gateway, wrong path, proxy in the way).
    #[error("WebSocket upgrade to the gateway failed")]
    WebSocket(#[source] tokio_tungstenite::tungstenite::Error),
    /// The gateway refused the upgrade for now (429: too many failed attempts from here; 503:
    /// busy), saying when to try again.
    #[error("the gateway is refusing connections for now (HTTP {status})")]
    Busy {
        /// The status it answered.
        status: u16,
        /// Its `Retry-After`, if any: the agent waits at least this long.
        retry_after: Option<std::time::Duration>,
    },
    /// The handshake broke off.
    #[error("handshake with the gateway failed")]
    Handshake(#[from] TransportError),
    /// The gateway sent something we cannot accept.
    #[error("the gateway sent an invalid handshake message")]
    Protocol(#[from] CodecError),
    /// The gateway requires a secret and the agent has none.
    #[error("the gateway requires a secret and none is configured")]
    SecretRequired,
    /// The gateway could not prove it knows the tunnel's secret.
    #[error("the gateway did not prove it knows the tunnel's secret")]
    GatewayNotAuthenticated,
    /// The gateway refused us.
    #[error("the gateway refused the tunnel: {} ({message})", code.as_str())]
    Rejected {
        /// Why.
        code: AuthErrorCode,
        /// The gateway's text for the code.
        message: String,
    },
    /// The gateway gave no public port to one of the `--tcp` endpoints.
    #[error("the gateway refused TCP endpoint {endpoint}: {reason}")]
    TcpRefused {
        /// The endpoint's name (its `--tcp` address).
        endpoint: String,
        /// The gateway's reason.
        reason: String,
    },
}

impl ConnectError {
    /// How long the gateway asked us to wait before the next attempt.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Self::Busy { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// What the operator should do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            Self::Dial { .. } | Self::Timeout => {
                "check that the gateway is running and reachable (--gateway / GATEWAY_URL)"
            }
            Self::Tls { .. } => {
                "the gateway's certificate must match its host name and chain to a trusted CA (system roots, or --ca-file with the CA); a self-signed certificate can be given itself with --ca-file, or its key pinned with --pin-sha256"
            }
            Self::WebSocket(_) => "check that --gateway points at a ferry gateway's /ws endpoint",
            Self::Busy { .. } => "the gateway asked to wait; the agent retries after the time it gave",
            Self::Handshake(_) | Self::Protocol(_) => "the gateway may run an incompatible ferry version",
            Self::SecretRequired => "set FERRY_SECRET or --secret-file to the tunnel's secret",
            Self::GatewayNotAuthenticated => {
                "the gateway has no (or another) secret for this tunnel: check --gateway and the gateway's secrets; the agent will not serve an unauthenticated gateway"
            }
            Self::TcpRefused { .. } => {
                "ask the gateway operator for TCP ports (gateway --tcp-ports, or tcp-ports for this tunnel in its auth file), or ask for another --tcp PUBLIC_PORT="
            }
            Self::Rejected { code, .. } => match code {
                AuthErrorCode::BadCredentials => {
                    "check FERRY_SECRET / --secret-file against the gateway's secret for this tunnel"
                }
                AuthErrorCode::UnknownTunnel => "ask the gateway operator to add a secret for this tunnel id",
                AuthErrorCode::InvalidTunnelId => "fix --tunnel-id: agent_{uuid}_{purpose}",
                AuthErrorCode::BasicAuthRequired => {
                    "the gateway's operator requires a password on this tunnel: add --basic-auth-file"
                }
                AuthErrorCode::UnsupportedVersion => {
                    "upgrade the agent or the gateway so they speak the same protocol"
                }
                _ => "the gateway is busy; the agent retries",
            },
        }
    }

    /// Whether a person has to change something before a retry can succeed.
    pub fn needs_attention(&self) -> bool {
        match self {
            Self::Rejected { code, .. } => !code.is_transient(),
            Self::SecretRequired | Self::GatewayNotAuthenticated | Self::TcpRefused { .. } => true,
            // A certificate the agent does not trust stays untrusted until someone acts; a
            // handshake cut short by the network is worth the usual retry.
            Self::Tls { source, .. } => source.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()),
            _ => false,
        }
    }
}
