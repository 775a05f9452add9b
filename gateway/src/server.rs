//! The gateway's run ([`Gateway::serve`]: accept until shutdown, then drain), the accept loop and
//! per-connection serving: HTTP/1.1 (the gateway's own server, [`crate::http1`]) and HTTP/2
//! (hyper; prior knowledge, or ALPN over TLS) on one port, with upgrades, bounded connection
//! count, and graceful drain on shutdown.
//!
//! Each connection is watched by the task that serves it ([`ConnWatch`]): it must deliver its first
//! request head within the head deadline (TLS handshake included, and the bytes before the
//! protocol is known), and a response the client stops taking for the send-idle timeout closes
//! the connection (a server stops polling a body whose client does not read, so only someone
//! outside the write can tell).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ferry_codec::control::GoAwayReason;
use ferry_transport::h1_server::is_h2_preface;
use http::Request;
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::Gateway;
use crate::auth::Secrets;
use crate::limits::AddressSlot;
use crate::shards::{Handover, hand_over, home_of};
use crate::upgrade::Rewind;
use crate::watch::ConnWatch;

/// How long connections cut at the drain deadline get to close before the agents are let go.
const CUT_GRACE: Duration = Duration::from_secs(1);

/// Pause after a failed `accept` (typically out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

impl Gateway {
    /// Accepts on `listener` until shutdown, then drains: lets in-flight requests finish (up to
    /// the drain timeout), then closes the agent sessions.
    pub async fn serve(self: &Arc<Self>, listener: TcpListener) {
        if let Ok(addr) = listener.local_addr() {
            info!(
                %addr,
                scheme = self.public_scheme(),
                domain = self.config.domain.as_deref().unwrap_or("-"),
                "gateway listening"
            );
        }
        let secrets = self.secrets();
        match (&*secrets, secrets.tunnel_count()) {
            (Secrets::Open, _) => {
                warn!(
                    "no agent secret configured: any well-formed tunnel id is accepted (set FERRY_SECRET, --secret-file or --auth-file)"
                );
            }
            (_, Some(tunnels)) => info!(tunnels, "agents authenticate with per-tunnel secrets"),
            (_, None) => info!("agents authenticate with the shared secret"),
        }
        if self.config.admin_token.is_none() && !self.config.admin_loopback {
            error!("admin endpoints are unreachable: no admin token and loopback access turned off");
        }
        if let Some(cluster) = &self.cluster {
            tokio::spawn(Arc::clone(cluster).run(Arc::clone(self)));
        }
        let inbox = self.main_inbox.lock().unwrap_or_else(|e| e.into_inner()).take();
        accept_loop(Arc::clone(self), listener, inbox).await;
        info!("shutting down: telling agents to go away, draining requests in flight");
        for session in self.registry.all() {
            session.go_away(GoAwayReason::Shutdown, self.config.drain_timeout).await;
        }
        self.tracker.close();
        if tokio::time::timeout(self.config.drain_timeout, self.tracker.wait()).await.is_err() {
            // Connections still busy (and uploads still running): what the deadline cuts. Counted
            // before they are told, so the count is what the deadline found.
            warn!(left = self.tracker.len(), "drain deadline passed; cutting the requests still in flight");
            self.cut.cancel();
            let _ = tokio::time::timeout(CUT_GRACE, self.tracker.wait()).await;
        }
        // Requests are done: now the agents can go.
        self.sessions.cancel();
        self.session_tracker.close();
        let _ = tokio::time::timeout(self.config.drain_timeout, self.session_tracker.wait()).await;
        if let Some(cluster) = &self.cluster {
            cluster.leave().await;
        }
        info!("gateway stopped");
    }
}

/// Accepts connections until shutdown, and takes those other threads hand to this one (`inbox`,
/// when the gateway runs on several); each is served in its own tracked task.
pub(crate) async fn accept_loop(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    mut inbox: Option<mpsc::UnboundedReceiver<Handover>>,
) {
    loop {
        tokio::select! {
            () = gateway.shutdown.cancelled() => break,
            Some(handover) = handed(&mut inbox) => serve_handed(&gateway, handover),
            (socket, peer, permit) = accept(&gateway, &listener) => {
                let Some(slot) = gateway.limits.connection(peer.ip()) else {
                    debug!(%peer, "too many connections from this address; closing");
                    continue;
                };
                let conn_gateway = Arc::clone(&gateway);
                gateway.tracker.spawn(
                    serve_connection(conn_gateway, socket, peer, (permit, slot), Instant::now(), false)
                        .instrument(info_span!("conn", %peer)),
                );
            }
        }
    }
    // Connections already on their way here are served; later ones stay where they are.
    if let Some(inbox) = &mut inbox {
        inbox.close();
        while let Ok(handover) = inbox.try_recv() {
            serve_handed(&gateway, handover);
        }
    }
}

/// The next connection from a permit's worth of room and the listener (cancel safe: the permit
/// goes back if this is dropped, and `accept` is cancel safe).
async fn accept(gateway: &Gateway, listener: &TcpListener) -> (TcpStream, SocketAddr, OwnedSemaphorePermit) {
    let permit =
        Arc::clone(&gateway.connection_slots).acquire_owned().await.expect("the semaphore is never closed");
    loop {
        match listener.accept().await {
            Ok((socket, peer)) => return (socket, peer, permit),
            Err(err) => {
                warn!(%err, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// The next connection handed to this thread; never, without an inbox.
async fn handed(inbox: &mut Option<mpsc::UnboundedReceiver<Handover>>) -> Option<Handover> {
    match inbox {
        Some(inbox) => inbox.recv().await,
        None => std::future::pending().await,
    }
}

/// Serves a connection another thread handed to this one, from its first byte.
fn serve_handed(gateway: &Arc<Gateway>, handover: Handover) {
    let Handover { socket, peer, slots, accepted, _tracked } = handover;
    let socket = match TcpStream::from_std(socket) {
        Ok(socket) => socket,
        Err(err) => {
            warn!(%err, %peer, "cannot take over a connection from another thread; closing it");
            return;
        }
    };
    gateway.tracker.spawn(
        serve_connection(Arc::clone(gateway), socket, peer, slots, accepted, true)
            .instrument(info_span!("conn", %peer)),
    );
}

async fn serve_connection(
    gateway: Arc<Gateway>,
    socket: TcpStream,
    peer: SocketAddr,
    slots: Slots,
    accepted: Instant,
    handed_over: bool,
) {
    if let Err(err) = socket.set_nodelay(true) {
        debug!(%err, "could not set TCP_NODELAY");
    }
    if let Some(size) = gateway.config.client_send_buffer
        && let Err(err) = socket2::SockRef::from(&socket).set_send_buffer_size(size)
    {
        debug!(%err, "could not set the send buffer size");
    }
    // From accept to the first complete request head, whatever the protocol.
    let head_deadline = tokio::time::Instant::from_std(accepted + gateway.config.header_read_timeout);
    let Some(tls) = &gateway.tls else {
        let shard = if handed_over { None } else { home_of(&gateway, &socket, head_deadline).await };
        let (socket, _slots) = match shard {
            Some(shard) => match move_to(&gateway, shard, socket, peer, slots, accepted) {
                Some(back) => back,
                None => return,
            },
            None => (socket, slots),
        };
        return serve_http(gateway, socket, peer, head_deadline, false).await;
    };
    let handshake = tls.acceptor().accept(socket);
    let tls_deadline = tokio::time::Instant::from_std(accepted + gateway.config.tls_handshake_timeout);
    let stream = tokio::select! {
        () = gateway.shutdown.cancelled() => return,
        result = tokio::time::timeout_at(tls_deadline.min(head_deadline), handshake) => match result {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                debug!(%err, "TLS handshake failed");
                return;
            }
            Err(_) => {
                debug!("TLS handshake timed out");
                return;
            }
        },
    };
    // Boxed: the TLS stream makes this future twice the size of the plain one, and every
    // connection's task is allocated at the size of its largest branch.
    let alpn_h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    Box::pin(serve_http(gateway, stream, peer, head_deadline, alpn_h2)).await;
}

type Slots = (OwnedSemaphorePermit, AddressSlot);

/// Hands a connection to thread `shard` (see `shards`); `None` once it is on its way, or the
/// connection back to be served here if that thread takes no more (it stopped at shutdown).
fn move_to(
    gateway: &Gateway,
    shard: usize,
    socket: TcpStream,
    peer: SocketAddr,
    slots: Slots,
    accepted: Instant,
) -> Option<(TcpStream, Slots)> {
    let socket = match socket.into_std() {
        Ok(socket) => socket,
        Err(err) => {
            warn!(%err, "cannot take a connection off this thread's poller; closing it");
            return None;
        }
    };
    let handover = Handover { socket, peer, slots, accepted, _tracked: gateway.tracker.token() };
    let Err(back) = hand_over(gateway, shard, handover) else {
        gateway.metrics.connection_moved();
        return None;
    };
    match TcpStream::from_std(back.socket) {
        Ok(socket) => Some((socket, back.slots)),
        Err(err) => {
            warn!(%err, "cannot take a connection back onto this thread's poller; closing it");
            None
        }
    }
}

/// Serves HTTP/1.1 or HTTP/2 on one (plain or TLS) connection until it closes, it misses its
/// head deadline, a response stalls on the client, or the drain ends. HTTP/2 (`h2` by ALPN, or
/// its preface) goes to hyper; anything else to the gateway's own HTTP/1.1 server.
async fn serve_http<I>(
    gateway: Arc<Gateway>,
    mut io: I,
    peer: SocketAddr,
    head_deadline: tokio::time::Instant,
    alpn_h2: bool,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let watch = Arc::new(ConnWatch::new());
    let mut buf = BytesMut::new();
    if !alpn_h2 {
        let sniff = async {
            loop {
                if let Some(h2) = is_h2_preface(&buf) {
                    return Some(h2);
                }
                buf.reserve(crate::http1::HEAD_READ);
                match io.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        };
        let h2 = match watch_over(&gateway, &watch, head_deadline, pin!(sniff), |_| {}).await {
            Some(Some(h2)) => h2,
            // Gone before a byte told which protocol, or cut.
            _ => return,
        };
        if !h2 {
            let conn = crate::http1::serve(&gateway, io, buf, peer, &watch, head_deadline);
            watch_over(&gateway, &watch, head_deadline, pin!(conn), |_| {}).await;
            return;
        }
    }
    // Boxed: hyper's connection is several times the size of the HTTP/1.1 server's, and every
    // connection's task is allocated at the size of its largest branch.
    Box::pin(serve_h2(gateway, Rewind::new(buf.freeze(), io), peer, head_deadline, watch)).await;
}

/// Serves a connection with hyper (HTTP/2; `io` replays the bytes read to tell the protocol).
async fn serve_h2<I>(
    gateway: Arc<Gateway>,
    io: Rewind<I>,
    peer: SocketAddr,
    head_deadline: tokio::time::Instant,
    watch: Arc<ConnWatch>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service_gateway = Arc::clone(&gateway);
    let service_watch = Arc::clone(&watch);
    let service = service_fn(move |request: Request<Incoming>| {
        let gateway = Arc::clone(&service_gateway);
        let watch = Arc::clone(&service_watch);
        async move {
            watch.request();
            let request = request.map(Either::Left);
            Ok::<_, Infallible>(crate::routes::handle(&gateway, request, peer, &watch).await)
        }
    });
    let conn = gateway.http.serve_connection_with_upgrades(TokioIo::new(io), service);
    let result =
        watch_over(&gateway, &watch, head_deadline, pin!(conn), |conn| conn.graceful_shutdown()).await;
    if let Some(Err(err)) = result {
        debug!(%err, "connection ended with an error");
    }
}

/// Runs a connection's future until it ends (its output) or the connection must close
/// (`None`): no request head by the head deadline, a response stalled on the client for the
/// send-idle timeout, or the drain deadline. At shutdown, `drain` tells it to finish what is in
/// flight and take nothing new (the gateway's HTTP/1.1 server watches for that itself).
async fn watch_over<F: Future>(
    gateway: &Gateway,
    watch: &ConnWatch,
    head_deadline: tokio::time::Instant,
    mut conn: Pin<&mut F>,
    mut drain: impl FnMut(Pin<&mut F>),
) -> Option<F::Output> {
    let send_idle = gateway.config.send_idle_timeout;
    // Checked four times per period: a stall is cut between 1 and 1.25 periods after it began.
    let period = (send_idle / 4).max(Duration::from_millis(10));
    // A timer held in this future and moved on when it fires (an `Interval` would box its timer:
    // a pointer more to chase on every wake-up of the connection).
    let mut stall_check = pin!(tokio::time::sleep(period));
    let mut head_timer = pin!(tokio::time::sleep_until(head_deadline));
    let mut head_pending = !watch.seen_request.load(Ordering::Relaxed);
    let mut draining = false;
    loop {
        tokio::select! {
            // The connection first: it is what wakes the task nearly every time.
            biased;
            output = conn.as_mut() => return Some(output),
            () = &mut head_timer, if head_pending => {
                if !watch.seen_request.load(Ordering::Relaxed) {
                    debug!("no request head before the deadline; closing");
                    gateway.limits.missed_head_deadline();
                    return None;
                }
                head_pending = false;
            }
            () = stall_check.as_mut() => {
                if watch.stalled(send_idle) {
                    debug!(idle_ms = send_idle.as_millis() as u64, "the client stopped taking a response; closing");
                    gateway.limits.send_idle();
                    return None;
                }
                stall_check.as_mut().reset(tokio::time::Instant::now() + period);
            }
            () = gateway.shutdown.cancelled(), if !draining => {
                // Finish the requests in flight, refuse new ones, keep polling until done.
                drain(conn.as_mut());
                draining = true;
            }
            // The gateway's drain deadline (one for every connection, counted there first).
            () = gateway.cut.cancelled() => {
                debug!("connection still busy at the drain deadline; closing it");
                return None;
            }
        }
    }
}
