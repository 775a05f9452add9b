//! The handshake messages: [`ServerHello`], [`ClientAuth`], [`AuthResult`].
//!
//! Each travels alone in one WebSocket binary message, so there is no length prefix: the message is
//! the whole buffer, and it is refused unread when longer than [`MAX_HANDSHAKE_LEN`].

use std::time::Duration;

use bytes::Bytes;
use prost::Message;

use crate::auth::{Mac, Nonce};
use crate::frame::decode_message;
use crate::id::{InstanceId, SessionId, TunnelId};
use crate::{CodecError, pb};

/// The protocol version this build speaks (`ferry.v1`).
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest handshake message. The biggest, a `ClientAuth` with [`MAX_TCP_ENDPOINTS`] endpoints,
/// [`MAX_IP_RULES`] blocks of each kind and [`MAX_BASIC_AUTH_USERS`] users, all at their longest,
/// is under 8 KiB (a test checks it), as is an `AuthAccepted` refusing as many endpoints;
/// anything larger is not a ferry agent or gateway and is refused before decoding.
pub const MAX_HANDSHAKE_LEN: usize = 8 * 1024;
/// Most TCP endpoints one agent may declare.
pub const MAX_TCP_ENDPOINTS: usize = 8;
/// Longest reason a TCP endpoint was refused.
pub const MAX_TCP_ERROR_LEN: usize = 200;
/// Most address blocks in each of `allow_ip` and `deny_ip`.
pub const MAX_IP_RULES: usize = 32;
/// Most users in `basic_auth`.
pub const MAX_BASIC_AUTH_USERS: usize = 16;
/// Longest user name in `basic_auth`.
pub const MAX_BASIC_AUTH_USER_LEN: usize = 64;
/// Longest software version string (`gateway_version`, `agent_version`).
pub const MAX_SOFTWARE_VERSION_LEN: usize = 64;

/// Checks that the peer speaks our protocol version.
///
/// # Errors
/// [`CodecError::UnsupportedVersion`] for any other version.
pub fn check_version(version: u32) -> Result<(), CodecError> {
    if version == PROTOCOL_VERSION { Ok(()) } else { Err(CodecError::UnsupportedVersion(version)) }
}

/// Gateway → agent, first message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerHello {
    /// Gateway's protocol version.
    pub version: u32,
    /// Fresh per connection.
    pub nonce: Nonce,
    /// Gateway build, for logs.
    pub gateway_version: String,
    /// Whether the gateway checks MACs.
    pub auth_required: bool,
}

/// Agent → gateway, answer to [`ServerHello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuth {
    /// Agent's protocol version.
    pub version: u32,
    /// The tunnel the agent serves.
    pub tunnel_id: TunnelId,
    /// The agent process.
    pub instance_id: InstanceId,
    /// Agent build, for logs.
    pub agent_version: String,
    /// MAC over the client transcript; `None` when the agent has no secret.
    pub mac: Option<Mac>,
    /// Raw TCP endpoints the agent serves, each asking for a public port; names are unique.
    pub tcp: Vec<TcpEndpoint>,
    /// Client address blocks that may reach the tunnel ([`is_ip_block`]); empty: any.
    pub allow_ip: Vec<String>,
    /// Client address blocks that may not ([`is_ip_block`]); they win over `allow_ip`.
    pub deny_ip: Vec<String>,
    /// Users a public HTTP request must authenticate as (`Authorization: Basic`), as htpasswd
    /// lines `user:bcrypt-hash` ([`is_basic_auth_entry`]); empty: no authentication.
    pub basic_auth: Vec<String>,
}

/// Whether `line` looks like an htpasswd line with a bcrypt hash: a user name of 1 to 64 printable
/// ASCII characters without `:`, then `:$2a$`, `$2b$` or `$2y$` and the rest of a 60-character
/// hash. The gateway parses the hash, and refuses a line it cannot.
pub fn is_basic_auth_entry(line: &str) -> bool {
    let Some((user, hash)) = line.split_once(':') else { return false };
    (1..=MAX_BASIC_AUTH_USER_LEN).contains(&user.len())
        && user.bytes().all(|b| b.is_ascii_graphic())
        && hash.len() == 60
        && ["$2a$", "$2b$", "$2y$"].iter().any(|prefix| hash.starts_with(prefix))
        && hash.bytes().all(|b| b.is_ascii_graphic())
}

fn basic_auth_from_wire(lines: Vec<String>) -> Result<Vec<String>, CodecError> {
    const FIELD: &str = "ClientAuth.basic_auth";
    if lines.len() > MAX_BASIC_AUTH_USERS {
        return Err(CodecError::invalid(FIELD, "more than 16 users"));
    }
    if !lines.iter().all(|line| is_basic_auth_entry(line)) {
        return Err(CodecError::invalid(FIELD, "not a `user:bcrypt-hash` line"));
    }
    for (i, line) in lines.iter().enumerate() {
        let user = line.split_once(':').map(|(user, _)| user);
        if lines[..i].iter().any(|earlier| earlier.split_once(':').map(|(u, _)| u) == user) {
            return Err(CodecError::invalid(FIELD, "one user twice"));
        }
    }
    Ok(lines)
}

/// Whether `text` looks like an address block (`10.0.0.0/8`, `::1`): 2 to 43 characters of
/// hexadecimal digits, `.`, `:` and `/`. The gateway parses it, and refuses one it cannot.
pub fn is_ip_block(text: &str) -> bool {
    (2..=43).contains(&text.len())
        && text.bytes().all(|b| b.is_ascii_hexdigit() || matches!(b, b'.' | b':' | b'/'))
}

fn ip_blocks_from_wire(blocks: Vec<String>, field: &'static str) -> Result<Vec<String>, CodecError> {
    if blocks.len() > MAX_IP_RULES {
        return Err(CodecError::invalid(field, "more than 32 address blocks"));
    }
    if !blocks.iter().all(|b| is_ip_block(b)) {
        return Err(CodecError::invalid(field, "not an address block"));
    }
    Ok(blocks)
}

/// One raw TCP endpoint an agent serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpEndpoint {
    /// How the agent names it ([`is_endpoint_name`]); a reconnecting agent gets the same port
    /// back for the same name.
    pub name: String,
    /// The public port wanted; `None` for any the gateway may give.
    pub port: Option<u16>,
}

/// The gateway's answer for one [`TcpEndpoint`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpBinding {
    /// The endpoint's name.
    pub name: String,
    /// The public port, or why there is none (at most [`MAX_TCP_ERROR_LEN`] bytes).
    pub port: Result<u16, String>,
}

/// Whether `name` may name a TCP endpoint: 1 to 64 printable ASCII characters, no space.
pub fn is_endpoint_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_graphic())
}

/// Limits the gateway applies to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Most streams open at once.
    pub max_streams: u32,
    /// Largest `Data` payload.
    pub max_data_frame_len: u32,
}

/// The gateway accepted the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthAccepted {
    /// Names the session.
    pub session_id: SessionId,
    /// MAC over the server transcript; `None` when the gateway has no secrets.
    pub server_mac: Option<Mac>,
    /// Heartbeat period on the control stream.
    pub heartbeat_interval: Duration,
    /// Session limits.
    pub limits: SessionLimits,
    /// Public URLs that reach the tunnel, for the agent's log.
    pub public_urls: Vec<String>,
    /// The gateway node, when the gateway is one of a cluster: 1 to 64 letters, digits, `.`, `_`
    /// or `-`.
    pub node_id: Option<String>,
    /// One binding per [`ClientAuth::tcp`] endpoint, in order.
    pub tcp: Vec<TcpBinding>,
}

/// Whether `id` is a node id: 1 to 64 letters, digits, `.`, `_` or `-`.
pub fn is_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Why the gateway refused an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AuthErrorCode {
    /// Protocol version mismatch.
    UnsupportedVersion,
    /// A handshake message did not decode.
    Malformed,
    /// The tunnel id does not follow the grammar.
    InvalidTunnelId,
    /// Wrong or missing secret.
    BadCredentials,
    /// No secret is configured for this tunnel id.
    UnknownTunnel,
    /// Too many failures from this address.
    RateLimited,
    /// The gateway is full or shutting down.
    Overloaded,
    /// The agent answered too late.
    HandshakeTimeout,
    /// The gateway requires basic auth for the tunnel and the agent declared no users.
    BasicAuthRequired,
}

impl AuthErrorCode {
    /// The stable snake_case name, used in WebSocket close reasons and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnsupportedVersion => "unsupported_version",
            Self::Malformed => "malformed",
            Self::InvalidTunnelId => "invalid_tunnel_id",
            Self::BadCredentials => "bad_credentials",
            Self::UnknownTunnel => "unknown_tunnel",
            Self::RateLimited => "rate_limited",
            Self::Overloaded => "overloaded",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::BasicAuthRequired => "basic_auth_required",
        }
    }

    /// The fixed message the gateway sends with this code. It never carries detail about the
    /// secret or the transcript; the gateway logs that instead.
    pub fn message(self) -> &'static str {
        match self {
            Self::UnsupportedVersion => "the gateway does not speak this protocol version",
            Self::Malformed => "a handshake message could not be decoded",
            Self::InvalidTunnelId => "the tunnel id must be agent_{uuid}_{purpose}",
            Self::BadCredentials => "authentication failed: check the secret",
            Self::UnknownTunnel => "this gateway has no secret for the tunnel id",
            Self::RateLimited => "too many failed attempts; retry later",
            Self::Overloaded => "the gateway cannot take this session now",
            Self::HandshakeTimeout => "the handshake took too long",
            Self::BasicAuthRequired => "this gateway serves the tunnel only with basic auth",
        }
    }

    /// Whether retrying soon could help (network and load problems) or a person must change
    /// something first (credentials, tunnel id, version).
    pub fn is_transient(self) -> bool {
        matches!(self, Self::RateLimited | Self::Overloaded | Self::HandshakeTimeout)
    }
}

/// The refusal: a code and the fixed message for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthRejected {
    /// Why.
    pub code: AuthErrorCode,
    /// The gateway's text for the code.
    pub message: String,
}

impl From<AuthErrorCode> for AuthRejected {
    fn from(code: AuthErrorCode) -> Self {
        Self { code, message: code.message().to_owned() }
    }
}

/// Gateway → agent, last handshake message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthResult {
    /// The session starts.
    Accepted(AuthAccepted),
    /// The gateway closes the connection.
    Rejected(AuthRejected),
}

/// Defines `encode` / `decode` for a handshake message over its protobuf twin.
macro_rules! handshake_message {
    ($domain:ty, $wire:ty, $name:literal) => {
        impl $domain {
            /// Encodes the message as the whole payload of one WebSocket message.
            pub fn encode(&self) -> Bytes {
                <$wire>::from(self).encode_to_vec().into()
            }

            /// Decodes one WebSocket message.
            ///
            /// # Errors
            /// Longer than [`MAX_HANDSHAKE_LEN`], malformed protobuf, or invalid fields.
            pub fn decode(buf: impl Into<Bytes>) -> Result<Self, CodecError> {
                let buf = buf.into();
                if buf.len() > MAX_HANDSHAKE_LEN {
                    return Err(CodecError::TooLarge {
                        what: $name,
                        len: buf.len(),
                        limit: MAX_HANDSHAKE_LEN,
                    });
                }
                decode_message::<$wire, $domain>(buf, $name)
            }
        }
    };
}

handshake_message!(ServerHello, pb::ServerHello, "ServerHello");
handshake_message!(ClientAuth, pb::ClientAuth, "ClientAuth");
handshake_message!(AuthResult, pb::AuthResult, "AuthResult");

fn check_software_version(text: &str, field: &'static str) -> Result<(), CodecError> {
    let printable = text.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    if text.len() > MAX_SOFTWARE_VERSION_LEN || !printable {
        return Err(CodecError::invalid(field, "must be at most 64 printable ASCII characters"));
    }
    Ok(())
}

fn mac_to_wire(mac: Option<&Mac>) -> Bytes {
    mac.map(|mac| Bytes::copy_from_slice(mac.as_bytes())).unwrap_or_default()
}

fn mac_from_wire(bytes: &[u8], field: &'static str) -> Result<Option<Mac>, CodecError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| CodecError::invalid(field, "must be 32 bytes"))?;
    Ok(Some(Mac::from_bytes(bytes)))
}

impl From<&ServerHello> for pb::ServerHello {
    fn from(hello: &ServerHello) -> Self {
        Self {
            version: hello.version,
            server_nonce: Bytes::copy_from_slice(hello.nonce.as_bytes()),
            gateway_version: hello.gateway_version.clone(),
            auth_required: hello.auth_required,
        }
    }
}

impl TryFrom<pb::ServerHello> for ServerHello {
    type Error = CodecError;

    fn try_from(hello: pb::ServerHello) -> Result<Self, CodecError> {
        if hello.version == 0 {
            return Err(CodecError::MissingField("ServerHello.version"));
        }
        let nonce: [u8; 32] = hello.server_nonce[..]
            .try_into()
            .map_err(|_| CodecError::invalid("ServerHello.server_nonce", "must be 32 bytes"))?;
        check_software_version(&hello.gateway_version, "ServerHello.gateway_version")?;
        Ok(Self {
            version: hello.version,
            nonce: Nonce::from_bytes(nonce),
            gateway_version: hello.gateway_version,
            auth_required: hello.auth_required,
        })
    }
}

impl From<&ClientAuth> for pb::ClientAuth {
    fn from(auth: &ClientAuth) -> Self {
        Self {
            version: auth.version,
            tunnel_id: auth.tunnel_id.to_string(),
            instance_id: Bytes::copy_from_slice(auth.instance_id.as_bytes()),
            agent_version: auth.agent_version.clone(),
            mac: mac_to_wire(auth.mac.as_ref()),
            tcp: auth
                .tcp
                .iter()
                .map(|e| pb::TcpEndpoint { name: e.name.clone(), port: e.port.map_or(0, u32::from) })
                .collect(),
            allow_ip: auth.allow_ip.clone(),
            deny_ip: auth.deny_ip.clone(),
            basic_auth: auth.basic_auth.clone(),
        }
    }
}

fn tcp_endpoints_from_wire(endpoints: Vec<pb::TcpEndpoint>) -> Result<Vec<TcpEndpoint>, CodecError> {
    const FIELD: &str = "ClientAuth.tcp";
    if endpoints.len() > MAX_TCP_ENDPOINTS {
        return Err(CodecError::invalid(FIELD, "more than 8 endpoints"));
    }
    let mut out: Vec<TcpEndpoint> = Vec::with_capacity(endpoints.len());
    for endpoint in endpoints {
        if !is_endpoint_name(&endpoint.name) {
            return Err(CodecError::invalid(FIELD, "a name must be 1..=64 printable ASCII characters"));
        }
        if out.iter().any(|e| e.name == endpoint.name) {
            return Err(CodecError::invalid(FIELD, "two endpoints with one name"));
        }
        let port = u16::try_from(endpoint.port).map_err(|_| CodecError::invalid(FIELD, "port > 65535"))?;
        out.push(TcpEndpoint { name: endpoint.name, port: (port != 0).then_some(port) });
    }
    Ok(out)
}

fn tcp_bindings_to_wire(bindings: &[TcpBinding]) -> Vec<pb::TcpBinding> {
    bindings
        .iter()
        .map(|b| match &b.port {
            Ok(port) => pb::TcpBinding { name: b.name.clone(), port: u32::from(*port), error: String::new() },
            Err(error) => pb::TcpBinding { name: b.name.clone(), port: 0, error: error.clone() },
        })
        .collect()
}

fn tcp_bindings_from_wire(bindings: Vec<pb::TcpBinding>) -> Result<Vec<TcpBinding>, CodecError> {
    const FIELD: &str = "AuthAccepted.tcp";
    if bindings.len() > MAX_TCP_ENDPOINTS {
        return Err(CodecError::invalid(FIELD, "more than 8 bindings"));
    }
    bindings
        .into_iter()
        .map(|b| {
            if !is_endpoint_name(&b.name) {
                return Err(CodecError::invalid(FIELD, "a name must be 1..=64 printable ASCII characters"));
            }
            let port = match (u16::try_from(b.port), b.error.is_empty()) {
                (Ok(port), true) if port != 0 => Ok(port),
                (Ok(0), false)
                    if b.error.len() <= MAX_TCP_ERROR_LEN && !b.error.chars().any(char::is_control) =>
                {
                    Err(b.error)
                }
                _ => return Err(CodecError::invalid(FIELD, "a binding has a port or a short error")),
            };
            Ok(TcpBinding { name: b.name, port })
        })
        .collect()
}

impl TryFrom<pb::ClientAuth> for ClientAuth {
    type Error = CodecError;

    fn try_from(auth: pb::ClientAuth) -> Result<Self, CodecError> {
        if auth.version == 0 {
            return Err(CodecError::MissingField("ClientAuth.version"));
        }
        check_software_version(&auth.agent_version, "ClientAuth.agent_version")?;
        Ok(Self {
            version: auth.version,
            tunnel_id: auth.tunnel_id.parse::<TunnelId>()?,
            instance_id: InstanceId::from_wire(&auth.instance_id)?,
            agent_version: auth.agent_version,
            mac: mac_from_wire(&auth.mac, "ClientAuth.mac")?,
            tcp: tcp_endpoints_from_wire(auth.tcp)?,
            allow_ip: ip_blocks_from_wire(auth.allow_ip, "ClientAuth.allow_ip")?,
            deny_ip: ip_blocks_from_wire(auth.deny_ip, "ClientAuth.deny_ip")?,
            basic_auth: basic_auth_from_wire(auth.basic_auth)?,
        })
    }
}

impl From<AuthErrorCode> for pb::AuthErrorCode {
    fn from(code: AuthErrorCode) -> Self {
        match code {
            AuthErrorCode::UnsupportedVersion => Self::UnsupportedVersion,
            AuthErrorCode::Malformed => Self::Malformed,
            AuthErrorCode::InvalidTunnelId => Self::InvalidTunnelId,
            AuthErrorCode::BadCredentials => Self::BadCredentials,
            AuthErrorCode::UnknownTunnel => Self::UnknownTunnel,
            AuthErrorCode::RateLimited => Self::RateLimited,
            AuthErrorCode::Overloaded => Self::Overloaded,
            AuthErrorCode::HandshakeTimeout => Self::HandshakeTimeout,
            AuthErrorCode::BasicAuthRequired => Self::BasicAuthRequired,
        }
    }
}

impl TryFrom<i32> for AuthErrorCode {
    type Error = CodecError;

    fn try_from(raw: i32) -> Result<Self, CodecError> {
        const FIELD: &str = "AuthRejected.code";
        Ok(match pb::AuthErrorCode::try_from(raw) {
            Ok(pb::AuthErrorCode::UnsupportedVersion) => Self::UnsupportedVersion,
            Ok(pb::AuthErrorCode::Malformed) => Self::Malformed,
            Ok(pb::AuthErrorCode::InvalidTunnelId) => Self::InvalidTunnelId,
            Ok(pb::AuthErrorCode::BadCredentials) => Self::BadCredentials,
            Ok(pb::AuthErrorCode::UnknownTunnel) => Self::UnknownTunnel,
            Ok(pb::AuthErrorCode::RateLimited) => Self::RateLimited,
            Ok(pb::AuthErrorCode::Overloaded) => Self::Overloaded,
            Ok(pb::AuthErrorCode::HandshakeTimeout) => Self::HandshakeTimeout,
            Ok(pb::AuthErrorCode::BasicAuthRequired) => Self::BasicAuthRequired,
            Ok(pb::AuthErrorCode::Unspecified) => return Err(CodecError::MissingField(FIELD)),
            Err(_) => return Err(CodecError::invalid(FIELD, "unknown error code")),
        })
    }
}

impl From<&AuthResult> for pb::AuthResult {
    fn from(result: &AuthResult) -> Self {
        use pb::auth_result::Outcome;
        let outcome = match result {
            AuthResult::Accepted(ok) => Outcome::Accepted(pb::AuthAccepted {
                session_id: Bytes::copy_from_slice(ok.session_id.as_bytes()),
                server_mac: mac_to_wire(ok.server_mac.as_ref()),
                heartbeat_interval_ms: u32::try_from(ok.heartbeat_interval.as_millis()).unwrap_or(u32::MAX),
                limits: Some(pb::SessionLimits {
                    max_streams: ok.limits.max_streams,
                    max_data_frame_len: ok.limits.max_data_frame_len,
                }),
                public_urls: ok.public_urls.clone(),
                node_id: ok.node_id.clone().unwrap_or_default(),
                tcp: tcp_bindings_to_wire(&ok.tcp),
            }),
            AuthResult::Rejected(err) => Outcome::Rejected(pb::AuthRejected {
                code: pb::AuthErrorCode::from(err.code).into(),
                message: err.message.clone(),
            }),
        };
        Self { outcome: Some(outcome) }
    }
}

impl TryFrom<pb::AuthResult> for AuthResult {
    type Error = CodecError;

    fn try_from(result: pb::AuthResult) -> Result<Self, CodecError> {
        use pb::auth_result::Outcome;
        match result.outcome.ok_or(CodecError::MissingField("AuthResult.outcome"))? {
            Outcome::Accepted(ok) => {
                if ok.heartbeat_interval_ms == 0 {
                    return Err(CodecError::MissingField("AuthAccepted.heartbeat_interval_ms"));
                }
                let limits = ok.limits.ok_or(CodecError::MissingField("AuthAccepted.limits"))?;
                if ok.public_urls.iter().any(|url| !url.bytes().all(|b| b.is_ascii_graphic())) {
                    return Err(CodecError::invalid("AuthAccepted.public_urls", "not a URL"));
                }
                if limits.max_streams == 0 || limits.max_data_frame_len == 0 {
                    return Err(CodecError::invalid("AuthAccepted.limits", "limits must be positive"));
                }
                if !ok.node_id.is_empty() && !is_node_id(&ok.node_id) {
                    return Err(CodecError::invalid("AuthAccepted.node_id", "not a node id"));
                }
                Ok(Self::Accepted(AuthAccepted {
                    session_id: SessionId::from_wire(&ok.session_id)?,
                    server_mac: mac_from_wire(&ok.server_mac, "AuthAccepted.server_mac")?,
                    heartbeat_interval: Duration::from_millis(ok.heartbeat_interval_ms.into()),
                    limits: SessionLimits {
                        max_streams: limits.max_streams,
                        max_data_frame_len: limits.max_data_frame_len,
                    },
                    public_urls: ok.public_urls,
                    node_id: (!ok.node_id.is_empty()).then_some(ok.node_id),
                    tcp: tcp_bindings_from_wire(ok.tcp)?,
                }))
            }
            // The message length is bounded by MAX_HANDSHAKE_LEN, checked before decoding.
            Outcome::Rejected(err) => {
                Ok(Self::Rejected(AuthRejected { code: err.code.try_into()?, message: err.message }))
            }
        }
    }
}
