//! Fault matrix rows about agents (`../shared/FAULTS.md`): killed, flooding, not reading,
//! sending yamux frames known to crash older versions, claiming another tunnel, confusing ids,
//! twice the same credential, partitioned, silent on the control stream, and answering with
//! malicious responses. Each test is named after its row; a second tunnel must be served
//! throughout, and only the faulty agent's session may suffer.
//!
//! The faults run on a two-worker runtime, as the binaries do: on one thread the witness's
//! requests would queue behind every task the fault keeps busy (its latency would be the test's,
//! not the gateway's), and races between tasks on two threads would never show.
// The serial() guard is held across awaits on purpose: it keeps one fault at a time per binary.
#![allow(clippy::unwrap_used, clippy::await_holding_lock)]

mod common;

use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use common::*;
use ferry_codec::{
    AuthErrorCode, AuthResult, Frame, Head, HttpVersion, InstanceId, ResponseHead, Secret, TunnelId,
};
use ferry_gateway::GatewayConfig;
use ferry_gateway::auth::AuthSource;
use futures_util::io::{AsyncReadExt as _, AsyncWriteExt as _};
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use uuid::Uuid;

const EVIL: &str = "agent_11111111-2222-3333-4444-555555555555_evil";

fn evil() -> TunnelId {
    EVIL.parse().unwrap()
}

fn evil_url(env: &TestEnv, path: &str) -> String {
    format!("http://{}/t/{EVIL}{path}", env.gateway_addr)
}

/// Reads a whole response body; `Err` when it was cut.
async fn read_body(response: http::Response<hyper::body::Incoming>) -> (usize, Result<(), String>) {
    let mut body = response.into_body();
    let mut received = 0;
    loop {
        match body.frame().await {
            Some(Ok(frame)) => received += frame.into_data().map_or(0, |d| d.len()),
            Some(Err(err)) => return (received, Err(err.to_string())),
            None => return (received, Ok(())),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t01_agent_killed_mid_stream() {
    let _serial = serial();
    bounded(async {
        let pending = Duration::from_millis(300);
        let config = GatewayConfig { pending_timeout: pending, ..GatewayConfig::default() };
        let mut env = TestEnv::start_with(config, |_| {}).await;
        let witness = Witness::start(&env).await;
        // 10 MiB, 64 KiB every 10 ms.
        let url = env.url("/drip?n=10485760&chunk=65536&interval_ms=10");
        let response = send(&client(), Request::get(url).body(empty()).unwrap()).await;
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let mut received = 0;
        while received < 1 << 20 {
            received += body.frame().await.unwrap().unwrap().into_data().unwrap().len();
        }
        env.agent.take().unwrap().kill();
        let killed = Instant::now();
        // The client sees the cut, never a clean end.
        let outcome = loop {
            match body.frame().await {
                Some(Ok(frame)) => received += frame.into_data().map_or(0, |d| d.len()),
                Some(Err(_)) => break Err(()),
                None => break Ok(()),
            }
        };
        assert!(outcome.is_err(), "a download cut at {received} bytes ended cleanly");
        // The session is gone from the registry (and so from /connections) at once.
        tokio::time::timeout(Duration::from_millis(500), env.wait_for_sessions(0)).await.unwrap();
        println!("session gone {:?} after the kill", killed.elapsed());
        let (_, listing) = get(&env.gateway_url(&format!("/connections/{}", env.tunnel_id))).await;
        assert_eq!(json(&listing)["sessions"].as_array().unwrap().len(), 0);
        // New requests wait for the agent to come back (ferry holds them, up to
        // --pending-timeout), then get 503 tunnel_offline with Retry-After.
        let started = Instant::now();
        let (response, body) = get(&env.url("/")).await;
        let waited = started.elapsed();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json(&body)["error"]["code"], "tunnel_offline");
        assert!(response.headers().contains_key("retry-after"));
        assert!(waited >= pending && waited < pending + Duration::from_secs(1), "answered after {waited:?}");
        // Restarted, the agent serves again on exactly one session.
        env.agent = Some(spawn_agent(env.agent_config()));
        env.wait_for_sessions(1).await;
        let (response, _) = get(&env.url("/bytes/10")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(env.gateway.registry.of(&env.tunnel_id).len(), 1);
        witness.finish().await;
    })
    .await;
}

/// Reads frames off an inbound stream until the request head and the end of its body.
async fn read_request(stream: &mut ferry_transport::multiplex::Stream) -> ferry_codec::RequestHead {
    let mut buf = BytesMut::new();
    let mut head = None;
    loop {
        while let Some(frame) = Frame::decode(&mut buf).unwrap() {
            match frame {
                Frame::Head(Head::Request(request)) => head = Some(request),
                Frame::End => return head.unwrap(),
                _ => {}
            }
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the stream ended inside a request");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn encode(frames: &[Frame]) -> BytesMut {
    let mut out = BytesMut::new();
    for frame in frames {
        frame.encode(&mut out).unwrap();
    }
    out
}

fn response_head(status: u16, headers: &[(&str, &str)]) -> Frame {
    let headers = headers
        .iter()
        .map(|(n, v)| ferry_codec::Header::new(n.to_string(), v.to_string()).unwrap())
        .collect();
    Frame::Head(Head::Response(ResponseHead { status, version: HttpVersion::Http11, headers }))
}

fn varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn field(number: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(u64::from(number << 3 | 2), out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// A response `Head` frame written by hand, so it can carry what the codec would never encode
/// (control bytes in a value, more fields than allowed).
fn raw_response_head(status: u32, headers: &[(&[u8], &[u8])]) -> BytesMut {
    let mut response = Vec::new();
    varint(8, &mut response); // status
    varint(u64::from(status), &mut response);
    varint(16, &mut response); // version: HTTP/1.1
    varint(2, &mut response);
    for (name, value) in headers {
        let mut header = Vec::new();
        field(1, name, &mut header);
        field(2, value, &mut header);
        field(3, &header, &mut response);
    }
    let mut head = Vec::new();
    field(2, &response, &mut head);
    let mut frame = BytesMut::new();
    frame.put_u32(head.len() as u32);
    frame.put_u8(1);
    frame.extend_from_slice(&head);
    frame
}

/// What the evil agent answers to each path.
fn evil_answer(path: &str) -> BytesMut {
    match path {
        // Header injection: a value with CR LF.
        "/inject" => raw_response_head(200, &[(b"x-a", b"1\r\nSet-Cookie: stolen=1")]),
        // More header fields than the codec takes.
        "/many" => {
            let fields: Vec<(Vec<u8>, Vec<u8>)> =
                (0..10_000).map(|i| (format!("x-{i}").into_bytes(), b"v".to_vec())).collect();
            let refs: Vec<(&[u8], &[u8])> = fields.iter().map(|(n, v)| (&n[..], &v[..])).collect();
            raw_response_head(200, &refs)
        }
        // A head frame that claims more than the head limit.
        "/huge" => {
            let mut frame = BytesMut::new();
            frame.put_u32(1 << 20);
            frame.put_u8(1);
            frame.extend_from_slice(&[0u8; 1024]);
            frame
        }
        // Content-Length that the body frames do not match.
        "/short" => encode(&[
            response_head(200, &[("content-length", "100")]),
            Frame::Data(bytes::Bytes::from_static(b"0123456789")),
            Frame::End,
        ]),
        "/long" => encode(&[
            response_head(200, &[("content-length", "5")]),
            Frame::Data(bytes::Bytes::from(vec![b'x'; 100])),
            Frame::End,
        ]),
        // Both framings at once.
        "/te" => encode(&[
            response_head(200, &[("transfer-encoding", "chunked"), ("content-length", "4")]),
            Frame::Data(bytes::Bytes::from_static(b"body")),
            Frame::End,
        ]),
        // Interim responses where the final one belongs.
        "/1xx" => encode(&[response_head(100, &[]), response_head(103, &[]), response_head(100, &[])]),
        // A body after a 204.
        "/204" => encode(&[
            response_head(204, &[]),
            Frame::Data(bytes::Bytes::from_static(b"HTTP/1.1 200 OK\r\n\r\nsmuggled")),
            Frame::End,
        ]),
        _ => encode(&[response_head(200, &[("content-length", "2")]), Frame::Data("ok".into()), Frame::End]),
    }
}

/// Starts an evil agent that answers every request with [`evil_answer`].
async fn answering_evil_agent(env: &TestEnv) -> EvilAgent {
    let mut agent = EvilAgent::connect(env.gateway_addr, &evil()).await;
    let mut inbound = std::mem::replace(&mut agent.inbound, tokio::sync::mpsc::channel(1).1);
    tokio::spawn(async move {
        while let Some(mut stream) = inbound.recv().await {
            tokio::spawn(async move {
                let request = read_request(&mut stream).await;
                let path = String::from_utf8_lossy(&request.target).into_owned();
                let _ = stream.write_all(&evil_answer(&path)).await;
                let _ = stream.close().await;
            });
        }
    });
    env.gateway.registry.wait_until(|r| !r.of(&evil()).is_empty()).await;
    agent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t08c_huge_response_headers_from_the_agent() {
    let _serial = serial();
    bounded(async {
        // An honest agent whose upstream sends 1 MiB of headers.
        let big_headers = {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((mut socket, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = [0u8; 4096];
                        let _ = socket.read(&mut buf).await;
                        let mut answer = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
                        answer.extend(vec![b'x'; 1 << 20]);
                        answer.extend(b"\r\ncontent-length: 0\r\n\r\n");
                        let _ = socket.write_all(&answer).await;
                    });
                }
            });
            addr
        };
        let env = TestEnv::start_with(GatewayConfig::default(), |c| {
            c.upstream = Some(ferry_agent::config::Upstream::parse(&big_headers.to_string()).unwrap());
        })
        .await;
        let witness = Witness::start(&env).await;
        let (response, body) = get(&env.url("/")).await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(json(&body)["error"]["code"], "upstream_unreachable");

        // An evil agent: 10,000 header fields, a head frame over the limit.
        let _evil = answering_evil_agent(&env).await;
        for path in ["/many", "/huge"] {
            let (response, body) = get(&evil_url(&env, path)).await;
            assert_eq!(response.status(), StatusCode::BAD_GATEWAY, "{path}");
            assert_eq!(json(&body)["error"]["code"], "agent_error", "{path}");
        }
        // Its session survives its broken answers (they cost only their own streams).
        let (response, body) = get(&evil_url(&env, "/fine")).await;
        assert_eq!((response.status(), &body[..]), (StatusCode::OK, &b"ok"[..]));
        witness.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t11a_stream_flood_from_a_malicious_agent() {
    let _serial = serial();
    bounded(async {
        let env = TestEnv::start().await;
        let witness = Witness::start(&env).await;
        let baseline = Vitals::of(&env);
        // Agents that open streams toward the gateway: each session dies at its first.
        for round in 0..ferry_gateway::auth::MAX_FAILURES {
            let agent = EvilAgent::connect(env.gateway_addr, &evil()).await;
            for _ in 0..1000 {
                let Ok((mut stream, slot)) = agent.opener.open().await else { break };
                std::mem::forget(slot);
                if stream.write_all(b"x").await.is_err() {
                    break;
                }
                std::mem::forget(stream);
            }
            let ended = tokio::time::timeout(Duration::from_secs(5), agent.driver).await;
            assert!(ended.is_ok(), "round {round}: the flooding session stayed up");
            // The session's end reaches the registry a moment after the socket closes (another
            // worker may be removing it): waited for, bounded.
            let gone = env.gateway.registry.wait_until(|r| r.of(&evil()).is_empty());
            assert!(
                tokio::time::timeout(Duration::from_secs(5), gone).await.is_ok(),
                "round {round}: the flooding session stayed registered"
            );
        }
        // The address that sent them is now refused before the upgrade.
        let mut request = format!("ws://{}/ws", env.gateway_addr);
        request.push_str("");
        let tcp = tokio::net::TcpStream::connect(env.gateway_addr).await.unwrap();
        let refused = tokio_tungstenite::client_async(request, tcp).await.unwrap_err();
        assert!(refused.to_string().contains("429"), "{refused}");
        Vitals::settle_back_to(baseline).await;
        witness.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t11b_agent_that_never_reads() {
    let _serial = serial();
    bounded(async {
        let heartbeat = Duration::from_millis(200);
        let config = GatewayConfig {
            heartbeat_interval: heartbeat,
            pending_timeout: Duration::from_millis(300),
            ..GatewayConfig::default()
        };
        let env = TestEnv::start_with(config, |_| {}).await;
        let witness = Witness::start(&env).await;
        let baseline = Vitals::of(&env);
        let mut agent = EvilAgent::connect(env.gateway_addr, &evil()).await;
        env.gateway.registry.wait_until(|r| !r.of(&evil()).is_empty()).await;
        agent.stop_reading();
        let started = Instant::now();
        // Public requests with bodies for it: the gateway has plenty to write to a peer that
        // reads nothing. They fail (502, 503 or 504), they do not hang.
        let upload = bytes::Bytes::from(vec![5u8; 1 << 20]);
        let requests: Vec<_> = (0..20)
            .map(|_| {
                let url = evil_url(&env, "/upload");
                let upload = upload.clone();
                tokio::spawn(async move {
                    let request = Request::post(url).body(full(upload)).unwrap();
                    client().request(request).await.map(|r| r.status())
                })
            })
            .collect();
        env.gateway.registry.wait_until(|r| r.of(&evil()).is_empty()).await;
        let closed = started.elapsed();
        println!("session of an agent that never reads closed after {closed:?} (heartbeat {heartbeat:?})");
        assert!(closed < heartbeat * 3 + Duration::from_secs(2), "closed after {closed:?}");
        let answered = Instant::now();
        for request in requests {
            let status = tokio::time::timeout(Duration::from_secs(15), request).await.unwrap().unwrap();
            if let Ok(status) = status {
                assert!([502, 503, 504].contains(&status.as_u16()), "{status}");
            }
        }
        println!("requests for it answered within {:?} of its session's end", answered.elapsed());
        agent.driver.abort();
        Vitals::settle_back_to(baseline).await;
        witness.finish().await;
    })
    .await;
}

/// A yamux frame header.
fn yamux_header(kind: u8, flags: u16, stream: u32, length: u32) -> Vec<u8> {
    let mut header = vec![0, kind];
    header.extend(flags.to_be_bytes());
    header.extend(stream.to_be_bytes());
    header.extend(length.to_be_bytes());
    header
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t11c_known_yamux_crash_frames() {
    let _serial = serial();
    bounded(async {
        // yamux answers a broken frame with a GoAway and waits for the peer to leave; a session
        // that never got its control stream is closed at the handshake deadline.
        let config = GatewayConfig { handshake_timeout: Duration::from_millis(500), ..GatewayConfig::default() };
        let env = TestEnv::start_with(config, |_| {}).await;
        let witness = Witness::start(&env).await;
        let panics = panics_outside_tests();
        const SYN: u16 = 1;
        // GHSA-vxx9-2994-q338: a first data frame of 262,145 bytes (over the initial window).
        let (mut ws, ..) = raw_handshake(env.gateway_addr, &evil(), InstanceId(Uuid::new_v4()), None, None).await;
        let mut frame = yamux_header(0, SYN, 1, 262_145);
        frame.extend(vec![0u8; 262_145]);
        ws.send(Message::binary(frame)).await.unwrap();
        let mut go_away = false;
        let closed = tokio::time::timeout(Duration::from_secs(3), async {
            while let Some(Ok(message)) = ws.next().await {
                // A yamux GoAway (type 3) with the protocol-error code (1).
                go_away |= matches!(&message, Message::Binary(b) if b.len() >= 12 && b[1] == 3 && b[8..12] == [0, 0, 0, 1]);
            }
        })
        .await;
        assert!(go_away, "no protocol-error GoAway for an oversized first frame");
        assert!(closed.is_ok(), "the session that sent an oversized first frame stayed up");

        // GHSA-4w32-2493-32g7: a window update of 0xFFFF0000 on an open stream.
        let (mut ws, ..) = raw_handshake(env.gateway_addr, &evil(), InstanceId(Uuid::new_v4()), None, None).await;
        let mut ping = BytesMut::new();
        ferry_codec::ControlMessage::Ping { nonce: 1 }.encode(&mut ping).unwrap();
        let mut open = yamux_header(0, SYN, 1, ping.len() as u32);
        open.extend_from_slice(&ping);
        ws.send(Message::binary(open)).await.unwrap();
        env.gateway.registry.wait_until(|r| !r.of(&evil()).is_empty()).await;
        for _ in 0..2 {
            ws.send(Message::binary(yamux_header(1, 0, 1, 0xFFFF_0000))).await.unwrap();
        }
        // Whatever yamux makes of it (a protocol error ends that session), nothing panics and
        // everything else goes on.
        let _ = tokio::time::timeout(Duration::from_secs(2), async { while let Some(Ok(_)) = ws.next().await {} }).await;
        assert_eq!(panics_outside_tests(), panics, "the gateway panicked");
        let (response, _) = get(&env.url("/bytes/100")).await;
        assert_eq!(response.status(), StatusCode::OK);
        witness.finish().await;
    })
    .await;
}

fn auth_file(contents: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("ferry-auth-{}.toml", Uuid::new_v4()));
    std::fs::write(&path, contents).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t12a_agent_claims_another_tunnel() {
    let _serial = serial();
    bounded(async {
        let path = auth_file(&format!(
            "[tunnels.{TUNNEL}]\nsecrets = [\"secret of a\"]\n[tunnels.{EVIL}]\nsecrets = [\"secret of b\"]\n\
             [tunnels.{WITNESS}]\nsecrets = [\"secret of a\"]\n"
        ));
        let config = GatewayConfig { auth: AuthSource::File(path.clone()), ..GatewayConfig::default() };
        let mut env =
            TestEnv::start_with(config, |c| c.secret = Some(Secret::new("secret of a").unwrap())).await;
        let a_session = env.gateway.registry.of(&env.tunnel_id)[0].identity.id;
        let b = Secret::new("secret of b").unwrap();
        // Holding B's secret, claiming A, while A is online.
        let (mut ws, _, _, result) =
            raw_handshake(env.gateway_addr, &env.tunnel_id, InstanceId(Uuid::new_v4()), Some(&b), None).await;
        assert!(matches!(result, AuthResult::Rejected(r) if r.code == AuthErrorCode::BadCredentials));
        let close = loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => break frame.unwrap(),
                Some(Ok(_)) => {}
                other => panic!("no close frame: {other:?}"),
            }
        };
        assert_eq!(close.code, CloseCode::Policy);
        // A is untouched and still reached.
        assert_eq!(
            env.gateway.registry.of(&env.tunnel_id).iter().map(|s| s.identity.id).collect::<Vec<_>>(),
            [a_session]
        );
        assert_eq!(get(&env.url("/bytes/3")).await.0.status(), StatusCode::OK);
        // And while A is offline: no session is made for the claimant.
        env.agent.take().unwrap().stop().await.unwrap();
        env.wait_for_sessions(0).await;
        let (_ws, _, _, result) =
            raw_handshake(env.gateway_addr, &env.tunnel_id, InstanceId(Uuid::new_v4()), Some(&b), None).await;
        assert!(matches!(result, AuthResult::Rejected(r) if r.code == AuthErrorCode::BadCredentials));
        assert!(env.gateway.registry.of(&env.tunnel_id).is_empty());
        // After enough failures from this address, /ws refuses before upgrading.
        for _ in 2..ferry_gateway::auth::MAX_FAILURES {
            let _ =
                raw_handshake(env.gateway_addr, &env.tunnel_id, InstanceId(Uuid::new_v4()), Some(&b), None)
                    .await;
        }
        let tcp = tokio::net::TcpStream::connect(env.gateway_addr).await.unwrap();
        let refused = tokio_tungstenite::client_async(format!("ws://{}/ws", env.gateway_addr), tcp).await;
        assert!(refused.unwrap_err().to_string().contains("429"));
        let failures = env.gateway.metrics.render(&env.gateway.registry);
        assert!(
            failures.contains("ferry_handshake_failures_total{code=\"bad_credentials\"} 10"),
            "{failures}"
        );
        std::fs::remove_file(path).unwrap();
    })
    .await;
}

/// `ClientAuth` bytes for `instance` with `id` in place of the tunnel id (no MAC): the id is
/// swapped in the encoded message, so it can be what `TunnelId` would never hold.
fn client_auth_with_id(id: &str) -> bytes::Bytes {
    let placeholder: TunnelId = "agent_00000000-0000-0000-0000-000000000000_x".parse().unwrap();
    let auth = ferry_codec::ClientAuth {
        version: ferry_codec::PROTOCOL_VERSION,
        tunnel_id: placeholder.clone(),
        instance_id: InstanceId(Uuid::new_v4()),
        agent_version: "raw".into(),
        mac: None,
        tcp: Vec::new(),
        allow_ip: Vec::new(),
        deny_ip: Vec::new(),
        basic_auth: Vec::new(),
    };
    let encoded = auth.encode().to_vec();
    let old = placeholder.as_str().as_bytes();
    let at = encoded.windows(old.len()).position(|w| w == old).unwrap();
    assert_eq!(usize::from(encoded[at - 1]), old.len(), "a one-byte length before the id");
    let mut out = encoded[..at - 1].to_vec();
    out.push(u8::try_from(id.len()).unwrap());
    out.extend(id.as_bytes());
    out.extend(&encoded[at + old.len()..]);
    out.into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t12c_id_confusion() {
    let _serial = serial();
    bounded(async {
        let env = TestEnv::start().await;
        let a = env.tunnel_id.as_str().to_owned();
        let variants = [
            a.replacen("agent_", "AGENT_", 1),
            format!("{a}."),
            a.replace("_web", "_w%2Fb"),
            a.replace("_web", "_w..b"),
            a.replace("_web", "_w\u{0435}b"), // Cyrillic е
            format!("{a}-more-than-sixty-three"),
            a.replace("_web", "_web/../x"),
        ];
        for variant in &variants {
            let mut ws = raw_ws(env.gateway_addr).await;
            let _hello = ferry_transport::ws::recv_message(&mut ws).await.unwrap();
            ferry_transport::ws::send_message(&mut ws, client_auth_with_id(variant)).await.unwrap();
            let result =
                AuthResult::decode(ferry_transport::ws::recv_message(&mut ws).await.unwrap()).unwrap();
            assert!(
                matches!(&result, AuthResult::Rejected(r) if r.code == AuthErrorCode::InvalidTunnelId),
                "{variant:?}: {result:?}"
            );
        }
        assert_eq!(env.gateway.registry.all().len(), 1, "nothing but A's own session");
        // Public side: the same variants in the path are refused, never routed to A.
        for variant in variants.iter().filter(|v| !v.contains('/')) {
            let (response, body) = get(&env.gateway_url(&format!("/t/{variant}/headers"))).await;
            assert_eq!(
                response.status(),
                StatusCode::BAD_REQUEST,
                "{variant}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        let (response, _) = get(&env.gateway_url(&format!("/t/{}%2F..%2Fx/headers", env.tunnel_id))).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        // The one spelling that is canonically A: an upper-case UUID.
        let upper = a.replace("0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4", "0B6F4C1E-8A51-4C3E-9D2A-51F0E6A7B9C4");
        let (response, _) = get(&env.gateway_url(&format!("/t/{upper}/bytes/2"))).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(env.stats.requests.load(std::sync::atomic::Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t12d_same_credential_twice() {
    let _serial = serial();
    bounded(async {
        // In ferry two agents with one tunnel's credential are replicas: both serve, neither is
        // thrown out (the same agent process reconnecting does replace its stale session; see
        // lifecycle.rs, the_same_agent_instance_replaces_its_stale_session).
        let env = TestEnv::start_with(
            GatewayConfig {
                auth: AuthSource::Shared(Secret::new("shared").unwrap()),
                ..GatewayConfig::default()
            },
            |c| c.secret = Some(Secret::new("shared").unwrap()),
        )
        .await;
        let first = env.gateway.registry.all()[0].identity.id;
        let mut config = env.agent_config();
        config.secret = Some(Secret::new("shared").unwrap());
        let second = spawn_agent(config);
        env.wait_for_sessions(2).await;
        assert!(env.gateway.registry.of(&env.tunnel_id).iter().any(|s| s.identity.id == first));
        // Requests in flight at once spread over both (the least loaded takes the next).
        let held: Vec<_> = (0..10)
            .map(|_| {
                let url = env.url("/hold");
                tokio::spawn(async move { get(&url).await })
            })
            .collect();
        env.stats.held.subscribe().wait_for(|n| *n == 10).await.unwrap();
        env.stats.gate.add_permits(10);
        for request in held {
            assert_eq!(request.await.unwrap().0.status(), StatusCode::OK);
        }
        let served: Vec<u64> = env
            .gateway
            .registry
            .of(&env.tunnel_id)
            .iter()
            .map(|s| s.to_json()["requests_total"].as_u64().unwrap())
            .collect();
        assert_eq!(served, [5, 5], "both serve");
        // No fight: a while later both are still the same two sessions.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(env.gateway.registry.of(&env.tunnel_id).len(), 2);
        assert!(env.gateway.registry.of(&env.tunnel_id).iter().any(|s| s.identity.id == first));
        second.kill();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t15_partition_without_fin() {
    let _serial = serial();
    bounded(async {
        let interval = Duration::from_millis(150);
        let config = GatewayConfig {
            heartbeat_interval: interval,
            pending_timeout: Duration::from_millis(300),
            ..GatewayConfig::default()
        };
        let mut env = TestEnv::start_without_agent(config).await;
        let proxy = PartitionProxy::start(env.gateway_addr).await;
        let mut agent_config = env.agent_config();
        agent_config.gateway =
            ferry_agent::config::GatewayUrl::parse(&format!("ws://{}/ws", proxy.addr)).unwrap();
        // Attempts during the partition hang like the session did; they give up soon.
        agent_config.connect_timeout = Duration::from_millis(500);
        env.agent = Some(spawn_agent(agent_config));
        env.wait_for_sessions(1).await;
        let witness = Witness::start(&env).await;
        let first = env
            .gateway
            .registry
            .all()
            .iter()
            .find(|s| s.identity.tunnel_id == env.tunnel_id)
            .unwrap()
            .identity
            .id;
        // A request in flight when the path goes silent.
        let url = env.url("/hold");
        let in_flight =
            tokio::spawn(async move { client().request(Request::get(url).body(empty()).unwrap()).await });
        env.stats.held.subscribe().wait_for(|n| *n == 1).await.unwrap();
        let cut = Instant::now();
        proxy.partition();
        env.wait_for_sessions(0).await;
        let detected = cut.elapsed();
        println!("partition detected after {detected:?} (heartbeat {interval:?} x 3)");
        // Three silent intervals counted from the agent's last word, which came up to one
        // interval before the cut.
        assert!(
            detected >= interval * 2 && detected < interval * 3 + Duration::from_millis(1500),
            "{detected:?}"
        );
        // In flight: 502 session_lost (no head had come back). New ones: they wait, then 503.
        let response = in_flight.await.unwrap().unwrap();
        let (status, body) = (response.status(), response.into_body().collect().await.unwrap().to_bytes());
        assert_eq!(
            (status, json(&body)["error"]["code"].as_str().unwrap()),
            (StatusCode::BAD_GATEWAY, "session_lost")
        );
        let (response, body) = get(&env.url("/bytes/1")).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json(&body)["error"]["code"], "tunnel_offline");
        // Healed: the agent (which gave up on the silent session too) comes back, once.
        proxy.heal();
        env.gateway
            .registry
            .wait_until(|r| r.of(&env.tunnel_id).iter().any(|s| s.identity.id != first))
            .await;
        tokio::time::sleep(interval * 4).await;
        assert_eq!(env.gateway.registry.of(&env.tunnel_id).len(), 1, "exactly one session after the heal");
        env.stats.gate.add_permits(1);
        assert_eq!(get(&env.url("/bytes/1")).await.0.status(), StatusCode::OK);
        witness.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t18_silent_agent_on_the_control_stream() {
    let _serial = serial();
    bounded(async {
        let interval = Duration::from_millis(150);
        let config = GatewayConfig { heartbeat_interval: interval, ..GatewayConfig::default() };
        let env = TestEnv::start_with(config, |_| {}).await;
        let witness = Witness::start(&env).await;
        // Its yamux session runs (and tungstenite answers WebSocket pings), but it never reads
        // the control stream nor answers a heartbeat there.
        let started = Instant::now();
        let agent = EvilAgent::connect(env.gateway_addr, &evil()).await;
        env.gateway.registry.wait_until(|r| !r.of(&evil()).is_empty()).await;
        env.gateway.registry.wait_until(|r| r.of(&evil()).is_empty()).await;
        let dead = started.elapsed();
        println!("silent agent declared dead after {dead:?} (heartbeat {interval:?} x 3)");
        assert!(dead >= interval * 3 && dead < interval * 3 + Duration::from_millis(1500), "{dead:?}");
        let ended = tokio::time::timeout(Duration::from_secs(3), agent.driver).await;
        assert!(ended.is_ok(), "the gateway kept the silent agent's connection");
        witness.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t30_malicious_response_from_an_agent() {
    let _serial = serial();
    bounded(async {
        let env = TestEnv::start().await;
        let witness = Witness::start(&env).await;
        let _evil = answering_evil_agent(&env).await;
        // Rejected before anything is sent: 502.
        for path in ["/inject", "/1xx"] {
            let (response, body) = get(&evil_url(&env, path)).await;
            assert_eq!(response.status(), StatusCode::BAD_GATEWAY, "{path}");
            assert_eq!(json(&body)["error"]["code"], "agent_error", "{path}");
            assert!(!response.headers().contains_key("set-cookie"), "{path}");
        }
        // A body shorter than its Content-Length: the client sees the cut.
        // (The connection may even close before the head got out: an error either way.)
        if let Ok(response) =
            client().request(Request::get(evil_url(&env, "/short")).body(empty()).unwrap()).await
        {
            let (received, outcome) = read_body(response).await;
            assert!(outcome.is_err() && received <= 10, "{received} bytes, {outcome:?}");
        }
        // Longer than it: never more than announced reaches the client.
        match client().request(Request::get(evil_url(&env, "/long")).body(empty()).unwrap()).await {
            Ok(response) => assert!(read_body(response).await.0 <= 5),
            Err(err) => println!("long body: connection closed ({err})"),
        }
        // Transfer-Encoding and Content-Length: ours is the framing, by Content-Length.
        let (response, body) = get(&evil_url(&env, "/te")).await;
        assert!(!response.headers().contains_key("transfer-encoding"));
        assert_eq!(&body[..], b"body");
        // A body after a 204 is not sent (and cannot pose as a next response).
        let client = client();
        let (response, body) =
            fetch(&client, Request::get(evil_url(&env, "/204")).body(empty()).unwrap()).await;
        assert_eq!((response.status(), body.len()), (StatusCode::NO_CONTENT, 0));
        let (response, body) =
            fetch(&client, Request::get(evil_url(&env, "/fine")).body(empty()).unwrap()).await;
        assert_eq!((response.status(), &body[..]), (StatusCode::OK, &b"ok"[..]));
        // The evil agent's session goes on: these were its streams' failures only.
        assert_eq!(env.gateway.registry.of(&evil()).len(), 1);
        witness.finish().await;
    })
    .await;
}
