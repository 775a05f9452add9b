//! The gateway's own HTTP/1.1 server, one connection at a time: request heads parsed by
//! [`ferry_transport::h1_server`], bodies read as they are wanted, responses written with as
//! few `writev`s as the body allows, upgrades handed over after `101`.
//!
//! Why not hyper for HTTP/1.1: hyper holds 8 KiB of write buffer and 16 KiB of read buffer for
//! each connection from its first byte, whatever it carries; here a connection holds a read
//! buffer of 2 KiB (more only while a larger head or a body passes through) and writes straight
//! from the response's own bytes. HTTP/2 stays with hyper ([`crate::server`] picks).
//!
//! One task per connection reads and writes: it reads the request body into a one-piece slot
//! ([`crate::inbound`]) while the request is routed and answered, and it notices a client that
//! hangs up while its response is pending (the request is then dropped, as hyper does).

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferry_transport::h1::{self, Decoded, Framing, is_bodiless};
use ferry_transport::h1_server::{RequestError, RequestHead, ResponseFraming, parse_request, response_head};
use ferry_transport::heads::wants_upgrade;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version, header};
use http_body::Body;
use http_body_util::{Either, Full};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};
use tracing::debug;

use crate::Gateway;
use crate::inbound::{self, Inbound, Ready};
use crate::upgrade::{OwnUpgrade, Rewind, Upgraded};
use crate::watch::{ConnWatch, SendClock};

/// Read size for request heads; a larger head grows the buffer up to the head limit.
pub(crate) const HEAD_READ: usize = 2048;
/// Read size for request bodies.
const BODY_READ: usize = 32 * 1024;
/// Pieces gathered for one `writev` at most.
const MAX_SLICES: usize = 48;
/// Bytes gathered before they are written, when the body has more ready.
const WRITE_BATCH: usize = 64 * 1024;
/// A connection closed while the client may still be sending is read (and the bytes dropped)
/// for this long, or this many bytes, after its last response: closing a socket with unread
/// bytes makes the kernel send a reset, which can destroy that response before the client
/// reads it.
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 1 << 20;

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
const CRLF: Bytes = Bytes::from_static(b"\r\n");
const LAST_CHUNK: Bytes = Bytes::from_static(b"0\r\n\r\n");

/// Serves HTTP/1.1 on `io` until the client leaves, a head misses its deadline, the gateway
/// drains, or an upgrade takes the connection. `buf` holds bytes already read from it.
pub(crate) async fn serve<I>(
    gateway: &Arc<Gateway>,
    io: I,
    buf: BytesMut,
    peer: SocketAddr,
    watch: &ConnWatch,
    first_deadline: Instant,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (rd, wr) = tokio::io::split(io);
    let wr = Writer { io: wr, clock: watch.writes_clock() };
    let conn = Conn { gateway, watch, peer, rd, wr, buf, out: Vec::new(), head_buf: BytesMut::new() };
    conn.run(first_deadline).await;
}

struct Conn<'a, I> {
    gateway: &'a Arc<Gateway>,
    watch: &'a ConnWatch,
    peer: SocketAddr,
    rd: ReadHalf<I>,
    wr: Writer<WriteHalf<I>>,
    /// What was read and not yet parsed (the head of the next request, a piece of body).
    buf: BytesMut,
    /// Pieces of the response waiting for one `writev`.
    out: Vec<Bytes>,
    /// Where response heads are written (its room is reused once a head has gone out).
    head_buf: BytesMut,
}

/// What a connection does after an exchange.
enum Next {
    KeepAlive,
    /// Close; `linger`: the client may still be sending.
    Close {
        linger: bool,
    },
    Upgrade(oneshot::Sender<Upgraded>),
}

/// What reading a head found (moved once, from the read to the exchange: boxing the head would
/// cost an allocation per request).
#[allow(clippy::large_enum_variant)]
enum HeadRead {
    Head(RequestHead),
    /// The client left, the deadline passed, or the gateway drains an idle connection.
    Gone,
    Refused(RequestError),
}

impl<I> Conn<'_, I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn run(mut self, first_deadline: Instant) {
        // One timer for every head the connection reads: moving a registered timer's deadline
        // later is a store, where a new timer per request is a wheel insert and removal.
        let mut timer = pin!(tokio::time::sleep_until(first_deadline));
        loop {
            let next = match self.read_head(timer.as_mut()).await {
                // Boxed, with the request's handler inside: a connection between requests then
                // holds only what reading a head needs, not the largest exchange's state.
                HeadRead::Head(head) => Box::pin(self.exchange(head)).await,
                HeadRead::Gone => return,
                HeadRead::Refused(err) => {
                    debug!(%err, "request refused before routing");
                    self.refuse(&err).await
                }
            };
            match next {
                Next::KeepAlive => {
                    // An idle connection waits no longer for its next head than a new one would.
                    timer.as_mut().reset(Instant::now() + self.gateway.config.header_read_timeout);
                    if self.buf.is_empty() && self.buf.capacity() > HEAD_READ {
                        // A body or a large head went through: give the room back.
                        self.buf = BytesMut::new();
                    }
                }
                Next::Close { linger } => return self.close(linger).await,
                Next::Upgrade(to) => {
                    let Self { rd, wr, buf, .. } = self;
                    let io: Upgraded = Box::new(Rewind::new(buf.freeze(), rd.unsplit(wr.io)));
                    // The receiver may be gone (the request's future was dropped): then so is
                    // the connection.
                    let _ = to.send(io);
                    return;
                }
            }
        }
    }

    /// The next request head, by the timer's deadline.
    async fn read_head(&mut self, mut timer: Pin<&mut Sleep>) -> HeadRead {
        let limits = &self.gateway.head_limits;
        loop {
            if !self.buf.is_empty() {
                match parse_request(&mut self.buf, limits) {
                    Ok(Some(head)) => return HeadRead::Head(head),
                    Ok(None) => {}
                    Err(err) => return HeadRead::Refused(err),
                }
            }
            if self.buf.capacity() - self.buf.len() < HEAD_READ / 4 {
                self.buf.reserve(HEAD_READ.max(self.buf.len()));
            }
            let idle = self.buf.is_empty();
            tokio::select! {
                biased;
                read = self.rd.read_buf(&mut self.buf) => match read {
                    Ok(0) | Err(_) => return HeadRead::Gone,
                    Ok(_) => {}
                },
                () = self.gateway.shutdown.cancelled(), if idle => return HeadRead::Gone,
                () = timer.as_mut() => {
                    if !idle || !self.watch.seen_request.load(Ordering::Relaxed) {
                        debug!("no complete request head before the deadline; closing");
                        self.gateway.limits.missed_head_deadline();
                    }
                    return HeadRead::Gone;
                }
            }
        }
    }

    /// One request and its response.
    ///
    /// The future is boxed per request, so its size is both what a request in flight holds and
    /// what is moved into the box. The request is built before the future is made (an `async fn`
    /// would keep the head it is given as well); the handler lives in a block with one await, so
    /// its room is reused for writing the response.
    fn exchange(&mut self, head: RequestHead) -> impl Future<Output = Next> + Send + '_ {
        self.watch.request();
        let RequestHead { parts, framing, keep_alive, expects_continue } = head;
        let (method, version) = (parts.method.clone(), parts.version);
        let upgrade_asked = version == Version::HTTP_11 && wants_upgrade(&parts.headers);
        let (mut pump, body) = match framing {
            Framing::Empty => (None, Inbound::empty()),
            framing => {
                let length = if let Framing::Length(n) = framing { Some(n) } else { None };
                let (sender, body) = inbound::channel(length);
                (Some(Pump { sender, framing, continue_pending: expects_continue }), body)
            }
        };
        let mut request = Request::from_parts(parts, Either::Right(body));
        let upgrade = upgrade_asked.then(|| {
            let (to, own) = OwnUpgrade::new();
            request.extensions_mut().insert(own);
            to
        });
        async move {
            // The body was fully read (or there was none); false once it is known it will not be.
            let mut body_read = pump.is_none();
            // With no body to read, the connection is read ahead (up to a head's worth) to notice a
            // client that leaves: its request is then dropped, as hyper does.
            let read_ahead = self.gateway.head_limits.max_head_bytes;

            // Until the response is ready: the body as it is wanted (with `100 Continue` written when
            // it is first wanted), then an eye on the connection.
            let response = {
                let (gateway, watch) = (self.gateway, self.watch);
                let mut handler = pin!(crate::routes::handle(gateway, request, self.peer, watch));
                let mut continuing = false;
                loop {
                    tokio::select! {
                        // The `100` first: it goes out before a response that comes meanwhile.
                        biased;
                        written = write_all(&mut self.wr, Bytes::from_static(CONTINUE)), if continuing => {
                            if written.is_err() {
                                return Next::Close { linger: false };
                            }
                            continuing = false;
                        }
                        response = &mut handler => break response,
                        step = read_more(&mut self.rd, &mut self.buf, &mut pump, read_ahead), if !continuing => match step {
                            Step::Continue => continuing = true,
                            Step::Done => {
                                pump = None;
                                body_read = true;
                            }
                            Step::Unwanted | Step::Malformed => pump = None,
                            Step::Gone => {
                                debug!("client gone before its response");
                                return Next::Close { linger: false };
                            }
                        },
                    }
                }
            };
            let (mut parts, body) = response.into_parts();
            let status = parts.status;

            if status == StatusCode::SWITCHING_PROTOCOLS {
                let head = response_head(
                    status,
                    &parts.headers,
                    ResponseFraming::Bodiless,
                    true,
                    &date(),
                    &mut self.head_buf,
                );
                return match upgrade {
                    Some(to) if pump.is_none() && body_read => match write_all(&mut self.wr, head).await {
                        Ok(()) => Next::Upgrade(to),
                        Err(_) => Next::Close { linger: false },
                    },
                    _ => {
                        debug!("101 for a request that did not ask to upgrade; closing");
                        Next::Close { linger: false }
                    }
                };
            }
            if upgrade.is_some() {
                // Declined: whatever the client sent after its head was meant for another protocol.
                parts.headers.insert(header::CONNECTION, http::HeaderValue::from_static("close"));
            }
            let asked_close = take_close(&mut parts.headers);
            let framing = response_framing(&method, status, &parts.headers, &body, version);
            let keep_alive = keep_alive
                && !asked_close
                && framing != ResponseFraming::Close
                && !self.gateway.shutdown.is_cancelled();
            if keep_alive && version == Version::HTTP_10 {
                // An HTTP/1.0 client assumes the connection closes unless told otherwise.
                parts.headers.insert(header::CONNECTION, http::HeaderValue::from_static("keep-alive"));
            }
            let head =
                response_head(status, &parts.headers, framing, keep_alive, &date(), &mut self.head_buf);

            // The response goes out while the rest of the request body (if still wanted) comes in.
            let complete = {
                let write = write_response(&mut self.wr, &mut self.out, head, body, framing);
                let mut write = pin!(write);
                if pump.as_ref().is_some_and(|pump| pump.continue_pending) {
                    // The body was never asked for: the client may not send it; do not wait.
                    pump = None;
                }
                loop {
                    tokio::select! {
                        written = &mut write => break written,
                        step = read_more(&mut self.rd, &mut self.buf, &mut pump, read_ahead) => match step {
                            Step::Done => {
                                pump = None;
                                body_read = true;
                            }
                            Step::Continue | Step::Unwanted | Step::Malformed => pump = None,
                            Step::Gone => {
                                debug!("client gone during its response");
                                return Next::Close { linger: false };
                            }
                        },
                    }
                }
            };
            match complete {
                Ok(true) if keep_alive && body_read => Next::KeepAlive,
                Ok(_) => Next::Close { linger: !body_read || !self.buf.is_empty() },
                Err(err) => {
                    debug!(%err, "writing the response failed");
                    Next::Close { linger: false }
                }
            }
        }
    }

    /// Answers a head the gateway does not take, then closes.
    async fn refuse(&mut self, err: &RequestError) -> Next {
        let response = match err {
            RequestError::UriTooLong(_) => {
                self.gateway.limits.uri_too_long().to_response(&self.gateway.next_request_id())
            }
            _ => {
                let mut response = Response::new(Full::new(Bytes::new()));
                *response.status_mut() = err.status();
                response
            }
        };
        let (parts, body) = response.into_parts();
        let framing = ResponseFraming::Length(body.size_hint().exact().unwrap_or(0));
        let head = response_head(parts.status, &parts.headers, framing, false, &date(), &mut self.head_buf);
        let _ = write_response(&mut self.wr, &mut self.out, head, body, framing).await;
        Next::Close { linger: true }
    }

    /// Closes the connection: the write side at once, the read side after lingering (see
    /// [`LINGER_TIME`]) when the client may still be sending.
    async fn close(mut self, linger: bool) {
        if let Err(err) = self.wr.io.shutdown().await {
            debug!(%err, "closing the connection failed");
            return;
        }
        if !linger {
            return;
        }
        let drain = async {
            let mut dropped = 0;
            loop {
                self.buf.clear();
                self.buf.reserve(HEAD_READ);
                match self.rd.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => dropped += n,
                }
                if dropped >= LINGER_BYTES {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, drain).await;
    }
}

/// The request body being read: where its framing stands, and where the pieces go.
struct Pump {
    sender: inbound::Sender,
    framing: Framing,
    /// `Expect: 100-continue`, and `100` not sent yet.
    continue_pending: bool,
}

/// What reading on a connection while a request is in flight found.
#[derive(Debug)]
enum Step {
    /// The body is wanted for the first time: send `100 Continue`.
    Continue,
    /// The body was read to its end.
    Done,
    /// The body was dropped before its end.
    Unwanted,
    /// The body's framing broke (a bad chunk): the connection cannot be read further.
    Malformed,
    /// The client closed the connection (or it failed).
    Gone,
}

/// Reads the request body as it is wanted (`pump`), or, with no body to read, reads ahead
/// (a pipelined head, up to `read_ahead` bytes in the buffer) to notice a client that leaves.
/// Returns only for what its caller must act on. Cancel safe.
async fn read_more<I: AsyncRead>(
    rd: &mut ReadHalf<I>,
    buf: &mut BytesMut,
    pump: &mut Option<Pump>,
    read_ahead: usize,
) -> Step {
    let Some(pump) = pump else {
        if buf.len() >= read_ahead {
            return std::future::pending().await;
        }
        loop {
            if buf.capacity() - buf.len() < HEAD_READ / 4 {
                buf.reserve(HEAD_READ);
            }
            match rd.read_buf(buf).await {
                Ok(0) | Err(_) => return Step::Gone,
                Ok(_) if buf.len() >= read_ahead => return std::future::pending().await,
                Ok(_) => {}
            }
        }
    };
    if pump.continue_pending {
        let wanted = poll_fn(|cx| pump.sender.poll_wanted(cx)).await;
        pump.continue_pending = false;
        return if wanted { Step::Continue } else { Step::Unwanted };
    }
    loop {
        if poll_fn(|cx| pump.sender.poll_ready(cx)).await == Ready::Gone {
            return Step::Unwanted;
        }
        match h1::decode(&mut pump.framing, buf, false) {
            Ok(Decoded::Data(data)) => {
                pump.sender.send(Ok(http_body::Frame::data(data)));
                if pump.framing.is_done() {
                    return finish(pump);
                }
            }
            Ok(Decoded::Trailers(trailers)) => {
                pump.sender.send(Ok(http_body::Frame::trailers(trailers)));
                return finish(pump);
            }
            Ok(Decoded::End) => return finish(pump),
            Ok(Decoded::More) => {
                if buf.capacity() - buf.len() < BODY_READ / 4 {
                    let wanted = match pump.framing {
                        Framing::Length(left) => usize::try_from(left).unwrap_or(BODY_READ).min(BODY_READ),
                        _ => BODY_READ,
                    };
                    buf.reserve(wanted.max(HEAD_READ));
                }
                match rd.read_buf(buf).await {
                    Ok(0) => {
                        // Cut short: the body's holder sees it fail (the sender is dropped).
                        return Step::Gone;
                    }
                    Err(err) => {
                        pump.sender.send(Err(err));
                        return Step::Gone;
                    }
                    Ok(_) => {}
                }
            }
            Err(err) => {
                debug!(%err, "malformed request body");
                pump.sender.send(Err(io::Error::new(io::ErrorKind::InvalidData, err)));
                return Step::Malformed;
            }
        }
    }
}

/// The body ended where its framing says: its holder sees the end once it takes the last piece.
fn finish(pump: &mut Pump) -> Step {
    pump.sender.finish();
    Step::Done
}

/// Removes `Connection` from a response's fields (the server writes its own), and says whether
/// it asked for the connection to close.
fn take_close(headers: &mut HeaderMap) -> bool {
    // (`entry` would first make room for one more field, growing a full map.)
    if !headers.contains_key(header::CONNECTION) {
        return false;
    }
    let mut close = false;
    if let header::Entry::Occupied(entry) = headers.entry(header::CONNECTION) {
        for value in entry.remove_entry_mult().1 {
            close |=
                value.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
        }
    }
    close
}

/// How the response body goes on the wire: none for bodiless answers; the length the fields
/// announce (an upstream's `Content-Length`) or the body knows; chunks for an HTTP/1.1 client;
/// up to the close for an HTTP/1.0 one.
fn response_framing<B: Body>(
    method: &Method,
    status: StatusCode,
    headers: &HeaderMap,
    body: &B,
    version: Version,
) -> ResponseFraming {
    if is_bodiless(method, status) {
        return ResponseFraming::Bodiless;
    }
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    if let (Some(value), None) = (lengths.next(), lengths.next())
        && let Some(n) = value.to_str().ok().and_then(|v| v.trim().parse().ok())
    {
        return ResponseFraming::Length(n);
    }
    if let Some(n) = body.size_hint().exact() {
        return ResponseFraming::Length(n);
    }
    if version == Version::HTTP_11 { ResponseFraming::Chunked } else { ResponseFraming::Close }
}

/// Writes `head` and the body framed as `framing`, gathering what the body has ready into one
/// `writev`. `Ok(false)`: the body failed or did not match its announced length, so the client
/// got it incomplete and the connection must close.
async fn write_response<W, B>(
    wr: &mut Writer<W>,
    out: &mut Vec<Bytes>,
    head: Bytes,
    body: B,
    framing: ResponseFraming,
) -> io::Result<bool>
where
    W: AsyncWrite + Unpin,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    out.clear();
    let mut gathered = head.len();
    out.push(head);
    if framing == ResponseFraming::Bodiless {
        flush(wr, out).await?;
        return Ok(true);
    }
    let mut body = pin!(body);
    let mut left = match framing {
        ResponseFraming::Length(n) => n,
        _ => u64::MAX,
    };
    let mut complete = true;
    loop {
        let polled = poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await;
        let frame = match polled {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                flush(wr, out).await?;
                gathered = 0;
                poll_fn(|cx| body.as_mut().poll_frame(cx)).await
            }
        };
        let frame = match frame {
            None => break,
            Some(Ok(frame)) => frame,
            Some(Err(err)) => {
                debug!(%err, "response body broken; the client gets it cut short");
                complete = false;
                break;
            }
        };
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let (Ok(trailers), ResponseFraming::Chunked) = (frame.into_trailers(), framing) {
                    out.push(h1::last_chunk(Some(&trailers)));
                    flush(wr, out).await?;
                    return Ok(true);
                }
                continue;
            }
        };
        if data.is_empty() {
            continue;
        }
        gathered += data.len();
        match framing {
            ResponseFraming::Chunked => {
                out.push(h1::chunk_header(data.len()));
                out.push(data);
                out.push(CRLF);
            }
            ResponseFraming::Length(_) => {
                if data.len() as u64 > left {
                    debug!("response body longer than its Content-Length; cut there");
                    data.truncate(left as usize);
                    out.push(data);
                    complete = false;
                    break;
                }
                left -= data.len() as u64;
                out.push(data);
            }
            ResponseFraming::Close | ResponseFraming::Bodiless => out.push(data),
        }
        if out.len() + 3 > MAX_SLICES || gathered >= WRITE_BATCH {
            flush(wr, out).await?;
            gathered = 0;
        }
    }
    if complete {
        match framing {
            ResponseFraming::Chunked => out.push(LAST_CHUNK),
            ResponseFraming::Length(_) if left != 0 => {
                debug!(missing = left, "response body shorter than its Content-Length");
                complete = false;
            }
            _ => {}
        }
    }
    flush(wr, out).await?;
    Ok(complete && framing != ResponseFraming::Close)
}

/// Writes `bytes` whole.
async fn write_all<W: AsyncWrite + Unpin>(wr: &mut Writer<W>, bytes: Bytes) -> io::Result<()> {
    let mut out = vec![bytes];
    flush(wr, &mut out).await
}

/// The write side of a connection, and the clock that tells the connection's watch how long a
/// write has waited on the client (the send-idle deadline).
struct Writer<W> {
    io: W,
    clock: Arc<SendClock>,
}

/// Writes every piece of `out` (with `writev`) and empties it.
async fn flush<W: AsyncWrite + Unpin>(wr: &mut Writer<W>, out: &mut Vec<Bytes>) -> io::Result<()> {
    wr.clock.handed_over();
    let written = write_out(&mut wr.io, out).await;
    wr.clock.polled();
    written
}

async fn write_out<W: AsyncWrite + Unpin>(wr: &mut W, out: &mut Vec<Bytes>) -> io::Result<()> {
    // The slices are built in each poll, on the stack: held across the await, they would make
    // every connection's task larger by their size.
    let mut first = 0;
    poll_fn(|cx| {
        while first < out.len() {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let count = (out.len() - first).min(MAX_SLICES);
            for (slice, piece) in slices.iter_mut().zip(&out[first..first + count]) {
                *slice = IoSlice::new(piece);
            }
            let mut written =
                std::task::ready!(Pin::new(&mut *wr).poll_write_vectored(cx, &slices[..count]))?;
            if written == 0 {
                return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero)));
            }
            while written > 0 {
                let piece = &mut out[first];
                if written >= piece.len() {
                    written -= piece.len();
                    first += 1;
                } else {
                    let _ = piece.split_to(written);
                    written = 0;
                }
            }
        }
        Poll::Ready(Ok::<(), io::Error>(()))
    })
    .await?;
    out.clear();
    wr.flush().await
}

/// Today's `Date` value (RFC 9110 §5.6.7), formatted once a second per thread.
fn date() -> [u8; 29] {
    use std::cell::Cell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHE: Cell<(u64, [u8; 29])> = const { Cell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHE.with(|cache| {
        let (cached, text) = cache.get();
        if cached == second {
            return text;
        }
        let mut text = [0; 29];
        let formatted = httpdate::fmt_http_date(now);
        text.copy_from_slice(&formatted.as_bytes()[..29]);
        cache.set((second, text));
        text
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;

    async fn written<B>(body: B, framing: ResponseFraming) -> (String, bool)
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let mut wire = Writer { io: Vec::new(), clock: ConnWatch::new().writes_clock() };
        let mut out = Vec::new();
        let complete = write_response(&mut wire, &mut out, Bytes::from_static(b"HEAD\r\n"), body, framing)
            .await
            .unwrap();
        (String::from_utf8(wire.io).unwrap(), complete)
    }

    fn chunks(
        pieces: &[&'static str],
    ) -> StreamBody<impl futures_util::Stream<Item = Result<http_body::Frame<Bytes>, io::Error>>> {
        let frames: Vec<_> =
            pieces.iter().map(|p| Ok(http_body::Frame::data(Bytes::from_static(p.as_bytes())))).collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn bodies_are_framed_as_the_head_says() {
        assert_eq!(
            written(chunks(&["ab", "", "cde"]), ResponseFraming::Chunked).await,
            ("HEAD\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n".into(), true)
        );
        assert_eq!(
            written(chunks(&["ab", "cde"]), ResponseFraming::Length(5)).await,
            ("HEAD\r\nabcde".into(), true)
        );
        assert_eq!(
            written(chunks(&["ab", "cde"]), ResponseFraming::Close).await,
            ("HEAD\r\nabcde".into(), false)
        );
        assert_eq!(written(chunks(&["ab"]), ResponseFraming::Bodiless).await, ("HEAD\r\n".into(), true));
        // Longer or shorter than announced: cut at the length, and the connection must close.
        assert_eq!(
            written(chunks(&["ab", "cde"]), ResponseFraming::Length(3)).await,
            ("HEAD\r\nabc".into(), false)
        );
        assert_eq!(written(chunks(&["ab"]), ResponseFraming::Length(3)).await, ("HEAD\r\nab".into(), false));
    }

    #[tokio::test]
    async fn trailers_end_a_chunked_body() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", "7".parse().unwrap());
        let frames: Vec<Result<_, io::Error>> = vec![
            Ok(http_body::Frame::data(Bytes::from_static(b"hi"))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let body = StreamBody::new(futures_util::stream::iter(frames));
        assert_eq!(
            written(body, ResponseFraming::Chunked).await,
            ("HEAD\r\n2\r\nhi\r\n0\r\nx-sum: 7\r\n\r\n".into(), true)
        );
    }

    #[test]
    fn the_connection_field_is_the_servers() {
        let mut headers = HeaderMap::new();
        headers.append(header::CONNECTION, "keep-alive".parse().unwrap());
        headers.append(header::CONNECTION, "Close, foo".parse().unwrap());
        assert!(take_close(&mut headers));
        assert!(headers.is_empty());
        assert!(!take_close(&mut headers));
    }

    #[test]
    fn dates_are_http_dates() {
        let text = date();
        let text = std::str::from_utf8(&text).unwrap();
        assert!(httpdate::parse_http_date(text).is_ok(), "{text}");
    }
}
