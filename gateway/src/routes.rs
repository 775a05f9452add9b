//! Which way a public request goes: to a tunnel (by Host or by path), to the agent endpoint, or to
//! one of the gateway's own pages. Pure functions over the Host and the path, so the rules are
//! tested without sockets.
//!
//! - Host routing (with `--domain`): `{label}.{domain}` goes to the tunnel whose DNS label is
//!   `label`, path unchanged.
//! - Path routing (always): `/t/{tunnel_id}/rest?q` goes to the tunnel as `/rest?q`.
//!
//! [`handle`] applies them to each request, after the checks that come before any routing (the
//! `Via` loop check, one Host, the target's length), and hands the request to where it goes.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;

use ferry_codec::TunnelId;
use http::{Method, Request, Response, header};
use http_body_util::Either;
use tracing::debug;

use crate::admin::Action;
use crate::error::PublicError;
use crate::proxy::{RequestBody, ResponseBody};
use crate::watch::ConnWatch;
use crate::{Gateway, admin, endpoint, proxy};

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// `GET /`: liveness.
    Health,
    /// `GET /connections`: live sessions.
    Connections,
    /// `GET /connections/{tunnel_id}` (and `DELETE`: close them): the sessions of one tunnel.
    TunnelConnections(TunnelId),
    /// `POST /connections/{tunnel_id}/{action}`.
    ConnectionAction(TunnelId, Action),
    /// `GET /metrics`: Prometheus text.
    Metrics,
    /// `GET /ws`: an agent connecting.
    AgentConnect,
    /// To a tunnel, with the target (path and query) the upstream should see, and whether
    /// `/t/{tunnel_id}` was taken off it (path routing).
    Tunnel { id: TunnelId, target: String, by_path: bool },
    /// `/t/{x}` where `x` is not a tunnel id, or a Host label that is not one.
    InvalidTunnelId(String),
    /// Nothing here.
    NotFound,
}

/// Lowercase host without port or trailing dot, so `Agent-…-Web.Example.com.:443` and
/// `agent-…-web.example.com` route (and later authorise) the same way.
pub(crate) fn normalize_host(raw: &str) -> Cow<'_, str> {
    let raw = raw.trim();
    let host = if let Some(rest) = raw.strip_prefix('[') {
        // IPv6 literal: keep the brackets, drop the port.
        rest.split_once(']').map_or(raw, |(ip, _)| &raw[..ip.len() + 2])
    } else {
        match raw.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => raw,
        }
    };
    let host = host.trim_end_matches('.');
    // Clients send lowercase hosts: no copy then.
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// Decides the route. `host` is already normalised; `path_and_query` is the request target in
/// origin form.
pub(crate) fn route(domain: Option<&str>, host: Option<&str>, path_and_query: &str) -> Route {
    let label = match (domain, host) {
        (Some(domain), Some(host)) => host.strip_suffix(domain).and_then(|rest| rest.strip_suffix('.')),
        _ => None,
    };
    if let Some(label) = label {
        if label.contains('.') {
            return Route::NotFound;
        }
        return match TunnelId::from_label(label) {
            Ok(id) => Route::Tunnel { id, target: path_and_query.to_owned(), by_path: false },
            Err(_) => Route::InvalidTunnelId(label.to_owned()),
        };
    }
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    if let Some(rest) = path.strip_prefix("/t/") {
        let (id, rest) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, "/"),
        };
        return match id.parse::<TunnelId>() {
            Ok(id) => {
                let target = match query {
                    Some(query) => format!("{rest}?{query}"),
                    None => rest.to_owned(),
                };
                Route::Tunnel { id, target, by_path: true }
            }
            Err(_) => Route::InvalidTunnelId(id.to_owned()),
        };
    }
    match path {
        "/" => Route::Health,
        "/ws" => Route::AgentConnect,
        "/connections" => Route::Connections,
        "/metrics" => Route::Metrics,
        _ => {
            let Some(rest) = path.strip_prefix("/connections/") else { return Route::NotFound };
            let (id, action) = match rest.split_once('/') {
                Some((id, "ping")) => (id, Some(Action::Ping)),
                Some((id, "drain")) => (id, Some(Action::Drain)),
                Some(_) => return Route::NotFound,
                None => (rest, None),
            };
            match (id.parse::<TunnelId>(), action) {
                (Ok(id), None) => Route::TunnelConnections(id),
                (Ok(id), Some(action)) => Route::ConnectionAction(id, action),
                (Err(_), _) => Route::NotFound,
            }
        }
    }
}

/// Answers one public request: the loop check, the target, then where it goes (a tunnel, the
/// agent endpoint, the gateway's own pages).
///
/// The checks and the route are worked out before the future is made, so the future holds the
/// request once (an `async fn` keeps a copy of an argument it borrows from; this future is part
/// of every request's boxed exchange).
pub(crate) fn handle<'a>(
    gateway: &'a Arc<Gateway>,
    request: Request<RequestBody>,
    peer: SocketAddr,
    conn: &'a ConnWatch,
) -> impl Future<Output = Response<ResponseBody>> + Send + 'a {
    let routed = route_request(gateway, &request);
    async move {
        let (route, request_id) = match routed {
            Ok(routed) => routed,
            Err((err, request_id)) => return err.to_response(&request_id).map(Either::Left),
        };
        if let Route::Tunnel { id, target, by_path } = route {
            let forwarding = gateway.forwarding();
            let response =
                match proxy::forward(forwarding, request, peer, conn, &id, (target, by_path), &request_id)
                    .await
                {
                    Ok(response) => response,
                    Err(err) => {
                        debug!(%err, tunnel_id = %id, request_id, "request answered by the gateway");
                        err.to_response(&request_id).map(Either::Left)
                    }
                };
            gateway.metrics.request(response.status().as_u16());
            return response;
        }
        local(gateway, route, request, peer, &request_id).await
    }
}

/// Where a request goes, with its request id; or why it goes nowhere, with the id to answer with.
fn route_request(
    gateway: &Gateway,
    request: &Request<RequestBody>,
) -> Result<(Route, String), (PublicError, String)> {
    // A request that already passed through this gateway (an agent whose upstream leads back
    // here) goes nowhere, not even to the gateway's own pages, where it would look local.
    if gateway.forwarding.seen_before(request.headers()) {
        return Err((PublicError::LoopDetected, gateway.next_request_id()));
    }
    // One Host, or the request is ambiguous about where it goes (RFC 9112 §3.2: 400). The
    // target's authority, when it has one (absolute form, HTTP/2), is the one that counts.
    if request.headers().get_all(header::HOST).iter().nth(1).is_some() {
        return Err((PublicError::BadRequest("more than one Host header"), gateway.next_request_id()));
    }
    let host = request
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| request.headers().get(header::HOST).and_then(|h| h.to_str().ok()))
        .map(normalize_host);
    let path_and_query = request.uri().path_and_query().map_or("/", |p| p.as_str());
    if let Err(err) = gateway.limits.target(path_and_query) {
        return Err((err, gateway.next_request_id()));
    }
    let route = route(gateway.config.domain.as_deref(), host.as_deref(), path_and_query);
    Ok((route, gateway.next_request_id()))
}

/// The agent endpoint and the gateway's own pages.
async fn local(
    gateway: &Arc<Gateway>,
    route: Route,
    request: Request<RequestBody>,
    peer: SocketAddr,
    request_id: &str,
) -> Response<ResponseBody> {
    let method = request.method().clone();
    let read = method == Method::GET || method == Method::HEAD;
    let admin = matches!(
        route,
        Route::Connections | Route::TunnelConnections(_) | Route::ConnectionAction(..) | Route::Metrics
    );
    let result = if admin && let Err(err) = admin::authorize(gateway, request.headers(), peer) {
        Err(err)
    } else {
        match route {
            // Forwarded above; never reaches this match.
            Route::Tunnel { .. } => Err(PublicError::NotFound),
            Route::AgentConnect => endpoint::accept(gateway, request, peer),
            Route::Health if read => Ok(admin::health(gateway)),
            Route::Connections if read => Ok(admin::connections(gateway, None, local_only(&request)).await),
            Route::TunnelConnections(id) if read => {
                Ok(admin::connections(gateway, Some(&id), local_only(&request)).await)
            }
            Route::TunnelConnections(id) if method == Method::DELETE => admin::close(gateway, &id),
            Route::ConnectionAction(id, action) if method == Method::POST => {
                admin::act(gateway, &id, action).await
            }
            Route::Metrics if read => Ok(admin::metrics(gateway)),
            Route::Health
            | Route::Connections
            | Route::TunnelConnections(_)
            | Route::ConnectionAction(..)
            | Route::Metrics => Err(PublicError::MethodNotAllowed),
            Route::InvalidTunnelId(text) => Err(PublicError::InvalidTunnelId(text)),
            Route::NotFound => Err(PublicError::NotFound),
        }
    };
    result.unwrap_or_else(|err| err.to_response(request_id)).map(Either::Left)
}

/// `?node=local`: the admin listing of this node only (in a cluster).
fn local_only(request: &Request<RequestBody>) -> bool {
    request.uri().query().is_some_and(|query| query.split('&').any(|pair| pair == "node=local"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_web";
    const LABEL: &str = "agent-0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4-web";

    fn tunnel(target: &str) -> Route {
        Route::Tunnel { id: ID.parse().unwrap(), target: target.into(), by_path: true }
    }

    fn by_host(target: &str) -> Route {
        Route::Tunnel { id: ID.parse().unwrap(), target: target.into(), by_path: false }
    }

    #[test]
    fn path_routing_rewrites_and_keeps_query() {
        assert_eq!(route(None, None, &format!("/t/{ID}/api/x?y=1&z")), tunnel("/api/x?y=1&z"));
        assert_eq!(route(None, None, &format!("/t/{ID}")), tunnel("/"));
        assert_eq!(route(None, None, &format!("/t/{ID}?q=1")), tunnel("/?q=1"));
        assert_eq!(route(None, None, &format!("/t/{ID}/")), tunnel("/"));
        assert_eq!(route(None, None, "/t/nope/x"), Route::InvalidTunnelId("nope".into()));
    }

    #[test]
    fn host_routing_by_label() {
        let raw = format!("{}.Tunnel.Example.com.:8443", LABEL.to_uppercase());
        let host = normalize_host(&raw);
        assert_eq!(route(Some("tunnel.example.com"), Some(&host), "/a?b"), by_host("/a?b"));
        // The bare domain and other hosts fall back to the gateway's own routes.
        assert_eq!(route(Some("tunnel.example.com"), Some("tunnel.example.com"), "/"), Route::Health);
        assert_eq!(route(Some("tunnel.example.com"), Some("other.org"), "/ws"), Route::AgentConnect);
        assert_eq!(
            route(Some("tunnel.example.com"), Some("www.tunnel.example.com"), "/"),
            Route::InvalidTunnelId("www".into())
        );
        assert_eq!(route(Some("tunnel.example.com"), Some("a.b.tunnel.example.com"), "/"), Route::NotFound);
        // A host that merely ends with the domain's text is not a subdomain.
        assert_eq!(route(Some("example.com"), Some("badexample.com"), "/"), Route::Health);
        // Without --domain, Host is ignored.
        assert_eq!(route(None, Some(&format!("{LABEL}.x.com")), "/"), Route::Health);
    }

    #[test]
    fn gateway_pages() {
        assert_eq!(route(None, None, "/"), Route::Health);
        assert_eq!(route(None, None, "/ws"), Route::AgentConnect);
        assert_eq!(route(None, None, "/connections"), Route::Connections);
        assert_eq!(
            route(None, None, &format!("/connections/{ID}")),
            Route::TunnelConnections(ID.parse().unwrap())
        );
        assert_eq!(route(None, None, "/favicon.ico"), Route::NotFound);
        assert_eq!(route(None, None, "/metrics"), Route::Metrics);
        let id: TunnelId = ID.parse().unwrap();
        assert_eq!(
            route(None, None, &format!("/connections/{ID}/ping")),
            Route::ConnectionAction(id.clone(), Action::Ping)
        );
        assert_eq!(
            route(None, None, &format!("/connections/{ID}/drain")),
            Route::ConnectionAction(id, Action::Drain)
        );
        assert_eq!(route(None, None, &format!("/connections/{ID}/other")), Route::NotFound);
    }

    #[test]
    fn hosts_normalise() {
        assert_eq!(normalize_host("Example.COM:80"), "example.com");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("[::1]:3000"), "[::1]");
        assert_eq!(normalize_host("127.0.0.1"), "127.0.0.1");
        // Already normal: borrowed, not copied.
        assert!(matches!(normalize_host("example.com:80"), Cow::Borrowed("example.com")));
    }
}
