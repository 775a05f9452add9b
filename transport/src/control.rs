//! The control stream: heartbeats that cross the same path as request data, and the other
//! control messages (drain, go-away, health, stats).
//!
//! One task per session runs [`run`]. It pings the peer every interval and answers the peer's
//! pings; any message from the peer proves it alive. A peer silent for `misses` intervals is dead,
//! and `run` returns [`ControlError::HeartbeatTimeout`] so the owner tears the session down.
//! Because pings travel over yamux and the WebSocket like request bodies do, a path that drops
//! packets without closing (no FIN, no RST) is detected too, not just a closed socket.
//!
//! Other tasks talk to the loop through a [`ControlHandle`]: send a message, ping on demand and
//! get the round-trip time, read the last measured RTT.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ferry_codec::{ControlCodec, ControlMessage};
use futures_util::StreamExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedRead;
use tokio_util::compat::FuturesAsyncReadCompatExt;
use tracing::{debug, trace};

use crate::TransportError;
use crate::multiplex;

/// Commands waiting for the control loop.
const COMMAND_QUEUE: usize = 32;
/// Messages from the peer waiting for the owner.
const EVENT_QUEUE: usize = 32;
/// Most on-demand pings waiting for their pong.
const MAX_PENDING_PINGS: usize = 64;

/// Heartbeat settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// How often each side pings.
    pub interval: Duration,
    /// Intervals without a word from the peer before it is declared dead.
    pub misses: u32,
}

impl Heartbeat {
    /// How long the peer may stay silent.
    pub fn deadline(&self) -> Duration {
        self.interval.saturating_mul(self.misses)
    }
}

/// Why the control loop ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The peer missed its heartbeats.
    #[error("no heartbeat from the peer for {0:?}")]
    HeartbeatTimeout(Duration),
    /// The control stream closed or failed.
    #[error("control stream closed")]
    Closed(#[source] Option<TransportError>),
}

enum Command {
    Send(ControlMessage),
    Ping(oneshot::Sender<Duration>),
}

/// Talks to a running control loop. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ControlHandle {
    tx: mpsc::Sender<Command>,
    /// Last round-trip time in microseconds; 0 before the first pong.
    rtt_micros: Arc<AtomicU64>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Send(message) => f.debug_tuple("Send").field(message).finish(),
            Self::Ping(_) => f.write_str("Ping"),
        }
    }
}

impl ControlHandle {
    /// Queues a message for the peer.
    ///
    /// # Errors
    /// The control loop has ended.
    pub async fn send(&self, message: ControlMessage) -> Result<(), TransportError> {
        self.tx.send(Command::Send(message)).await.map_err(|_| TransportError::SessionClosed)
    }

    /// Pings the peer now and waits for the pong.
    ///
    /// # Errors
    /// The control loop ended before the pong came back.
    pub async fn ping(&self) -> Result<Duration, TransportError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Ping(reply)).await.map_err(|_| TransportError::SessionClosed)?;
        rx.await.map_err(|_| TransportError::SessionClosed)
    }

    /// The last measured round-trip time, if any pong came back yet.
    pub fn rtt(&self) -> Option<Duration> {
        match self.rtt_micros.load(Ordering::Relaxed) {
            0 => None,
            micros => Some(Duration::from_micros(micros)),
        }
    }
}

/// The control loop's inputs, created with [`channel`].
#[derive(Debug)]
pub struct ControlLoop {
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<ControlMessage>,
    rtt_micros: Arc<AtomicU64>,
}

/// A handle, the loop's inputs, and the receiver of the peer's non-heartbeat messages.
pub fn channel() -> (ControlHandle, ControlLoop, mpsc::Receiver<ControlMessage>) {
    let (tx, commands) = mpsc::channel(COMMAND_QUEUE);
    let (events, events_rx) = mpsc::channel(EVENT_QUEUE);
    let rtt_micros = Arc::new(AtomicU64::new(0));
    let handle = ControlHandle { tx, rtt_micros: Arc::clone(&rtt_micros) };
    (handle, ControlLoop { commands, events, rtt_micros }, events_rx)
}

/// Runs the control stream until the peer closes it, fails, or misses its heartbeats, and says
/// which it was.
///
/// Messages other than pings and pongs go to the events receiver from [`channel`]; if the owner
/// does not keep up, they are dropped (with a debug log) rather than stalling the heartbeat.
pub async fn run(stream: multiplex::Stream, heartbeat: Heartbeat, inputs: ControlLoop) -> ControlError {
    match drive(stream, heartbeat, inputs).await {
        Ok(never) => match never {},
        Err(err) => err,
    }
}

async fn drive(
    stream: multiplex::Stream,
    heartbeat: Heartbeat,
    mut inputs: ControlLoop,
) -> Result<std::convert::Infallible, ControlError> {
    let (read, mut write) = tokio::io::split(stream.compat());
    let mut inbox = FramedRead::new(read, ControlCodec);
    let mut buf = BytesMut::new();
    let mut ticker = tokio::time::interval(heartbeat.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut next_nonce: u64 = 1;
    let mut sent_at: HashMap<u64, Instant> = HashMap::new();
    let mut waiters: HashMap<u64, oneshot::Sender<Duration>> = HashMap::new();
    let mut commands_open = true;

    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let silent = last_heard.elapsed();
                if silent >= heartbeat.deadline() {
                    return Err(ControlError::HeartbeatTimeout(silent));
                }
                // Forget pings that can no longer be answered in time.
                sent_at.retain(|_, at| at.elapsed() < heartbeat.deadline());
                let nonce = next_nonce;
                next_nonce = next_nonce.wrapping_add(1);
                sent_at.insert(nonce, Instant::now());
                send(&mut write, &mut buf, &ControlMessage::Ping { nonce }, heartbeat.interval).await?;
            }
            command = inputs.commands.recv(), if commands_open => match command {
                Some(Command::Send(message)) => send(&mut write, &mut buf, &message, heartbeat.interval).await?,
                Some(Command::Ping(reply)) => {
                    if waiters.len() < MAX_PENDING_PINGS {
                        let nonce = next_nonce;
                        next_nonce = next_nonce.wrapping_add(1);
                        sent_at.insert(nonce, Instant::now());
                        waiters.insert(nonce, reply);
                        send(&mut write, &mut buf, &ControlMessage::Ping { nonce }, heartbeat.interval).await?;
                    }
                }
                None => commands_open = false,
            },
            message = inbox.next() => {
                let message = match message {
                    Some(Ok(message)) => message,
                    Some(Err(err)) => return Err(ControlError::Closed(Some(err.into()))),
                    None => return Err(ControlError::Closed(None)),
                };
                last_heard = Instant::now();
                match message {
                    ControlMessage::Ping { nonce } => {
                        send(&mut write, &mut buf, &ControlMessage::Pong { nonce }, heartbeat.interval).await?;
                    }
                    ControlMessage::Pong { nonce } => {
                        if let Some(at) = sent_at.remove(&nonce) {
                            let rtt = at.elapsed();
                            trace!(rtt_us = rtt.as_micros() as u64, "pong");
                            inputs.rtt_micros.store((rtt.as_micros() as u64).max(1), Ordering::Relaxed);
                            if let Some(waiter) = waiters.remove(&nonce) {
                                let _ = waiter.send(rtt);
                            }
                        }
                    }
                    other => {
                        if inputs.events.try_send(other).is_err() {
                            debug!("control event dropped: the session is not reading them");
                        }
                    }
                }
            }
        }
    }
}

/// Writes one message, giving up after `limit`: a control frame that cannot be written for a
/// whole heartbeat interval means the path is stuck.
async fn send(
    write: &mut (impl AsyncWrite + Unpin),
    buf: &mut BytesMut,
    message: &ControlMessage,
    limit: Duration,
) -> Result<(), ControlError> {
    buf.clear();
    message.encode(buf).map_err(|err| ControlError::Closed(Some(err.into())))?;
    match tokio::time::timeout(limit, write.write_all(buf)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(ControlError::Closed(Some(err.into()))),
        Err(_) => Err(ControlError::HeartbeatTimeout(limit)),
    }
}
