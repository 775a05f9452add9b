//! The yamux session driver and the handle used to open streams on it.
//!
//! `yamux::Connection` has no control handle: it makes progress only while someone polls it. One
//! task, running [`SessionDriver::run`], owns it and polls it continuously; every other task opens
//! streams through a cloneable [`StreamOpener`] that sends a request over a bounded channel and waits
//! for the stream on a oneshot. Inbound streams are handed to a callback the owner provides (the
//! agent spawns a task per stream there), so the driver never waits on a slow consumer.

use std::future::poll_fn;
use std::task::{Context, Poll};

use futures_util::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::TransportError;

/// Open requests that may wait for the driver; beyond this, openers wait for room (backpressure
/// on request bursts instead of an unbounded queue).
const OPEN_QUEUE: usize = 256;
/// yamux's initial (and minimum) stream window; the connection window must cover it per stream.
pub const STREAM_WINDOW: usize = 256 * 1024;
/// Receive window a session may hand out beyond every stream's initial 256 KiB, so fast streams
/// can grow theirs toward the bandwidth-delay product (yamux doubles a stream's window when the
/// sender uses half of it within two round trips). 64 MiB lets one stream reach 100 MB/s over a
/// 20 ms path (2 MB in flight) with room for many, and bounds what a session can buffer.
pub const WINDOW_GROWTH_BUDGET: usize = 64 * 1024 * 1024;
/// Default stream limit per session.
pub const MAX_STREAMS: usize = 10_240;

/// Limits of one yamux session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// Most streams open at once; yamux refuses more (the opener gets an error, an inbound stream
    /// over the limit is reset).
    pub max_streams: usize,
    /// Most bytes all stream receive windows may add up to. Must be at least
    /// `max_streams × 256 KiB` (checked by [`SessionConfig::validate`]); what is above that is
    /// what fast streams may grow their windows into.
    pub max_connection_window: usize,
    /// Largest yamux data frame we send; bigger writes are split.
    pub split_send_size: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self::with_max_streams(MAX_STREAMS)
    }
}

impl SessionConfig {
    /// Limits for `max_streams` streams: each may hold its initial window (streams only fill
    /// their window when the reader falls behind, so real memory is far below this), plus
    /// [`WINDOW_GROWTH_BUDGET`] for windows that grow.
    pub fn with_max_streams(max_streams: usize) -> Self {
        Self {
            max_streams,
            max_connection_window: max_streams
                .saturating_mul(STREAM_WINDOW)
                .saturating_add(WINDOW_GROWTH_BUDGET),
            split_send_size: 64 * 1024,
        }
    }

    /// Checks the invariants yamux asserts (it panics on violation, so we check first).
    ///
    /// # Errors
    /// A message naming the broken rule.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_streams == 0 {
            return Err("max streams must be at least 1".into());
        }
        if self.max_connection_window < self.max_streams.saturating_mul(STREAM_WINDOW) {
            return Err(format!(
                "the connection window ({} bytes) must be at least max streams × 256 KiB ({} bytes)",
                self.max_connection_window,
                self.max_streams.saturating_mul(STREAM_WINDOW)
            ));
        }
        if self.split_send_size < 1024 {
            return Err("split send size must be at least 1 KiB".into());
        }
        Ok(())
    }

    fn yamux(&self) -> yamux::Config {
        let mut config = yamux::Config::default();
        // Order matters: each setter asserts window ≥ streams × 256 KiB against the other value.
        config
            .set_max_connection_receive_window(Some(self.max_connection_window.max(yamux_default_window())));
        config.set_max_num_streams(self.max_streams);
        config.set_max_connection_receive_window(Some(self.max_connection_window));
        config.set_split_send_size(self.split_send_size);
        config
    }
}

/// yamux's default connection window (1 GiB), which its default 512 streams fit in.
fn yamux_default_window() -> usize {
    1024 * 1024 * 1024
}

type OpenReply = oneshot::Sender<Result<yamux::Stream, TransportError>>;

/// Opens streams on a session driven elsewhere. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StreamOpener {
    tx: mpsc::Sender<OpenReply>,
}

impl StreamOpener {
    /// Opens a new outbound stream.
    ///
    /// The peer learns of the stream with its first frame, so write to it promptly.
    ///
    /// # Errors
    /// [`TransportError::SessionClosed`] when the session is gone; a yamux error (for example too
    /// many streams) otherwise.
    ///
    /// # Cancel safety
    /// Cancel safe: a stream opened for a cancelled call is dropped (and reset) by the driver.
    pub async fn open(&self) -> Result<yamux::Stream, TransportError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(reply).await.map_err(|_| TransportError::SessionClosed)?;
        rx.await.map_err(|_| TransportError::SessionClosed)?
    }

    /// Whether the driver has stopped.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Owns a yamux connection; see the module docs.
pub struct SessionDriver<T> {
    conn: yamux::Connection<T>,
    open_rx: mpsc::Receiver<OpenReply>,
    pending_open: Option<OpenReply>,
}

impl<T> std::fmt::Debug for SessionDriver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionDriver").finish_non_exhaustive()
    }
}

/// Creates the driver for a session over `io` and the handle to open streams on it.
///
/// `mode` is `Client` on the agent (it dialled) and `Server` on the gateway. The caller must have
/// validated `config` ([`SessionConfig::validate`]).
pub fn session<T>(io: T, mode: yamux::Mode, config: &SessionConfig) -> (SessionDriver<T>, StreamOpener)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (tx, open_rx) = mpsc::channel(OPEN_QUEUE);
    let conn = yamux::Connection::new(io, config.yamux(), mode);
    (SessionDriver { conn, open_rx, pending_open: None }, StreamOpener { tx })
}

impl<T> SessionDriver<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    /// Drives the session until the peer closes it, it fails, or `shutdown` fires (then it closes
    /// the session cleanly: pending frames are flushed and the peer is told).
    ///
    /// Every inbound stream is passed to `on_inbound`, which must not block.
    ///
    /// # Errors
    /// The connection failed (I/O, protocol violation by the peer).
    pub async fn run(
        mut self,
        mut on_inbound: impl FnMut(yamux::Stream),
        shutdown: CancellationToken,
    ) -> Result<(), TransportError> {
        let result = tokio::select! {
            result = poll_fn(|cx| self.poll_drive(cx, &mut on_inbound)) => result,
            () = shutdown.cancelled() => Ok(()),
        };
        // Refuse further opens, then say goodbye if the connection is still up.
        self.open_rx.close();
        if result.is_ok() {
            match poll_fn(|cx| self.conn.poll_close(cx)).await {
                Ok(()) | Err(yamux::ConnectionError::Closed) => {}
                Err(err) => debug!(%err, "closing the session failed"),
            }
        }
        result
    }

    fn poll_drive(
        &mut self,
        cx: &mut Context<'_>,
        on_inbound: &mut impl FnMut(yamux::Stream),
    ) -> Poll<Result<(), TransportError>> {
        // Serve open requests until one has to wait (yamux limits unacknowledged streams).
        loop {
            if self.pending_open.is_none() {
                match self.open_rx.poll_recv(cx) {
                    Poll::Ready(Some(reply)) => self.pending_open = Some(reply),
                    Poll::Ready(None) | Poll::Pending => break,
                }
            }
            let Some(reply) = self.pending_open.take() else {
                break;
            };
            if reply.is_closed() {
                continue;
            }
            match self.conn.poll_new_outbound(cx) {
                Poll::Ready(result) => {
                    // The opener may have given up meanwhile; the stream is then dropped and reset.
                    let _ = reply.send(result.map_err(TransportError::from));
                }
                Poll::Pending => {
                    self.pending_open = Some(reply);
                    break;
                }
            }
        }
        // Drive all I/O; this is also what delivers inbound streams.
        loop {
            match self.conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(stream))) => on_inbound(stream),
                Poll::Ready(Some(Err(err))) => return Poll::Ready(Err(err.into())),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
