//! Arbitrary bytes as what a client sends the gateway's HTTP/1.1 server: request heads one after
//! another (pipelined), each followed by its body framed as the head says (length, or chunks with
//! trailers). None may panic; the same bytes fed whole and in pieces must read the same; no body
//! may yield more bytes than it was given.
#![no_main]

use bytes::BytesMut;
use ferry_transport::h1::{Decoded, ParseError, decode};
use ferry_transport::h1_server::{HeadLimits, RequestError, parse_request};
use libfuzzer_sys::fuzz_target;

const LIMITS: HeadLimits = HeadLimits { max_head_bytes: 4096, max_headers: 16, max_uri_length: 256 };

/// One request read to its end: method, target, field count, body, trailer count, keep-alive.
type Request = (String, String, usize, Vec<u8>, Option<usize>, bool);

#[derive(Debug, PartialEq)]
enum End {
    /// The bytes ran out between requests.
    Clean,
    /// The bytes ran out inside a head.
    InHead,
    Head(RequestError),
    Body(ParseError),
}

fn read(data: &[u8], step: usize) -> (Vec<Request>, End) {
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let feed = |buf: &mut BytesMut, fed: &mut usize| {
        let end = (*fed + step).min(data.len());
        buf.extend_from_slice(&data[*fed..end]);
        *fed = end;
    };
    let mut requests = Vec::new();
    loop {
        let head = loop {
            match parse_request(&mut buf, &LIMITS) {
                Ok(Some(head)) => break head,
                Ok(None) if fed == data.len() => {
                    return (requests, if buf.is_empty() { End::Clean } else { End::InHead });
                }
                Ok(None) => feed(&mut buf, &mut fed),
                Err(err) => return (requests, End::Head(err)),
            }
        };
        let mut framing = head.framing.clone();
        let mut body = Vec::new();
        let trailers = loop {
            match decode(&mut framing, &mut buf, fed == data.len()) {
                Ok(Decoded::Data(bytes)) => body.extend_from_slice(&bytes),
                Ok(Decoded::Trailers(map)) => break Some(map.len()),
                Ok(Decoded::End) => break None,
                Ok(Decoded::More) => feed(&mut buf, &mut fed),
                Err(err) => return (requests, End::Body(err)),
            }
        };
        assert!(body.len() <= data.len());
        let parts = head.parts;
        requests.push((
            parts.method.to_string(),
            parts.uri.to_string(),
            parts.headers.len(),
            body,
            trailers,
            head.keep_alive,
        ));
        if !head.keep_alive {
            return (requests, End::Clean);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, data)) = data.split_first() else { return };
    let step = usize::from(step).max(1);
    let whole = read(data, data.len().max(1));
    let pieces = read(data, step);
    // A head over a limit may be seen as incomplete, too long or too large depending on the cut;
    // every other outcome must not depend on how the bytes arrived.
    let limit =
        |end: &End| matches!(end, End::Head(RequestError::HeadTooLarge(_) | RequestError::UriTooLong(_)));
    if limit(&whole.1) || limit(&pieces.1) {
        let n = whole.0.len().min(pieces.0.len());
        assert_eq!(whole.0[..n], pieces.0[..n]);
    } else {
        assert_eq!(whole, pieces);
    }
});
