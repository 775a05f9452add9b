//! The gateway's own pages: `GET /` (health) and `GET /connections` (live sessions).

use bytes::Bytes;
use ferry_codec::TunnelId;
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::Gateway;
use crate::error::json_response;

/// `GET /`: the gateway is up; how many agent sessions it has.
pub(crate) fn health(gateway: &Gateway) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "sessions": gateway.registry.len(),
    });
    json_response(StatusCode::OK, &body)
}

/// `GET /connections` (every session) or `GET /connections/{tunnel_id}` (one tunnel's).
pub(crate) fn connections(gateway: &Gateway, tunnel: Option<&TunnelId>) -> Response<Full<Bytes>> {
    let mut sessions = match tunnel {
        Some(id) => gateway.registry.of(id),
        None => gateway.registry.all(),
    };
    sessions.sort_by(|a, b| (&a.tunnel_id, a.connected_at).cmp(&(&b.tunnel_id, b.connected_at)));
    let list: Vec<serde_json::Value> = sessions.iter().map(|s| s.to_json()).collect();
    json_response(StatusCode::OK, &serde_json::json!({ "sessions": list }))
}
