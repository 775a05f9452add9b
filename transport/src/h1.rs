//! HTTP/1.1 on the agent's upstream connections, the client side: request heads written from the
//! tunnel's head, response heads parsed with `httparse`, bodies framed by length, by chunks or by
//! the connection's end (RFC 9112 §6).
//!
//! These are the pure parts, free of I/O; the agent's upstream pool (`agent/src/pool.rs`) drives
//! them over a connection. They replace hyper's client connection, which kept per upstream
//! connection a task, a request channel (11 KB of blocks) and read and write buffers: about 45 KB
//! per connection in flight (heaptrack), where the pool keeps one read buffer per connection.
//! The `h1_response` fuzz target feeds them arbitrary bytes.

use bytes::{Buf, Bytes, BytesMut};
use ferry_codec::Header;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

/// Most header fields a response head or a trailer section may carry.
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (with extensions) we wait for.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// Why an upstream's bytes are not HTTP/1.1 we can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The head is not an HTTP/1.x status line and fields.
    #[error("malformed response head: {0}")]
    Head(httparse::Error),
    /// The head did not end within the limit.
    #[error("response head larger than {0} bytes")]
    HeadTooLarge(usize),
    /// A field name or value `http` does not accept.
    #[error("invalid header field in the response")]
    Field,
    /// RFC 9112 §6.3: an invalid `Content-Length` is unrecoverable.
    #[error("invalid or conflicting Content-Length")]
    ContentLength,
    /// Not a hex size (with optional extensions) and CRLF, or one too long.
    #[error("malformed chunk size line")]
    ChunkSize,
    /// A chunk's data not followed by CRLF.
    #[error("chunk not followed by CRLF")]
    ChunkEnd,
    /// The fields after the last chunk are malformed or too large.
    #[error("malformed trailer section")]
    Trailers,
    /// The connection ended inside a body of known length or a chunked body.
    #[error("the connection closed before the body's end")]
    Truncated,
}

/// How the request body is framed on the upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body and no `Content-Length` (a GET).
    None,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`: the length is not known.
    Chunked,
}

/// A request head in origin form. `headers` (the fields as they came through the tunnel, in
/// order) must already be free of hop-by-hop fields; `Content-Length` and `Transfer-Encoding` in
/// it are replaced by what `framing` says, and `Host` is `host` if missing, and written first.
/// Built in one allocation of exactly its size (so the `Bytes` needs no second one to share it).
pub fn request_head(
    method: &Method,
    target: &[u8],
    headers: &[Header],
    host: &str,
    framing: RequestFraming,
) -> Bytes {
    let skip =
        |field: &Header| field.is("content-length") || field.is("transfer-encoding") || field.is("host");
    let host = headers.iter().find(|field| field.is("host")).map_or(host.as_bytes(), |field| field.value());
    let mut digits = [0; 20];
    let framing_line: [&[u8]; 3] = match framing {
        RequestFraming::None => [b"", b"", b""],
        RequestFraming::Length(n) => [b"content-length: ", itoa(n, &mut digits), b"\r\n"],
        RequestFraming::Chunked => [b"transfer-encoding: chunked\r\n", b"", b""],
    };
    let fields: usize = headers
        .iter()
        .filter(|field| !skip(field))
        .map(|field| field.name().len() + field.value().len() + 4)
        .sum();
    let size = method.as_str().len()
        + 1
        + target.len()
        + b" HTTP/1.1\r\nhost: ".len()
        + host.len()
        + 2
        + fields
        + framing_line.iter().map(|part| part.len()).sum::<usize>()
        + 2;
    let mut dst = Vec::with_capacity(size);
    dst.extend_from_slice(method.as_str().as_bytes());
    dst.push(b' ');
    dst.extend_from_slice(target);
    // Host first, as RFC 9112 §3.2 asks of a client.
    dst.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    dst.extend_from_slice(host);
    dst.extend_from_slice(b"\r\n");
    for field in headers.iter().filter(|field| !skip(field)) {
        dst.extend_from_slice(field.name());
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(field.value());
        dst.extend_from_slice(b"\r\n");
    }
    for part in framing_line {
        dst.extend_from_slice(part);
    }
    dst.extend_from_slice(b"\r\n");
    debug_assert_eq!(dst.len(), size);
    crate::stats::copied(dst.len());
    Bytes::from(dst)
}

/// The decimal digits of `n`, written into the end of `buf`.
pub(crate) fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// The header of one chunk of `len` bytes: `{len:x}\r\n`.
pub fn chunk_header(len: usize) -> Bytes {
    // Written on the stack and copied once: `format!` made a `String` and, with its spare
    // capacity, a second allocation to share it as `Bytes`.
    let mut out = [0u8; 2 * size_of::<usize>() + 2];
    let digits = (usize::BITS as usize - len.leading_zeros() as usize).div_ceil(4).max(1);
    for (i, slot) in out[..digits].iter_mut().enumerate() {
        let nibble = (len >> (4 * (digits - 1 - i))) & 0xf;
        *slot = b"0123456789abcdef"[nibble];
    }
    out[digits..digits + 2].copy_from_slice(b"\r\n");
    Bytes::copy_from_slice(&out[..digits + 2])
}

/// The last chunk and the trailer section (`trailers` may be empty).
pub fn last_chunk(trailers: Option<&HeaderMap>) -> Bytes {
    let mut out = Vec::from(&b"0\r\n"[..]);
    for (name, value) in trailers.into_iter().flatten() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Bytes::from(out)
}

/// A parsed response head. The fields are kept as the upstream sent them (order, repeats and
/// case), ready for the wire, without a `HeaderMap` in between.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub headers: Vec<Header>,
}

/// Parses a response head at the start of `buf`. `Ok(None)`: more bytes are needed (and `buf` is
/// below `max_len`). On success the head's bytes are taken off `buf`; the header values are views
/// of them, not copies.
///
/// # Errors
/// The bytes are not a response head, or the head is over `max_len`.
pub fn parse_response(buf: &mut BytesMut, max_len: usize) -> Result<Option<ResponseHead>, ParseError> {
    // Parsed in place, then the fields are located by offset in the frozen head: httparse's
    // slices borrow `buf`, which must be split to be shared. httparse's field array is left
    // uninitialised (zeroing 100 fields, 3.2 KB, per response was most of this function's time
    // in `perf`), the offsets are `u32` (a head is at most `max_len`, far below 4 GiB).
    let mut ranges = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let (len, code, minor, count) = {
        let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buf,
            &mut fields,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() >= max_len => {
                return Err(ParseError::HeadTooLarge(max_len));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(ParseError::Head(httparse::Error::TooManyHeaders));
            }
            Err(err) => return Err(ParseError::Head(err)),
        };
        if len > max_len || u32::try_from(len).is_err() {
            return Err(ParseError::HeadTooLarge(max_len));
        }
        let base = buf.as_ptr() as usize;
        // Within the head, so below `len`: the casts cannot truncate.
        let offset = |part: &[u8]| (part.as_ptr() as usize - base) as u32;
        for (range, field) in ranges.iter_mut().zip(response.headers.iter()) {
            let (name, value) = (offset(field.name.as_bytes()), offset(field.value));
            *range = (name, name + field.name.len() as u32, value, value + field.value.len() as u32);
        }
        (len, response.code.unwrap_or(0), response.version.unwrap_or(1), response.headers.len())
    };
    let head = buf.split_to(len).freeze();
    let status = StatusCode::from_u16(code).map_err(|_| ParseError::Head(httparse::Error::Status))?;
    let mut headers = Vec::with_capacity(count);
    for &(name_start, name_end, value_start, value_end) in &ranges[..count] {
        let name = head.slice(name_start as usize..name_end as usize);
        let value = head.slice(value_start as usize..value_end as usize);
        headers.push(Header::new(name, value).map_err(|_| ParseError::Field)?);
    }
    let version = if minor == 0 { Version::HTTP_10 } else { Version::HTTP_11 };
    Ok(Some(ResponseHead { status, version, headers }))
}

/// How a response body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framing {
    /// No body: a `HEAD` request, `1xx`, `204`, `304`, or `Content-Length: 0`.
    Empty,
    /// `Content-Length`: this many bytes left.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked(Chunked),
    /// Up to the connection's end: the connection cannot be reused.
    Close,
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunked {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes left.
    Data(u64),
    /// After a chunk's bytes, before its CRLF.
    DataEnd,
    /// After the last chunk: the trailer section.
    Trailers,
}

impl Framing {
    /// The framing of the body that follows `head`, answering a request with `method`.
    ///
    /// # Errors
    /// A `Content-Length` that is invalid or given twice with different values.
    pub fn of(method: &Method, head: &ResponseHead) -> Result<Self, ParseError> {
        if is_bodiless(method, head.status) {
            return Ok(Self::Empty);
        }
        if let Some(last) = head.headers.iter().rfind(|field| field.is("transfer-encoding")) {
            // Chunked must be the last coding; any other ends with the connection.
            let chunked = last
                .value_str()
                .and_then(|value| value.rsplit(',').next())
                .is_some_and(|coding| coding.trim().eq_ignore_ascii_case("chunked"));
            return Ok(if chunked { Self::Chunked(Chunked::Size) } else { Self::Close });
        }
        let values = head.headers.iter().filter(|field| field.is("content-length")).map(Header::value_str);
        let length = content_length(values).map_err(|()| ParseError::ContentLength)?;
        Ok(match length {
            Some(0) => Self::Empty,
            Some(n) => Self::Length(n),
            None => Self::Close,
        })
    }

    /// Whether the body has been read to its end.
    pub fn is_done(&self) -> bool {
        matches!(self, Self::Empty)
    }
}

/// What the decoder found in the bytes it was given.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Body bytes (a view of the read buffer).
    Data(Bytes),
    /// The trailer section of a chunked body; the body has ended.
    Trailers(HeaderMap),
    /// The body has ended.
    End,
    /// More bytes are needed.
    More,
}

/// Takes the next piece of body from `buf`. `eof`: the connection has ended, nothing more will
/// come. At the end, `framing` is [`Framing::Empty`].
///
/// # Errors
/// The body is malformed, or cut by the connection's end.
pub fn decode(framing: &mut Framing, buf: &mut BytesMut, eof: bool) -> Result<Decoded, ParseError> {
    loop {
        match framing {
            Framing::Empty => return Ok(Decoded::End),
            Framing::Length(left) => {
                if buf.is_empty() {
                    return if eof { Err(ParseError::Truncated) } else { Ok(Decoded::More) };
                }
                let take = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left -= take as u64;
                if *left == 0 {
                    *framing = Framing::Empty;
                }
                return Ok(Decoded::Data(buf.split_to(take).freeze()));
            }
            Framing::Close => {
                if buf.is_empty() {
                    if eof {
                        *framing = Framing::Empty;
                        return Ok(Decoded::End);
                    }
                    return Ok(Decoded::More);
                }
                return Ok(Decoded::Data(buf.split().freeze()));
            }
            Framing::Chunked(state) => {
                let more = || if eof { Err(ParseError::Truncated) } else { Ok(Decoded::More) };
                match state {
                    Chunked::Size => match httparse::parse_chunk_size(buf) {
                        // The limit holds however the line arrived, whole or in pieces.
                        Ok(httparse::Status::Complete((at, _))) if at > MAX_CHUNK_LINE => {
                            return Err(ParseError::ChunkSize);
                        }
                        Ok(httparse::Status::Complete((at, size))) => {
                            buf.advance(at);
                            *state = if size == 0 { Chunked::Trailers } else { Chunked::Data(size) };
                        }
                        Ok(httparse::Status::Partial) if buf.len() > MAX_CHUNK_LINE => {
                            return Err(ParseError::ChunkSize);
                        }
                        Ok(httparse::Status::Partial) => return more(),
                        Err(_) => return Err(ParseError::ChunkSize),
                    },
                    Chunked::Data(left) => {
                        if buf.is_empty() {
                            return more();
                        }
                        let take = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                        *left -= take as u64;
                        if *left == 0 {
                            *state = Chunked::DataEnd;
                        }
                        return Ok(Decoded::Data(buf.split_to(take).freeze()));
                    }
                    Chunked::DataEnd => {
                        if buf.len() < 2 {
                            if buf.first().is_some_and(|&b| b != b'\r') {
                                return Err(ParseError::ChunkEnd);
                            }
                            return more();
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err(ParseError::ChunkEnd);
                        }
                        buf.advance(2);
                        *state = Chunked::Size;
                    }
                    Chunked::Trailers => {
                        if buf.starts_with(b"\r\n") {
                            buf.advance(2);
                            *framing = Framing::Empty;
                            return Ok(Decoded::End);
                        }
                        if buf.len() < 2 && buf.first().is_none_or(|&b| b == b'\r') {
                            return more();
                        }
                        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                        let (len, trailers) = match httparse::parse_headers(buf, &mut fields) {
                            Ok(httparse::Status::Complete((len, _))) if len > MAX_TRAILERS => {
                                return Err(ParseError::Trailers);
                            }
                            Ok(httparse::Status::Complete((len, parsed))) => {
                                let mut map = HeaderMap::with_capacity(parsed.len());
                                for field in parsed {
                                    let name = HeaderName::from_bytes(field.name.as_bytes())
                                        .map_err(|_| ParseError::Trailers)?;
                                    let value = HeaderValue::from_bytes(field.value)
                                        .map_err(|_| ParseError::Trailers)?;
                                    map.append(name, value);
                                }
                                (len, map)
                            }
                            Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILERS => {
                                return Err(ParseError::Trailers);
                            }
                            Ok(httparse::Status::Partial) => return more(),
                            Err(_) => return Err(ParseError::Trailers),
                        };
                        buf.advance(len);
                        *framing = Framing::Empty;
                        return Ok(Decoded::Trailers(trailers));
                    }
                }
            }
        }
    }
}

/// Largest trailer section we wait for.
const MAX_TRAILERS: usize = 64 * 1024;

/// Whether the connection may carry another request after this response (both bodies read to
/// their ends): HTTP/1.1 without `Connection: close`, or HTTP/1.0 with `Connection: keep-alive`.
pub fn keeps_alive(head: &ResponseHead) -> bool {
    let values = head.headers.iter().filter(|field| field.is("connection")).map(Header::value_str);
    connection_keeps_alive(head.version, values)
}

/// Whether a message of `version` with these `Connection` field values (`None`: not text) leaves
/// the connection open (RFC 9112 §9.3); a value that is not text counts as `close`.
pub(crate) fn connection_keeps_alive<'a>(
    version: Version,
    values: impl Iterator<Item = Option<&'a str>>,
) -> bool {
    let mut close = false;
    let mut keep_alive = false;
    for value in values {
        for token in value.unwrap_or("close").split(',') {
            let token = token.trim();
            close |= token.eq_ignore_ascii_case("close");
            keep_alive |= token.eq_ignore_ascii_case("keep-alive");
        }
    }
    !close && (version == Version::HTTP_11 || keep_alive)
}

/// The length the `Content-Length` field values give (`None`: not text), if any: a list of
/// equal decimal numbers counts as one (RFC 9112 §6.3).
///
/// # Errors
/// A value that is not a decimal number, or two that differ.
pub(crate) fn content_length<'a>(values: impl Iterator<Item = Option<&'a str>>) -> Result<Option<u64>, ()> {
    let mut length = None;
    for value in values {
        for item in value.ok_or(())?.split(',').map(str::trim) {
            if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
                return Err(());
            }
            let n: u64 = item.parse().map_err(|_| ())?;
            if length.is_some_and(|seen| seen != n) {
                return Err(());
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// Whether a response to `method` with `status` carries no body bytes (RFC 9112 §6.3).
pub fn is_bodiless(method: &Method, status: StatusCode) -> bool {
    *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_of(text: &str) -> ResponseHead {
        let mut buf = BytesMut::from(text);
        parse_response(&mut buf, 64 * 1024).unwrap().unwrap()
    }

    /// Decodes all of `wire` fed in pieces of `step` bytes; the body and its trailers.
    fn decode_all(
        mut framing: Framing,
        wire: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Option<HeaderMap>), ParseError> {
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        loop {
            let eof = fed == wire.len();
            match decode(&mut framing, &mut buf, eof)? {
                Decoded::Data(data) => body.extend_from_slice(&data),
                Decoded::Trailers(map) => return Ok((body, Some(map))),
                Decoded::End => return Ok((body, None)),
                Decoded::More => {
                    let end = (fed + step).min(wire.len());
                    buf.extend_from_slice(&wire[fed..end]);
                    fed = end;
                }
            }
        }
    }

    #[test]
    fn writes_an_origin_form_head_with_host_and_framing() {
        let field = |name: &'static str, value: &'static str| Header::from_static(name, value);
        let mut headers = vec![
            field("Content-Length", "99"),
            field("transfer-encoding", "chunked"),
            field("x-a", "1"),
            field("X-B", "3"),
            field("x-a", "2"),
        ];
        let out = request_head(&Method::POST, b"/p?q=1", &headers, "up:80", RequestFraming::Length(12));
        assert_eq!(
            String::from_utf8(out.to_vec()).unwrap(),
            "POST /p?q=1 HTTP/1.1\r\nhost: up:80\r\nx-a: 1\r\nX-B: 3\r\nx-a: 2\r\ncontent-length: 12\r\n\r\n"
        );
        headers.push(field("Host", "example.com"));
        let out = request_head(&Method::GET, b"/", &headers, "up:80", RequestFraming::None);
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.starts_with("GET / HTTP/1.1\r\nhost: example.com\r\nx-a: 1\r\n"), "{text}");
        assert!(!text.to_ascii_lowercase().contains("content-length"), "{text}");
        assert!(!text.contains("transfer-encoding") && !text.contains("Host"), "{text}");
        let out = request_head(&Method::PUT, b"/", &[], "h", RequestFraming::Chunked);
        assert!(out.ends_with(b"transfer-encoding: chunked\r\n\r\n"));
    }

    #[test]
    fn digits() {
        for n in [0, 7, 10, 4096, u64::MAX] {
            assert_eq!(itoa(n, &mut [0; 20]), n.to_string().as_bytes());
        }
    }

    #[test]
    fn parses_a_head_in_pieces_and_leaves_the_body() {
        let wire = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Two: a\r\nx-two: b\r\n\r\nhello";
        let mut buf = BytesMut::new();
        for (i, &byte) in wire.iter().enumerate() {
            buf.extend_from_slice(&[byte]);
            if let Some(head) = parse_response(&mut buf, 1024).unwrap() {
                assert_eq!(i, wire.len() - 6, "complete at the blank line");
                assert_eq!(head.status, StatusCode::OK);
                assert_eq!(head.version, Version::HTTP_11);
                assert_eq!(head.headers.iter().filter(|field| field.is("x-two")).count(), 2);
                assert_eq!(Framing::of(&Method::GET, &head), Ok(Framing::Length(5)));
                assert!(buf.is_empty());
                return;
            }
        }
        panic!("never complete");
    }

    #[test]
    fn refuses_bad_and_oversized_heads() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nX: "[..]);
        buf.extend_from_slice(&[b'a'; 200]);
        assert!(matches!(parse_response(&mut buf, 100), Err(ParseError::HeadTooLarge(100))));
        let mut buf = BytesMut::from(&b"NOT HTTP\r\n\r\n"[..]);
        assert!(matches!(parse_response(&mut buf, 100), Err(ParseError::Head(_))));
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n"[..]);
        assert!(parse_response(&mut buf, 100).is_err());
        let mut many = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("x-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert!(parse_response(&mut BytesMut::from(many.as_str()), 1 << 20).is_err());
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let get = Method::GET;
        assert_eq!(
            Framing::of(&Method::HEAD, &head_of("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")),
            Ok(Framing::Empty)
        );
        assert_eq!(Framing::of(&get, &head_of("HTTP/1.1 204 No Content\r\n\r\n")), Ok(Framing::Empty));
        assert_eq!(
            Framing::of(&get, &head_of("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n")),
            Ok(Framing::Empty)
        );
        assert_eq!(Framing::of(&get, &head_of("HTTP/1.1 200 OK\r\n\r\n")), Ok(Framing::Close));
        assert_eq!(
            Framing::of(
                &get,
                &head_of("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n")
            ),
            Ok(Framing::Chunked(Chunked::Size))
        );
        assert_eq!(
            Framing::of(&get, &head_of("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n")),
            Ok(Framing::Close)
        );
        assert_eq!(
            Framing::of(&get, &head_of("HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n")),
            Ok(Framing::Length(3))
        );
        for bad in ["3, 4", "-1", "+3", "", "1e3", "99999999999999999999999"] {
            let head = head_of(&format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\n"));
            assert_eq!(Framing::of(&get, &head), Err(ParseError::ContentLength), "{bad:?}");
        }
    }

    #[test]
    fn keep_alive_rules() {
        assert!(keeps_alive(&head_of("HTTP/1.1 200 OK\r\n\r\n")));
        assert!(!keeps_alive(&head_of("HTTP/1.1 200 OK\r\nConnection: Close\r\n\r\n")));
        assert!(!keeps_alive(&head_of("HTTP/1.0 200 OK\r\n\r\n")));
        assert!(keeps_alive(&head_of("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n")));
    }

    #[test]
    fn decodes_chunked_bodies_cut_anywhere_with_trailers() {
        let wire = b"5;ext=1\r\nhello\r\nA\r\n, world!!!\r\n0\r\nx-sum: 42\r\nx-b: 1\r\n\r\n";
        for step in 1..wire.len() {
            let (body, trailers) = decode_all(Framing::Chunked(Chunked::Size), wire, step).unwrap();
            assert_eq!(body, b"hello, world!!!");
            let trailers = trailers.expect("trailers");
            assert_eq!(trailers["x-sum"], "42");
            assert_eq!(trailers.len(), 2);
        }
        let (body, trailers) =
            decode_all(Framing::Chunked(Chunked::Size), b"3\r\nabc\r\n0\r\n\r\n", 1).unwrap();
        assert_eq!((body.as_slice(), trailers), (&b"abc"[..], None));
    }

    #[test]
    fn refuses_malformed_or_cut_chunked_bodies() {
        let chunked = || Framing::Chunked(Chunked::Size);
        assert_eq!(decode_all(chunked(), b"zz\r\n", 4), Err(ParseError::ChunkSize));
        assert_eq!(decode_all(chunked(), b"3\r\nabcX\r\n", 64), Err(ParseError::ChunkEnd));
        assert_eq!(decode_all(chunked(), b"3\r\nab", 64), Err(ParseError::Truncated));
        assert_eq!(decode_all(chunked(), b"3\r\nabc\r\n0\r\nx-a", 64), Err(ParseError::Truncated));
        assert_eq!(decode_all(chunked(), &[b'1'; 5000], 64), Err(ParseError::ChunkSize));
        assert_eq!(decode_all(chunked(), b"ffffffffffffffffff\r\n", 64), Err(ParseError::ChunkSize));
    }

    #[test]
    fn length_and_close_framing() {
        assert_eq!(decode_all(Framing::Length(3), b"abc", 1).unwrap().0, b"abc");
        assert_eq!(decode_all(Framing::Length(4), b"abc", 1), Err(ParseError::Truncated));
        assert_eq!(decode_all(Framing::Close, b"anything at all", 4).unwrap().0, b"anything at all");
        // Bytes past a length are left for the next response.
        let mut framing = Framing::Length(2);
        let mut buf = BytesMut::from(&b"abHTTP"[..]);
        assert_eq!(decode(&mut framing, &mut buf, false), Ok(Decoded::Data(Bytes::from_static(b"ab"))));
        assert_eq!(decode(&mut framing, &mut buf, false), Ok(Decoded::End));
        assert_eq!(&buf[..], b"HTTP");
    }

    #[test]
    fn last_chunk_carries_trailers() {
        assert_eq!(last_chunk(None), Bytes::from_static(b"0\r\n\r\n"));
        let mut map = HeaderMap::new();
        map.insert("x-sum", HeaderValue::from_static("1"));
        assert_eq!(last_chunk(Some(&map)), Bytes::from_static(b"0\r\nx-sum: 1\r\n\r\n"));
        for len in [0, 1, 15, 16, 255, 16 * 1024, 0x1234_5678, usize::MAX] {
            assert_eq!(chunk_header(len), Bytes::from(format!("{len:x}\r\n")), "{len}");
        }
    }
}
