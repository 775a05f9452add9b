//! Links between nodes. A node's peer listener takes WebSocket connections from the other nodes,
//! authenticated by the cluster secret; each carries a multiplexed session (the same yamux
//! framing as agent sessions) over which the dialling node sends requests for tunnels held here.
//!
//! One stream per request. The dialling node writes the tunnel id (one length byte, then the id),
//! the client's address (4 or 16, then its bytes: the owner checks it against the agent's
//! `--allow-ip` / `--deny-ip`, answering [`ACK_DENIED`]) and the request's `Authorization` value
//! (two length bytes, big-endian, then the value; none: `0, 0`), which the owner checks when the
//! agent asks for basic authentication (answering [`ACK_UNAUTHORIZED`]). It then waits for one
//! byte: [`ACK_OK`] (or [`ACK_OK_AUTHENTICATED`], after which the dialling node takes the
//! credential out of the request) once a stream to a local agent session is open, else why not
//! (nothing has reached an agent then, so it may try another node). After that the two
//! streams are spliced byte for byte: the request head, body, response and any upgraded
//! connection are the ferry frames the dialling node's proxy writes and reads, as if the agent's
//! session were its own. A request therefore crosses one hop at most: what arrives here is never
//! forwarded again.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_codec::{Secret, TunnelId};
use ferry_transport::ws::WsIo;
use ferry_transport::{IoCounters, StreamSlot, multiplex, mux};
use http::{HeaderValue, StatusCode, header};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Gateway;

/// The path of the peer listener's one endpoint.
pub const PEER_PATH: &str = "/ferry/peer";
/// The stream to the agent is open: splice.
pub(crate) const ACK_OK: u8 = 0;
/// No session of that tunnel here (the view that sent it was stale).
pub(crate) const ACK_NO_SESSION: u8 = 1;
/// A session is here but took no stream (at its limit, closing, or slow).
pub(crate) const ACK_UNAVAILABLE: u8 = 2;
/// The tunnel's agent does not let this client reach it (its `--allow-ip` / `--deny-ip`).
pub(crate) const ACK_DENIED: u8 = 3;
/// The tunnel's agent asks for basic authentication, and the credential is missing or wrong.
pub(crate) const ACK_UNAUTHORIZED: u8 = 4;
/// As [`ACK_OK`], and the credential was the tunnel's: it is not for the upstream.
pub(crate) const ACK_OK_AUTHENTICATED: u8 = 5;
/// Longest wait for a peer connection, its WebSocket handshake, or one stream's answer.
const PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest chunk moved at once by a splice.
const SPLICE_CHUNK: usize = 64 * 1024;
/// Largest session listing read from another node.
const MAX_LISTING: u64 = 16 << 20;

/// Why a request could not be handed to another node.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The node has no advertised address.
    #[error("node {0} advertises no peer address")]
    NoAddress(String),
    /// Connecting, the handshake, or the stream failed.
    #[error("peer link to {node}: {detail}")]
    Link {
        /// The node.
        node: String,
        /// What failed.
        detail: String,
    },
    /// The node answered that it cannot take the request.
    #[error("node {node} has {}", match *.code { ACK_NO_SESSION => "no session of the tunnel", ACK_DENIED => "an agent that refuses this client", ACK_UNAUTHORIZED => "an agent that asks for other credentials", _ => "no room for the request" })]
    Refused {
        /// The node.
        node: String,
        /// Its answer.
        code: u8,
    },
}

fn link_error(node: &str, detail: impl std::fmt::Display) -> PeerError {
    PeerError::Link { node: node.to_owned(), detail: detail.to_string() }
}

impl Gateway {
    /// Serves the peer listener until the gateway stops accepting: other nodes of the cluster
    /// connect here to reach the agents of this one. Links stay up until this node's sessions
    /// are closed, so requests forwarded before a shutdown finish.
    pub async fn serve_peers(self: &Arc<Self>, listener: TcpListener) {
        let Some(cluster) = self.cluster.clone() else {
            warn!("a peer listener without --cluster serves nothing");
            return;
        };
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, node = %cluster.node_id(), "peer listener up");
        }
        loop {
            let accepted = tokio::select! {
                () = self.shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, addr) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    debug!(%err, "peer accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let gateway = Arc::clone(self);
            let cluster = Arc::clone(&cluster);
            let link = async move {
                let Some(tls) = cluster.peer_tls() else {
                    return gateway.serve_peer(tcp, cluster.secret()).await;
                };
                match tokio::time::timeout(PEER_TIMEOUT, tls.acceptor().accept(tcp)).await {
                    Ok(Ok(tls)) => gateway.serve_peer(tls, cluster.secret()).await,
                    Ok(Err(err)) => warn!(%err, "a peer connection failed its TLS handshake"),
                    Err(_) => debug!("a peer connection did not finish its TLS handshake in time"),
                }
            };
            tokio::spawn(link.instrument(info_span!("peer", %addr)));
        }
    }

    async fn serve_peer<S>(self: Arc<Self>, io: S, secret: &Secret)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // The callback's types are tungstenite's.
        #[allow(clippy::result_large_err)]
        let check = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
            if request.uri().path() != PEER_PATH {
                return Err(refusal(StatusCode::NOT_FOUND));
            }
            let presented = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
                .unwrap_or_default();
            if !bool::from(presented.ct_eq(secret.expose())) {
                return Err(refusal(StatusCode::UNAUTHORIZED));
            }
            Ok(response)
        };
        let ws =
            match tokio::time::timeout(PEER_TIMEOUT, tokio_tungstenite::accept_hdr_async(io, check)).await {
                Ok(Ok(ws)) => ws,
                Ok(Err(err)) => {
                    warn!(%err, "a peer connection was refused (wrong path or cluster secret?)");
                    return;
                }
                Err(_) => {
                    debug!("a peer connection did not finish its handshake in time");
                    return;
                }
            };
        debug!("peer link accepted");
        let io = WsIo::new(ws, WsRole::Server, Arc::new(IoCounters::default()));
        let (driver, _opener) = mux::session(io, multiplex::Mode::Server, &self.config.session);
        let gateway = Arc::clone(&self);
        let on_stream = move |stream| {
            let serving = Arc::clone(&gateway);
            gateway.tracker.spawn(async move { serving.serve_peer_stream(stream).await }.in_current_span());
        };
        if let Err(err) = driver.run(on_stream, self.sessions.clone()).await {
            debug!(%err, "peer link failed");
        }
    }

    /// One request from another node: which tunnel, then the splice to a local agent stream; or
    /// (an empty tunnel id) a listing of this node's sessions for a cluster-wide `/connections`.
    async fn serve_peer_stream(&self, mut stream: multiplex::Stream) {
        let asked = match tokio::time::timeout(PEER_TIMEOUT, read_ask(&mut stream)).await {
            Ok(Ok(asked)) => asked,
            Ok(Err(err)) => {
                debug!(%err, "a peer stream did not say what it wants");
                return;
            }
            Err(_) => return,
        };
        let (id, client, authorization) = match asked {
            Ask::Tunnel(id, client, authorization) => (id, client, authorization),
            Ask::Sessions(tunnel) => {
                let list = serde_json::Value::Array(crate::admin::local_sessions(self, tunnel.as_ref()));
                let mut reply = vec![ACK_OK];
                reply.extend_from_slice(list.to_string().as_bytes());
                if stream.write_all(&reply).await.is_ok() {
                    let _ = stream.shutdown().await;
                }
                return;
            }
        };
        let Some(session) = self.registry.pick(&id) else {
            let _ = answer(&mut stream, ACK_NO_SESSION).await;
            return;
        };
        if !session.identity.ip_rules.allows(client) {
            let _ = answer(&mut stream, ACK_DENIED).await;
            return;
        }
        let mut ok = ACK_OK;
        if let Some(auth) = &session.identity.basic_auth {
            match auth.check(authorization.as_deref()).await {
                Ok(()) => ok = ACK_OK_AUTHENTICATED,
                Err(crate::PublicError::AuthRequired) => {
                    let _ = answer(&mut stream, ACK_UNAUTHORIZED).await;
                    return;
                }
                Err(_) => {
                    let _ = answer(&mut stream, ACK_UNAVAILABLE).await;
                    return;
                }
            }
        }
        let in_flight = session.begin_request();
        let (mut agent, _slot) =
            match tokio::time::timeout(self.config.stream_open_timeout, session.open_stream()).await {
                Ok(Ok(opened)) => opened,
                _ => {
                    let _ = answer(&mut stream, ACK_UNAVAILABLE).await;
                    return;
                }
            };
        if answer(&mut stream, ok).await.is_err() {
            return;
        }
        self.metrics.cluster_forward(false);
        let spliced = splice(&mut stream, &mut agent).await;
        if let Err(err) = spliced {
            debug!(tunnel_id = %id, %err, "a forwarded request ended early");
        }
        drop(in_flight);
    }
}

/// One direction of a splice: the chunk being written, and whether the reading side finished.
#[derive(Default)]
struct Direction {
    pending: Option<bytes::Bytes>,
    finished: bool,
    done: bool,
}

/// Moves one direction's chunks from `from` to `to` as they arrive, without copying them into a
/// buffer of its own (a chunk is the slice of the session's read buffer it arrived in), and
/// finishes `to` when `from` finished. Memory per idle stream: none; per busy one: one chunk.
fn poll_direction(
    cx: &mut std::task::Context<'_>,
    from: &mut multiplex::Stream,
    to: &mut multiplex::Stream,
    dir: &mut Direction,
) -> std::task::Poll<std::io::Result<()>> {
    use std::task::{Poll, ready};
    use tokio::io::AsyncWrite;
    loop {
        if dir.done {
            return Poll::Ready(Ok(()));
        }
        if let Some(chunk) = &mut dir.pending {
            while !chunk.is_empty() {
                let n = ready!(std::pin::Pin::new(&mut *to).poll_write(cx, chunk))?;
                if n == 0 {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                bytes::Buf::advance(chunk, n);
            }
            dir.pending = None;
        }
        if dir.finished {
            ready!(std::pin::Pin::new(&mut *to).poll_shutdown(cx))?;
            dir.done = true;
            continue;
        }
        match ready!(from.poll_chunk(cx, SPLICE_CHUNK)) {
            Some(Ok(chunk)) => dir.pending = Some(chunk),
            Some(Err(err)) => return Poll::Ready(Err(err)),
            None => dir.finished = true,
        }
    }
}

/// Joins two streams both ways until both directions finished, or either fails (the caller
/// drops both then, which resets them).
async fn splice(a: &mut multiplex::Stream, b: &mut multiplex::Stream) -> std::io::Result<()> {
    let (mut up, mut down) = (Direction::default(), Direction::default());
    std::future::poll_fn(|cx| {
        let up_done = poll_direction(cx, a, b, &mut up)?;
        let down_done = poll_direction(cx, b, a, &mut down)?;
        if up_done.is_ready() && down_done.is_ready() {
            std::task::Poll::Ready(Ok(()))
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

fn refusal(status: StatusCode) -> ErrorResponse {
    let mut response = ErrorResponse::new(None);
    *response.status_mut() = status;
    response
}

/// What a peer stream asks for.
enum Ask {
    /// A stream to an agent session of this tunnel, for a client at this address, with the
    /// request's `Authorization` value.
    Tunnel(TunnelId, IpAddr, Option<Vec<u8>>),
    /// This node's sessions (of one tunnel, or all).
    Sessions(Option<TunnelId>),
}

/// `len, tunnel id, len (4 or 16), client address, len (u16), authorization` asks for a tunnel;
/// `0, len, tunnel id` (`0, 0`: all) for a listing.
async fn read_ask(stream: &mut multiplex::Stream) -> std::io::Result<Ask> {
    match read_short(stream).await? {
        Some(id) => {
            let id = parse_tunnel_id(&id)?;
            let bytes = read_short(stream).await?.unwrap_or_default();
            let client = if let Ok(v4) = <[u8; 4]>::try_from(&bytes[..]) {
                IpAddr::from(v4)
            } else if let Ok(v6) = <[u8; 16]>::try_from(&bytes[..]) {
                IpAddr::from(v6)
            } else {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not a client address"));
            };
            let len = usize::from(stream.read_u16().await?);
            if len > crate::basic_auth::MAX_CREDENTIAL_LEN {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "credential too long"));
            }
            let mut authorization = vec![0u8; len];
            stream.read_exact(&mut authorization).await?;
            Ok(Ask::Tunnel(id, client, (len > 0).then_some(authorization)))
        }
        None => {
            let tunnel = read_short(stream).await?.map(|id| parse_tunnel_id(&id)).transpose()?;
            Ok(Ask::Sessions(tunnel))
        }
    }
}

/// A length byte and that many bytes; `None` for length 0.
async fn read_short(stream: &mut multiplex::Stream) -> std::io::Result<Option<Vec<u8>>> {
    let len = stream.read_u8().await?;
    if len == 0 {
        return Ok(None);
    }
    let mut bytes = vec![0u8; usize::from(len)];
    stream.read_exact(&mut bytes).await?;
    Ok(Some(bytes))
}

fn parse_tunnel_id(bytes: &[u8]) -> std::io::Result<TunnelId> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not a tunnel id"))
}

/// `id` as a length byte and its bytes (tunnel ids are far shorter than 256 bytes).
fn short(id: &TunnelId, out: &mut Vec<u8>) {
    let id = id.as_str().as_bytes();
    out.push(u8::try_from(id.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(id);
}

async fn answer(stream: &mut multiplex::Stream, code: u8) -> std::io::Result<()> {
    stream.write_all(&[code]).await?;
    stream.flush().await
}

/// One link's place: its opener once dialled. Dials to one node wait on each other here; dials
/// to different nodes do not.
type LinkSlot = Arc<tokio::sync::Mutex<Option<mux::StreamOpener>>>;

/// This node's links to the others, dialled when first needed and kept while they work.
pub(crate) struct Links {
    links: std::sync::Mutex<HashMap<String, LinkSlot>>,
    /// How `https://` peers are checked: made at start from `--peer-ca`, or from the system's
    /// roots when the first such peer is dialled.
    connector: std::sync::OnceLock<Result<TlsConnector, String>>,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes = self.links.lock().map(|links| links.len()).unwrap_or_default();
        f.debug_struct("Links").field("nodes", &nodes).finish_non_exhaustive()
    }
}

impl Links {
    /// No links yet; `https://` peers will be checked against the CA certificates in `peer_ca`
    /// (or the system's roots without it).
    ///
    /// # Errors
    /// `peer_ca` cannot be read or holds no certificate.
    pub(crate) fn new(peer_ca: Option<&Path>) -> Result<Self, String> {
        let connector = std::sync::OnceLock::new();
        if let Some(path) = peer_ca {
            let _ = connector.set(Ok(peer_connector(Some(path))?));
        }
        Ok(Self { links: std::sync::Mutex::default(), connector })
    }

    fn connector(&self) -> Result<&TlsConnector, &str> {
        self.connector.get_or_init(|| peer_connector(None)).as_ref().map_err(String::as_str)
    }
    /// A stream to `node` at `advertise` on which the other node has opened a stream to one of
    /// its agent sessions of tunnel `id`, for a request from `client` with that `Authorization`
    /// value, and whether the node checked it (basic authentication). A link that fails here is
    /// forgotten, so the next request dials again instead of waiting on a connection that may be
    /// dead.
    pub(crate) async fn open(
        &self,
        node: &str,
        advertise: Option<&str>,
        (id, (client, authorization)): (&TunnelId, (IpAddr, Option<&[u8]>)),
        secret: &Secret,
        config: &ferry_transport::SessionConfig,
        stop: &CancellationToken,
    ) -> Result<(multiplex::Stream, StreamSlot, bool), PeerError> {
        let mut preamble = Vec::with_capacity(80);
        short(id, &mut preamble);
        // The client's address, for the owner to check against the agent's rules.
        match client {
            IpAddr::V4(v4) => {
                preamble.push(4);
                preamble.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                preamble.push(16);
                preamble.extend_from_slice(&v6.octets());
            }
        }
        // A value longer than the owner reads is left out: it fails authentication there.
        let authorization = authorization
            .filter(|value| value.len() <= crate::basic_auth::MAX_CREDENTIAL_LEN)
            .unwrap_or_default();
        preamble.extend_from_slice(&u16::try_from(authorization.len()).unwrap_or(0).to_be_bytes());
        preamble.extend_from_slice(authorization);
        let (stream, slot, code) = self.ask(node, advertise, &preamble, secret, config, stop).await?;
        Ok((stream, slot, code == ACK_OK_AUTHENTICATED))
    }

    /// `node`'s own sessions (of `tunnel`, or all) as it lists them in `/connections`.
    pub(crate) async fn sessions(
        &self,
        node: &str,
        advertise: Option<&str>,
        tunnel: Option<&TunnelId>,
        secret: &Secret,
        config: &ferry_transport::SessionConfig,
        stop: &CancellationToken,
    ) -> Result<Vec<serde_json::Value>, PeerError> {
        let mut preamble = vec![0];
        match tunnel {
            Some(id) => short(id, &mut preamble),
            None => preamble.push(0),
        }
        let (stream, _slot, _) = self.ask(node, advertise, &preamble, secret, config, stop).await?;
        let mut text = Vec::new();
        let mut limited = stream.take(MAX_LISTING);
        tokio::time::timeout(PEER_TIMEOUT, limited.read_to_end(&mut text))
            .await
            .map_err(|_| link_error(node, "the listing did not arrive in time"))?
            .map_err(|err| link_error(node, err))?;
        match serde_json::from_slice(&text) {
            Ok(serde_json::Value::Array(list)) => Ok(list),
            _ => Err(link_error(node, "the listing is not a JSON array")),
        }
    }

    /// Opens a stream to `node`, writes `preamble` and waits for its one-byte answer (one of the
    /// `ACK_OK` codes, returned, or a refusal). A link that fails here is forgotten, so the next
    /// request dials again instead of waiting on a connection that may be dead.
    async fn ask(
        &self,
        node: &str,
        advertise: Option<&str>,
        preamble: &[u8],
        secret: &Secret,
        config: &ferry_transport::SessionConfig,
        stop: &CancellationToken,
    ) -> Result<(multiplex::Stream, StreamSlot, u8), PeerError> {
        let slot = Arc::clone(
            self.links.lock().unwrap_or_else(|e| e.into_inner()).entry(node.to_owned()).or_default(),
        );
        let asked = async {
            let opener = {
                let mut link = slot.lock().await;
                match link.as_ref().filter(|o| !o.is_closed()) {
                    Some(opener) => opener.clone(),
                    None => {
                        let advertise = advertise.ok_or_else(|| PeerError::NoAddress(node.to_owned()))?;
                        let opener = tokio::time::timeout(
                            PEER_TIMEOUT,
                            self.dial(advertise, secret, config, stop.child_token()),
                        )
                        .await
                        .map_err(|_| link_error(node, "connecting timed out"))?
                        .map_err(|err| link_error(node, err))?;
                        debug!(node, advertise, "peer link up");
                        *link = Some(opener.clone());
                        opener
                    }
                }
            };
            let (mut stream, stream_slot) = opener.open().await.map_err(|err| link_error(node, err))?;
            let answer = async {
                stream.write_all(preamble).await?;
                stream.flush().await?;
                stream.read_u8().await
            };
            match tokio::time::timeout(PEER_TIMEOUT, answer).await {
                Ok(Ok(code @ (ACK_OK | ACK_OK_AUTHENTICATED))) => Ok((stream, stream_slot, code)),
                Ok(Ok(code)) => Err(PeerError::Refused { node: node.to_owned(), code }),
                Ok(Err(err)) => Err(link_error(node, err)),
                Err(_) => Err(link_error(node, "no answer in time")),
            }
        };
        let result = asked.await;
        if let Err(PeerError::Link { .. }) = &result {
            slot.lock().await.take();
        }
        result
    }
}

impl Links {
    /// Connects to a peer listener (over TLS for an `https://` address) and starts the session
    /// over it.
    async fn dial(
        &self,
        advertise: &str,
        secret: &Secret,
        config: &ferry_transport::SessionConfig,
        stop: CancellationToken,
    ) -> Result<mux::StreamOpener, String> {
        let (scheme, authority) =
            split_advertise(advertise).ok_or_else(|| format!("{advertise:?} is not http(s)://HOST:PORT"))?;
        let tcp = TcpStream::connect(authority)
            .await
            .map_err(|err| format!("cannot connect to {authority}: {err}"))?;
        let _ = tcp.set_nodelay(true);
        match scheme {
            Scheme::Plain => upgrade(tcp, "ws", authority, secret, config, stop).await,
            Scheme::Tls => {
                let host = authority.rsplit_once(':').map_or(authority, |(host, _)| host);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let name = ServerName::try_from(host.to_owned())
                    .map_err(|_| format!("{host:?} is not a host name or address"))?;
                let tls = self
                    .connector()?
                    .connect(name, tcp)
                    .await
                    .map_err(|err| format!("TLS with {authority}: {err}"))?;
                upgrade(tls, "wss", authority, secret, config, stop).await
            }
        }
    }
}

/// The WebSocket handshake with the cluster secret on a connection to a peer listener, then the
/// session over it.
async fn upgrade<S>(
    io: S,
    scheme: &str,
    authority: &str,
    secret: &Secret,
    config: &ferry_transport::SessionConfig,
    stop: CancellationToken,
) -> Result<mux::StreamOpener, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut request =
        format!("{scheme}://{authority}{PEER_PATH}").into_client_request().map_err(|err| err.to_string())?;
    let mut bearer = b"Bearer ".to_vec();
    bearer.extend_from_slice(secret.expose());
    let bearer =
        HeaderValue::from_bytes(&bearer).map_err(|_| "the cluster secret is not a valid header value")?;
    request.headers_mut().insert(header::AUTHORIZATION, bearer);
    let (ws, _) = tokio_tungstenite::client_async(request, io).await.map_err(|err| err.to_string())?;
    let io = WsIo::new(ws, WsRole::Client, Arc::new(IoCounters::default()));
    let (driver, opener) = mux::session(io, multiplex::Mode::Client, config);
    // The other node never opens streams on this link: any it does are dropped (reset).
    tokio::spawn(async move {
        if let Err(err) = driver.run(drop, stop).await {
            debug!(%err, "peer link ended");
        }
    });
    Ok(opener)
}

/// How a peer listener is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scheme {
    /// `http://`: a plain WebSocket.
    Plain,
    /// `https://`: a WebSocket over TLS.
    Tls,
}

impl Scheme {
    pub(crate) fn is_tls(self) -> bool {
        self == Self::Tls
    }
}

/// An advertised peer address, `http://HOST:PORT` or `https://HOST:PORT` (a trailing `/` allowed),
/// as its scheme and `HOST:PORT`.
pub(crate) fn split_advertise(url: &str) -> Option<(Scheme, &str)> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (Scheme::Plain, rest)
    } else {
        (Scheme::Tls, url.strip_prefix("https://")?)
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = authority.rsplit_once(':')?;
    let valid_host = !host.is_empty()
        && !host.contains(['/', '@', '?', '#', ' '])
        && (!host.contains(':') || (host.starts_with('[') && host.ends_with(']')));
    (valid_host && port.parse::<u16>().is_ok_and(|port| port > 0)).then_some((scheme, authority))
}

/// The TLS client for `https://` peers: the CA certificates in `peer_ca` only, or the system's
/// roots without it. ALPN says `http/1.1`, as the peer listener does.
fn peer_connector(peer_ca: Option<&Path>) -> Result<TlsConnector, String> {
    let mut roots = RootCertStore::empty();
    match peer_ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|err| format!("--peer-ca {}: {err}", path.display()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|err| format!("--peer-ca {}: {err}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("--peer-ca {} holds no PEM certificate", path.display()));
            }
            for cert in certs {
                roots.add(cert).map_err(|err| format!("--peer-ca {}: {err}", path.display()))?;
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if roots.is_empty() {
                return Err("no CA certificates to check https:// peers with: pass --peer-ca".into());
            }
        }
    }
    let mut config = ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}
