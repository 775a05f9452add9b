//! One session with the gateway: the yamux session over the WebSocket, the control stream
//! (heartbeats both ways), a task per inbound request stream, and the two ways a session ends on
//! purpose — our shutdown (tell the gateway to drain, finish what is in flight, close) and the
//! gateway's go-away (a new session takes over at once while this one finishes what is in flight
//! in the background, then closes).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ferry_codec::ControlMessage;
use ferry_codec::control::GoAwayReason;
use ferry_codec::handshake::AuthAccepted;
use ferry_transport::control::Heartbeat;
use ferry_transport::session::{self, Ended, Role};
use ferry_transport::{SessionConfig, TransportError, multiplex};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

use crate::connect::GatewayWs;
use crate::upstream::{Forwarder, serve_stream};

/// Heartbeats the gateway may miss before the agent gives the session up.
const HEARTBEAT_MISSES: u32 = 3;
/// Longest go-away grace the agent honours, whatever the gateway asks.
const MAX_GO_AWAY_GRACE: Duration = Duration::from_secs(300);
/// Most streams the agent lets the gateway hold open on one session, whatever it announces.
const MAX_INBOUND_STREAMS: usize = 1 << 18;

/// The yamux limits of a session with a gateway that may open `announced` streams at once. yamux
/// ends the session when the peer opens one over its limit, and a stream the gateway already let
/// go may still be finishing here (its upstream not answered yet), so the agent allows twice as
/// many, and never fewer than its own configuration says.
fn session_config(own: &SessionConfig, announced: u32) -> SessionConfig {
    let announced = usize::try_from(announced).unwrap_or(usize::MAX);
    let streams =
        announced.saturating_mul(2).clamp(own.max_streams, MAX_INBOUND_STREAMS.max(own.max_streams));
    SessionConfig::with_max_streams(streams)
}

/// The rest of a session the gateway sent away: it finishes its requests (within the grace the
/// gateway gave) and closes. The caller runs it beside the next session.
pub(crate) type Draining = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How a session ended.
pub(crate) enum SessionEnd {
    /// We shut down (and drained).
    Shutdown,
    /// The gateway asked us to go; `draining` finishes what is in flight.
    GoAway { reason: GoAwayReason, draining: Draining },
    /// The gateway or the network ended it.
    Lost,
}

impl std::fmt::Debug for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Shutdown => f.write_str("Shutdown"),
            Self::GoAway { reason, .. } => {
                f.debug_struct("GoAway").field("reason", reason).finish_non_exhaustive()
            }
            Self::Lost => f.write_str("Lost"),
        }
    }
}

/// What a session that ended by itself means for the agent: an error to log and reconnect after,
/// or a plain loss of the session.
fn lost(ended: Ended) -> Result<SessionEnd, TransportError> {
    match ended {
        Ended::Failed(err) => Err(err),
        Ended::HeartbeatTimeout(silent) => {
            warn!(silent_ms = silent.as_millis() as u64, "the gateway missed its heartbeats; reconnecting");
            Ok(SessionEnd::Lost)
        }
        other => {
            debug!(reason = %other, "session ended");
            Ok(SessionEnd::Lost)
        }
    }
}

/// Serves one session until it ends.
pub(crate) async fn serve(
    upstream: &Arc<Forwarder>,
    ws: GatewayWs,
    accepted: &AuthAccepted,
    shutdown: &CancellationToken,
) -> Result<SessionEnd, TransportError> {
    let config = session_config(&upstream.config.session, accepted.limits.max_streams);
    let heartbeat = Heartbeat { interval: accepted.heartbeat_interval, misses: HEARTBEAT_MISSES };
    let (mut link, task) = session::start(ws, Role::Agent, heartbeat, &config);
    if let Some(status) = &upstream.status {
        status.set_control(&link.control);
    }
    let streams = TaskTracker::new();
    // Not a child of `shutdown`: on shutdown the session goes on while it drains, and is stopped
    // only when its requests are done (or the drain deadline passes).
    let stop = CancellationToken::new();

    // The control stream's first frame announces it to the gateway (with the current upstream
    // health); queued before the session runs. Later changes follow as they happen.
    let mut health = upstream.health.subscribe();
    let (state, detail) = health.borrow_and_update().clone();
    let _ = link.control.send(ControlMessage::UpstreamHealth { state, detail }).await;
    let mut health_open = true;

    let stream_upstream = Arc::clone(upstream);
    let stream_tracker = streams.clone();
    let on_request = move |stream: multiplex::Stream| {
        stream_tracker.spawn(serve_stream(Arc::clone(&stream_upstream), stream));
    };
    let mut run = Box::pin(task.run(on_request, stop.clone()).in_current_span());

    let mut events_open = true;
    let end = loop {
        tokio::select! {
            ended = &mut run => {
                streams.close();
                return lost(ended);
            }
            () = shutdown.cancelled() => {
                let grace = upstream.config.drain_timeout;
                info!(in_flight = upstream.in_flight.load(Ordering::Relaxed), grace_secs = grace.as_secs(), "draining: the gateway stops routing here; finishing requests in flight");
                let _ = link.control.send(ControlMessage::Drain { grace }).await;
                break (None, grace);
            }
            changed = health.changed(), if health_open => match changed {
                Ok(()) => {
                    let (state, detail) = health.borrow_and_update().clone();
                    let _ = link.control.send(ControlMessage::UpstreamHealth { state, detail }).await;
                }
                Err(_) => health_open = false,
            },
            event = link.events.recv(), if events_open => match event {
                Some(ControlMessage::GoAway { reason, grace }) => {
                    let grace = grace.min(MAX_GO_AWAY_GRACE);
                    info!(?reason, in_flight = upstream.in_flight.load(Ordering::Relaxed), grace_secs = grace.as_secs(), "the gateway asked this session to go away; it finishes its requests while a new one takes over");
                    break (Some(reason), grace);
                }
                Some(other) => debug!(?other, "control message"),
                // The control stream ended; the session task ends next.
                None => events_open = false,
            },
        }
    };
    let (go_away, grace) = end;
    streams.close();
    let finish = async move {
        let drained = async {
            if tokio::time::timeout(grace, streams.wait()).await.is_err() {
                warn!(left = streams.len(), "drain deadline passed; closing this session anyway");
            }
        };
        let ended = tokio::select! {
            ended = &mut run => ended,
            () = drained => {
                stop.cancel();
                run.await
            }
        };
        // The handle lives as long as the session (the control stream goes on while requests
        // finish).
        drop(link);
        ended
    };
    match go_away {
        None => match finish.await {
            Ended::Stopped => Ok(SessionEnd::Shutdown),
            other => lost(other).map(|_| SessionEnd::Shutdown),
        },
        Some(reason) => {
            let draining = Box::pin(
                async move {
                    match finish.await {
                        Ended::Stopped => debug!("drained session closed"),
                        other => debug!(reason = %other, "drained session ended"),
                    }
                }
                .in_current_span(),
            );
            Ok(SessionEnd::GoAway { reason, draining })
        }
    }
}
