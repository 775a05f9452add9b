//! Fault matrix rows about the upstream (`../shared/FAULTS.md`): down, slow, stalled, resetting,
//! half-closing, upgrading or not, and an upstream that is the gateway itself. Each test is named
//! after its row; each checks that a second tunnel keeps being served meanwhile.
//!
//! The faults run on a two-worker runtime, as the binaries do: on one thread the witness's
//! requests would queue behind every task the fault keeps busy (its latency would be the test's,
//! not the gateway's), and races between tasks on two threads would never show.
// The serial() guard is held across awaits on purpose: it keeps one fault at a time per binary.
#![allow(clippy::unwrap_used, clippy::await_holding_lock)]

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use ferry_agent::config::Upstream;
use ferry_gateway::GatewayConfig;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A raw upstream: `handle` gets each accepted connection after its request head was read, with
/// the head's text.
async fn raw_upstream<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(TcpStream, String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = Arc::new(handle);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let handle = Arc::clone(&handle);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match socket.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                handle(socket, String::from_utf8_lossy(&head).into_owned()).await;
            });
        }
    });
    addr
}

fn upstream(addr: SocketAddr) -> Upstream {
    Upstream::parse(&addr.to_string()).unwrap()
}

/// Waits until the tunnel's session holds no stream and no request.
async fn streams_back_to_zero(env: &TestEnv, after: &str) {
    let session = Arc::clone(&env.gateway.registry.of(&env.tunnel_id)[0]);
    tokio::time::timeout(Duration::from_secs(5), async {
        while session.open_streams() > 0 || session.in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "after {after}: {} streams open, {} requests in flight",
            session.open_streams(),
            session.in_flight()
        )
    });
}

fn session_id(env: &TestEnv) -> ferry_codec::SessionId {
    env.gateway.registry.of(&env.tunnel_id)[0].identity.id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t03_upstream_down() {
    let _serial = serial();
    bounded(async {
        let down = closed_port().await;
        let env = TestEnv::start_with(GatewayConfig::default(), |c| c.upstream = Some(upstream(down))).await;
        let witness = Witness::start(&env).await;
        let session = session_id(&env);
        let mut took = Vec::new();
        for i in 0..10 {
            let started = Instant::now();
            let (response, body) = get(&env.url("/")).await;
            took.push(started.elapsed());
            let code = json(&body)["error"]["code"].as_str().unwrap().to_owned();
            // Five refusals in a row open the agent's circuit breaker (--breaker-failures):
            // from then on the agent answers at once without trying.
            if i < 5 {
                assert_eq!(
                    (response.status(), code.as_str()),
                    (StatusCode::BAD_GATEWAY, "upstream_unreachable")
                );
            } else {
                assert_eq!(
                    (response.status(), code.as_str()),
                    (StatusCode::SERVICE_UNAVAILABLE, "upstream_unhealthy")
                );
                assert!(response.headers().contains_key(header::RETRY_AFTER));
            }
        }
        took.sort();
        println!("upstream down: answers in {:?} (median) to {:?} (slowest)", took[5], took[9]);
        assert!(took[5] < Duration::from_millis(100), "median {:?}", took[5]);
        assert!(took[9] < Duration::from_millis(500), "slowest {:?}", took[9]);
        // No session churn: the same session throughout.
        assert_eq!(session_id(&env), session);
        assert!(env.gateway.metrics.render(&env.gateway.registry).contains("ferry_sessions_started_total 2"));
        witness.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t04a_upstream_slow_head() {
    let _serial = serial();
    bounded(async {
        // The upstream reads the request and then only waits for the connection to close.
        let (cancelled_tx, mut cancelled) = mpsc::unbounded_channel();
        let slow = raw_upstream(move |mut socket, _| {
            let cancelled_tx = cancelled_tx.clone();
            async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = cancelled_tx.send(Instant::now());
            }
        })
        .await;
        let timeout = Duration::from_millis(400);
        let env = TestEnv::start_with(GatewayConfig::default(), |c| {
            c.upstream = Some(upstream(slow));
            c.upstream_timeout = timeout;
        })
        .await;
        let witness = Witness::start(&env).await;
        let started = Instant::now();
        let (response, body) = get(&env.url("/slow-head")).await;
        let took = started.elapsed();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(json(&body)["error"]["code"], "upstream_timeout");
        println!("slow head: 504 after {took:?} (upstream timeout {timeout:?})");
        assert!(took >= timeout && took < timeout + Duration::from_millis(1500), "504 after {took:?}");
        let seen = tokio::time::timeout(Duration::from_secs(2), cancelled.recv()).await.unwrap().unwrap();
        assert!(seen.duration_since(started) >= timeout, "the upstream saw its request cancelled");
        streams_back_to_zero(&env, "step 1").await;
        witness.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t04b_upstream_slow_or_stalled_body() {
    let _serial = serial();
    bounded(async {
        let idle = Duration::from_millis(400);
        let env = TestEnv::start_with(GatewayConfig::default(), |c| c.upstream_idle_timeout = idle).await;
        let witness = Witness::start(&env).await;
        // A slow body that keeps moving is not cut: 8 chunks, 100 ms apart.
        let (response, body) = get(&env.url("/drip?n=8000&chunk=1000&interval_ms=100")).await;
        assert_eq!((response.status(), body.len()), (StatusCode::OK, 8000));
        // A body that stops: the head and 1000 bytes arrive, then nothing.
        let response =
            send(&client(), Request::get(env.url("/stall?after=1000")).body(empty()).unwrap()).await;
        assert_eq!(response.status(), StatusCode::OK);
        let started = Instant::now();
        let mut body = response.into_body();
        let mut received = 0;
        let outcome = loop {
            match body.frame().await {
                Some(Ok(frame)) => received += frame.into_data().map_or(0, |d| d.len()),
                Some(Err(err)) => break Err(err),
                None => break Ok(()),
            }
        };
        let took = started.elapsed();
        println!("stalled body: cut after {took:?} with {received} bytes (idle timeout {idle:?})");
        assert!(outcome.is_err(), "a cut body must not end cleanly");
        assert_eq!(received, 1000);
        assert!(
            took >= idle - Duration::from_millis(50) && took < idle + Duration::from_millis(1500),
            "{took:?}"
        );
        // The upstream saw its response dropped, and no stream is left.
        tokio::time::timeout(Duration::from_secs(2), async {
            while env.stats.cancelled.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the upstream never saw the cancel");
        streams_back_to_zero(&env, "step 2").await;
        witness.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t05_upstream_resetting() {
    let _serial = serial();
    bounded(async {
        let resetting = raw_upstream(|mut socket, head| async move {
            let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
            let write = |bytes: &'static [u8]| bytes;
            match path.as_str() {
                "/a" => {}
                "/b" => {
                    let _ = socket.write_all(write(b"HTTP/1.1 200 OK\r\nContent-Le")).await;
                }
                "/c" => {
                    let mut answer = b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n".to_vec();
                    answer.extend([b'x'; 500]);
                    let _ = socket.write_all(&answer).await;
                }
                "/d" => {
                    let _ = socket.write_all(write(b"\x00\x01\x02 certainly not HTTP\r\n\r\n")).await;
                }
                "/e" => {
                    let _ = socket
                        .write_all(write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789"))
                        .await;
                    let _ = socket.shutdown().await;
                    return;
                }
                _ => {
                    let _ = socket.write_all(write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")).await;
                    return;
                }
            }
            let _ = socket.flush().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            // RST, not FIN.
            let _ = socket.set_zero_linger();
        })
        .await;
        let env = TestEnv::start_with(GatewayConfig::default(), |c| {
            c.upstream = Some(upstream(resetting));
            c.breaker_failures = 100;
        })
        .await;
        let witness = Witness::start(&env).await;
        let session = session_id(&env);
        // (a) reset before any byte, (b) in the head, (d) garbage: 502 before any head.
        for path in ["/a", "/b", "/d"] {
            let (response, body) = get(&env.url(path)).await;
            assert_eq!(response.status(), StatusCode::BAD_GATEWAY, "{path}");
            assert_eq!(json(&body)["error"]["code"], "upstream_unreachable", "{path}");
        }
        // (c) reset mid-body, (e) closed short of its Content-Length: the client sees the cut.
        for (path, sent) in [("/c", 500), ("/e", 10)] {
            // The connection may even go before the head is out: an error either way.
            let Ok(response) = client().request(Request::get(env.url(path)).body(empty()).unwrap()).await
            else {
                continue;
            };
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            let mut body = response.into_body();
            let mut received = 0;
            let outcome = loop {
                match body.frame().await {
                    Some(Ok(frame)) => received += frame.into_data().map_or(0, |d| d.len()),
                    Some(Err(err)) => break Err(err),
                    None => break Ok(()),
                }
            };
            assert!(outcome.is_err(), "{path}: a cut body ended cleanly after {received} bytes");
            assert!(received <= sent, "{path}: {received} bytes");
        }
        // The agent keeps serving on the same session.
        let (response, body) = get(&env.url("/fine")).await;
        assert_eq!((response.status(), &body[..]), (StatusCode::OK, &b"ok"[..]));
        assert_eq!(session_id(&env), session);
        streams_back_to_zero(&env, "step 3").await;
        witness.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t14_half_closed_connections() {
    let _serial = serial();
    bounded(async {
        let half_closing = raw_upstream(|mut socket, head| async move {
            if head.starts_with("POST") {
                // (c) The upstream answers at once and stops reading the upload.
                let _ = socket.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 4\r\nconnection: close\r\n\r\nnope").await;
                // Then closes as servers do (lingering: what still arrives is read and dropped
                // for a while), so the answer is not lost to a reset.
                let _ = socket.shutdown().await;
                let mut sink = vec![0u8; 64 * 1024];
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
                })
                .await;
                return;
            }
            // (b) A whole response, then the upstream half-closes (and keeps its read side).
            let _ = socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nwhole").await;
            let _ = socket.shutdown().await;
            let mut rest = Vec::new();
            let _ = socket.read_to_end(&mut rest).await;
        })
        .await;
        let env = TestEnv::start_with(GatewayConfig::default(), |c| {
            c.routes = vec![ferry_agent::config::Route::new("/raw", &half_closing.to_string()).unwrap()];
        })
        .await;
        let witness = Witness::start(&env).await;

        // (a) The client sends a whole request, then shuts its write side. hyper's default
        // (half_close off) takes the end of input as the client leaving: no answer, and the
        // request is cancelled up to the upstream instead of leaking.
        let mut socket = TcpStream::connect(env.gateway_addr).await.unwrap();
        let request = format!("GET /t/{}/stall?after=10 HTTP/1.1\r\nHost: a\r\n\r\n", env.tunnel_id);
        socket.write_all(request.as_bytes()).await.unwrap();
        socket.shutdown().await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut answer)).await.unwrap();
        println!("half-closed client got: {:?}", String::from_utf8_lossy(&answer[..answer.len().min(40)]));
        streams_back_to_zero(&env, "step 4").await;
        // The upstream either never got the request (cancelled before it left the agent) or
        // saw its response dropped.
        // A request may still reach the upstream after the client left (its bytes were on their
        // way when the agent cancelled it): counted as it arrives, so each check compares the
        // two counts as they are then.
        let reached = || env.stats.targets.lock().unwrap().iter().filter(|t| t.starts_with("/stall")).count() as u64;
        tokio::time::timeout(Duration::from_secs(2), async {
            while env.stats.cancelled.load(Ordering::SeqCst) != reached() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the upstream kept serving a request whose client left: {} reached, {} cancelled",
                reached(),
                env.stats.cancelled.load(Ordering::SeqCst),
            )
        });

        // (b) The upstream's half-close does not cut its complete response.
        let (response, body) = get(&env.url("/raw/b")).await;
        assert_eq!((response.status(), &body[..]), (StatusCode::OK, &b"whole"[..]));

        // (c) An upload the upstream answered early: the client gets that answer.
        let chunks = futures_util::stream::iter((0..160).map(|_| {
            Ok::<_, BoxError>(hyper::body::Frame::data(bytes::Bytes::from(vec![1u8; 64 * 1024])))
        }));
        let body = http_body_util::StreamBody::new(chunks).boxed_unsync();
        let response = client().request(Request::post(env.url("/raw/c")).body(body).unwrap()).await;
        match response {
            Ok(response) => assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE),
            // The client may still be writing when the connection goes: then it is an error,
            // never a made-up success.
            Err(err) => println!("early answer not seen by the client: {err}"),
        }
        streams_back_to_zero(&env, "step 5").await;

        // (d) A WebSocket through the tunnel: the client closes, the echo upstream closes, and
        // both halves of the stream are released.
        let tcp = TcpStream::connect(env.gateway_addr).await.unwrap();
        let url = format!("ws://{}/t/{}/ws", env.gateway_addr, env.tunnel_id);
        let (mut ws, _) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
        ws.send(tokio_tungstenite::tungstenite::Message::text("ping")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap().into_text().unwrap(), "ping");
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
        // The upstream closed, its end of the pipe closed; the client closes its socket too.
        drop(ws);
        streams_back_to_zero(&env, "step 6").await;
        witness.finish().await;
    })
    .await;
}

/// A masked WebSocket text frame from a client.
fn masked_text(text: &str) -> Vec<u8> {
    let mask = [9u8, 8, 7, 6];
    let mut frame = vec![0x81, 0x80 | text.len() as u8];
    frame.extend(mask);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t21_upstream_returns_101_or_not_upgrade_smuggling() {
    let _serial = serial();
    bounded(async {
        let env = TestEnv::start().await;
        let witness = Witness::start(&env).await;
        let upgrade_head = |path: &str| {
            format!(
                "GET /t/{}{path} HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                env.tunnel_id
            )
        };
        // (a) A WebSocket frame sent right behind the head: it crosses once the upstream said
        // 101, and the echo comes back.
        let mut socket = TcpStream::connect(env.gateway_addr).await.unwrap();
        let mut bytes = upgrade_head("/ws").into_bytes();
        bytes.extend(masked_text("early"));
        socket.write_all(&bytes).await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        while !answer.windows(5).any(|w| w == b"early") {
            let n =
                tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
            answer.extend(&buf[..n]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&answer));
        drop(socket);

        // (b) The upstream answers 200 to the upgrade: the bytes behind the head are not a second
        // request, and the connection closes after the answer.
        let mut socket = TcpStream::connect(env.gateway_addr).await.unwrap();
        let mut bytes = upgrade_head("/headers").into_bytes();
        bytes.extend(format!("GET /t/{}/smuggled HTTP/1.1\r\nHost: a\r\n\r\n", env.tunnel_id).as_bytes());
        socket.write_all(&bytes).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut answer)).await.unwrap().unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "a second response: {answer}");
        assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
        let targets = env.stats.targets.lock().unwrap().clone();
        assert!(targets.iter().all(|t| !t.contains("smuggled")), "{targets:?}");
        witness.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t31_loop() {
    let _serial = serial();
    bounded(async {
        let mut env = TestEnv::start_without_agent(GatewayConfig::default()).await;
        let mut config = env.agent_config();
        // The agent's upstream is the gateway's own public address.
        config.upstream = Some(upstream(env.gateway_addr));
        env.agent = Some(spawn_agent(config));
        env.wait_for_sessions(1).await;
        let witness = Witness::start(&env).await;
        let (response, body) = get(&env.url(&format!("/t/{}/t/{}/x", env.tunnel_id, env.tunnel_id))).await;
        assert_eq!(response.status(), StatusCode::LOOP_DETECTED);
        assert_eq!(json(&body)["error"]["code"], "loop_detected");
        // Bounded work: one pass through the tunnel, refused on the way back in.
        let sessions = env.gateway.registry.of(&env.tunnel_id);
        assert_eq!(sessions[0].to_json()["requests_total"], 1);
        witness.finish().await;
    })
    .await;
}
