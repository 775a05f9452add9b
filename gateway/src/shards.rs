//! A gateway on several threads: each thread has a current-thread runtime and a listener of its
//! own, all bound to the same address with `SO_REUSEPORT`, so the kernel spreads new connections
//! over them. A connection, its requests, and the agent session it may carry stay on the thread
//! that accepted it; threads share only the [`Gateway`] (registry, limits, metrics, trackers).
//!
//! This is the shape of nginx's workers with `reuseport`, chosen over tokio's multi-thread
//! runtime: a work-stealing scheduler wakes idle workers to look for work whenever a task is
//! woken, and on a loaded box those wake-ups and the tasks that move between threads cost more
//! than the second core gives back (see the README's Performance section). Here a thread is woken
//! from another only where a request meets a session that lives on another thread, through the
//! session's stream handles.
//!
//! Which thread a connection lands on is the kernel's choice, and the session its requests go to
//! may live on another; each request would then wake the session's thread and be woken back
//! several times (opening the stream, its head, the response, the stream's end). So before a
//! plain HTTP/1 connection is served, its first request head is peeked at (read without
//! consuming it): when it goes to a tunnel whose session lives on another thread, the connection
//! is handed to that thread ([`Handover`]), which serves it from its first byte. Later requests
//! on the connection usually go to the same tunnel. TLS and HTTP/2 connections, heads that are
//! not complete in the first read, and requests for no tunnel are served where they landed. An
//! agent's connection is handed the same way to the thread with the fewest sessions, so tunnels
//! spread evenly over the threads.
//!
//! The first listener is served by the caller ([`Gateway::serve`], on the main thread, which
//! also handles signals and runs the drain); [`Gateway::spawn_shards`] runs the others.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::error;

use crate::Gateway;
use crate::limits::AddressSlot;
use crate::routes::{Route, normalize_host, route};
use crate::server::accept_loop;

/// Largest request head looked at to place a connection; a longer one is served where it landed.
const PEEK_BYTES: usize = 4096;
/// Header fields parsed to find `Host`.
const PEEK_HEADERS: usize = 64;

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// The gateway thread this runs on: 0 on the main thread (and outside a gateway).
pub(crate) fn current() -> usize {
    SHARD.with(Cell::get)
}

/// What other threads know of one gateway thread.
#[derive(Debug)]
pub(crate) struct Inbox {
    /// Connections handed to it.
    tx: mpsc::UnboundedSender<Handover>,
    /// Agent sessions it runs.
    sessions: AtomicUsize,
}

/// Counts a session against the thread it runs on while it lives (see [`count_session`]).
#[derive(Debug)]
pub(crate) struct SessionCount<'a>(&'a AtomicUsize);

impl Drop for SessionCount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts the session about to run on this thread, so the next agent that connects is placed
/// on the thread with the fewest. `None` when the gateway runs on one thread.
pub(crate) fn count_session(gateway: &Gateway) -> Option<SessionCount<'_>> {
    let inbox = gateway.inboxes.get()?.get(current())?;
    inbox.sessions.fetch_add(1, Ordering::Relaxed);
    Some(SessionCount(&inbox.sessions))
}

/// A connection on its way to the thread of the session its first request goes to.
#[derive(Debug)]
pub(crate) struct Handover {
    pub(crate) socket: std::net::TcpStream,
    pub(crate) peer: SocketAddr,
    pub(crate) slots: (OwnedSemaphorePermit, AddressSlot),
    pub(crate) accepted: Instant,
    /// Holds the drain open while the connection is between threads.
    pub(crate) _tracked: TaskTrackerToken,
}

/// The thread whose session the first request on `socket` goes to, when that is not this one.
/// Waits (up to `deadline`, or the shutdown) for the client's first bytes and reads them without
/// consuming them; `None` (serve it here) for anything but a complete HTTP/1 head for a tunnel
/// with a live session on another thread.
pub(crate) async fn home_of(
    gateway: &Gateway,
    socket: &TcpStream,
    deadline: tokio::time::Instant,
) -> Option<usize> {
    gateway.inboxes.get()?;
    // On the heap: a buffer in this future would make every connection's task that much bigger.
    let mut head = vec![0; PEEK_BYTES];
    let n = tokio::select! {
        peeked = tokio::time::timeout_at(deadline, socket.peek(&mut head)) => peeked.ok()?.ok()?,
        () = gateway.shutdown.cancelled() => return None,
    };
    let shard = session_shard(gateway, &head[..n])?;
    (shard != current()).then_some(shard)
}

/// The thread of the session a request head (as the client sent it) goes to; for an agent that
/// connects, the thread with the fewest sessions (this one among equals).
fn session_shard(gateway: &Gateway, head: &[u8]) -> Option<usize> {
    let mut headers = [httparse::EMPTY_HEADER; PEEK_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    if !request.parse(head).ok()?.is_complete() {
        return None;
    }
    let host = request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("host"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(normalize_host);
    match route(gateway.config.domain.as_deref(), host.as_deref(), request.path?) {
        Route::Tunnel { id, .. } => gateway.registry.pick(&id).map(|session| session.shard()),
        Route::AgentConnect => {
            let here = current();
            let inboxes = gateway.inboxes.get()?;
            let fewest = |shard: &usize| (inboxes[*shard].sessions.load(Ordering::Relaxed), *shard != here);
            (0..inboxes.len()).min_by_key(fewest)
        }
        _ => None,
    }
}

/// Sends a connection to thread `shard`; gives it back when that thread no longer takes any
/// (it stopped accepting at shutdown).
pub(crate) fn hand_over(gateway: &Gateway, shard: usize, handover: Handover) -> Result<(), Handover> {
    match gateway.inboxes.get().and_then(|inboxes| inboxes.get(shard)) {
        Some(inbox) => inbox.tx.send(handover).map_err(|err| err.0),
        None => Err(handover),
    }
}

/// Binds `count` listeners (at least one) to `addr`, sharing the port through `SO_REUSEPORT`
/// when there are several; port 0 picks one free port for all of them. Call it within a runtime
/// (they are registered with it); [`Gateway::spawn_shards`] moves all but one to their threads.
///
/// # Errors
/// The address cannot be bound (in use, not local, no permission).
pub fn bind(addr: SocketAddr, count: usize) -> std::io::Result<Vec<TcpListener>> {
    // Elsewhere than Unix there is no SO_REUSEPORT to share a port: one listener, one thread.
    let count = if cfg!(unix) { count.max(1) } else { 1 };
    let mut listeners = Vec::with_capacity(count);
    let mut addr = addr;
    if count > 1 {
        // SO_REUSEPORT would also let these share the port with another process of the same user
        // that bound it that way (a second gateway started by mistake), and each would then get
        // a share of the connections. A socket without it cannot bind a port anyone listens on:
        // bound first, it turns that mistake into "address in use", as with one thread.
        let probe = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        probe.set_reuseaddr(true)?;
        probe.bind(addr)?;
        addr = probe.local_addr()?;
    }
    for _ in 0..count {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        // As tokio's `TcpListener::bind`: a restarted gateway can bind while old connections linger.
        socket.set_reuseaddr(true)?;
        #[cfg(unix)]
        if count > 1 {
            socket.set_reuseport(true)?;
        }
        socket.bind(addr)?;
        let listener = socket.listen(1024)?;
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// The gateway's threads beyond the main one; see the module docs.
#[derive(Debug)]
pub struct Shards {
    /// Fires once the gateway has stopped; until then each thread drives its connections and
    /// sessions (which outlive its accept loop during the drain).
    done: CancellationToken,
    threads: Vec<JoinHandle<()>>,
}

impl Gateway {
    /// Serves each of `listeners` on a thread of its own until the gateway stops (the accept
    /// loops end at shutdown, like [`Gateway::serve`]'s; the drain is run by `serve`). Call
    /// [`Shards::stop`] once `serve` has returned.
    ///
    /// # Errors
    /// A runtime or thread cannot be created; the threads started so far are stopped.
    pub fn spawn_shards(self: &Arc<Self>, listeners: Vec<TcpListener>) -> std::io::Result<Shards> {
        let mut shards =
            Shards { done: CancellationToken::new(), threads: Vec::with_capacity(listeners.len()) };
        if listeners.is_empty() {
            return Ok(shards);
        }
        let (inboxes, receivers): (Vec<_>, Vec<_>) = (0..=listeners.len())
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                (Inbox { tx, sessions: AtomicUsize::new(0) }, rx)
            })
            .unzip();
        if self.inboxes.set(inboxes).is_err() {
            return Err(std::io::Error::other("the gateway's threads were started already"));
        }
        let mut receivers = receivers.into_iter();
        *self.main_inbox.lock().unwrap_or_else(|e| e.into_inner()) = receivers.next();
        for ((n, listener), inbox) in listeners.into_iter().enumerate().zip(receivers) {
            let listener = listener.into_std()?;
            let runtime = ferry_transport::runtime(1)?;
            let (gateway, done) = (Arc::clone(self), shards.done.clone());
            let thread = std::thread::Builder::new().name(format!("gateway-{}", n + 1)).spawn(move || {
                SHARD.with(|shard| shard.set(n + 1));
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => accept_loop(gateway, listener, Some(inbox)).await,
                        Err(err) => error!(%err, "a gateway thread cannot accept connections"),
                    }
                    done.cancelled().await;
                });
            })?;
            shards.threads.push(thread);
        }
        Ok(shards)
    }
}

impl Shards {
    /// Stops the threads and waits for them; what still runs on them is dropped. Call it once
    /// [`Gateway::serve`] has returned (the drain is over).
    pub fn stop(mut self) {
        self.done.cancel();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }

    /// How many threads there are besides the main one.
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    /// Whether there are none (the gateway runs on one thread).
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        self.done.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listeners_share_one_port_and_a_second_gateway_is_refused() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let listeners = bind(any, 3).unwrap();
        let port = listeners[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        assert!(listeners.iter().all(|l| l.local_addr().unwrap().port() == port));
        // Another gateway on the same port, with one thread or several, is told the port is taken
        // instead of sharing its connections.
        let taken = SocketAddr::from(([127, 0, 0, 1], port));
        for count in [1, 2] {
            let err = bind(taken, count).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{count} threads: {err}");
        }
        // A port that one listener holds without SO_REUSEPORT is refused to a group as well.
        let single = bind(any, 1).unwrap();
        let err = bind(single[0].local_addr().unwrap(), 2).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    }
}
