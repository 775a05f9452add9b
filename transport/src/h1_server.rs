//! HTTP/1.1 on the gateway's public connections, the server side: request heads parsed with
//! `httparse` into `http`'s request parts, request bodies framed by length or by chunks
//! (RFC 9112 §6.3, decoded by [`h1::decode`](crate::h1::decode)), response heads written for the
//! wire.
//!
//! Pure parts, free of I/O, as [`h1`](crate::h1) is for the agent's client. They are the first
//! half of the gateway's own HTTP/1.1 connection, which is to replace hyper's: hyper holds, per
//! public connection, an 8 KiB write buffer from its first byte and a read buffer that grows to
//! 16 KiB on the first request (its 8 KiB buffer is still shared with the request's header
//! values when it reads on, so it cannot be reused). That is 24 of the 32 KB the gateway's
//! thread holds per idle keep-alive connection (`cargo bench -p ferry-benches --bench counts`).
//! The `h1_request` fuzz target feeds them arbitrary bytes.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, StatusCode, Uri, Version};

use crate::h1::{Chunked, Framing, connection_keeps_alive, content_length};

/// The HTTP/2 connection preface (RFC 9113 §3.4): a client with prior knowledge opens with it.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Header fields parsed in an array on the stack; a limit above this takes a heap array for the
/// heads that need it.
const FIELDS_ON_STACK: usize = 128;

/// Fields a request's map has room for beyond its own.
const FIELDS_ADDED: usize = 6;

/// Limits on a request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// The whole head: request line, fields, and the empty line.
    pub max_head_bytes: usize,
    /// Header fields.
    pub max_headers: usize,
    /// The request target.
    pub max_uri_length: usize,
}

/// Why a client's bytes are not a request the gateway can take; [`RequestError::status`] is the
/// answer it gets, and the connection closes after it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not an HTTP/1.x request line and fields.
    #[error("malformed request head: {0}")]
    Head(httparse::Error),
    /// A well-formed request line of an HTTP version other than 1.0 and 1.1.
    #[error("unsupported HTTP version")]
    UnsupportedVersion,
    /// The head did not end within the limit.
    #[error("request head larger than {0} bytes")]
    HeadTooLarge(usize),
    /// More fields than the limit.
    #[error("more than {0} header fields")]
    TooManyHeaders(usize),
    /// A request target over the limit.
    #[error("request target longer than {0} bytes")]
    UriTooLong(usize),
    /// A request target `http` does not accept.
    #[error("invalid request target")]
    Target,
    /// A field name or value `http` does not accept.
    #[error("invalid header field")]
    Field,
    /// RFC 9112 §6.3: an invalid `Content-Length` is unrecoverable.
    #[error("invalid or conflicting Content-Length")]
    ContentLength,
    /// Both framings at once: the classic request-smuggling shape (RFC 9112 §6.3 allows
    /// answering it with 400, which is what every hop that disagrees on it should do).
    #[error("both Transfer-Encoding and Content-Length")]
    LengthAndCoding,
    /// `chunked` missing, repeated or not last (RFC 9112 §6.3: 400 and close).
    #[error("chunked is not the final transfer coding, once")]
    NotChunked,
    /// RFC 9112 §6.1: `Transfer-Encoding` in HTTP/1.0 means the framing is faulty.
    #[error("Transfer-Encoding in an HTTP/1.0 request")]
    CodingInHttp10,
    /// A transfer coding the gateway does not decode (RFC 9112 §6.1: 501).
    #[error("unsupported transfer coding")]
    UnknownCoding,
}

impl RequestError {
    /// The status the client is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::HeadTooLarge(_) | Self::TooManyHeaders(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            Self::UnsupportedVersion => StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            Self::UnknownCoding => StatusCode::NOT_IMPLEMENTED,
            Self::Head(_)
            | Self::Target
            | Self::Field
            | Self::ContentLength
            | Self::LengthAndCoding
            | Self::CodingInHttp10
            | Self::NotChunked => StatusCode::BAD_REQUEST,
        }
    }
}

/// Whether `buf` starts the HTTP/2 preface: `Some(true)` it does, `Some(false)` it does not,
/// `None` too few bytes to tell.
pub fn is_h2_preface(buf: &[u8]) -> Option<bool> {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] != H2_PREFACE[..n] {
        Some(false)
    } else if n == H2_PREFACE.len() {
        Some(true)
    } else {
        None
    }
}

/// Whether the request line at the start of `buf` is `METHOD TARGET HTTP/d.d`: a version
/// httparse refused is then one we do not speak (505), not a malformed line (400). `None`: the
/// line has not ended and may still be either.
fn names_another_version(buf: &[u8]) -> Option<bool> {
    let (line, ended) = match buf.iter().position(|&b| b == b'\n') {
        Some(end) => (&buf[..end], true),
        None => (buf, false),
    };
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ');
    let (Some(_method), Some(_target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Some(false);
    };
    const SHAPE: &[u8] = b"HTTP/d.d";
    let fits = version.len() <= SHAPE.len()
        && version.iter().zip(SHAPE).all(|(&b, &s)| if s == b'd' { b.is_ascii_digit() } else { b == s });
    match (fits, ended) {
        (false, _) => Some(false),
        (true, true) => Some(version.len() == SHAPE.len()),
        (true, false) => None,
    }
}

/// A parsed request head and what it says about its body and its connection.
#[derive(Debug)]
pub struct RequestHead {
    /// Method, target, version and fields (values are views of the read buffer, not copies).
    pub parts: Parts,
    /// How the body is framed: [`Framing::Empty`], `Length` or `Chunked`, never `Close`.
    pub framing: Framing,
    /// The connection may carry another request after this one (RFC 9112 §9.3).
    pub keep_alive: bool,
    /// `Expect: 100-continue` (HTTP/1.1): the client waits for `100` before it sends the body.
    pub expects_continue: bool,
}

/// Parses a request head at the start of `buf`. `Ok(None)`: more bytes are needed (and `buf` is
/// within the limit). On success the head's bytes are taken off `buf`.
///
/// # Errors
/// The bytes are not a request head the gateway takes, or they are over a limit.
pub fn parse_request(buf: &mut BytesMut, limits: &HeadLimits) -> Result<Option<RequestHead>, RequestError> {
    match parse_with(buf, limits, false) {
        Err(RequestError::TooManyHeaders(_)) if limits.max_headers > FIELDS_ON_STACK => {
            parse_with(buf, limits, true)
        }
        other => other,
    }
}

/// [`parse_request`] with httparse's field array on the stack, or (`heap`) as long as the limit.
fn parse_with(
    buf: &mut BytesMut,
    limits: &HeadLimits,
    heap: bool,
) -> Result<Option<RequestHead>, RequestError> {
    // Parsed in place, the parts located by offset (`u32`: a head longer than 4 GiB is refused
    // below), then the head is split off and frozen so that the target and the values are views
    // of it (as `h1::parse_response` does). httparse's array is left uninitialised.
    let mut stack_ranges = [(0u32, 0u32, 0u32, 0u32); FIELDS_ON_STACK];
    let mut heap_ranges = Vec::new();
    let (len, method, target, minor, ranges) = {
        let mut stack_fields = [const { MaybeUninit::uninit() }; FIELDS_ON_STACK];
        let mut heap_fields = Vec::new();
        let fields: &mut [MaybeUninit<httparse::Header<'_>>] = if heap {
            heap_fields.resize_with(limits.max_headers, MaybeUninit::uninit);
            &mut heap_fields
        } else {
            &mut stack_fields
        };
        let mut request = httparse::Request::new(&mut []);
        let parsed =
            httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut request, buf, fields);
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => {
                if buf.len() > limits.max_head_bytes {
                    return Err(RequestError::HeadTooLarge(limits.max_head_bytes));
                }
                if request.path.is_some_and(|path| path.len() > limits.max_uri_length) {
                    return Err(RequestError::UriTooLong(limits.max_uri_length));
                }
                return Ok(None);
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Err(RequestError::TooManyHeaders(limits.max_headers));
            }
            Err(httparse::Error::Version) => match names_another_version(buf) {
                Some(true) => return Err(RequestError::UnsupportedVersion),
                Some(false) => return Err(RequestError::Head(httparse::Error::Version)),
                None if buf.len() > limits.max_head_bytes => {
                    return Err(RequestError::HeadTooLarge(limits.max_head_bytes));
                }
                None => return Ok(None),
            },
            Err(err) => return Err(RequestError::Head(err)),
        };
        if len > limits.max_head_bytes || u32::try_from(len).is_err() {
            return Err(RequestError::HeadTooLarge(limits.max_head_bytes));
        }
        let count = request.headers.len();
        if count > limits.max_headers {
            return Err(RequestError::TooManyHeaders(limits.max_headers));
        }
        let path = request.path.unwrap_or("");
        if path.len() > limits.max_uri_length {
            return Err(RequestError::UriTooLong(limits.max_uri_length));
        }
        let method = Method::from_bytes(request.method.unwrap_or("").as_bytes())
            .map_err(|_| RequestError::Head(httparse::Error::Token))?;
        let base = buf.as_ptr() as usize;
        // Within the head, so below `len`: the casts cannot truncate.
        let offset = |part: &[u8]| (part.as_ptr() as usize - base) as u32;
        let target = (offset(path.as_bytes()), path.len() as u32);
        let ranges: &mut [(u32, u32, u32, u32)] = if count <= FIELDS_ON_STACK {
            &mut stack_ranges[..count]
        } else {
            heap_ranges.resize(count, (0, 0, 0, 0));
            &mut heap_ranges
        };
        for (range, field) in ranges.iter_mut().zip(request.headers.iter()) {
            let (name, value) = (offset(field.name.as_bytes()), offset(field.value));
            *range = (name, name + field.name.len() as u32, value, value + field.value.len() as u32);
        }
        (len, method, target, request.version.unwrap_or(1), ranges)
    };
    let head = buf.split_to(len).freeze();
    let slice = |start: u32, end: u32| head.slice(start as usize..end as usize);
    let uri =
        Uri::from_maybe_shared(slice(target.0, target.0 + target.1)).map_err(|_| RequestError::Target)?;
    // Room for the fields a proxy adds (`X-Forwarded-*`, `Forwarded`, `Via`): growing the map
    // for them would reallocate it, twice or three times per request.
    let mut headers = HeaderMap::with_capacity(ranges.len() + FIELDS_ADDED);
    for &(name_start, name_end, value_start, value_end) in ranges.iter() {
        let name = HeaderName::from_bytes(&head[name_start as usize..name_end as usize])
            .map_err(|_| RequestError::Field)?;
        let value =
            HeaderValue::from_maybe_shared(slice(value_start, value_end)).map_err(|_| RequestError::Field)?;
        headers.append(name, value);
    }
    let version = if minor == 0 { Version::HTTP_10 } else { Version::HTTP_11 };
    let framing = request_framing(version, &headers)?;
    let keep_alive = connection_keeps_alive(
        version,
        headers.get_all(header::CONNECTION).into_iter().map(|value| value.to_str().ok()),
    );
    let expects_continue = version == Version::HTTP_11
        && headers
            .get_all(header::EXPECT)
            .iter()
            .any(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(RequestHead { parts, framing, keep_alive, expects_continue }))
}

/// How a request's body is framed (RFC 9112 §6.3): chunked when `Transfer-Encoding` is
/// `chunked` alone, else `Content-Length`, else none.
///
/// # Errors
/// Both framings; `chunked` missing, repeated or not last (400); other codings (501); codings in
/// HTTP/1.0; a bad `Content-Length`.
pub fn request_framing(version: Version, headers: &HeaderMap) -> Result<Framing, RequestError> {
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter().peekable();
    if codings.peek().is_some() {
        if version == Version::HTTP_10 {
            return Err(RequestError::CodingInHttp10);
        }
        if headers.contains_key(header::CONTENT_LENGTH) {
            return Err(RequestError::LengthAndCoding);
        }
        let (mut chunked, mut other, mut last_chunked) = (0, 0, false);
        for value in codings {
            let value = value.to_str().map_err(|_| RequestError::NotChunked)?;
            for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                last_chunked = coding.eq_ignore_ascii_case("chunked");
                if last_chunked {
                    chunked += 1;
                } else {
                    other += 1;
                }
            }
        }
        return match (last_chunked, chunked, other) {
            (true, 1, 0) => Ok(Framing::Chunked(Chunked::Size)),
            // gzip, deflate, compress before the chunks: codings the gateway does not undo.
            (true, 1, _) => Err(RequestError::UnknownCoding),
            _ => Err(RequestError::NotChunked),
        };
    }
    let values = headers.get_all(header::CONTENT_LENGTH).into_iter().map(|value| value.to_str().ok());
    let length = content_length(values).map_err(|()| RequestError::ContentLength)?;
    Ok(match length {
        None | Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
    })
}

/// How a response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// No body bytes follow: `HEAD`, `1xx`, `204`, `304`; `Content-Length` as the fields say.
    Bodiless,
    /// `Content-Length: n`, written by this function.
    Length(u64),
    /// `Transfer-Encoding: chunked`, written by this function.
    Chunked,
    /// Up to the connection's end (an HTTP/1.0 client, whom chunks would not reach).
    Close,
}

/// A response head for the wire: `HTTP/1.1`, the status, `date` unless the fields carry one,
/// the fields (hop-by-hop fields must already be gone; `Content-Length` and `Transfer-Encoding`
/// are replaced by what `framing` says, except for a bodiless answer, whose fields keep the
/// length the body would have had), and `connection: close` when `keep_alive` is false.
/// Written into `dst` (whose room is reused once the previous head is gone) and split off it.
pub fn response_head(
    status: StatusCode,
    headers: &HeaderMap,
    framing: ResponseFraming,
    keep_alive: bool,
    date: &[u8],
    dst: &mut BytesMut,
) -> Bytes {
    let skip = |name: &HeaderName| {
        framing != ResponseFraming::Bodiless
            && (name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING)
    };
    let mut digits = [0; 20];
    let framing_line: [&[u8]; 3] = match framing {
        ResponseFraming::Bodiless | ResponseFraming::Close => [b"", b"", b""],
        ResponseFraming::Length(n) => [b"content-length: ", crate::h1::itoa(n, &mut digits), b"\r\n"],
        ResponseFraming::Chunked => [b"transfer-encoding: chunked\r\n", b"", b""],
    };
    let date_line: [&[u8]; 3] =
        if headers.contains_key(header::DATE) { [b"", b"", b""] } else { [b"date: ", date, b"\r\n"] };
    let close_line: &[u8] = if keep_alive { b"" } else { b"connection: close\r\n" };
    let reason = status.canonical_reason().unwrap_or("").as_bytes();
    let fields: usize = headers
        .iter()
        .filter(|(name, _)| !skip(name))
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    let size = b"HTTP/1.1 000 \r\n".len()
        + reason.len()
        + date_line.iter().map(|part| part.len()).sum::<usize>()
        + fields
        + framing_line.iter().map(|part| part.len()).sum::<usize>()
        + close_line.len()
        + 2;
    dst.clear();
    // A little over the size, so that most later heads fit in the same room.
    dst.reserve(size.max(256));
    dst.extend_from_slice(b"HTTP/1.1 ");
    dst.extend_from_slice(status.as_str().as_bytes());
    dst.extend_from_slice(b" ");
    dst.extend_from_slice(reason);
    dst.extend_from_slice(b"\r\n");
    for part in date_line {
        dst.extend_from_slice(part);
    }
    for (name, value) in headers.iter().filter(|(name, _)| !skip(name)) {
        dst.extend_from_slice(name.as_str().as_bytes());
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    for part in framing_line {
        dst.extend_from_slice(part);
    }
    dst.extend_from_slice(close_line);
    dst.extend_from_slice(b"\r\n");
    debug_assert_eq!(dst.len(), size);
    crate::stats::copied(dst.len());
    dst.split().freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::h1::{Decoded, decode, is_bodiless, parse_response};

    const LIMITS: HeadLimits = HeadLimits { max_head_bytes: 1024, max_headers: 8, max_uri_length: 64 };

    fn parse(text: &str) -> Result<Option<RequestHead>, RequestError> {
        parse_request(&mut BytesMut::from(text), &LIMITS)
    }

    fn head(text: &str) -> RequestHead {
        parse(text).expect("parses").expect("complete")
    }

    #[test]
    fn parses_a_head_fed_byte_by_byte_and_leaves_the_body() {
        let wire = "POST /t/x/y?q=1 HTTP/1.1\r\nHost: a.example\r\nX-One: 1\r\nx-one: 2\r\nContent-Length: 5\r\n\r\nhello";
        let mut buf = BytesMut::new();
        let mut parsed = None;
        for (i, byte) in wire.bytes().enumerate() {
            buf.extend_from_slice(&[byte]);
            match parse_request(&mut buf, &LIMITS).unwrap() {
                Some(head) => {
                    parsed = Some((i, head));
                    break;
                }
                None => continue,
            }
        }
        let (at, head) = parsed.expect("complete");
        assert_eq!(at, wire.len() - 6, "complete at the empty line, not before");
        assert_eq!(head.parts.method, Method::POST);
        assert_eq!(head.parts.uri, "/t/x/y?q=1");
        assert_eq!(head.parts.version, Version::HTTP_11);
        assert_eq!(head.parts.headers["host"], "a.example");
        let ones: Vec<_> = head.parts.headers.get_all("x-one").iter().collect();
        assert_eq!(ones, ["1", "2"], "repeats kept in order");
        assert_eq!(head.framing, Framing::Length(5));
        assert!(head.keep_alive && !head.expects_continue);
        assert!(buf.is_empty(), "the body's first byte is not read yet");
        buf.extend_from_slice(b"hello");
        let mut framing = head.framing;
        assert_eq!(decode(&mut framing, &mut buf, false), Ok(Decoded::Data(Bytes::from_static(b"hello"))));
        assert_eq!(decode(&mut framing, &mut buf, false), Ok(Decoded::End));
    }

    #[test]
    fn pipelined_requests_come_one_at_a_time() {
        let mut buf =
            BytesMut::from("GET /a HTTP/1.1\r\nHost: h\r\n\r\nHEAD /b HTTP/1.1\r\nHost: h\r\n\r\nGET /c");
        let first = parse_request(&mut buf, &LIMITS).unwrap().unwrap();
        let second = parse_request(&mut buf, &LIMITS).unwrap().unwrap();
        assert_eq!((first.parts.uri.path(), second.parts.method), ("/a", Method::HEAD));
        assert_eq!(second.framing, Framing::Empty);
        assert!(parse_request(&mut buf, &LIMITS).unwrap().is_none());
        assert_eq!(&buf[..], b"GET /c");
    }

    #[test]
    fn targets_in_every_form() {
        assert_eq!(
            head("GET http://h.example:8080/p?q HTTP/1.1\r\n\r\n").parts.uri.host(),
            Some("h.example")
        );
        assert_eq!(head("OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n").parts.uri, "*");
        let connect = head("CONNECT h.example:443 HTTP/1.1\r\nHost: h.example:443\r\n\r\n");
        assert_eq!(connect.parts.uri.authority().map(|a| a.as_str()), Some("h.example:443"));
        assert_eq!(head("PURGE /x HTTP/1.1\r\n\r\n").parts.method.as_str(), "PURGE");
    }

    #[test]
    fn limits_and_malformed_heads_get_their_status() {
        let status = |text: &str| parse(text).map(|_| StatusCode::OK).unwrap_or_else(|err| err.status());
        let long_uri = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(64));
        assert_eq!(status(&long_uri), StatusCode::URI_TOO_LONG);
        // Known as soon as the request line is, before the head ends.
        assert_eq!(parse(&long_uri[..long_uri.len() - 4]).unwrap_err(), RequestError::UriTooLong(64));
        assert_eq!(status(&format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(63))), StatusCode::OK);
        let big = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "v".repeat(1024));
        assert_eq!(status(&big), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        assert_eq!(
            parse(&big[..1030]).unwrap_err(),
            RequestError::HeadTooLarge(1024),
            "a head that never ends"
        );
        let fields = |n: usize| (0..n).map(|i| format!("x-{i}: v\r\n")).collect::<String>();
        assert_eq!(status(&format!("GET / HTTP/1.1\r\n{}\r\n", fields(8))), StatusCode::OK);
        assert_eq!(
            status(&format!("GET / HTTP/1.1\r\n{}\r\n", fields(9))),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        assert_eq!(status("GET / HTTP/2.0\r\n\r\n"), StatusCode::HTTP_VERSION_NOT_SUPPORTED);
        assert_eq!(status("GET / HTTP/1.2\r\nHost: h\r\n\r\n"), StatusCode::HTTP_VERSION_NOT_SUPPORTED);
        // Refused by httparse at its first byte, told apart once the line ends.
        for cut in ["GET / HTTP/2", "GET / HTTP/2.", "GET / HTTP/2.0", "GET / HTTP/2.0\r"] {
            assert!(parse(cut).unwrap().is_none(), "{cut:?}");
        }
        assert_eq!(status("GET / HTTP/2.0x"), StatusCode::BAD_REQUEST);
        for bad in [
            "GET  / HTTP/1.1\r\n\r\n",
            "GE(T / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nbad field: v\r\n\r\n",
            "GET / HTTP/1.1\r\nx: a\x01b\r\n\r\n",
            "GET / HTTP/1.1\r\n x: folded\r\n\r\n",
            "GET /a b HTTP/1.1\r\n\r\n",
            "\u{1}\r\n\r\n",
            "GET / HTTP/1.1 x\r\n\r\n",
            "GET / HTTP/11\r\n\r\n",
        ] {
            assert_eq!(status(bad), StatusCode::BAD_REQUEST, "{bad:?}");
        }
    }

    #[test]
    fn a_limit_above_the_stack_array_takes_the_heap() {
        let limits = HeadLimits { max_head_bytes: 64 * 1024, max_headers: 200, max_uri_length: 64 };
        let fields = |n: usize| (0..n).map(|i| format!("x-{i}: v\r\n")).collect::<String>();
        let ok = format!("GET / HTTP/1.1\r\n{}\r\n", fields(200));
        let head = parse_request(&mut BytesMut::from(ok.as_str()), &limits).unwrap().unwrap();
        assert_eq!(head.parts.headers.len(), 200);
        assert_eq!(head.parts.headers["x-199"], "v");
        let over = format!("GET / HTTP/1.1\r\n{}\r\n", fields(201));
        assert_eq!(
            parse_request(&mut BytesMut::from(over.as_str()), &limits).unwrap_err(),
            RequestError::TooManyHeaders(200)
        );
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let framing =
            |fields: &str| parse(&format!("POST / HTTP/1.1\r\n{fields}\r\n")).map(|h| h.unwrap().framing);
        assert_eq!(framing(""), Ok(Framing::Empty));
        assert_eq!(framing("content-length: 0\r\n"), Ok(Framing::Empty));
        assert_eq!(framing("content-length: 7\r\n"), Ok(Framing::Length(7)));
        assert_eq!(framing("content-length: 7, 7\r\ncontent-length: 7\r\n"), Ok(Framing::Length(7)));
        assert_eq!(framing("transfer-encoding: chunked\r\n"), Ok(Framing::Chunked(Chunked::Size)));
        assert_eq!(framing("Transfer-Encoding: CHUNKED\r\n"), Ok(Framing::Chunked(Chunked::Size)));
        for (fields, err) in [
            ("content-length: 7, 8\r\n", RequestError::ContentLength),
            ("content-length: +7\r\n", RequestError::ContentLength),
            ("content-length: \r\n", RequestError::ContentLength),
            ("content-length: 99999999999999999999999\r\n", RequestError::ContentLength),
            ("transfer-encoding: chunked\r\ncontent-length: 5\r\n", RequestError::LengthAndCoding),
            ("transfer-encoding: gzip\r\n", RequestError::NotChunked),
            ("transfer-encoding: chunked, gzip\r\n", RequestError::NotChunked),
            ("transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n", RequestError::NotChunked),
            ("transfer-encoding: gzip, chunked\r\n", RequestError::UnknownCoding),
        ] {
            assert_eq!(framing(fields), Err(err.clone()), "{fields:?}");
        }
        assert_eq!(RequestError::UnknownCoding.status(), StatusCode::NOT_IMPLEMENTED);
        assert_eq!(
            parse("POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n").unwrap_err(),
            RequestError::CodingInHttp10
        );
    }

    #[test]
    fn a_chunked_body_follows_its_head() {
        let mut buf = BytesMut::from(
            "POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-sum: 1\r\n\r\nGET",
        );
        let head = parse_request(&mut buf, &LIMITS).unwrap().unwrap();
        let mut framing = head.framing;
        assert_eq!(decode(&mut framing, &mut buf, false), Ok(Decoded::Data(Bytes::from_static(b"hello"))));
        match decode(&mut framing, &mut buf, false) {
            Ok(Decoded::Trailers(trailers)) => assert_eq!(trailers["x-sum"], "1"),
            other => panic!("{other:?}"),
        }
        assert_eq!(&buf[..], b"GET", "the next request is left in the buffer");
    }

    #[test]
    fn keep_alive_and_expect_rules() {
        let of = |text: &str| {
            let head = head(text);
            (head.keep_alive, head.expects_continue)
        };
        assert_eq!(of("GET / HTTP/1.1\r\n\r\n"), (true, false));
        assert_eq!(of("GET / HTTP/1.1\r\nConnection: Upgrade, Close\r\n\r\n"), (false, false));
        assert_eq!(of("GET / HTTP/1.0\r\n\r\n"), (false, false));
        assert_eq!(of("GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n"), (true, false));
        assert_eq!(of("PUT / HTTP/1.1\r\nExpect: 100-Continue\r\ncontent-length: 1\r\n\r\n"), (true, true));
        assert_eq!(of("PUT / HTTP/1.0\r\nExpect: 100-continue\r\ncontent-length: 1\r\n\r\n"), (false, false));
    }

    #[test]
    fn the_h2_preface_is_told_apart() {
        assert_eq!(is_h2_preface(b""), None);
        assert_eq!(is_h2_preface(b"PRI * HTTP/2"), None);
        assert_eq!(is_h2_preface(H2_PREFACE), Some(true));
        assert_eq!(is_h2_preface(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0"), Some(true));
        assert_eq!(is_h2_preface(b"GET / HTTP/1.1\r\n"), Some(false));
        assert_eq!(is_h2_preface(b"P"), None);
        assert_eq!(is_h2_preface(b"PRO"), Some(false));
    }

    #[test]
    fn response_heads_read_back_as_written() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        headers.insert("content-length", HeaderValue::from_static("999"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        let date = b"Fri, 04 Dec 2026 12:00:00 GMT";
        let read_with = |headers: &HeaderMap, framing, keep_alive| {
            let wire =
                response_head(StatusCode::CREATED, headers, framing, keep_alive, date, &mut BytesMut::new());
            let mut buf = BytesMut::from(&wire[..]);
            let head = parse_response(&mut buf, 64 * 1024).unwrap().unwrap();
            assert!(buf.is_empty());
            let fields: Vec<(String, String)> = head
                .headers
                .iter()
                .map(|f| {
                    (
                        String::from_utf8_lossy(f.name()).into_owned(),
                        String::from_utf8_lossy(f.value()).into_owned(),
                    )
                })
                .collect();
            (head.status, fields)
        };
        let read = |framing, keep_alive| read_with(&headers, framing, keep_alive);
        let pair = |n: &str, v: &str| (n.to_owned(), v.to_owned());
        let (status, fields) = read(ResponseFraming::Length(5), true);
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(
            fields,
            [
                pair("date", "Fri, 04 Dec 2026 12:00:00 GMT"),
                pair("content-type", "text/plain"),
                pair("set-cookie", "a=1"),
                pair("set-cookie", "b=2"),
                pair("content-length", "5"),
            ]
        );
        let (_, fields) = read(ResponseFraming::Chunked, false);
        assert_eq!(
            fields[fields.len() - 2..],
            [pair("transfer-encoding", "chunked"), pair("connection", "close")]
        );
        let (_, fields) = read(ResponseFraming::Close, false);
        assert!(!fields.iter().any(|(n, _)| n == "content-length" || n == "transfer-encoding"));
        // A HEAD answer keeps the length the body would have had.
        let (_, fields) = read(ResponseFraming::Bodiless, true);
        assert!(fields.contains(&pair("content-length", "999")));
        // The fields' own Date wins.
        let mut dated = headers.clone();
        dated.insert("date", HeaderValue::from_static("Thu, 01 Jan 2026 00:00:00 GMT"));
        let (_, fields) = read_with(&dated, ResponseFraming::Length(0), true);
        assert_eq!(fields.iter().filter(|(n, _)| n == "date").count(), 1);
        assert!(fields.contains(&pair("date", "Thu, 01 Jan 2026 00:00:00 GMT")));
        let custom = response_head(
            StatusCode::from_u16(599).unwrap(),
            &HeaderMap::new(),
            ResponseFraming::Length(0),
            true,
            date,
            &mut BytesMut::new(),
        );
        assert!(custom.starts_with(b"HTTP/1.1 599 \r\n"));
    }

    #[test]
    fn bodiless_answers() {
        assert!(is_bodiless(&Method::HEAD, StatusCode::OK));
        assert!(is_bodiless(&Method::GET, StatusCode::NOT_MODIFIED));
        assert!(is_bodiless(&Method::GET, StatusCode::NO_CONTENT));
        assert!(is_bodiless(&Method::GET, StatusCode::CONTINUE));
        assert!(!is_bodiless(&Method::GET, StatusCode::OK));
    }
}
