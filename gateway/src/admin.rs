//! The gateway's own pages: `GET /` (health, public) and the admin endpoints — `/connections`,
//! `/connections/{tunnel_id}` (list, `DELETE` to close), `POST …/ping`, `POST …/drain`,
//! `/metrics` — which answer loopback clients (unless turned off) or a matching bearer token.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use ferry_codec::TunnelId;
use ferry_codec::control::GoAwayReason;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::info;

use crate::Gateway;
use crate::error::{PublicError, json_response};

/// Admin actions on the sessions of one tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Measure the round-trip time over the control stream.
    Ping,
    /// Ask the agent to drain and reconnect.
    Drain,
}

/// How long an admin ping waits for the pong.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// `GET /`: the gateway is up; how many agent sessions it has.
pub(crate) fn health(gateway: &Gateway) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "sessions": gateway.registry.len(),
    });
    json_response(StatusCode::OK, &body)
}

/// Headers a proxy adds: a loopback peer that sends one speaks for someone else (a reverse proxy
/// on this host, or a tunnel whose upstream is this gateway), so loopback trust does not apply.
const PROXIED: [header::HeaderName; 3] =
    [header::VIA, header::FORWARDED, header::HeaderName::from_static("x-forwarded-for")];

/// Whether the request may use the admin endpoints.
///
/// # Errors
/// [`PublicError::Unauthorized`].
pub(crate) fn authorize(gateway: &Gateway, headers: &HeaderMap, peer: SocketAddr) -> Result<(), PublicError> {
    let ip = crate::limits::client_ip(peer.ip());
    let proxied = PROXIED.iter().any(|name| headers.contains_key(name));
    if gateway.config.admin_loopback && ip.is_loopback() && !proxied {
        return Ok(());
    }
    let Some(token) = &gateway.config.admin_token else {
        return Err(PublicError::Unauthorized);
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default();
    // Compare digests in constant time: neither the token's bytes nor its length leak.
    let presented = Sha256::digest(presented.as_bytes());
    let expected = Sha256::digest(token.expose());
    if bool::from(presented.ct_eq(&expected)) { Ok(()) } else { Err(PublicError::Unauthorized) }
}

/// This node's sessions (of `tunnel`, or all) as JSON, oldest first per tunnel; each names this
/// node when it is part of a cluster.
pub(crate) fn local_sessions(gateway: &Gateway, tunnel: Option<&TunnelId>) -> Vec<serde_json::Value> {
    let mut sessions = match tunnel {
        Some(id) => gateway.registry.of(id),
        None => gateway.registry.all(),
    };
    sessions.sort_by(|a, b| (a.tunnel_id(), a.connected_at).cmp(&(b.tunnel_id(), b.connected_at)));
    let node = gateway.cluster.as_ref().map(|c| c.node_id());
    sessions
        .iter()
        .map(|s| {
            let mut json = s.to_json();
            if let (Some(node), Some(fields)) = (node, json.as_object_mut()) {
                fields.insert("node".into(), node.into());
            }
            json
        })
        .collect()
}

/// `GET /connections` (every session) or `GET /connections/{tunnel_id}` (one tunnel's). In a
/// cluster, every node's (asked over the peer links, at once) unless `local_only`
/// (`?node=local`); `nodes` then says how many each had, or why it could not be asked.
pub(crate) async fn connections(
    gateway: &Gateway,
    tunnel: Option<&TunnelId>,
    local_only: bool,
) -> Response<Full<Bytes>> {
    let mut list = local_sessions(gateway, tunnel);
    let Some(cluster) = gateway.cluster.as_ref().filter(|_| !local_only) else {
        return json_response(StatusCode::OK, &serde_json::json!({ "sessions": list }));
    };
    let mut nodes = vec![serde_json::json!({ "node": cluster.node_id(), "sessions": list.len() })];
    let others = cluster.nodes();
    let asks = others.iter().map(|(id, node)| async move {
        (id, cluster.sessions_of(id, node.advertise.as_deref(), tunnel, &gateway.config.session).await)
    });
    for (id, result) in futures_util::future::join_all(asks).await {
        match result {
            Ok(sessions) => {
                nodes.push(serde_json::json!({ "node": id, "sessions": sessions.len() }));
                list.extend(sessions);
            }
            Err(err) => nodes.push(serde_json::json!({ "node": id, "error": err.to_string() })),
        }
    }
    json_response(StatusCode::OK, &serde_json::json!({ "sessions": list, "nodes": nodes }))
}

/// `DELETE /connections/{tunnel_id}`: closes every session of the tunnel now.
pub(crate) fn close(gateway: &Gateway, tunnel: &TunnelId) -> Result<Response<Full<Bytes>>, PublicError> {
    let sessions = gateway.registry.of(tunnel);
    if sessions.is_empty() {
        return Err(PublicError::TunnelNotFound);
    }
    for session in &sessions {
        info!(tunnel_id = %tunnel, session_id = %session.identity.id, "closing session on admin request");
        session.close();
    }
    Ok(json_response(StatusCode::OK, &serde_json::json!({ "closed": sessions.len() })))
}

/// `POST /connections/{tunnel_id}/ping` or `/drain`.
pub(crate) async fn act(
    gateway: &Gateway,
    tunnel: &TunnelId,
    action: Action,
) -> Result<Response<Full<Bytes>>, PublicError> {
    let sessions = gateway.registry.of(tunnel);
    if sessions.is_empty() {
        return Err(PublicError::TunnelNotFound);
    }
    let mut results = Vec::with_capacity(sessions.len());
    for session in &sessions {
        let result = match action {
            Action::Ping => match tokio::time::timeout(PING_TIMEOUT, session.control.ping()).await {
                Ok(Ok(rtt)) => {
                    serde_json::json!({ "session_id": session.identity.id.to_string(), "rtt_ms": rtt.as_secs_f64() * 1000.0 })
                }
                Ok(Err(_)) => {
                    serde_json::json!({ "session_id": session.identity.id.to_string(), "error": "session closed" })
                }
                Err(_) => {
                    serde_json::json!({ "session_id": session.identity.id.to_string(), "error": "no pong within 5 s" })
                }
            },
            Action::Drain => {
                info!(tunnel_id = %tunnel, session_id = %session.identity.id, "draining session on admin request");
                session.go_away(GoAwayReason::AdminDrain, gateway.config.drain_timeout).await;
                serde_json::json!({ "session_id": session.identity.id.to_string(), "draining": true })
            }
        };
        results.push(result);
    }
    let status = if action == Action::Drain { StatusCode::ACCEPTED } else { StatusCode::OK };
    Ok(json_response(status, &serde_json::json!({ "sessions": results })))
}

/// `GET /metrics`.
pub(crate) fn metrics(gateway: &Gateway) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(gateway.metrics.render(&gateway.registry))));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}
