//! Forwarding one public request through a tunnel: pick a session, open a stream, send the head
//! and stream the body, wait for the response head, stream the response body back. Upgrades
//! (`101`) turn the stream into a raw pipe.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferry_codec::{AbortCode, Frame, Head, RequestHead, TunnelId};
use ferry_transport::body::{BodyError, IdleError, IdleTimeout, SendBodyError, send_body};
use ferry_transport::heads::{
    headers_from_wire, headers_to_wire, strip_hop_by_hop, version_to_wire, wants_upgrade,
};
use ferry_transport::stream::{FrameReader, FrameWriter, split_counted};
use ferry_transport::{FrameBody, SessionConfig, StreamSlot, TransportError, multiplex};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, SizeHint};
use http_body_util::{Either, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug};

use crate::cluster::peer::{ACK_DENIED, ACK_UNAUTHORIZED, PeerError};
use crate::cluster::{Cluster, Owners};
use crate::config::GatewayConfig;
use crate::error::PublicError;
use crate::inbound::Inbound;
use crate::limits::{ClientSlot, Limits, client_ip};
use crate::metrics::{Limit, Metrics};
use crate::registry::{OFFLINE_MEMORY, Registry};
use crate::session::{InFlight, Session};
use crate::upgrade::OnUpgrade;
use crate::watch::{ConnWatch, SendClock};

/// The body of every response the gateway sends.
pub(crate) type ResponseBody = Either<Full<Bytes>, TunnelBody>;

/// The body of a public request: read by hyper (HTTP/2) or by the gateway's HTTP/1.1 server.
pub(crate) type RequestBody = Either<Incoming, Inbound>;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// What a request holds while it is in flight: its place in its session's count and in its
/// client's share of the tunnel, and (while its body is still being sent) the upload task, which
/// ends when this is dropped, so a request that is over never keeps its stream open.
#[derive(Debug)]
struct Admitted {
    /// `None` for a request served by another node's session.
    _in_flight: Option<InFlight>,
    _client: ClientSlot,
    _upload: Option<oneshot::Sender<()>>,
}

/// What forwarding needs from the gateway, and nothing more.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Forwarding<'a> {
    pub(crate) registry: &'a Registry,
    pub(crate) limits: &'a Limits,
    pub(crate) metrics: &'a Arc<Metrics>,
    /// Upload and upgrade tasks are tracked with the public connections (the drain waits).
    pub(crate) tracker: &'a TaskTracker,
    pub(crate) settings: &'a ForwardSettings,
    /// The other nodes, when this one is part of a cluster.
    pub(crate) cluster: Option<&'a Arc<Cluster>>,
    /// Limits of the links to other nodes.
    pub(crate) session_config: &'a SessionConfig,
}

/// Forwarding settings, fixed when the gateway starts.
#[derive(Debug)]
pub(crate) struct ForwardSettings {
    stream_open_timeout: Duration,
    response_timeout: Duration,
    /// Per-tunnel response timeouts (`--tunnel-override`).
    response_timeouts: HashMap<TunnelId, Duration>,
    pending_timeout: Duration,
    max_pending: usize,
    body_idle_timeout: Duration,
    /// `http` or `https`, for `X-Forwarded-Proto` and `Forwarded`.
    scheme: &'static str,
    /// Names this gateway in `Via`.
    via_token: String,
}

impl ForwardSettings {
    pub(crate) fn new(config: &GatewayConfig, scheme: &'static str, via_token: String) -> Self {
        Self {
            stream_open_timeout: config.stream_open_timeout,
            response_timeout: config.response_timeout,
            response_timeouts: config
                .tunnel_overrides
                .iter()
                .filter_map(|(id, o)| Some((id.clone(), o.response_timeout?)))
                .collect(),
            pending_timeout: config.pending_timeout,
            max_pending: config.max_pending,
            body_idle_timeout: config.body_idle_timeout,
            scheme,
            via_token,
        }
    }

    /// Whether `Via` shows this request already passed through this gateway.
    pub(crate) fn seen_before(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(header::VIA)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.contains(self.via_token.as_str())))
    }
}

/// Sends `request` to tunnel `id` with the upstream target `target`: admit, open a stream,
/// exchange.
///
/// Not an `async fn`: the request is taken apart before the future is made, so the future holds
/// the head and body it sends, not the request as well (an `async fn` keeps its arguments for as
/// long as it runs, and a copy of any it takes apart). Every request's future is that much
/// smaller, in memory while it is in flight and in the bytes moved to box it.
pub(crate) fn forward<'a>(
    fw: Forwarding<'a>,
    mut request: Request<RequestBody>,
    peer: SocketAddr,
    conn: &'a ConnWatch,
    id: &'a TunnelId,
    (target, by_path): (String, bool),
    request_id: &str,
) -> impl Future<Output = Result<Response<ResponseBody>, PublicError>> + Send + 'a {
    let started = std::time::Instant::now();
    let announced = request.body().size_hint().lower();
    let upgrade = request.version() == Version::HTTP_11 && wants_upgrade(request.headers());
    let on_upgrade = upgrade.then(|| crate::upgrade::on(&mut request));
    let (parts, body) = request.into_parts();
    let body_len = if body.is_end_stream() { Some(0) } else { body.size_hint().exact() };
    let mut head = request_head(fw.settings, parts, peer, target, request_id, upgrade, body_len);
    head.path_routed = by_path;
    async move {
        // Admit: the edge's limits, a session here or at another node (or the wait for one), the
        // announced body.
        let (session, client_slot) = fw.limits.admit(fw.registry, id, peer, || held_elsewhere(fw, id))?;
        if let (Some(cluster), Some(rate)) = (fw.cluster, fw.limits.cluster_rate()) {
            fw.limits.tunnel_rate_counted(id, cluster.tunnel_rate(id, rate).await)?;
        }
        let located = match session {
            Some(session) => Located::Here(session),
            None => locate(fw, id, (peer.ip(), authorization(&head.headers))).await?,
        };
        let (stream, slot, in_flight, metrics) = match located {
            Located::Here(session) => {
                if !session.identity.ip_rules.allows(peer.ip()) {
                    fw.metrics.access_refused("ip", "http");
                    return Err(PublicError::IpDenied);
                }
                if let Some(auth) = &session.identity.basic_auth {
                    let checked = auth.check(authorization(&head.headers)).await;
                    if let Err(err) = checked {
                        if matches!(err, PublicError::AuthRequired) {
                            fw.metrics.access_refused("basic_auth", "http");
                        }
                        return Err(err);
                    }
                    // The tunnel's password is for the gateway; the upstream never sees it.
                    head.headers.retain(|field| !field.is("authorization"));
                }
                if session.is_unhealthy() {
                    debug!(detail = %session.health_detail(), "every agent reports its upstream unhealthy");
                    return Err(PublicError::UpstreamUnhealthy);
                }
                fw.limits.tunnel_capacity(fw.registry, id)?;
                fw.limits.announced_body(id, announced)?;
                // Open: a stream on that session, or on another if it closed before the head was
                // written.
                let metrics = session.metrics.clone();
                let (stream, slot, in_flight) = open(fw, session, id).await?;
                (stream, slot, Some(in_flight), metrics)
            }
            Located::Elsewhere(stream, slot, authenticated) => {
                if authenticated {
                    head.headers.retain(|field| !field.is("authorization"));
                }
                fw.limits.announced_body(id, announced)?;
                (stream, slot, None, fw.metrics.tunnel(id))
            }
        };
        let admitted = Admitted { _in_flight: in_flight, _client: client_slot, _upload: None };
        let (reader, writer) = split_counted(stream, slot);

        // Exchange: the head and body up, the response down.
        let exchange = Exchange { id, head, body_len, body, on_upgrade, reader, writer, admitted };
        let response = exchange.run(fw, conn).await;
        metrics.request_done(started.elapsed());
        response
    }
}

/// Where a request goes: a session of this node, or a stream another node opened to one of its
/// sessions (and whether that node checked the request's basic-auth credential).
enum Located {
    Here(Arc<Session>),
    Elsewhere(multiplex::Stream, StreamSlot, bool),
}

/// The request's first `Authorization` value, for a tunnel with basic authentication.
fn authorization(fields: &[ferry_codec::Header]) -> Option<&[u8]> {
    fields.iter().find(|field| field.is("authorization")).map(|field| field.value().as_ref())
}

/// For a tunnel with no session here and none expected back here: whether another node holds it
/// (or did lately, so its agent is expected back somewhere), and so whether the request may wait.
fn held_elsewhere(fw: Forwarding<'_>, id: &TunnelId) -> Result<(), PublicError> {
    let Some(cluster) = fw.cluster else {
        return Err(PublicError::TunnelNotFound);
    };
    match cluster.owners(id) {
        Owners::Known(owners) if !owners.is_empty() => Ok(()),
        Owners::Unknown => Err(PublicError::ClusterUnavailable),
        Owners::Known(_) if cluster.recently_held(id, OFFLINE_MEMORY) => Ok(()),
        Owners::Known(_) => Err(PublicError::TunnelNotFound),
    }
}

/// Finds a session for a tunnel with none here now: another node's, or (waiting, bounded as for
/// an offline tunnel) the first to come back here or anywhere in the cluster. Nodes whose entry
/// was stale, or that cannot be reached, are passed over: nothing reached an agent through them.
async fn locate(
    fw: Forwarding<'_>,
    id: &TunnelId,
    client: (IpAddr, Option<&[u8]>),
) -> Result<Located, PublicError> {
    let Some(cluster) = fw.cluster else {
        return wait_for_session(fw, id).await.map(Located::Here);
    };
    let deadline = tokio::time::Instant::now() + fw.settings.pending_timeout;
    let mut waiting = None;
    loop {
        // Subscribed before looking, so a change between the look and the wait is not missed.
        let mut changes = fw.registry.subscribe();
        if let Some(session) = fw.registry.pick(id) {
            fw.metrics.pending_outcome(waiting.is_some(), true);
            return Ok(Located::Here(session));
        }
        match cluster.owners(id) {
            Owners::Known(owners) if !owners.is_empty() => {
                if owners[0].holding.healthy == 0 {
                    debug!("every agent of the tunnel, on every node, reports its upstream unhealthy");
                    return Err(PublicError::UpstreamUnhealthy);
                }
                for owner in &owners {
                    match tokio::time::timeout_at(
                        deadline,
                        cluster.open_to(owner, id, client, fw.session_config),
                    )
                    .await
                    {
                        Ok(Ok((stream, slot, authenticated))) => {
                            fw.metrics.pending_outcome(waiting.is_some(), true);
                            return Ok(Located::Elsewhere(stream, slot, authenticated));
                        }
                        // The owner checked the client against the agent's rules.
                        Ok(Err(PeerError::Refused { code: ACK_DENIED, .. })) => {
                            fw.metrics.access_refused("ip", "http");
                            return Err(PublicError::IpDenied);
                        }
                        Ok(Err(PeerError::Refused { code: ACK_UNAUTHORIZED, .. })) => {
                            fw.metrics.access_refused("basic_auth", "http");
                            return Err(PublicError::AuthRequired);
                        }
                        Ok(Err(err)) => debug!(%err, "passing over a node that holds the tunnel"),
                        Err(_) => {
                            fw.metrics.pending(false);
                            return Err(PublicError::TunnelOffline);
                        }
                    }
                }
            }
            Owners::Unknown if !fw.registry.expects_agent(id) => return Err(PublicError::ClusterUnavailable),
            _ => {}
        }
        if waiting.is_none() {
            let Some(slot) = fw.registry.pending_slot(id, fw.settings.max_pending) else {
                fw.metrics.pending(false);
                return Err(PublicError::TunnelOffline);
            };
            waiting = Some(slot);
        }
        if tokio::time::timeout_at(deadline, changes.changed()).await.is_err() {
            fw.metrics.pending(false);
            return Err(PublicError::TunnelOffline);
        }
    }
}

/// Opens a stream on `session`. Nothing has reached an agent until the head is written: a
/// session that closed before that is skipped and the request goes to another (or waits for one
/// to come back).
async fn open(
    fw: Forwarding<'_>,
    mut session: Arc<Session>,
    id: &TunnelId,
) -> Result<(multiplex::Stream, StreamSlot, InFlight), PublicError> {
    let mut attempts = 0;
    loop {
        let in_flight = session.begin_request();
        match tokio::time::timeout(fw.settings.stream_open_timeout, session.open_stream()).await {
            Ok(Ok((stream, slot))) => return Ok((stream, slot, in_flight)),
            Ok(Err(TransportError::TooManyStreams)) => return Err(fw.limits.session_full()),
            Ok(Err(err)) if attempts < MAX_OPEN_ATTEMPTS => {
                debug!(%err, "session closed before the request was sent; trying another");
                attempts += 1;
                drop(in_flight);
                session = pick_session(fw, id).await?;
            }
            Ok(Err(err)) => {
                debug!(%err, "opening a stream failed");
                return Err(PublicError::SessionLost);
            }
            Err(_) => return Err(PublicError::AgentUnresponsive),
        }
    }
}

/// One request on its open stream.
struct Exchange<'a> {
    id: &'a TunnelId,
    head: RequestHead,
    body_len: Option<u64>,
    body: RequestBody,
    on_upgrade: Option<OnUpgrade>,
    reader: FrameReader,
    writer: FrameWriter,
    admitted: Admitted,
}

impl Exchange<'_> {
    async fn run(self, fw: Forwarding<'_>, conn: &ConnWatch) -> Result<Response<ResponseBody>, PublicError> {
        let Self { id, head, body_len, body, on_upgrade, mut reader, mut writer, mut admitted } = self;
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
            let (request_over, request_over_rx) = oneshot::channel::<()>();
            admitted._upload = Some(request_over);
            let body = IdleTimeout::new(body, fw.settings.body_idle_timeout);
            let body = Limited::new(body, usize::try_from(fw.limits.body_limit(id)).unwrap_or(usize::MAX));
            let metrics = Arc::clone(fw.metrics);
            fw.tracker.spawn(upload(body, writer, request_over_rx, upload_failed, metrics).in_current_span());
            Upload::Running
        };

        let upload_failed = async {
            match upload_failed_rx {
                Some(rx) => rx.await,
                None => std::future::pending().await,
            }
        };
        let response_timeout =
            fw.settings.response_timeouts.get(id).copied().unwrap_or(fw.settings.response_timeout);
        let first = tokio::select! {
            // First: a client body that failed is the cause of whatever the agent says next.
            biased;
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
            fw.tracker.spawn(pipe(on_upgrade, reader, writer, admitted).in_current_span());
            return Ok(build_response(status, headers, Either::Left(Full::new(Bytes::new()))));
        }
        if on_upgrade.is_some() {
            // An upgrade the upstream declined: whatever the client sent after its head was meant
            // for the other protocol, so it must not be read as a next request.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let body =
            TunnelBody { inner: FrameBody::new(reader, None), clock: conn.body_clock(), _request: admitted };
        Ok(build_response(status, headers, Either::Right(body)))
    }
}

/// Streams the request body up until it ends, fails, or the request is over (answered, failed,
/// or its client left: the rest of the body is not wanted, and dropping the writer lets the
/// stream go). How it failed goes to `failed` when the client should hear about it.
async fn upload<B>(
    body: Limited<IdleTimeout<B>>,
    mut writer: FrameWriter,
    request_over: oneshot::Receiver<()>,
    failed: oneshot::Sender<PublicError>,
    metrics: Arc<Metrics>,
) where
    B: Body<Data = Bytes> + Send + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let body = ReportFailure { inner: body, failed: Some(failed), metrics };
    tokio::select! {
        sent = send_body(body, &mut writer, AbortCode::ClientGone) => {
            if let Err(SendBodyError::Stream(err)) = sent {
                debug!(%err, "request body not fully sent");
            }
        }
        _ = request_over => debug!("request over before its body was sent; upload dropped"),
    }
}

/// The request body, telling the response side how it failed the moment it fails: before
/// `send_body` sends the agent its `Abort`, so the agent's answer to that abort (it cancels the
/// upstream request and aborts back) can never be taken for the cause.
struct ReportFailure<B> {
    inner: B,
    failed: Option<oneshot::Sender<PublicError>>,
    metrics: Arc<Metrics>,
}

impl<B> Body for ReportFailure<B>
where
    B: Body<Data = Bytes, Error = Box<dyn std::error::Error + Send + Sync>> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(Err(err)) = &frame
            && let Some(failed) = this.failed.take()
        {
            let cause = if err.is::<LengthLimitError>() {
                debug!("request body over the limit; cut");
                this.metrics.limited(Limit::BodySize);
                PublicError::PayloadTooLarge
            } else if err.is::<IdleError>() {
                debug!("the client stopped sending its body; cut");
                this.metrics.limited(Limit::BodyIdle);
                PublicError::RequestTimeout
            } else {
                // Unreadable (bad chunked framing) or cut by a client that left: the agent gets
                // an abort; a client still there hears it was its body.
                debug!(%err, "the request body could not be read");
                PublicError::BadRequest("the request body could not be read")
            };
            let _ = failed.send(cause);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Sessions tried for one request whose stream could not be opened (each closed under it).
const MAX_OPEN_ATTEMPTS: u32 = 3;

/// A session for the tunnel: the least loaded live one, or — when its agent is expected back
/// (reconnecting, restarting, draining) — the first to come back within the pending timeout.
async fn pick_session(fw: Forwarding<'_>, id: &TunnelId) -> Result<Arc<Session>, PublicError> {
    if let Some(session) = fw.registry.pick(id) {
        return Ok(session);
    }
    if !fw.registry.expects_agent(id) {
        return Err(PublicError::TunnelNotFound);
    }
    wait_for_session(fw, id).await
}

/// Waits (bounded in time and in number of waiters) for a session of a tunnel whose agent is
/// expected back.
async fn wait_for_session(fw: Forwarding<'_>, id: &TunnelId) -> Result<Arc<Session>, PublicError> {
    let Some(_slot) = fw.registry.pending_slot(id, fw.settings.max_pending) else {
        fw.metrics.pending(false);
        return Err(PublicError::TunnelOffline);
    };
    let back = fw.registry.wait_until(|registry| registry.pick(id).is_some());
    let session = match tokio::time::timeout(fw.settings.pending_timeout, back).await {
        Ok(()) => fw.registry.pick(id),
        Err(_) => None,
    };
    fw.metrics.pending(session.is_some());
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
    settings: &ForwardSettings,
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
    // The values added here are written into one buffer and handed to the map as slices of it,
    // from pieces: the address is formatted once, nothing else goes through `fmt`.
    let mut scratch = Scratch(BytesMut::with_capacity(256));
    let ip = scratch.ip(client_ip);
    if let Some(value) = scratch.list(&headers, &X_FORWARDED_FOR, &[&ip]) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    let proto = settings.scheme;
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    let quoted_host =
        host.as_ref().and_then(|h| h.to_str().ok()).map(str::trim).filter(|t| !t.contains(['"', '\\']));
    let (host_open, host_text, host_close) = match quoted_host {
        Some(host) => (&b";host=\""[..], host.as_bytes(), &b"\""[..]),
        None => (&b""[..], &b""[..], &b""[..]),
    };
    let (for_open, for_close) = match client_ip {
        IpAddr::V4(_) => (&b"for="[..], &b""[..]),
        IpAddr::V6(_) => (&b"for=\"["[..], &b"]\""[..]),
    };
    let forwarded = scratch.list(
        &headers,
        &header::FORWARDED,
        &[for_open, &ip, for_close, b";proto=", proto.as_bytes(), host_open, host_text, host_close],
    );
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST, host.clone());
        headers.insert(header::HOST, host);
    }
    if let Some(forwarded) = forwarded {
        headers.insert(header::FORWARDED, forwarded);
    }
    let received = match parts.version {
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        _ => "1.1",
    };
    if let Some(via) =
        scratch.list(&headers, &header::VIA, &[received.as_bytes(), b" ", settings.via_token.as_bytes()])
    {
        headers.insert(header::VIA, via);
    }

    RequestHead {
        method: parts.method.as_str().to_owned(),
        target: Bytes::from(target),
        version: version_to_wire(parts.version),
        headers: headers_to_wire(&headers),
        client_addr: Some(SocketAddr::new(client_ip, peer.port())),
        request_id: request_id.to_owned(),
        body_len,
        path_routed: false,
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

/// Where the gateway writes the header values it adds to a request.
struct Scratch(BytesMut);

impl Scratch {
    /// The client's address as text (`1.2.3.4`, `::1`).
    fn ip(&mut self, ip: IpAddr) -> Bytes {
        use std::fmt::Write as _;
        // Writing to a `BytesMut` cannot fail.
        let _ = write!(self.0, "{ip}");
        self.0.split().freeze()
    }

    /// `value` (the concatenation of its pieces) appended to the comma-separated list field
    /// `name` already has (one field, as proxies conventionally do), or `value` alone; `None` if
    /// the result is not a valid value.
    fn list(&mut self, headers: &HeaderMap, name: &HeaderName, value: &[&[u8]]) -> Option<HeaderValue> {
        if let Some(existing) = headers.get(name).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty()) {
            self.0.extend_from_slice(existing.as_bytes());
            self.0.extend_from_slice(b", ");
        }
        for piece in value {
            self.0.extend_from_slice(piece);
        }
        HeaderValue::from_maybe_shared(self.0.split().freeze()).ok()
    }
}

/// After `101`: bytes both ways between the public client and the stream, until both close.
async fn pipe(on_upgrade: OnUpgrade, reader: FrameReader, writer: FrameWriter, _request: Admitted) {
    let upgraded = match on_upgrade.upgraded().await {
        Ok(upgraded) => upgraded,
        Err(err) => {
            debug!(%err, "client upgrade failed");
            return;
        }
    };
    match ferry_transport::stream::pipe(reader, writer, upgraded).await {
        Ok((down, up)) => debug!(down, up, "upgraded connection closed"),
        Err(err) => debug!(%err, "upgraded connection failed"),
    }
}

/// A response body read from the tunnel; keeps the request counted in flight until its server is
/// done with it (sent, or dropped because the client went away), and tells its connection's
/// watch whether the client is taking what it is given.
#[derive(Debug)]
pub(crate) struct TunnelBody {
    inner: FrameBody,
    /// `None` when the connection's server times its own writes.
    clock: Option<Arc<SendClock>>,
    _request: Admitted,
}

impl Body for TunnelBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BodyError>>> {
        if let Some(clock) = &self.clock {
            clock.polled();
        }
        let result = Pin::new(&mut self.inner).poll_frame(cx);
        match &result {
            Poll::Ready(Some(Ok(_))) => {
                if let Some(clock) = &self.clock {
                    clock.handed_over();
                }
            }
            // The server now cuts the response short: the client sees it incomplete, never complete.
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    type BoxError = Box<dyn std::error::Error + Send + Sync>;

    /// A body of two chunks that then fails with `err`.
    fn failing(
        err: BoxError,
    ) -> StreamBody<impl futures_util::Stream<Item = Result<http_body::Frame<Bytes>, BoxError>> + Unpin> {
        let frames = vec![
            Ok(http_body::Frame::data(Bytes::from_static(b"one"))),
            Ok(http_body::Frame::data(Bytes::from_static(b"two"))),
            Err(err),
        ];
        StreamBody::new(futures_util::stream::iter(frames))
    }

    /// The error `Limited` gives (its type cannot be built outside http-body-util).
    async fn over_the_limit() -> BoxError {
        let mut body = Limited::new(Full::new(Bytes::from_static(b"too long")), 2);
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<LengthLimitError>());
        err
    }

    #[tokio::test]
    async fn a_failed_body_is_reported_before_its_error_is_returned() {
        type Expected = fn(&PublicError) -> bool;
        let cases: [(BoxError, Expected); 3] = [
            (Box::new(IdleError(Duration::from_secs(1))), |e| matches!(e, PublicError::RequestTimeout)),
            (over_the_limit().await, |e| matches!(e, PublicError::PayloadTooLarge)),
            ("bad chunk".into(), |e| matches!(e, PublicError::BadRequest(_))),
        ];
        for (err, expected) in cases {
            let (tx, mut rx) = oneshot::channel();
            let mut body = ReportFailure {
                inner: failing(err),
                failed: Some(tx),
                metrics: Arc::new(Metrics::default()),
            };
            // The chunks before the failure pass through and report nothing.
            for _ in 0..2 {
                assert!(body.frame().await.unwrap().unwrap().is_data());
                assert!(rx.try_recv().is_err_and(|e| e == oneshot::error::TryRecvError::Empty));
            }
            assert!(body.frame().await.unwrap().is_err());
            // Already there when the error comes back, i.e. before `send_body` aborts the stream.
            let cause = rx.try_recv().expect("the failure was reported with the error");
            assert!(expected(&cause), "{cause:?}");
        }
    }
}

#[cfg(test)]
mod forwarding_tests {
    use super::*;

    fn head_for(peer: &str, headers: &[(&str, &str)]) -> RequestHead {
        let mut request = Request::get("/x").version(Version::HTTP_11);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let (parts, ()) = request.body(()).unwrap().into_parts();
        let settings = ForwardSettings::new(&GatewayConfig::default(), "https", "ferry-test".into());
        request_head(&settings, parts, peer.parse().unwrap(), "/x".into(), "req-1", false, Some(0))
    }

    fn field<'a>(head: &'a RequestHead, name: &str) -> Vec<&'a str> {
        head.headers.iter().filter(|h| h.is(name)).map(|h| h.value_str().unwrap()).collect()
    }

    /// The fields the gateway adds, exactly: each list field extended (one field), the address
    /// quoted and bracketed for IPv6, the host quoted in `Forwarded`.
    #[test]
    fn forwarding_fields_are_added_to_what_the_client_sent() {
        let head = head_for(
            "[2001:db8::7]:4000",
            &[
                ("host", "app.example.com"),
                ("x-forwarded-for", "198.51.100.9"),
                ("forwarded", "for=198.51.100.9"),
                ("via", "1.1 edge"),
            ],
        );
        assert_eq!(field(&head, "x-forwarded-for"), ["198.51.100.9, 2001:db8::7"]);
        assert_eq!(
            field(&head, "forwarded"),
            ["for=198.51.100.9, for=\"[2001:db8::7]\";proto=https;host=\"app.example.com\""]
        );
        assert_eq!(field(&head, "via"), ["1.1 edge, 1.1 ferry-test"]);
        assert_eq!(field(&head, "x-forwarded-proto"), ["https"]);
        assert_eq!(field(&head, "x-forwarded-host"), ["app.example.com"]);
    }

    /// An IPv4 client (also one mapped into IPv6) is written plainly; a host that cannot be
    /// quoted as is stays out of `Forwarded`; a list field that is not text is replaced.
    #[test]
    fn forwarding_fields_for_an_ipv4_client() {
        let head = head_for("[::ffff:192.0.2.1]:4000", &[("host", "we\"ird")]);
        assert_eq!(field(&head, "x-forwarded-for"), ["192.0.2.1"]);
        assert_eq!(field(&head, "forwarded"), ["for=192.0.2.1;proto=https"]);

        let mut request = Request::get("/x");
        request.headers_mut().unwrap().insert(X_FORWARDED_FOR, HeaderValue::from_bytes(b"caf\xe9").unwrap());
        let (parts, ()) = request.body(()).unwrap().into_parts();
        let settings = ForwardSettings::new(&GatewayConfig::default(), "http", "ferry-test".into());
        let head =
            request_head(&settings, parts, "192.0.2.1:1".parse().unwrap(), "/x".into(), "r", false, None);
        assert_eq!(field(&head, "x-forwarded-for"), ["192.0.2.1"]);
    }
}
