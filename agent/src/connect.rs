//! Dialling the gateway: TCP, TLS for `wss://`, the WebSocket upgrade to `/ws` with subprotocol
//! `ferry.v1`, and the ferry handshake. Reconnect policy (backoff) lives in [`crate::run`].

use ferry_codec::handshake::{AuthAccepted, TcpEndpoint, check_version};
use ferry_codec::{AuthResult, ClientAuth, PROTOCOL_VERSION, ServerHello, Transcript};
use ferry_transport::ws::{SUBPROTOCOL, recv_message, send_message, websocket_config};
use http::HeaderValue;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::either::Either;

use crate::config::{AgentConfig, GatewayUrl};
use crate::error::ConnectError;

/// The connection to the gateway: plain TCP (`ws://`) or TLS (`wss://`).
pub(crate) type GatewayStream = Either<TcpStream, TlsStream<TcpStream>>;
/// The WebSocket to the gateway.
pub(crate) type GatewayWs = WebSocketStream<GatewayStream>;

/// One connection attempt to `gateway`, bounded by the connect timeout. `tls` is the connector
/// for `wss://` gateways.
pub(crate) async fn connect(
    config: &AgentConfig,
    gateway: &GatewayUrl,
    tls: Option<&TlsConnector>,
) -> Result<(GatewayWs, AuthAccepted), ConnectError> {
    tokio::time::timeout(config.connect_timeout, connect_inner(config, gateway, tls))
        .await
        .map_err(|_| ConnectError::Timeout)?
}

async fn connect_inner(
    config: &AgentConfig,
    gateway: &GatewayUrl,
    tls: Option<&TlsConnector>,
) -> Result<(GatewayWs, AuthAccepted), ConnectError> {
    let addr = format!("{}:{}", gateway.host, gateway.port);
    let tcp = TcpStream::connect((gateway.host.as_str(), gateway.port))
        .await
        .map_err(|source| ConnectError::Dial { addr: addr.clone(), source })?;
    // Small frames (heads, window updates) must not wait for Nagle.
    tcp.set_nodelay(true).map_err(|source| ConnectError::Dial { addr, source })?;
    let stream = match tls.filter(|_| gateway.tls) {
        None => Either::Left(tcp),
        Some(connector) => {
            let tls_error = |source| ConnectError::Tls { host: gateway.host.clone(), source };
            let name = ServerName::try_from(gateway.host.clone())
                .map_err(|_| tls_error(std::io::Error::other("the gateway host is not a valid TLS name")))?;
            Either::Right(connector.connect(name, tcp).await.map_err(tls_error)?)
        }
    };

    let mut request = gateway.uri.to_string().into_client_request().map_err(ConnectError::WebSocket)?;
    request.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static(SUBPROTOCOL));
    request
        .headers_mut()
        .insert("user-agent", HeaderValue::from_static(concat!("ferry-agent/", env!("CARGO_PKG_VERSION"))));
    let (mut ws, _response) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(websocket_config()))
            .await
            .map_err(refused_or_failed)?;

    let hello = ServerHello::decode(recv_message(&mut ws).await?)?;
    check_version(hello.version)?;
    if hello.auth_required && config.secret.is_none() {
        return Err(ConnectError::SecretRequired);
    }
    let mac = config.secret.as_ref().map(|secret| {
        Transcript::client(PROTOCOL_VERSION, &hello.nonce, &config.tunnel_id, &config.instance_id)
            .sign(secret)
    });
    let auth = ClientAuth {
        version: PROTOCOL_VERSION,
        tunnel_id: config.tunnel_id.clone(),
        instance_id: config.instance_id,
        agent_version: concat!("ferry-agent ", env!("CARGO_PKG_VERSION")).into(),
        mac,
        tcp: config.tcp.iter().map(|t| TcpEndpoint { name: t.name.clone(), port: t.public_port }).collect(),
        allow_ip: config.allow_ip.iter().map(ToString::to_string).collect(),
        deny_ip: config.deny_ip.iter().map(ToString::to_string).collect(),
        basic_auth: config.basic_auth.clone(),
    };
    send_message(&mut ws, auth.encode()).await?;
    match AuthResult::decode(recv_message(&mut ws).await?)? {
        AuthResult::Accepted(accepted) => {
            // Mutual: with a secret, only a gateway that proves it holds the same one is served.
            if let Some(secret) = &config.secret {
                let transcript = Transcript::server(
                    PROTOCOL_VERSION,
                    &hello.nonce,
                    &config.tunnel_id,
                    &config.instance_id,
                    &accepted.session_id,
                );
                let proven = accepted.server_mac.is_some_and(|mac| transcript.verify(secret, &mac).is_ok());
                if !proven {
                    return Err(ConnectError::GatewayNotAuthenticated);
                }
            }
            if accepted.tcp.len() != config.tcp.len() {
                return Err(ConnectError::TcpRefused {
                    endpoint: "-".into(),
                    reason: "the gateway does not offer TCP endpoints (an older gateway?)".into(),
                });
            }
            if let Some((binding, reason)) =
                accepted.tcp.iter().find_map(|b| b.port.as_ref().err().map(|reason| (b, reason)))
            {
                return Err(ConnectError::TcpRefused {
                    endpoint: binding.name.clone(),
                    reason: reason.clone(),
                });
            }
            Ok((ws, accepted))
        }
        AuthResult::Rejected(rejected) => {
            Err(ConnectError::Rejected { code: rejected.code, message: rejected.message })
        }
    }
}

/// A refused upgrade that says when to come back (429 after too many failed handshakes, 503
/// while the gateway is busy) is [`ConnectError::Busy`]; anything else a WebSocket failure.
fn refused_or_failed(err: tokio_tungstenite::tungstenite::Error) -> ConnectError {
    use tokio_tungstenite::tungstenite::Error;
    if let Error::Http(response) = &err {
        let status = response.status();
        if status == http::StatusCode::TOO_MANY_REQUESTS || status == http::StatusCode::SERVICE_UNAVAILABLE {
            let retry_after = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(std::time::Duration::from_secs);
            return ConnectError::Busy { status: status.as_u16(), retry_after };
        }
    }
    ConnectError::WebSocket(err)
}
