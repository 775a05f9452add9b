//! The protobuf encoding of `Head` and `Trailers` payloads, written straight from the domain
//! types.
//!
//! It is what prost writes for `pb::Head::from(head)`, byte for byte (the test below checks it on
//! arbitrary heads), without building that `pb` copy first: the copy cloned the method and the
//! request id, collected the header list into a new `Vec`, and copied the client address into a
//! fresh allocation, on every request and response head (four to five heap allocations per
//! request on the gateway, counted by the `counts` bench). Decoding still goes through prost's
//! generated code, which is the reference for what the schema accepts.
//!
//! Only what these two messages need is here: proto3 scalars are left out when zero or empty,
//! a present message field is written even when empty, `optional` fields are written whenever
//! present, and every field number is below 16 (a one-byte key).

use std::net::{IpAddr, SocketAddr};

use bytes::{BufMut, BytesMut};

use crate::head::{Head, Header, HttpVersion, RequestHead, ResponseHead, TcpOpen, Trailers};
use crate::pb;

const VARINT: u8 = 0;
const LENGTH_DELIMITED: u8 = 2;

fn key(field: u8, wire_type: u8) -> u8 {
    debug_assert!(field < 16);
    (field << 3) | wire_type
}

fn varint_len(value: u64) -> usize {
    // 7 bits per byte, at least one byte.
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_varint(mut value: u64, dst: &mut BytesMut) {
    while value >= 0x80 {
        dst.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    dst.put_u8(value as u8);
}

/// A length-delimited field holding `len` bytes.
fn delimited_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// A proto3 `bytes`/`string` field: left out when empty.
fn bytes_len(bytes: &[u8]) -> usize {
    if bytes.is_empty() { 0 } else { delimited_len(bytes.len()) }
}

fn put_bytes(field: u8, bytes: &[u8], dst: &mut BytesMut) {
    if !bytes.is_empty() {
        put_delimited_key(field, bytes.len(), dst);
        dst.put_slice(bytes);
    }
}

fn put_delimited_key(field: u8, len: usize, dst: &mut BytesMut) {
    dst.put_u8(key(field, LENGTH_DELIMITED));
    put_varint(len as u64, dst);
}

/// A proto3 varint field: left out when zero.
fn uint_len(value: u64) -> usize {
    if value == 0 { 0 } else { 1 + varint_len(value) }
}

fn put_uint(field: u8, value: u64, dst: &mut BytesMut) {
    if value != 0 {
        dst.put_u8(key(field, VARINT));
        put_varint(value, dst);
    }
}

fn version(version: HttpVersion) -> u64 {
    // The enum's numbers are all positive, so the int32 varint is the plain one.
    pb::HttpVersion::from(version) as i32 as u64
}

fn header_len(header: &Header) -> usize {
    bytes_len(header.name()) + bytes_len(header.value())
}

fn headers_len(headers: &[Header]) -> usize {
    headers.iter().map(|h| delimited_len(header_len(h))).sum()
}

fn put_headers(field: u8, headers: &[Header], dst: &mut BytesMut) {
    for header in headers {
        put_delimited_key(field, header_len(header), dst);
        put_bytes(1, header.name(), dst);
        put_bytes(2, header.value(), dst);
    }
}

fn addr_len(addr: SocketAddr) -> usize {
    let ip = if addr.is_ipv4() { 4 } else { 16 };
    delimited_len(ip) + uint_len(u64::from(addr.port()))
}

fn put_addr(field: u8, addr: SocketAddr, dst: &mut BytesMut) {
    put_delimited_key(field, addr_len(addr), dst);
    match addr.ip() {
        IpAddr::V4(ip) => put_bytes(1, &ip.octets(), dst),
        IpAddr::V6(ip) => put_bytes(1, &ip.octets(), dst),
    }
    put_uint(2, u64::from(addr.port()), dst);
}

fn request_len(head: &RequestHead) -> usize {
    bytes_len(head.method.as_bytes())
        + bytes_len(&head.target)
        + uint_len(version(head.version))
        + headers_len(&head.headers)
        + head.client_addr.map_or(0, |addr| delimited_len(addr_len(addr)))
        + bytes_len(head.request_id.as_bytes())
        + head.body_len.map_or(0, |len| 1 + varint_len(len))
        + uint_len(u64::from(head.path_routed))
}

fn put_request(head: &RequestHead, dst: &mut BytesMut) {
    put_bytes(1, head.method.as_bytes(), dst);
    put_bytes(2, &head.target, dst);
    put_uint(3, version(head.version), dst);
    put_headers(4, &head.headers, dst);
    if let Some(addr) = head.client_addr {
        put_addr(5, addr, dst);
    }
    put_bytes(6, head.request_id.as_bytes(), dst);
    if let Some(len) = head.body_len {
        // `optional`: written when present, zero included.
        dst.put_u8(key(7, VARINT));
        put_varint(len, dst);
    }
    put_uint(8, u64::from(head.path_routed), dst);
}

fn response_len(head: &ResponseHead) -> usize {
    uint_len(u64::from(head.status)) + uint_len(version(head.version)) + headers_len(&head.headers)
}

fn put_response(head: &ResponseHead, dst: &mut BytesMut) {
    put_uint(1, u64::from(head.status), dst);
    put_uint(2, version(head.version), dst);
    put_headers(3, &head.headers, dst);
}

fn tcp_open_len(open: &TcpOpen) -> usize {
    bytes_len(open.endpoint.as_bytes())
        + delimited_len(addr_len(open.client_addr))
        + delimited_len(addr_len(open.public_addr))
}

fn put_tcp_open(open: &TcpOpen, dst: &mut BytesMut) {
    put_bytes(1, open.endpoint.as_bytes(), dst);
    put_addr(2, open.client_addr, dst);
    put_addr(3, open.public_addr, dst);
}

/// Length of the encoded `Head` message.
pub(crate) fn head_len(head: &Head) -> usize {
    match head {
        Head::Request(request) => delimited_len(request_len(request)),
        Head::Response(response) => delimited_len(response_len(response)),
        Head::TcpOpen(open) => delimited_len(tcp_open_len(open)),
        Head::TcpAccepted => delimited_len(0),
    }
}

/// Appends the `Head` message; `dst` should have room for [`head_len`] bytes.
pub(crate) fn put_head(head: &Head, dst: &mut BytesMut) {
    match head {
        Head::Request(request) => {
            put_delimited_key(1, request_len(request), dst);
            put_request(request, dst);
        }
        Head::Response(response) => {
            put_delimited_key(2, response_len(response), dst);
            put_response(response, dst);
        }
        Head::TcpOpen(open) => {
            put_delimited_key(3, tcp_open_len(open), dst);
            put_tcp_open(open, dst);
        }
        // An empty message that is present: its key and a zero length.
        Head::TcpAccepted => put_delimited_key(4, 0, dst),
    }
}

/// Length of the encoded `Trailers` message.
pub(crate) fn trailers_len(trailers: &Trailers) -> usize {
    headers_len(&trailers.headers)
}

/// Appends the `Trailers` message.
pub(crate) fn put_trailers(trailers: &Trailers, dst: &mut BytesMut) {
    put_headers(1, &trailers.headers, dst);
}

#[cfg(test)]
mod tests {
    use arbitrary::{Arbitrary, Unstructured};
    use proptest::collection::vec;
    use proptest::prelude::*;
    use prost::Message;

    use super::*;

    fn arb<T: for<'a> Arbitrary<'a> + std::fmt::Debug>(max_bytes: usize) -> impl Strategy<Value = T> {
        vec(any::<u8>(), 0..max_bytes).prop_filter_map("not enough bytes", |bytes| {
            T::arbitrary_take_rest(Unstructured::new(&bytes)).ok()
        })
    }

    #[test]
    fn varint_lengths_match_prost() {
        for value in [0, 1, 127, 128, 16_383, 16_384, u64::from(u32::MAX), u64::MAX >> 1, u64::MAX] {
            let mut ours = BytesMut::new();
            put_varint(value, &mut ours);
            let mut theirs = BytesMut::new();
            prost::encoding::encode_varint(value, &mut theirs);
            assert_eq!(ours, theirs, "{value}");
            assert_eq!(varint_len(value), theirs.len(), "{value}");
        }
    }

    #[test]
    fn edge_values_match_prost() {
        let head = |client_addr, body_len, headers: Vec<Header>| {
            Head::Request(RequestHead {
                method: "GET".into(),
                target: bytes::Bytes::from_static(b"/"),
                version: HttpVersion::Http11,
                headers,
                client_addr,
                request_id: "r".into(),
                body_len,
                path_routed: body_len == Some(0),
            })
        };
        let v6 = "[::1]:0".parse().ok();
        let v4 = "10.0.0.1:65535".parse().ok();
        let empty_value = vec![Header::new("x-empty", "").unwrap()];
        for head in [
            head(None, None, vec![]),
            head(v6, Some(0), empty_value.clone()),
            head(v4, Some(u64::MAX), vec![]),
            Head::Response(ResponseHead { status: 200, version: HttpVersion::Http2, headers: empty_value }),
        ] {
            let mut ours = BytesMut::new();
            put_head(&head, &mut ours);
            assert_eq!(ours.len(), head_len(&head));
            assert_eq!(ours.to_vec(), pb::Head::from(&head).encode_to_vec(), "{head:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn heads_encode_as_prost_does(head in arb::<Head>(2048)) {
            let mut ours = BytesMut::new();
            put_head(&head, &mut ours);
            prop_assert_eq!(ours.len(), head_len(&head));
            prop_assert_eq!(ours.to_vec(), pb::Head::from(&head).encode_to_vec());
        }

        #[test]
        fn trailers_encode_as_prost_does(headers in vec(arb::<Header>(256), 0..24)) {
            let trailers = Trailers { headers };
            let mut ours = BytesMut::new();
            put_trailers(&trailers, &mut ours);
            prop_assert_eq!(ours.len(), trailers_len(&trailers));
            prop_assert_eq!(ours.to_vec(), pb::Trailers::from(&trailers).encode_to_vec());
        }
    }
}
