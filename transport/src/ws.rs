//! A WebSocket as a byte stream, for the multiplexer.
//!
//! The multiplexer ([`crate::multiplex`]) wants `AsyncRead + AsyncWrite`; a WebSocket carries
//! messages. Once the ferry handshake
//! is done (on tungstenite's [`WebSocketStream`], see [`send_message`] and [`recv_message`]),
//! [`WsIo`] takes the socket itself and frames the session's bytes as RFC 6455 binary frames:
//!
//! - **Writing**: what the multiplexer writes is appended to one open frame (masked as it is
//!   copied when we are the client), and a flush closes the frame and writes it with one syscall.
//!   The multiplexer writes everything its streams queued since its last turn, then flushes once,
//!   so the many small frames of busy streams leave as one WebSocket frame and one syscall. One
//!   copy per byte: the multiplexer's buffer into the frame.
//! - **Reading**: bytes are read into a reused buffer (no zero-filling, unlike a `&mut [u8]` read
//!   buffer) and handed to the multiplexer straight from it (into its spare capacity, through
//!   tokio's `AsyncRead`), unmasked as they are copied when we are the
//!   server. Frame and message boundaries mean nothing to a byte stream, so a frame is never
//!   gathered whole: a fragmented message, a 1-byte frame or a 2 GiB one all stream the same way,
//!   in bounded memory.
//! - Pings are answered with pongs, pongs are ignored, a close frame is answered and ends the
//!   stream, an empty frame is just empty. A text frame, reserved bits (no extension is
//!   negotiated), an unknown opcode, a masked frame from the server, an unmasked one from the
//!   client, or a continuation out of place is a protocol error: the peer gets close code 1002.
//!
//! Written here because no maintained crate fits: tungstenite's message API copies every message
//! into its write buffer before masking and zero-fills its read buffer on every read (measured:
//! the largest user-space costs per MiB through the tunnel), `ws_stream_tungstenite` needs
//! async-tungstenite and an older tungstenite, and async-tungstenite's byte reader passes ping
//! payloads into the stream and reads an empty message as its end. tungstenite still does the
//! HTTP upgrade and the handshake messages.
//!
//! Reading goes on while a write waits. The `yamux` crate stops reading its socket while it has a
//! reply (a pong) it cannot write yet; if both peers push data, both send buffers fill, each holds
//! a pong for the other and neither reads: the session deadlocks (rust-yamux #227, seen here with
//! 1,000 downloads at once). Our multiplexer reads regardless, but a peer may still run the crate,
//! so when a write has to wait, [`WsIo`] also reads what the peer sent into its read buffer
//! (bounded by [`MAX_READ_AHEAD`]), which lets the peer's writes (its pong among them) go out;
//! the multiplexer gets the bytes when it asks.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use ferry_codec::ws::opcode::{
    BINARY as OP_BINARY, CLOSE as OP_CLOSE, CONTINUATION as OP_CONTINUATION, PING as OP_PING,
    PONG as OP_PONG, TEXT as OP_TEXT,
};
use ferry_codec::ws::{FIN, FrameHeader, MAX_CONTROL_PAYLOAD, MAX_HEADER, apply_mask, encode_header};

use crate::TransportError;

/// The WebSocket subprotocol both sides ask for.
pub const SUBPROTOCOL: &str = "ferry.v1";
/// Most payload bytes in one frame we send: a flush sends sooner, this only bounds the buffer.
/// 256 KiB is a stream's initial window.
pub const MAX_PENDING_WRITE: usize = 256 * 1024;
/// Largest message (the sum of its fragments) accepted, before and after the handshake: ours are
/// at most [`MAX_PENDING_WRITE`]. Bytes stream through as they come; this only refuses a peer
/// that sends what no ferry peer would (close code 1009), at once for a declared length.
pub const MAX_MESSAGE_LEN: usize = 2 * 1024 * 1024;
/// Most bytes read ahead (while a write waits) and not yet taken by the multiplexer. A peer only sends data
/// within the credit we gave it; this only has to make room for its next writes, not hold them.
pub const MAX_READ_AHEAD: usize = 1024 * 1024;
/// During the handshake, tungstenite buffers at most this much unsent data before `poll_ready`
/// waits for the socket; the default is unbounded.
pub const MAX_WRITE_BUFFER: usize = 512 * 1024;
/// Room asked of the socket per read.
const READ_CHUNK: usize = 64 * 1024;

/// The tungstenite configuration both sides use for the handshake: bounded messages, frames and
/// write buffer.
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(128 * 1024)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(Some(MAX_MESSAGE_LEN))
        .max_frame_size(Some(MAX_MESSAGE_LEN))
}

/// Bytes moved through one [`WsIo`], readable from other tasks (for `/connections`).
#[derive(Debug, Default)]
pub struct IoCounters {
    /// Bytes received from the peer (WebSocket payload).
    pub rx: AtomicU64,
    /// Bytes sent to the peer (WebSocket payload).
    pub tx: AtomicU64,
}

/// The close frame that tells a peer why its WebSocket traffic was refused during the
/// handshake, if the error is one of its own making.
pub fn close_frame_for(err: &WsError) -> Option<CloseFrame> {
    let (code, reason) = match err {
        WsError::Capacity(_) => (CloseCode::Size, "message too big"),
        WsError::Protocol(_) => (CloseCode::Protocol, "protocol error"),
        _ => return None,
    };
    Some(CloseFrame { code, reason: reason.into() })
}

fn protocol(err: ferry_codec::CodecError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("websocket protocol error: {err}"))
}

fn protocol_rule(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("websocket protocol error: {what}"))
}

/// Mask keys, drawn from the OS 64 at a time rather than with a syscall per frame.
#[derive(Debug)]
struct MaskKeys {
    pool: [u8; 256],
    used: usize,
}

impl MaskKeys {
    fn new() -> Self {
        Self { pool: [0; 256], used: 256 }
    }

    fn next(&mut self) -> io::Result<[u8; 4]> {
        if self.used == self.pool.len() {
            getrandom::fill(&mut self.pool)
                .map_err(|err| io::Error::other(format!("no randomness: {err}")))?;
            self.used = 0;
        }
        let key = [
            self.pool[self.used],
            self.pool[self.used + 1],
            self.pool[self.used + 2],
            self.pool[self.used + 3],
        ];
        self.used += 4;
        Ok(key)
    }
}

/// A WebSocket as a byte stream. See the module docs.
#[derive(Debug)]
pub struct WsIo<S> {
    io: S,
    /// We are the client (the agent): our frames are masked and the peer's must not be.
    client: bool,
    counters: Arc<IoCounters>,

    /// Bytes read from the socket and not yet taken.
    rbuf: BytesMut,
    /// Payload bytes of the current data frame still to come, and its mask key and how far into
    /// the payload we are.
    payload_left: u64,
    unmask: Option<([u8; 4], usize)>,
    /// Inside a fragmented message: the next data frame must be a continuation.
    in_message: bool,
    /// Payload bytes of the current message so far, its frames included.
    message_len: u64,
    /// The socket reached its end.
    eof: bool,
    /// The peer's close frame was read (or the socket ended): reads return 0 from now on.
    read_closed: bool,
    /// An error met while reading ahead, for the next read.
    read_error: Option<io::Error>,

    /// Frames to send: `wbuf[sent..]`. While a data frame is open it is the whole buffer, with
    /// [`MAX_HEADER`] bytes kept free at the front for its header.
    wbuf: BytesMut,
    sent: usize,
    /// The open data frame: its payload length and mask key.
    open: Option<(usize, Option<[u8; 4]>)>,
    /// Control frames waiting for the data frame in `wbuf` to go out: the close frame, and the
    /// pong of the latest ping (one at most: a ping flood from a peer that does not read cannot
    /// make it grow).
    cbuf: BytesMut,
    pong: Option<([u8; MAX_CONTROL_PAYLOAD], usize)>,
    close_sent: bool,
    keys: MaskKeys,
}

impl<S> WsIo<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Takes over a WebSocket whose handshake (and ferry handshake) is done. tungstenite must
    /// hold no unread bytes: the ferry handshake is lock-step (each side has read the other's
    /// last handshake message before the other sends anything more), so it holds none.
    pub fn new(ws: WebSocketStream<S>, role: Role, counters: Arc<IoCounters>) -> Self {
        Self {
            io: ws.into_inner(),
            client: role == Role::Client,
            counters,
            rbuf: BytesMut::new(),
            payload_left: 0,
            unmask: None,
            in_message: false,
            message_len: 0,
            eof: false,
            read_closed: false,
            read_error: None,
            wbuf: BytesMut::new(),
            sent: 0,
            open: None,
            cbuf: BytesMut::new(),
            pong: None,
            close_sent: false,
            keys: MaskKeys::new(),
        }
    }

    /// Queues a control frame (sent after the data frame being built or sent, if any).
    fn queue_control(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
        let mask = if self.client { Some(self.keys.next()?) } else { None };
        let mut header = [0u8; MAX_HEADER];
        let n = encode_header(&mut header, FIN | opcode, payload.len(), mask);
        self.cbuf.extend_from_slice(&header[..n]);
        let start = self.cbuf.len();
        self.cbuf.extend_from_slice(payload);
        if let Some(key) = mask {
            apply_mask(&mut self.cbuf[start..], key, 0);
        }
        Ok(())
    }

    /// Tells the peer why its frames were refused (best effort, now) and gives the error to
    /// return: close code 1009 for a message over [`MAX_MESSAGE_LEN`], 1002 for the rest.
    fn refuse(&mut self, cx: &mut Context<'_>, err: io::Error) -> io::Error {
        if !self.close_sent {
            self.close_sent = true;
            let too_big = err.kind() == io::ErrorKind::FileTooLarge;
            let code: u16 = if too_big { CloseCode::Size } else { CloseCode::Protocol }.into();
            if self.queue_control(OP_CLOSE, &code.to_be_bytes()).is_ok() {
                let _ = self.poll_send(cx);
            }
        }
        self.read_closed = true;
        err
    }

    /// Closes the open data frame: its header goes right before its payload.
    fn close_frame(&mut self) {
        let Some((len, mask)) = self.open.take() else { return };
        let mut header = [0u8; MAX_HEADER];
        let n = encode_header(&mut header, FIN | OP_BINARY, len, mask);
        self.wbuf[MAX_HEADER - n..MAX_HEADER].copy_from_slice(&header[..n]);
        self.sent = MAX_HEADER - n;
    }

    /// Writes closed frames, then control frames, to the socket.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.open.is_some() {
            return Poll::Ready(Ok(()));
        }
        while self.sent < self.wbuf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.wbuf.clear();
        self.sent = 0;
        if self.cbuf.is_empty()
            && let Some((payload, len)) = self.pong.take()
        {
            self.queue_control(OP_PONG, &payload[..len])?;
        }
        while !self.cbuf.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.cbuf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.cbuf.advance(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Reads more from the socket into `rbuf`.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
            self.rbuf.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf)
    }

    /// A write has to wait: read what the peer sent meanwhile (up to [`MAX_READ_AHEAD`]), so the
    /// peer is never stuck writing to us while we are stuck writing to it. Registers this task
    /// for reads too, so it wakes when more arrives.
    fn read_ahead(&mut self, cx: &mut Context<'_>) {
        while !self.eof && self.read_error.is_none() && self.rbuf.len() < MAX_READ_AHEAD {
            match self.poll_fill(cx) {
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(err)) => self.read_error = Some(err),
                Poll::Pending => return,
            }
        }
    }

    /// Handles the header at the front of `rbuf`, if it is all there (and, for a control frame,
    /// its payload too). `Ok(false)`: more bytes are needed. `Ok(true)` with `read_closed` set:
    /// the peer closed.
    fn next_frame(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        let Some(header) = FrameHeader::parse(&self.rbuf).map_err(protocol)? else {
            return Ok(false);
        };
        match (self.client, header.mask) {
            (true, Some(_)) => return Err(protocol_rule("masked frame from the server")),
            (false, None) => return Err(protocol_rule("unmasked frame from the client")),
            _ => {}
        }
        match header.opcode {
            OP_BINARY | OP_CONTINUATION => {
                if (header.opcode == OP_CONTINUATION) != self.in_message {
                    return Err(protocol_rule("continuation frame out of place"));
                }
                self.in_message = !header.fin;
                self.message_len = if header.opcode == OP_BINARY { 0 } else { self.message_len };
                self.message_len = self.message_len.saturating_add(header.len);
                if self.message_len > MAX_MESSAGE_LEN as u64 {
                    return Err(io::Error::new(io::ErrorKind::FileTooLarge, "websocket message too big"));
                }
                self.rbuf.advance(header.size);
                self.payload_left = header.len;
                self.unmask = header.mask.map(|key| (key, 0));
            }
            OP_CLOSE | OP_PING | OP_PONG => {
                // At most 125 bytes: `FrameHeader::parse` checked.
                let len = header.len as usize;
                if self.rbuf.len() < header.size + len {
                    return Ok(false);
                }
                self.rbuf.advance(header.size);
                let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
                let payload = &mut payload[..len];
                payload.copy_from_slice(&self.rbuf[..len]);
                self.rbuf.advance(len);
                if let Some(key) = header.mask {
                    apply_mask(payload, key, 0);
                }
                match header.opcode {
                    OP_PING if !self.close_sent => {
                        let mut latest = [0u8; MAX_CONTROL_PAYLOAD];
                        latest[..len].copy_from_slice(payload);
                        self.pong = Some((latest, len));
                    }
                    OP_CLOSE => {
                        // Echo the status code (RFC 6455 §5.5.1), then the stream ends.
                        if !self.close_sent {
                            self.close_sent = true;
                            self.queue_control(OP_CLOSE, payload.get(..2).unwrap_or_default())?;
                        }
                        self.read_closed = true;
                    }
                    _ => {}
                }
                let _ = self.poll_send(cx);
            }
            OP_TEXT => return Err(protocol_rule("text message on a ferry session")),
            _ => return Err(protocol_rule("unknown opcode")),
        }
        Ok(true)
    }
}

impl<S> WsIo<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Reads up to `room` payload bytes: `put` appends them to the caller's buffer and returns
    /// them there, to be unmasked in place (one copy, no zero-filling).
    fn poll_read_payload<'a>(
        &mut self,
        cx: &mut Context<'_>,
        room: usize,
        put: impl FnOnce(&[u8]) -> &'a mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self;
        if room == 0 {
            return Poll::Ready(Ok(0));
        }
        loop {
            if this.read_closed {
                return Poll::Ready(Ok(0));
            }
            if this.payload_left > 0 {
                if !this.rbuf.is_empty() {
                    let n = (room.min(this.rbuf.len()) as u64).min(this.payload_left) as usize;
                    let copied = put(&this.rbuf[..n]);
                    if let Some((key, offset)) = this.unmask.as_mut() {
                        apply_mask(copied, *key, *offset);
                        *offset += n;
                    }
                    this.rbuf.advance(n);
                    this.payload_left -= n as u64;
                    this.counters.rx.fetch_add(n as u64, Ordering::Relaxed);
                    crate::stats::copied(n);
                    return Poll::Ready(Ok(n));
                }
            } else {
                match this.next_frame(cx) {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(err) => return Poll::Ready(Err(this.refuse(cx, err))),
                }
            }
            if let Some(err) = this.read_error.take() {
                return Poll::Ready(Err(err));
            }
            if this.eof {
                this.read_closed = true;
                if this.payload_left > 0 || !this.rbuf.is_empty() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "websocket ended inside a frame",
                    )));
                }
                return Poll::Ready(Ok(0));
            }
            if ready!(this.poll_fill(cx))? == 0 {
                this.eof = true;
            }
        }
    }
}

impl<S> futures_util::io::AsyncRead for WsIo<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let room = buf.len();
        self.poll_read_payload(cx, room, move |bytes| {
            let n = bytes.len();
            buf[..n].copy_from_slice(bytes);
            &mut buf[..n]
        })
    }
}

/// The multiplexer reads through tokio's trait: into spare capacity, never zero-filled.
impl<S> AsyncRead for WsIo<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let room = buf.remaining();
        let start = buf.filled().len();
        self.poll_read_payload(cx, room, move |bytes| {
            buf.put_slice(bytes);
            &mut buf.filled_mut()[start..]
        })
        .map_ok(drop)
    }
}

impl<S> AsyncWrite for WsIo<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        futures_util::io::AsyncWrite::poll_write(self, cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        futures_util::io::AsyncWrite::poll_flush(self, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        futures_util::io::AsyncWrite::poll_close(self, cx)
    }
}

impl<S> futures_util::io::AsyncWrite for WsIo<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.open.is_some_and(|(len, _)| len >= MAX_PENDING_WRITE) {
            this.close_frame();
        }
        if this.open.is_none() {
            if this.poll_send(cx)?.is_pending() {
                this.read_ahead(cx);
                return Poll::Pending;
            }
            let mask = if this.client { Some(this.keys.next()?) } else { None };
            this.wbuf.put_bytes(0, MAX_HEADER);
            this.open = Some((0, mask));
        }
        let Some((len, mask)) = this.open.as_mut() else {
            unreachable!("a frame was opened above");
        };
        let n = buf.len().min(MAX_PENDING_WRITE - *len);
        let start = this.wbuf.len();
        this.wbuf.extend_from_slice(&buf[..n]);
        if let Some(key) = *mask {
            apply_mask(&mut this.wbuf[start..], key, *len);
        }
        *len += n;
        this.counters.tx.fetch_add(n as u64, Ordering::Relaxed);
        crate::stats::copied(n);
        Poll::Ready(Ok(n))
    }

    /// Closes the open frame and sends it (with any control frames) in one write.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.close_frame();
        let flushed = match this.poll_send(cx)? {
            Poll::Ready(()) => Pin::new(&mut this.io).poll_flush(cx),
            Poll::Pending => Poll::Pending,
        };
        if flushed.is_pending() {
            this.read_ahead(cx);
        }
        flushed
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.close_frame();
        if !this.close_sent {
            this.close_sent = true;
            let code: u16 = CloseCode::Normal.into();
            this.queue_control(OP_CLOSE, &code.to_be_bytes())?;
        }
        ready!(this.poll_send(cx))?;
        ready!(Pin::new(&mut this.io).poll_flush(cx))?;
        match ready!(Pin::new(&mut this.io).poll_shutdown(cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(err) if err.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
            Err(err) => Poll::Ready(Err(err)),
        }
    }
}

/// Sends one handshake message (a whole binary WebSocket message).
///
/// # Errors
/// The WebSocket failed.
pub async fn send_message<S>(ws: &mut WebSocketStream<S>, payload: Bytes) -> Result<(), TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.send(Message::Binary(payload)).await?;
    Ok(())
}

/// Receives the next binary message, skipping pings and pongs.
///
/// # Errors
/// The peer closed the WebSocket, sent text, or the WebSocket failed.
///
/// # Cancel safety
/// Cancel safe: a message is either returned or still unread.
pub async fn recv_message<S>(ws: &mut WebSocketStream<S>) -> Result<Bytes, TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(data))) => return Ok(data),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Ok(Message::Text(_))) => return Err(TransportError::Unexpected("text message")),
            Some(Ok(Message::Close(_))) | None => return Err(TransportError::Closed),
            Some(Err(err)) => return Err(err.into()),
        }
    }
}
