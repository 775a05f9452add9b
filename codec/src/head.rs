//! What a request stream says about HTTP: heads, headers, trailers and abort codes.
//!
//! Headers are bytes, in order, repeats kept: the gateway forwards what the client sent and the
//! agent forwards what the upstream answered, without merging or reordering. Every value decoded
//! from the wire is checked here, once, so a value that reaches hyper is always acceptable to it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::Bytes;

use crate::CodecError;
use crate::pb;

/// Most header fields in one head or trailer block. hyper's HTTP/1 server stops at 100 by default;
/// this leaves room for HTTP/2 clients while bounding the work one frame can cause.
pub const MAX_HEADERS: usize = 1024;
/// Longest method name.
pub const MAX_METHOD_LEN: usize = 32;
/// Longest request id.
pub const MAX_REQUEST_ID_LEN: usize = 128;
/// Longest abort message.
pub const MAX_ABORT_MESSAGE_LEN: usize = 512;

/// One header field: a token name (case kept) and a value with no CR, LF, NUL or other control
/// byte except tab. Always valid: built only through [`Header::new`] or decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    name: Bytes,
    value: Bytes,
}

impl Header {
    /// Checks and builds a header field.
    ///
    /// # Errors
    /// The name is empty or not a token, or the value has a forbidden byte.
    pub fn new(name: impl Into<Bytes>, value: impl Into<Bytes>) -> Result<Self, CodecError> {
        let (name, value) = (name.into(), value.into());
        if !is_token(&name) {
            return Err(CodecError::invalid("Header.name", "not an HTTP token"));
        }
        if !is_value(&value) {
            return Err(CodecError::invalid("Header.value", "contains a control character"));
        }
        Ok(Self { name, value })
    }

    /// A field known at compile time.
    ///
    /// # Panics
    /// The name is not a token or the value has a forbidden byte (a bug in the caller, as with
    /// `http::HeaderName::from_static`).
    pub fn from_static(name: &'static str, value: &'static str) -> Self {
        match Self::new(Bytes::from_static(name.as_bytes()), Bytes::from_static(value.as_bytes())) {
            Ok(header) => header,
            Err(err) => panic!("invalid static header field {name}: {err}"),
        }
    }

    /// Whether the field is called `name` (compared without regard to ASCII case).
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name.as_bytes())
    }

    /// The field value as text, if it is ASCII-compatible UTF-8 (obs-text that is not, is `None`).
    pub fn value_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.value).ok()
    }

    /// The field name, as sent.
    pub fn name(&self) -> &Bytes {
        &self.name
    }

    /// The field value.
    pub fn value(&self) -> &Bytes {
        &self.value
    }

    /// Takes the name and value apart.
    pub fn into_parts(self) -> (Bytes, Bytes) {
        (self.name, self.value)
    }
}

/// `tchar` of RFC 9110 §5.6.2, as a lookup table (header names are checked on every decoded head).
const TCHAR: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(c, b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.')
            || matches!(c, b'^' | b'_' | b'`' | b'|' | b'~');
        b += 1;
    }
    table
};

pub(crate) fn is_token(bytes: &[u8]) -> bool {
    // `fold` rather than `all`: no early exit, so the loop vectorises; valid input is the norm.
    !bytes.is_empty() && bytes.iter().fold(true, |ok, &b| ok & TCHAR[usize::from(b)])
}

/// The bytes `http::HeaderValue` accepts: visible ASCII, space, tab and obs-text.
pub(crate) fn is_value_byte(b: u8) -> bool {
    (b >= 0x20 && b != 0x7f) || b == b'\t'
}

fn is_value(bytes: &[u8]) -> bool {
    bytes.iter().fold(true, |ok, &b| ok & is_value_byte(b))
}

/// HTTP version of a head, as the sender saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HttpVersion {
    /// HTTP/1.0
    Http10,
    /// HTTP/1.1
    Http11,
    /// HTTP/2
    Http2,
    /// HTTP/3
    Http3,
}

/// An HTTP request head, gateway → agent, with the target already routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// A token, like `GET`.
    pub method: String,
    /// Origin-form path and query (`/a/b?c`), or `*`.
    pub target: Bytes,
    /// Version the public client used.
    pub version: HttpVersion,
    /// Header fields, in order, repeats kept.
    pub headers: Vec<Header>,
    /// The public client's address.
    pub client_addr: Option<SocketAddr>,
    /// The gateway's id for the request.
    pub request_id: String,
    /// Exact body length when known; `None` for a body of unknown length.
    pub body_len: Option<u64>,
    /// The gateway routed by path and took `/t/{tunnel_id}` off `target`.
    pub path_routed: bool,
}

/// An HTTP response head, agent → gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// 100..=999.
    pub status: u16,
    /// Version the upstream answered with.
    pub version: HttpVersion,
    /// Header fields, in order, repeats kept.
    pub headers: Vec<Header>,
}

/// A connection to one of the tunnel's public TCP ports, gateway → agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpOpen {
    /// The endpoint, by the name the agent declared ([`crate::handshake::is_endpoint_name`]).
    pub endpoint: String,
    /// The public client's address.
    pub client_addr: SocketAddr,
    /// The gateway's address the client connected to (port 1..=65535).
    pub public_addr: SocketAddr,
}

/// The payload of a `Head` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Head {
    /// Gateway → agent.
    Request(RequestHead),
    /// Agent → gateway.
    Response(ResponseHead),
    /// Gateway → agent: starts a TCP stream.
    TcpOpen(TcpOpen),
    /// Agent → gateway: the upstream connection of a TCP stream is up; raw bytes follow.
    TcpAccepted,
}

/// Trailer fields, sent after the last `Data` frame and before `End`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Trailers {
    /// Trailer fields, in order.
    pub headers: Vec<Header>,
}

/// Why a stream was aborted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AbortCode {
    /// The agent could not connect to its upstream.
    UpstreamUnreachable,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// The upstream closed or reset the connection mid-response.
    UpstreamReset,
    /// The public client went away.
    ClientGone,
    /// The peer broke the framing rules.
    ProtocolError,
    /// The agent refused the request.
    Refused,
    /// A body went over a size limit.
    TooLarge,
    /// The sender is shutting down.
    ShuttingDown,
    /// Anything else.
    Internal,
}

impl AbortCode {
    /// The code's name in `snake_case`, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamReset => "upstream_reset",
            Self::ClientGone => "client_gone",
            Self::ProtocolError => "protocol_error",
            Self::Refused => "refused",
            Self::TooLarge => "too_large",
            Self::ShuttingDown => "shutting_down",
            Self::Internal => "internal",
        }
    }
}

/// The payload of an `Abort` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abort {
    /// Why.
    pub code: AbortCode,
    /// Short detail, safe to show to the public client.
    pub message: String,
}

impl Abort {
    /// An abort with a message.
    pub fn new(code: AbortCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

// ---- wire conversions -------------------------------------------------------------------------

impl From<HttpVersion> for pb::HttpVersion {
    fn from(version: HttpVersion) -> Self {
        match version {
            HttpVersion::Http10 => Self::Http10,
            HttpVersion::Http11 => Self::Http11,
            HttpVersion::Http2 => Self::Http2,
            HttpVersion::Http3 => Self::Http3,
        }
    }
}

fn version_from_wire(raw: i32, field: &'static str) -> Result<HttpVersion, CodecError> {
    match pb::HttpVersion::try_from(raw) {
        Ok(pb::HttpVersion::Http10) => Ok(HttpVersion::Http10),
        Ok(pb::HttpVersion::Http11) => Ok(HttpVersion::Http11),
        Ok(pb::HttpVersion::Http2) => Ok(HttpVersion::Http2),
        Ok(pb::HttpVersion::Http3) => Ok(HttpVersion::Http3),
        Ok(pb::HttpVersion::Unspecified) => Err(CodecError::MissingField(field)),
        Err(_) => Err(CodecError::invalid(field, "unknown HTTP version")),
    }
}

pub(crate) fn headers_to_wire(headers: &[Header]) -> Vec<pb::Header> {
    headers.iter().map(|h| pb::Header { name: h.name.clone(), value: h.value.clone() }).collect()
}

pub(crate) fn headers_from_wire(headers: Vec<pb::Header>) -> Result<Vec<Header>, CodecError> {
    if headers.len() > MAX_HEADERS {
        return Err(CodecError::invalid("headers", "more than MAX_HEADERS fields"));
    }
    headers.into_iter().map(|h| Header::new(h.name, h.value)).collect()
}

fn addr_to_wire(addr: SocketAddr) -> pb::SocketAddress {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => Bytes::copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => Bytes::copy_from_slice(&v6.octets()),
    };
    pb::SocketAddress { ip, port: u32::from(addr.port()) }
}

fn addr_from_wire(addr: pb::SocketAddress, field: &'static str) -> Result<SocketAddr, CodecError> {
    let ip = if let Ok(v4) = <[u8; 4]>::try_from(&addr.ip[..]) {
        IpAddr::V4(Ipv4Addr::from(v4))
    } else if let Ok(v6) = <[u8; 16]>::try_from(&addr.ip[..]) {
        IpAddr::V6(Ipv6Addr::from(v6))
    } else {
        return Err(CodecError::invalid(field, "ip must be 4 or 16 bytes"));
    };
    let port = u16::try_from(addr.port).map_err(|_| CodecError::invalid(field, "port > 65535"))?;
    Ok(SocketAddr::new(ip, port))
}

/// `target` is origin-form (`/…`) or `*`, visible ASCII only.
fn is_valid_target(target: &[u8]) -> bool {
    (target.first() == Some(&b'/') || target == b"*") && target.iter().all(|b| b.is_ascii_graphic())
}

fn is_valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

impl From<&RequestHead> for pb::RequestHead {
    fn from(head: &RequestHead) -> Self {
        Self {
            method: head.method.clone(),
            target: head.target.clone(),
            version: pb::HttpVersion::from(head.version).into(),
            headers: headers_to_wire(&head.headers),
            client_addr: head.client_addr.map(addr_to_wire),
            request_id: head.request_id.clone(),
            body_len: head.body_len,
            path_routed: head.path_routed,
        }
    }
}

impl TryFrom<pb::RequestHead> for RequestHead {
    type Error = CodecError;

    fn try_from(head: pb::RequestHead) -> Result<Self, CodecError> {
        if head.method.is_empty() {
            return Err(CodecError::MissingField("RequestHead.method"));
        }
        if head.method.len() > MAX_METHOD_LEN || !is_token(head.method.as_bytes()) {
            return Err(CodecError::invalid("RequestHead.method", "not an HTTP token"));
        }
        if !is_valid_target(&head.target) {
            return Err(CodecError::invalid("RequestHead.target", "not origin-form or `*`"));
        }
        if !is_valid_request_id(&head.request_id) {
            return Err(CodecError::invalid(
                "RequestHead.request_id",
                "must be 1..=128 characters of [A-Za-z0-9-_.:]",
            ));
        }
        Ok(Self {
            method: head.method,
            target: head.target,
            version: version_from_wire(head.version, "RequestHead.version")?,
            headers: headers_from_wire(head.headers)?,
            client_addr: head
                .client_addr
                .map(|a| addr_from_wire(a, "RequestHead.client_addr"))
                .transpose()?,
            request_id: head.request_id,
            body_len: head.body_len,
            path_routed: head.path_routed,
        })
    }
}

impl From<&ResponseHead> for pb::ResponseHead {
    fn from(head: &ResponseHead) -> Self {
        Self {
            status: u32::from(head.status),
            version: pb::HttpVersion::from(head.version).into(),
            headers: headers_to_wire(&head.headers),
        }
    }
}

impl TryFrom<pb::ResponseHead> for ResponseHead {
    type Error = CodecError;

    fn try_from(head: pb::ResponseHead) -> Result<Self, CodecError> {
        let status = u16::try_from(head.status)
            .ok()
            .filter(|s| (100..=999).contains(s))
            .ok_or(CodecError::invalid("ResponseHead.status", "must be 100..=999"))?;
        Ok(Self {
            status,
            version: version_from_wire(head.version, "ResponseHead.version")?,
            headers: headers_from_wire(head.headers)?,
        })
    }
}

impl From<&TcpOpen> for pb::TcpOpen {
    fn from(open: &TcpOpen) -> Self {
        Self {
            endpoint: open.endpoint.clone(),
            client_addr: Some(addr_to_wire(open.client_addr)),
            public_addr: Some(addr_to_wire(open.public_addr)),
        }
    }
}

impl TryFrom<pb::TcpOpen> for TcpOpen {
    type Error = CodecError;

    fn try_from(open: pb::TcpOpen) -> Result<Self, CodecError> {
        if !crate::handshake::is_endpoint_name(&open.endpoint) {
            return Err(CodecError::invalid("TcpOpen.endpoint", "must be 1..=64 printable ASCII characters"));
        }
        let client_addr = open.client_addr.ok_or(CodecError::MissingField("TcpOpen.client_addr"))?;
        let public_addr = open.public_addr.ok_or(CodecError::MissingField("TcpOpen.public_addr"))?;
        let public_addr = addr_from_wire(public_addr, "TcpOpen.public_addr")?;
        if public_addr.port() == 0 {
            return Err(CodecError::invalid("TcpOpen.public_addr", "port must be 1..=65535"));
        }
        Ok(Self {
            endpoint: open.endpoint,
            client_addr: addr_from_wire(client_addr, "TcpOpen.client_addr")?,
            public_addr,
        })
    }
}

impl From<&Head> for pb::Head {
    fn from(head: &Head) -> Self {
        let kind = match head {
            Head::Request(request) => pb::head::Kind::Request(request.into()),
            Head::Response(response) => pb::head::Kind::Response(response.into()),
            Head::TcpOpen(open) => pb::head::Kind::TcpOpen(open.into()),
            Head::TcpAccepted => pb::head::Kind::TcpAccepted(pb::TcpAccepted {}),
        };
        Self { kind: Some(kind) }
    }
}

impl TryFrom<pb::Head> for Head {
    type Error = CodecError;

    fn try_from(head: pb::Head) -> Result<Self, CodecError> {
        match head.kind.ok_or(CodecError::MissingField("Head.kind"))? {
            pb::head::Kind::Request(request) => Ok(Self::Request(request.try_into()?)),
            pb::head::Kind::Response(response) => Ok(Self::Response(response.try_into()?)),
            pb::head::Kind::TcpOpen(open) => Ok(Self::TcpOpen(open.try_into()?)),
            pb::head::Kind::TcpAccepted(pb::TcpAccepted {}) => Ok(Self::TcpAccepted),
        }
    }
}

impl From<&Trailers> for pb::Trailers {
    fn from(trailers: &Trailers) -> Self {
        Self { headers: headers_to_wire(&trailers.headers) }
    }
}

impl TryFrom<pb::Trailers> for Trailers {
    type Error = CodecError;

    fn try_from(trailers: pb::Trailers) -> Result<Self, CodecError> {
        Ok(Self { headers: headers_from_wire(trailers.headers)? })
    }
}

impl From<AbortCode> for pb::AbortCode {
    fn from(code: AbortCode) -> Self {
        match code {
            AbortCode::UpstreamUnreachable => Self::UpstreamUnreachable,
            AbortCode::UpstreamTimeout => Self::UpstreamTimeout,
            AbortCode::UpstreamReset => Self::UpstreamReset,
            AbortCode::ClientGone => Self::ClientGone,
            AbortCode::ProtocolError => Self::ProtocolError,
            AbortCode::Refused => Self::Refused,
            AbortCode::TooLarge => Self::TooLarge,
            AbortCode::ShuttingDown => Self::ShuttingDown,
            AbortCode::Internal => Self::Internal,
        }
    }
}

impl TryFrom<i32> for AbortCode {
    type Error = CodecError;

    fn try_from(raw: i32) -> Result<Self, CodecError> {
        const FIELD: &str = "Abort.code";
        Ok(match pb::AbortCode::try_from(raw) {
            Ok(pb::AbortCode::UpstreamUnreachable) => Self::UpstreamUnreachable,
            Ok(pb::AbortCode::UpstreamTimeout) => Self::UpstreamTimeout,
            Ok(pb::AbortCode::UpstreamReset) => Self::UpstreamReset,
            Ok(pb::AbortCode::ClientGone) => Self::ClientGone,
            Ok(pb::AbortCode::ProtocolError) => Self::ProtocolError,
            Ok(pb::AbortCode::Refused) => Self::Refused,
            Ok(pb::AbortCode::TooLarge) => Self::TooLarge,
            Ok(pb::AbortCode::ShuttingDown) => Self::ShuttingDown,
            Ok(pb::AbortCode::Internal) => Self::Internal,
            Ok(pb::AbortCode::Unspecified) => return Err(CodecError::MissingField(FIELD)),
            Err(_) => return Err(CodecError::invalid(FIELD, "unknown abort code")),
        })
    }
}

impl From<&Abort> for pb::Abort {
    fn from(abort: &Abort) -> Self {
        Self { code: pb::AbortCode::from(abort.code).into(), message: abort.message.clone() }
    }
}

impl TryFrom<pb::Abort> for Abort {
    type Error = CodecError;

    fn try_from(abort: pb::Abort) -> Result<Self, CodecError> {
        if abort.message.len() > MAX_ABORT_MESSAGE_LEN {
            return Err(CodecError::invalid("Abort.message", "longer than MAX_ABORT_MESSAGE_LEN"));
        }
        Ok(Self { code: abort.code.try_into()?, message: abort.message })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_validation() {
        assert!(Header::new("X-Custom_1", "a b\tc\u{80}").is_ok());
        assert!(Header::new("", "v").is_err());
        assert!(Header::new("bad name", "v").is_err());
        assert!(Header::new("bad:name", "v").is_err());
        assert!(Header::new("x", "line\r\nInjected: yes").is_err());
        assert!(Header::new("x", "nul\0").is_err());
        assert!(Header::new("x", "del\x7f").is_err());
    }

    #[test]
    fn status_out_of_range_is_rejected() {
        for status in [0, 99, 1000, 70_000] {
            let head = pb::ResponseHead { status, version: 2, headers: vec![] };
            assert!(ResponseHead::try_from(head).is_err(), "{status}");
        }
    }

    #[test]
    fn request_target_must_be_origin_form() {
        let mut head = pb::RequestHead {
            method: "GET".into(),
            target: Bytes::from_static(b"/ok?q=1"),
            version: 2,
            headers: vec![],
            client_addr: None,
            request_id: "r1".into(),
            body_len: None,
            path_routed: false,
        };
        assert!(RequestHead::try_from(head.clone()).is_ok());
        for bad in [&b"http://x/"[..], b"", b"/a b", b"/\x01"] {
            head.target = Bytes::copy_from_slice(bad);
            assert!(RequestHead::try_from(head.clone()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn client_addr_must_be_4_or_16_bytes() {
        let addr = pb::SocketAddress { ip: Bytes::from_static(&[1, 2, 3]), port: 80 };
        assert!(addr_from_wire(addr, "RequestHead.client_addr").is_err());
        let addr = pb::SocketAddress { ip: Bytes::from_static(&[127, 0, 0, 1]), port: 70_000 };
        assert!(addr_from_wire(addr, "RequestHead.client_addr").is_err());
    }
}
