//! One session with the gateway: the yamux session over the WebSocket, the control stream, a task
//! per inbound request stream, and the drain on shutdown.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use ferry_codec::ControlMessage;
use ferry_codec::control::HealthState;
use ferry_codec::handshake::AuthAccepted;
use ferry_transport::session::session;
use ferry_transport::{IoCounters, StreamOpener, TransportError, WsIo, yamux};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;
use tokio_util::compat::FuturesAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

use crate::connect::GatewayWs;
use crate::upstream::{Upstream, serve_stream};

/// Control messages the session wants sent.
const CONTROL_QUEUE: usize = 16;

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionEnd {
    /// We shut down (and drained).
    Shutdown,
    /// The gateway or the network ended it; reconnect.
    Lost,
}

/// Serves one session until it ends. On `shutdown`, tells the gateway to route no new requests
/// here, lets in-flight ones finish (up to the drain timeout), then closes.
pub(crate) async fn serve(
    upstream: &Arc<Upstream>,
    ws: GatewayWs,
    accepted: &AuthAccepted,
    shutdown: &CancellationToken,
) -> Result<SessionEnd, TransportError> {
    let counters = Arc::new(IoCounters::default());
    let (driver, opener) = session(WsIo::new(ws, counters), yamux::Mode::Client, &upstream.config.session);
    let streams = TaskTracker::new();
    let stop_driver = CancellationToken::new();
    let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
    let control = tokio::spawn(control(opener, control_rx, stop_driver.clone()).in_current_span());
    let _ = accepted;

    let stream_upstream = Arc::clone(upstream);
    let stream_tracker = streams.clone();
    let on_inbound = move |stream: yamux::Stream| {
        stream_tracker.spawn(serve_stream(Arc::clone(&stream_upstream), stream).in_current_span());
    };
    let run = driver.run(on_inbound, stop_driver.clone());
    tokio::pin!(run);

    let result = tokio::select! {
        result = &mut run => Some(result),
        () = shutdown.cancelled() => None,
    };
    let end = match result {
        Some(result) => {
            control.abort();
            streams.close();
            result.map(|()| SessionEnd::Lost)
        }
        None => {
            let grace = upstream.config.drain_timeout;
            info!(
                in_flight = streams.len(),
                grace_secs = grace.as_secs(),
                "draining: finishing requests in flight"
            );
            let _ = control_tx.send(ControlMessage::Drain { grace }).await;
            streams.close();
            let drained = async {
                if tokio::time::timeout(grace, streams.wait()).await.is_err() {
                    warn!(left = streams.len(), "drain deadline passed; closing anyway");
                }
            };
            tokio::select! {
                result = &mut run => return result.map(|()| SessionEnd::Shutdown),
                () = drained => {}
            }
            stop_driver.cancel();
            run.await.map(|()| SessionEnd::Shutdown)
        }
    };
    control.abort();
    end
}

/// The control stream: opened first, announces the agent, sends what the session queues, and
/// reads what the gateway sends.
async fn control(opener: StreamOpener, mut outbox: mpsc::Receiver<ControlMessage>, stop: CancellationToken) {
    let stream = match opener.open().await {
        Ok(stream) => stream,
        Err(err) => {
            debug!(%err, "could not open the control stream");
            return;
        }
    };
    let (read, mut write) = tokio::io::split(stream.compat());
    let mut inbox = FramedRead::new(read, ferry_codec::ControlCodec);
    let mut buf = BytesMut::new();
    // The first frame announces the stream to the gateway.
    let hello = ControlMessage::UpstreamHealth { state: HealthState::Unknown, detail: String::new() };
    if send(&mut write, &mut buf, &hello).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            message = outbox.recv() => match message {
                Some(message) => {
                    if send(&mut write, &mut buf, &message).await.is_err() {
                        return;
                    }
                }
                None => return,
            },
            message = inbox.next() => match message {
                Some(Ok(ControlMessage::Ping { nonce })) => {
                    if send(&mut write, &mut buf, &ControlMessage::Pong { nonce }).await.is_err() {
                        return;
                    }
                }
                Some(Ok(ControlMessage::GoAway { reason, grace })) => {
                    info!(?reason, grace_secs = grace.as_secs(), "gateway asked us to go away");
                    // In-flight requests finish on their own; the session closes after grace.
                    tokio::time::sleep(grace.min(Duration::from_secs(60))).await;
                    stop.cancel();
                    return;
                }
                Some(Ok(other)) => debug!(?other, "control message"),
                Some(Err(err)) => {
                    warn!(%err, "bad control stream from the gateway; closing the session");
                    stop.cancel();
                    return;
                }
                None => return,
            },
        }
    }
}

async fn send(
    write: &mut (impl tokio::io::AsyncWrite + Unpin),
    buf: &mut BytesMut,
    message: &ControlMessage,
) -> Result<(), TransportError> {
    buf.clear();
    message.encode(buf)?;
    write.write_all(buf).await?;
    Ok(())
}
