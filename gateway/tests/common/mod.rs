//! `TestEnv`: a real sample upstream, gateway and agent on loopback with ephemeral ports, started
//! in this process and torn down on drop. `start` returns once the agent's session is registered
//! at the gateway (an explicit readiness signal, no sleeps). Helpers for lifecycle tests: agents
//! that can be stopped or killed, a gateway that can be restarted on the same port, a raw agent
//! that speaks the handshake by hand, and a TCP proxy that can stop forwarding without closing.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_agent::config::{GatewayUrl, Upstream};
use ferry_agent::{AgentConfig, AgentError};
use ferry_benches::upstream::{UpstreamStats, serve};
use ferry_codec::{
    AuthResult, ClientAuth, InstanceId, PROTOCOL_VERSION, Secret, ServerHello, Transcript, TunnelId,
};
use ferry_gateway::{Gateway, GatewayConfig};
use ferry_transport::ws::{SUBPROTOCOL, recv_message, send_message};
use http::{HeaderValue, Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

pub mod pki;
pub mod redis;

/// Bound on every test.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(120);

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Runs a test body under [`TEST_TIMEOUT`].
pub async fn bounded<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_TIMEOUT, test).await.expect("test timed out")
}

/// Waits until `counter` stops moving (unchanged across 10 looks 100 ms apart) and returns it.
pub async fn plateau(counter: impl Fn() -> u64) -> u64 {
    let (mut last, mut still) = (counter(), 0);
    while still < 10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = counter();
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    last
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
}

pub const TUNNEL: &str = "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_web";

/// A gateway serving on a fixed address; can be stopped and started again there.
pub struct GatewayRun {
    pub gateway: Arc<Gateway>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<()>,
}

/// Starts a gateway on `listener`.
pub fn start_gateway(config: GatewayConfig, listener: TcpListener) -> GatewayRun {
    let shutdown = CancellationToken::new();
    let gateway = Gateway::new(config, shutdown.clone()).unwrap();
    let serving = Arc::clone(&gateway);
    let task = tokio::spawn(async move { serving.serve(listener).await });
    GatewayRun { gateway, shutdown, task }
}

/// An agent task: stop it (drain) or kill it (drop everything at once).
pub struct AgentRun {
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), AgentError>>,
}

impl AgentRun {
    /// SIGTERM: drain and exit.
    pub async fn stop(self) -> Result<(), AgentError> {
        self.shutdown.cancel();
        self.task.await.unwrap()
    }

    /// A crash: the task is dropped mid-flight, its sockets close.
    pub fn kill(&self) {
        self.task.abort();
    }
}

pub fn spawn_agent(config: AgentConfig) -> AgentRun {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(ferry_agent::run(config, shutdown.clone()));
    AgentRun { shutdown, task }
}

/// An agent running its request inspector on a loopback port; the port.
pub async fn spawn_agent_with_inspector(config: AgentConfig) -> (AgentRun, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inspector = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let extras = ferry_agent::Extras { inspect: Some(listener), ..Default::default() };
    let task = tokio::spawn(ferry_agent::run_with(config, extras, shutdown.clone()));
    (AgentRun { shutdown, task }, inspector)
}

pub struct TestEnv {
    pub gateway: Arc<Gateway>,
    pub gateway_run: GatewayRun,
    pub gateway_config: GatewayConfig,
    pub gateway_addr: SocketAddr,
    pub upstream_addr: SocketAddr,
    pub stats: Arc<UpstreamStats>,
    pub tunnel_id: TunnelId,
    pub shutdown: CancellationToken,
    pub agent: Option<AgentRun>,
}

impl TestEnv {
    pub async fn start() -> Self {
        Self::start_with(GatewayConfig::default(), |_| {}).await
    }

    /// Starts everything; `tweak` adjusts the agent's configuration before it runs.
    pub async fn start_with(gateway_config: GatewayConfig, tweak: impl FnOnce(&mut AgentConfig)) -> Self {
        let mut env = Self::start_without_agent(gateway_config).await;
        let mut config = env.agent_config();
        tweak(&mut config);
        env.agent = Some(spawn_agent(config));
        env.wait_for_sessions(1).await;
        env
    }

    /// Upstream and gateway only.
    pub async fn start_without_agent(gateway_config: GatewayConfig) -> Self {
        init_tracing();
        let shutdown = CancellationToken::new();
        let stats = Arc::new(UpstreamStats::default());
        let upstream_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = upstream_listener.local_addr().unwrap();
        tokio::spawn(serve(upstream_listener, Arc::clone(&stats), shutdown.clone()));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway_addr = listener.local_addr().unwrap();
        let gateway_run = start_gateway(gateway_config.clone(), listener);
        Self {
            gateway: Arc::clone(&gateway_run.gateway),
            gateway_run,
            gateway_config,
            gateway_addr,
            upstream_addr,
            stats,
            tunnel_id: TUNNEL.parse().unwrap(),
            shutdown,
            agent: None,
        }
    }

    /// A configuration for another agent of this tunnel; reconnects fast, for tests.
    pub fn agent_config(&self) -> AgentConfig {
        let mut config = AgentConfig::new(
            self.tunnel_id.clone(),
            Upstream::parse(&self.upstream_addr.to_string()).unwrap(),
            GatewayUrl::parse(&format!("ws://{}/ws", self.gateway_addr)).unwrap(),
        );
        config.reconnect_initial = Duration::from_millis(50);
        config.reconnect_max = Duration::from_millis(500);
        config
    }

    /// Stops the gateway (drains) and starts a new one on the same address.
    pub async fn restart_gateway(&mut self) {
        self.gateway_run.shutdown.cancel();
        (&mut self.gateway_run.task).await.unwrap();
        let listener = TcpListener::bind(self.gateway_addr).await.unwrap();
        self.gateway_run = start_gateway(self.gateway_config.clone(), listener);
        self.gateway = Arc::clone(&self.gateway_run.gateway);
    }

    /// Waits until the tunnel has exactly `n` sessions at the gateway.
    pub async fn wait_for_sessions(&self, n: usize) {
        let id = self.tunnel_id.clone();
        self.gateway.registry.wait_until(|registry| registry.of(&id).len() == n).await;
    }

    /// `http://gateway/t/{tunnel}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/t/{}{}", self.gateway_addr, self.tunnel_id, path)
    }

    /// `http://upstream{path}`, the same service without the tunnel.
    pub fn direct_url(&self, path: &str) -> String {
        format!("http://{}{}", self.upstream_addr, path)
    }

    /// `http://gateway{path}`.
    pub fn gateway_url(&self, path: &str) -> String {
        format!("http://{}{}", self.gateway_addr, path)
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.gateway_run.shutdown.cancel();
        if let Some(agent) = &self.agent {
            agent.kill();
        }
    }
}

/// An HTTP/1.1 client.
pub fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 prior-knowledge (h2c) client.
pub fn h2c_client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).map_err(|never| match never {}).boxed_unsync()
}

/// Sends a request and collects the response.
pub async fn fetch(client: &Client<HttpConnector, Body>, request: Request<Body>) -> (Response<()>, Bytes) {
    let response = client.request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (Response::from_parts(parts, ()), body)
}

pub async fn get(url: &str) -> (Response<()>, Bytes) {
    fetch(&client(), Request::get(url).body(empty()).unwrap()).await
}

/// Sends a request; returns the response with its body unread.
pub async fn send(client: &Client<HttpConnector, Body>, request: Request<Body>) -> Response<Incoming> {
    client.request(request).await.unwrap()
}

pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|err| panic!("not JSON ({err}): {}", String::from_utf8_lossy(body)))
}

/// A connection to `to` from `from` (a loopback address of the test's choosing).
pub async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// `GET path` from `from`; the status and the body.
pub async fn get_from(from: &str, gateway: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = get_from_with(from, gateway, path, &[]).await;
    (status, body)
}

/// `GET path` from `from` with more header fields (a `Host` among them replaces the default);
/// the status, the head and the body.
pub async fn get_from_with(
    from: &str,
    gateway: SocketAddr,
    path: &str,
    fields: &[(&str, &str)],
) -> (u16, String, String) {
    let mut socket = connect_from(from, gateway).await;
    let mut request = format!("GET {path} HTTP/1.1\r\nConnection: close\r\n");
    if !fields.iter().any(|(name, _)| name.eq_ignore_ascii_case("host")) {
        request.push_str("Host: gateway\r\n");
    }
    for (name, value) in fields {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (status, head.to_owned(), body.to_owned())
}

/// An htpasswd line for `user` (bcrypt at its lowest cost: tests need not be slow).
pub fn htpasswd(user: &str, password: &str) -> String {
    format!("{user}:{}", bcrypt::hash(password, 4).unwrap())
}

/// `Authorization: Basic` for `user` and `password`.
pub fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

/// Reads from `socket` and expects a reset (RST), not data or an orderly end.
pub async fn expect_reset(socket: &mut TcpStream) {
    let mut buf = [0u8; 16];
    let err = socket.read(&mut buf).await.expect_err("a reset, not data or an orderly end");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

/// An address nothing listens on. On a loopback address of its own, so that a listener another
/// test binds meanwhile (on 127.0.0.1, perhaps with the same port) cannot answer there.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.77:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A WebSocket to the gateway's agent endpoint, before any ferry message.
pub async fn raw_ws(gateway: SocketAddr) -> WebSocketStream<TcpStream> {
    let mut request = format!("ws://{gateway}/ws").into_client_request().unwrap();
    request.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static(SUBPROTOCOL));
    let tcp = TcpStream::connect(gateway).await.unwrap();
    tokio_tungstenite::client_async(request, tcp).await.unwrap().0
}

/// A hand-made agent handshake: returns the WebSocket, the hello and the gateway's verdict.
/// `auth_bytes`, when given, is sent as the `ClientAuth` instead of a fresh one (replays).
pub async fn raw_handshake(
    gateway: SocketAddr,
    tunnel: &TunnelId,
    instance: InstanceId,
    secret: Option<&Secret>,
    auth_bytes: Option<Bytes>,
) -> (WebSocketStream<TcpStream>, ServerHello, Bytes, AuthResult) {
    let mut ws = raw_ws(gateway).await;
    let hello = ServerHello::decode(recv_message(&mut ws).await.unwrap()).unwrap();
    let auth = auth_bytes.unwrap_or_else(|| {
        let mac = secret
            .map(|secret| Transcript::client(PROTOCOL_VERSION, &hello.nonce, tunnel, &instance).sign(secret));
        ClientAuth {
            version: PROTOCOL_VERSION,
            tunnel_id: tunnel.clone(),
            instance_id: instance,
            agent_version: "raw test agent".into(),
            mac,
            tcp: Vec::new(),
            allow_ip: Vec::new(),
            deny_ip: Vec::new(),
            basic_auth: Vec::new(),
        }
        .encode()
    });
    send_message(&mut ws, auth.clone()).await.unwrap();
    let result = AuthResult::decode(recv_message(&mut ws).await.unwrap()).unwrap();
    (ws, hello, auth, result)
}

/// A TCP proxy that can stop forwarding without closing anything: packets "dropped" by a
/// network partition, with no FIN and no RST.
pub struct PartitionProxy {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub connections: Arc<std::sync::atomic::AtomicU64>,
    paused: watch::Sender<bool>,
}

impl PartitionProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (paused, _) = watch::channel(false);
        let watch = paused.clone();
        let connections: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let counted = Arc::clone(&connections);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(target).await else { continue };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(forward(client_read, server_write, watch.subscribe()));
                tokio::spawn(forward(server_read, client_write, watch.subscribe()));
            }
        });
        Self { addr, connections, paused }
    }

    /// Stops forwarding (bytes wait in the proxy); nothing is closed.
    pub fn partition(&self) {
        self.paused.send_replace(true);
    }

    /// Resumes forwarding.
    pub fn heal(&self) {
        self.paused.send_replace(false);
    }
}

async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut paused: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // A partition that starts while bytes are in hand swallows them until it heals.
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Runs the tests of one binary that take it one at a time: their timing and process-wide
/// oracles (RSS, open files, the witness's latency) are not shared with another fault.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The second tunnel of "keeps serving": an agent of its own on the same gateway and upstream,
/// and a client that asks it for a small body every 10 ms while a fault runs.
pub const WITNESS: &str = "agent_99999999-8888-7777-6666-555555555555_witness";

/// One witness request answered: how long it took, and when (since the witness started) it was
/// sent, to tell which part of a fault slowed it.
type Served = (Duration, Duration);

pub struct Witness {
    stop: CancellationToken,
    task: JoinHandle<(Vec<Served>, Vec<String>)>,
    agent: AgentRun,
}

impl Witness {
    /// Starts the witness tunnel and its client; returns once the witness tunnel is up (its first
    /// request may still be on its way, counted by the same upstream as the test's own).
    pub async fn start(env: &TestEnv) -> Self {
        let mut config = env.agent_config();
        config.tunnel_id = WITNESS.parse().unwrap();
        let agent = spawn_agent(config);
        let id: TunnelId = WITNESS.parse().unwrap();
        env.gateway.registry.wait_until(|r| !r.of(&id).is_empty()).await;
        let url = format!("http://{}/t/{WITNESS}/bytes/64", env.gateway_addr);
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let client = client();
            let (mut latencies, mut failures) = (Vec::new(), Vec::new());
            let begun = std::time::Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            while !token.is_cancelled() {
                tick.tick().await;
                let started = std::time::Instant::now();
                let request = Request::get(&url).body(empty()).unwrap();
                let outcome = tokio::time::timeout(Duration::from_secs(5), async {
                    let response = client.request(request).await?;
                    let status = response.status();
                    let body = response.into_body().collect().await?.to_bytes();
                    Ok::<_, BoxError>((status, body.len()))
                })
                .await;
                match outcome {
                    Ok(Ok((status, 64))) if status.is_success() => {
                        latencies.push((started.elapsed(), started - begun))
                    }
                    other => failures.push(format!("{other:?}")),
                }
            }
            (latencies, failures)
        });
        Self { stop, task, agent }
    }

    /// Stops the client and checks the witness was served throughout: every request answered,
    /// p99 under 100 ms.
    pub async fn finish(self) {
        // "During and after": a few more requests once the fault is over.
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.stop.cancel();
        let (mut latencies, failures) = self.task.await.unwrap();
        self.agent.kill();
        assert!(failures.is_empty(), "the second tunnel failed {} times: {failures:?}", failures.len());
        latencies.sort();
        assert!(!latencies.is_empty(), "the second tunnel was never asked");
        let p99 = latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)].0;
        let slowest: Vec<_> = latencies.iter().rev().take(5).collect();
        println!("second tunnel: {} requests, p99 {p99:?}; slowest (took, at): {slowest:?}", latencies.len());
        assert!(p99 < Duration::from_millis(100), "the second tunnel's p99 was {p99:?}");
    }
}

/// What the gateway holds: its connections (sockets on its port, as the kernel lists them) and
/// the resident memory of this process (gateway, agents, upstream and clients together).
#[derive(Debug, Clone, Copy)]
pub struct Vitals {
    pub rss: u64,
    pub connections: usize,
    port: u16,
}

impl Vitals {
    pub fn of(env: &TestEnv) -> Self {
        Self::at(env.gateway_addr.port())
    }

    fn at(port: u16) -> Self {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        Self { rss: pages * 4096, connections: connections_on(port), port }
    }

    /// Waits (up to 10 s) until the gateway's connections are back within 10 % of `baseline`
    /// (and 2) and RSS within 10 % (and 32 MiB: the allocator keeps freed memory for reuse,
    /// which is not a leak); then returns the reading.
    pub async fn settle_back_to(baseline: Self) -> Self {
        let connection_limit = baseline.connections + (baseline.connections / 10).max(2);
        let rss_limit = baseline.rss + (baseline.rss / 10).max(32 << 20);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = Self::at(baseline.port);
            if now.connections <= connection_limit && now.rss <= rss_limit {
                return now;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not back to baseline: {now:?} against {baseline:?} (limits {connection_limit} connections, {rss_limit} bytes)"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Sockets whose local port is `port`, other than the listener and those in TIME_WAIT (which
/// hold nothing): the connections a server on that port has open.
fn connections_on(port: u16) -> usize {
    let mut count = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1).unwrap_or("");
            let state = fields.nth(1).unwrap_or("");
            let local_port = local.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && state != "0A" && state != "06" {
                count += 1;
            }
        }
    }
    count
}

/// Panics raised outside the tests' own code (in the gateway, the agent or a dependency) since
/// the process started.
pub fn panics_outside_tests() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info
                .location()
                .is_some_and(|l| !l.file().contains("/tests/") && !l.file().starts_with("tests/"))
            {
                COUNT.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
    COUNT.load(Ordering::SeqCst)
}

/// An agent made by hand: it passed the handshake and drives its yamux session itself, so a
/// test can make it do what no real agent does.
pub struct EvilAgent {
    pub opener: ferry_transport::StreamOpener,
    pub driver: JoinHandle<Result<(), ferry_transport::TransportError>>,
    pub inbound: tokio::sync::mpsc::Receiver<ferry_transport::multiplex::Stream>,
    pause: Option<tokio::sync::oneshot::Sender<()>>,
}

impl EvilAgent {
    /// Authenticates as `tunnel` (no secret) and opens the control stream with a ping, so the
    /// gateway registers the session; inbound request streams arrive on `inbound`.
    pub async fn connect(gateway: SocketAddr, tunnel: &TunnelId) -> Self {
        let (ws, _, _, result) =
            raw_handshake(gateway, tunnel, InstanceId(uuid::Uuid::new_v4()), None, None).await;
        assert!(matches!(result, AuthResult::Accepted(_)), "{result:?}");
        let (driver, opener) = ferry_transport::mux::session(
            ferry_transport::WsIo::new(
                ws,
                tokio_tungstenite::tungstenite::protocol::Role::Client,
                Arc::default(),
            ),
            ferry_transport::multiplex::Mode::Client,
            &ferry_transport::SessionConfig::default(),
        );
        let (tx, inbound) = tokio::sync::mpsc::channel(1024);
        let (pause, paused) = tokio::sync::oneshot::channel::<()>();
        let driver = tokio::spawn(async move {
            let mut run = Box::pin(driver.run(
                move |stream| {
                    let _ = tx.try_send(stream);
                },
                CancellationToken::new(),
            ));
            tokio::select! {
                ended = &mut run => return ended,
                Ok(()) = paused => {}
            }
            // Paused: the session (and its socket) stays, but nothing reads or writes it.
            std::future::pending::<()>().await;
            drop(run);
            Ok(())
        });
        let (mut control, slot) = opener.open().await.unwrap();
        std::mem::forget(slot);
        let mut hello = bytes::BytesMut::new();
        ferry_codec::ControlMessage::Ping { nonce: 1 }.encode(&mut hello).unwrap();
        futures_util::io::AsyncWriteExt::write_all(&mut control, &hello).await.unwrap();
        // Kept open (and never read): the control stream lives as long as the session.
        std::mem::forget(control);
        Self { opener, driver, inbound, pause: Some(pause) }
    }

    /// From now on nothing reads the socket (nor writes it): the gateway's writes pile up in
    /// the kernel's buffers and then wait.
    pub fn stop_reading(&mut self) {
        if let Some(pause) = self.pause.take() {
            let _ = pause.send(());
        }
    }
}
