//! The accept loop and per-connection serving: HTTP/1.1 and HTTP/2 (prior knowledge, or ALPN over
//! TLS) on one port, with upgrades, bounded connection count, and graceful drain on shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{Instrument, debug, info_span, warn};

use crate::Gateway;
use crate::config::{GatewayConfig, H2_MAX_CONCURRENT_STREAMS, H2_MAX_PENDING_RESETS};
use crate::limits::AddressSlot;

/// Pause after a failed `accept` (typically out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The hyper connection builder for the public port.
pub(crate) fn http_builder(config: &GatewayConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(config.max_header_bytes.max(8192))
        .max_headers(config.max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Accepts connections until shutdown; each is served in its own tracked task.
pub(crate) async fn accept_loop(gateway: Arc<Gateway>, listener: TcpListener) {
    let limit = Arc::new(Semaphore::new(gateway.config.max_connections.min(Semaphore::MAX_PERMITS)));
    loop {
        let permit = tokio::select! {
            () = gateway.shutdown.cancelled() => break,
            permit = Arc::clone(&limit).acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (socket, peer) = tokio::select! {
            () = gateway.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(%err, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Some(slot) = gateway.addresses.try_open(peer.ip()) else {
            debug!(%peer, "too many connections from this address; closing");
            gateway.metrics.limited(crate::metrics::Limit::ConnectionsPerAddress);
            continue;
        };
        let conn_gateway = Arc::clone(&gateway);
        gateway.tracker.spawn(
            serve_connection(conn_gateway, socket, peer, (permit, slot))
                .instrument(info_span!("conn", %peer)),
        );
    }
}

async fn serve_connection(
    gateway: Arc<Gateway>,
    socket: TcpStream,
    peer: SocketAddr,
    _slots: (OwnedSemaphorePermit, AddressSlot),
) {
    if let Err(err) = socket.set_nodelay(true) {
        debug!(%err, "could not set TCP_NODELAY");
    }
    let Some(tls) = &gateway.tls else {
        return serve_http(gateway, socket, peer).await;
    };
    let handshake = tls.acceptor().accept(socket);
    let stream = tokio::select! {
        () = gateway.shutdown.cancelled() => return,
        result = tokio::time::timeout(gateway.config.tls_handshake_timeout, handshake) => match result {
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
    serve_http(gateway, stream, peer).await;
}

/// Serves HTTP/1.1 or HTTP/2 on one (plain or TLS) connection until it closes or the drain ends.
async fn serve_http<I>(gateway: Arc<Gateway>, io: I, peer: SocketAddr)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service_gateway = Arc::clone(&gateway);
    let service = service_fn(move |request| {
        let gateway = Arc::clone(&service_gateway);
        async move { Ok::<_, Infallible>(gateway.handle(request, peer).await) }
    });
    let conn = gateway.http.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = gateway.shutdown.cancelled() => {
            // Finish the requests in flight, refuse new ones, keep polling until done.
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(gateway.config.drain_timeout, conn.as_mut()).await {
                Ok(result) => result,
                Err(_) => {
                    debug!("connection still busy at the drain deadline; closing it");
                    return;
                }
            }
        }
    };
    if let Err(err) = result {
        debug!(%err, "connection ended with an error");
    }
}
