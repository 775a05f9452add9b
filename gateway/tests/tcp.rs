//! Raw TCP tunnels: an agent's `--tcp` endpoint gets a public port at the gateway, and each
//! connection to it is carried byte for byte to the upstream, half-closes and resets included.
//! The upstreams are a test server that answers after the client's half-close, and a real
//! `redis-server` driven by `redis-cli` and `redis-benchmark` (skipped loudly without them,
//! failing under `.ci/run`).
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::redis::Redis;
use common::*;
use ferry_agent::config::TcpTarget;
use ferry_codec::Secret;
use ferry_gateway::GatewayConfig;
use ferry_gateway::auth::AuthSource;
use ferry_gateway::tcp::TcpConfig;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A port nothing listens on now, for a one-port `--tcp-ports` range.
async fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port()
}

fn gateway_with_ports(ports: std::ops::RangeInclusive<u16>) -> GatewayConfig {
    GatewayConfig {
        tcp: TcpConfig { ports: Some(ports), ..TcpConfig::default() },
        ..GatewayConfig::default()
    }
}

/// The public port the gateway gave the tunnel's endpoint `name`.
fn public_port(env: &TestEnv, name: &str) -> u16 {
    let sessions = env.gateway.registry.of(&env.tunnel_id);
    let claims = sessions[0].identity.tcp.as_ref().expect("the session declared TCP endpoints");
    claims.bound.iter().find(|(n, _)| n == name).expect("the endpoint got a port").1
}

/// An upstream that reads what a connection sends until its half-close, then answers
/// `{bytes} {sha256}\n` and `reply` bytes of the pattern, and closes. The receiver counts the
/// connections it accepted.
async fn answering_after_eof(reply: u64) -> (SocketAddr, watch::Receiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, count) = watch::channel(0);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            accepted.send_modify(|n| *n += 1);
            tokio::spawn(async move {
                let (mut hasher, mut total, mut buf) = (Sha256::new(), 0u64, vec![0u8; 64 * 1024]);
                // A connection the agent resets (it was killed) just ends.
                while let Ok(n @ 1..) = socket.read(&mut buf).await {
                    hasher.update(&buf[..n]);
                    total += n as u64;
                }
                let line = format!("{total} {}\n", hex(&hasher.finalize()));
                let _ = socket.write_all(line.as_bytes()).await;
                let mut offset = 0;
                while offset < reply {
                    let chunk =
                        ferry_benches::upstream::pattern(offset, (reply - offset).min(64 * 1024) as usize);
                    if socket.write_all(&chunk).await.is_err() {
                        return;
                    }
                    offset += chunk.len() as u64;
                }
                let _ = socket.shutdown().await;
            });
        }
    });
    (addr, count)
}

/// Sends `bytes` on a new connection to the public `port`, half-closes, and reads the answer.
async fn exchange(port: u16, bytes: &[u8]) -> String {
    let mut client = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    client.write_all(bytes).await.unwrap();
    client.shutdown().await.unwrap();
    let mut answer = String::new();
    client.read_to_string(&mut answer).await.unwrap();
    answer
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn with_tcp_endpoint(config: GatewayConfig, upstream: SocketAddr) -> (TestEnv, String) {
    let name = upstream.to_string();
    let env = TestEnv::start_with(config, |agent| agent.tcp = vec![TcpTarget::parse(&name).unwrap()]).await;
    (env, name)
}

#[tokio::test]
async fn a_tcp_endpoint_carries_bytes_both_ways_intact_with_the_half_close() {
    bounded(async {
        const SIZE: u64 = 64 << 20;
        let (upstream, _) = answering_after_eof(SIZE).await;
        let port = free_port().await;
        let (env, name) = with_tcp_endpoint(gateway_with_ports(port..=port), upstream).await;
        assert_eq!(public_port(&env, &name), port);

        let started = Instant::now();
        let (mut read, mut write) = TcpStream::connect(("127.0.0.1", port)).await.unwrap().into_split();
        let sending = tokio::spawn(async move {
            let mut hasher = Sha256::new();
            let mut offset = 0;
            while offset < SIZE {
                let chunk = ferry_benches::upstream::pattern(offset, (SIZE - offset).min(64 * 1024) as usize);
                hasher.update(&chunk);
                write.write_all(&chunk).await.unwrap();
                offset += chunk.len() as u64;
            }
            // The half-close: the upstream answers only once it has seen the end.
            write.shutdown().await.unwrap();
            hex(&hasher.finalize())
        });
        let mut received = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            read.read_exact(&mut byte).await.unwrap();
            received.push(byte[0]);
        }
        let sent = sending.await.unwrap();
        assert_eq!(String::from_utf8(received).unwrap(), format!("{SIZE} {sent}\n"));
        let (mut hasher, mut total, mut buf) = (Sha256::new(), 0u64, vec![0u8; 64 * 1024]);
        loop {
            let n = read.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n as u64;
        }
        assert_eq!(total, SIZE);
        let expected = tokio::task::spawn_blocking(|| ferry_benches::upstream::pattern_sha256(SIZE));
        assert_eq!(hex(&hasher.finalize()), expected.await.unwrap());
        println!("64 MiB up, then 64 MiB down through a TCP endpoint in {:?}", started.elapsed());
        let metrics = env.gateway.metrics.render(&env.gateway.registry);
        assert!(metrics.contains("ferry_tcp_connections_total{outcome=\"ok\"} 1"), "{metrics}");
    })
    .await;
}

#[tokio::test]
async fn a_killed_agent_resets_the_connection_and_gets_its_port_back() {
    bounded(async {
        let (upstream, mut accepted) = answering_after_eof(0).await;
        // Two ports in the range: the second session must still get the first one.
        let port = free_port().await;
        let config = GatewayConfig {
            pending_timeout: Duration::from_secs(30),
            ..gateway_with_ports(port..=port.saturating_add(1))
        };
        let (mut env, name) = with_tcp_endpoint(config, upstream).await;
        let port = public_port(&env, &name);
        let mut client = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        client.write_all(b"half a message").await.unwrap();
        // The connection is through once the upstream accepted it.
        accepted.wait_for(|n| *n == 1).await.unwrap();

        env.agent.take().unwrap().kill();
        expect_reset(&mut client).await;

        // A connection that arrives while the agent is away waits for it.
        let waiting = tokio::spawn(async move { exchange(port, b"hello").await });
        env.agent = Some(spawn_agent({
            let mut config = env.agent_config();
            config.tcp = vec![TcpTarget::parse(&name).unwrap()];
            config
        }));
        env.wait_for_sessions(1).await;
        assert_eq!(public_port(&env, &name), port, "the same port after a reconnect");
        let answer = waiting.await.unwrap();
        assert!(answer.starts_with("5 "), "{answer}");
    })
    .await;
}

#[tokio::test]
async fn an_agent_with_only_tcp_endpoints_answers_http_with_404() {
    bounded(async {
        let (upstream, _) = answering_after_eof(0).await;
        let port = free_port().await;
        let env = TestEnv::start_with(gateway_with_ports(port..=port), |agent| {
            agent.upstream = None;
            agent.tcp = vec![TcpTarget::parse(&upstream.to_string()).unwrap()];
        })
        .await;
        let (response, body) = get(&env.url("/")).await;
        assert_eq!(response.status(), http::StatusCode::NOT_FOUND);
        assert_eq!(json(&body)["error"]["code"], "no_upstream");
        let answer = exchange(port, b"").await;
        assert!(answer.starts_with("0 "), "{answer}");
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_tcp_upstream_resets_the_public_connection() {
    bounded(async {
        let port = free_port().await;
        let (env, _) = with_tcp_endpoint(gateway_with_ports(port..=port), closed_port().await).await;
        expect_reset(&mut TcpStream::connect(("127.0.0.1", port)).await.unwrap()).await;
        let metrics = env.gateway.metrics.render(&env.gateway.registry);
        assert!(
            metrics.contains("ferry_tcp_connections_total{outcome=\"upstream_unreachable\"} 1"),
            "{metrics}"
        );
    })
    .await;
}

#[tokio::test]
async fn ports_are_given_only_to_the_tunnel_they_are_reserved_for() {
    bounded(async {
        let reserved = free_port().await;
        let path = std::env::temp_dir().join(format!("ferry-auth-{}.toml", uuid::Uuid::new_v4()));
        let other = "agent_99999999-8888-7777-6666-555555555555_other";
        std::fs::write(
            &path,
            format!(
                "[tunnels.{TUNNEL}]\nsecrets = [\"s1\"]\ntcp-ports = [{reserved}]\n\n[tunnels.{other}]\nsecrets = [\"s2\"]\n"
            ),
        )
        .unwrap();
        let (upstream, _) = answering_after_eof(0).await;
        let config = GatewayConfig { auth: AuthSource::File(path.clone()), ..GatewayConfig::default() };
        // Without --tcp-ports, the tunnel gets the port reserved for it.
        let env = TestEnv::start_with(config, |agent| {
            agent.secret = Some(Secret::from_text("s1").unwrap());
            agent.tcp = vec![TcpTarget::parse(&upstream.to_string()).unwrap()];
        })
        .await;
        assert_eq!(public_port(&env, &upstream.to_string()), reserved);

        // Another tunnel asking for that port, or for any, is refused, and told why.
        for (wanted, reason) in
            [(format!("{reserved}={upstream}"), "not granted"), (upstream.to_string(), "gives no TCP ports")]
        {
            let mut agent = env.agent_config();
            agent.tunnel_id = other.parse().unwrap();
            agent.secret = Some(Secret::from_text("s2").unwrap());
            agent.tcp = vec![TcpTarget::parse(&wanted).unwrap()];
            agent.max_retries = Some(1);
            let err = ferry_agent::run(agent, tokio_util::sync::CancellationToken::new()).await.unwrap_err();
            assert!(format!("{err:?}").contains(reason), "{err:?}");
        }
        let _ = std::fs::remove_file(&path);
    })
    .await;
}

/// `redis-cli` or `redis-benchmark`, or `None` (loudly) when missing.
fn redis_tool(name: &str) -> Option<Command> {
    if Command::new(name).arg("--version").output().is_err() {
        assert!(
            std::env::var_os("FERRY_CI").is_none(),
            "this test needs {name}: apt-get install -y redis-tools"
        );
        eprintln!("SKIPPED: {name} is not installed (apt-get install -y redis-tools)");
        return None;
    }
    Some(Command::new(name))
}

#[tokio::test]
async fn redis_cli_and_redis_benchmark_work_through_a_tcp_tunnel() {
    bounded(async {
        let Some(redis) = Redis::start().await else { return };
        let (Some(mut cli), Some(mut bench)) = (redis_tool("redis-cli"), redis_tool("redis-benchmark"))
        else {
            return;
        };
        let port = free_port().await;
        let upstream: SocketAddr = ([127, 0, 0, 1], redis.port).into();
        let (env, name) = with_tcp_endpoint(gateway_with_ports(port..=port), upstream).await;
        let port = public_port(&env, &name).to_string();

        let out = tokio::task::spawn_blocking(move || {
            cli.args(["-p", &port, "set", "ferry", "through the tunnel"]).output().unwrap();
            let got = Command::new("redis-cli").args(["-p", &port, "get", "ferry"]).output().unwrap();
            let bench =
                bench.args(["-p", &port, "-n", "20000", "-c", "20", "-t", "set,get", "-q"]).output().unwrap();
            (got, bench)
        })
        .await
        .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.0.stdout).trim(), "through the tunnel");
        let report = String::from_utf8_lossy(&out.1.stdout);
        assert!(out.1.status.success() && report.contains("SET") && report.contains("GET"), "{report}");
        println!("redis-benchmark through the tunnel:\n{report}");
    })
    .await;
}

/// An upstream that reads one PROXY protocol header (either version) and answers with the
/// client address it names, as `ip:port`, then closes.
async fn proxy_protocol_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut received = Vec::new();
                let source = loop {
                    let mut buf = [0u8; 256];
                    let n = socket.read(&mut buf).await.unwrap();
                    assert!(n > 0, "the connection ended before a whole PROXY header");
                    received.extend_from_slice(&buf[..n]);
                    match ppp::HeaderResult::parse(&received) {
                        ppp::HeaderResult::V1(Ok(header)) => match header.addresses {
                            ppp::v1::Addresses::Tcp4(a) => {
                                break format!("v1 {}:{}", a.source_address, a.source_port);
                            }
                            other => break format!("v1 {other:?}"),
                        },
                        ppp::HeaderResult::V2(Ok(header)) => match header.addresses {
                            ppp::v2::Addresses::IPv4(a) => {
                                break format!("v2 {}:{}", a.source_address, a.source_port);
                            }
                            other => break format!("v2 {other:?}"),
                        },
                        partial if ppp::PartialResult::is_incomplete(&partial) => {}
                        broken => break format!("unparsable: {broken:?}"),
                    }
                };
                socket.write_all(source.as_bytes()).await.unwrap();
                socket.shutdown().await.unwrap();
            });
        }
    });
    addr
}

#[tokio::test]
async fn the_upstream_learns_the_real_client_address_over_proxy_protocol() {
    bounded(async {
        let upstream = proxy_protocol_upstream().await;
        let port = free_port().await;
        let config = gateway_with_ports(port..=port.saturating_add(1));
        let env = TestEnv::start_with(config, |agent| {
            agent.tcp = ["v1", "v2"]
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    // Two endpoints to one upstream: distinct names through the host's spelling.
                    let host = if i == 0 { "127.0.0.1" } else { "localhost" };
                    TcpTarget::parse(&format!("{host}:{},proxy-protocol={v}", upstream.port())).unwrap()
                })
                .collect();
        })
        .await;
        for (name, version) in [
            (format!("127.0.0.1:{}", upstream.port()), "v1"),
            (format!("localhost:{}", upstream.port()), "v2"),
        ] {
            let public = public_port(&env, &name);
            // A client on another loopback address, so the address the upstream hears is not
            // the gateway's own.
            let mut client = connect_from("127.0.0.2", ([127, 0, 0, 1], public).into()).await;
            let me = client.local_addr().unwrap();
            let mut answer = String::new();
            client.read_to_string(&mut answer).await.unwrap();
            assert_eq!(answer, format!("{version} {me}"));
        }
    })
    .await;
}

#[tokio::test]
async fn a_client_that_stops_reading_stops_the_tcp_upstream() {
    bounded(async {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        /// What may sit between a stalled client and the upstream: the stream's window at the
        /// agent's session, the WebSocket buffers, and the kernel's buffers on three loopback
        /// connections.
        const IN_FLIGHT_BOUND: u64 = 32 << 20;

        // An upstream that writes for as long as it is let, counting what it wrote.
        let produced = Arc::new(AtomicU64::new(0));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = listener.local_addr().unwrap();
        let counting = Arc::clone(&produced);
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let chunk = vec![7u8; 64 * 1024];
            while socket.write_all(&chunk).await.is_ok() {
                counting.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        });
        let port = free_port().await;
        let (env, name) = with_tcp_endpoint(gateway_with_ports(port..=port), upstream).await;

        let client = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let stalled = plateau(|| produced.load(Ordering::Relaxed)).await;
        println!("a TCP client that reads nothing: the upstream stopped after {} KiB", stalled / 1024);
        assert!(stalled > 0, "nothing was produced");
        assert!(stalled < IN_FLIGHT_BOUND, "the upstream kept writing: {} MiB", stalled >> 20);
        // /connections shows the endpoint and its port.
        let (_, body) = get(&env.gateway_url("/connections")).await;
        let listing = json(&body);
        assert_eq!(listing["sessions"][0]["tcp"], serde_json::json!([{ "endpoint": name, "port": port }]));
        drop(client);
    })
    .await;
}

#[tokio::test]
async fn tcp_connections_count_against_the_per_address_limit() {
    bounded(async {
        let (upstream, mut accepted) = answering_after_eof(0).await;
        let port = free_port().await;
        let config = GatewayConfig { max_connections_per_address: 1, ..gateway_with_ports(port..=port) };
        let (_env, _) = with_tcp_endpoint(config, upstream).await;
        let _first = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        accepted.wait_for(|n| *n == 1).await.unwrap();
        // A second connection from the same address, while the first is open, is reset.
        expect_reset(&mut TcpStream::connect(("127.0.0.1", port)).await.unwrap()).await;
        assert_eq!(*accepted.borrow(), 1);
    })
    .await;
}
