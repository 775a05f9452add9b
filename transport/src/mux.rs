//! The yamux layer of a session: the driver that owns the connection, and the handle used to open
//! streams on it. [`crate::session`] builds a ferry session (control stream, heartbeat) on top.
//!
//! `yamux::Connection` has no control handle: it makes progress only while someone polls it. One
//! task, running [`SessionDriver::run`], owns it and polls it continuously; every other task opens
//! streams through a cloneable [`StreamOpener`] that sends a request over a bounded channel and waits
//! for the stream on a oneshot. Inbound streams are handed to a callback the owner provides (the
//! agent spawns a task per stream there), so the driver never waits on a slow consumer.
//!
//! yamux ends the *whole connection* when a stream would go over its limit, outbound or inbound.
//! So the limit a caller sees is ours: the opener counts the streams it handed out that are still
//! alive ([`StreamSlot`]) and refuses one over [`SessionConfig::max_streams`] without asking
//! yamux, whose own limit has headroom for streams that were dropped but not yet collected.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

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
/// How long a session that is told to stop goes on driving its connection (so what streams
/// wrote last, and the deferred WebSocket flush, still go out) before it is dropped.
pub const FLUSH_GRACE: Duration = Duration::from_millis(100);

/// yamux's stream limit for a session whose callers may hold `max_streams` at once. yamux counts
/// a dropped stream until its driver gets round to it (after the frames queued before it are
/// written), and counts the peer's streams too; going over ends the connection, so it gets room.
fn yamux_streams(max_streams: usize) -> usize {
    max_streams.saturating_add(max_streams / 4).saturating_add(64)
}

/// Limits of one yamux session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// Most streams our side may have open at once through its [`StreamOpener`]; one more gets
    /// [`TransportError::TooManyStreams`]. yamux's own limit (which also bounds the peer's
    /// streams) is somewhat higher, see the module docs.
    pub max_streams: usize,
    /// Most bytes all stream receive windows may add up to. Must be at least 256 KiB for each
    /// stream yamux may count (checked by [`SessionConfig::validate`]); what is above that is
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
            max_connection_window: yamux_streams(max_streams)
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
        let needed = yamux_streams(self.max_streams).saturating_mul(STREAM_WINDOW);
        if self.max_connection_window < needed {
            return Err(format!(
                "the connection window ({} bytes) must be at least 256 KiB per stream ({needed} bytes)",
                self.max_connection_window,
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
        config.set_max_num_streams(yamux_streams(self.max_streams));
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
    /// Streams handed out and still alive.
    open: Arc<AtomicUsize>,
    max: usize,
}

/// One stream handed out by a [`StreamOpener`]: it counts against the session's limit until
/// this is dropped. Keep it as long as the stream (see [`crate::stream::split_counted`]).
#[derive(Debug)]
pub struct StreamSlot {
    open: Arc<AtomicUsize>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl StreamOpener {
    /// Opens a new outbound stream.
    ///
    /// The peer learns of the stream with its first frame, so write to it promptly.
    ///
    /// # Errors
    /// [`TransportError::TooManyStreams`] when [`SessionConfig::max_streams`] streams are open
    /// (the session goes on); [`TransportError::SessionClosed`] when the session is gone; a yamux
    /// error otherwise.
    ///
    /// # Cancel safety
    /// Cancel safe: a stream opened for a cancelled call is dropped (and reset) by the driver.
    pub async fn open(&self) -> Result<(yamux::Stream, StreamSlot), TransportError> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(TransportError::TooManyStreams);
        }
        let slot = StreamSlot { open: Arc::clone(&self.open) };
        let (reply, rx) = oneshot::channel();
        self.tx.send(reply).await.map_err(|_| TransportError::SessionClosed)?;
        let stream = rx.await.map_err(|_| TransportError::SessionClosed)??;
        Ok((stream, slot))
    }

    /// Whether the driver has stopped.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Streams opened here that are still alive.
    pub fn open_streams(&self) -> usize {
        self.open.load(Ordering::Relaxed)
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
    let opener = StreamOpener { tx, open: Arc::default(), max: config.max_streams };
    (SessionDriver { conn, open_rx, pending_open: None }, opener)
}

impl<T> SessionDriver<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    /// Drives the session until the peer closes it, it fails, or `shutdown` fires; then it
    /// drives it [`FLUSH_GRACE`] longer (no new streams) so the last writes leave, and drops it.
    ///
    /// Dropping, not yamux's `poll_close`: a closing yamux connection forgets its streams
    /// without waking them, so a request still waiting on one would hang until its own timeout
    /// (and a peer that does not read would hold the close forever). Dropped, every stream sees
    /// the session end at once; the peer sees the connection close.
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
            result = poll_fn(|cx| self.poll_drive(cx, &mut on_inbound)) => return result,
            () = shutdown.cancelled() => Ok(()),
        };
        // Refuse further opens; let what is queued go out.
        self.open_rx.close();
        let flushing = poll_fn(|cx| self.poll_drive(cx, &mut on_inbound));
        if let Ok(Err(err)) = tokio::time::timeout(FLUSH_GRACE, flushing).await {
            debug!(%err, "the session failed while closing");
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
