//! One session with the gateway: the yamux session over the WebSocket, the control stream
//! (heartbeats both ways), a task per inbound request stream, and the two ways a session ends on
//! purpose — our shutdown (tell the gateway to drain, finish what is in flight, close) and the
//! gateway's go-away (finish what is in flight, close, reconnect).

use std::sync::Arc;
use std::time::Duration;

use ferry_codec::ControlMessage;
use ferry_codec::control::GoAwayReason;
use ferry_codec::handshake::AuthAccepted;
use ferry_transport::control::{self, ControlError, Heartbeat};
use ferry_transport::session::session;
use ferry_transport::{IoCounters, TransportError, WsIo, yamux};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

use crate::connect::GatewayWs;
use crate::upstream::{Upstream, serve_stream};

/// Heartbeats the gateway may miss before the agent gives the session up.
const HEARTBEAT_MISSES: u32 = 3;
/// Longest go-away grace the agent honours, whatever the gateway asks.
const MAX_GO_AWAY_GRACE: Duration = Duration::from_secs(300);

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionEnd {
    /// We shut down (and drained).
    Shutdown,
    /// The gateway asked us to go (and we drained).
    GoAway(GoAwayReason),
    /// The gateway or the network ended it.
    Lost,
}

/// Serves one session until it ends.
pub(crate) async fn serve(
    upstream: &Arc<Upstream>,
    ws: GatewayWs,
    accepted: &AuthAccepted,
    shutdown: &CancellationToken,
) -> Result<SessionEnd, TransportError> {
    let counters = Arc::new(IoCounters::default());
    let (driver, opener) = session(WsIo::new(ws, counters), yamux::Mode::Client, &upstream.config.session);
    let streams = TaskTracker::new();
    let stop = CancellationToken::new();

    // The control stream: opened first, it runs the heartbeat until the session ends.
    let (control, control_loop, mut events) = control::channel();
    let heartbeat = Heartbeat { interval: accepted.heartbeat_interval, misses: HEARTBEAT_MISSES };
    let control_stop = stop.clone();
    let control_task = tokio::spawn(
        async move {
            let stream = match opener.open().await {
                Ok(stream) => stream,
                Err(err) => {
                    debug!(%err, "could not open the control stream");
                    control_stop.cancel();
                    return;
                }
            };
            match control::run(stream, heartbeat, control_loop).await {
                ControlError::HeartbeatTimeout(silent) => {
                    warn!(
                        silent_ms = silent.as_millis() as u64,
                        "the gateway missed its heartbeats; reconnecting"
                    );
                }
                other => debug!(err = %other, "control stream closed"),
            }
            control_stop.cancel();
        }
        .in_current_span(),
    );
    // The first frame announces the stream to the gateway (with the current upstream health);
    // queued before the loop starts. Later changes follow as they happen.
    let mut health = upstream.health.subscribe();
    let (state, detail) = health.borrow_and_update().clone();
    let _ = control.send(ControlMessage::UpstreamHealth { state, detail }).await;
    let mut health_open = true;

    let stream_upstream = Arc::clone(upstream);
    let stream_tracker = streams.clone();
    let on_inbound = move |stream: yamux::Stream| {
        stream_tracker.spawn(serve_stream(Arc::clone(&stream_upstream), stream).in_current_span());
    };
    let run = driver.run(on_inbound, stop.clone());
    tokio::pin!(run);

    let mut events_open = true;
    let end = loop {
        tokio::select! {
            result = &mut run => {
                control_task.abort();
                streams.close();
                return result.map(|()| SessionEnd::Lost);
            }
            () = shutdown.cancelled() => {
                let grace = upstream.config.drain_timeout;
                info!(in_flight = streams.len(), grace_secs = grace.as_secs(), "draining: the gateway stops routing here; finishing requests in flight");
                let _ = control.send(ControlMessage::Drain { grace }).await;
                break (SessionEnd::Shutdown, grace);
            }
            changed = health.changed(), if health_open => match changed {
                Ok(()) => {
                    let (state, detail) = health.borrow_and_update().clone();
                    let _ = control.send(ControlMessage::UpstreamHealth { state, detail }).await;
                }
                Err(_) => health_open = false,
            },
            event = events.recv(), if events_open => match event {
                Some(ControlMessage::GoAway { reason, grace }) => {
                    let grace = grace.min(MAX_GO_AWAY_GRACE);
                    info!(?reason, in_flight = streams.len(), grace_secs = grace.as_secs(), "the gateway asked this session to go away");
                    break (SessionEnd::GoAway(reason), grace);
                }
                Some(other) => debug!(?other, "control message"),
                // The control loop ended; `stop` is cancelled and `run` ends next.
                None => events_open = false,
            },
        }
    };
    let (end, grace) = end;
    streams.close();
    let drained = async {
        if tokio::time::timeout(grace, streams.wait()).await.is_err() {
            warn!(left = streams.len(), "drain deadline passed; closing anyway");
        }
    };
    tokio::select! {
        result = &mut run => {
            control_task.abort();
            return result.map(|()| end);
        }
        () = drained => {}
    }
    stop.cancel();
    let result = run.await;
    control_task.abort();
    result.map(|()| end)
}
