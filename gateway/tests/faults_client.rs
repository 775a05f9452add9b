//! Fault matrix rows about public clients and raw peers at the edge (`../shared/FAULTS.md`):
//! slowloris and slow bodies, concurrency caps, huge heads, hostile WebSocket frames and
//! handshake messages, silent connections before authentication, request smuggling, routing
//! tricks and HTTP/2 floods. Each test is named after its row; a second tunnel must be served
//! throughout, and the process's open files come back to where they were.
//!
//! The faults run on a two-worker runtime, as the binaries do: on one thread the witness's
//! requests would queue behind every task the fault keeps busy (its latency would be the test's,
//! not the gateway's), and races between tasks on two threads would never show.
// The serial() guard is held across awaits on purpose: it keeps one fault at a time per binary.
#![allow(clippy::unwrap_used, clippy::await_holding_lock)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use ferry_codec::{AuthErrorCode, AuthResult, InstanceId};
use ferry_gateway::GatewayConfig;
use http::{Request, StatusCode, header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use uuid::Uuid;

/// A TCP connection to `to` from the loopback address `from` (another "client").
async fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{from}:0").parse().unwrap())?;
    socket.connect(to).await
}

/// Reads until the peer closes, up to `limit`; returns what came and whether it closed.
async fn read_until_closed(socket: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut answer = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (answer, closed)
}

/// The status codes of the HTTP/1.1 responses in `bytes`.
fn statuses(bytes: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(bytes);
    text.match_indices("HTTP/1.1 ").filter_map(|(at, _)| text.get(at + 9..at + 12)?.parse().ok()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t06_slowloris_slow_post_slow_read() {
    let _serial = serial();
    bounded(async {
        let deadline = Duration::from_millis(500);
        let config = GatewayConfig {
            header_read_timeout: deadline,
            body_idle_timeout: deadline,
            send_idle_timeout: deadline,
            max_connections_per_address: 40,
            ..GatewayConfig::default()
        };
        let env = TestEnv::start_with(config, |_| {}).await;
        let witness = Witness::start(&env).await;
        let baseline = Vitals::of(&env);

        // Header trickle: a request line, then one header byte every 100 ms. Closed at the
        // header deadline (hyper's timer, which the gateway sets).
        let trickles: Vec<_> = (0..30)
            .map(|_| {
                let addr = env.gateway_addr;
                let id = env.tunnel_id.clone();
                tokio::spawn(async move {
                    let mut socket = connect_from("127.0.0.2", addr).await.unwrap();
                    let started = Instant::now();
                    socket.write_all(format!("GET /t/{id}/ HTTP/1.1\r\nX-Slow: ").as_bytes()).await.unwrap();
                    for _ in 0..100 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        if socket.write_all(b"a").await.is_err() {
                            break;
                        }
                        let mut probe = [0u8; 512];
                        // A 408 may come first; the close follows.
                        if let Ok(Ok(0) | Err(_)) =
                            tokio::time::timeout(Duration::from_millis(1), socket.read(&mut probe)).await
                        {
                            break;
                        }
                    }
                    started.elapsed()
                })
            })
            .collect();
        for trickle in trickles {
            let cut = trickle.await.unwrap();
            assert!(
                cut >= deadline && cut < deadline + Duration::from_secs(2),
                "header trickle cut after {cut:?}"
            );
        }

        // Paused upload: the head and a little body, then nothing. 408 at the body deadline,
        // and the upstream's request is aborted (its sink sees the body fail).
        let consumed = env.stats.consumed.load(Ordering::SeqCst);
        let pauses: Vec<_> = (0..10)
            .map(|_| {
                let addr = env.gateway_addr;
                let id = env.tunnel_id.clone();
                tokio::spawn(async move {
                    let mut socket = connect_from("127.0.0.3", addr).await.unwrap();
                    let head =
                        format!("POST /t/{id}/sink HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000\r\n\r\n");
                    socket.write_all(head.as_bytes()).await.unwrap();
                    socket.write_all(&[1u8; 1000]).await.unwrap();
                    let started = Instant::now();
                    let (answer, closed) = read_until_closed(&mut socket, Duration::from_secs(5)).await;
                    (started.elapsed(), statuses(&answer), closed)
                })
            })
            .collect();
        for pause in pauses {
            let (took, statuses, closed) = pause.await.unwrap();
            assert_eq!(statuses, [408], "a paused upload");
            assert!(closed, "the connection of a paused upload stays open");
            assert!(
                took >= deadline && took < deadline + Duration::from_secs(2),
                "paused upload cut after {took:?}"
            );
        }
        assert_eq!(
            env.stats.consumed.load(Ordering::SeqCst) - consumed,
            10 * 1000,
            "only what was sent arrived"
        );

        // Slow clients that hold their connections (here: requests the upstream holds; ferry has
        // no minimum-rate rule, so a 1 byte/s body would hold one as long): the per-client
        // connection cap bounds what one client can take.
        let mut slow = Vec::new();
        for _ in 0..50 {
            let mut socket = connect_from("127.0.0.4", env.gateway_addr).await.unwrap();
            let head = format!("GET /t/{}/hold HTTP/1.1\r\nHost: a\r\n\r\n", env.tunnel_id);
            let _ = socket.write_all(head.as_bytes()).await;
            slow.push(socket);
        }
        env.stats.held.subscribe().wait_for(|n| *n == 40).await.unwrap();
        let mut refused = 0;
        for socket in &mut slow {
            let mut probe = [0u8; 16];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(20), socket.read(&mut probe)).await
            {
                refused += 1;
            }
        }
        assert_eq!(refused, 10, "the per-client cap holds");
        assert_eq!(*env.stats.held.borrow(), 40);
        env.stats.gate.add_permits(40);
        drop(slow);

        // Clients that ask for a lot and read nothing: cut at the send-idle deadline.
        let readers: Vec<_> = (0..10)
            .map(|_| {
                let addr = env.gateway_addr;
                let id = env.tunnel_id.clone();
                tokio::spawn(async move {
                    let mut socket = connect_from("127.0.0.5", addr).await.unwrap();
                    let head = format!("GET /t/{id}/bytes/{} HTTP/1.1\r\nHost: a\r\n\r\n", 1u64 << 32);
                    socket.write_all(head.as_bytes()).await.unwrap();
                    let mut first = [0u8; 64];
                    let _ = socket.read(&mut first).await;
                    socket
                })
            })
            .collect();
        let mut sockets = Vec::new();
        for reader in readers {
            sockets.push(reader.await.unwrap());
        }
        let session = std::sync::Arc::clone(&env.gateway.registry.of(&env.tunnel_id)[0]);
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), async {
            while session.in_flight() > 0 || session.open_streams() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("non-reading clients kept their streams");
        println!("non-reading clients cut within {:?}", started.elapsed());
        drop(sockets);
        Vitals::settle_back_to(baseline).await;
        witness.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t07_concurrency_caps_refuse_exactly_the_excess() {
    let _serial = serial();
    bounded(async {
        // Per tunnel (--max-tunnel-requests) and per agent session (--max-streams).
        for (config, limit) in [
            (GatewayConfig { max_tunnel_requests: 20, ..GatewayConfig::default() }, 20),
            (
                GatewayConfig {
                    session: ferry_transport::SessionConfig::with_max_streams(12),
                    ..GatewayConfig::default()
                },
                12,
            ),
        ] {
            let env = TestEnv::start_with(config, |_| {}).await;
            let session = env.gateway.registry.of(&env.tunnel_id)[0].identity.id;
            let held: Vec<_> = (0..limit)
                .map(|_| {
                    let url = env.url("/hold");
                    tokio::spawn(async move { get(&url).await })
                })
                .collect();
            env.stats.held.subscribe().wait_for(|n| *n == limit as u64).await.unwrap();
            for _ in 0..5 {
                let started = Instant::now();
                let (response, body) = get(&env.url("/bytes/1")).await;
                assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
                assert_eq!(json(&body)["error"]["code"], "tunnel_at_capacity");
                assert!(response.headers().contains_key(header::RETRY_AFTER));
                assert!(
                    started.elapsed() < Duration::from_millis(500),
                    "refused after {:?}",
                    started.elapsed()
                );
            }
            env.stats.gate.add_permits(limit);
            for request in held {
                assert_eq!(request.await.unwrap().0.status(), StatusCode::OK);
            }
            // The session went on through it all.
            assert_eq!(env.gateway.registry.of(&env.tunnel_id)[0].identity.id, session);
            assert_eq!(get(&env.url("/bytes/1")).await.0.status(), StatusCode::OK);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t08a_huge_request_headers() {
    let _serial = serial();
    bounded(async {
        let config =
            GatewayConfig { header_read_timeout: Duration::from_millis(500), ..GatewayConfig::default() };
        let env = TestEnv::start_with(config, |_| {}).await;
        let witness = Witness::start(&env).await;
        let baseline = Vitals::of(&env);
        let raw = |request: String| {
            let addr = env.gateway_addr;
            async move {
                let mut socket = TcpStream::connect(addr).await.unwrap();
                let _ = socket.write_all(request.as_bytes()).await;
                statuses(&read_until_closed(&mut socket, Duration::from_secs(5)).await.0)
            }
        };
        let id = env.tunnel_id.clone();
        let one_big = format!("GET /t/{id}/ HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "x".repeat(70 * 1024));
        assert_eq!(raw(one_big).await, [431]);
        let fields: String = (0..129).map(|i| format!("X-F{i}: v\r\n")).collect();
        assert_eq!(raw(format!("GET /t/{id}/ HTTP/1.1\r\nHost: a\r\n{fields}\r\n")).await, [431]);
        let long_uri = format!(
            "GET /t/{id}/?q={} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            "a".repeat(17 * 1024)
        );
        assert_eq!(raw(long_uri).await, [414]);
        // The witness's own requests reach the same upstream (as `/bytes/64`); none of these may.
        let targets = env.stats.targets.lock().unwrap().clone();
        assert!(
            targets.iter().all(|t| t.starts_with("/bytes/")),
            "a refused request reached the upstream: {targets:?}"
        );
        // 1 MiB of header bytes sent slowly: cut by the header deadline, long before the end.
        let mut socket = TcpStream::connect(env.gateway_addr).await.unwrap();
        socket.write_all(format!("GET /t/{id}/ HTTP/1.1\r\nHost: a\r\n").as_bytes()).await.unwrap();
        let started = Instant::now();
        let mut sent = 0;
        while sent < 1 << 20 {
            if socket.write_all(&[b'x'; 1024]).await.is_err() {
                break;
            }
            sent += 1024;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            sent < 1 << 20 && started.elapsed() < Duration::from_secs(3),
            "{sent} bytes in {:?}",
            started.elapsed()
        );
        Vitals::settle_back_to(baseline).await;
        witness.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t08b_huge_headers_on_the_agent_upgrade() {
    let _serial = serial();
    bounded(async {
        let env = TestEnv::start().await;
        let witness = Witness::start(&env).await;
        let mut socket = TcpStream::connect(env.gateway_addr).await.unwrap();
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
            "p,".repeat(512 * 1024)
        );
        let started = Instant::now();
        let _ = socket.write_all(request.as_bytes()).await;
        let (answer, closed) = read_until_closed(&mut socket, Duration::from_secs(5)).await;
        assert_eq!(statuses(&answer), [431]);
        assert!(closed && started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
        witness.finish().await;
    })
    .await;
}

/// A WebSocket frame as a client sends it (masked unless `unmasked`), with `rsv` bits set.
fn ws_frame(opcode: u8, fin: bool, payload: &[u8], unmasked: bool, rsv: u8) -> Vec<u8> {
    let mut frame = vec![(u8::from(fin) << 7) | (rsv << 4) | opcode];
    let mask_bit = if unmasked { 0 } else { 0x80 };
    match payload.len() {
        n if n < 126 => frame.push(mask_bit | n as u8),
        n if n < 65536 => {
            frame.push(mask_bit | 126);
            frame.extend((n as u16).to_be_bytes());
        }
        n => {
            frame.push(mask_bit | 127);
            frame.extend((n as u64).to_be_bytes());
        }
    }
    if unmasked {
        frame.extend(payload);
    } else {
        let mask = [1u8, 2, 3, 4];
        frame.extend(mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    }
    frame
}

/// Reads server frames (unmasked) until a close frame; returns its code, or `None` if the
/// connection ended without one.
async fn close_code(socket: &mut TcpStream) -> Option<u16> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // Parse what is there.
        let mut at = 0;
        while buf.len() >= at + 2 {
            let opcode = buf[at] & 0x0f;
            let (len, header) = match buf[at + 1] & 0x7f {
                126 if buf.len() >= at + 4 => {
                    (usize::from(u16::from_be_bytes([buf[at + 2], buf[at + 3]])), 4)
                }
                127 if buf.len() >= at + 10 => {
                    (u64::from_be_bytes(buf[at + 2..at + 10].try_into().unwrap()) as usize, 10)
                }
                126 | 127 => break,
                n => (usize::from(n), 2),
            };
            if buf.len() < at + header + len {
                break;
            }
            if opcode == 8 {
                let payload = &buf[at + header..at + header + len];
                return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            }
            at += header + len;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, socket.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend(&chunk[..n]),
            _ => return None,
        }
    }
}

/// A raw TCP connection upgraded to the agent endpoint; with `authenticate`, the ferry handshake
/// done too (as an agent of the evil tunnel).
async fn raw_agent_socket(gateway: SocketAddr, authenticate: bool) -> TcpStream {
    let mut socket = TcpStream::connect(gateway).await.unwrap();
    let upgrade = "GET /ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Protocol: ferry.v1\r\n\r\n";
    socket.write_all(upgrade.as_bytes()).await.unwrap();
    // The 101 and the ServerHello that follows it.
    let mut got: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = |got: &[u8]| got.windows(4).position(|w| w == b"\r\n\r\n");
    // The ServerHello is some 60 bytes behind the head.
    while head_end(&got).is_none_or(|end| got.len() < end + 4 + 40) {
        let n = socket.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        got.extend(&chunk[..n]);
    }
    if authenticate {
        let auth = ferry_codec::ClientAuth {
            version: ferry_codec::PROTOCOL_VERSION,
            tunnel_id: "agent_11111111-2222-3333-4444-555555555555_evil".parse().unwrap(),
            instance_id: InstanceId(Uuid::new_v4()),
            agent_version: "raw".into(),
            mac: None,
            tcp: Vec::new(),
            allow_ip: Vec::new(),
            deny_ip: Vec::new(),
            basic_auth: Vec::new(),
        };
        socket.write_all(&ws_frame(2, true, &auth.encode(), false, 0)).await.unwrap();
        // Accepted: the AuthResult frame arrives.
        let n = socket.read(&mut chunk).await.unwrap();
        assert!(n > 2 && chunk[0] == 0x82, "no AuthResult");
    }
    socket
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t09_oversized_or_hostile_websocket_frames() {
    let _serial = serial();
    bounded(async {
        let env = TestEnv::start().await;
        let witness = Witness::start(&env).await;
        let baseline = Vitals::of(&env);
        for authenticated in [false, true] {
            let too_big = vec![0u8; 2 * 1024 * 1024 + 1];
            let fragments: Vec<u8> = std::iter::once(ws_frame(2, false, &[0u8; 200], false, 0))
                .chain((0..10_000).map(|_| ws_frame(0, false, &[0u8; 300], false, 0)))
                .flatten()
                .collect();
            // A frame header that declares 2^62 bytes (and brings none of them).
            let mut declared = vec![0x82, 0x80 | 127];
            declared.extend((1u64 << 62).to_be_bytes());
            declared.extend([1, 2, 3, 4]);
            let cases: [(&str, Vec<u8>, u16); 5] = [
                ("2 MiB message", ws_frame(2, true, &too_big, false, 0), 1009),
                ("2^62 declared", declared, 1009),
                ("10,000 fragments", fragments, 1009),
                ("unmasked", ws_frame(2, true, b"hello", true, 0), 1002),
                ("reserved bits", ws_frame(2, true, b"hello", false, 0b100), 1002),
            ];
            for (what, bytes, expected) in cases {
                let mut socket = raw_agent_socket(env.gateway_addr, authenticated).await;
                let started = Instant::now();
                let _ = socket.write_all(&bytes).await;
                let code = close_code(&mut socket).await;
                let phase = if authenticated { "after the handshake" } else { "before it" };
                assert_eq!(code, Some(expected), "{what} {phase}");
                assert!(
                    started.elapsed() < Duration::from_secs(2),
                    "{what} {phase}: {:?}",
                    started.elapsed()
                );
            }
        }
        // The declared sizes were never allocated: memory is where it was.
        Vitals::settle_back_to(baseline).await;
        witness.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_malformed_handshake_messages() {
    let _serial = serial();
    bounded(async {
        let env = TestEnv::start().await;
        let witness = Witness::start(&env).await;
        let wrong_version = {
            let auth = ferry_codec::ClientAuth {
                version: 99,
                tunnel_id: env.tunnel_id.clone(),
                instance_id: InstanceId(Uuid::new_v4()),
                agent_version: "raw".into(),
                mac: None,
                tcp: Vec::new(),
                allow_ip: Vec::new(),
                deny_ip: Vec::new(),
                basic_auth: Vec::new(),
            };
            auth.encode().to_vec()
        };
        let cases: [(&str, Vec<u8>, AuthErrorCode); 6] = [
            ("truncated varint", vec![0x08, 0xff], AuthErrorCode::Malformed),
            ("over the message limit", vec![0u8; 2048], AuthErrorCode::Malformed),
            ("wrong wire type", vec![0x0a, 0x01, 0x00], AuthErrorCode::Malformed),
            ("only unknown fields", vec![0xf8, 0x07, 0x01], AuthErrorCode::Malformed),
            (
                "yamux data before the handshake",
                vec![0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0],
                AuthErrorCode::Malformed,
            ),
            ("another version", wrong_version, AuthErrorCode::UnsupportedVersion),
        ];
        for (what, message, expected) in cases {
            let mut ws = raw_ws(env.gateway_addr).await;
            let _hello = ferry_transport::ws::recv_message(&mut ws).await.unwrap();
            ferry_transport::ws::send_message(&mut ws, message.into()).await.unwrap();
            let result =
                AuthResult::decode(ferry_transport::ws::recv_message(&mut ws).await.unwrap()).unwrap();
            assert!(matches!(&result, AuthResult::Rejected(r) if r.code == expected), "{what}: {result:?}");
        }
        // Two ClientAuths: the second is not yamux, and ends that session alone.
        let instance = InstanceId(Uuid::new_v4());
        let evil: ferry_codec::TunnelId = "agent_11111111-2222-3333-4444-555555555555_evil".parse().unwrap();
        let (mut ws, _, auth, result) = raw_handshake(env.gateway_addr, &evil, instance, None, None).await;
        assert!(matches!(result, AuthResult::Accepted(_)));
        ferry_transport::ws::send_message(&mut ws, auth).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            use futures_util::StreamExt;
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
        assert!(closed.is_ok(), "a second ClientAuth left the session up");
        // Unregistered a moment after the socket closes, maybe on another worker: bounded wait.
        let gone = env.gateway.registry.wait_until(|r| r.of(&evil).is_empty());
        assert!(
            tokio::time::timeout(Duration::from_secs(5), gone).await.is_ok(),
            "the session stayed registered"
        );
        witness.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_silent_pre_auth_connections() {
    let _serial = serial();
    bounded(async {
        let timeout = Duration::from_millis(500);
        let config = GatewayConfig {
            handshake_timeout: timeout,
            header_read_timeout: timeout,
            max_handshakes: 20,
            ..GatewayConfig::default()
        };
        let mut env = TestEnv::start_without_agent(config).await;
        let baseline = Vitals::of(&env);
        // 30 WebSockets that upgrade and then say nothing, from another address.
        let mut silent = Vec::new();
        let mut busy = 0;
        for _ in 0..30 {
            let tcp = connect_from("127.0.0.2", env.gateway_addr).await.unwrap();
            let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                format!("ws://{}/ws", env.gateway_addr),
            )
            .unwrap();
            request
                .headers_mut()
                .insert("sec-websocket-protocol", http::HeaderValue::from_static("ferry.v1"));
            match tokio_tungstenite::client_async(request, tcp).await {
                Ok((ws, _)) => silent.push((ws, Instant::now())),
                Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
                    busy += 1;
                }
                Err(err) => panic!("{err}"),
            }
        }
        assert_eq!((silent.len(), busy), (20, 10), "the pre-auth cap holds");
        // And TCP connections that send nothing at all.
        let mut mute = Vec::new();
        for _ in 0..10 {
            mute.push((connect_from("127.0.0.3", env.gateway_addr).await.unwrap(), Instant::now()));
        }
        // An honest agent meanwhile: refused while the cap is full, it gets in once the silent
        // ones are cut.
        let started = Instant::now();
        env.agent = Some(spawn_agent(env.agent_config()));
        env.wait_for_sessions(1).await;
        let joined = started.elapsed();
        println!("honest agent in after {joined:?}");
        assert!(joined < timeout * 2 + Duration::from_secs(2), "the honest agent waited {joined:?}");
        for (mut ws, since) in silent {
            use futures_util::StreamExt;
            while let Some(Ok(_)) = ws.next().await {}
            let cut = since.elapsed();
            assert!(
                cut >= timeout - Duration::from_millis(50) && cut < timeout + Duration::from_secs(2),
                "{cut:?}"
            );
        }
        for (mut socket, since) in mute {
            let (_, closed) = read_until_closed(&mut socket, Duration::from_secs(3)).await;
            assert!(closed);
            let cut = since.elapsed();
            assert!(
                cut >= timeout - Duration::from_millis(50) && cut < timeout + Duration::from_secs(2),
                "{cut:?}"
            );
        }
        Vitals::settle_back_to(baseline).await;
        assert_eq!(get(&env.url("/bytes/5")).await.0.status(), StatusCode::OK);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t23_request_smuggling_corpus() {
    let _serial = serial();
    bounded(async {
        let env = TestEnv::start().await;
        let witness = Witness::start(&env).await;
        let id = env.tunnel_id.clone();
        let offline = "agent_22222222-3333-4444-5555-666666666666_gone";
        // What would reach the upstream only if the gateway relayed bytes it did not frame
        // itself: `/smuggled` is no tunnel's path.
        let smuggled = "GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
        let post = |headers: &str, body: &str| format!("POST /t/{id}/echo HTTP/1.1\r\nHost: a\r\n{headers}\r\n{body}");
        let cases = [
            ("CL then TE", post("Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", &format!("0\r\n\r\n{smuggled}"))),
            ("TE then CL", post("Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", &format!("0\r\n\r\n{smuggled}"))),
            ("TE chunked, chunked", post("Transfer-Encoding: chunked, chunked\r\n", &format!("0\r\n\r\n{smuggled}"))),
            ("TE chunked, gzip", post("Transfer-Encoding: chunked, gzip\r\n", &format!("0\r\n\r\n{smuggled}"))),
            ("TE gzip", post("Transfer-Encoding: gzip\r\n", smuggled)),
            ("TE gzip, chunked", post("Transfer-Encoding: gzip, chunked\r\n", &format!("0\r\n\r\n{smuggled}"))),
            ("two CLs", post("Content-Length: 4\r\nContent-Length: 40\r\n", smuggled)),
            ("empty CL", post("Content-Length:\r\n", smuggled)),
            ("CL +5", post("Content-Length: +5\r\n", smuggled)),
            ("huge chunk size", post("Transfer-Encoding: chunked\r\n", &format!("fffffffffffffffff0\r\n{smuggled}"))),
            ("bare LF", format!("POST /t/{id}/echo HTTP/1.1\nHost: a\nContent-Length: 4\n\nabcd{smuggled}")),
            ("obs-fold", post("Content-Length: 4\r\nX-Fold: a\r\n b\r\n", &format!("abcd{smuggled}"))),
            ("GET with a body and no framing", format!("GET /t/{id}/headers HTTP/1.1\r\nHost: a\r\n\r\n{smuggled}")),
            ("HTTP/1.0 with TE", format!("POST /t/{id}/echo HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}")),
            ("POST to an offline tunnel", format!("POST /t/{offline}/x HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{smuggled}", smuggled.len())),
        ];
        for (what, case) in cases {
            let mut socket = TcpStream::connect(env.gateway_addr).await.unwrap();
            let probe = format!("GET /t/{id}/headers?probe HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
            let _ = socket.write_all(format!("{case}{probe}").as_bytes()).await;
            let (answer, closed) = read_until_closed(&mut socket, Duration::from_secs(5)).await;
            let seen = statuses(&answer);
            println!("{what}: {seen:?}");
            assert!(closed, "{what}: the connection neither answered nor closed");
            assert!(!seen.is_empty(), "{what}: no answer at all");
            // A refusal (501 is RFC 9112 §6.1's answer to a transfer coding the gateway does not
            // decode), or a request forwarded with framing of its own; never another 5xx of ours.
            assert!(seen.iter().all(|s| *s < 500 || *s == 501 || *s == 503), "{what}: {seen:?}");
        }
        let targets = env.stats.targets.lock().unwrap().clone();
        assert!(targets.iter().all(|t| !t.contains("smuggled")), "the upstream saw a smuggled request: {targets:?}");
        witness.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t24_routing_consistency() {
    let _serial = serial();
    bounded(async {
        let domain = "tunnel.test";
        let config = GatewayConfig { domain: Some(domain.into()), ..GatewayConfig::default() };
        let env = TestEnv::start_with(config, |_| {}).await;
        let witness = Witness::start(&env).await;
        let label = env.tunnel_id.to_label();
        let exchange = |request: String| {
            let addr = env.gateway_addr;
            async move {
                let mut socket = TcpStream::connect(addr).await.unwrap();
                socket.write_all(request.as_bytes()).await.unwrap();
                let (answer, _) = read_until_closed(&mut socket, Duration::from_secs(5)).await;
                String::from_utf8_lossy(&answer).into_owned()
            }
        };
        // Absolute form with a Host that disagrees: routed by the target's authority, and the
        // upstream is told that authority.
        let answer = exchange(format!(
            "GET http://{label}.{domain}/headers HTTP/1.1\r\nHost: someone-else.{domain}\r\nConnection: close\r\n\r\n"
        ))
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains(&format!("[\"host\",\"{label}.{domain}\"]")), "{answer}");
        // Two Host headers: 400.
        let answer =
            exchange(format!("GET /headers HTTP/1.1\r\nHost: {label}.{domain}\r\nHost: other\r\nConnection: close\r\n\r\n"))
                .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        // Case, a port and a trailing dot are the same host.
        let answer = exchange(format!(
            "GET /bytes/3 HTTP/1.1\r\nHost: {}.{domain}.:8443\r\nConnection: close\r\n\r\n",
            label.to_uppercase()
        ))
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // Path tricks on the tunnel id: 400, never routed.
        for path in [format!("/t/%2F..%2F{}/x", env.tunnel_id), format!("/t/{}%2F..%2Fx/y", env.tunnel_id), "/t/../x".into()] {
            let answer = exchange(format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")).await;
            assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        }
        // Keep-alive: each request on one connection is routed on its own.
        let before = env.gateway.registry.of(&env.tunnel_id)[0].to_json()["requests_total"].as_u64().unwrap();
        let answer = exchange(format!(
            "GET /t/{}/bytes/1 HTTP/1.1\r\nHost: a\r\n\r\nGET /t/{WITNESS}/bytes/2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            env.tunnel_id
        ))
        .await;
        assert_eq!(statuses(answer.as_bytes()), [200, 200], "{answer}");
        let after = env.gateway.registry.of(&env.tunnel_id)[0].to_json()["requests_total"].as_u64().unwrap();
        assert_eq!(after, before + 1, "the first went to the first tunnel, the second elsewhere");
        witness.finish().await;
    })
    .await;
}

/// HTTP/2 frames written by hand, for what no well-behaved client sends.
mod h2raw {
    #![allow(unreachable_pub)]

    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const HEADERS: u8 = 1;
    pub const RST_STREAM: u8 = 3;
    pub const SETTINGS: u8 = 4;
    pub const PING: u8 = 6;
    pub const GOAWAY: u8 = 7;
    pub const CONTINUATION: u8 = 9;
    pub const END_STREAM: u8 = 1;
    pub const END_HEADERS: u8 = 4;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend(stream.to_be_bytes());
        out.extend(payload);
        out
    }

    /// An HPACK block for `GET path` (static-table method and scheme, literal path and
    /// authority, no Huffman).
    pub fn get(path: &str) -> Vec<u8> {
        let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
        block.extend(path.as_bytes());
        block.extend([0x01, 1, b'a']);
        block
    }

    /// Frames from the server, as (kind, stream, payload), read until `done` says so or the
    /// connection ends.
    pub async fn read_frames(
        socket: &mut tokio::net::TcpStream,
        mut done: impl FnMut(u8, u32, &[u8]) -> bool,
    ) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            while buf.len() >= 9 {
                let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
                if buf.len() < 9 + len {
                    break;
                }
                let kind = buf[3];
                let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
                if done(kind, stream, &buf[9..9 + len]) {
                    return true;
                }
                buf.drain(..9 + len);
            }
            match socket.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend(&chunk[..n]),
                _ => return false,
            }
        }
    }
}

async fn h2_connection(gateway: SocketAddr) -> TcpStream {
    let mut socket = TcpStream::connect(gateway).await.unwrap();
    let mut hello = h2raw::PREFACE.to_vec();
    hello.extend(h2raw::frame(h2raw::SETTINGS, 0, 0, &[]));
    socket.write_all(&hello).await.unwrap();
    // The server's settings, then our acknowledgement of them: they are in force from here.
    let got = h2raw::read_frames(&mut socket, |kind, _, _| kind == h2raw::SETTINGS).await;
    assert!(got, "no SETTINGS from the gateway");
    socket.write_all(&h2raw::frame(h2raw::SETTINGS, 1, 0, &[])).await.unwrap();
    socket
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t29_http2_floods() {
    let _serial = serial();
    bounded(async {
        let env = TestEnv::start().await;
        let witness = Witness::start(&env).await;
        let baseline = Vitals::of(&env);
        let hold = format!("/t/{}/hold", env.tunnel_id);
        let session = std::sync::Arc::clone(&env.gateway.registry.of(&env.tunnel_id)[0]);

        // More streams than SETTINGS_MAX_CONCURRENT_STREAMS (256): the excess is refused.
        let mut socket = h2_connection(env.gateway_addr).await;
        let mut opens = Vec::new();
        for i in 0..300u32 {
            opens.extend(h2raw::frame(
                h2raw::HEADERS,
                h2raw::END_STREAM | h2raw::END_HEADERS,
                2 * i + 1,
                &h2raw::get(&hold),
            ));
        }
        socket.write_all(&opens).await.unwrap();
        let mut refused = 0;
        tokio::time::timeout(
            Duration::from_secs(10),
            h2raw::read_frames(&mut socket, |kind, _, payload| {
                if kind == h2raw::RST_STREAM && payload == [0, 0, 0, 7] {
                    refused += 1;
                }
                refused == 44
            }),
        )
        .await
        .expect("the excess streams were not refused");
        env.stats.held.subscribe().wait_for(|n| *n == 256).await.unwrap();
        env.stats.gate.add_permits(256);
        drop(socket);

        // Rapid reset: HEADERS and RST_STREAM, over and over. GOAWAY, and little agent work.
        let before = session.to_json()["requests_total"].as_u64().unwrap();
        let mut socket = h2_connection(env.gateway_addr).await;
        let mut flood = Vec::new();
        for i in 0..5000u32 {
            flood.extend(h2raw::frame(
                h2raw::HEADERS,
                h2raw::END_STREAM | h2raw::END_HEADERS,
                2 * i + 1,
                &h2raw::get(&hold),
            ));
            flood.extend(h2raw::frame(h2raw::RST_STREAM, 0, 2 * i + 1, &8u32.to_be_bytes()));
        }
        let _ = socket.write_all(&flood).await;
        let mut go_away = None;
        tokio::time::timeout(
            Duration::from_secs(10),
            h2raw::read_frames(&mut socket, |kind, _, payload| {
                if kind == h2raw::GOAWAY {
                    go_away = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
                }
                go_away.is_some()
            }),
        )
        .await
        .unwrap();
        assert_eq!(go_away, Some(0xb), "ENHANCE_YOUR_CALM for a rapid-reset flood");
        let forwarded = session.to_json()["requests_total"].as_u64().unwrap() - before;
        println!("rapid reset: 5000 streams reset, {forwarded} reached the agent");
        assert!(forwarded < 1000, "{forwarded} of the reset streams reached the agent");

        // CONTINUATION without END_HEADERS, beyond the header list limit: the connection ends.
        let mut socket = h2_connection(env.gateway_addr).await;
        let mut flood = h2raw::frame(h2raw::HEADERS, h2raw::END_STREAM, 1, &h2raw::get(&hold));
        // A literal field of 8,000 bytes per frame (HPACK length 127 + 7873).
        let literal: Vec<u8> = [&[0x00, 0x05][..], b"x-big", &[0x7f, 0xc1, 0x3d], &[b'v'; 8000]].concat();
        for _ in 0..100 {
            flood.extend(h2raw::frame(h2raw::CONTINUATION, 0, 1, &literal));
        }
        let _ = socket.write_all(&flood).await;
        let ended = tokio::time::timeout(
            Duration::from_secs(5),
            h2raw::read_frames(&mut socket, |kind, _, _| kind == h2raw::GOAWAY || kind == h2raw::RST_STREAM),
        )
        .await;
        assert!(ended.is_ok(), "an endless header block was not cut");

        // PING flood from a client that reads nothing: the connection is cut, memory bounded.
        let mut socket = h2_connection(env.gateway_addr).await;
        let ping = h2raw::frame(h2raw::PING, 0, 0, &[7u8; 8]);
        let mut sent = 0;
        let flooding = async {
            while socket.write_all(&ping.repeat(1000)).await.is_ok() {
                sent += 1000;
                if sent >= 2_000_000 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), flooding).await;
        println!("ping flood: {sent} pings written before the gateway stopped taking them");
        assert!(sent < 2_000_000, "the gateway took every ping of a client that reads no pong");
        drop(socket);
        Vitals::settle_back_to(baseline).await;
        witness.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t26a_admin_api_with_and_without_the_token() {
    let _serial = serial();
    bounded(async {
        let token = "the admin token";
        let config = GatewayConfig {
            admin_token: Some(ferry_codec::Secret::new(token).unwrap()),
            admin_loopback: false,
            ..GatewayConfig::default()
        };
        let env = TestEnv::start_with(config, |_| {}).await;
        let ask = |authorization: Option<String>| {
            let mut request = Request::get(env.gateway_url("/connections"));
            if let Some(value) = authorization {
                request = request.header(header::AUTHORIZATION, value);
            }
            fetch_owned(request.body(empty()).unwrap())
        };
        let (response, _) = ask(None).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.headers()[header::WWW_AUTHENTICATE].to_str().unwrap().starts_with("Bearer"));
        assert_eq!(ask(Some("Bearer wrong".into())).await.0.status(), StatusCode::UNAUTHORIZED);
        let (response, body) = ask(Some(format!("Bearer {token}"))).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(!String::from_utf8_lossy(&body).contains(token), "the listing shows the token");
    })
    .await;
}

async fn fetch_owned(request: Request<Body>) -> (http::Response<()>, bytes::Bytes) {
    fetch(&client(), request).await
}
