//! Limits and timeouts at the public edge: slowloris, keep-alive idle, URI length, body size,
//! per-tunnel concurrency, connections per address, unauthenticated agent connections, request
//! rates, and the response-head deadline.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use ferry_gateway::GatewayConfig;
use ferry_gateway::limits::Rate;
use http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Reads until the peer closes (or resets) the connection; returns what arrived.
async fn read_until_closed(socket: &mut TcpStream) -> Vec<u8> {
    let mut answer = Vec::new();
    let _ = socket.read_to_end(&mut answer).await;
    answer
}

#[tokio::test]
async fn slowloris_is_cut_off_at_the_header_deadline() {
    bounded(async {
        let config =
            GatewayConfig { header_read_timeout: Duration::from_millis(500), ..GatewayConfig::default() };
        let env = TestEnv::start_with(config, |_| {}).await;
        let mut socket = TcpStream::connect(env.gateway_addr).await.unwrap();
        let started = Instant::now();
        socket
            .write_all(format!("GET /t/{}/ HTTP/1.1\r\nHost: a\r\nX-Slow: ", env.tunnel_id).as_bytes())
            .await
            .unwrap();
        // One header byte every 100 ms, for up to 5 s: the gateway must hang up long before.
        let mut cut = false;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if socket.write_all(b"a").await.is_err() {
                cut = true;
                break;
            }
            let mut buf = [0u8; 256];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(1), socket.read(&mut buf)).await
            {
                cut = true;
                break;
            }
        }
        let elapsed = started.elapsed();
        assert!(cut, "the connection stayed open");
        assert!(elapsed < Duration::from_secs(3), "cut after {elapsed:?}");
        assert_eq!(
            env.stats.requests.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "nothing reached the upstream"
        );
    })
    .await;
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    bounded(async {
        let config =
            GatewayConfig { header_read_timeout: Duration::from_millis(300), ..GatewayConfig::default() };
        let env = TestEnv::start_with(config, |_| {}).await;
        let mut socket = TcpStream::connect(env.gateway_addr).await.unwrap();
        let request = format!("GET /t/{}/bytes/5 HTTP/1.1\r\nHost: a\r\n\r\n", env.tunnel_id);
        socket.write_all(request.as_bytes()).await.unwrap();
        let started = Instant::now();
        // The response arrives, then the idle connection is closed by the gateway.
        let answer =
            tokio::time::timeout(Duration::from_secs(5), read_until_closed(&mut socket)).await.unwrap();
        assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
        assert!(started.elapsed() >= Duration::from_millis(250), "closed before the idle limit");
    })
    .await;
}

#[tokio::test]
async fn long_uris_get_414() {
    bounded(async {
        let config = GatewayConfig { max_uri_len: 1024, ..GatewayConfig::default() };
        let env = TestEnv::start_with(config, |_| {}).await;
        let (response, body) = get(&env.url(&format!("/?q={}", "a".repeat(2000)))).await;
        assert_eq!(response.status(), StatusCode::URI_TOO_LONG);
        assert_eq!(json(&body)["error"]["code"], "uri_too_long");
        let (response, _) = get(&env.url(&format!("/?q={}", "a".repeat(500)))).await;
        assert_eq!(response.status(), StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    bounded(async {
        let config = GatewayConfig { max_request_body: Some(64 * 1024), ..GatewayConfig::default() };
        let env = TestEnv::start_with(config, |_| {}).await;
        let client = client();
        // Announced length over the limit: refused before anything reaches the agent.
        let request = Request::post(env.url("/sink")).body(full(vec![0u8; 100_000])).unwrap();
        let (response, body) = fetch(&client, request).await;
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(json(&body)["error"]["code"], "payload_too_large");
        assert_eq!(env.stats.requests.load(std::sync::atomic::Ordering::SeqCst), 0);

        // Chunked, growing past the limit: cut there, 413 before any response.
        let chunks =
            futures_util::stream::iter((0..10).map(|_| {
                Ok::<_, BoxError>(hyper::body::Frame::data(bytes::Bytes::from(vec![1u8; 16 * 1024])))
            }));
        let body = http_body_util::StreamBody::new(chunks).boxed_unsync();
        let request = Request::post(env.url("/sink?delay_ms=0")).body(body).unwrap();
        let (response, body) = fetch(&client, request).await;
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE, "{}", String::from_utf8_lossy(&body));

        // Under the limit: served.
        let request = Request::post(env.url("/echo")).body(full(vec![7u8; 60_000])).unwrap();
        let (response, body) = fetch(&client, request).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body.len(), 60_000);
    })
    .await;
}

#[tokio::test]
async fn a_tunnel_over_its_concurrency_limit_gets_503() {
    bounded(async {
        let config = GatewayConfig { max_tunnel_requests: 2, ..GatewayConfig::default() };
        let env = TestEnv::start_with(config, |_| {}).await;
        let client = client();
        let held: Vec<_> = (0..2)
            .map(|_| {
                let (client, url) = (client.clone(), env.url("/hold"));
                tokio::spawn(async move { client.request(Request::get(url).body(empty()).unwrap()).await })
            })
            .collect();
        env.stats.held.subscribe().wait_for(|n| *n == 2).await.unwrap();
        let (response, body) = get(&env.url("/")).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json(&body)["error"]["code"], "tunnel_at_capacity");
        assert!(response.headers().contains_key(header::RETRY_AFTER));
        env.stats.gate.add_permits(2);
        for request in held {
            assert_eq!(request.await.unwrap().unwrap().status(), StatusCode::OK);
        }
        let (response, _) = get(&env.url("/")).await;
        assert_eq!(response.status(), StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn connections_per_address_are_capped() {
    bounded(async {
        // The agent comes from 127.0.0.1 as well, but an upgraded connection is no longer an HTTP
        // connection: agent sessions are bounded by authentication and the handshake cap instead.
        let config = GatewayConfig { max_connections_per_address: 2, ..GatewayConfig::default() };
        let env = TestEnv::start_with(config, |_| {}).await;
        let mut open = Vec::new();
        for _ in 0..2 {
            let mut socket = TcpStream::connect(env.gateway_addr).await.unwrap();
            socket.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
            let mut buf = [0u8; 12];
            socket.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"HTTP/1.1 200");
            open.push(socket);
        }
        let mut refused = TcpStream::connect(env.gateway_addr).await.unwrap();
        let _ = refused.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(
            read_until_closed(&mut refused).await.is_empty(),
            "the third connection is closed unanswered"
        );
        let metrics = env.gateway.metrics.render(&env.gateway.registry);
        assert!(metrics.contains("ferry_limited_total{limit=\"connections_per_address\"} 1"), "{metrics}");
        // A closed connection frees its slot.
        drop(open.pop());
        let mut again = None;
        for _ in 0..100 {
            let mut socket = TcpStream::connect(env.gateway_addr).await.unwrap();
            let _ = socket.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
            let mut buf = [0u8; 12];
            if socket.read_exact(&mut buf).await.is_ok() {
                again = Some(buf);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(&again.unwrap(), b"HTTP/1.1 200");
    })
    .await;
}

#[tokio::test]
async fn unauthenticated_agent_connections_are_capped() {
    bounded(async {
        let config = GatewayConfig { max_handshakes: 1, ..GatewayConfig::default() };
        let env = TestEnv::start_without_agent(config).await;
        // One WebSocket that never sends its ClientAuth holds the only handshake slot.
        let _silent = raw_ws(env.gateway_addr).await;
        let mut request = format!("ws://{}/ws", env.gateway_addr).into_client_request().unwrap();
        request.headers_mut().insert(
            "sec-websocket-protocol",
            http::HeaderValue::from_static(ferry_transport::ws::SUBPROTOCOL),
        );
        let tcp = TcpStream::connect(env.gateway_addr).await.unwrap();
        let err = tokio_tungstenite::client_async(request, tcp).await.unwrap_err();
        let tokio_tungstenite::tungstenite::Error::Http(response) = err else { panic!("unexpected: {err}") };
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    })
    .await;
}

#[tokio::test]
async fn request_rates_are_limited_per_tunnel_and_per_client() {
    bounded(async {
        let config =
            GatewayConfig { tunnel_rate: Some(Rate::parse("3/m").unwrap()), ..GatewayConfig::default() };
        let env = TestEnv::start_with(config, |_| {}).await;
        for _ in 0..3 {
            assert_eq!(get(&env.url("/")).await.0.status(), StatusCode::OK);
        }
        let (response, body) = get(&env.url("/")).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(json(&body)["error"]["code"], "rate_limited");
        let retry: u64 = response.headers()[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
        assert!((1..=20).contains(&retry), "one token comes back every 20 s: {retry}");
        drop(env);

        let config =
            GatewayConfig { client_rate: Some(Rate::parse("2/h").unwrap()), ..GatewayConfig::default() };
        let env = TestEnv::start_with(config, |_| {}).await;
        for _ in 0..2 {
            assert_eq!(get(&env.url("/")).await.0.status(), StatusCode::OK);
        }
        assert_eq!(get(&env.url("/")).await.0.status(), StatusCode::TOO_MANY_REQUESTS);
        let metrics = env.gateway.metrics.render(&env.gateway.registry);
        assert!(metrics.contains("ferry_limited_total{limit=\"client_rate\"} 1"), "{metrics}");
    })
    .await;
}

#[tokio::test]
async fn a_silent_upstream_gets_504_at_the_response_deadline() {
    bounded(async {
        let config =
            GatewayConfig { response_timeout: Duration::from_millis(300), ..GatewayConfig::default() };
        let env = TestEnv::start_with(config, |_| {}).await;
        let started = Instant::now();
        let (response, body) = get(&env.url("/slow?ms=5000")).await;
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(json(&body)["error"]["code"], "upstream_timeout");
        assert!(started.elapsed() < Duration::from_secs(3));
    })
    .await;
}

#[tokio::test]
async fn per_tunnel_overrides_replace_the_gateway_wide_settings() {
    bounded(async {
        let tunnel: ferry_codec::TunnelId = TUNNEL.parse().unwrap();
        let overrides = ferry_gateway::config::TunnelOverrides {
            response_timeout: Some(Duration::from_millis(300)),
            max_request_body: Some(100),
        };
        let config = GatewayConfig {
            tunnel_overrides: [(tunnel, overrides)].into_iter().collect(),
            ..GatewayConfig::default()
        };
        let env = TestEnv::start_with(config, |_| {}).await;
        let started = Instant::now();
        let (response, body) = get(&env.url("/slow?ms=5000")).await;
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(json(&body)["error"]["code"], "upstream_timeout");
        assert!(started.elapsed() < Duration::from_secs(3), "the tunnel's 300 ms applied, not 60 s");
        let request = Request::post(env.url("/echo")).body(full(vec![0u8; 101])).unwrap();
        assert_eq!(fetch(&client(), request).await.0.status(), StatusCode::PAYLOAD_TOO_LARGE);
    })
    .await;
}

#[tokio::test]
async fn an_agent_that_stops_accepting_streams_gets_504_agent_unresponsive() {
    bounded(async {
        let config = GatewayConfig {
            stream_open_timeout: Duration::from_millis(300),
            response_timeout: Duration::from_secs(2),
            ..GatewayConfig::default()
        };
        let mut env = TestEnv::start_without_agent(config).await;
        // The agent reaches the gateway through a proxy that can silently stop forwarding.
        let proxy = PartitionProxy::start(env.gateway_addr).await;
        let mut agent = env.agent_config();
        agent.gateway = ferry_agent::config::GatewayUrl::parse(&format!("ws://{}/ws", proxy.addr)).unwrap();
        env.agent = Some(spawn_agent(agent));
        env.wait_for_sessions(1).await;
        proxy.partition();
        // yamux lets the gateway open 256 streams the agent has not acknowledged; the ones
        // beyond wait for acknowledgements that never come, until the stream-open deadline.
        let client = client();
        let requests: Vec<_> = (0..300)
            .map(|_| {
                let (client, url) = (client.clone(), env.url("/bytes/1"));
                tokio::spawn(async move { fetch(&client, Request::get(url).body(empty()).unwrap()).await })
            })
            .collect();
        let mut unresponsive = 0;
        for request in requests {
            let (response, body) = request.await.unwrap();
            assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
            if json(&body)["error"]["code"] == "agent_unresponsive" {
                unresponsive += 1;
            }
        }
        assert!(unresponsive >= 40, "only {unresponsive} of 300 timed out opening their stream");
    })
    .await;
}
