//! The multiplexer layer of a session: the driver that owns the connection, and the handle used
//! to open streams on it. [`crate::session`] builds a ferry session (control stream, heartbeat) on
//! top. The protocol is yamux, spoken by [`crate::multiplex`].
//!
//! One task, running [`SessionDriver::run`], owns the connection's I/O; every other task opens
//! streams through a cloneable [`StreamOpener`], at once (the stream id is taken under the
//! session's lock; the peer learns of the stream with its first frame). Inbound streams are
//! handed to a callback the owner provides (the agent spawns a task per stream there), so the
//! driver never waits on a slow consumer.
//!
//! The limit a caller sees is ours: the opener counts the streams it handed out that are still
//! alive ([`StreamSlot`]) and refuses one over [`SessionConfig::max_streams`]; the connection's
//! own limit (which also bounds the peer's streams, whose extra ones are reset) has headroom.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::TransportError;
use crate::multiplex::{self, Mode, MuxError, Stream};
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

/// The connection's stream limit for a session whose callers may hold `max_streams` at once: it
/// counts the peer's streams too (the agent's control stream), so it gets room.
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

    fn multiplex(&self) -> multiplex::Config {
        multiplex::Config {
            max_streams: yamux_streams(self.max_streams),
            max_connection_window: self.max_connection_window,
            split_send_size: self.split_send_size,
        }
    }
}

/// Opens streams on a session driven elsewhere. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StreamOpener {
    opener: multiplex::Opener,
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
    /// Opens a new outbound stream, at once (no round trip through the driver).
    ///
    /// The peer learns of the stream with its first frame, so write to it promptly.
    ///
    /// # Errors
    /// [`TransportError::TooManyStreams`] when [`SessionConfig::max_streams`] streams are open
    /// (the session goes on); [`TransportError::SessionClosed`] when the session is gone.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn open(&self) -> Result<(Stream, StreamSlot), TransportError> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(TransportError::TooManyStreams);
        }
        let slot = StreamSlot { open: Arc::clone(&self.open) };
        let stream = self.opener.open().await.map_err(|err| match err {
            MuxError::Closed => TransportError::SessionClosed,
            other => TransportError::Mux(other),
        })?;
        Ok((stream, slot))
    }

    /// Whether the driver has stopped.
    pub fn is_closed(&self) -> bool {
        self.opener.is_closed()
    }

    /// Streams opened here that are still alive.
    pub fn open_streams(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// Owns a session's connection; see the module docs.
pub struct SessionDriver<T> {
    driver: multiplex::Driver<T>,
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
pub fn session<T>(io: T, mode: Mode, config: &SessionConfig) -> (SessionDriver<T>, StreamOpener)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (driver, opener) = multiplex::connection(io, mode, config.multiplex());
    let opener = StreamOpener { opener, open: Arc::default(), max: config.max_streams };
    (SessionDriver { driver }, opener)
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
        mut on_inbound: impl FnMut(Stream),
        shutdown: CancellationToken,
    ) -> Result<(), TransportError> {
        let result = tokio::select! {
            result = poll_fn(|cx| self.driver.poll_drive(cx, &mut on_inbound)) => return result.map_err(from_mux),
            () = shutdown.cancelled() => Ok(()),
        };
        // Refuse further opens; let what is queued go out.
        self.driver.stop_opening();
        let flushing = poll_fn(|cx| self.driver.poll_drive(cx, &mut on_inbound));
        if let Ok(Err(err)) = tokio::time::timeout(FLUSH_GRACE, flushing).await {
            debug!(%err, "the session failed while closing");
        }
        result
    }
}

fn from_mux(err: MuxError) -> TransportError {
    match err {
        MuxError::Io(err) => TransportError::Io(err),
        other => TransportError::Mux(other),
    }
}
