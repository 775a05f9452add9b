//! The agent's side of a request stream: read the request head, proxy to the upstream on a pooled
//! connection ([`crate::pool`]) with the body streaming, send the response head and body back.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ferry_codec::{Abort, AbortCode, Frame, Head, RequestHead, ResponseHead};
use ferry_transport::body::{SendBodyError, send_body};
use ferry_transport::heads::{fields_want_upgrade, strip_hop_by_hop_fields, version_to_wire};
use ferry_transport::stream::{FrameReader, FrameWriter, acknowledge, pipe, split};
use ferry_transport::{FrameBody, multiplex};
use http::StatusCode;
use http::uri::PathAndQuery;
use http_body_util::{LengthLimitError, Limited};
use tracing::{Instrument, debug, debug_span};

use crate::config::{AgentConfig, POOL_IDLE_TIMEOUT, POOL_MAX_IDLE_PER_UPSTREAM};
use crate::error::AgentError;
use crate::error_chain;
use crate::filter::{Refusal, target_path};
use crate::health::{Admission, Health};
use crate::inspect::{Inspector, Metered, Record, RequestRecord, Side, Tee};
use crate::metrics::AgentMetrics;
use crate::pool::{OutRequest, UpstreamPool};
use ferry_transport::h1::RequestFraming;

/// A request body on its way upstream: through the inspector's tee, cut at the agent's body limit.
pub(crate) type UpstreamBody = Limited<Tee<RequestSource>>;

/// A request body with nothing in it.
pub(crate) fn empty_body() -> UpstreamBody {
    Limited::new(Tee::new(RequestSource::Whole(None), None), usize::MAX)
}

/// Where a request body comes from: the tunnel, or (a replay) memory.
#[derive(Debug)]
pub(crate) enum RequestSource {
    /// Streamed from the request's stream.
    Stream(FrameBody),
    /// Whole; `None` once sent.
    Whole(Option<bytes::Bytes>),
}

impl http_body::Body for RequestSource {
    type Data = bytes::Bytes;
    type Error = ferry_transport::BodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        match self.get_mut() {
            Self::Stream(body) => std::pin::Pin::new(body).poll_frame(cx),
            Self::Whole(data) => std::task::Poll::Ready(
                data.take().filter(|d| !d.is_empty()).map(|d| Ok(http_body::Frame::data(d))),
            ),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Stream(body) => body.is_end_stream(),
            Self::Whole(data) => data.as_ref().is_none_or(bytes::Bytes::is_empty),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Self::Stream(body) => body.size_hint(),
            Self::Whole(data) => http_body::SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

/// Builds the upstream connection pool: `TCP_NODELAY`, connect timeout, idle timeout, and for an
/// `https` upstream TLS trusting the system roots plus `extra_ca` (PEM).
pub(crate) fn pool(config: &AgentConfig, extra_ca: Option<&[u8]>) -> Result<UpstreamPool, AgentError> {
    // Any route may lead to an https upstream, not only the default one.
    let roots = if config.upstreams().iter().any(|u| u.scheme == http::uri::Scheme::HTTPS) {
        crate::tls::root_store(extra_ca, "--upstream-ca-file")?
    } else {
        rustls::RootCertStore::empty()
    };
    let mut tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    // A fixed receive buffer instead of the kernel's autotuning (up to 32 MiB per socket here):
    // a response whose client stopped reading parks what the upstream already sent in this
    // buffer, and a thousand such responses drove the host into TCP memory pressure, which slowed
    // every socket on it (measured: 2 GiB of socket memory, downloads at 30 MB/s).
    let dialer = crate::pool::dialer(Arc::new(tls), config.upstream_connect_timeout, UPSTREAM_SOCKET_BUFFER);
    Ok(UpstreamPool::new(dialer, UPSTREAM_READ_BUFFER, POOL_IDLE_TIMEOUT, POOL_MAX_IDLE_PER_UPSTREAM))
}

/// Largest response head, and the most read from an upstream connection at once: 64 KiB is one
/// `Data` frame, what the agent sends at a time anyway.
const UPSTREAM_READ_BUFFER: usize = 64 * 1024;

/// Receive buffer of an upstream connection: an upstream is near (loopback or a LAN), where
/// 512 KiB keeps a single download at full speed.
const UPSTREAM_SOCKET_BUFFER: u32 = 512 * 1024;

/// The request forwarder: what every request stream shares on its way to the upstream (the
/// connection pool, the configuration, the count in flight, the breaker). Not to be confused with
/// [`crate::config::Upstream`], the address of one upstream.
#[derive(Debug)]
pub(crate) struct Forwarder {
    pub(crate) pool: UpstreamPool,
    pub(crate) config: Arc<AgentConfig>,
    /// Streams being served now, across sessions.
    pub(crate) in_flight: AtomicUsize,
    /// Upstream health and the circuit breaker.
    pub(crate) health: Health,
    /// What `--metrics` shows.
    pub(crate) metrics: AgentMetrics,
    /// The request inspector, when it is on.
    pub(crate) inspector: Option<Arc<Inspector>>,
    /// Where requests are counted for the console, when it is on.
    pub(crate) status: Option<Arc<crate::status::Status>>,
}

/// Counts a request for the console while it is served; `failed` when the agent answered it
/// with an error of its own.
struct Counted<'a> {
    status: &'a crate::status::Status,
    failed: bool,
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.status.request_ended(self.failed);
    }
}

/// Streams in flight above which a new stream is acknowledged at once rather than with its
/// response head. yamux lets an opener wait for at most 256 unacknowledged streams; a stream
/// started below this count may stay unacknowledged while it waits for its upstream, so at most
/// this many are ever unacknowledged, and the gateway never stalls on them. Below it, the
/// acknowledgement rides on the first response frame and costs nothing.
const EAGER_ACK_ABOVE: usize = 128;

/// Counts a stream in flight while alive.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one inbound stream to the end, in a span of its own (a child of the caller's).
pub(crate) fn serve_stream(upstream: Arc<Forwarder>, stream: multiplex::Stream) -> impl Future<Output = ()> {
    let span = debug_span!("stream", stream_id = %stream.id(), request_id = tracing::field::Empty);
    serve(upstream, stream).instrument(span)
}

async fn serve(upstream: Arc<Forwarder>, mut stream: multiplex::Stream) {
    let _in_flight = InFlight(&upstream.in_flight);
    let in_flight = upstream.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    if in_flight > EAGER_ACK_ABOVE
        && let Err(err) = acknowledge(&mut stream).await
    {
        debug!(%err, "stream closed before it was acknowledged");
        return;
    }
    let (mut reader, mut writer) = split(stream);
    let mut head = match request_head(&mut reader).await {
        Ok(First::Request(head)) => head,
        Ok(First::Tcp(open)) => {
            let config = &upstream.config;
            let serving =
                crate::tcp::serve(&config.tcp, config.upstream_connect_timeout, open, reader, writer);
            Box::pin(serving).await;
            return;
        }
        Err(Some(message)) => {
            Box::pin(abort(&mut writer, AbortCode::ProtocolError, message)).await;
            return;
        }
        Err(None) => return,
    };
    tracing::Span::current().record("request_id", head.request_id.as_str());
    let record = upstream.inspector.as_ref().map(|inspector| inspector.begin(RequestRecord::of(&head), None));
    let mut counted = upstream.status.as_deref().map(|status| {
        status.request_started();
        Counted { status, failed: false }
    });
    let filters = &upstream.config.filters;
    let refusal = match filters.max_concurrent {
        Some(max) if in_flight > max => Err(Box::new(Refusal::at_capacity())),
        _ => filters.check(&head),
    };
    if let Err(refusal) = refusal {
        debug!(code = refusal.code, "request refused by the agent's filters");
        upstream.metrics.own_answer(refusal.code);
        if let Some(record) = &record {
            record.fail(Some(refusal.status.as_u16()), refusal.code, &refusal.message);
        }
        if let Some(counted) = &mut counted {
            counted.failed = true;
        }
        Box::pin(refusal.send(&mut writer, &head.request_id)).await;
        return;
    }
    // The upstream request does not need it; only a refusal made after this point does.
    let request_id = std::mem::take(&mut head.request_id);
    // Boxed, as the rare paths here are: `proxy` is the bulk of this future (the upstream
    // exchange's state) and the rest are rare paths. A task is copied whole when it is
    // spawned and when it completes, and one over 1 KiB missed malloc's per-thread cache:
    // unboxed this task was 4.4 KB, memcpy and malloc's slow path were 8 % and 5 % of the
    // agent's CPU per small request.
    match Box::pin(proxy(&upstream, head, reader, &mut writer, record.as_ref())).await {
        Ok(None) => {}
        Ok(Some((upstream_io, reader))) => {
            match Box::pin(pipe(reader, writer, Metered::new(upstream_io, record.clone()))).await {
                Ok((to_upstream, from_upstream)) => {
                    debug!(to_upstream, from_upstream, "upgraded stream closed");
                    if let Some(record) = &record {
                        record.upgraded(to_upstream, from_upstream);
                    }
                }
                Err(err) => {
                    debug!(%err, "upgraded stream failed");
                    if let Some(record) = &record {
                        record.fail(None, "upgraded_stream_failed", &err.to_string());
                    }
                }
            }
        }
        Err(Failure::Abort(code, message)) => {
            upstream.metrics.own_answer(code.as_str());
            if let Some(counted) = &mut counted {
                counted.failed = true;
            }
            if let Some(record) = &record {
                record.fail(None, code.as_str(), &message);
            }
            Box::pin(abort(&mut writer, code, &message)).await;
        }
        Err(Failure::Refuse(refusal)) => {
            upstream.metrics.own_answer(refusal.code);
            if let Some(counted) = &mut counted {
                counted.failed = true;
            }
            if let Some(record) = &record {
                record.fail(Some(refusal.status.as_u16()), refusal.code, &refusal.message);
            }
            Box::pin(refusal.send(&mut writer, &request_id)).await;
        }
    }
}

/// What a stream starts with.
enum First {
    /// An HTTP request.
    Request(RequestHead),
    /// A connection to a TCP endpoint.
    Tcp(ferry_codec::TcpOpen),
}

/// The request head that starts a stream; `Err` with what to tell the gateway (nothing if the
/// stream ended first). Apart from [`serve`], so the frame it reads is not kept in that task.
async fn request_head(reader: &mut FrameReader) -> Result<First, Option<&'static str>> {
    match reader.next().await {
        Some(Ok(Frame::Head(Head::Request(head)))) => Ok(First::Request(head)),
        Some(Ok(Frame::Head(Head::TcpOpen(open)))) => Ok(First::Tcp(open)),
        Some(Ok(other)) => {
            debug!(kind = other.kind().name(), "stream did not start with a request head");
            Err(Some("expected a request head"))
        }
        Some(Err(err)) => {
            debug!(%err, "unreadable request head");
            Err(Some("unreadable request head"))
        }
        None => Err(None),
    }
}

/// Tells the gateway the stream failed, and why; then ends it.
pub(crate) async fn abort(writer: &mut FrameWriter, code: AbortCode, message: &str) {
    if writer.send(&Frame::Abort(Abort::new(code, message))).await.is_ok() {
        let _ = writer.finish().await;
    }
}

fn clamp_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Whether `err` or one of its sources is an `E`.
fn caused_by<E: std::error::Error + 'static>(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(err) = current {
        if err.is::<E>() {
            return true;
        }
        current = err.source();
    }
    false
}

/// After a `101`: the upgraded upstream connection and the stream's reader, to pipe together.
type Upgraded = (crate::pool::Upgraded, FrameReader);

/// Why a request got no response from the upstream.
enum Failure {
    /// Sent as `Abort`: the gateway answers the client with the matching JSON error.
    Abort(AbortCode, String),
    /// Answered by the agent itself.
    Refuse(Box<Refusal>),
}

/// Sends the request upstream and the response back. An `Err` is sent before any response head
/// (after it, failures are reported by `send_body`).
async fn proxy(
    upstream: &Forwarder,
    head: RequestHead,
    mut reader: FrameReader,
    writer: &mut FrameWriter,
    record: Option<&Record>,
) -> Result<Option<Upgraded>, Failure> {
    // The fields go to the upstream as they came through the tunnel, in order, without a
    // `HeaderMap` in between (building and hashing one, and another for the response, was 5 % of
    // the agent's CPU per small request in `perf`).
    let config = &upstream.config;
    let mut headers = head.headers;
    let upgrade = fields_want_upgrade(&headers);
    strip_hop_by_hop_fields(&mut headers, upgrade);
    config.headers.request.apply(&mut headers);
    let method = http::Method::from_bytes(head.method.as_bytes())
        .map_err(|_| Failure::Abort(AbortCode::ProtocolError, "invalid method".to_owned()))?;

    // A known-empty body is a lone `End`: take it now (no chunked encoding on a GET) and keep
    // the reader for a possible upgrade.
    let (body, mut raw_reader, framing) = if head.body_len == Some(0) {
        match reader.next().await {
            Some(Ok(Frame::End)) => {}
            _ => {
                return Err(Failure::Abort(
                    AbortCode::ProtocolError,
                    "expected the end of an empty body".into(),
                ));
            }
        }
        // `Content-Length: 0` where the client sent it, or where a body is expected.
        let framing = if headers.iter().any(|field| field.is("content-length"))
            || matches!(method, http::Method::POST | http::Method::PUT | http::Method::PATCH)
        {
            RequestFraming::Length(0)
        } else {
            RequestFraming::None
        };
        (FrameBody::empty(), Some(reader), framing)
    } else {
        let framing = head.body_len.map_or(RequestFraming::Chunked, RequestFraming::Length);
        (FrameBody::new(reader, head.body_len), None, framing)
    };
    let body = Tee::new(RequestSource::Stream(body), record.map(|record| (record.clone(), Side::Request)));

    let Some(target) = config.upstream_for(target_path(&head.target)) else {
        return Err(Failure::Refuse(Box::new(Refusal::no_upstream())));
    };
    if let Some(record) = record {
        record.upstream(target);
    }
    // The target's bytes as they came off the wire, without a copy, checked as a request line
    // allows (no spaces or control bytes).
    let path = PathAndQuery::from_maybe_shared(head.target.clone())
        .map_err(|_| Failure::Abort(AbortCode::ProtocolError, "invalid request target".to_owned()))?;
    let request_target = if path.as_str().starts_with('/') || path.as_str() == "*" {
        head.target.clone()
    } else {
        bytes::Bytes::from(format!("/{}", path.as_str()))
    };
    let request_target = if config.keep_path_prefix && head.path_routed && request_target != "*" {
        crate::rewrite::with_path_prefix(&config.tunnel_id, &request_target)
    } else {
        request_target
    };
    let limit = config.filters.max_request_body;
    let request = OutRequest {
        method,
        target: request_target,
        headers,
        body: Limited::new(body, limit.map_or(usize::MAX, clamp_usize)),
        framing,
        client: head.client_addr,
    };

    let _trial = match upstream.health.admit(std::time::Instant::now()) {
        Admission::Go => None,
        Admission::Trial(guard) => Some(guard),
        Admission::Refuse(detail) => {
            debug!(%detail, "circuit breaker open; refusing");
            return Err(Failure::Refuse(Box::new(Refusal::unhealthy())));
        }
    };
    let asked = std::time::Instant::now();
    let request = tokio::time::timeout(config.upstream_timeout, upstream.pool.send(target, request));
    // With the whole request sent (a known-empty body), the gateway sends nothing more on the
    // stream until our answer: anything it does now means it gave up (client gone, its own
    // deadline), and the upstream request is cancelled with it instead of running on for nobody.
    let result = match raw_reader {
        Some(ref mut reader) => tokio::select! {
            result = request => result,
            gone = reader.next() => {
                debug!(frame = ?gone.map(|f| f.map(|f| f.kind().name())), "the gateway gave up on the request; upstream request cancelled");
                return Ok(None);
            }
        },
        None => request.await,
    };
    match &result {
        Ok(Err(err)) if err.is_connect() => {
            upstream.health.record(std::time::Instant::now(), Err(&error_chain(err)))
        }
        Ok(_) => upstream.health.record(std::time::Instant::now(), Ok(())),
        // No verdict: the connection may be up and the upstream slow.
        Err(_) => {}
    }
    let (response, exchange) = match result {
        Ok(Ok(sent)) => sent,
        Ok(Err(err)) if err.is_connect() => {
            debug!(err = %error_chain(&err), upstream = %target, "upstream unreachable");
            return Err(Failure::Abort(AbortCode::UpstreamUnreachable, "cannot reach the upstream".into()));
        }
        Ok(Err(err)) if caused_by::<LengthLimitError>(&err) => {
            return Err(Failure::Refuse(Box::new(Refusal::too_large(limit.unwrap_or(u64::MAX)))));
        }
        Ok(Err(err)) => {
            debug!(err = %error_chain(&err), "upstream request failed");
            return Err(Failure::Abort(
                AbortCode::UpstreamReset,
                "the upstream closed the connection".into(),
            ));
        }
        Err(_) => {
            return Err(Failure::Abort(
                AbortCode::UpstreamTimeout,
                "the upstream did not answer in time".into(),
            ));
        }
    };

    let status = response.status;
    upstream.metrics.upstream_answered(status, asked.elapsed());
    let mut headers = response.headers;
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop_fields(&mut headers, switching);
    config.headers.response.apply(&mut headers);
    // The fields are views of the upstream's head (which shares the exchange's read buffer) and go
    // on the wire as they are; the head is encoded into the stream's frame buffer and dropped
    // before any of the body is read.
    if let Some(record) = record {
        record.response(status.as_u16(), &headers);
    }
    let head = ResponseHead { status: status.as_u16(), version: version_to_wire(response.version), headers };

    if switching {
        let Some(reader) = raw_reader.filter(|_| upgrade) else {
            return Err(Failure::Abort(
                AbortCode::ProtocolError,
                "101 to a request that cannot be upgraded".into(),
            ));
        };
        if writer.send(&Frame::Head(Head::Response(head))).await.is_err() {
            return Ok(None);
        }
        return Ok(Some((exchange.into_upgraded(), reader)));
    }

    // The head is queued: it leaves with the first body bytes (or `End`) in one write.
    if writer.queue(&Frame::Head(Head::Response(head))).is_err() {
        return Err(Failure::Abort(AbortCode::Internal, "response head over the frame limit".into()));
    }
    // An upstream that goes quiet mid-body is given up on: the client sees the response cut.
    let tap = record.map(|record| (record.clone(), Side::Response));
    let mut body =
        ferry_transport::body::IdleTimeout::new(Tee::new(exchange, tap), config.upstream_idle_timeout);
    match send_body(&mut body, writer, AbortCode::UpstreamReset).await {
        Ok(_) => {
            let _ = writer.finish().await;
            // The whole body was read: the connection can take the next request.
            body.into_inner().into_inner().release();
            if let Some(record) = record {
                record.complete();
            }
        }
        Err(SendBodyError::Body(err)) => {
            debug!(err = %error_chain(&*err), "upstream body failed mid-way");
            if let Some(record) = record {
                record.fail(None, "upstream_reset", "the upstream's body failed mid-way");
            }
        }
        Err(SendBodyError::Stream(err)) => {
            debug!(%err, "gateway stopped reading the response");
            if let Some(record) = record {
                record.fail(None, "client_gone", "the gateway stopped reading the response");
            }
        }
    }
    Ok(None)
}

/// A request to send again (see [`replay`]).
#[derive(Debug)]
pub(crate) struct Replay {
    pub(crate) method: String,
    /// Origin form, as the gateway would send it (without `/t/{tunnel}`).
    pub(crate) target: bytes::Bytes,
    pub(crate) path_routed: bool,
    pub(crate) headers: Vec<(bytes::Bytes, bytes::Bytes)>,
    pub(crate) body: bytes::Bytes,
}

/// Sends `request` to the upstream as a request from the tunnel would go (the same route, header
/// rules and prefix), recorded as a new exchange that replays record `of`. Returns the new
/// record's id once its response is over (or failed: the record says how).
///
/// # Errors
/// The request cannot be sent as given (a bad method, target or field): nothing was sent.
pub(crate) async fn replay(
    upstream: &Forwarder,
    inspector: &Arc<Inspector>,
    of: u64,
    request: Replay,
) -> Result<u64, String> {
    let config = &upstream.config;
    let method = http::Method::from_bytes(request.method.as_bytes())
        .map_err(|_| format!("{:?} is not a method", request.method))?;
    if !request.target.starts_with(b"/") || PathAndQuery::from_maybe_shared(request.target.clone()).is_err() {
        return Err(format!("{:?} is not a path (/...)", String::from_utf8_lossy(&request.target)));
    }
    let mut headers = Vec::with_capacity(request.headers.len());
    for (name, value) in &request.headers {
        headers.push(
            ferry_codec::Header::new(name.clone(), value.clone())
                .map_err(|err| format!("header {:?}: {err}", String::from_utf8_lossy(name)))?,
        );
    }
    let record = inspector.begin(
        RequestRecord {
            method: request.method.clone(),
            target: request.target.clone(),
            path_routed: request.path_routed,
            client: None,
            headers: request.headers,
        },
        Some(of),
    );
    strip_hop_by_hop_fields(&mut headers, false);
    config.headers.request.apply(&mut headers);
    let Some(target) = config.upstream_for(target_path(&request.target)) else {
        record.fail(Some(404), "no_upstream", "no upstream serves this path");
        return Ok(record.id());
    };
    record.upstream(target);
    let framing = if !request.body.is_empty()
        || matches!(method, http::Method::POST | http::Method::PUT | http::Method::PATCH)
    {
        RequestFraming::Length(request.body.len() as u64)
    } else {
        RequestFraming::None
    };
    let request_target = if config.keep_path_prefix && request.path_routed {
        crate::rewrite::with_path_prefix(&config.tunnel_id, &request.target)
    } else {
        request.target
    };
    let body = Tee::new(RequestSource::Whole(Some(request.body)), Some((record.clone(), Side::Request)));
    let out = OutRequest {
        method,
        target: request_target,
        headers,
        body: Limited::new(body, usize::MAX),
        framing,
        client: None,
    };
    let (response, exchange) =
        match tokio::time::timeout(config.upstream_timeout, upstream.pool.send(target, out)).await {
            Ok(Ok(sent)) => sent,
            Ok(Err(err)) => {
                let code =
                    if err.is_connect() { AbortCode::UpstreamUnreachable } else { AbortCode::UpstreamReset };
                record.fail(None, code.as_str(), &error_chain(&err));
                return Ok(record.id());
            }
            Err(_) => {
                record.fail(None, AbortCode::UpstreamTimeout.as_str(), "the upstream did not answer in time");
                return Ok(record.id());
            }
        };
    let mut fields = response.headers;
    strip_hop_by_hop_fields(&mut fields, false);
    config.headers.response.apply(&mut fields);
    record.response(response.status.as_u16(), &fields);
    drop(fields);
    if response.status == StatusCode::SWITCHING_PROTOCOLS {
        record.fail(
            None,
            "upgrade_not_replayed",
            "the upstream switched protocols; a replay does not follow",
        );
        return Ok(record.id());
    }
    let body = Tee::new(exchange, Some((record.clone(), Side::Response)));
    let mut body = ferry_transport::body::IdleTimeout::new(body, config.upstream_idle_timeout);
    loop {
        match std::future::poll_fn(|cx| http_body::Body::poll_frame(std::pin::Pin::new(&mut body), cx)).await
        {
            Some(Ok(_)) => {}
            Some(Err(err)) => {
                record.fail(None, AbortCode::UpstreamReset.as_str(), &error_chain(&*err));
                return Ok(record.id());
            }
            None => break,
        }
    }
    body.into_inner().into_inner().release();
    record.complete();
    Ok(record.id())
}
