//! What the agent is doing, as a console shows it: whether the tunnel is up, its public URLs,
//! the inspector's address, requests and errors so far, requests in flight, the last round trip
//! to the gateway. The agent writes it as things happen; a reader takes a [`Snapshot`].

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_transport::control::ControlHandle;

/// Where the tunnel is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not up yet.
    Connecting,
    /// At least one session is up.
    Up,
    /// Was up; every session is gone, and the agent is dialling again.
    Reconnecting,
}

/// The agent's state, shared with whoever shows it.
#[derive(Debug)]
pub struct Status {
    inner: Mutex<Inner>,
    requests: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicUsize,
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    since: Instant,
    sessions: usize,
    last_error: Option<String>,
    public_urls: Vec<String>,
    inspector: Option<String>,
    /// The first session's control stream: its last measured round trip.
    control: Option<ControlHandle>,
}

/// The state at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Where the tunnel is.
    pub phase: Phase,
    /// How long it has been there.
    pub for_: Duration,
    /// Sessions up now.
    pub sessions: usize,
    /// Why the last connection attempt or session failed.
    pub last_error: Option<String>,
    /// The tunnel's public URLs, as the gateway named them.
    pub public_urls: Vec<String>,
    /// The inspector's page.
    pub inspector: Option<String>,
    /// Requests received so far.
    pub requests: u64,
    /// Requests the agent could not serve (the upstream unreachable, slow or cut off; refused by
    /// the agent's own rules).
    pub errors: u64,
    /// Requests being served now.
    pub in_flight: usize,
    /// The last round trip to the gateway (heartbeat).
    pub rtt: Option<Duration>,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                phase: Phase::Connecting,
                since: Instant::now(),
                sessions: 0,
                last_error: None,
                public_urls: Vec::new(),
                inspector: None,
                control: None,
            }),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }
}

impl Status {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the inspector's page is.
    pub fn set_inspector(&self, url: String) {
        self.inner().inspector = Some(url);
    }

    pub(crate) fn session_up(&self, public_urls: &[String]) {
        let mut inner = self.inner();
        inner.sessions += 1;
        if inner.phase != Phase::Up {
            inner.phase = Phase::Up;
            inner.since = Instant::now();
        }
        if !public_urls.is_empty() {
            inner.public_urls = public_urls.to_vec();
        }
    }

    pub(crate) fn set_control(&self, control: &ControlHandle) {
        let mut inner = self.inner();
        if inner.control.as_ref().is_none_or(|c| c.rtt().is_none()) {
            inner.control = Some(control.clone());
        }
    }

    pub(crate) fn session_down(&self, why: Option<String>) {
        let mut inner = self.inner();
        inner.sessions = inner.sessions.saturating_sub(1);
        if why.is_some() {
            inner.last_error = why;
        }
        if inner.sessions == 0 {
            inner.phase = Phase::Reconnecting;
            inner.since = Instant::now();
            inner.control = None;
        }
    }

    pub(crate) fn attempt_failed(&self, why: String) {
        self.inner().last_error = Some(why);
    }

    pub(crate) fn request_started(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn request_ended(&self, failed: bool) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The state now.
    pub fn snapshot(&self) -> Snapshot {
        let inner = self.inner();
        Snapshot {
            phase: inner.phase,
            for_: inner.since.elapsed(),
            sessions: inner.sessions,
            last_error: inner.last_error.clone(),
            public_urls: inner.public_urls.clone(),
            inspector: inner.inspector.clone(),
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            rtt: inner.control.as_ref().and_then(ControlHandle::rtt),
        }
    }
}
