//! Several gateways through a real Redis (`redis-server`, started here on a loopback port): nodes
//! see each other's tunnels at once, forget a killed node after its TTL, keep serving their own
//! sessions while Redis is down, and fill a Redis restarted empty within one refresh.
//!
//! Without `redis-server` these tests say so and return; under `.ci/run` (which installs it and
//! sets `FERRY_CI`) they fail instead.
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ferry_gateway::cluster::{ClusterConfig, Holding, Owners};
use ferry_gateway::{Gateway, GatewayConfig};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A `redis-server` of this test, on a loopback port, without persistence; killed on drop.
struct Redis {
    port: u16,
    child: Child,
}

impl Redis {
    /// Starts one, or `None` (with a loud message) when the binary is missing.
    async fn start() -> Option<Self> {
        if Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_err() {
            assert!(
                std::env::var_os("FERRY_CI").is_none(),
                "the cluster tests need redis-server: apt-get install -y redis-server"
            );
            eprintln!("SKIPPED: redis-server is not installed (apt-get install -y redis-server)");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
        Some(Self::start_on(port).await)
    }

    async fn start_on(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let redis = Self { port, child };
        redis.wait_ready().await;
        redis
    }

    /// Readiness: the server answers PING.
    async fn wait_ready(&self) {
        loop {
            if let Ok(reply) = self.command("PING\r\n").await
                && reply.starts_with("+PONG")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends one inline command and returns what came back first.
    async fn command(&self, line: &str) -> std::io::Result<String> {
        let mut conn = TcpStream::connect(("127.0.0.1", self.port)).await?;
        conn.write_all(line.as_bytes()).await?;
        let mut buf = vec![0u8; 64 * 1024];
        let n = conn.read(&mut buf).await?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stops it (SIGKILL) and starts an empty one on the same port.
    async fn restart_empty(&mut self) {
        self.stop();
        *self = Self::start_on(self.port).await;
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A node with fast timings: refresh 100 ms, alive 400 ms after its last one, a stale view
/// trusted for 1.5 s.
fn node_config(redis: &Redis, id: &str) -> GatewayConfig {
    let cluster = ClusterConfig {
        node_id: id.into(),
        advertise: Some(format!("http://{id}.invalid:4000")),
        refresh: Duration::from_millis(100),
        ttl: Duration::from_millis(400),
        stale_grace: Duration::from_millis(1500),
        ..ClusterConfig::new(&redis.url()).unwrap()
    };
    GatewayConfig { cluster: Some(cluster), ..GatewayConfig::default() }
}

/// A node that refreshes once an hour: whatever it learns after joining, it learns from events.
fn events_only(mut config: GatewayConfig) -> GatewayConfig {
    let cluster = config.cluster.as_mut().unwrap();
    cluster.refresh = Duration::from_secs(3600);
    cluster.ttl = cluster.refresh * 3;
    cluster.stale_grace = cluster.ttl;
    config
}

async fn start_node(config: GatewayConfig) -> (GatewayRun, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (start_gateway(config, listener), addr)
}

/// Waits until `gateway`'s view of the cluster satisfies `condition`; returns how long it took.
async fn until(gateway: &Arc<Gateway>, condition: impl Fn(&Owners) -> bool, tunnel: &str) -> Duration {
    let started = Instant::now();
    let cluster = Arc::clone(gateway.cluster.as_ref().unwrap());
    let tunnel = tunnel.parse().unwrap();
    gateway.registry.wait_until(|_| condition(&cluster.owners(&tunnel))).await;
    started.elapsed()
}

fn held_by(owners: &Owners, node: &str) -> bool {
    matches!(owners, Owners::Known(o) if o.len() == 1 && o[0].node == node)
}

fn held_by_none(owners: &Owners) -> bool {
    matches!(owners, Owners::Known(o) if o.is_empty())
}

#[tokio::test]
async fn a_tunnel_is_seen_by_the_other_node_at_once_and_forgotten_when_its_agent_goes() {
    bounded(async {
        let Some(redis) = Redis::start().await else { return };
        init_tracing();
        let (b, _) = start_node(events_only(node_config(&redis, "node-b"))).await;
        // B has read Redis once (an empty cluster): the rest must come by pub/sub.
        until(&b.gateway, held_by_none, TUNNEL).await;
        let started = Instant::now();
        let mut env = TestEnv::start_with(events_only(node_config(&redis, "node-a")), |_| {}).await;
        let seen = until(&b.gateway, |o| held_by(o, "node-a"), TUNNEL).await;
        println!("node B saw the new tunnel {:?} after the agent was registered at A", seen);
        // A node first heard of in an event makes B read Redis for how to reach it.
        let reachable = until(
            &b.gateway,
            |o| matches!(o, Owners::Known(o) if o.len() == 1 && o[0].advertise.is_some()),
            TUNNEL,
        )
        .await;
        println!("and how to reach node A {reachable:?} later");
        println!("(agent start to B knowing it: {:?})", started.elapsed());
        let Owners::Known(owners) = b.gateway.cluster.as_ref().unwrap().owners(&TUNNEL.parse().unwrap())
        else {
            unreachable!()
        };
        assert_eq!(owners[0].holding, Holding { sessions: 1, healthy: 1 });
        assert_eq!(owners[0].advertise.as_deref(), Some("http://node-a.invalid:4000"));
        // The node's own sessions are not "elsewhere".
        assert!(held_by_none(&env.gateway.cluster.as_ref().unwrap().owners(&TUNNEL.parse().unwrap())));

        let metrics = env.gateway.metrics.render(&env.gateway.registry);
        assert!(metrics.contains("ferry_cluster_nodes 2"), "A's full read found both: {metrics}");
        assert!(metrics.contains("ferry_cluster_redis_errors_total 0"), "{metrics}");

        let agent = env.agent.take().unwrap();
        agent.stop().await.unwrap();
        let gone = until(&b.gateway, held_by_none, TUNNEL).await;
        println!("node B saw the tunnel go {gone:?} after its agent stopped");
        let cluster = b.gateway.cluster.as_ref().unwrap();
        assert!(cluster.recently_held(&TUNNEL.parse().unwrap(), Duration::from_secs(60)));

        // A node that leaves cleanly is gone from the others at once.
        let b_cluster = Arc::clone(b.gateway.cluster.as_ref().unwrap());
        assert!(b_cluster.nodes().iter().any(|(id, _)| id == "node-a"));
        env.gateway_run.shutdown.cancel();
        (&mut env.gateway_run.task).await.unwrap();
        b.gateway.registry.wait_until(|_| b_cluster.nodes().is_empty()).await;
        assert!(redis.command("ZRANGE ferry:nodes 0 -1\r\n").await.unwrap().contains("node-b"));
        let left = redis.command("ZSCORE ferry:nodes node-a\r\n").await.unwrap();
        assert!(left.starts_with("$-1") || left.starts_with("_"), "{left}");
        b.shutdown.cancel();
        b.task.await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_killed_node_lapses_after_its_ttl() {
    bounded(async {
        let Some(redis) = Redis::start().await else { return };
        let (b, _) = start_node(node_config(&redis, "node-b")).await;
        // Node A is a real process, so it can be SIGKILLed.
        let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
        let mut a = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--cluster", &redis.url()])
            .args(["--node-id", "node-a", "--cluster-ttl", "600ms", "--threads", "1"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let env = TestEnv::start_without_agent(GatewayConfig::default()).await;
        let mut agent_config = env.agent_config();
        agent_config.gateway =
            ferry_agent::config::GatewayUrl::parse(&format!("ws://127.0.0.1:{port}/ws")).unwrap();
        let agent = spawn_agent(agent_config);
        until(&b.gateway, |o| held_by(o, "node-a"), TUNNEL).await;

        a.kill().unwrap();
        let killed = Instant::now();
        a.wait().unwrap();
        until(&b.gateway, held_by_none, TUNNEL).await;
        let lapsed = killed.elapsed();
        println!("node A's tunnels left B's view {lapsed:?} after SIGKILL (TTL 600 ms, refresh 100 ms at B)");
        assert!(lapsed >= Duration::from_millis(300), "a node is not dropped before its TTL: {lapsed:?}");
        agent.kill();
        b.shutdown.cancel();
        b.task.await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn redis_down_keeps_local_sessions_served_and_a_restarted_redis_is_filled_again() {
    bounded(async {
        let Some(mut redis) = Redis::start().await else { return };
        let (b, _) = start_node(node_config(&redis, "node-b")).await;
        let env = TestEnv::start_with(node_config(&redis, "node-a"), |_| {}).await;
        until(&b.gateway, |o| held_by(o, "node-a"), TUNNEL).await;

        redis.stop();
        let (response, _) = get(&env.url("/")).await;
        assert_eq!(response.status(), StatusCode::OK, "local sessions are served without Redis");
        // The last known owners are used for the grace period, then nothing is claimed.
        let stale = until(&b.gateway, |o| *o == Owners::Unknown, TUNNEL).await;
        println!("B stopped trusting its view {stale:?} after Redis went down (grace 1.5 s)");
        let (response, _) = get(&env.url("/")).await;
        assert_eq!(response.status(), StatusCode::OK);
        let metrics = env.gateway.metrics.render(&env.gateway.registry);
        assert!(!metrics.contains("ferry_cluster_redis_errors_total 0"), "errors are counted");

        let restarted = Instant::now();
        redis.restart_empty().await;
        until(&b.gateway, |o| held_by(o, "node-a"), TUNNEL).await;
        println!("A's tunnel back in B's view {:?} after an empty Redis started", restarted.elapsed());
        let tunnels = redis.command("HGETALL ferry:tunnels:node-a\r\n").await.unwrap();
        assert!(tunnels.contains(TUNNEL), "{tunnels}");
        b.shutdown.cancel();
        b.task.await.unwrap();
    })
    .await;
}
