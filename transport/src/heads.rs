//! Between `http` types and the codec's heads: header lists, versions, and the hop-by-hop rules
//! of a proxy (RFC 9110 §7.6.1).

use ferry_codec::{Header, HttpVersion};
use http::Version;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use tracing::debug;

/// Header fields that describe one connection and must not be forwarded (RFC 9110 §7.6.1 and the
/// de-facto `Keep-Alive` and `Proxy-Connection`). `Upgrade` is kept when the request asks for one.
/// `Trailer` is end-to-end (it declares the trailer fields; hyper sends only declared ones).
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop fields and every field the `Connection` header names.
///
/// With `keep_upgrade`, an `Upgrade` request keeps `Upgrade` and `Connection: upgrade` so the
/// upstream sees the upgrade. `TE: trailers` is kept (it only says trailers are welcome, and
/// HTTP/2 allows exactly that value).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most heads carry none of these: one pass over the names (compared, not hashed) instead of
    // the eight lookups below.
    if !keep_upgrade
        && !headers
            .keys()
            .any(|name| HOP_BY_HOP.contains(name) || name == header::TE || name == header::UPGRADE)
    {
        return;
    }
    // Fields named by `Connection` besides the ones removed anyway: usually none (`keep-alive`,
    // `close`, `upgrade`), so nothing is allocated for them.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !is_removed_anyway(token))
        .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    let te_trailers = headers.get_all(header::TE).iter().any(|value| {
        value.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")))
    });
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    } else {
        headers.remove(header::TE);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Whether the `Connection` token `token` names a field [`strip_hop_by_hop`] removes (or, for
/// `upgrade`, decides on) without being told, or none at all (`close`: RFC 9110 §7.6.1 reserves
/// the name, no field may be called that).
fn is_removed_anyway(token: &str) -> bool {
    token.is_empty()
        || token.eq_ignore_ascii_case("close")
        || token.eq_ignore_ascii_case("upgrade")
        || HOP_BY_HOP.iter().any(|name| token.eq_ignore_ascii_case(name.as_str()))
}

/// Whether a request asks to switch protocols (HTTP/1.1 `Connection: upgrade` + `Upgrade`).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|value| {
            value.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
        })
}

/// [`strip_hop_by_hop`] for a wire header list, kept in its order: the agent forwards heads
/// without building a `HeaderMap` (names come from an upstream in any case, so they are compared
/// without regard to it). A kept `TE: trailers` stays where the first `TE` was; `Connection:
/// upgrade` goes last.
pub fn strip_hop_by_hop_fields(headers: &mut Vec<Header>, keep_upgrade: bool) {
    let hop = |field: &Header| HOP_BY_HOP.iter().any(|name| field.is(name.as_str()));
    if !keep_upgrade && !headers.iter().any(|field| hop(field) || field.is("te") || field.is("upgrade")) {
        return;
    }
    // Fields named by `Connection` besides the ones removed anyway: usually none, so nothing is
    // allocated for them. Views of the values, not copies.
    let named: Vec<bytes::Bytes> = headers
        .iter()
        .filter(|field| field.is("connection"))
        .flat_map(|field| {
            let value = field.value();
            field
                .value_str()
                .into_iter()
                .flat_map(|text| text.split(','))
                .map(str::trim)
                .filter(|token| !is_removed_anyway(token))
                .map(|token| value.slice_ref(token.as_bytes()))
        })
        .collect();
    let te_trailers = headers.iter().filter(|field| field.is("te")).any(|field| {
        field.value_str().is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")))
    });
    let mut te_kept = false;
    headers.retain_mut(|field| {
        if hop(field) || named.iter().any(|name| field.name().eq_ignore_ascii_case(name)) {
            return false;
        }
        if field.is("te") {
            if te_trailers && !te_kept {
                *field = Header::from_static("te", "trailers");
                te_kept = true;
                return true;
            }
            return false;
        }
        keep_upgrade || !field.is("upgrade")
    });
    if keep_upgrade {
        headers.push(Header::from_static("connection", "upgrade"));
    }
}

/// [`wants_upgrade`] for a wire header list.
pub fn fields_want_upgrade(headers: &[Header]) -> bool {
    headers.iter().any(|field| field.is("upgrade"))
        && headers.iter().filter(|field| field.is("connection")).any(|field| {
            field.value_str().is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
        })
}

/// Header fields in map order (repeats in order) as wire headers.
///
/// Every name and value is copied once, into one buffer, and the wire headers are slices of it:
/// one allocation for the whole block instead of two per field (the counts bench measured 12 of
/// them per request head before).
pub fn headers_to_wire(map: &HeaderMap) -> Vec<Header> {
    let size: usize = map.iter().map(|(name, value)| name.as_str().len() + value.len()).sum();
    crate::stats::copied(size);
    let mut block = bytes::BytesMut::with_capacity(size);
    for (name, value) in map {
        block.extend_from_slice(name.as_str().as_bytes());
        block.extend_from_slice(value.as_bytes());
    }
    let block = block.freeze();
    let mut out = Vec::with_capacity(map.len());
    let mut at = 0;
    for (name, value) in map {
        let name_end = at + name.as_str().len();
        let value_end = name_end + value.len();
        // `http` enforces the same grammar as the codec; a field it let through always passes.
        match Header::new(block.slice(at..name_end), block.slice(name_end..value_end)) {
            Ok(header) => out.push(header),
            Err(err) => debug!(%err, header = %name, "dropping a header the wire cannot carry"),
        }
        at = value_end;
    }
    out
}

/// Field names outside `http`'s standard set that nearly every head carries (the gateway adds
/// the `X-Forwarded-*` ones to every request): cloned from here instead of allocated per field.
const COMMON_NAMES: [HeaderName; 5] = [
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-request-id"),
    HeaderName::from_static("keep-alive"),
];

/// A field name from the wire as `http`'s name: a standard name is parsed without allocating, a
/// common one is cloned from [`COMMON_NAMES`], any other is copied (and lowercased).
fn name_from_wire(name: &[u8]) -> Result<HeaderName, header::InvalidHeaderName> {
    COMMON_NAMES
        .iter()
        .find(|common| common.as_str().as_bytes() == name)
        .map_or_else(|| HeaderName::from_bytes(name), |common| Ok(common.clone()))
}

/// Wire headers as a header map, in order.
pub fn headers_from_wire(headers: Vec<Header>) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(headers.len());
    for header in headers {
        let (name, value) = header.into_parts();
        // The codec validated both; `from_bytes` only lowercases the name.
        match (name_from_wire(&name), HeaderValue::from_maybe_shared(value)) {
            (Ok(name), Ok(value)) => {
                map.append(name, value);
            }
            _ => debug!("dropping an invalid header from the wire"),
        }
    }
    map
}

/// The codec's version for an `http` version.
pub fn version_to_wire(version: Version) -> HttpVersion {
    match version {
        Version::HTTP_10 | Version::HTTP_09 => HttpVersion::Http10,
        Version::HTTP_2 => HttpVersion::Http2,
        Version::HTTP_3 => HttpVersion::Http3,
        _ => HttpVersion::Http11,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(fields: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in fields {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_fields() {
        let mut headers = map(&[
            ("connection", "keep-alive, Close, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip, trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
        ]);
        strip_hop_by_hop(&mut headers, false);
        let left: Vec<_> = headers.iter().map(|(n, v)| (n.as_str(), v.to_str().unwrap())).collect();
        assert_eq!(left, [("te", "trailers"), ("set-cookie", "a=1"), ("set-cookie", "b=2")]);
    }

    #[test]
    fn a_lone_hop_by_hop_field_is_still_found() {
        for name in ["upgrade", "te", "keep-alive", "proxy-connection", "transfer-encoding"] {
            let mut headers = map(&[("x-a", "1"), (name, "v"), ("x-b", "2")]);
            strip_hop_by_hop(&mut headers, false);
            let left: Vec<_> = headers.keys().map(HeaderName::as_str).collect();
            assert_eq!(left, ["x-a", "x-b"], "{name}");
        }
        let mut untouched = map(&[("x-a", "1"), ("accept", "*/*"), ("x-a", "2")]);
        strip_hop_by_hop(&mut untouched, false);
        assert_eq!(untouched, map(&[("x-a", "1"), ("accept", "*/*"), ("x-a", "2")]));
    }

    fn fields(list: &[(&str, &str)]) -> Vec<Header> {
        list.iter()
            .map(|(name, value)| Header::new(name.as_bytes().to_vec(), value.as_bytes().to_vec()).unwrap())
            .collect()
    }

    fn pairs(headers: &[Header]) -> Vec<(String, String)> {
        headers
            .iter()
            .map(|h| (String::from_utf8_lossy(h.name()).into(), String::from_utf8_lossy(h.value()).into()))
            .collect()
    }

    /// The field-list version removes exactly what the map version removes, in any case of name,
    /// and keeps the list's order.
    #[test]
    fn field_lists_are_stripped_as_maps_are() {
        let cases: &[&[(&str, &str)]] = &[
            &[
                ("Connection", "keep-alive, Close, X-Secret-Hop"),
                ("Keep-Alive", "timeout=5"),
                ("x-secret-hop", "1"),
                ("Transfer-Encoding", "chunked"),
                ("set-cookie", "a=1"),
                ("TE", "gzip, trailers"),
                ("Upgrade", "websocket"),
                ("Proxy-Authorization", "Basic x"),
                ("te", "deflate"),
                ("set-cookie", "b=2"),
            ],
            &[("x-a", "1"), ("accept", "*/*"), ("x-a", "2")],
            &[("x-a", "1"), ("te", "gzip"), ("x-b", "2")],
            &[("connection", "Upgrade"), ("upgrade", "websocket"), ("host", "h")],
            &[("Proxy-Connection", "keep-alive"), ("connection", ", ,x-b"), ("X-B", "1"), ("x-c", "2")],
        ];
        for case in cases {
            for keep_upgrade in [false, true] {
                let mut list = fields(case);
                strip_hop_by_hop_fields(&mut list, keep_upgrade);
                let mut expected = map(case);
                strip_hop_by_hop(&mut expected, keep_upgrade);
                let mut got: Vec<_> =
                    pairs(&list).into_iter().map(|(n, v)| (n.to_ascii_lowercase(), v)).collect();
                let mut want: Vec<_> = expected
                    .iter()
                    .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap().to_owned()))
                    .collect();
                got.sort();
                want.sort();
                assert_eq!(got, want, "{case:?} keep_upgrade={keep_upgrade}");
                assert_eq!(fields_want_upgrade(&fields(case)), wants_upgrade(&map(case)), "{case:?}");
            }
        }
        let mut ordered = fields(cases[0]);
        strip_hop_by_hop_fields(&mut ordered, false);
        let names: Vec<_> = pairs(&ordered).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["set-cookie", "te", "set-cookie"]);
    }

    #[test]
    fn keeps_upgrade_when_asked() {
        let mut headers = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(&headers));
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers["upgrade"], "websocket");
        assert_eq!(headers["connection"], "upgrade");
    }

    #[test]
    fn common_names_come_from_the_table_and_others_are_parsed() {
        for common in &COMMON_NAMES {
            assert_eq!(&name_from_wire(common.as_str().as_bytes()).unwrap(), common);
        }
        assert_eq!(name_from_wire(b"X-Forwarded-For").unwrap(), "x-forwarded-for");
        assert_eq!(name_from_wire(b"Content-Type").unwrap(), header::CONTENT_TYPE);
        assert_eq!(name_from_wire(b"x-other").unwrap(), "x-other");
        assert!(name_from_wire(b"bad name").is_err());
    }

    #[test]
    fn wire_round_trip_keeps_repeats_in_order() {
        let headers = map(&[("set-cookie", "a=1"), ("x-a", "1"), ("set-cookie", "b=2")]);
        let back = headers_from_wire(headers_to_wire(&headers));
        let cookies: Vec<_> = back.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert_eq!(back["x-a"], "1");
    }
}
