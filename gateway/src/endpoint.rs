//! The agent endpoint: `GET /ws` upgrades to a WebSocket and the ferry handshake runs over it
//! (bounded by the handshake timeout, counted against `--max-handshakes`); an agent that passes
//! goes on to [`crate::lifecycle`], one that fails is told why and let go within a second.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use ferry_codec::handshake::{AuthAccepted, AuthRejected, SessionLimits, check_version};
use ferry_codec::{
    AuthErrorCode, AuthResult, ClientAuth, CodecError, Nonce, PROTOCOL_VERSION, ServerHello, SessionId,
};
use ferry_transport::TransportError;
use ferry_transport::ws::{SUBPROTOCOL, recv_message, send_message, websocket_config};
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use tokio::sync::OwnedSemaphorePermit;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tracing::{Instrument, debug, info_span, warn};
use uuid::Uuid;

use crate::Gateway;
use crate::auth::server_mac;
use crate::error::PublicError;
use crate::session::Identity;

/// Largest WebSocket message before the handshake completes (a `ClientAuth` is under 1 KiB), so
/// an unauthenticated peer cannot make the gateway buffer more than this.
const MAX_HANDSHAKE_MESSAGE: usize = ferry_codec::handshake::MAX_HANDSHAKE_LEN;
/// How long telling a refused agent why may take (the verdict, the close frame, its answer): a
/// peer that does not read must not keep the task and its socket.
const REJECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Answers `GET /ws`: checks the upgrade request, returns `101`, and runs the session in a tracked
/// task once the server hands over the connection.
pub(crate) fn accept<B>(
    gateway: &Arc<Gateway>,
    mut request: Request<B>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, PublicError> {
    gateway.limits.handshake_allowed(peer.ip())?;
    let headers = request.headers();
    let is_upgrade = request.method() == http::Method::GET
        && ferry_transport::heads::wants_upgrade(headers)
        && headers.get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if !is_upgrade {
        return Err(PublicError::BadRequest("the agent endpoint expects a WebSocket upgrade"));
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v != "13") {
        return Err(PublicError::BadRequest("unsupported WebSocket version (expected 13)"));
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Err(PublicError::BadRequest("missing Sec-WebSocket-Key"));
    };
    let offers_ferry = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL);
    if !offers_ferry {
        return Err(PublicError::BadRequest("the agent must offer the ferry.v1 WebSocket subprotocol"));
    }
    let accept_key = derive_accept_key(key.as_bytes());
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| request.uri().authority().map(|a| a.to_string()));
    // Unauthenticated connections are capped: a flood of WebSockets that never finish the
    // handshake cannot hold more than this many tasks and sockets.
    let handshake_slot = gateway.limits.handshake()?;
    let on_upgrade = crate::upgrade::on(&mut request);

    let gw = Arc::clone(gateway);
    let span = info_span!("tunnel", tunnel_id = tracing::field::Empty, session_id = tracing::field::Empty);
    gateway.session_tracker.spawn(
        async move {
            let upgraded = match on_upgrade.upgraded().await {
                Ok(upgraded) => upgraded,
                Err(err) => {
                    debug!(%err, "agent upgrade failed");
                    return;
                }
            };
            let config = websocket_config().max_message_size(Some(MAX_HANDSHAKE_MESSAGE));
            let ws = WebSocketStream::from_raw_socket(upgraded, Role::Server, Some(config)).await;
            serve(gw, ws, peer, host, handshake_slot).await;
        }
        .instrument(span),
    );

    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(SUBPROTOCOL));
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept_key).expect("base64 is a valid header value"),
    );
    Ok(response)
}

type AgentWs = WebSocketStream<crate::upgrade::Upgraded>;

/// Handshake, then the session until it ends.
async fn serve(
    gateway: Arc<Gateway>,
    mut ws: AgentWs,
    peer: SocketAddr,
    host: Option<String>,
    handshake_slot: OwnedSemaphorePermit,
) {
    let handshake = tokio::time::timeout(
        gateway.config.handshake_timeout,
        handshake(&gateway, &mut ws, peer, host.as_deref()),
    );
    let result = handshake.await;
    let (identity, heartbeat_interval) = match result {
        Ok(Ok(done)) => done,
        Ok(Err(failure)) => {
            warn!(code = failure.code.as_str(), detail = %failure.detail, %peer, "agent handshake failed");
            gateway.limits.handshake_failed(peer.ip());
            gateway.metrics.handshake_failure(failure.code);
            // Still counted as a handshake in progress until the socket is let go.
            reject(ws, failure.code, failure.close).await;
            drop(handshake_slot);
            return;
        }
        Err(_) => {
            warn!(%peer, "agent handshake timed out");
            gateway.limits.handshake_failed(peer.ip());
            gateway.metrics.handshake_failure(AuthErrorCode::HandshakeTimeout);
            reject(ws, AuthErrorCode::HandshakeTimeout, None).await;
            drop(handshake_slot);
            return;
        }
    };
    drop(handshake_slot);
    let span = tracing::Span::current();
    span.record("tunnel_id", identity.tunnel_id.as_str());
    span.record("session_id", tracing::field::display(identity.id));
    crate::lifecycle::run(gateway, ws, identity, heartbeat_interval).await;
}

/// A failed handshake: the code for the agent, the detail for our log, and the WebSocket close
/// frame when the peer broke the WebSocket protocol itself (1009, 1002) rather than ferry's.
struct HandshakeFailure {
    code: AuthErrorCode,
    detail: String,
    close: Option<CloseFrame>,
}

impl HandshakeFailure {
    fn new(code: AuthErrorCode, detail: impl std::fmt::Display) -> Self {
        Self { code, detail: detail.to_string(), close: None }
    }
}

impl From<TransportError> for HandshakeFailure {
    fn from(err: TransportError) -> Self {
        let close = match &err {
            TransportError::WebSocket(ws) => ferry_transport::ws::close_frame_for(ws),
            _ => None,
        };
        Self { close, ..Self::new(AuthErrorCode::Malformed, err) }
    }
}

async fn handshake(
    gateway: &Arc<Gateway>,
    ws: &mut AgentWs,
    peer: SocketAddr,
    host: Option<&str>,
) -> Result<(Identity, std::time::Duration), HandshakeFailure> {
    let mut nonce = [0u8; 32];
    getrandom::fill(&mut nonce).map_err(|err| HandshakeFailure::new(AuthErrorCode::Overloaded, err))?;
    let nonce = Nonce::from_bytes(nonce);
    let hello = ServerHello {
        version: PROTOCOL_VERSION,
        nonce,
        gateway_version: concat!("ferry-gateway ", env!("CARGO_PKG_VERSION")).into(),
        auth_required: gateway.secrets().required(),
    };
    send_message(ws, hello.encode()).await?;
    let message = recv_message(ws).await?;
    let auth = ClientAuth::decode(message).map_err(|err| match err {
        CodecError::TunnelId(_) => HandshakeFailure::new(AuthErrorCode::InvalidTunnelId, err),
        other => HandshakeFailure::new(AuthErrorCode::Malformed, other),
    })?;
    check_version(auth.version)
        .map_err(|err| HandshakeFailure::new(AuthErrorCode::UnsupportedVersion, err))?;
    // The secrets in force now, not when the challenge went out: a reload in between counts.
    let matched = gateway
        .secrets()
        .verify(&nonce, &auth.tunnel_id, &auth.instance_id, auth.mac.as_ref())
        .map_err(|code| HandshakeFailure::new(code, format!("tunnel {}", auth.tunnel_id)))?;

    let session_id = SessionId(Uuid::new_v4());
    let server_mac = matched
        .as_ref()
        .map(|(secret, _)| server_mac(secret, &nonce, &auth.tunnel_id, &auth.instance_id, &session_id));
    let heartbeat_interval = gateway.config.heartbeat_interval;
    let ip_rules = crate::access::IpRules::parse(&auth.allow_ip, &auth.deny_ip)
        .map_err(|err| HandshakeFailure::new(AuthErrorCode::Malformed, err))?
        .under(gateway.secrets().ip_floor(&auth.tunnel_id));
    let basic_auth = crate::basic_auth::BasicAuth::parse(&auth.basic_auth)
        .map_err(|err| HandshakeFailure::new(AuthErrorCode::Malformed, err))?
        .map(Arc::new);
    if basic_auth.is_none() && gateway.secrets().basic_auth_required(&auth.tunnel_id) {
        return Err(HandshakeFailure::new(
            AuthErrorCode::BasicAuthRequired,
            format!("tunnel {}: the auth file requires basic auth", auth.tunnel_id),
        ));
    }
    let (tcp, claims) = if auth.tcp.is_empty() {
        (Vec::new(), None)
    } else {
        let secrets = gateway.secrets();
        let granted = secrets.tcp_ports(&auth.tunnel_id);
        let elsewhere = |port| secrets.tcp_port_reserved_for_other(port, &auth.tunnel_id);
        let (bindings, claims) =
            gateway.tcp_ports.claim(gateway, &auth.tunnel_id, &auth.tcp, granted, &elsewhere);
        for binding in &bindings {
            if let Err(reason) = &binding.port {
                warn!(tunnel_id = %auth.tunnel_id, endpoint = binding.name, reason, "TCP endpoint refused");
            }
        }
        (bindings, Some(Arc::new(claims)))
    };
    let accepted = AuthAccepted {
        session_id,
        server_mac,
        heartbeat_interval,
        limits: SessionLimits {
            max_streams: u32::try_from(gateway.config.session.max_streams).unwrap_or(u32::MAX),
            max_data_frame_len: ferry_codec::frame::MAX_DATA_LEN as u32,
        },
        public_urls: gateway.public_urls(&auth.tunnel_id, host),
        node_id: gateway.cluster.as_ref().map(|cluster| cluster.node_id().to_owned()),
        tcp,
    };
    send_message(ws, AuthResult::Accepted(accepted).encode()).await?;
    let identity = Identity {
        id: session_id,
        tunnel_id: auth.tunnel_id,
        instance_id: auth.instance_id,
        agent_version: auth.agent_version,
        peer,
        secret: matched.map(|(_, fingerprint)| fingerprint),
        tcp: claims,
        ip_rules,
        basic_auth,
    };
    Ok((identity, heartbeat_interval))
}

/// Tells the agent why, closes with 1008 and the code as the reason (or with `broken`, for a
/// peer that broke the WebSocket protocol), and waits briefly for the agent to acknowledge the
/// close (so it reads the reason); all within [`REJECT_TIMEOUT`].
async fn reject(mut ws: AgentWs, code: AuthErrorCode, broken: Option<CloseFrame>) {
    let telling = async {
        let close = match broken {
            Some(close) => close,
            None => {
                let result = AuthResult::Rejected(AuthRejected::from(code)).encode();
                let _ = ws.send(Message::Binary(result)).await;
                CloseFrame { code: CloseCode::Policy, reason: code.as_str().into() }
            }
        };
        let _ = ws.close(Some(close)).await;
        while ws.next().await.is_some() {}
    };
    if tokio::time::timeout(REJECT_TIMEOUT, telling).await.is_err() {
        debug!("the refused agent did not take its answer; dropping the connection");
    }
}
