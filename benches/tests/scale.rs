//! Scale tests, ignored by default (the load harness runs them: `cargo test --release -p
//! ferry-benches --test scale -- --ignored --nocapture`). Each prints a `SCALE` line the harness
//! puts in its report.
//!
//! - 10,000 idle agent sessions on one gateway, within 512 MiB;
//! - 10,000 requests in flight over one session;
//! - one large download over a 20 ms round-trip path.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_agent::AgentConfig;
use ferry_agent::config::{GatewayUrl, Upstream};
use ferry_benches::upstream::{UpstreamStats, serve};
use ferry_gateway::{Gateway, GatewayConfig};
use http::Request;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

type Body = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

const MIB: u64 = 1024 * 1024;

fn rss_mb() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096 / MIB
}

async fn start_gateway(shutdown: &CancellationToken) -> (Arc<Gateway>, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Every client and agent here comes from 127.0.0.1: lift the per-address caps, which would
    // otherwise treat 10,000 agents on one host as one abusive client.
    let config = GatewayConfig {
        max_connections_per_address: usize::MAX,
        max_handshakes: usize::MAX,
        max_client_requests: usize::MAX,
        ..GatewayConfig::default()
    };
    let gateway = Gateway::new(config, shutdown.clone()).unwrap();
    let serving = Arc::clone(&gateway);
    tokio::spawn(async move { serving.serve(listener).await });
    (gateway, addr)
}

fn agent(tunnel: &str, upstream: SocketAddr, gateway: SocketAddr) -> AgentConfig {
    AgentConfig::new(
        tunnel.parse().unwrap(),
        Upstream::parse(&upstream.to_string()).unwrap(),
        GatewayUrl::parse(&format!("ws://{gateway}/ws")).unwrap(),
    )
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "scale test: run by scripts/load"]
async fn ten_thousand_idle_sessions() {
    let shutdown = CancellationToken::new();
    let (gateway, addr) = start_gateway(&shutdown).await;
    let before = rss_mb();
    let started = Instant::now();
    let mut swarm = tokio::process::Command::new(env!("CARGO_BIN_EXE_swarm"))
        .args(["--gateway", &addr.to_string(), "--sessions", "10000"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(swarm.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(120), lines.next_line()).await.unwrap().unwrap();
    assert_eq!(ready.as_deref(), Some("ready 10000"));
    gateway.registry.wait_until(|r| r.len() == 10_000).await;
    let rss = rss_mb();
    println!(
        "SCALE idle_sessions=10000 gateway_rss_mb={rss} (from {before}) connect_all_s={:.1}",
        started.elapsed().as_secs_f64()
    );
    // The growth, not the total: the tests before this one in the same process (run one at a
    // time by the harness) leave memory that glibc keeps, 455 MiB after t07's 10,000 streams.
    let grown = rss.saturating_sub(before);
    assert!(grown < 512, "10,000 idle sessions took {grown} MiB (from {before} to {rss})");
    // Heartbeats flow: every session still there after a round of them would not prove much in
    // 20 s; the registry count above is what matters. Tear down.
    swarm.kill().await.unwrap();
    shutdown.cancel();
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "scale test: run by scripts/load"]
async fn ten_thousand_requests_in_flight_over_one_session() {
    let shutdown = CancellationToken::new();
    // The upstream runs in its own process: 10,000 upstream connections need their own fds.
    let upstream_addr = {
        let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
        probe.local_addr().unwrap()
    };
    let _upstream = tokio::process::Command::new(env!("CARGO_BIN_EXE_sample-upstream"))
        .args(["--listen", &upstream_addr.to_string()])
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    while TcpStream::connect(upstream_addr).await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (gateway, addr) = start_gateway(&shutdown).await;
    let tunnel = "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_scale";
    tokio::spawn(ferry_agent::run(agent(tunnel, upstream_addr, addr), shutdown.clone()));
    let id = tunnel.parse().unwrap();
    gateway.registry.wait_until(|r| r.of(&id).len() == 1).await;
    let session = gateway.registry.of(&id)[0].clone();
    let before = rss_mb();

    // 40 HTTP/2 connections with 250 streams each.
    let clients: Vec<Client<_, Body>> =
        (0..40).map(|_| Client::builder(TokioExecutor::new()).http2_only(true).build_http()).collect();
    let url = format!("http://{addr}/t/{tunnel}/slow?ms=8000");
    let started = Instant::now();
    let mut requests = Vec::with_capacity(10_000);
    for i in 0..10_000 {
        let (client, url) = (clients[i % 40].clone(), url.clone());
        requests.push(tokio::spawn(async move {
            let response = client.request(Request::get(url).body(empty()).unwrap()).await?;
            let status = response.status();
            response.into_body().collect().await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(status)
        }));
    }
    let mut peak = 0;
    let mut peak_rss = 0;
    while started.elapsed() < Duration::from_secs(60) {
        peak = peak.max(session.in_flight());
        peak_rss = peak_rss.max(rss_mb());
        if peak >= 10_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reached = started.elapsed();
    let mut ok = 0;
    for request in requests {
        if matches!(request.await.unwrap(), Ok(status) if status.is_success()) {
            ok += 1;
        }
    }
    println!(
        "SCALE in_flight_peak={peak} ok={ok}/10000 reached_s={:.1} total_s={:.1} rss_mb={peak_rss} (from {before}; gateway, agent and client in one process)",
        reached.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(peak, 10_000, "every request was in flight at once");
    assert_eq!(ok, 10_000);
    shutdown.cancel();
}

/// Forwards a TCP connection with `delay` added each way, without limiting bandwidth.
async fn delay_proxy(target: SocketAddr, delay: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect(target).await.unwrap();
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(delayed(cr, sw, delay));
            tokio::spawn(delayed(sr, cw, delay));
        }
    });
    addr
}

async fn delayed(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Bytes)>(65_536);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send((Instant::now() + delay, Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    while let Some((due, data)) = rx.recv().await {
        tokio::time::sleep_until(due.into()).await;
        if to.write_all(&data).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "scale test: run by scripts/load"]
async fn download_over_a_20ms_round_trip() {
    let shutdown = CancellationToken::new();
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(serve(upstream, Arc::new(UpstreamStats::default()), shutdown.clone()));
    let (gateway, addr) = start_gateway(&shutdown).await;
    let slow_path = delay_proxy(addr, Duration::from_millis(10)).await;
    let tunnel = "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_far";
    tokio::spawn(ferry_agent::run(agent(tunnel, upstream_addr, slow_path), shutdown.clone()));
    let id = tunnel.parse().unwrap();
    gateway.registry.wait_until(|r| r.of(&id).len() == 1).await;

    let client: Client<_, Body> = Client::builder(TokioExecutor::new()).build_http();
    let size = 512 * MIB;
    let url = format!("http://{addr}/t/{tunnel}/bytes/{size}");
    let started = Instant::now();
    let response = client.request(Request::get(url).body(empty()).unwrap()).await.unwrap();
    let mut body = response.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received += data.len() as u64;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(received, size);
    println!(
        "SCALE rtt20ms_download_mb_s={:.0} ({} MiB in {elapsed:.1} s)",
        size as f64 / 1e6 / elapsed,
        size / MIB
    );
    shutdown.cancel();
}

/// Open files of this process.
fn open_files() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Fault matrix T-7: 10,000 requests at once, each with its own id, held at the upstream until
/// all have arrived, over one session (a) and over 10 replicas of the tunnel (b). Every client
/// gets its own id back, nothing deadlocks, and everything is released afterwards.
#[tokio::test(flavor = "current_thread")]
#[ignore = "heavy (fault matrix T-7): run by scripts/faults-heavy"]
async fn t07_ten_thousand_concurrent_streams() {
    for agents in [1usize, 10] {
        let shutdown = CancellationToken::new();
        let upstream_addr = {
            let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
            probe.local_addr().unwrap()
        };
        // Its own process: 10,000 upstream connections need their own files.
        let _upstream = tokio::process::Command::new(env!("CARGO_BIN_EXE_sample-upstream"))
            .args(["--listen", &upstream_addr.to_string()])
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        while TcpStream::connect(upstream_addr).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (gateway, addr) = start_gateway(&shutdown).await;
        let tunnel = "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_barrier";
        for _ in 0..agents {
            tokio::spawn(ferry_agent::run(agent(tunnel, upstream_addr, addr), shutdown.clone()));
        }
        let id = tunnel.parse().unwrap();
        gateway.registry.wait_until(|r| r.of(&id).len() == agents).await;
        let files_before = open_files();
        let before = rss_mb();
        let clients: Vec<Client<_, Body>> =
            (0..40).map(|_| Client::builder(TokioExecutor::new()).http2_only(true).build_http()).collect();
        let started = Instant::now();
        let mut requests = Vec::with_capacity(10_000);
        for i in 0..10_000 {
            let client = clients[i % 40].clone();
            let url = format!("http://{addr}/t/{tunnel}/barrier?n=10000&id=request-{i}");
            requests.push(tokio::spawn(async move {
                let response = client.request(Request::get(url).body(empty()).unwrap()).await?;
                let body = response.into_body().collect().await?.to_bytes();
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(body)
            }));
        }
        let mut peak_rss = 0;
        let mut own = 0;
        for (i, request) in requests.into_iter().enumerate() {
            let body =
                tokio::time::timeout(Duration::from_secs(120), request).await.expect("deadlock").unwrap();
            peak_rss = peak_rss.max(rss_mb());
            if body.ok().as_deref() == Some(format!("request-{i}").as_bytes()) {
                own += 1;
            }
        }
        let took = started.elapsed();
        drop(clients);
        let sessions = gateway.registry.of(&id);
        let streams_left = tokio::time::timeout(Duration::from_secs(10), async {
            while sessions.iter().any(|s| s.open_streams() > 0 || s.in_flight() > 0) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        println!(
            "SCALE t07 agents={agents} own_id={own}/10000 total_s={:.1} rss_mb={peak_rss} (from {before}; gateway, agents and clients in one process) files={}->{}",
            took.as_secs_f64(),
            files_before,
            open_files()
        );
        assert_eq!(own, 10_000, "every client gets its own answer");
        assert!(streams_left.is_ok(), "streams left open after the run");
        // What stays open: the agents' pools of idle upstream connections (capped per agent).
        let pooled = agents * ferry_agent::config::POOL_MAX_IDLE_PER_UPSTREAM;
        let settled = tokio::time::timeout(Duration::from_secs(10), async {
            while open_files() > files_before + pooled.min(10_000) + 64 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(settled.is_ok(), "{} files open, {files_before} before", open_files());
        assert!(peak_rss < 2048, "{peak_rss} MiB");
        shutdown.cancel();
    }
}
