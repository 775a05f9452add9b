//! `Arbitrary` for the domain types, behind the `arbitrary` feature: fuzz targets and property
//! tests get *valid* values (every one of them must survive an encode/decode round trip), built
//! through the same constructors and invariants as real ones.

use std::net::SocketAddr;
use std::time::Duration;

use arbitrary::{Arbitrary, Result, Unstructured};
use bytes::Bytes;
use uuid::Uuid;

use crate::auth::{Mac, Nonce};
use crate::control::{ControlMessage, GoAwayReason, HealthState, Stats};
use crate::frame::{Frame, MAX_DATA_LEN};
use crate::handshake::{
    AuthAccepted, AuthErrorCode, AuthRejected, AuthResult, ClientAuth, MAX_TCP_ENDPOINTS, ServerHello,
    SessionLimits, TcpBinding, TcpEndpoint,
};
use crate::head::{
    Abort, AbortCode, Head, Header, HttpVersion, RequestHead, ResponseHead, TcpOpen, Trailers,
};
use crate::id::{InstanceId, MAX_PURPOSE_LEN, SessionId, TunnelId};

/// Characters allowed in an HTTP token.
const TCHARS: &[u8] = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
/// Characters allowed in a tunnel purpose.
const PURPOSE_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-";
/// Characters allowed in a gateway node id.
const NODE_ID_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-";
/// Characters allowed in a request id.
const REQUEST_ID_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:";

/// `min..=max` characters drawn from `alphabet`.
fn text_from(u: &mut Unstructured<'_>, alphabet: &[u8], min: usize, max: usize) -> Result<String> {
    let len = u.int_in_range(min..=max)?;
    (0..len).map(|_| u.choose(alphabet).map(|&b| char::from(b))).collect()
}

/// Up to `max` bytes mapped into `keep` by replacing the others with `fill`.
fn bytes_where(u: &mut Unstructured<'_>, max: usize, keep: fn(u8) -> bool, fill: u8) -> Result<Bytes> {
    let len = u.int_in_range(0..=max)?;
    let raw = u.bytes(len.min(u.len()))?;
    Ok(raw.iter().map(|&b| if keep(b) { b } else { fill }).collect())
}

fn headers(u: &mut Unstructured<'_>) -> Result<Vec<Header>> {
    let count = u.int_in_range(0..=24)?;
    (0..count).map(|_| Header::arbitrary(u)).collect()
}

impl<'a> Arbitrary<'a> for Header {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let name = text_from(u, TCHARS, 1, 40)?;
        let value = bytes_where(u, 200, crate::head::is_value_byte, b' ')?;
        Ok(Self::new(name, value).expect("alphabets match the header grammar"))
    }
}

impl<'a> Arbitrary<'a> for HttpVersion {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        Ok(*u.choose(&[Self::Http10, Self::Http11, Self::Http2, Self::Http3])?)
    }
}

impl<'a> Arbitrary<'a> for RequestHead {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let target = if u.ratio(1, 50)? {
            Bytes::from_static(b"*")
        } else {
            let rest = bytes_where(u, 300, |b| b.is_ascii_graphic(), b'a')?;
            [&b"/"[..], &rest].concat().into()
        };
        Ok(Self {
            method: text_from(u, TCHARS, 1, 12)?,
            target,
            version: u.arbitrary()?,
            headers: headers(u)?,
            // Only ip and port travel: build from those so the round trip is exact.
            client_addr: Option::<(std::net::IpAddr, u16)>::arbitrary(u)?
                .map(|(ip, port)| SocketAddr::new(ip, port)),
            request_id: text_from(u, REQUEST_ID_CHARS, 1, 40)?,
            body_len: u.arbitrary()?,
            path_routed: u.arbitrary()?,
        })
    }
}

impl<'a> Arbitrary<'a> for ResponseHead {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        Ok(Self { status: u.int_in_range(100..=999)?, version: u.arbitrary()?, headers: headers(u)? })
    }
}

impl<'a> Arbitrary<'a> for TcpOpen {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let (ip, port) = <(std::net::IpAddr, u16)>::arbitrary(u)?;
        let (public_ip, public_port) = <(std::net::IpAddr, u16)>::arbitrary(u)?;
        Ok(Self {
            endpoint: endpoint_name(u)?,
            client_addr: SocketAddr::new(ip, port),
            public_addr: SocketAddr::new(public_ip, public_port.max(1)),
        })
    }
}

/// 1 to 64 printable ASCII characters.
fn endpoint_name(u: &mut Unstructured<'_>) -> Result<String> {
    let len = u.int_in_range(1..=64)?;
    (0..len).map(|_| Ok(char::from(u.int_in_range(b'!'..=b'~')?))).collect()
}

impl<'a> Arbitrary<'a> for Head {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        Ok(match u.int_in_range(0..=7)? {
            0..=2 => Self::Request(u.arbitrary()?),
            3..=5 => Self::Response(u.arbitrary()?),
            6 => Self::TcpOpen(u.arbitrary()?),
            _ => Self::TcpAccepted,
        })
    }
}

impl<'a> Arbitrary<'a> for AbortCode {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        Ok(*u.choose(&[
            Self::UpstreamUnreachable,
            Self::UpstreamTimeout,
            Self::UpstreamReset,
            Self::ClientGone,
            Self::ProtocolError,
            Self::Refused,
            Self::TooLarge,
            Self::ShuttingDown,
            Self::Internal,
        ])?)
    }
}

impl<'a> Arbitrary<'a> for Frame {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        Ok(match u.int_in_range(0..=4)? {
            0 => Self::Head(u.arbitrary()?),
            1 => {
                let len = u.int_in_range(0..=MAX_DATA_LEN)?.min(u.len());
                Self::Data(Bytes::copy_from_slice(u.bytes(len)?))
            }
            2 => Self::Trailers(Trailers { headers: headers(u)? }),
            3 => Self::End,
            _ => {
                let message = text_from(u, REQUEST_ID_CHARS, 0, 100)?;
                Self::Abort(Abort { code: u.arbitrary()?, message })
            }
        })
    }
}

fn duration_ms(u: &mut Unstructured<'_>) -> Result<Duration> {
    Ok(Duration::from_millis(u.arbitrary::<u32>()?.into()))
}

impl<'a> Arbitrary<'a> for ControlMessage {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        Ok(match u.int_in_range(0..=5)? {
            0 => Self::Ping { nonce: u.arbitrary()? },
            1 => Self::Pong { nonce: u.arbitrary()? },
            2 => Self::UpstreamHealth {
                state: *u.choose(&[HealthState::Unknown, HealthState::Healthy, HealthState::Unhealthy])?,
                detail: String::arbitrary(u)?.chars().take(200).collect(),
            },
            3 => Self::Drain { grace: duration_ms(u)? },
            4 => Self::GoAway {
                reason: *u.choose(&[
                    GoAwayReason::Shutdown,
                    GoAwayReason::AdminDrain,
                    GoAwayReason::Replaced,
                    GoAwayReason::CredentialsRevoked,
                ])?,
                grace: duration_ms(u)?,
            },
            _ => Self::Stats(Stats {
                streams_in_flight: u.arbitrary()?,
                streams_total: u.arbitrary()?,
                bytes_to_upstream: u.arbitrary()?,
                bytes_from_upstream: u.arbitrary()?,
            }),
        })
    }
}

impl<'a> Arbitrary<'a> for TunnelId {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let first = text_from(u, &PURPOSE_CHARS[..36], 1, 1)?;
        let middle = text_from(u, PURPOSE_CHARS, 0, MAX_PURPOSE_LEN - 2)?;
        // A purpose may not end with `-`: close a non-empty middle with a letter or digit.
        let last = if middle.is_empty() { String::new() } else { text_from(u, &PURPOSE_CHARS[..36], 1, 1)? };
        let uuid = Uuid::from_bytes(u.arbitrary()?);
        Ok(Self::new(uuid, &format!("{first}{middle}{last}")).expect("alphabets match the purpose grammar"))
    }
}

fn software_version(u: &mut Unstructured<'_>) -> Result<String> {
    text_from(u, REQUEST_ID_CHARS, 0, 64)
}

impl<'a> Arbitrary<'a> for ServerHello {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        Ok(Self {
            version: u.int_in_range(1..=u32::MAX)?,
            nonce: Nonce::from_bytes(u.arbitrary()?),
            gateway_version: software_version(u)?,
            auth_required: u.arbitrary()?,
        })
    }
}

impl<'a> Arbitrary<'a> for ClientAuth {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        Ok(Self {
            version: u.int_in_range(1..=u32::MAX)?,
            tunnel_id: u.arbitrary()?,
            instance_id: InstanceId(Uuid::from_bytes(u.arbitrary()?)),
            agent_version: software_version(u)?,
            mac: Option::<[u8; 32]>::arbitrary(u)?.map(Mac::from_bytes),
            tcp: tcp_endpoints(u)?,
            allow_ip: ip_blocks(u)?,
            deny_ip: ip_blocks(u)?,
            basic_auth: basic_auth(u)?,
        })
    }
}

/// A few htpasswd lines with distinct users and hashes of the right shape.
fn basic_auth(u: &mut Unstructured<'_>) -> Result<Vec<String>> {
    const HASH_CHARS: &[u8] = b"./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let count = u.int_in_range(0..=2)?;
    (0..count)
        .map(|i| {
            let salt_and_hash = text_from(u, HASH_CHARS, 53, 53)?;
            Ok(format!("user{i}:$2b$10${salt_and_hash}"))
        })
        .collect()
}

/// A few address blocks, as text.
fn ip_blocks(u: &mut Unstructured<'_>) -> Result<Vec<String>> {
    let count = u.int_in_range(0..=3)?;
    (0..count)
        .map(|_| {
            let (ip, bits) = <(std::net::IpAddr, u8)>::arbitrary(u)?;
            Ok(format!("{ip}/{}", bits % if ip.is_ipv4() { 33 } else { 129 }))
        })
        .collect()
}

/// Up to the most endpoints, with distinct names.
fn tcp_endpoints(u: &mut Unstructured<'_>) -> Result<Vec<TcpEndpoint>> {
    let count = u.int_in_range(0..=MAX_TCP_ENDPOINTS)?;
    (0..count)
        .map(|i| {
            // The leading index keeps the names distinct.
            let mut name = format!("{i}{}", endpoint_name(u)?);
            name.truncate(64);
            let port: u16 = u.arbitrary()?;
            Ok(TcpEndpoint { name, port: (port != 0).then_some(port) })
        })
        .collect()
}

impl<'a> Arbitrary<'a> for AuthResult {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        if u.arbitrary()? {
            return Ok(Self::Rejected(AuthRejected {
                code: *u.choose(&[
                    AuthErrorCode::UnsupportedVersion,
                    AuthErrorCode::Malformed,
                    AuthErrorCode::InvalidTunnelId,
                    AuthErrorCode::BadCredentials,
                    AuthErrorCode::UnknownTunnel,
                    AuthErrorCode::RateLimited,
                    AuthErrorCode::Overloaded,
                    AuthErrorCode::HandshakeTimeout,
                    AuthErrorCode::BasicAuthRequired,
                ])?,
                message: text_from(u, REQUEST_ID_CHARS, 0, 100)?,
            }));
        }
        Ok(Self::Accepted(AuthAccepted {
            session_id: SessionId(Uuid::from_bytes(u.arbitrary()?)),
            server_mac: Option::<[u8; 32]>::arbitrary(u)?.map(Mac::from_bytes),
            heartbeat_interval: Duration::from_millis(u.int_in_range(1..=u32::MAX)?.into()),
            limits: SessionLimits {
                max_streams: u.int_in_range(1..=u32::MAX)?,
                max_data_frame_len: u.int_in_range(1..=u32::MAX)?,
            },
            public_urls: (0..u.int_in_range(0..=2)?)
                .map(|_| text_from(u, REQUEST_ID_CHARS, 0, 60).map(|path| format!("http://x/{path}")))
                .collect::<Result<_>>()?,
            node_id: if u.arbitrary()? { Some(text_from(u, NODE_ID_CHARS, 1, 64)?) } else { None },
            tcp: tcp_endpoints(u)?
                .into_iter()
                .map(|e| {
                    let port = match e.port {
                        Some(port) => Ok(port),
                        None => Err(text_from(u, REQUEST_ID_CHARS, 1, 100)?),
                    };
                    Ok(TcpBinding { name: e.name, port })
                })
                .collect::<Result<_>>()?,
        }))
    }
}
