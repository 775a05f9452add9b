//! What the requests of one public connection tell the task serving it: whether a request head
//! arrived (the head deadline), and whether its response bodies are waiting on the client (the
//! send-idle deadline). The server checks; the bodies in `proxy` report.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// What the requests of one public connection tell the task serving it.
#[derive(Debug)]
pub(crate) struct ConnWatch {
    /// A request head arrived: the connection met its head deadline.
    pub(crate) seen_request: AtomicBool,
    /// Response bodies on this connection (several with HTTP/2), for the send-idle check.
    bodies: Mutex<Vec<Weak<SendClock>>>,
    /// The connection's server times its own writes (the HTTP/1.1 server does): response
    /// bodies then need no clock of their own.
    writes_timed: AtomicBool,
    started: Instant,
}

/// When a response last handed its server data that the server has not come back for: the
/// client has not taken it yet. (The HTTP/1.1 server keeps one for its own writes as well.)
#[derive(Debug)]
pub(crate) struct SendClock {
    started: Instant,
    /// Milliseconds after `started`, plus one; 0 while the server is not owing us a poll.
    waiting_since: AtomicU64,
}

impl SendClock {
    /// The server took what we gave it and asks for more.
    pub(crate) fn polled(&self) {
        self.waiting_since.store(0, Ordering::Relaxed);
    }

    /// We gave the server data; until it polls again, the client owes us progress.
    pub(crate) fn handed_over(&self) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.waiting_since.store(now + 1, Ordering::Relaxed);
    }
}

/// Dead weak references are pruned when this many have gathered.
const PRUNE_AT: usize = 32;

impl ConnWatch {
    pub(crate) fn new() -> Self {
        Self {
            seen_request: AtomicBool::new(false),
            bodies: Mutex::default(),
            writes_timed: AtomicBool::new(false),
            started: Instant::now(),
        }
    }

    /// Called for every request head.
    pub(crate) fn request(&self) {
        if !self.seen_request.load(Ordering::Relaxed) {
            self.seen_request.store(true, Ordering::Relaxed);
        }
    }

    /// The clock of a server that times its own writes: every response on the connection goes
    /// through it, so bodies need none ([`ConnWatch::body_clock`]).
    pub(crate) fn writes_clock(&self) -> Arc<SendClock> {
        self.writes_timed.store(true, Ordering::Relaxed);
        self.clock()
    }

    /// A clock for a new response body on this connection, unless its server times its writes.
    pub(crate) fn body_clock(&self) -> Option<Arc<SendClock>> {
        (!self.writes_timed.load(Ordering::Relaxed)).then(|| self.clock())
    }

    /// A clock for a new response body on this connection.
    fn clock(&self) -> Arc<SendClock> {
        let clock = Arc::new(SendClock { started: self.started, waiting_since: AtomicU64::new(0) });
        let mut bodies = self.bodies.lock().unwrap_or_else(|e| e.into_inner());
        if bodies.len() >= PRUNE_AT {
            bodies.retain(|body| body.strong_count() > 0);
        }
        bodies.push(Arc::downgrade(&clock));
        clock
    }

    /// Whether a body has waited on the client for `idle` or longer.
    pub(crate) fn stalled(&self, idle: Duration) -> bool {
        let now = self.started.elapsed().as_millis();
        let idle = idle.as_millis();
        let mut bodies = self.bodies.lock().unwrap_or_else(|e| e.into_inner());
        bodies.retain(|body| body.strong_count() > 0);
        bodies.iter().filter_map(Weak::upgrade).any(|clock| {
            let since = u128::from(clock.waiting_since.load(Ordering::Relaxed));
            since > 0 && now + 1 >= since + idle
        })
    }
}
