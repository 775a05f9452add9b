//! A WebSocket as a byte stream, for yamux.
//!
//! yamux wants `AsyncRead + AsyncWrite`; a WebSocket carries messages. [`WsIo`] reads binary
//! messages and hands out their bytes; it buffers what yamux writes and sends it as one binary
//! message per flush, so yamux's 12-byte frame header and its body travel together instead of as two
//! messages. Pings, pongs and close frames are handled here and never leak into the byte stream;
//! an empty message is just empty, never end-of-stream; a text message is a protocol error.
//!
//! Every buffer is bounded: tungstenite's by [`websocket_config`], ours by [`MAX_PENDING_WRITE`]
//! and [`MAX_READ_AHEAD`].
//!
//! Written here because no maintained crate fits: `ws_stream_tungstenite` needs async-tungstenite
//! and an older tungstenite, and async-tungstenite's byte reader passes ping payloads into the
//! stream and reads an empty message as its end.
//!
//! Reading goes on while a write waits. yamux stops reading its socket while it has a reply (a
//! pong) it cannot write yet; if both peers push data, both send buffers fill, each holds a pong
//! for the other and neither reads: the session deadlocks (rust-yamux #227, seen here with 1,000
//! downloads at once). So when a write has to wait, [`WsIo`] reads what the peer sent into a
//! bounded queue, which lets the peer's writes (its pong among them) go out, and the peer reads
//! again; yamux gets the queued messages when it asks.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Sink, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::TransportError;

/// The WebSocket subprotocol both sides ask for.
pub const SUBPROTOCOL: &str = "ferry.v1";
/// Most bytes buffered from yamux before they are sent even without a flush. yamux flushes after
/// every frame, so this only bounds the buffer; 256 KiB is a yamux window.
pub const MAX_PENDING_WRITE: usize = 256 * 1024;
/// Largest WebSocket message (and frame) accepted. Our own messages are at most
/// [`MAX_PENDING_WRITE`] plus one yamux frame (at most 1 MiB by yamux's own limit).
pub const MAX_MESSAGE_LEN: usize = 2 * 1024 * 1024;
/// Most flushes deferred in a row (see `WsIo::poll_flush`): 32 window updates are 384 bytes.
const MAX_DEFERRED_FLUSHES: u32 = 32;
/// Most bytes read ahead (while a write waits) and not yet taken by yamux. A peer only sends data
/// within the credit we gave it; this only has to make room for its next writes, not hold them.
pub const MAX_READ_AHEAD: usize = 1024 * 1024;
/// tungstenite buffers at most this much unsent data before `poll_ready` waits for the socket;
/// the default is unbounded.
pub const MAX_WRITE_BUFFER: usize = 512 * 1024;

/// The tungstenite configuration both sides use: bounded messages, frames and write buffer.
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

/// A WebSocket seen as a byte stream. See the module docs.
#[derive(Debug)]
pub struct WsIo<S> {
    ws: WebSocketStream<S>,
    /// Unread rest of the last binary message.
    read_buf: Bytes,
    /// Bytes written since the last message was sent.
    write_buf: BytesMut,
    /// Whether something was written since the last `poll_flush` (see `poll_flush`).
    dirty: bool,
    /// Flushes deferred in a row since bytes last went out.
    deferred: u32,
    /// Messages read ahead while a write waited, oldest first, and their size.
    read_ahead: std::collections::VecDeque<Bytes>,
    read_ahead_len: usize,
    /// An error met while reading ahead, for the next read.
    read_error: Option<io::Error>,
    read_closed: bool,
    counters: Arc<IoCounters>,
}

/// The close frame that tells a peer why its WebSocket traffic was refused, if the error is
/// one of its own making.
pub fn close_frame_for(err: &WsError) -> Option<CloseFrame> {
    let (code, reason) = match err {
        WsError::Capacity(_) => (CloseCode::Size, "message too big"),
        WsError::Protocol(_) => (CloseCode::Protocol, "protocol error"),
        _ => return None,
    };
    Some(CloseFrame { code, reason: reason.into() })
}

impl<S> WsIo<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Wraps a WebSocket whose handshake (and ferry handshake) is done.
    pub fn new(ws: WebSocketStream<S>, counters: Arc<IoCounters>) -> Self {
        Self {
            ws,
            read_buf: Bytes::new(),
            write_buf: BytesMut::new(),
            dirty: false,
            deferred: 0,
            read_ahead: std::collections::VecDeque::new(),
            read_ahead_len: 0,
            read_error: None,
            read_closed: false,
            counters,
        }
    }

    /// Polls the WebSocket for its next binary message: `Ready(None)` at its end.
    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        loop {
            match ready!(self.ws.poll_next_unpin(cx)) {
                Some(Ok(Message::Binary(data))) => {
                    self.counters.rx.fetch_add(data.len() as u64, Ordering::Relaxed);
                    return Poll::Ready(Some(Ok(data)));
                }
                // tungstenite queues the pong itself; pongs and raw frames carry nothing for us.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text message on a ferry session",
                    ))));
                }
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(None),
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => return Poll::Ready(None),
                Some(Err(err)) => {
                    // Best effort, at once (the session ends with this error and never closes the
                    // WebSocket cleanly): a peer that broke the protocol hears why.
                    if let Some(frame) = close_frame_for(&err)
                        && let Poll::Ready(Ok(())) = self.ws.poll_ready_unpin(cx)
                        && self.ws.start_send_unpin(Message::Close(Some(frame))).is_ok()
                    {
                        let _ = self.ws.poll_flush_unpin(cx);
                    }
                    return Poll::Ready(Some(Err(ws_to_io(err))));
                }
            }
        }
    }

    /// A write has to wait: read what the peer sent meanwhile (up to [`MAX_READ_AHEAD`]), so the
    /// peer is never stuck writing to us while we are stuck writing to it. Registers this task
    /// for reads too, so it wakes when more arrives.
    fn read_ahead(&mut self, cx: &mut Context<'_>) {
        while !self.read_closed && self.read_error.is_none() && self.read_ahead_len < MAX_READ_AHEAD {
            match self.poll_message(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    self.read_ahead_len += data.len();
                    self.read_ahead.push_back(data);
                }
                Poll::Ready(Some(Err(err))) => self.read_error = Some(err),
                Poll::Ready(None) => self.read_closed = true,
                Poll::Pending => return,
            }
        }
    }

    /// Sends what is buffered as one binary message (without flushing the socket).
    fn poll_send_buffered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.write_buf.is_empty() {
            return Poll::Ready(Ok(()));
        }
        ready!(self.ws.poll_ready_unpin(cx)).map_err(ws_to_io)?;
        self.deferred = 0;
        let message = self.write_buf.split().freeze();
        self.counters.tx.fetch_add(message.len() as u64, Ordering::Relaxed);
        self.ws.start_send_unpin(Message::Binary(message)).map_err(ws_to_io)?;
        Poll::Ready(Ok(()))
    }
}

fn ws_to_io(err: WsError) -> io::Error {
    match err {
        WsError::Io(err) => err,
        WsError::ConnectionClosed | WsError::AlreadyClosed => io::ErrorKind::BrokenPipe.into(),
        other => io::Error::other(other),
    }
}

impl<S> futures_util::io::AsyncRead for WsIo<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        loop {
            if !this.read_buf.is_empty() {
                let n = buf.len().min(this.read_buf.len());
                buf[..n].copy_from_slice(&this.read_buf[..n]);
                crate::stats::copied(n);
                this.read_buf.advance(n);
                return Poll::Ready(Ok(n));
            }
            if buf.is_empty() {
                return Poll::Ready(Ok(0));
            }
            // Let go of the finished message before asking for the next one: it shares
            // tungstenite's read buffer, which can then be reused in place instead of a fresh
            // buffer (its full 16 KiB) being allocated for every message read.
            this.read_buf = Bytes::new();
            if let Some(data) = this.read_ahead.pop_front() {
                this.read_ahead_len -= data.len();
                this.read_buf = data;
                continue;
            }
            if let Some(err) = this.read_error.take() {
                return Poll::Ready(Err(err));
            }
            if this.read_closed {
                return Poll::Ready(Ok(0));
            }
            match ready!(this.poll_message(cx)) {
                Some(Ok(data)) => this.read_buf = data,
                Some(Err(err)) => return Poll::Ready(Err(err)),
                None => this.read_closed = true,
            }
        }
    }
}

impl<S> futures_util::io::AsyncWrite for WsIo<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.write_buf.len() >= MAX_PENDING_WRITE && self.poll_send_buffered(cx)?.is_pending() {
            self.read_ahead(cx);
            return Poll::Pending;
        }
        // At most one message's worth: tungstenite refuses a message over its write buffer
        // bound, and the peer one over `MAX_MESSAGE_LEN`.
        let n = buf.len().min(MAX_PENDING_WRITE - self.write_buf.len());
        self.write_buf.extend_from_slice(&buf[..n]);
        crate::stats::copied(n);
        self.dirty = true;
        Poll::Ready(Ok(n))
    }

    /// yamux flushes after every frame it writes, then looks for more frames. Sending a message
    /// and a syscall per frame would cost more than the frames themselves, so a flush that comes
    /// right after new writes is deferred: this task is woken to run again at once, and the
    /// bytes go out (as one message) at the first flush with nothing new written before it —
    /// when yamux has no more frames ready — or as soon as [`MAX_PENDING_WRITE`] bytes wait, or
    /// after [`MAX_DEFERRED_FLUSHES`] deferrals in a row: with many streams there is always one
    /// more small frame (a window update) ready, and holding them back starves the peer of
    /// credit (measured: 1,000 downloads at once crawled at 5 MB/s).
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.dirty && self.write_buf.len() < MAX_PENDING_WRITE && self.deferred < MAX_DEFERRED_FLUSHES {
            self.dirty = false;
            self.deferred += 1;
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        let flushed = match self.poll_send_buffered(cx)? {
            Poll::Ready(()) => self.ws.poll_flush_unpin(cx).map_err(ws_to_io),
            Poll::Pending => Poll::Pending,
        };
        if flushed.is_pending() {
            self.read_ahead(cx);
        }
        flushed
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_buffered(cx))?;
        match ready!(Pin::new(&mut self.ws).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(err) => Poll::Ready(Err(ws_to_io(err))),
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
