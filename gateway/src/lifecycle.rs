//! One agent session from the end of its handshake to its close: the session runs (yamux, the
//! control stream and its heartbeat, in [`ferry_transport::session`]); once the agent's control
//! stream is up it is listed in the registry (replacing a stale session of the same agent), its
//! control messages (drain, upstream health) update it, and it is taken out of the registry the
//! moment it ends, whatever the reason.

use std::sync::Arc;

use ferry_codec::ControlMessage;
use ferry_codec::control::GoAwayReason;
use ferry_transport::control::Heartbeat;
use ferry_transport::session::{Ended, Role};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, warn};

use crate::Gateway;
use crate::session::{Identity, Session};

/// Runs the session of an agent that passed its handshake on `ws`, until it ends.
pub(crate) async fn run<S>(
    gateway: Arc<Gateway>,
    ws: WebSocketStream<S>,
    identity: Identity,
    heartbeat_interval: std::time::Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let peer = identity.peer;
    let _counted = crate::shards::count_session(&gateway);
    let heartbeat = Heartbeat { interval: heartbeat_interval, misses: gateway.config.heartbeat_misses };
    let role = Role::Gateway { control_deadline: gateway.config.handshake_timeout };
    let (mut link, task) = ferry_transport::session::start(ws, role, heartbeat, &gateway.config.session);
    let cancel = gateway.sessions.child_token();
    let metrics = gateway.metrics.tunnel(&identity.tunnel_id);
    let session =
        Arc::new(Session::new(identity, &link, gateway.registry.changes(), metrics, cancel.clone()));
    let counters = Arc::clone(&link.counters);
    let lifecycle = async {
        // Listed only once the agent's control stream is up (the task ends the session if it
        // never comes).
        if !link.established().await {
            return;
        }
        let inserted = gateway.registry.insert(Arc::clone(&session));
        gateway.metrics.session_started(&session.metrics, inserted.reconnect);
        // The secret may have been revoked between its check and now, while this session was
        // in no list a reload sweeps; now that it is listed, either the reload sees it or this
        // sees the reload.
        if !gateway.secrets().still_allows(&session.identity.tunnel_id, session.identity.secret.as_ref()) {
            warn!("secret revoked during the handshake; closing the session");
            session.go_away(GoAwayReason::CredentialsRevoked, std::time::Duration::ZERO).await;
            session.close();
            gateway.registry.remove(&session.identity.tunnel_id, session.identity.id);
            return;
        }
        for stale in inserted.replaced {
            info!(stale_session = %stale.identity.id, "replacing the stale session of the same agent");
            stale.go_away(GoAwayReason::Replaced, std::time::Duration::ZERO).await;
            stale.close();
        }
        info!(agent_version = %session.identity.agent_version, peer = %session.identity.peer, "tunnel up");
        // Until the control stream ends (the events close with it) or the session is closed.
        let events = async {
            while let Some(event) = link.events.recv().await {
                match event {
                    ControlMessage::Drain { grace } => {
                        info!(grace_ms = grace.as_millis() as u64, "agent is draining");
                        session.set_draining();
                    }
                    ControlMessage::UpstreamHealth { state, detail } => {
                        session.set_health(state, detail);
                    }
                    other => debug!(?other, "control message"),
                }
            }
        };
        tokio::select! {
            () = events => {}
            () = cancel.cancelled() => {}
        }
        // Out of the registry now, not once the connection is closed (which may wait on a peer
        // that does not read): nothing is routed to a session that is over.
        gateway.registry.remove(&session.identity.tunnel_id, session.identity.id);
    };
    let (ended, ()) = tokio::join!(task.run(|_| {}, cancel.clone()), lifecycle);
    gateway.registry.remove(&session.identity.tunnel_id, session.identity.id);
    gateway.metrics.session_ended(
        counters.tx.load(std::sync::atomic::Ordering::Relaxed),
        counters.rx.load(std::sync::atomic::Ordering::Relaxed),
    );
    match ended {
        Ended::HeartbeatTimeout(silent) => {
            warn!(silent_ms = silent.as_millis() as u64, "agent missed its heartbeats; tunnel down");
        }
        Ended::NoControlStream(_) => warn!("agent did not open its control stream; tunnel down"),
        Ended::UnexpectedStream => {
            warn!(%peer, "agent opened a stream it may not open; tunnel down");
            // Counted like a failed handshake: an agent that misbehaves cannot come back to do
            // it again and again.
            gateway.limits.handshake_failed(peer.ip());
        }
        other => info!(reason = %other, "tunnel down"),
    }
}
