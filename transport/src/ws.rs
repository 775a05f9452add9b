//! A WebSocket as a byte stream, for yamux.
//!
//! yamux wants `AsyncRead + AsyncWrite`; a WebSocket carries messages. [`WsIo`] reads binary
//! messages and hands out their bytes; it buffers what yamux writes and sends it as one binary
//! message per flush, so yamux's 12-byte frame header and its body travel together instead of as two
//! messages. Pings, pongs and close frames are handled here and never leak into the byte stream;
//! an empty message is just empty, never end-of-stream; a text message is a protocol error.
//!
//! Every buffer is bounded: tungstenite's by [`websocket_config`], ours by [`MAX_PENDING_WRITE`].

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
            read_closed: false,
            counters,
        }
    }

    /// Sends what is buffered as one binary message (without flushing the socket).
    fn poll_send_buffered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.write_buf.is_empty() {
            return Poll::Ready(Ok(()));
        }
        ready!(self.ws.poll_ready_unpin(cx)).map_err(ws_to_io)?;
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
                this.read_buf.advance(n);
                return Poll::Ready(Ok(n));
            }
            if this.read_closed || buf.is_empty() {
                return Poll::Ready(Ok(0));
            }
            match ready!(this.ws.poll_next_unpin(cx)) {
                Some(Ok(Message::Binary(data))) => {
                    this.counters.rx.fetch_add(data.len() as u64, Ordering::Relaxed);
                    this.read_buf = data;
                }
                // tungstenite queues the pong itself; pongs and raw frames carry nothing for us.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text message on a ferry session",
                    )));
                }
                Some(Ok(Message::Close(_))) | None => this.read_closed = true,
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => this.read_closed = true,
                Some(Err(err)) => {
                    // Best effort, at once (the session ends with this error and never closes the
                    // WebSocket cleanly): a peer that broke the protocol hears why.
                    if let Some(frame) = close_frame_for(&err)
                        && let Poll::Ready(Ok(())) = this.ws.poll_ready_unpin(cx)
                        && this.ws.start_send_unpin(Message::Close(Some(frame))).is_ok()
                    {
                        let _ = this.ws.poll_flush_unpin(cx);
                    }
                    return Poll::Ready(Err(ws_to_io(err)));
                }
            }
        }
    }
}

impl<S> futures_util::io::AsyncWrite for WsIo<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.write_buf.len() >= MAX_PENDING_WRITE {
            ready!(self.poll_send_buffered(cx))?;
        }
        self.write_buf.extend_from_slice(buf);
        self.dirty = true;
        Poll::Ready(Ok(buf.len()))
    }

    /// yamux flushes after every frame it writes, then looks for more frames. Sending a message
    /// and a syscall per frame would cost more than the frames themselves, so a flush that comes
    /// right after new writes is deferred: this task is woken to run again at once, and the
    /// bytes go out (as one message) at the first flush with nothing new written before it —
    /// when yamux has no more frames ready — or as soon as [`MAX_PENDING_WRITE`] bytes wait.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.dirty && self.write_buf.len() < MAX_PENDING_WRITE {
            self.dirty = false;
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        ready!(self.poll_send_buffered(cx))?;
        self.ws.poll_flush_unpin(cx).map_err(ws_to_io)
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
