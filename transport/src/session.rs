//! One ferry session, the same on both sides: a yamux session over the WebSocket, its control
//! stream with the heartbeat, and the protocol rule that ties them — **the agent opens exactly one
//! stream, the control stream, first; every other stream is opened by the gateway**.
//!
//! [`start`] splits a session the way quinn splits a connection: a cheap [`Session`] handle
//! (open streams, talk on the control stream, hear the peer's control messages) and a
//! [`SessionTask`] that owns all the I/O. The owner runs the task; it ends with an [`Ended`]
//! that says why, so both sides log and react to the same reasons.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_codec::ControlMessage;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::TransportError;
use crate::control::{self, ControlError, ControlHandle, ControlLoop, Heartbeat};
use crate::multiplex;
use crate::mux::{self, SessionConfig, SessionDriver, StreamOpener};
use crate::ws::{IoCounters, WsIo};

pub use crate::mux::{MAX_STREAMS, STREAM_WINDOW, StreamSlot, WINDOW_GROWTH_BUDGET};

/// Which end of the session this is, and what it expects of the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The agent dialled: it opens the control stream; the streams the gateway opens are
    /// requests.
    Agent,
    /// The gateway accepted: the agent's first stream is the control stream, and must come
    /// within `control_deadline`; a second stream from the agent ends the session.
    Gateway {
        /// How long the agent may take to open its control stream.
        control_deadline: Duration,
    },
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Ended {
    /// Our side stopped it (the token given to [`SessionTask::run`]).
    #[error("stopped")]
    Stopped,
    /// The peer closed the connection.
    #[error("closed by the peer")]
    Closed,
    /// The connection failed (I/O, or the peer broke yamux).
    #[error("connection failed")]
    Failed(#[source] TransportError),
    /// The peer missed its heartbeats for this long.
    #[error("no heartbeat from the peer for {0:?}")]
    HeartbeatTimeout(Duration),
    /// The control stream closed or failed while the connection was up.
    #[error("control stream closed")]
    ControlClosed(#[source] Option<TransportError>),
    /// The control stream was never opened (in time).
    #[error("no control stream")]
    NoControlStream(#[source] Option<TransportError>),
    /// The agent opened a stream besides its control stream.
    #[error("the agent opened a stream it may not open")]
    UnexpectedStream,
}

/// The handle to a running session. See the module docs.
#[derive(Debug)]
pub struct Session {
    /// Opens request streams (the gateway's side of the rule; the agent opens none).
    pub opener: StreamOpener,
    /// Sends on the control stream, pings, reads the last round-trip time.
    pub control: ControlHandle,
    /// The peer's control messages other than heartbeats (drain, go-away, health).
    pub events: mpsc::Receiver<ControlMessage>,
    /// Bytes moved each way.
    pub counters: Arc<IoCounters>,
    established: Option<oneshot::Receiver<()>>,
}

impl Session {
    /// Waits until the control stream is up: `true` then, `false` if the session ended first.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn established(&mut self) -> bool {
        match &mut self.established {
            Some(rx) => {
                let up = rx.await.is_ok();
                self.established = None;
                up
            }
            None => true,
        }
    }
}

/// Owns a session's I/O; run it with [`SessionTask::run`].
pub struct SessionTask<S> {
    driver: SessionDriver<WsIo<S>>,
    opener: StreamOpener,
    role: Role,
    heartbeat: Heartbeat,
    control: ControlLoop,
    established: oneshot::Sender<()>,
}

impl<S> std::fmt::Debug for SessionTask<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionTask").field("role", &self.role).finish_non_exhaustive()
    }
}

/// Starts a session over a WebSocket whose ferry handshake is done.
///
/// The caller must have validated `config` ([`SessionConfig::validate`]).
pub fn start<S>(
    ws: WebSocketStream<S>,
    role: Role,
    heartbeat: Heartbeat,
    config: &SessionConfig,
) -> (Session, SessionTask<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let counters = Arc::new(IoCounters::default());
    let mode = match role {
        Role::Agent => multiplex::Mode::Client,
        Role::Gateway { .. } => multiplex::Mode::Server,
    };
    let ws_role = match role {
        Role::Agent => WsRole::Client,
        Role::Gateway { .. } => WsRole::Server,
    };
    let (driver, opener) = mux::session(WsIo::new(ws, ws_role, Arc::clone(&counters)), mode, config);
    let (control, control_loop, events) = control::channel();
    let (established_tx, established_rx) = oneshot::channel();
    let session =
        Session { opener: opener.clone(), control, events, counters, established: Some(established_rx) };
    let task =
        SessionTask { driver, opener, role, heartbeat, control: control_loop, established: established_tx };
    (session, task)
}

impl<S> SessionTask<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Runs the session until it ends, and says why. On the agent every stream the gateway opens
    /// goes to `on_request` (which must not block); on the gateway `on_request` is never called.
    /// Cancelling `stop` ends the session ([`Ended::Stopped`]) after a short flush of what was
    /// written last.
    pub async fn run(self, mut on_request: impl FnMut(multiplex::Stream), stop: CancellationToken) -> Ended {
        let Self { driver, opener, role, heartbeat, control, established } = self;
        // Ended from inside (control stream over, or a broken rule) as well as by `stop`.
        let end = stop.child_token();
        let unexpected = Arc::new(AtomicBool::new(false));
        let (control_tx, control_rx) = oneshot::channel();
        let mut control_tx = Some(control_tx);
        let on_inbound = {
            let (end, unexpected) = (end.clone(), Arc::clone(&unexpected));
            move |stream: multiplex::Stream| match role {
                Role::Agent => on_request(stream),
                Role::Gateway { .. } => match control_tx.take() {
                    Some(tx) => {
                        let _ = tx.send(stream);
                    }
                    None => {
                        unexpected.store(true, Ordering::Relaxed);
                        end.cancel();
                    }
                },
            }
        };
        let control_run = async move {
            let (stream, _slot) = match role {
                Role::Agent => match opener.open().await {
                    Ok((stream, slot)) => (stream, Some(slot)),
                    Err(err) => return Ended::NoControlStream(Some(err)),
                },
                Role::Gateway { control_deadline } => {
                    match tokio::time::timeout(control_deadline, control_rx).await {
                        Ok(Ok(stream)) => (stream, None),
                        _ => return Ended::NoControlStream(None),
                    }
                }
            };
            let _ = established.send(());
            match control::run(stream, heartbeat, control).await {
                ControlError::HeartbeatTimeout(silent) => Ended::HeartbeatTimeout(silent),
                ControlError::Closed(err) => Ended::ControlClosed(err),
            }
        };
        // The control loop is a task of its own: in the same task, every wake-up of the driver
        // (several per request) polled the heartbeat timer and the control stream's read too,
        // and that read zero-filled an 8 KiB buffer each time (callgrind: 14 % of the gateway's
        // instructions per request).
        // Aborted when dropped: the control loop never outlives its session.
        let mut control_run = AbortOnDropHandle::new(tokio::spawn(control_run));
        let driving = driver.run(on_inbound, end.clone());
        tokio::pin!(driving);
        let ended = tokio::select! {
            result = &mut driving => {
                return if unexpected.load(Ordering::Relaxed) {
                    Ended::UnexpectedStream
                } else if stop.is_cancelled() {
                    Ended::Stopped
                } else {
                    match result {
                        Ok(()) => Ended::Closed,
                        Err(err) => Ended::Failed(err),
                    }
                };
            }
            ended = &mut control_run => match ended {
                _ if stop.is_cancelled() => Ended::Stopped,
                Ok(ended) => ended,
                // Only a panic in the control loop gets here (it is aborted only when dropped).
                Err(_) => Ended::ControlClosed(None),
            },
        };
        // The control stream is over: so is the session (after its last writes go out).
        end.cancel();
        let _ = driving.await;
        ended
    }
}
