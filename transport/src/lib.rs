//! Async I/O shared by the ferry gateway and agent.
//!
//! ```text
//! gateway                                                        agent
//! hyper body ─ send_body ─ FrameWriter ─┐                  ┌─ FrameReader ─ FrameBody ─ hyper client
//!                                       yamux ═ WsIo ═ WebSocket ═ WsIo ═ yamux
//! hyper resp ─ FrameBody ─ FrameReader ─┘                  └─ FrameWriter ─ send_body ─ upstream body
//! ```
//!
//! # Layout
//!
//! - [`ws`] — [`WsIo`]: a WebSocket as a byte stream for yamux (binary messages, coalesced writes,
//!   bounded buffers), and the handshake-message helpers.
//! - [`session`] — one ferry session, the type both sides run: [`session::start`] gives the cheap
//!   [`Session`] handle and the [`SessionTask`] that owns the I/O, and holds the rule that the agent
//!   opens the control stream first and no other stream.
//! - [`mux`] — the session's multiplexer layer: the driver (one task owns the connection) and
//!   [`StreamOpener`], the cloneable handle through which many tasks open streams.
//! - [`multiplex`] — ferry's own implementation of the yamux protocol under it (one lock per
//!   session, no channels, received bodies as `Bytes` views); the `yamux` crate is its reference
//!   in the interop tests and a fuzz target.
//! - [`control`] — the control stream: heartbeats both ways, RTT, go-away and drain messages.
//! - [`stream`] — [`FrameReader`] / [`FrameWriter`]: ferry frames on one multiplexed stream.
//! - [`body`] — [`FrameBody`] (frames in, `http_body::Body` out) and [`send_body`] (the reverse),
//!   both driven by their consumer so backpressure runs end to end.
//! - [`heads`] — conversions between `http` types and codec heads, and hop-by-hop header removal.
//! - [`error`] — [`TransportError`].
//! - [`stats`] — bytes our code copies, counted per thread (for the counts bench).
//! - [`cli`] — what both binaries' `main` share: config files as flags, secrets from a file or the
//!   environment, signals. It has no tie to the data path; it is here because this is the one
//!   crate both binaries depend on.
#![forbid(unsafe_code)]
#![warn(clippy::unwrap_used)]

pub mod body;
pub mod cli;
pub mod control;
pub mod error;
pub mod h1;
pub mod h1_server;
pub mod heads;
pub mod multiplex;
pub mod mux;
pub mod session;
pub mod stats;
pub mod stream;
pub mod ws;

pub use body::{BodyError, FrameBody, send_body};
pub use error::TransportError;
pub use mux::{SessionConfig, SessionDriver, StreamOpener, StreamSlot};
pub use session::{Ended, Role, Session, SessionTask};
pub use stream::{FrameReader, FrameWriter, TunnelStream};
pub use ws::{IoCounters, WsIo};

/// How many threads a binary runs on: `auto` (what [`std::thread::available_parallelism`] says
/// this process may use, which honours CPU affinity and cgroup quotas) or a number of at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// One per core this process may use.
    Auto,
    /// Exactly this many.
    Count(std::num::NonZeroUsize),
}

impl Threads {
    /// The number of threads: `Auto` resolved now (1 when the system cannot tell).
    pub fn get(self) -> usize {
        match self {
            Self::Auto => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            Self::Count(n) => n.get(),
        }
    }
}

impl std::str::FromStr for Threads {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text.eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        text.parse()
            .map(Self::Count)
            .map_err(|_| format!("{text:?} is not `auto` or a number of threads of at least 1"))
    }
}

impl std::fmt::Display for Threads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Count(n) => write!(f, "{n}"),
        }
    }
}

/// The tokio runtime the agent runs on (the gateway runs one current-thread runtime per thread,
/// see its `Shards`): the current-thread flavour for one thread (no cross-thread wake-ups, the
/// cheapest per request), else a multi-thread runtime with that many workers.
///
/// # Errors
/// The runtime could not be created (out of threads or file descriptors).
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    }
}

#[cfg(test)]
mod tests {
    use super::Threads;

    #[test]
    fn threads_parse_auto_or_a_positive_count() {
        assert_eq!("auto".parse::<Threads>(), Ok(Threads::Auto));
        assert_eq!("AUTO".parse::<Threads>(), Ok(Threads::Auto));
        assert_eq!("3".parse::<Threads>().map(Threads::get), Ok(3));
        assert_eq!(Threads::Auto.to_string(), "auto");
        assert!(Threads::Auto.get() >= 1);
        for bad in ["0", "-1", "", "two", "1.5"] {
            let err = bad.parse::<Threads>().unwrap_err();
            assert!(err.contains("auto") && err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
    }
}
