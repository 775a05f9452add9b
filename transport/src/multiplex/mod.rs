//! ferry's own implementation of the yamux wire protocol (hashicorp/yamux `spec.md`), built on
//! `bytes`, speaking to the `yamux` crate's side in both roles (the crate is kept as the reference
//! in the interop tests and the `mux_interop` fuzz target).
//!
//! Why not only the crate: per small request the crate costs a channel and a task wake-up to open
//! a stream (the connection has no handle, so opens go through its driver), a `futures` channel,
//! a `Vec` and a command per frame written, a zero-filled `Vec` per frame read, and a copy of every
//! received chunk out of that `Vec` (its `Packet` cannot be taken apart). Here:
//!
//! - **One lock per session, no channels.** [`Shared`] holds every stream's state and the bytes
//!   waiting to be written. A [`Stream`] writes by appending its frame (header and payload, one
//!   copy) to that buffer and waking the [`Driver`] only when the buffer was empty, so the frames
//!   of many streams leave in one write. [`Opener::open`] takes the next id under the lock and
//!   returns at once: the peer learns of the stream with its first frame (SYN), as the spec says.
//! - **Received bodies are `Bytes` views of the read buffer**: the driver reads into one buffer
//!   without zero-filling it, and a data frame's body is split off it, not copied. A [`Stream`]
//!   hands them out as they are ([`futures_util::Stream`] of `Bytes`) or copies into a caller's
//!   buffer (`AsyncRead`).
//! - **Reading never waits on writing.** The driver reads, dispatches and queues its answers
//!   (window updates, pongs) whether or not the socket takes writes just then, so two peers pushing
//!   data at each other cannot deadlock (rust-yamux #227).
//!
//! The protocol as the crate speaks it: 256 KiB initial windows; a window update once half the
//! window was read; a stream's window doubles when its reader took half of it within two round
//! trips (RTT from a ping every 10 s) and had to wait for data meanwhile, out of a session
//! budget ([`Config::max_connection_window`] minus 256 KiB per stream); at most 256 outbound
//! streams not yet acknowledged; frames for streams already gone are ignored (rust-yamux #110).
//! Where we differ: a stream over the limit is reset (RST) instead of ending the whole session,
//! and a window grows only for a reader that waited on the sender (the crate grows it for a
//! reader that never waits too, so a reader slower than the link gets ever larger buffers; see
//! [`Shared::consumed`]).

mod header;
mod stream;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

pub use header::{HEADER_LEN, Header, HeaderError, Kind, flags, go_away};
pub use stream::Stream;

/// A stream's window before any window update: 256 KiB, in both directions.
pub const INITIAL_WINDOW: u32 = 256 * 1024;
/// Outbound streams the peer has not acknowledged yet beyond which opening waits.
pub const MAX_ACK_BACKLOG: usize = 256;
/// Bytes queued for the socket beyond which streams' writes wait for the driver (control frames
/// are always queued).
const OUT_HIGH_WATER: usize = 256 * 1024;
/// Bytes waiting for the socket beyond which the driver stops reading (see `poll_rounds`).
const OUT_READ_LIMIT: usize = 4 * OUT_HIGH_WATER;
/// Room asked of the socket per read.
const READ_CHUNK: usize = 64 * 1024;
/// How often the round-trip time is measured.
const PING_INTERVAL: Duration = Duration::from_secs(10);
/// Rounds of reading and writing in one poll of the driver before it yields to other tasks.
const ROUNDS: usize = 32;

/// Which end of the connection this is: the client (who dialled) opens odd stream ids, the server
/// even ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Opens odd stream ids.
    Client,
    /// Opens even stream ids.
    Server,
}

/// Limits of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Most streams open at once, both directions together. The peer's streams over it are reset.
    pub max_streams: usize,
    /// Most bytes all receive windows may add up to: 256 KiB per stream, and what is above that
    /// is the budget windows grow into.
    pub max_connection_window: usize,
    /// Largest data frame sent; larger writes are split.
    pub split_send_size: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self { max_streams: 512, max_connection_window: 1024 * 1024 * 1024, split_send_size: 16 * 1024 }
    }
}

impl Config {
    fn growth_budget(&self) -> usize {
        self.max_connection_window.saturating_sub(self.max_streams.saturating_mul(INITIAL_WINDOW as usize))
    }
}

/// Why a connection failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MuxError {
    /// Reading or writing the underlying connection failed.
    #[error("multiplexer i/o")]
    Io(#[from] io::Error),
    /// The peer broke the protocol; it was sent a go-away with the protocol-error code.
    #[error("yamux protocol error: {0}")]
    Protocol(&'static str),
    /// A frame header that is not one.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// The peer ended the session with an error code.
    #[error("the peer went away with error code {0}")]
    GoneAway(u32),
    /// The connection is closed.
    #[error("connection closed")]
    Closed,
    /// Every stream id of our parity has been used.
    #[error("no more stream ids")]
    NoMoreStreamIds,
}

/// A hasher for stream ids: sequential integers, spread by a multiplication (hashbrown reads the
/// top bits).
#[derive(Debug, Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 << 8 | u64::from(byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, id: u32) {
        self.0 = u64::from(id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// One stream's state, kept in [`Shared`] while its [`Stream`] handle lives.
#[derive(Debug)]
struct Entry {
    /// Received bodies not yet read.
    recv: VecDeque<Bytes>,
    /// Their total length.
    buffered: usize,
    /// Credit the peer has left.
    recv_window: u32,
    /// What the window is topped up to.
    max_window: u32,
    /// When the last window update was sent (for window growth).
    last_update: Instant,
    /// The reader found nothing to read since the last window update: it waited on the
    /// sender, so the window (not the reader) may be what limits the stream.
    starved: bool,
    /// Credit we have left.
    send_window: u32,
    reader: Option<Waker>,
    writer: Option<Waker>,
    /// SYN (our stream, not yet announced) or ACK (theirs, not yet acknowledged) for the next
    /// frame we send on it; 0 once sent.
    flag: u16,
    /// Our stream, announced, not yet acknowledged (counts in [`Shared::unacked`]).
    awaiting_ack: bool,
    sent_fin: bool,
    got_fin: bool,
    reset: bool,
}

impl Entry {
    fn new(flag: u16, send_window: u32) -> Self {
        Self {
            recv: VecDeque::new(),
            buffered: 0,
            recv_window: INITIAL_WINDOW,
            max_window: INITIAL_WINDOW,
            last_update: Instant::now(),
            starved: false,
            send_window,
            reader: None,
            writer: None,
            flag,
            awaiting_ack: false,
            sent_fin: false,
            got_fin: false,
            reset: false,
        }
    }

    fn wake(&mut self) {
        if let Some(waker) = self.reader.take() {
            waker.wake();
        }
        if let Some(waker) = self.writer.take() {
            waker.wake();
        }
    }
}

/// Everything the driver and the stream handles share. See the module docs.
#[derive(Debug)]
struct Shared {
    mode: Mode,
    config: Config,
    streams: HashMap<u32, Entry, BuildHasherDefault<IdHasher>>,
    next_id: u32,
    /// Encoded frames waiting for the driver.
    out: BytesMut,
    /// Streams waiting for room in `out`.
    out_waiters: Vec<Waker>,
    driver: Option<Waker>,
    /// Opens waiting for the ACK backlog to shrink.
    open_waiters: Vec<Waker>,
    unacked: usize,
    /// Bytes of window growth handed out (above 256 KiB per stream).
    grown: usize,
    rtt: Option<Duration>,
    /// The peer sent a go-away (it takes no new streams), or our side is stopping.
    no_new_streams: bool,
    /// The connection has ended; nothing more is sent or received.
    closed: bool,
}

type SharedRef = Arc<Mutex<Shared>>;

fn lock(shared: &SharedRef) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn new(mode: Mode, config: Config) -> Self {
        Self {
            mode,
            config,
            streams: HashMap::default(),
            next_id: match mode {
                Mode::Client => 1,
                Mode::Server => 2,
            },
            out: BytesMut::new(),
            out_waiters: Vec::new(),
            driver: None,
            open_waiters: Vec::new(),
            unacked: 0,
            grown: 0,
            rtt: None,
            no_new_streams: false,
            closed: false,
        }
    }

    /// Queues a frame without a body.
    fn queue(&mut self, header: Header) {
        let was_empty = self.out.is_empty();
        header.encode(&mut self.out);
        if was_empty {
            self.wake_driver();
        }
    }

    fn wake_driver(&mut self) {
        if let Some(waker) = &self.driver {
            waker.wake_by_ref();
        }
    }

    /// Takes the flag a stream's next frame must carry.
    fn take_flag(&mut self, id: u32) -> u16 {
        let Some(entry) = self.streams.get_mut(&id) else {
            return 0;
        };
        let flag = std::mem::take(&mut entry.flag);
        if flag == flags::SYN {
            entry.awaiting_ack = true;
            self.unacked += 1;
        }
        flag
    }

    fn acknowledged(&mut self, id: u32) {
        if let Some(entry) = self.streams.get_mut(&id)
            && std::mem::take(&mut entry.awaiting_ack)
        {
            self.unacked -= 1;
            for waker in self.open_waiters.drain(..) {
                waker.wake();
            }
        }
    }

    fn is_ours(&self, id: u32) -> bool {
        match self.mode {
            Mode::Client => id % 2 == 1,
            Mode::Server => id != 0 && id.is_multiple_of(2),
        }
    }

    /// A stream of the application was read from: after half a window, the peer gets credit
    /// again (and more, when the reader keeps up with the round trip).
    fn consumed(&mut self, id: u32) {
        let growth_budget = self.config.growth_budget();
        let Self { streams, out, grown, rtt, driver, closed, .. } = self;
        let Some(entry) = streams.get_mut(&id) else {
            return;
        };
        if entry.got_fin || entry.reset || *closed {
            return;
        }
        let buffered = u32::try_from(entry.buffered).unwrap_or(u32::MAX);
        let mut delta = (entry.max_window - entry.recv_window).saturating_sub(buffered);
        if delta < entry.max_window / 2 {
            return;
        }
        // Growth is for a window the link cannot fill in a round trip: the reader took half of
        // it within two round trips *and* had to wait for data since the last update. A reader
        // that always found data waiting is the bottleneck itself (an upstream slower than the
        // tunnel), and a larger window would only buffer more here. The crate grows on the
        // first condition alone; with round trips measured through full socket queues
        // (milliseconds on loopback under load) every window then grew towards the session
        // budget, and an upload to an nginx upstream held 20 to 50 MB in the agent.
        let starved = std::mem::take(&mut entry.starved);
        if starved && rtt.is_some_and(|rtt| entry.last_update.elapsed() < rtt * 2) {
            let room = u32::try_from(growth_budget.saturating_sub(*grown)).unwrap_or(u32::MAX);
            let new_max = entry.max_window.saturating_mul(2).min(entry.max_window.saturating_add(room));
            *grown += (new_max - entry.max_window) as usize;
            entry.max_window = new_max;
            tracing::debug!(
                stream = id,
                window = new_max,
                rtt_us = rtt.map_or(0, |r| r.as_micros()),
                "stream window grows"
            );
            delta = (entry.max_window - entry.recv_window).saturating_sub(buffered);
        }
        entry.last_update = Instant::now();
        entry.recv_window += delta;
        let flag = std::mem::take(&mut entry.flag);
        let was_empty = out.is_empty();
        Header::new(Kind::WindowUpdate, flag, id, delta).encode(out);
        if was_empty && let Some(waker) = driver {
            waker.wake_by_ref();
        }
    }

    /// The handle of stream `id` is gone: its state goes, and the peer is told (RST) unless both
    /// sides had finished.
    fn release(&mut self, id: u32) {
        let Some(entry) = self.streams.remove(&id) else {
            return;
        };
        self.grown -= (entry.max_window - INITIAL_WINDOW) as usize;
        if entry.awaiting_ack {
            self.unacked -= 1;
            for waker in self.open_waiters.drain(..) {
                waker.wake();
            }
        }
        // A stream never announced (SYN still pending) is unknown to the peer.
        let finished = entry.sent_fin && entry.got_fin;
        if !self.closed && !entry.reset && !finished && entry.flag != flags::SYN {
            self.queue(Header::new(Kind::Data, flags::RST, id, 0));
        }
    }

    /// The connection ended: every waiting task learns it.
    fn close(&mut self) {
        self.closed = true;
        for entry in self.streams.values_mut() {
            entry.wake();
        }
        for waker in self.open_waiters.drain(..).chain(self.out_waiters.drain(..)) {
            waker.wake();
        }
        self.out.clear();
    }

    /// Applies one received frame (its body, for data, already split off). A new inbound stream
    /// is returned for the owner.
    fn on_frame(
        &mut self,
        header: Header,
        body: Bytes,
        shared: &SharedRef,
    ) -> Result<Option<Stream>, MuxError> {
        match header.kind {
            Kind::Data | Kind::WindowUpdate => {
                if header.stream == 0 {
                    return Err(MuxError::Protocol("stream frame on the session id"));
                }
                if header.has(flags::RST) {
                    self.acknowledged(header.stream);
                    if let Some(entry) = self.streams.get_mut(&header.stream) {
                        entry.reset = true;
                        entry.wake();
                    }
                    return Ok(None);
                }
                if header.has(flags::SYN) {
                    return self.on_open(header, body, shared);
                }
                if header.has(flags::ACK) {
                    self.acknowledged(header.stream);
                }
                let Some(entry) = self.streams.get_mut(&header.stream) else {
                    // Gone already (we dropped it while its frames were on their way).
                    return Ok(None);
                };
                if header.kind == Kind::Data {
                    let len = body.len() as u32;
                    if len > entry.recv_window {
                        return Err(MuxError::Protocol("data beyond the stream's window"));
                    }
                    entry.recv_window -= len;
                    if !body.is_empty() && !entry.reset {
                        entry.buffered += body.len();
                        entry.recv.push_back(body);
                    }
                } else {
                    entry.send_window = entry
                        .send_window
                        .checked_add(header.length)
                        .ok_or(MuxError::Protocol("window update past 4 GiB"))?;
                }
                if header.has(flags::FIN) {
                    entry.got_fin = true;
                }
                entry.wake();
                Ok(None)
            }
            Kind::Ping => {
                if header.has(flags::ACK) {
                    return Ok(None);
                }
                if header.stream == 0 || self.streams.contains_key(&header.stream) {
                    self.queue(Header::new(Kind::Ping, flags::ACK, header.stream, header.length));
                }
                Ok(None)
            }
            Kind::GoAway => {
                if header.length != go_away::NORMAL {
                    return Err(MuxError::GoneAway(header.length));
                }
                self.no_new_streams = true;
                for waker in self.open_waiters.drain(..) {
                    waker.wake();
                }
                Ok(None)
            }
        }
    }

    fn on_open(
        &mut self,
        header: Header,
        body: Bytes,
        shared: &SharedRef,
    ) -> Result<Option<Stream>, MuxError> {
        let id = header.stream;
        if self.is_ours(id) {
            return Err(MuxError::Protocol("the peer opened a stream with our parity"));
        }
        if self.streams.contains_key(&id) {
            return Err(MuxError::Protocol("the peer opened a stream that is open"));
        }
        if self.streams.len() >= self.config.max_streams {
            // Over the limit: this stream is refused, the session goes on.
            self.queue(Header::new(Kind::Data, flags::RST, id, 0));
            return Ok(None);
        }
        let mut entry = Entry::new(flags::ACK, INITIAL_WINDOW);
        if header.kind == Kind::Data {
            entry.recv_window = INITIAL_WINDOW
                .checked_sub(body.len() as u32)
                .ok_or(MuxError::Protocol("a stream's first data beyond its window"))?;
            if !body.is_empty() {
                entry.buffered = body.len();
                entry.recv.push_back(body);
            }
        } else {
            entry.send_window = INITIAL_WINDOW
                .checked_add(header.length)
                .ok_or(MuxError::Protocol("window update past 4 GiB"))?;
        }
        entry.got_fin = header.has(flags::FIN);
        self.streams.insert(id, entry);
        Ok(Some(Stream::new(id, Arc::clone(shared))))
    }
}

/// Opens streams; cheap to clone. See the module docs.
#[derive(Debug, Clone)]
pub struct Opener {
    shared: SharedRef,
}

impl Opener {
    /// Opens a stream. It waits only while [`MAX_ACK_BACKLOG`] of our streams are not yet
    /// acknowledged.
    ///
    /// # Errors
    /// [`MuxError::Closed`] when the connection ended or the peer went away;
    /// [`MuxError::NoMoreStreamIds`] when the ids of our parity are used up.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn open(&self) -> Result<Stream, MuxError> {
        std::future::poll_fn(|cx| self.poll_open(cx)).await
    }

    /// Polls for a new stream; see [`Opener::open`].
    pub fn poll_open(&self, cx: &mut Context<'_>) -> Poll<Result<Stream, MuxError>> {
        let mut shared = lock(&self.shared);
        if shared.closed || shared.no_new_streams {
            return Poll::Ready(Err(MuxError::Closed));
        }
        if shared.unacked >= MAX_ACK_BACKLOG {
            shared.open_waiters.push(cx.waker().clone());
            return Poll::Pending;
        }
        let id = shared.next_id;
        if id > u32::MAX - 2 {
            return Poll::Ready(Err(MuxError::NoMoreStreamIds));
        }
        shared.next_id += 2;
        shared.streams.insert(id, Entry::new(flags::SYN, INITIAL_WINDOW));
        Poll::Ready(Ok(Stream::new(id, Arc::clone(&self.shared))))
    }

    /// Streams open on the connection, both directions.
    pub fn streams(&self) -> usize {
        lock(&self.shared).streams.len()
    }

    /// Whether the connection has ended (or takes no new streams).
    pub fn is_closed(&self) -> bool {
        let shared = lock(&self.shared);
        shared.closed || shared.no_new_streams
    }
}

/// Owns the connection's I/O: reads and dispatches frames, writes what the streams queued. It
/// makes progress only while polled ([`Driver::poll_drive`]); dropping it ends the connection for
/// every stream at once.
pub struct Driver<T> {
    io: T,
    shared: SharedRef,
    /// Bytes read and not yet dispatched.
    rbuf: BytesMut,
    /// Bytes taken from [`Shared::out`], being written.
    wbuf: BytesMut,
    /// Written since the last flush.
    unflushed: bool,
    /// Body bytes of a frame for a stream that is gone, still to be skipped.
    skip: usize,
    /// When to measure the round-trip time next, and the ping in flight.
    next_ping: Pin<Box<tokio::time::Sleep>>,
    ping: Option<(u32, Instant)>,
    nonce: u32,
    /// Inbound streams found while the lock was held, handed out after.
    inbound: Vec<Stream>,
    done: bool,
    /// The peer has sent a frame.
    heard: bool,
}

impl<T> std::fmt::Debug for Driver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").field("done", &self.done).finish_non_exhaustive()
    }
}

/// Creates both halves of a connection over `io`.
pub fn connection<T>(io: T, mode: Mode, config: Config) -> (Driver<T>, Opener)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let shared = Arc::new(Mutex::new(Shared::new(mode, config)));
    let driver = Driver {
        io,
        shared: Arc::clone(&shared),
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        unflushed: false,
        skip: 0,
        next_ping: Box::pin(tokio::time::sleep(Duration::ZERO)),
        ping: None,
        nonce: 0,
        inbound: Vec::new(),
        done: false,
        heard: false,
    };
    (driver, Opener { shared })
}

impl<T> Driver<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    /// Drives the connection: `Ready(Ok)` when the peer closed it, `Ready(Err)` when it failed,
    /// and every inbound stream passed to `on_inbound` on the way. After `Ready`, the connection
    /// is over for every stream.
    ///
    /// # Errors
    /// See [`MuxError`]; a protocol error is answered with a go-away first.
    pub fn poll_drive(
        &mut self,
        cx: &mut Context<'_>,
        on_inbound: &mut impl FnMut(Stream),
    ) -> Poll<Result<(), MuxError>> {
        if self.done {
            return Poll::Ready(Err(MuxError::Closed));
        }
        {
            let mut shared = lock(&self.shared);
            if !shared.driver.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                shared.driver = Some(cx.waker().clone());
            }
        }
        match self.poll_rounds(cx, on_inbound) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                if let Err(MuxError::Protocol(_) | MuxError::Header(_)) = &result {
                    self.go_away(cx, go_away::PROTOCOL_ERROR);
                }
                self.finish();
                Poll::Ready(result)
            }
        }
    }

    fn poll_rounds(
        &mut self,
        cx: &mut Context<'_>,
        on_inbound: &mut impl FnMut(Stream),
    ) -> Poll<Result<(), MuxError>> {
        for _ in 0..ROUNDS {
            self.poll_ping(cx);
            // Writing first: a write (or flush) the socket cannot take yet makes `WsIo` read
            // ahead, taking the socket's readiness with it; the read that follows then finds
            // those bytes. Read last, a round that ends `Pending` has registered for both.
            let wrote = self.poll_write_out(cx)?;
            // What reading queues (pongs, window updates, resets) is bounded by what the socket
            // takes: a peer that floods pings and reads nothing stops being read, instead of
            // growing our out buffer without end. The write above waits on the socket and wakes
            // us when it takes more.
            let backlog = self.wbuf.len() + lock(&self.shared).out.len();
            let read = if backlog > OUT_READ_LIMIT { Poll::Pending } else { self.poll_read_frames(cx)? };
            for stream in self.inbound.drain(..) {
                on_inbound(stream);
            }
            match read {
                Poll::Ready(true) => {}
                Poll::Ready(false) => return Poll::Ready(Ok(())),
                Poll::Pending if !wrote => return Poll::Pending,
                Poll::Pending => {}
            }
        }
        // More to do: let other tasks run first.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Measures the round trip every [`PING_INTERVAL`], from the first frame the peer sent on:
    /// before that, the peer may still be reading its handshake with another reader (ferry's
    /// handshake is lock-step, and the agent sends first), which would swallow our frame. A
    /// ping never answered is replaced at the next interval.
    fn poll_ping(&mut self, cx: &mut Context<'_>) {
        if !self.heard || self.next_ping.as_mut().poll(cx).is_pending() {
            return;
        }
        self.next_ping.as_mut().reset(tokio::time::Instant::now() + PING_INTERVAL);
        if self.ping.is_none_or(|(_, sent)| sent.elapsed() >= PING_INTERVAL) {
            self.nonce = self.nonce.wrapping_add(1);
            self.ping = Some((self.nonce, Instant::now()));
            lock(&self.shared).queue(Header::new(Kind::Ping, flags::SYN, 0, self.nonce));
        }
    }

    /// Reads once and dispatches every whole frame: `Ready(true)` when bytes came, `Ready(false)`
    /// at the end of the input.
    fn poll_read_frames(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, MuxError>> {
        // Room for the rest of the frame being read, and at least a few frames' worth; bodies
        // handed out keep their part of an old buffer alive, so a new one is taken then.
        let missing = self.needed().saturating_sub(self.rbuf.len());
        if self.rbuf.capacity() - self.rbuf.len() < missing.max(4096) {
            self.rbuf.reserve(missing.max(READ_CHUNK));
        }
        let n = match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(result) => result?,
        };
        if n == 0 {
            if self.rbuf.is_empty() && self.skip == 0 {
                return Poll::Ready(Ok(false));
            }
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection ended inside a frame",
            )
            .into()));
        }
        self.dispatch()?;
        Poll::Ready(Ok(true))
    }

    /// Bytes the next frame still needs in the read buffer.
    fn needed(&self) -> usize {
        if self.skip > 0 {
            return 0;
        }
        if self.rbuf.len() < HEADER_LEN {
            return HEADER_LEN;
        }
        match header_of(&self.rbuf) {
            Ok(header) if header.kind == Kind::Data => HEADER_LEN + header.length as usize,
            _ => HEADER_LEN,
        }
    }

    fn dispatch(&mut self) -> Result<(), MuxError> {
        let mut shared = lock(&self.shared);
        loop {
            if self.skip > 0 {
                let n = self.skip.min(self.rbuf.len());
                self.rbuf.advance(n);
                self.skip -= n;
                if self.skip > 0 {
                    return Ok(());
                }
            }
            if self.rbuf.len() < HEADER_LEN {
                return Ok(());
            }
            let header = header_of(&self.rbuf)?;
            self.heard = true;
            let body = if header.kind == Kind::Data {
                let len = header.length as usize;
                if !header.has(flags::SYN)
                    && !header.has(flags::RST)
                    && !shared.streams.contains_key(&header.stream)
                {
                    // For a stream that is gone: skipped as it arrives, never buffered whole.
                    self.rbuf.advance(HEADER_LEN);
                    self.skip = len;
                    continue;
                }
                let limit = shared.streams.get(&header.stream).map_or(INITIAL_WINDOW, |e| e.recv_window);
                if header.length > limit {
                    return Err(MuxError::Protocol("data beyond the stream's window"));
                }
                if self.rbuf.len() < HEADER_LEN + len {
                    return Ok(());
                }
                self.rbuf.advance(HEADER_LEN);
                self.rbuf.split_to(len).freeze()
            } else {
                self.rbuf.advance(HEADER_LEN);
                Bytes::new()
            };
            if header.kind == Kind::Ping && header.has(flags::ACK) {
                if let Some((nonce, sent)) = self.ping
                    && nonce == header.length
                {
                    shared.rtt = Some(sent.elapsed());
                    self.ping = None;
                }
                continue;
            }
            if let Some(stream) = shared.on_frame(header, body, &self.shared)? {
                self.inbound.push(stream);
            }
        }
    }

    /// Writes what the streams queued: `true` when anything was written.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Result<bool, MuxError> {
        let mut wrote = false;
        loop {
            if self.wbuf.is_empty() {
                let mut shared = lock(&self.shared);
                std::mem::swap(&mut self.wbuf, &mut shared.out);
                for waker in shared.out_waiters.drain(..) {
                    waker.wake();
                }
            }
            if self.wbuf.is_empty() {
                if self.unflushed {
                    match Pin::new(&mut self.io).poll_flush(cx) {
                        Poll::Ready(result) => {
                            result?;
                            self.unflushed = false;
                        }
                        Poll::Pending => {}
                    }
                }
                return Ok(wrote);
            }
            match Pin::new(&mut self.io).poll_write(cx, &self.wbuf) {
                Poll::Ready(Ok(0)) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Poll::Ready(Ok(n)) => {
                    self.wbuf.advance(n);
                    self.unflushed = true;
                    wrote = true;
                }
                Poll::Ready(Err(err)) => return Err(err.into()),
                Poll::Pending => return Ok(wrote),
            }
        }
    }

    /// From now on, [`Opener::open`] fails: the connection is about to end. (Streams already
    /// open go on.)
    pub fn stop_opening(&mut self) {
        let mut shared = lock(&self.shared);
        shared.no_new_streams = true;
        for waker in shared.open_waiters.drain(..) {
            waker.wake();
        }
    }

    /// Best effort: tells the peer why the connection ends (one write attempt, no waiting).
    fn go_away(&mut self, cx: &mut Context<'_>, code: u32) {
        let mut frame = BytesMut::with_capacity(HEADER_LEN);
        Header::new(Kind::GoAway, 0, 0, code).encode(&mut frame);
        if self.wbuf.is_empty() {
            let _ = Pin::new(&mut self.io).poll_write(cx, &frame);
            let _ = Pin::new(&mut self.io).poll_flush(cx);
        }
    }

    fn finish(&mut self) {
        self.done = true;
        lock(&self.shared).close();
    }
}

impl<T> Drop for Driver<T> {
    fn drop(&mut self) {
        lock(&self.shared).close();
    }
}

fn header_of(buf: &[u8]) -> Result<Header, HeaderError> {
    let mut bytes = [0; HEADER_LEN];
    bytes.copy_from_slice(&buf[..HEADER_LEN]);
    Header::decode(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The window update queued after the reader of stream 2 took half its window, if any.
    fn update_after_half_read(rtt: Option<Duration>, config: Config) -> (Option<Header>, usize) {
        let mut shared = Shared::new(Mode::Client, config);
        shared.rtt = rtt;
        let mut entry = Entry::new(flags::ACK, INITIAL_WINDOW);
        entry.recv_window -= INITIAL_WINDOW / 2;
        // The reader waited for data since the last update.
        entry.starved = true;
        shared.streams.insert(2, entry);
        shared.consumed(2);
        let header = (shared.out.len() >= HEADER_LEN).then(|| header_of(&shared.out).unwrap());
        (header, shared.grown)
    }

    #[test]
    fn a_window_grows_when_its_reader_keeps_up_with_the_round_trip_and_the_budget_allows() {
        // No round trip measured yet: the half read is credited back, no more.
        let (update, grown) = update_after_half_read(None, Config::default());
        assert_eq!(update, Some(Header::new(Kind::WindowUpdate, flags::ACK, 2, INITIAL_WINDOW / 2)));
        assert_eq!(grown, 0);
        // Half a window read within two round trips: the window doubles.
        let long = Some(Duration::from_secs(3600));
        let (update, grown) = update_after_half_read(long, Config::default());
        let doubled = INITIAL_WINDOW / 2 + INITIAL_WINDOW;
        assert_eq!(update, Some(Header::new(Kind::WindowUpdate, flags::ACK, 2, doubled)));
        assert_eq!(grown, INITIAL_WINDOW as usize);
        // The session's budget is spent (256 KiB per stream and nothing above): no growth.
        let tight = Config { max_connection_window: 512 * INITIAL_WINDOW as usize, ..Config::default() };
        let (update, grown) = update_after_half_read(long, tight);
        assert_eq!(update, Some(Header::new(Kind::WindowUpdate, flags::ACK, 2, INITIAL_WINDOW / 2)));
        assert_eq!(grown, 0);
    }

    #[test]
    fn a_window_whose_reader_never_waited_does_not_grow() {
        // The reader took half the window quickly, but never had to wait for data: the sender
        // is ahead of the reader, and a larger window would only buffer more.
        let mut shared = Shared::new(Mode::Client, Config::default());
        shared.rtt = Some(Duration::from_secs(3600));
        let mut entry = Entry::new(flags::ACK, INITIAL_WINDOW);
        entry.recv_window -= INITIAL_WINDOW / 2 + 1024;
        entry.buffered = 1024;
        entry.starved = false;
        shared.streams.insert(2, entry);
        shared.consumed(2);
        let update = header_of(&shared.out).ok();
        assert_eq!(update, Some(Header::new(Kind::WindowUpdate, flags::ACK, 2, INITIAL_WINDOW / 2)));
        assert_eq!(shared.grown, 0);
    }

    #[test]
    fn less_than_half_a_window_read_sends_no_update() {
        let mut shared = Shared::new(Mode::Server, Config::default());
        let mut entry = Entry::new(0, INITIAL_WINDOW);
        entry.recv_window -= INITIAL_WINDOW / 2 - 1;
        shared.streams.insert(1, entry);
        shared.consumed(1);
        assert!(shared.out.is_empty());
    }

    #[test]
    fn a_dropped_stream_is_reset_unless_both_sides_finished_or_the_peer_never_heard_of_it() {
        for (sent_fin, got_fin, flag, reset) in [
            (false, false, 0, true),
            (true, false, 0, true),
            (true, true, 0, false),
            (false, false, flags::SYN, false),
        ] {
            let mut shared = Shared::new(Mode::Client, Config::default());
            let mut entry = Entry::new(flag, INITIAL_WINDOW);
            (entry.sent_fin, entry.got_fin) = (sent_fin, got_fin);
            shared.streams.insert(1, entry);
            shared.release(1);
            assert!(shared.streams.is_empty());
            let expected = reset.then(|| Header::new(Kind::Data, flags::RST, 1, 0));
            let queued = (shared.out.len() >= HEADER_LEN).then(|| header_of(&shared.out).unwrap());
            assert_eq!(queued, expected, "sent_fin {sent_fin} got_fin {got_fin} flag {flag}");
        }
    }
}
