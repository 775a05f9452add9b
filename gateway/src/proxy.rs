//! Forwarding one public request through a tunnel: pick a session, open a stream, send the head
//! and stream the body, wait for the response head, stream the response body back. Upgrades
//! (`101`) turn the stream into a raw pipe.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use ferry_codec::{AbortCode, Frame, Head, RequestHead, TunnelId};
use ferry_transport::body::{BodyError, IdleError, IdleTimeout, SendBodyError, send_body};
use ferry_transport::heads::{
    headers_from_wire, headers_to_wire, strip_hop_by_hop, version_to_wire, wants_upgrade,
};
use ferry_transport::stream::{FrameReader, FrameWriter, split_counted};
use ferry_transport::{FrameBody, TransportError};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, SizeHint};
use http_body_util::{Either, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use tracing::{Instrument, debug};

use crate::Gateway;
use crate::error::PublicError;
use crate::limits::{ClientSlot, client_ip, client_key};
use crate::metrics::Limit;
use crate::server::{ConnWatch, SendClock};
use crate::session::{InFlight, Session};

/// The body of every response the gateway sends.
pub(crate) type ResponseBody = Either<Full<Bytes>, TunnelBody>;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// What a request holds while it is in flight: its place in its session's count and in its
/// client's share of the tunnel, and (while its body is still being sent) the upload task, which
/// ends when this is dropped, so a request that is over never keeps its stream open.
#[derive(Debug)]
struct Admitted {
    _in_flight: InFlight,
    _client: ClientSlot,
    _upload: Option<oneshot::Sender<()>>,
}

/// Sends `request` to tunnel `id` with the upstream target `target`.
pub(crate) async fn forward(
    gateway: &Arc<Gateway>,
    mut request: Request<Incoming>,
    peer: SocketAddr,
    conn: &ConnWatch,
    id: &TunnelId,
    target: String,
    request_id: &str,
) -> Result<Response<ResponseBody>, PublicError> {
    let (session, client_slot) = admit(gateway, id, peer)?;
    let mut session = match session {
        Some(session) => session,
        None => wait_for_session(gateway, id).await?,
    };
    if session.is_unhealthy() {
        debug!(detail = %session.health_detail(), "every agent reports its upstream unhealthy");
        return Err(PublicError::UpstreamUnhealthy);
    }
    let max_requests = u64::try_from(gateway.config.max_tunnel_requests).unwrap_or(u64::MAX);
    if gateway.registry.in_flight(id) >= max_requests {
        gateway.metrics.limited(Limit::TunnelConcurrency);
        return Err(PublicError::AtCapacity);
    }
    let overrides = gateway.config.tunnel_overrides.get(id);
    let body_limit =
        overrides.and_then(|o| o.max_request_body).or(gateway.config.max_request_body).unwrap_or(u64::MAX);
    let response_timeout =
        overrides.and_then(|o| o.response_timeout).unwrap_or(gateway.config.response_timeout);
    if request.body().size_hint().lower() > body_limit {
        gateway.metrics.limited(Limit::BodySize);
        return Err(PublicError::PayloadTooLarge);
    }
    let upgrade = request.version() == Version::HTTP_11 && wants_upgrade(request.headers());
    let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let (parts, body) = request.into_parts();
    let body_len = if body.is_end_stream() { Some(0) } else { body.size_hint().exact() };
    let head = request_head(gateway, parts, peer, target, request_id, upgrade, body_len);

    // Nothing has reached an agent until the head is written: a session that closed before that
    // is skipped and the request goes to another (or waits for one to come back).
    let mut attempts = 0;
    let (stream, slot, in_flight) = loop {
        let in_flight = session.begin_request();
        match tokio::time::timeout(gateway.config.stream_open_timeout, session.open_stream()).await {
            Ok(Ok((stream, slot))) => break (stream, slot, in_flight),
            Ok(Err(TransportError::TooManyStreams)) => {
                gateway.metrics.limited(Limit::TunnelConcurrency);
                return Err(PublicError::AtCapacity);
            }
            Ok(Err(err)) if attempts < MAX_OPEN_ATTEMPTS => {
                debug!(%err, "session closed before the request was sent; trying another");
                attempts += 1;
                drop(in_flight);
                session = pick_session(gateway, id).await?;
            }
            Ok(Err(err)) => {
                debug!(%err, "opening a stream failed");
                return Err(PublicError::SessionLost);
            }
            Err(_) => return Err(PublicError::AgentUnresponsive),
        }
    };
    let mut admitted = Admitted { _in_flight: in_flight, _client: client_slot, _upload: None };
    let (mut reader, mut writer) = split_counted(stream, slot);
    // The head leaves with the body's first bytes (or with `End`) in one write.
    writer.queue(&Frame::Head(Head::Request(head))).map_err(|_| PublicError::AgentError)?;

    // The request body goes up while the response comes down: an echo answers before the
    // upload ends. A known-empty body is just `End`, without a task.
    // A body that grows past the limit without announcing its length is cut there; if the
    // response has not started, the client gets 413.
    let mut upload_failed_rx = None;
    let upload = if body_len == Some(0) {
        writer.send(&Frame::End).await.map_err(|_| PublicError::SessionLost)?;
        Upload::Done(writer)
    } else {
        // How the upload failed, when the client should hear about it (if no response has
        // started): its body grew past the limit (413), or it went quiet (408).
        let (upload_failed, rx) = oneshot::channel();
        upload_failed_rx = Some(rx);
        let (request_over, mut request_over_rx) = oneshot::channel::<()>();
        admitted._upload = Some(request_over);
        let body = IdleTimeout::new(body, gateway.config.body_idle_timeout);
        let body = Limited::new(body, usize::try_from(body_limit).unwrap_or(usize::MAX));
        let metrics_gateway = Arc::clone(gateway);
        gateway.tracker.spawn(
            async move {
                let sent = tokio::select! {
                    sent = send_body(body, &mut writer, AbortCode::ClientGone) => sent,
                    // The request is over (answered, failed, or its client left): the rest of
                    // its body is not wanted, and dropping the writer lets the stream go.
                    _ = &mut request_over_rx => {
                        debug!("request over before its body was sent; upload dropped");
                        return;
                    }
                };
                match sent {
                    Err(SendBodyError::Body(err)) if err.is::<LengthLimitError>() => {
                        debug!("request body over the limit; cut");
                        metrics_gateway.metrics.limited(Limit::BodySize);
                        let _ = upload_failed.send(PublicError::PayloadTooLarge);
                    }
                    Err(SendBodyError::Body(err)) if err.is::<IdleError>() => {
                        debug!("the client stopped sending its body; cut");
                        metrics_gateway.metrics.limited(Limit::BodyIdle);
                        let _ = upload_failed.send(PublicError::RequestTimeout);
                    }
                    Err(SendBodyError::Body(err)) => {
                        // Unreadable (bad chunked framing) or cut by a client that left: the
                        // agent got an abort; a client still there hears it was its body.
                        debug!(%err, "the request body could not be read");
                        let _ =
                            upload_failed.send(PublicError::BadRequest("the request body could not be read"));
                    }
                    Err(err) => debug!(%err, "request body not fully sent"),
                    Ok(_) => {}
                }
            }
            .in_current_span(),
        );
        Upload::Running
    };

    let upload_failed = async {
        match upload_failed_rx {
            Some(rx) => rx.await,
            None => std::future::pending().await,
        }
    };
    let first = tokio::select! {
        Ok(err) = upload_failed => return Err(err),
        first = tokio::time::timeout(response_timeout, reader.next()) => first,
    };
    let head = match first {
        Err(_) => return Err(PublicError::UpstreamTimeout),
        Ok(Some(Ok(Frame::Head(Head::Response(head))))) => head,
        Ok(Some(Ok(Frame::Abort(abort)))) => {
            debug!(code = ?abort.code, detail = %abort.message, "the agent aborted the request");
            return Err(PublicError::from_abort(abort.code));
        }
        Ok(Some(Ok(other))) => {
            debug!(kind = other.kind().name(), "agent answered without a response head");
            return Err(PublicError::AgentError);
        }
        Ok(Some(Err(TransportError::Codec(err)))) => {
            debug!(%err, "the agent sent a response head that does not decode");
            return Err(PublicError::AgentError);
        }
        Ok(Some(Err(err))) => {
            debug!(%err, "reading the response head failed");
            return Err(PublicError::SessionLost);
        }
        Ok(None) => return Err(PublicError::SessionLost),
    };
    let status = StatusCode::from_u16(head.status).map_err(|_| PublicError::AgentError)?;
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    if status.is_informational() && !switching {
        // The agent sends interim responses never; one here would be a final 1xx.
        debug!(%status, "the agent answered with an interim status as the final one");
        return Err(PublicError::AgentError);
    }
    let mut headers = headers_from_wire(head.headers);
    // The agent strips these too; a misbehaving agent must not steer our framing.
    strip_hop_by_hop(&mut headers, switching);

    if switching {
        let (Some(on_upgrade), Upload::Done(writer)) = (on_upgrade, upload) else {
            debug!("101 without an upgrade request (or with a request body)");
            return Err(PublicError::AgentError);
        };
        gateway.tracker.spawn(pipe(on_upgrade, reader, writer, admitted).in_current_span());
        return Ok(build_response(status, headers, Either::Left(Full::new(Bytes::new()))));
    }
    if on_upgrade.is_some() {
        // An upgrade the upstream declined: whatever the client sent after its head was meant
        // for the other protocol, so it must not be read as a next request.
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let body = TunnelBody { inner: FrameBody::new(reader, None), clock: conn.clock(), _request: admitted };
    Ok(build_response(status, headers, Either::Right(body)))
}

/// The checks a request meets before a session is chosen, in order: its client's rate, whether
/// the tunnel exists at all (a request for an unknown tunnel costs no tunnel state), the
/// tunnel's rate, and its client's share of the tunnel. Returns the least-loaded session if one
/// is live now (`None`: the agent is expected back, wait for it).
fn admit(
    gateway: &Gateway,
    id: &TunnelId,
    peer: SocketAddr,
) -> Result<(Option<Arc<Session>>, ClientSlot), PublicError> {
    let now = std::time::Instant::now();
    let refuse = |wait: std::time::Duration, limit: Limit| {
        gateway.metrics.limited(limit);
        PublicError::RateLimited(wait.as_secs_f64().ceil().max(1.0) as u64)
    };
    if let Some(clients) = &gateway.client_rates {
        clients.check(&client_key(peer.ip()), now).map_err(|wait| refuse(wait, Limit::ClientRate))?;
    }
    let session = gateway.registry.pick(id);
    if session.is_none() && !gateway.registry.expects_agent(id) {
        return Err(PublicError::TunnelNotFound);
    }
    if let Some(tunnels) = &gateway.tunnel_rates {
        tunnels.check(id, now).map_err(|wait| refuse(wait, Limit::TunnelRate))?;
    }
    let Some(slot) = gateway.client_load.try_begin(id, peer.ip()) else {
        gateway.metrics.limited(Limit::ClientConcurrency);
        return Err(PublicError::ClientAtCapacity);
    };
    Ok((session, slot))
}

/// Sessions tried for one request whose stream could not be opened (each closed under it).
const MAX_OPEN_ATTEMPTS: u32 = 3;

/// A session for the tunnel: the least loaded live one, or — when its agent is expected back
/// (reconnecting, restarting, draining) — the first to come back within the pending timeout.
async fn pick_session(gateway: &Gateway, id: &TunnelId) -> Result<Arc<Session>, PublicError> {
    if let Some(session) = gateway.registry.pick(id) {
        return Ok(session);
    }
    if !gateway.registry.expects_agent(id) {
        return Err(PublicError::TunnelNotFound);
    }
    wait_for_session(gateway, id).await
}

/// Waits (bounded in time and in number of waiters) for a session of a tunnel whose agent is
/// expected back.
async fn wait_for_session(gateway: &Gateway, id: &TunnelId) -> Result<Arc<Session>, PublicError> {
    let Some(_slot) = gateway.registry.pending_slot(id, gateway.config.max_pending) else {
        gateway.metrics.pending(false);
        return Err(PublicError::TunnelOffline);
    };
    let back = gateway.registry.wait_until(|registry| registry.pick(id).is_some());
    let session = match tokio::time::timeout(gateway.config.pending_timeout, back).await {
        Ok(()) => gateway.registry.pick(id),
        Err(_) => None,
    };
    gateway.metrics.pending(session.is_some());
    session.ok_or(PublicError::TunnelOffline)
}

/// Where the request body stands when the response head arrives.
enum Upload {
    /// Sent (it was empty); the writer is free for an upgrade.
    Done(FrameWriter),
    /// Still streaming in its own task.
    Running,
}

fn build_response(status: StatusCode, headers: HeaderMap, body: ResponseBody) -> Response<ResponseBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// The head the agent gets: hop-by-hop fields gone, forwarding fields added, target rewritten.
fn request_head(
    gateway: &Gateway,
    parts: Parts,
    peer: SocketAddr,
    target: String,
    request_id: &str,
    upgrade: bool,
    body_len: Option<u64>,
) -> RequestHead {
    let mut headers = parts.headers;
    join_cookies(&mut headers);
    // HTTP/2 clients send the host as `:authority`; the upstream (HTTP/1.1) needs `Host`.
    // The target's authority wins over `Host` (absolute form; HTTP/2's `:authority`), so the
    // upstream sees the host the request was routed by.
    let host = parts
        .uri
        .authority()
        .and_then(|authority| HeaderValue::from_str(authority.as_str()).ok())
        .or_else(|| headers.get(header::HOST).cloned());
    strip_hop_by_hop(&mut headers, upgrade);
    let client_ip = client_ip(peer.ip());
    append_list(&mut headers, X_FORWARDED_FOR, &client_ip.to_string());
    let proto = gateway.public_scheme();
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    let mut forwarded = match client_ip {
        IpAddr::V4(ip) => format!("for={ip};proto={proto}"),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\";proto={proto}"),
    };
    if let Some(host) = host {
        if let Some(text) = host.to_str().ok().map(str::trim).filter(|t| !t.contains(['"', '\\'])) {
            forwarded.push_str(&format!(";host=\"{text}\""));
        }
        headers.insert(X_FORWARDED_HOST, host.clone());
        headers.insert(header::HOST, host);
    }
    append_list(&mut headers, header::FORWARDED, &forwarded);
    let received = match parts.version {
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        _ => "1.1",
    };
    append_list(&mut headers, header::VIA, &format!("{received} {}", gateway.via_token));

    RequestHead {
        method: parts.method.as_str().to_owned(),
        target: Bytes::from(target),
        version: version_to_wire(parts.version),
        headers: headers_to_wire(&headers),
        client_addr: Some(SocketAddr::new(client_ip, peer.port())),
        request_id: request_id.to_owned(),
        body_len,
    }
}

/// HTTP/2 clients may split `Cookie` into one field per cookie; an HTTP/1.1 upstream expects one
/// field, so the pieces are joined with `"; "` (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let mut pieces = headers.get_all(header::COOKIE).iter();
    if pieces.next().is_none() || pieces.next().is_none() {
        return;
    }
    let joined: Vec<&[u8]> = headers.get_all(header::COOKIE).iter().map(HeaderValue::as_bytes).collect();
    match HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        Ok(value) => {
            headers.insert(header::COOKIE, value);
        }
        Err(_) => debug!("cookie fields that cannot be joined; left as they are"),
    }
}

/// Appends `value` to a comma-separated list field (one field, as proxies conventionally do).
fn append_list(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    let joined = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.is_empty() => format!("{existing}, {value}"),
        _ => value.to_owned(),
    };
    if let Ok(joined) = HeaderValue::from_str(&joined) {
        headers.insert(name, joined);
    }
}

/// After `101`: bytes both ways between the public client and the stream, until both close.
async fn pipe(on_upgrade: OnUpgrade, reader: FrameReader, writer: FrameWriter, _request: Admitted) {
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(err) => {
            debug!(%err, "client upgrade failed");
            return;
        }
    };
    match ferry_transport::stream::pipe(reader, writer, TokioIo::new(upgraded)).await {
        Ok((down, up)) => debug!(down, up, "upgraded connection closed"),
        Err(err) => debug!(%err, "upgraded connection failed"),
    }
}

/// A response body read from the tunnel; keeps the request counted in flight until hyper is done
/// with it (sent, or dropped because the client went away), and tells its connection's watch
/// whether the client is taking what it is given.
#[derive(Debug)]
pub(crate) struct TunnelBody {
    inner: FrameBody,
    clock: Arc<SendClock>,
    _request: Admitted,
}

impl Body for TunnelBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BodyError>>> {
        self.clock.polled();
        let result = Pin::new(&mut self.inner).poll_frame(cx);
        match &result {
            Poll::Ready(Some(Ok(_))) => self.clock.handed_over(),
            // hyper now cuts the response short: the client sees it incomplete, never complete.
            Poll::Ready(Some(Err(err))) => debug!(%err, "response body broken"),
            _ => {}
        }
        result
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
