//! Values the codec benches encode and decode.

use bytes::Bytes;
use ferry_codec::{Header, HttpVersion, RequestHead};

/// A browser-like GET with 12 header fields, about 800 bytes on the wire: what a head usually
/// looks like once the gateway has added its forwarding headers.
pub fn typical_request_head() -> RequestHead {
    let fields: [(&str, &str); 12] = [
        ("host", "agent-0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4-web.tunnel.example.com"),
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
        ("accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
        ("accept-language", "en-US,en;q=0.5"),
        ("accept-encoding", "gzip, deflate, br, zstd"),
        ("referer", "https://agent-0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4-web.tunnel.example.com/"),
        ("cookie", "session=8f14e45fceea167a5a36dedd4bea2543; theme=dark; consent=1"),
        ("sec-fetch-mode", "navigate"),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "agent-0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4-web.tunnel.example.com"),
        ("x-request-id", "01JD3Z8Q5W6T2M4N7P9R0S1V3X"),
    ];
    RequestHead {
        method: "GET".into(),
        target: Bytes::from_static(b"/app/dashboard?tab=overview&range=7d"),
        version: HttpVersion::Http11,
        headers: fields
            .iter()
            .map(|(name, value)| Header::new(*name, *value).expect("fixture headers are valid"))
            .collect(),
        client_addr: Some(([203, 0, 113, 7], 52_114).into()),
        request_id: "01JD3Z8Q5W6T2M4N7P9R0S1V3X".into(),
        body_len: Some(0),
        path_routed: true,
    }
}
