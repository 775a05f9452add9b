//! Several gateways through a real Redis (`redis-server`, started here on a loopback port): nodes
//! see each other's tunnels at once, forget a killed node after its TTL, keep serving their own
//! sessions while Redis is down, and fill a Redis restarted empty within one refresh; three node
//! processes behind a real HAProxy serve a tunnel from any node through a node's SIGKILL.
//!
//! Without `redis-server` (or `haproxy`, for the balancer test) these tests say so and return;
//! under `.ci/run` (which installs both and sets `FERRY_CI`) they fail instead.
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pki::Pki;
use common::redis::Redis;
use common::*;
use ferry_codec::Secret;
use ferry_gateway::cluster::{ClusterConfig, Holding, Owners};
use ferry_gateway::{Gateway, GatewayConfig};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};

/// HAProxy in TCP mode in front of three nodes, with the configuration `examples/cluster/`
/// ships; killed on drop.
struct Haproxy {
    child: Child,
    port: u16,
}

impl Haproxy {
    /// Starts one, or `None` (with a loud message) when the binary is missing.
    async fn start(nodes: [SocketAddr; 3]) -> Option<Self> {
        if Command::new("haproxy").arg("-v").stdout(Stdio::null()).status().is_err() {
            assert!(
                std::env::var_os("FERRY_CI").is_none(),
                "the load balancer test needs haproxy: apt-get install -y haproxy"
            );
            eprintln!("SKIPPED: haproxy is not installed (apt-get install -y haproxy)");
            return None;
        }
        // HAProxy cannot say which port it got: take a free one and hand it over.
        let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
        let child = Command::new("haproxy")
            .args(["-db", "-f", concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/cluster/haproxy.cfg")])
            .env("LB_ADDR", format!("127.0.0.1:{port}"))
            .env("NODE_A", nodes[0].to_string())
            .env("NODE_B", nodes[1].to_string())
            .env("NODE_C", nodes[2].to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy starts");
        let haproxy = Self { child, port };
        // Readiness: a node answers through it.
        while try_get(&format!("http://127.0.0.1:{port}/")).await != Some(StatusCode::OK) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Some(haproxy)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const CLUSTER_SECRET: &str = "the nodes' shared secret";

/// A node with fast timings: refresh 100 ms, alive 400 ms after its last one, a stale view
/// trusted for 1.5 s.
fn node_config(redis: &Redis, id: &str) -> GatewayConfig {
    let cluster = ClusterConfig {
        node_id: id.into(),
        advertise: Some(format!("http://{id}.invalid:4000")),
        refresh: Duration::from_millis(100),
        ttl: Duration::from_millis(400),
        stale_grace: Duration::from_millis(1500),
        ..ClusterConfig::new(&redis.url(), Secret::from_text(CLUSTER_SECRET).unwrap()).unwrap()
    };
    GatewayConfig { cluster: Some(cluster), ..GatewayConfig::default() }
}

/// A peer listener on a loopback port, and `config` advertising it.
async fn with_peer_listener(mut config: GatewayConfig) -> (GatewayConfig, TcpListener) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    config.cluster.as_mut().unwrap().advertise = Some(format!("http://{addr}"));
    (config, listener)
}

fn serve_peers(gateway: &Arc<Gateway>, listener: TcpListener) {
    let gateway = Arc::clone(gateway);
    tokio::spawn(async move { gateway.serve_peers(listener).await });
}

/// Node A (with the tunnel's agent, taking forwards) and node B (without), both known to each
/// other; returns A's environment, B, and B's address.
async fn two_nodes(redis: &Redis, b_config: GatewayConfig) -> (TestEnv, GatewayRun, SocketAddr) {
    let (a_config, peers) = with_peer_listener(node_config(redis, "node-a")).await;
    let env = TestEnv::start_with(a_config, |_| {}).await;
    serve_peers(&env.gateway, peers);
    let (b, b_addr) = start_node(b_config).await;
    until_reachable(&b.gateway).await;
    (env, b, b_addr)
}

/// Waits until `gateway` knows one node holds the tunnel, and how to reach it.
async fn until_reachable(gateway: &Arc<Gateway>) -> Duration {
    until(gateway, |o| matches!(o, Owners::Known(o) if o.len() == 1 && o[0].advertise.is_some()), TUNNEL)
        .await
}

fn via(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}/t/{TUNNEL}{path}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

/// A gateway node as a real process (so it can be SIGKILLed), with its peer listener on a
/// loopback port; killed on drop.
struct NodeProcess {
    child: Child,
    /// Its public port, read from its log (the readiness signal).
    port: u16,
}

impl NodeProcess {
    /// Node `id` with `extra` flags.
    async fn start(redis: &Redis, id: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--listen", "127.0.0.1:0", "--cluster", &redis.url(), "--node-id", id, "--threads", "1"])
            .args(["--peer-listen", "127.0.0.1:0"])
            .args(extra)
            .env("FERRY_CLUSTER_SECRET", CLUSTER_SECRET)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let port = listening_port(child.stderr.take().unwrap()).await;
        Self { child, port }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The most memory the process has held (`VmHWM`), in bytes.
    fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn path(path: &std::path::Path) -> &str {
    path.to_str().unwrap()
}

fn ws_url(addr: impl std::fmt::Display) -> ferry_agent::config::GatewayUrl {
    ferry_agent::config::GatewayUrl::parse(&format!("ws://{addr}/ws")).unwrap()
}

/// Reads a gateway's log until it says where it listens; the rest of the log is drained.
async fn listening_port(stderr: std::process::ChildStderr) -> u16 {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("gateway listening addr=").nth(1)
                && let Some(tx) = tx.take()
            {
                let addr: SocketAddr = rest.split_whitespace().next().unwrap().parse().unwrap();
                let _ = tx.send(addr.port());
            }
        }
    });
    rx.await.expect("the gateway says where it listens")
}

/// Waits until `gateway`'s view of the cluster satisfies `condition`; returns how long it took.
async fn until(gateway: &Arc<Gateway>, condition: impl Fn(&Owners) -> bool, tunnel: &str) -> Duration {
    let started = Instant::now();
    let cluster = Arc::clone(gateway.cluster.as_ref().unwrap());
    let tunnel = tunnel.parse().unwrap();
    gateway.registry.wait_until(|_| condition(&cluster.owners(&tunnel))).await;
    started.elapsed()
}

/// Waits until the node at `addr` serves the tunnel (from a session of its own or through
/// another node).
async fn until_served(addr: SocketAddr) {
    let url = via(addr, "/");
    while try_get(&url).await != Some(StatusCode::OK) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A GET on a connection of its own; `None` when no response came back.
async fn try_get(url: &str) -> Option<StatusCode> {
    let response = client().request(Request::get(url).body(empty()).unwrap()).await.ok()?;
    let status = response.status();
    response.into_body().collect().await.ok()?;
    Some(status)
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
        let reachable = until_reachable(&b.gateway).await;
        println!("and how to reach node A {reachable:?} later");
        println!("(agent start to B knowing it: {:?})", started.elapsed());
        let Owners::Known(owners) = b.gateway.cluster.as_ref().unwrap().owners(&TUNNEL.parse().unwrap())
        else {
            unreachable!()
        };
        assert_eq!(owners[0].holding, Holding { sessions: 1, healthy: 1 });
        assert_eq!(owners[0].advertise.as_deref(), Some("http://node-a.invalid:4000"));
        // The node's own sessions are not "elsewhere" (once A has read Redis at all).
        until(&env.gateway, held_by_none, TUNNEL).await;

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
        let mut a = NodeProcess::start(&redis, "node-a", &["--cluster-ttl", "600ms"]).await;
        let env = TestEnv::start_without_agent(GatewayConfig::default()).await;
        let mut agent_config = env.agent_config();
        agent_config.gateway = ws_url(a.addr());
        let agent = spawn_agent(agent_config);
        until(&b.gateway, |o| held_by(o, "node-a"), TUNNEL).await;

        let killed = Instant::now();
        a.kill();
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

#[tokio::test]
async fn a_request_through_the_node_without_the_agent_is_served_by_the_one_with_it() {
    bounded(async {
        let Some(redis) = Redis::start().await else { return };
        let (env, b, b_addr) = two_nodes(&redis, node_config(&redis, "node-b")).await;

        let (direct, direct_body) = get(&env.url("/")).await;
        let (response, body) = get(&via(b_addr, "/")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body, direct_body);
        assert_eq!(
            response.headers()[http::header::CONTENT_TYPE],
            direct.headers()[http::header::CONTENT_TYPE]
        );

        // What the upstream sees is what node B received: B's client address, B in `Via`.
        let (_, body) = get(&via(b_addr, "/headers")).await;
        let seen = json(&body);
        let header = |name: &str| -> Vec<String> {
            seen["headers"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|pair| pair[0] == name)
                .map(|pair| pair[1].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(header("x-forwarded-for"), ["127.0.0.1"], "{seen}");
        assert_eq!(header("host"), [b_addr.to_string()], "{seen}");
        let via_b = header("via");
        assert!(via_b.len() == 1 && via_b[0].starts_with("1.1 ferry-"), "one hop named: {seen}");
        assert_eq!(seen["target"], "/headers", "{seen}");

        let b_metrics = b.gateway.metrics.render(&b.gateway.registry);
        assert!(b_metrics.contains("ferry_cluster_forwards_total{direction=\"out\"} 2"), "{b_metrics}");
        let a_metrics = env.gateway.metrics.render(&env.gateway.registry);
        assert!(a_metrics.contains("ferry_cluster_forwards_total{direction=\"in\"} 2"), "{a_metrics}");

        // A tunnel no node holds is unknown through B as through A.
        let other = format!("http://{b_addr}/t/agent_0b6f4c1e-8a51-4c3e-9d2a-000000000000_web/");
        let (response, body) = get(&other).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(json(&body)["error"]["code"], "tunnel_not_found", "{}", String::from_utf8_lossy(&body));
        b.shutdown.cancel();
    })
    .await;
}

#[tokio::test]
async fn a_gibibyte_streams_through_the_hop_both_ways_intact_in_bounded_memory() {
    bounded(async {
        /// What either node may hold at its peak, whatever the body's size: its own baseline,
        /// the receive windows a stream may grow on the agent's session and on the peer link,
        /// and socket buffers. A node that buffered the body would pass it eight times over.
        const PEAK_RSS_BOUND: u64 = 128 << 20;
        const SIZE: u64 = 1 << 30;

        let Some(redis) = Redis::start().await else { return };
        // Both nodes as processes, so that each one's memory is its own.
        let a = NodeProcess::start(&redis, "node-a", &[]).await;
        let b = NodeProcess::start(&redis, "node-b", &[]).await;
        let env = TestEnv::start_without_agent(GatewayConfig::default()).await;
        let mut config = env.agent_config();
        config.gateway = ws_url(a.addr());
        let agent = spawn_agent(config);
        until_served(b.addr()).await;
        let before = (a.peak_rss(), b.peak_rss());

        let expected = tokio::task::spawn_blocking(|| ferry_benches::upstream::pattern_sha256(SIZE));
        let started = Instant::now();
        let response =
            send(&client(), Request::get(via(b.addr(), &format!("/bytes/{SIZE}"))).body(empty()).unwrap())
                .await;
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let (mut hasher, mut total) = (Sha256::new(), 0u64);
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                total += data.len() as u64;
                hasher.update(&data);
            }
        }
        assert_eq!(total, SIZE);
        assert_eq!(hex(&hasher.finalize()), expected.await.unwrap());
        println!("1 GiB down through the hop in {:?}", started.elapsed());

        let sent = Arc::new(std::sync::Mutex::new(Sha256::new()));
        let hashing = Arc::clone(&sent);
        let chunks = futures_util::stream::unfold(0u64, move |offset| {
            let hashing = Arc::clone(&hashing);
            async move {
                if offset >= SIZE {
                    return None;
                }
                let data = ferry_benches::upstream::pattern(offset, (SIZE - offset).min(64 * 1024) as usize);
                hashing.lock().unwrap().update(&data);
                let next = offset + data.len() as u64;
                Some((Ok::<_, BoxError>(http_body::Frame::data(data)), next))
            }
        });
        let started = Instant::now();
        let request = Request::post(via(b.addr(), "/sink"))
            .header(http::header::CONTENT_LENGTH, SIZE)
            .body(http_body_util::StreamBody::new(chunks).boxed_unsync())
            .unwrap();
        let (response, body) = fetch(&client(), request).await;
        assert_eq!(response.status(), StatusCode::OK);
        let report = json(&body);
        assert_eq!(report["bytes"], SIZE);
        assert_eq!(report["sha256"], hex(&sent.lock().unwrap().clone().finalize()).as_str());
        println!("1 GiB up through the hop in {:?}", started.elapsed());

        let after = (a.peak_rss(), b.peak_rss());
        println!(
            "peak RSS, owner A / forwarding B: {} / {} MiB before, {} / {} MiB after 2 GiB through the hop",
            before.0 >> 20,
            before.1 >> 20,
            after.0 >> 20,
            after.1 >> 20,
        );
        assert!(after.0 < PEAK_RSS_BOUND && after.1 < PEAK_RSS_BOUND, "{after:?}");
        agent.kill();
    })
    .await;
}

#[tokio::test]
async fn a_request_at_the_other_node_waits_for_the_agent_to_come_back_anywhere() {
    bounded(async {
        let Some(redis) = Redis::start().await else { return };
        let (mut env, b, b_addr) = two_nodes(&redis, node_config(&redis, "node-b")).await;
        env.agent.take().unwrap().stop().await.unwrap();
        until(&b.gateway, held_by_none, TUNNEL).await;

        // B holds the request: the tunnel was held in the cluster a moment ago.
        let url = via(b_addr, "/");
        let waiting = tokio::spawn(async move { get(&url).await });
        b.gateway.registry.wait_until(|r| r.waiting(&TUNNEL.parse().unwrap()) == 1).await;
        let back = Instant::now();
        env.agent = Some(spawn_agent(env.agent_config()));
        let (response, _) = waiting.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        println!("the held request at B was served {:?} after the agent came back at A", back.elapsed());
        b.shutdown.cancel();
    })
    .await;
}

#[tokio::test]
async fn a_node_with_the_wrong_cluster_secret_is_refused() {
    bounded(async {
        let Some(redis) = Redis::start().await else { return };
        let mut b_config = node_config(&redis, "node-b");
        b_config.cluster.as_mut().unwrap().secret = Secret::from_text("not the secret").unwrap();
        b_config.pending_timeout = Duration::from_millis(300);
        let (_env, b, b_addr) = two_nodes(&redis, b_config).await;
        let (response, body) = get(&via(b_addr, "/")).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json(&body)["error"]["code"], "tunnel_offline", "{}", String::from_utf8_lossy(&body));
        b.shutdown.cancel();
    })
    .await;
}

#[tokio::test]
async fn peer_links_over_tls_carry_requests_and_a_node_that_does_not_trust_the_certificate_is_refused() {
    bounded(async {
        let Some(redis) = Redis::start().await else { return };
        let (cluster_ca, other_ca) = (Pki::new("peers"), Pki::new("peers-other"));
        // Node A's peer listener speaks TLS with a certificate of the cluster's CA for 127.0.0.1.
        let (mut a_config, peers) = with_peer_listener(node_config(&redis, "node-a")).await;
        let a_cluster = a_config.cluster.as_mut().unwrap();
        a_cluster.advertise = a_cluster.advertise.as_ref().map(|url| url.replace("http://", "https://"));
        a_cluster.peer_tls = Some(cluster_ca.files());
        let a_peer = a_cluster.advertise.clone().unwrap();
        let env = TestEnv::start_with(a_config, |_| {}).await;
        serve_peers(&env.gateway, peers);

        // B trusts the cluster's CA: the request crosses the hop over TLS.
        let mut b_config = node_config(&redis, "node-b");
        b_config.cluster.as_mut().unwrap().peer_ca = Some(cluster_ca.ca());
        let (b, b_addr) = start_node(b_config).await;
        until_reachable(&b.gateway).await;
        let (_, direct) = get(&env.url("/")).await;
        let (response, body) = get(&via(b_addr, "/")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body, direct);

        // C trusts another CA: its link fails the TLS handshake, and nothing reaches the agent.
        let mut c_config = node_config(&redis, "node-c");
        c_config.cluster.as_mut().unwrap().peer_ca = Some(other_ca.ca());
        c_config.pending_timeout = Duration::from_millis(300);
        let (c, c_addr) = start_node(c_config).await;
        until_reachable(&c.gateway).await;
        let (response, body) = get(&via(c_addr, "/")).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json(&body)["error"]["code"], "tunnel_offline", "{}", String::from_utf8_lossy(&body));
        let a_metrics = env.gateway.metrics.render(&env.gateway.registry);
        assert!(a_metrics.contains("ferry_cluster_forwards_total{direction=\"in\"} 1"), "{a_metrics}");

        // A plain WebSocket handshake at the TLS peer listener gets no upgrade.
        assert!(a_peer.starts_with("https://127.0.0.1:"), "{a_peer}");
        let mut plain_client = TcpStream::connect(a_peer.trim_start_matches("https://")).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(
            &mut plain_client,
            b"GET /ferry/peer HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
        let mut reply = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut plain_client, &mut reply).await;
        assert!(!reply.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&reply));
        for node in [b, c] {
            node.shutdown.cancel();
        }
    })
    .await;
}

#[tokio::test]
async fn events_and_upgrades_cross_the_hop_as_they_happen() {
    bounded(async {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;

        let Some(redis) = Redis::start().await else { return };
        let (env, b, b_addr) = two_nodes(&redis, node_config(&redis, "node-b")).await;

        // Each event after the first is sent only when the test lets it: anything on the path
        // that waited for more data would stall here.
        let response =
            send(&client(), Request::get(via(b_addr, "/sse?n=3&gated=1")).body(empty()).unwrap()).await;
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let mut text = String::new();
        for i in 0..3 {
            let want = format!("data: event {i}\n\n");
            while !text.contains(&want) {
                let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
                    .await
                    .unwrap_or_else(|_| panic!("event {i} did not cross the hop on its own"))
                    .unwrap()
                    .unwrap();
                if let Ok(data) = frame.into_data() {
                    text.push_str(std::str::from_utf8(&data).unwrap());
                }
            }
            env.stats.gate.add_permits(1);
        }
        assert!(body.frame().await.is_none());

        let tcp = TcpStream::connect(b_addr).await.unwrap();
        let (mut ws, response) =
            tokio_tungstenite::client_async(format!("ws://{b_addr}/t/{TUNNEL}/ws"), tcp).await.unwrap();
        assert_eq!(response.status(), 101);
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        for _ in 0..3 {
            ws.send(Message::binary(big.clone())).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(big.clone()));
        }
        ws.close(None).await.unwrap();
        while let Some(Ok(message)) = ws.next().await {
            assert!(message.is_close());
        }
        drop(ws);
        // The forwarded upgrade counted at A as in flight until it closed.
        env.gateway.registry.all()[0].wait_idle().await;
        b.shutdown.cancel();
    })
    .await;
}

#[tokio::test]
async fn an_agent_with_two_connections_holds_one_session_on_each_of_two_nodes() {
    bounded(async {
        let Some(redis) = Redis::start().await else { return };
        let (a_config, a_peers) = with_peer_listener(node_config(&redis, "node-a")).await;
        let env = TestEnv::start_without_agent(a_config).await;
        serve_peers(&env.gateway, a_peers);
        let (b_config, b_peers) = with_peer_listener(node_config(&redis, "node-b")).await;
        let (b, b_addr) = start_node(b_config).await;
        serve_peers(&b.gateway, b_peers);

        // Node A twice, then B: the second connection lands on A, which the first already
        // uses, and moves on to B.
        let mut config = env.agent_config();
        let a_url = config.gateway.clone();
        let b_url = ws_url(b_addr);
        config.more_gateways = vec![a_url, b_url];
        config.connections = 2;
        let agent = spawn_agent(config);
        let id: ferry_codec::TunnelId = TUNNEL.parse().unwrap();
        env.gateway.registry.wait_until(|r| r.of(&id).len() == 1).await;
        b.gateway.registry.wait_until(|r| r.of(&id).len() == 1).await;
        assert_eq!(env.gateway.registry.of(&id).len(), 1, "never two sessions of one agent on one node");
        for addr in [env.gateway_addr, b_addr] {
            let (response, _) = get(&via(addr, "/")).await;
            assert_eq!(response.status(), StatusCode::OK);
        }
        // Each node serves from its own session: nothing is forwarded.
        let metrics = b.gateway.metrics.render(&b.gateway.registry);
        assert!(metrics.contains("ferry_cluster_forwards_total{direction=\"out\"} 0"), "{metrics}");
        agent.stop().await.unwrap();
        b.shutdown.cancel();
    })
    .await;
}

#[tokio::test]
async fn a_sigkilled_node_costs_nothing_to_an_agent_with_a_session_elsewhere() {
    bounded(async {
        let Some(redis) = Redis::start().await else { return };
        let mut a = NodeProcess::start(&redis, "node-a", &[]).await;
        let env = TestEnv::start_without_agent(node_config(&redis, "node-b")).await;
        let mut config = env.agent_config();
        config.gateway = ws_url(a.addr());
        config.more_gateways = vec![ws_url(env.gateway_addr)];
        config.connections = 2;
        let agent = spawn_agent(config);
        let id: ferry_codec::TunnelId = TUNNEL.parse().unwrap();
        env.gateway.registry.wait_until(|r| r.of(&id).len() == 1).await;
        until(&env.gateway, |o| held_by(o, "node-a"), TUNNEL).await;

        // Requests through B keep coming while A is killed: B serves them from its own session.
        let url = env.url("/");
        let load = tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..200 {
                statuses.push(get(&url).await.0.status());
            }
            statuses
        });
        a.kill();
        let statuses = load.await.unwrap();
        assert!(statuses.iter().all(|s| *s == StatusCode::OK), "{statuses:?}");
        agent.kill();
    })
    .await;
}

#[tokio::test]
async fn connections_on_any_node_list_every_nodes_sessions() {
    bounded(async {
        let Some(redis) = Redis::start().await else { return };
        let (b_config, b_peers) = with_peer_listener(node_config(&redis, "node-b")).await;
        let (env, b, b_addr) = two_nodes(&redis, b_config).await;
        serve_peers(&b.gateway, b_peers);

        let (response, body) = get(&format!("http://{b_addr}/connections")).await;
        assert_eq!(response.status(), StatusCode::OK);
        let listing = json(&body);
        let sessions = listing["sessions"].as_array().unwrap();
        assert_eq!(sessions.len(), 1, "{listing}");
        assert_eq!(sessions[0]["node"], "node-a");
        assert_eq!(sessions[0]["tunnel_id"], TUNNEL, "{listing}");
        let nodes = listing["nodes"].as_array().unwrap();
        assert!(nodes.contains(&serde_json::json!({ "node": "node-b", "sessions": 0 })), "{listing}");
        assert!(nodes.contains(&serde_json::json!({ "node": "node-a", "sessions": 1 })), "{listing}");

        // One tunnel's, from the node without it; and each node's own.
        let (_, body) = get(&format!("http://{b_addr}/connections/{TUNNEL}")).await;
        assert_eq!(json(&body)["sessions"].as_array().unwrap().len(), 1);
        let (_, body) = get(&format!("http://{b_addr}/connections?node=local")).await;
        assert_eq!(json(&body), serde_json::json!({ "sessions": [] }));
        let (_, body) = get(&env.gateway_url("/connections?node=local")).await;
        assert_eq!(json(&body)["sessions"][0]["node"], "node-a");

        // A node that cannot be asked is named, and the rest is still listed.
        let mut c_config = node_config(&redis, "node-c");
        c_config.cluster.as_mut().unwrap().advertise = Some(format!("http://{}", closed_port().await));
        let (c, _) = start_node(c_config).await;
        let b_cluster = Arc::clone(b.gateway.cluster.as_ref().unwrap());
        b.gateway.registry.wait_until(|_| b_cluster.nodes().len() == 2).await;
        let (_, body) = get(&format!("http://{b_addr}/connections")).await;
        let listing = json(&body);
        assert_eq!(listing["sessions"].as_array().unwrap().len(), 1, "{listing}");
        let c_entry = listing["nodes"].as_array().unwrap().iter().find(|n| n["node"] == "node-c").cloned();
        assert!(
            c_entry.is_some_and(|c| c["error"].as_str().is_some_and(|e| e.contains("node-c"))),
            "{listing}"
        );
        env.gateway_run.shutdown.cancel();
        b.shutdown.cancel();
        c.shutdown.cancel();
    })
    .await;
}

#[tokio::test]
async fn the_tunnel_rate_is_counted_across_the_cluster() {
    bounded(async {
        let Some(mut redis) = Redis::start().await else { return };
        let rate = ferry_gateway::config::Rate::parse("5/m").unwrap();
        let limited = |mut config: GatewayConfig| {
            config.tunnel_rate = Some(rate);
            config
        };
        let (a_config, a_peers) = with_peer_listener(limited(node_config(&redis, "node-a"))).await;
        let env = TestEnv::start_with(a_config, |_| {}).await;
        serve_peers(&env.gateway, a_peers);
        let (b, b_addr) = start_node(limited(node_config(&redis, "node-b"))).await;
        until_reachable(&b.gateway).await;

        // Five a minute in all: three through A and two through B pass, the sixth is refused
        // wherever it arrives.
        let mut statuses = Vec::new();
        for url in
            [env.url("/"), via(b_addr, "/"), env.url("/"), via(b_addr, "/"), env.url("/"), via(b_addr, "/")]
        {
            let (response, body) = get(&url).await;
            statuses.push(response.status());
            if response.status() == StatusCode::TOO_MANY_REQUESTS {
                assert_eq!(json(&body)["error"]["code"], "rate_limited");
                assert!(response.headers().contains_key(http::header::RETRY_AFTER));
            }
        }
        let mut expected = vec![StatusCode::OK; 5];
        expected.push(StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(statuses, expected);

        // Redis gone: each node counts alone (A's own allowance is untouched, so five pass).
        redis.stop();
        let mut statuses = Vec::new();
        for _ in 0..6 {
            statuses.push(get(&env.url("/")).await.0.status());
        }
        assert_eq!(statuses, expected);
        redis.restart_empty().await;
        b.shutdown.cancel();
    })
    .await;
}

#[tokio::test]
async fn requests_held_while_the_owning_node_is_sigkilled_are_served_by_the_next() {
    bounded(async {
        let Some(redis) = Redis::start().await else { return };
        let mut a = NodeProcess::start(&redis, "node-a", &[]).await;
        let env = TestEnv::start_without_agent(node_config(&redis, "node-b")).await;
        // One connection, to A first; after A fails, the next URL: B.
        let mut config = env.agent_config();
        config.gateway = ws_url(a.addr());
        config.more_gateways = vec![ws_url(env.gateway_addr)];
        let agent = spawn_agent(config);
        until(&env.gateway, |o| held_by(o, "node-a"), TUNNEL).await;

        // Requests arrive at B all along; B had forwarded to A, then holds them once A is gone
        // and serves them from the agent's new session here.
        let url = env.url("/");
        let load = tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..100 {
                statuses.push(get(&url).await.0.status());
            }
            statuses
        });
        let killed = Instant::now();
        a.kill();
        let id: ferry_codec::TunnelId = TUNNEL.parse().unwrap();
        env.gateway.registry.wait_until(|r| r.of(&id).len() == 1).await;
        println!("the agent's session was up at B {:?} after A's SIGKILL", killed.elapsed());
        let statuses = load.await.unwrap();
        // Only a request in flight at A when it died may fail (it had reached the agent).
        let failed = statuses.iter().filter(|s| **s != StatusCode::OK).count();
        assert!(failed <= 1, "{statuses:?}");
        agent.kill();
    })
    .await;
}

#[tokio::test]
async fn a_stalled_client_at_the_other_node_stops_the_upstream() {
    bounded(async {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        /// What a stalled download may hold between its ends through the hop: the stream windows
        /// of both sessions, the WebSocket buffers, and the kernel's socket buffers on five
        /// loopback hops (the owner's splice holds one chunk at a time).
        const IN_FLIGHT_BOUND: u64 = 48 << 20;

        let Some(redis) = Redis::start().await else { return };
        let (env, b, b_addr) = two_nodes(&redis, node_config(&redis, "node-b")).await;
        let already = env.stats.produced.load(Ordering::Relaxed);
        let mut socket = TcpStream::connect(b_addr).await.unwrap();
        let request = format!("GET /t/{TUNNEL}/bytes/{} HTTP/1.1\r\nHost: x\r\n\r\n", 100u64 << 30);
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut head = [0u8; 512];
        let n = socket.read(&mut head).await.unwrap();
        assert!(head[..n].starts_with(b"HTTP/1.1 200"));
        let produced = plateau(|| env.stats.produced.load(Ordering::Relaxed)).await - already;
        println!("stalled download through the hop: the upstream produced {} KiB", produced / 1024);
        assert!(produced < IN_FLIGHT_BOUND, "the upstream kept producing: {} MiB", produced >> 20);
        drop(socket);
        b.shutdown.cancel();
    })
    .await;
}

/// The nodes holding the tunnel's sessions, as `/connections` at `addr` lists them.
async fn session_nodes(addr: SocketAddr) -> Vec<String> {
    let (_, body) = get(&format!("http://{addr}/connections/{TUNNEL}")).await;
    let listing = json(&body);
    let mut nodes: Vec<String> = listing["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["node"].as_str().unwrap().to_owned())
        .collect();
    nodes.sort();
    nodes
}

#[tokio::test]
async fn three_nodes_behind_haproxy_serve_the_tunnel_from_any_node_through_a_sigkill() {
    bounded(async {
        let Some(redis) = Redis::start().await else { return };
        // The peer links are TLS, from the flags: each node advertises https:// on its own.
        let pki = Pki::new("haproxy-peers");
        let (cert, key, ca) = (pki.files().cert, pki.files().key, pki.ca());
        let tls = ["--peer-tls-cert", path(&cert), "--peer-tls-key", path(&key), "--peer-ca", path(&ca)];
        let mut nodes = Vec::new();
        for id in ["node-a", "node-b", "node-c"] {
            nodes.push(
                NodeProcess::start(&redis, id, &[&["--cluster-ttl", "600ms"][..], &tls].concat()).await,
            );
        }
        let addrs = [nodes[0].addr(), nodes[1].addr(), nodes[2].addr()];
        let Some(haproxy) = Haproxy::start(addrs).await else { return };
        let balancer = SocketAddr::from(([127, 0, 0, 1], haproxy.port));

        // The agent knows only the balancer, and keeps two sessions on distinct nodes.
        let env = TestEnv::start_without_agent(GatewayConfig::default()).await;
        let mut config = env.agent_config();
        config.gateway = ws_url(balancer);
        config.connections = 2;
        let agent = spawn_agent(config);
        while session_nodes(addrs[0]).await.len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let holders = session_nodes(addrs[0]).await;
        assert!(holders[0] != holders[1], "two sessions on one node: {holders:?}");

        // Every node serves it, and so does the balancer, whichever node a connection lands on.
        let (_, expected) = get(&env.direct_url("/")).await;
        for addr in addrs.into_iter().chain([balancer].into_iter().cycle().take(9)) {
            let (response, body) = get(&via(addr, "/")).await;
            assert_eq!(response.status(), StatusCode::OK, "through {addr}");
            assert_eq!(body, expected, "through {addr}");
        }

        // SIGKILL a node with a session while requests keep arriving through the balancer, each
        // on a new connection: only one in flight on the killed node may fail.
        let victim = ["node-a", "node-b", "node-c"].iter().position(|n| *n == holders[0]).unwrap();
        let survivor = addrs[(victim + 1) % 3];
        let url = via(balancer, "/");
        let load = tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..300 {
                statuses.push(try_get(&url).await);
            }
            statuses
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let killed = Instant::now();
        nodes[victim].kill();
        // The agent's lost connection comes back through the balancer on another node.
        loop {
            let now = session_nodes(survivor).await;
            if now.len() == 2 && !now.contains(&holders[0]) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!("two sessions again, on the live nodes, {:?} after the SIGKILL", killed.elapsed());
        let statuses = load.await.unwrap();
        let failed = statuses.iter().filter(|s| **s != Some(StatusCode::OK)).count();
        println!("{failed} of {} requests through the balancer failed", statuses.len());
        assert!(failed <= 1, "{statuses:?}");
        agent.kill();
        drop(haproxy);
    })
    .await;
}

#[tokio::test]
async fn a_forwarded_request_is_checked_against_the_agents_address_rules_and_users() {
    bounded(async {
        let Some(redis) = Redis::start().await else { return };
        let (a_config, peers) = with_peer_listener(node_config(&redis, "node-a")).await;
        let env = TestEnv::start_with(a_config, |agent| {
            agent.deny_ip = vec![ferry_agent::config::parse_ip_block("127.0.0.2").unwrap()];
            agent.basic_auth = vec![htpasswd("alice", "pw")];
        })
        .await;
        serve_peers(&env.gateway, peers);
        let (b, b_addr) = start_node(node_config(&redis, "node-b")).await;
        until_reachable(&b.gateway).await;
        // Node B does not know the agent's rules; node A checks the client B names.
        let path = format!("/t/{TUNNEL}/");
        let (status, body) = get_from("127.0.0.2", b_addr, &path).await;
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("\"ip_denied\""), "{body}");
        // Node B does not know the agent's users either: it passes the credential to node A,
        // which checks it, and B takes it out of the request when A says it was the tunnel's.
        let (status, head, _) = get_from_with("127.0.0.1", b_addr, &path, &[]).await;
        assert_eq!(status, 401, "{head}");
        assert!(head.to_ascii_lowercase().contains("www-authenticate: basic"), "{head}");
        let wrong = basic("alice", "nope");
        assert_eq!(get_from_with("127.0.0.1", b_addr, &path, &[("Authorization", &wrong)]).await.0, 401);
        let right = basic("alice", "pw");
        let headers = format!("/t/{TUNNEL}/headers");
        let (status, _, body) =
            get_from_with("127.0.0.1", b_addr, &headers, &[("Authorization", &right)]).await;
        assert_eq!(status, 200, "{body}");
        assert!(!body.to_ascii_lowercase().contains("authorization"), "{body}");
        b.shutdown.cancel();
    })
    .await;
}
