//! The defects a review found at the edge (issue 10), one test each: every test here failed
//! before its fix. Silent connections, refused agents that never read, secrets revoked during a
//! handshake, rate buckets for tunnels that do not exist, clients that stop reading, path
//! parameters, HTTP/2 cookies, drains of a lone agent, loops through a tunnel, and what public
//! error bodies may say.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ferry_agent::filter::Filters;
use ferry_codec::{AuthResult, ControlMessage, InstanceId, Secret};
use ferry_gateway::GatewayConfig;
use ferry_gateway::auth::AuthSource;
use ferry_gateway::limits::Rate;
use ferry_transport::mux::{SessionConfig, session};
use ferry_transport::ws::{recv_message, send_message};
use ferry_transport::{IoCounters, WsIo, multiplex};
use http::{Request, StatusCode, header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

/// Reads until the peer closes (or resets) the connection; returns when that happened.
async fn closed_after(socket: &mut TcpStream, since: Instant) -> Duration {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return since.elapsed(),
            Ok(_) => {}
        }
    }
}

#[tokio::test]
async fn silent_connections_are_closed_at_the_head_deadline() {
    bounded(async {
        let deadline = Duration::from_millis(400);
        let config = GatewayConfig { header_read_timeout: deadline, ..GatewayConfig::default() };
        let env = TestEnv::start_with(config, |_| {}).await;
        // Nothing at all; 23 of the 24 bytes of the HTTP/2 preface; the whole preface and a
        // SETTINGS frame but no request. Each would hold a connection slot forever.
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let empty_settings = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];
        let openings: [&[u8]; 3] = [b"", &preface[..23], &[&preface[..], &empty_settings].concat()];
        for opening in openings {
            let mut socket = TcpStream::connect(env.gateway_addr).await.unwrap();
            let started = Instant::now();
            socket.write_all(opening).await.unwrap();
            let closed = closed_after(&mut socket, started).await;
            println!("{} bytes sent, then silence: closed after {closed:?}", opening.len());
            assert!(closed >= deadline - Duration::from_millis(20), "closed early: {closed:?}");
            assert!(closed < deadline + Duration::from_secs(2), "closed late: {closed:?}");
        }
        // A client that sends its request in time is served as before.
        let (response, _) = get(&env.url("/")).await;
        assert_eq!(response.status(), StatusCode::OK);
    })
    .await;
}

/// A masked WebSocket ping from a client, with a 125-byte payload.
fn masked_ping() -> Vec<u8> {
    let mut frame = vec![0x89, 0x80 | 125, 1, 2, 3, 4];
    frame.extend((0..125u8).map(|i| i ^ [1, 2, 3, 4][usize::from(i % 4)]));
    frame
}

#[tokio::test]
async fn a_refused_agent_that_never_reads_is_dropped() {
    bounded(async {
        let handshake = Duration::from_millis(300);
        let config = GatewayConfig { handshake_timeout: handshake, ..GatewayConfig::default() };
        let env = TestEnv::start_with(config, |_| {}).await;
        let mut socket = TcpStream::connect(env.gateway_addr).await.unwrap();
        let upgrade = "GET /ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                       Sec-WebSocket-Protocol: ferry.v1\r\n\r\n";
        socket.write_all(upgrade.as_bytes()).await.unwrap();
        let mut head = vec![0u8; 1024];
        let n = socket.read(&mut head).await.unwrap();
        assert!(head[..n].starts_with(b"HTTP/1.1 101"));
        // From now on this peer never reads: it floods pings, so the gateway's pongs fill the
        // socket, and it never answers the challenge. The refusal after the handshake deadline
        // cannot be written; the gateway must give up on the socket instead of waiting forever.
        let started = Instant::now();
        let ping = masked_ping().repeat(64);
        let flood = async {
            loop {
                if socket.write_all(&ping).await.is_err() {
                    return started.elapsed();
                }
            }
        };
        let dropped = tokio::time::timeout(Duration::from_secs(10), flood).await;
        let dropped = dropped.expect("the gateway kept a refused agent's socket");
        println!("refused agent dropped after {dropped:?}");
        assert!(dropped >= handshake, "dropped before the handshake deadline: {dropped:?}");
    })
    .await;
}

fn auth_file(contents: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("ferry-auth-{}.toml", Uuid::new_v4()));
    std::fs::write(&path, contents).unwrap();
    path
}

#[tokio::test]
async fn a_secret_revoked_during_the_handshake_keeps_no_session() {
    bounded(async {
        let old = Secret::new("old secret").unwrap();
        let path = auth_file(&format!("[tunnels.{TUNNEL}]\nsecrets = [\"old secret\"]\n"));
        let config = GatewayConfig { auth: AuthSource::File(path.clone()), ..GatewayConfig::default() };
        let env = TestEnv::start_without_agent(config).await;
        let revoke = |gateway: &Arc<ferry_gateway::Gateway>| {
            let path = path.clone();
            let gateway = Arc::clone(gateway);
            async move {
                std::fs::write(&path, format!("[tunnels.{TUNNEL}]\nsecrets = [\"new secret\"]\n")).unwrap();
                gateway.reload_auth().await.unwrap();
            }
        };

        // 1. Revoked after the challenge went out, before the answer came back: refused.
        let mut ws = raw_ws(env.gateway_addr).await;
        let hello = ferry_codec::ServerHello::decode(recv_message(&mut ws).await.unwrap()).unwrap();
        revoke(&env.gateway).await;
        let instance = InstanceId(Uuid::new_v4());
        let mac = ferry_codec::Transcript::client(
            ferry_codec::PROTOCOL_VERSION,
            &hello.nonce,
            &env.tunnel_id,
            &instance,
        )
        .sign(&old);
        let auth = ferry_codec::ClientAuth {
            version: ferry_codec::PROTOCOL_VERSION,
            tunnel_id: env.tunnel_id.clone(),
            instance_id: instance,
            agent_version: "raw".into(),
            mac: Some(mac),
            tcp: Vec::new(),
            allow_ip: Vec::new(),
            deny_ip: Vec::new(),
            basic_auth: Vec::new(),
        };
        send_message(&mut ws, auth.encode()).await.unwrap();
        let result = AuthResult::decode(recv_message(&mut ws).await.unwrap()).unwrap();
        assert!(matches!(result, AuthResult::Rejected(_)), "a revoked secret was accepted: {result:?}");

        // 2. Revoked after the gateway accepted, before the session was registered (the agent
        //    has not opened its control stream yet): the session is closed as soon as it is.
        std::fs::write(&path, format!("[tunnels.{TUNNEL}]\nsecrets = [\"old secret\"]\n")).unwrap();
        env.gateway.reload_auth().await.unwrap();
        let (ws, _, _, result) =
            raw_handshake(env.gateway_addr, &env.tunnel_id, instance, Some(&old), None).await;
        assert!(matches!(result, AuthResult::Accepted(_)));
        revoke(&env.gateway).await;
        let (driver, opener) = session(
            WsIo::new(
                ws,
                tokio_tungstenite::tungstenite::protocol::Role::Client,
                Arc::new(IoCounters::default()),
            ),
            multiplex::Mode::Client,
            &SessionConfig::default(),
        );
        let driving = tokio::spawn(driver.run(|_| {}, tokio_util::sync::CancellationToken::new()));
        let (mut control, _slot) = opener.open().await.unwrap();
        let mut ping = bytes::BytesMut::new();
        ControlMessage::Ping { nonce: 1 }.encode(&mut ping).unwrap();
        futures_util::io::AsyncWriteExt::write_all(&mut control, &ping).await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(5), driving).await;
        assert!(ended.is_ok(), "a session on a revoked secret stayed up");
        assert!(env.gateway.registry.of(&env.tunnel_id).is_empty());
        std::fs::remove_file(path).unwrap();
    })
    .await;
}

#[tokio::test]
async fn requests_for_unknown_tunnels_take_no_rate_tokens() {
    bounded(async {
        let config =
            GatewayConfig { tunnel_rate: Some(Rate::parse("1/h").unwrap()), ..GatewayConfig::default() };
        let mut env = TestEnv::start_without_agent(config).await;
        // Before any agent: 404, and no bucket is made for the id.
        let (response, body) = get(&env.url("/")).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(json(&body)["error"]["code"], "tunnel_not_found");
        env.agent = Some(spawn_agent(env.agent_config()));
        env.wait_for_sessions(1).await;
        let (response, _) = get(&env.url("/")).await;
        assert_eq!(response.status(), StatusCode::OK, "the 404 used up the tunnel's token");
        let (response, _) = get(&env.url("/")).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    })
    .await;
}

/// A raw upstream: answers `GET` at once with `ok`, and holds every other request forever
/// without reading its body.
async fn holding_upstream() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                loop {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match socket.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    if !head.starts_with(b"GET ") {
                        std::future::pending::<()>().await;
                    }
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if socket.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_upload_ends_with_its_request() {
    bounded(async {
        // Room for the control stream and one request: a leaked stream blocks the tunnel.
        let config = GatewayConfig {
            session: SessionConfig::with_max_streams(2),
            response_timeout: Duration::from_millis(500),
            ..GatewayConfig::default()
        };
        let upstream = holding_upstream().await;
        let env = TestEnv::start_with(config, |c| {
            c.upstream = Some(ferry_agent::config::Upstream::parse(&upstream.to_string()).unwrap());
        })
        .await;
        let session = env.gateway.registry.all()[0].identity.id;
        // An endless upload to an upstream that never reads it nor answers: the windows fill,
        // the gateway answers 504 at its response deadline.
        let chunks = futures_util::stream::repeat_with(|| {
            Ok::<_, BoxError>(hyper::body::Frame::data(bytes::Bytes::from(vec![7u8; 64 * 1024])))
        });
        let body = http_body_util::BodyExt::boxed_unsync(http_body_util::StreamBody::new(chunks));
        let request = Request::post(env.url("/upload")).body(body).unwrap();
        let response = send(&client(), request).await;
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        drop(response);
        // The request is over; so is its stream, and the tunnel has room again.
        let mut served = None;
        for _ in 0..50 {
            let (response, body) = get(&env.url("/next")).await;
            if response.status() == StatusCode::OK {
                served = Some(body);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(served.as_deref(), Some(&b"ok"[..]), "the upload's stream outlived its request");
        // And the session lived through it all (a full session refuses, it does not die).
        assert_eq!(env.gateway.registry.all()[0].identity.id, session);
        assert_eq!(env.gateway.registry.all()[0].open_streams(), 0);
    })
    .await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_at_the_send_idle_deadline() {
    bounded(async {
        let idle = Duration::from_millis(500);
        let config = GatewayConfig { send_idle_timeout: idle, ..GatewayConfig::default() };
        let env = TestEnv::start_with(config, |_| {}).await;
        let session = Arc::clone(&env.gateway.registry.all()[0]);
        let released = || async {
            while session.in_flight() > 0 || session.open_streams() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };

        // HTTP/1.1: the client reads the head, then nothing; its socket stays open.
        let mut socket = TcpStream::connect(env.gateway_addr).await.unwrap();
        let request = format!("GET /t/{}/bytes/{} HTTP/1.1\r\nHost: x\r\n\r\n", env.tunnel_id, 1u64 << 34);
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut head = [0u8; 256];
        let n = socket.read(&mut head).await.unwrap();
        assert!(head[..n].starts_with(b"HTTP/1.1 200"));
        let started = Instant::now();
        released().await;
        let cut = started.elapsed();
        println!("HTTP/1.1 client that stopped reading: cut after {cut:?}");
        assert!(cut >= idle && cut < idle + Duration::from_secs(3), "cut after {cut:?}");

        // HTTP/2: the client never grants the stream more window (it never reads the body).
        let response = send(
            &h2c_client(),
            Request::get(env.url(&format!("/bytes/{}", 1u64 << 34))).body(empty()).unwrap(),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        let started = Instant::now();
        released().await;
        let cut = started.elapsed();
        println!("HTTP/2 stream without window updates: cut after {cut:?}");
        assert!(cut >= idle && cut < idle + Duration::from_secs(3), "cut after {cut:?}");
        drop((socket, response));

        // A client that reads slowly but steadily is not cut.
        let response = send(&client(), Request::get(env.url("/bytes/4194304")).body(empty()).unwrap()).await;
        let mut body = response.into_body();
        let mut received = 0;
        while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            received += frame.unwrap().into_data().map_or(0, |d| d.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(received, 4 << 20);
        let metrics = env.gateway.metrics.render(&env.gateway.registry);
        assert!(metrics.contains("ferry_limited_total{limit=\"send_idle\"} 2"), "{metrics}");
    })
    .await;
}

#[tokio::test]
async fn one_client_cannot_take_a_whole_tunnel() {
    bounded(async {
        let config = GatewayConfig { max_client_requests: 2, ..GatewayConfig::default() };
        let env = TestEnv::start_with(config, |_| {}).await;
        let held: Vec<_> = (0..2)
            .map(|_| {
                let url = env.url("/hold");
                tokio::spawn(async move { get(&url).await })
            })
            .collect();
        env.stats.held.subscribe().wait_for(|n| *n == 2).await.unwrap();
        let (response, body) = get(&env.url("/bytes/1")).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(json(&body)["error"]["code"], "client_at_capacity");
        assert!(response.headers().contains_key(header::RETRY_AFTER));
        // Another client is served meanwhile.
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_local_address(Some("127.0.0.2".parse().unwrap()));
        let other = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector);
        let (response, _) = fetch(&other, Request::get(env.url("/bytes/1")).body(empty()).unwrap()).await;
        assert_eq!(response.status(), StatusCode::OK);
        env.stats.gate.add_permits(2);
        for request in held {
            assert_eq!(request.await.unwrap().0.status(), StatusCode::OK);
        }
        let (response, _) = get(&env.url("/bytes/1")).await;
        assert_eq!(response.status(), StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn path_parameters_cannot_bypass_allow_path() {
    bounded(async {
        let env = TestEnv::start_with(GatewayConfig::default(), |config| {
            config.filters = Filters { paths: Some(vec!["/bytes".into()]), ..Filters::default() };
        })
        .await;
        for sneaky in
            ["/bytes/..;/headers", "/bytes;x/../headers", "/bytes/%2e%2e;/headers", "/bytes/..%3b/headers"]
        {
            let (response, body) = get(&env.url(sneaky)).await;
            assert_eq!(response.status(), StatusCode::FORBIDDEN, "{sneaky}");
            assert_eq!(json(&body)["error"]["code"], "path_not_allowed");
        }
        assert_eq!(env.stats.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
        let (response, _) = get(&env.url("/bytes/3")).await;
        assert_eq!(response.status(), StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn http2_cookie_pieces_are_joined_for_the_upstream() {
    bounded(async {
        let env = TestEnv::start().await;
        let request = Request::get(env.url("/headers"))
            .header(header::COOKIE, "a=1")
            .header(header::COOKIE, "b=2")
            .header(header::COOKIE, "c=3")
            .body(empty())
            .unwrap();
        let (response, body) = fetch(&h2c_client(), request).await;
        assert_eq!(response.status(), StatusCode::OK);
        let seen = json(&body);
        let cookies: Vec<&str> = seen["headers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|pair| pair[0] == "cookie")
            .map(|pair| pair[1].as_str().unwrap())
            .collect();
        assert_eq!(cookies, ["a=1; b=2; c=3"], "RFC 9113 §8.2.3: one field for an HTTP/1.1 upstream");
    })
    .await;
}

#[tokio::test]
async fn an_admin_drain_of_the_only_agent_keeps_the_tunnel_serving() {
    bounded(async {
        let config = GatewayConfig { pending_timeout: Duration::from_secs(3), ..GatewayConfig::default() };
        let env = TestEnv::start_with(config, |_| {}).await;
        let first = env.gateway.registry.all()[0].identity.id;
        let url = env.url("/hold");
        let held = tokio::spawn(async move { get(&url).await });
        env.stats.held.subscribe().wait_for(|n| *n == 1).await.unwrap();

        let drain = Request::post(env.gateway_url(&format!("/connections/{}/drain", env.tunnel_id)))
            .body(empty())
            .unwrap();
        let (response, _) = fetch(&client(), drain).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        // The held request keeps the drained session busy; new requests go to its successor
        // at once instead of waiting for it (or getting 503).
        let started = Instant::now();
        let (response, body) = get(&env.url("/bytes/10")).await;
        let waited = started.elapsed();
        assert_eq!(response.status(), StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        assert!(waited < Duration::from_secs(1), "waited {waited:?} for a successor");
        let sessions = env.gateway.registry.of(&env.tunnel_id);
        assert!(
            sessions.iter().any(|s| s.identity.id == first && !s.accepts_requests()),
            "the drained one finishes"
        );
        assert!(sessions.iter().any(|s| s.identity.id != first && s.accepts_requests()));

        env.stats.gate.add_permits(1);
        let (response, body) = held.await.unwrap();
        assert_eq!((response.status(), &body[..]), (StatusCode::OK, &b"released"[..]));
        env.gateway
            .registry
            .wait_until(|r| r.of(&env.tunnel_id).iter().all(|s| s.identity.id != first))
            .await;
    })
    .await;
}

#[tokio::test]
async fn a_request_looping_through_a_tunnel_never_reaches_the_admin_pages() {
    bounded(async {
        let mut env = TestEnv::start_without_agent(GatewayConfig::default()).await;
        // The agent's upstream is the gateway itself, on loopback.
        let mut config = env.agent_config();
        config.upstream = Some(ferry_agent::config::Upstream::parse(&env.gateway_addr.to_string()).unwrap());
        env.agent = Some(spawn_agent(config));
        env.wait_for_sessions(1).await;
        for path in ["/connections", "/metrics", "/"] {
            let (response, body) = get(&env.url(path)).await;
            let text = String::from_utf8_lossy(&body);
            assert_ne!(response.status(), StatusCode::OK, "{path} through the tunnel: {text}");
            assert!(!text.contains("session_id") && !text.contains("ferry_sessions"), "{path}: {text}");
        }
        // Another proxy on the same host (it adds forwarding headers) is not trusted either.
        let request = Request::get(env.gateway_url("/connections"))
            .header("x-forwarded-for", "203.0.113.9")
            .body(empty())
            .unwrap();
        let (response, _) = fetch(&client(), request).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let (response, _) = get(&env.gateway_url("/connections")).await;
        assert_eq!(response.status(), StatusCode::OK, "a plain loopback client still is");
    })
    .await;
}

#[tokio::test]
async fn public_errors_do_not_show_upstream_details() {
    bounded(async {
        let down = closed_port().await;
        let env = TestEnv::start_with(GatewayConfig::default(), |config| {
            config.upstream = Some(ferry_agent::config::Upstream::parse(&down.to_string()).unwrap());
            config.breaker_failures = 2;
            config.breaker_cooldown = Duration::from_secs(60);
        })
        .await;
        let port = down.port().to_string();
        for expected in ["upstream_unreachable", "upstream_unreachable", "upstream_unhealthy"] {
            let (response, body) = get(&env.url("/")).await;
            let text = String::from_utf8_lossy(&body);
            assert_eq!(json(&body)["error"]["code"], expected, "{text}");
            assert!(response.status().is_server_error());
            for secret in [port.as_str(), "127.0.0.", "refused", "os error", "connect"] {
                assert!(!text.contains(secret), "the public body shows {secret:?}: {text}");
            }
        }
    })
    .await;
}
