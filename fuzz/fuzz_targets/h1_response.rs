//! Arbitrary bytes as an upstream's answer to the agent's HTTP/1.1 client: a response head, then
//! the body framed as the head says (length, chunks with trailers, or the connection's end). None
//! may panic; the same bytes fed whole and in pieces must read the same; no body may yield more
//! bytes than it was given.
#![no_main]

use bytes::BytesMut;
use ferry_transport::h1::{Decoded, Framing, ParseError, decode, parse_response};
use http::Method;
use libfuzzer_sys::fuzz_target;

/// What a response read to its end is: status, field count, body, trailer count; or where it failed.
type Outcome = Result<(u16, usize, Vec<u8>, Option<usize>), ParseError>;

fn read(data: &[u8], step: usize, method: &Method) -> Outcome {
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let feed = |buf: &mut BytesMut, fed: &mut usize| {
        let end = (*fed + step).min(data.len());
        buf.extend_from_slice(&data[*fed..end]);
        *fed = end;
    };
    let head = loop {
        match parse_response(&mut buf, 16 * 1024)? {
            Some(head) if head.status.is_informational() && head.status != 101 => continue,
            Some(head) => break head,
            None if fed == data.len() => return Err(ParseError::Truncated),
            None => feed(&mut buf, &mut fed),
        }
    };
    let mut framing = Framing::of(method, &head)?;
    let mut body = Vec::new();
    loop {
        match decode(&mut framing, &mut buf, fed == data.len())? {
            Decoded::Data(bytes) => body.extend_from_slice(&bytes),
            Decoded::Trailers(map) => return Ok((head.status.as_u16(), head.headers.len(), body, Some(map.len()))),
            Decoded::End => return Ok((head.status.as_u16(), head.headers.len(), body, None)),
            Decoded::More => feed(&mut buf, &mut fed),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else { return };
    let method = if flags & 0x80 == 0 { Method::GET } else { Method::HEAD };
    let step = usize::from(flags & 0x7f).max(1);
    let whole = read(data, data.len().max(1), &method);
    let pieces = read(data, step, &method);
    // A head over the limit may be seen as incomplete at one cut and too large at another; every
    // other outcome must not depend on how the bytes arrived.
    if !matches!(whole, Err(ParseError::HeadTooLarge(_))) && !matches!(pieces, Err(ParseError::HeadTooLarge(_))) {
        assert_eq!(whole, pieces);
    }
    if let Ok((_, _, body, _)) = &whole {
        assert!(body.len() <= data.len());
    }
});
