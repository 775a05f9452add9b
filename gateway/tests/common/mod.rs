//! `TestEnv`: a real sample upstream, gateway and agent on loopback with ephemeral ports, started
//! in this process and torn down on drop. `start` returns once the agent's session is registered
//! at the gateway (an explicit readiness signal, no sleeps).
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_agent::AgentConfig;
use ferry_agent::config::{GatewayUrl, Upstream};
use ferry_benches::upstream::{UpstreamStats, serve};
use ferry_codec::TunnelId;
use ferry_gateway::{Gateway, GatewayConfig};
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Bound on every test.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(120);

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Runs a test body under [`TEST_TIMEOUT`].
pub async fn bounded<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_TIMEOUT, test).await.expect("test timed out")
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
}

pub struct TestEnv {
    pub gateway: Arc<Gateway>,
    pub gateway_addr: SocketAddr,
    pub upstream_addr: SocketAddr,
    pub stats: Arc<UpstreamStats>,
    pub tunnel_id: TunnelId,
    pub shutdown: CancellationToken,
    pub agent_shutdown: CancellationToken,
}

pub const TUNNEL: &str = "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_web";

impl TestEnv {
    pub async fn start() -> Self {
        Self::start_with(GatewayConfig::default(), |_| {}).await
    }

    /// Starts everything; `tweak` adjusts the agent's configuration before it runs.
    pub async fn start_with(gateway_config: GatewayConfig, tweak: impl FnOnce(&mut AgentConfig)) -> Self {
        init_tracing();
        let shutdown = CancellationToken::new();
        let stats = Arc::new(UpstreamStats::default());
        let upstream_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = upstream_listener.local_addr().unwrap();
        tokio::spawn(serve(upstream_listener, Arc::clone(&stats), shutdown.clone()));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway_addr = listener.local_addr().unwrap();
        let gateway = Gateway::new(gateway_config, shutdown.clone()).unwrap();
        let serving = Arc::clone(&gateway);
        tokio::spawn(async move { serving.serve(listener).await });

        let tunnel_id: TunnelId = TUNNEL.parse().unwrap();
        let env = Self {
            gateway,
            gateway_addr,
            upstream_addr,
            stats,
            tunnel_id,
            shutdown,
            agent_shutdown: CancellationToken::new(),
        };
        let mut config = env.agent_config();
        tweak(&mut config);
        env.spawn_agent(config);
        env.wait_for_sessions(1).await;
        env
    }

    pub fn agent_config(&self) -> AgentConfig {
        AgentConfig::new(
            self.tunnel_id.clone(),
            Upstream::parse(&self.upstream_addr.to_string()).unwrap(),
            GatewayUrl::parse(&format!("ws://{}/ws", self.gateway_addr)).unwrap(),
        )
    }

    /// Runs an agent until the env is dropped (or `agent_shutdown` fires).
    pub fn spawn_agent(&self, config: AgentConfig) {
        let token = self.agent_shutdown.child_token();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                result = ferry_agent::run(config, token) => { result.unwrap(); }
                () = shutdown.cancelled() => {}
            }
        });
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
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.shutdown.cancel();
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

/// A port nothing listens on.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}
