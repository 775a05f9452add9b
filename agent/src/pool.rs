//! The agent's upstream connections: HTTP/1.1 keep-alive connections, kept per upstream and
//! reused last-in first-out, each driven by the stream task that uses it ([`ferry_transport::h1`] reads and
//! writes the protocol).
//!
//! A connection has no task, channel or buffer of its own: a request's task writes the head, the
//! body as it arrives from the tunnel, and reads the response into a buffer it holds only while
//! the request is on the connection. An idle connection is a socket and a timestamp. (hyper's
//! client connection, used here before, kept a task, a request channel and read and write
//! buffers per connection: about 45 KB per upstream connection at 1,000 in flight, heaptrack.)
//! Both directions are driven from one future: the request body goes on being written while
//! the response is read, as an upstream may answer before it has read the whole request.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::uri::Scheme;
use http::{HeaderMap, Method};
use http_body::Body;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tracing::debug;

use crate::config::Upstream;
use crate::upstream::UpstreamBody;
use ferry_transport::h1::{self, Decoded, Framing, ParseError, RequestFraming, ResponseHead};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request got no response head from its upstream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PoolError {
    /// No connection could be made (refused, unreachable, TLS or connect timeout).
    #[error("cannot connect to the upstream")]
    Connect(#[source] BoxError),
    /// The connection failed while the request was sent or its response awaited.
    #[error("the upstream request failed")]
    Request(#[source] ExchangeError),
}

impl PoolError {
    /// Whether no connection was ever made (a verdict on the upstream's health).
    pub(crate) fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_))
    }
}

/// How an exchange on a connection failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExchangeError {
    /// Reading or writing the connection failed.
    #[error("upstream connection failed")]
    Io(#[source] io::Error),
    /// The upstream closed the connection before its response was complete.
    #[error("the upstream closed the connection before its response")]
    Closed,
    /// The upstream's bytes are not HTTP/1.1.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// The request body failed (the client's upload was cut, or went over the body limit).
    #[error("request body failed")]
    Body(#[source] BoxError),
}

/// A connection to an upstream, plain or TLS.
#[derive(Debug)]
pub(crate) enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Self::Tls(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Self::Tls(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Self::Tls(io) => Pin::new(io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(io) => io.is_write_vectored(),
            Self::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_flush(cx),
            Self::Tls(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Self::Tls(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

/// How the pool dials.
#[derive(Debug, Clone)]
pub(crate) struct Dialer {
    /// For `https` upstreams.
    pub(crate) tls: Arc<rustls::ClientConfig>,
    pub(crate) connect_timeout: Duration,
    /// `SO_RCVBUF` of each connection.
    pub(crate) recv_buffer: u32,
}

/// Connections to each upstream, idle ones kept for reuse.
#[derive(Debug)]
pub(crate) struct UpstreamPool {
    dialer: Dialer,
    /// Largest response head, and largest read per `read` call.
    max_buf_size: usize,
    idle: Mutex<Vec<IdleList>>,
    idle_timeout: Duration,
    max_idle: usize,
}

#[derive(Debug)]
struct IdleList {
    upstream: Upstream,
    /// For an upstream that takes PROXY protocol: the public client its connections named.
    client: Option<SocketAddr>,
    /// Oldest first; checkouts take the newest.
    conns: Vec<Idle>,
}

impl IdleList {
    fn is_for(&self, upstream: &Upstream, client: Option<SocketAddr>) -> bool {
        self.upstream == *upstream && self.client == client
    }
}

/// Which idle connections a request may reuse: any of its upstream's, or, for an upstream that
/// takes PROXY protocol (whose connections each name one client), only those opened for the same
/// public client connection.
fn client_key(upstream: &Upstream, client: Option<SocketAddr>) -> Option<SocketAddr> {
    upstream.proxy_protocol.and(client)
}

#[derive(Debug)]
struct Idle {
    io: Io,
    /// The read buffer of the last exchange, empty, for the next one (a small one only).
    buf: BytesMut,
    since: Instant,
}

/// A request for [`UpstreamPool::send`]: the parts of the head as they go on the wire and the
/// body as it comes from the tunnel.
#[derive(Debug)]
pub(crate) struct OutRequest {
    pub(crate) method: Method,
    /// Origin form: `/path?query`.
    pub(crate) target: Bytes,
    /// Free of hop-by-hop fields, in order; `Host` is added when missing.
    pub(crate) headers: Vec<ferry_codec::Header>,
    pub(crate) body: UpstreamBody,
    pub(crate) framing: RequestFraming,
    /// The public client (its connection to the gateway), for a PROXY protocol header.
    pub(crate) client: Option<SocketAddr>,
}

/// First read buffer of an exchange: a response head and a small body fit.
const FIRST_READ: usize = 8 * 1024;

impl UpstreamPool {
    pub(crate) fn new(dialer: Dialer, max_buf_size: usize, idle_timeout: Duration, max_idle: usize) -> Self {
        Self { dialer, max_buf_size, idle: Mutex::new(Vec::new()), idle_timeout, max_idle }
    }

    /// Sends `request` to `upstream` and waits for the response head (`1xx` other than `101`
    /// are passed over). A reused connection that the upstream closed before answering (the
    /// race every keep-alive client has) is retried once on a new one, for a request without a
    /// body and with an idempotent method.
    ///
    /// # Errors
    /// See [`PoolError`].
    pub(crate) async fn send<'a>(
        &'a self,
        upstream: &'a Upstream,
        request: OutRequest,
    ) -> Result<(ResponseHead, Exchange<'a>), PoolError> {
        let OutRequest { method, target, headers, body, framing, client } = request;
        let client = client_key(upstream, client);
        let head = h1::request_head(&method, &target, &headers, upstream.authority.as_str(), framing);
        drop(headers);
        let retryable = framing == RequestFraming::None && method.is_idempotent();
        // Connecting is rare once the pool is warm: its future is boxed so that it does not
        // make every request's task larger (a task is allocated, and moved, at its full size).
        let (io, buf, reused) = match self.take_idle(upstream, client) {
            Some((io, buf)) => (io, buf, true),
            None => {
                let io = Box::pin(self.dialer.connect(upstream, client)).await.map_err(PoolError::Connect)?;
                (io, BytesMut::new(), false)
            }
        };
        let chunked = framing == RequestFraming::Chunked;
        let upload = Upload::new(head, body, chunked);
        let mut exchange = Exchange::new(self, (upstream, client), io, buf, method, upload);
        let result = std::future::poll_fn(|cx| exchange.poll_head(cx)).await;
        match result {
            Ok(response) => Ok((response, exchange)),
            Err(err) if reused && retryable && exchange.received == 0 => {
                debug!(%err, "pooled upstream connection closed; retrying on a new one");
                let Exchange { method, upload, .. } = exchange;
                let io = Box::pin(self.dialer.connect(upstream, client)).await.map_err(PoolError::Connect)?;
                let body = crate::upstream::empty_body();
                let mut exchange = Exchange::new(
                    self,
                    (upstream, client),
                    io,
                    BytesMut::new(),
                    method,
                    Upload::new(upload.head, body, false),
                );
                let result = std::future::poll_fn(|cx| exchange.poll_head(cx)).await;
                Ok((result.map_err(PoolError::Request)?, exchange))
            }
            Err(err) => Err(PoolError::Request(err)),
        }
    }

    fn lists(&self) -> std::sync::MutexGuard<'_, Vec<IdleList>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_idle(&self, upstream: &Upstream, client: Option<SocketAddr>) -> Option<(Io, BytesMut)> {
        let mut lists = self.lists();
        let index = lists.iter().position(|list| list.is_for(upstream, client))?;
        let mut found = None;
        while let Some(mut idle) = lists[index].conns.pop() {
            if idle.since.elapsed() < self.idle_timeout && is_open(&mut idle.io) {
                found = Some((idle.io, idle.buf));
                break;
            }
        }
        // A client's list goes with its last connection: clients come and go, upstreams stay.
        if client.is_some() && lists[index].conns.is_empty() {
            lists.swap_remove(index);
        }
        found
    }

    fn put_idle(&self, upstream: &Upstream, client: Option<SocketAddr>, io: Io, buf: BytesMut) {
        let mut lists = self.lists();
        // Connections kept for single clients count together against the limit: one per client
        // would otherwise hold an upstream connection open for every client seen lately.
        if client.is_some()
            && lists.iter().filter(|list| list.client.is_some()).map(|list| list.conns.len()).sum::<usize>()
                >= self.max_idle
        {
            return;
        }
        let index = match lists.iter().position(|list| list.is_for(upstream, client)) {
            Some(index) => index,
            None => {
                lists.push(IdleList { upstream: upstream.clone(), client, conns: Vec::new() });
                lists.len() - 1
            }
        };
        let conns = &mut lists[index].conns;
        if conns.len() < self.max_idle {
            conns.push(Idle { io, buf, since: Instant::now() });
        }
    }

    /// Closes idle connections older than the idle timeout or closed by the upstream (they
    /// would only be found stale at the next checkout otherwise).
    pub(crate) fn reap(&self) {
        let mut lists = self.lists();
        for list in lists.iter_mut() {
            list.conns.retain_mut(|idle| idle.since.elapsed() < self.idle_timeout && is_open(&mut idle.io));
        }
        lists.retain(|list| list.client.is_none() || !list.conns.is_empty());
    }

    /// Idle connections kept now, over all upstreams.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.lists().iter().map(|list| list.conns.len()).sum()
    }
}

/// Whether an idle connection is still usable: nothing to read (an upstream that closed it, or
/// sent bytes nobody asked for, makes it unusable). Polled once, without waiting.
fn is_open(io: &mut Io) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    matches!(Pin::new(io).poll_read(&mut cx, &mut buf), Poll::Pending)
}

impl Dialer {
    /// A new connection to `upstream`: every address its host resolves to, in turn, within the
    /// connect timeout; then the PROXY protocol header naming `client`, for an upstream that
    /// takes one; then TLS for `https` (ALPN `http/1.1`).
    async fn connect(&self, upstream: &Upstream, client: Option<SocketAddr>) -> Result<Io, BoxError> {
        let host = upstream.authority.host();
        let port =
            upstream.authority.port_u16().unwrap_or(if upstream.scheme == Scheme::HTTPS { 443 } else { 80 });
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let tcp = tokio::time::timeout_at(deadline, async {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
                .await
                .map_err(|err| format!("cannot resolve {host}: {err}"))?
                .collect();
            let mut last = None;
            for addr in &addrs {
                match self.dial(*addr).await {
                    Ok(tcp) => return Ok(tcp),
                    Err(err) => last = Some(format!("{addr}: {err}")),
                }
            }
            Err::<_, BoxError>(last.unwrap_or_else(|| format!("{host} resolves to no address")).into())
        })
        .await
        .map_err(|_| {
            format!("connect to {} timed out after {:?}", upstream.authority, self.connect_timeout)
        })??;
        let mut tcp = tcp;
        if let Some(version) = upstream.proxy_protocol {
            // The destination is the upstream itself: the gateway address the client reached is
            // not known here (and an HTTP upstream has no use for it). A connection of the
            // agent's own (a health probe) says so: `UNKNOWN` (v1), `LOCAL` (v2).
            let header = match client {
                Some(client) => crate::tcp::proxy_header(version, client, tcp.peer_addr()?),
                None => crate::tcp::local_proxy_header(version),
            };
            tokio::time::timeout_at(deadline, tokio::io::AsyncWriteExt::write_all(&mut tcp, &header))
                .await
                .map_err(|_| format!("writing the PROXY header to {} timed out", upstream.authority))??;
        }
        if upstream.scheme != Scheme::HTTPS {
            return Ok(Io::Plain(tcp));
        }
        let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
            .map_err(|err| format!("{host} is not a TLS server name: {err}"))?;
        let tls = tokio::time::timeout_at(
            deadline,
            tokio_rustls::TlsConnector::from(Arc::clone(&self.tls)).connect(name, tcp),
        )
        .await
        .map_err(|_| format!("TLS handshake with {} timed out", upstream.authority))?
        .map_err(|err| format!("TLS handshake with {}: {err}", upstream.authority))?;
        Ok(Io::Tls(Box::new(tls)))
    }

    async fn dial(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_recv_buffer_size(self.recv_buffer)?;
        let tcp = socket.connect(addr).await?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }
}

/// A request's bytes on their way out: the head, then the body (chunked or not) as the tunnel
/// delivers it. Written from [`Exchange`]'s polls, alongside reading the response.
#[derive(Debug)]
struct Upload {
    /// The request head, written first; kept whole, for a retry.
    head: Bytes,
    /// How much of `head` is written.
    head_written: usize,
    body: Option<UpstreamBody>,
    chunked: bool,
    /// What waits to be written after the head, in order (a chunk header, its data and its
    /// CRLF; or the last chunk).
    out: [Bytes; 4],
    trailers: Option<HeaderMap>,
    done: bool,
}

impl Upload {
    /// `head`, then `body` (chunked or not, as the head says).
    fn new(head: Bytes, body: UpstreamBody, chunked: bool) -> Self {
        Self {
            head,
            head_written: 0,
            body: (!body.is_end_stream()).then_some(body),
            chunked,
            out: Default::default(),
            trailers: None,
            done: false,
        }
    }

    /// Queues `bytes`; callers check [`Upload::free_slots`] first.
    fn push(&mut self, bytes: Bytes) {
        let slot = self.out.iter_mut().find(|slot| slot.is_empty());
        debug_assert!(slot.is_some(), "upload queue full");
        if let Some(slot) = slot {
            *slot = bytes;
        }
    }

    fn free_slots(&self) -> usize {
        self.out.iter().filter(|slot| slot.is_empty()).count()
    }

    /// Writes what it can; `Ready(Ok)` once the whole request is written and flushed.
    fn poll(&mut self, io: &mut Io, cx: &mut Context<'_>) -> Poll<Result<(), ExchangeError>> {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            // Take the next body piece before writing, so a small body leaves with the head.
            if self.free_slots() >= 3
                && let Some(body) = self.body.as_mut()
            {
                match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        match frame.into_data() {
                            Ok(data) if data.is_empty() => {}
                            Ok(data) if self.chunked => {
                                self.push(h1::chunk_header(data.len()));
                                self.push(data);
                                self.push(Bytes::from_static(b"\r\n"));
                            }
                            Ok(data) => self.push(data),
                            Err(frame) => {
                                if let Ok(map) = frame.into_trailers() {
                                    self.trailers.get_or_insert_with(HeaderMap::new).extend(map);
                                }
                            }
                        }
                        continue;
                    }
                    Poll::Ready(None) => {
                        self.body = None;
                        if self.chunked {
                            let trailers = self.trailers.take();
                            self.push(h1::last_chunk(trailers.as_ref()));
                        }
                        continue;
                    }
                    Poll::Ready(Some(Err(err))) => {
                        self.body = None;
                        self.done = true;
                        return Poll::Ready(Err(ExchangeError::Body(err)));
                    }
                    Poll::Pending => {}
                }
            }
            let head = &self.head[self.head_written..];
            if !head.is_empty() || !self.out[0].is_empty() {
                let slices = [
                    IoSlice::new(head),
                    IoSlice::new(&self.out[0]),
                    IoSlice::new(&self.out[1]),
                    IoSlice::new(&self.out[2]),
                    IoSlice::new(&self.out[3]),
                ];
                let mut n = match ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices)) {
                    Ok(0) => return self.fail(io::ErrorKind::WriteZero.into()),
                    Ok(n) => n,
                    Err(err) => return self.fail(err),
                };
                // Drop what was written, keeping the rest in order at the front.
                let from_head = n.min(head.len());
                self.head_written += from_head;
                n -= from_head;
                while n > 0 {
                    let first = &mut self.out[0];
                    if n >= first.len() {
                        n -= first.len();
                        self.out.rotate_left(1);
                        self.out[3] = Bytes::new();
                    } else {
                        let _ = first.split_to(n);
                        n = 0;
                    }
                }
                continue;
            }
            if let Err(err) = ready!(Pin::new(&mut *io).poll_flush(cx)) {
                return self.fail(err);
            }
            if self.body.is_none() {
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            // The body has nothing now; its waker is registered.
            return Poll::Pending;
        }
    }

    fn fail(&mut self, err: io::Error) -> Poll<Result<(), ExchangeError>> {
        self.body = None;
        self.done = true;
        self.out = Default::default();
        Poll::Ready(Err(ExchangeError::Io(err)))
    }
}

/// One request on one connection: the request being written and the response being read. Its
/// body is the response body; [`Exchange::release`] gives the connection back once both are
/// complete, [`Exchange::into_upgraded`] turns it into a raw connection after `101`.
#[derive(Debug)]
pub(crate) struct Exchange<'a> {
    pool: &'a UpstreamPool,
    upstream: &'a Upstream,
    /// The pool key's client ([`client_key`]).
    client: Option<SocketAddr>,
    io: Io,
    /// Read but not yet taken: the rest of a head, body bytes.
    buf: BytesMut,
    /// Bytes read so far.
    received: u64,
    /// The connection's read side ended.
    eof: bool,
    /// How much to make room for before the next read (doubled while reads fill it).
    read_size: usize,
    method: Method,
    upload: Upload,
    /// The request could not be written whole: the connection is not reused.
    upload_failed: bool,
    framing: Framing,
    keep_alive: bool,
}

impl<'a> Exchange<'a> {
    fn new(
        pool: &'a UpstreamPool,
        (upstream, client): (&'a Upstream, Option<SocketAddr>),
        io: Io,
        buf: BytesMut,
        method: Method,
        upload: Upload,
    ) -> Self {
        Self {
            pool,
            upstream,
            client,
            io,
            buf,
            received: 0,
            eof: false,
            read_size: FIRST_READ,
            method,
            upload,
            upload_failed: false,
            framing: Framing::Empty,
            keep_alive: false,
        }
    }

    /// Goes on writing the request. A failed write does not fail the exchange at once: the
    /// upstream may have answered (and closed) before reading all of it, and its answer stands.
    fn poll_upload(&mut self, cx: &mut Context<'_>) -> Result<(), ExchangeError> {
        match self.upload.poll(&mut self.io, cx) {
            Poll::Ready(Err(ExchangeError::Io(err))) => {
                debug!(%err, "writing the request upstream failed");
                self.upload_failed = true;
                Ok(())
            }
            Poll::Ready(Err(err)) => {
                self.upload_failed = true;
                Err(err)
            }
            Poll::Ready(Ok(())) | Poll::Pending => Ok(()),
        }
    }

    /// Reads more bytes into the buffer; `Ready(Ok)` when some came or the connection ended.
    fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ExchangeError>> {
        if self.buf.capacity() - self.buf.len() < self.read_size / 2 {
            self.buf.reserve(self.read_size);
        }
        let room = self.buf.capacity() - self.buf.len();
        let n = ready!(tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf))
            .map_err(ExchangeError::Io)?;
        if n == 0 {
            self.eof = true;
        } else if n == room {
            self.read_size = (self.read_size * 2).min(self.pool.max_buf_size);
        }
        self.received += n as u64;
        Poll::Ready(Ok(()))
    }

    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<ResponseHead, ExchangeError>> {
        loop {
            self.poll_upload(cx)?;
            if let Some(head) = h1::parse_response(&mut self.buf, self.pool.max_buf_size)? {
                if head.status.is_informational() && head.status != http::StatusCode::SWITCHING_PROTOCOLS {
                    continue;
                }
                self.framing = Framing::of(&self.method, &head)?;
                self.keep_alive = h1::keeps_alive(&head);
                return Poll::Ready(Ok(head));
            }
            if self.eof {
                return Poll::Ready(Err(ExchangeError::Closed));
            }
            ready!(self.poll_read_more(cx))?;
        }
    }

    /// After the response body's end: the connection goes back to the pool if the request was
    /// written whole (now, or it is given up), the upstream keeps it open and sent nothing more.
    pub(crate) fn release(mut self) {
        if !self.upload.done {
            // A request body the upstream answered before its end: written on only if it is
            // complete now (its last frame was on its way); otherwise the connection closes.
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let _ = self.poll_upload(&mut cx);
        }
        if self.upload.done
            && !self.upload_failed
            && self.keep_alive
            && self.framing.is_done()
            && self.buf.is_empty()
            && !self.eof
        {
            // A small buffer stays with the connection (reused in place once the views of it
            // are gone); a large one, grown by a download, is let go.
            let buf = if self.buf.capacity() <= 2 * FIRST_READ { self.buf } else { BytesMut::new() };
            self.pool.put_idle(self.upstream, self.client, self.io, buf);
        }
    }

    /// The connection after `101 Switching Protocols`, with the bytes already read past the
    /// head.
    pub(crate) fn into_upgraded(self) -> Upgraded {
        Upgraded { io: self.io, leftover: self.buf }
    }
}

impl Body for Exchange<'_> {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, ExchangeError>>> {
        let this = &mut *self;
        loop {
            this.poll_upload(cx)?;
            match h1::decode(&mut this.framing, &mut this.buf, this.eof) {
                Ok(Decoded::Data(data)) if data.is_empty() => {}
                Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(http_body::Frame::data(data)))),
                Ok(Decoded::Trailers(map)) => return Poll::Ready(Some(Ok(http_body::Frame::trailers(map)))),
                Ok(Decoded::End) => return Poll::Ready(None),
                Ok(Decoded::More) => ready!(this.poll_read_more(cx))?,
                Err(ParseError::Truncated) => return Poll::Ready(Some(Err(ExchangeError::Closed))),
                Err(err) => return Poll::Ready(Some(Err(err.into()))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing.is_done()
    }
}

/// An upstream connection after `101`: the bytes read past the response head come first.
#[derive(Debug)]
pub(crate) struct Upgraded {
    io: Io,
    leftover: BytesMut,
}

impl AsyncRead for Upgraded {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.leftover.is_empty() {
            let n = this.leftover.len().min(buf.remaining());
            buf.put_slice(&this.leftover.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The pool's dialer for `config`'s TLS roots.
pub(crate) fn dialer(tls: Arc<rustls::ClientConfig>, connect_timeout: Duration, recv_buffer: u32) -> Dialer {
    Dialer { tls, connect_timeout, recv_buffer }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    fn pool() -> UpstreamPool {
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        UpstreamPool::new(
            dialer(Arc::new(tls), Duration::from_secs(5), 64 * 1024),
            64 * 1024,
            Duration::from_secs(90),
            8,
        )
    }

    fn request(method: Method, path: &str, body: UpstreamBody, framing: RequestFraming) -> OutRequest {
        OutRequest {
            method,
            target: Bytes::copy_from_slice(path.as_bytes()),
            headers: Vec::new(),
            body,
            framing,
            client: None,
        }
    }

    fn get(path: &str) -> OutRequest {
        let body = crate::upstream::empty_body();
        request(Method::GET, path, body, RequestFraming::None)
    }

    /// An upstream that answers `requests_per_conn` requests per connection (then closes it)
    /// and counts the connections it accepted.
    async fn upstream(requests_per_conn: usize) -> (Upstream, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for _ in 0..requests_per_conn {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 1024];
                            match socket.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end);
                        let host =
                            head.lines().find_map(|l| l.strip_prefix("host: ")).unwrap_or("-").to_owned();
                        let body = format!("{} {host}", head.lines().next().unwrap());
                        let reply =
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                        if socket.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (Upstream::parse(&addr.to_string()).unwrap(), accepted)
    }

    /// An upstream that reads one request head and answers with `reply`, then reads on until
    /// the client closes; what it read is sent on the returned channel.
    async fn scripted(reply: &'static [u8]) -> (Upstream, tokio::sync::oneshot::Receiver<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let mut chunk = [0u8; 4096];
                match socket.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&chunk[..n]),
                }
            }
            socket.write_all(reply).await.unwrap();
            let mut rest = Vec::new();
            let _ = socket.read_to_end(&mut rest).await;
            seen.extend_from_slice(&rest);
            let _ = tx.send(seen);
        });
        (Upstream::parse(&addr.to_string()).unwrap(), rx)
    }

    /// Runs a test body with a deadline, so a hang fails instead of stalling the run.
    async fn within(test: impl Future<Output = ()>) {
        tokio::time::timeout(Duration::from_secs(10), test).await.expect("the test timed out");
    }

    async fn body(exchange: &mut Exchange<'_>) -> String {
        String::from_utf8(exchange.collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn proxy_protocol_connections_are_kept_per_client_and_bounded_together() {
        within(async {
            let pool = pool();
            let (mut upstream, accepted) = upstream(100).await;
            upstream.proxy_protocol = Some(crate::config::ProxyProtocol::V1);
            let from = |port: u16| OutRequest { client: Some(([127, 0, 0, 2], port).into()), ..get("/") };
            // Each new client gets a connection of its own, whose first line names it.
            let clients = pool.max_idle + 3;
            for port in 1..=clients as u16 {
                let (_, mut exchange) = pool.send(&upstream, from(port)).await.unwrap();
                let text = body(&mut exchange).await;
                assert!(text.starts_with(&format!("PROXY TCP4 127.0.0.2 127.0.0.1 {port} ")), "{text}");
                exchange.release();
            }
            assert_eq!(accepted.load(Ordering::SeqCst), clients);
            // Only as many are kept as one upstream may keep idle, over all clients.
            assert_eq!(pool.idle_count(), pool.max_idle);
            // A kept client's next request reuses its connection.
            let (_, exchange) = pool.send(&upstream, from(1)).await.unwrap();
            drop(exchange);
            assert_eq!(accepted.load(Ordering::SeqCst), clients);
        })
        .await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reuses_a_released_connection_and_sends_origin_form_with_host() {
        within(async {
            let pool = pool();
            let (upstream, accepted) = upstream(100).await;
            for i in 0..5 {
                let (head, mut exchange) = pool.send(&upstream, get(&format!("/n/{i}?q=1"))).await.unwrap();
                assert_eq!(head.status, http::StatusCode::OK);
                let text = body(&mut exchange).await;
                assert_eq!(text, format!("GET /n/{i}?q=1 HTTP/1.1 {}", upstream.authority), "{i}");
                exchange.release();
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection for five requests");
            assert_eq!(pool.idle_count(), 1);
        })
        .await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_unreleased_connection_is_not_reused() {
        within(async {
            let pool = pool();
            let (upstream, accepted) = upstream(100).await;
            let (_, mut first) = pool.send(&upstream, get("/a")).await.unwrap();
            let (_, mut second) = pool.send(&upstream, get("/b")).await.unwrap();
            assert_eq!(body(&mut second).await, format!("GET /b HTTP/1.1 {}", upstream.authority));
            assert_eq!(body(&mut first).await, format!("GET /a HTTP/1.1 {}", upstream.authority));
            second.release();
            assert_eq!(accepted.load(Ordering::SeqCst), 2);
            assert_eq!(pool.idle_count(), 1);
        })
        .await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_the_upstream_closed_is_replaced() {
        within(async {
            let pool = pool();
            // One request per connection: the upstream closes each after its answer.
            let (upstream, accepted) = upstream(1).await;
            for i in 0..3 {
                let (_, mut exchange) = pool.send(&upstream, get(&format!("/{i}"))).await.unwrap();
                assert_eq!(body(&mut exchange).await, format!("GET /{i} HTTP/1.1 {}", upstream.authority));
                exchange.release();
                // Whether it was kept or not, the next request must succeed.
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 3);
        })
        .await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn refused_connections_are_connect_errors() {
        within(async {
            let pool = pool();
            let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let upstream = Upstream::parse(&closed.local_addr().unwrap().to_string()).unwrap();
            drop(closed);
            let err = pool.send(&upstream, get("/")).await.unwrap_err();
            assert!(err.is_connect(), "{err:?}");
        })
        .await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reap_drops_expired_idle_connections() {
        within(async {
            let mut pool = pool();
            pool.idle_timeout = Duration::from_millis(1);
            let (upstream, _) = upstream(100).await;
            let (_, mut exchange) = pool.send(&upstream, get("/")).await.unwrap();
            body(&mut exchange).await;
            exchange.release();
            assert_eq!(pool.idle_count(), 1);
            tokio::time::sleep(Duration::from_millis(5)).await;
            pool.reap();
            assert_eq!(pool.idle_count(), 0);
        })
        .await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn informational_responses_are_passed_over_and_chunked_bodies_read_with_trailers() {
        within(async {
            let pool = pool();
            let (upstream, _) = scripted(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
                  HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-sum: 7\r\n\r\n",
            )
            .await;
            let (head, mut exchange) = pool.send(&upstream, get("/")).await.unwrap();
            assert_eq!(head.status, http::StatusCode::CREATED);
            let collected = (&mut exchange).collect().await.unwrap();
            assert_eq!(collected.trailers().unwrap()["x-sum"], "7");
            assert_eq!(&collected.to_bytes()[..], b"abc");
        })
        .await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_upload_writes_its_pieces_in_order_and_flushes() {
        within(async {
            let (upstream, seen) = scripted(b"HTTP/1.1 204 No Content\r\n\r\n").await;
            let head = Bytes::from_static(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n");
            let mut upload = Upload {
                head,
                head_written: 0,
                body: None,
                chunked: true,
                out: Default::default(),
                trailers: None,
                done: false,
            };
            let mut io = Io::Plain(TcpStream::connect(upstream.authority.as_str()).await.unwrap());
            for piece in ["hello", " world"] {
                upload.push(h1::chunk_header(piece.len()));
                upload.push(Bytes::from(piece));
                std::future::poll_fn(|cx| upload.poll(&mut io, cx)).await.unwrap();
                upload.done = false;
                upload.push(Bytes::from_static(b"\r\n"));
            }
            upload.push(h1::last_chunk(None));
            std::future::poll_fn(|cx| upload.poll(&mut io, cx)).await.unwrap();
            assert!(upload.done && upload.out.iter().all(Bytes::is_empty));
            drop(io);
            let seen = String::from_utf8(seen.await.unwrap()).unwrap();
            assert!(seen.ends_with("\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), "{seen:?}");
        })
        .await;
    }
}
