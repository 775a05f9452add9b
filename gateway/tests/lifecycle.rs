//! Sessions that end and come back: agents killed, restarted, drained; gateways restarted;
//! replicas; partitions caught by the heartbeat; misbehaving agents that only hurt themselves.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ferry_codec::{AuthResult, InstanceId};
use ferry_gateway::GatewayConfig;
use ferry_transport::mux::{SessionConfig, session};
use ferry_transport::{IoCounters, WsIo, multiplex};
use futures_util::SinkExt;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

#[tokio::test]
async fn agent_killed_mid_response_gives_a_broken_response() {
    bounded(async {
        let env = TestEnv::start().await;
        let response =
            send(&client(), Request::get(env.url("/bytes/1073741824")).body(empty()).unwrap()).await;
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        assert!(body.frame().await.unwrap().unwrap().is_data());
        env.agent.as_ref().unwrap().kill();
        let mut received = 0u64;
        let outcome = loop {
            match body.frame().await {
                Some(Ok(frame)) => received += frame.into_data().map_or(0, |d| d.len() as u64),
                Some(Err(err)) => break Err(err),
                None => break Ok(()),
            }
        };
        assert!(outcome.is_err(), "a cut download must not end cleanly ({received} bytes)");
        assert!(received < 1 << 30);
    })
    .await;
}

#[tokio::test]
async fn gateway_restart_brings_the_agent_back() {
    bounded(async {
        let mut env = TestEnv::start().await;
        let started = Instant::now();
        env.restart_gateway().await;
        env.wait_for_sessions(1).await;
        println!("agent back {:?} after the gateway restart began", started.elapsed());
        let (response, _) = get(&env.url("/")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(env.gateway.metrics.render(&env.gateway.registry).contains("ferry_sessions 1"));
    })
    .await;
}

#[tokio::test]
async fn a_request_waiting_through_an_agent_restart_is_served() {
    bounded(async {
        let mut env = TestEnv::start().await;
        env.agent.take().unwrap().stop().await.unwrap();
        env.wait_for_sessions(0).await;
        // No agent now: the request waits for one instead of failing.
        let url = env.url("/bytes/1000");
        let waiting = tokio::spawn(async move { get(&url).await });
        let id = env.tunnel_id.clone();
        env.gateway.registry.wait_until(|r| r.waiting(&id) == 1).await;
        env.agent = Some(spawn_agent(env.agent_config()));
        let (response, body) = waiting.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body.len(), 1000);
        let metrics = env.gateway.metrics.render(&env.gateway.registry);
        assert!(metrics.contains("ferry_pending_requests_total{outcome=\"served\"} 1"), "{metrics}");
        assert!(
            metrics.contains(&format!("ferry_reconnects_total{{tunnel=\"{}\"}} 1", env.tunnel_id)),
            "{metrics}"
        );
    })
    .await;
}

#[tokio::test]
async fn requests_for_an_agent_that_stays_away_get_503_with_retry_after() {
    bounded(async {
        let config =
            GatewayConfig { pending_timeout: Duration::from_millis(300), ..GatewayConfig::default() };
        let mut env = TestEnv::start_with(config, |_| {}).await;
        env.agent.take().unwrap().stop().await.unwrap();
        env.wait_for_sessions(0).await;
        let started = Instant::now();
        let (response, body) = get(&env.url("/")).await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_millis(1800),
            "answered after {waited:?} with a 300 ms pending timeout"
        );
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers().contains_key("retry-after"));
        assert_eq!(json(&body)["error"]["code"], "tunnel_offline");
    })
    .await;
}

#[tokio::test]
async fn two_replicas_share_load_and_survive_one_killed() {
    bounded(async {
        let mut env = TestEnv::start().await;
        let second = spawn_agent(env.agent_config());
        env.wait_for_sessions(2).await;
        // Held requests spread over both (least loaded first).
        let client = client();
        let held: Vec<_> = (0..10)
            .map(|_| {
                let (client, url) = (client.clone(), env.url("/hold"));
                tokio::spawn(async move { client.request(Request::get(url).body(empty()).unwrap()).await })
            })
            .collect();
        env.stats.held.subscribe().wait_for(|n| *n == 10).await.unwrap();
        let loads: Vec<u64> = env.gateway.registry.all().iter().map(|s| s.in_flight()).collect();
        assert_eq!(loads, [5, 5]);
        // One replica dies: its requests (no response head yet) get 502 session_lost, the others
        // complete, new ones go on.
        env.agent.take().unwrap().kill();
        env.wait_for_sessions(1).await;
        env.stats.gate.add_permits(10);
        let (mut ok, mut lost) = (0, 0);
        for request in held {
            let response = request.await.unwrap().unwrap();
            let status = response.status();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            match status {
                StatusCode::OK => {
                    assert_eq!(body, "released");
                    ok += 1;
                }
                StatusCode::BAD_GATEWAY => {
                    assert_eq!(json(&body)["error"]["code"], "session_lost");
                    lost += 1;
                }
                other => panic!("unexpected {other}: {}", String::from_utf8_lossy(&body)),
            }
        }
        assert_eq!((ok, lost), (5, 5), "the surviving replica's requests complete, the dead one's fail");
        for _ in 0..20 {
            let (response, _) = get(&env.url("/")).await;
            assert_eq!(response.status(), StatusCode::OK);
        }
        drop(second);
    })
    .await;
}

#[tokio::test]
async fn drain_finishes_requests_in_flight() {
    bounded(async {
        let config =
            GatewayConfig { pending_timeout: Duration::from_millis(200), ..GatewayConfig::default() };
        let mut env = TestEnv::start_with(config, |_| {}).await;
        let client = client();
        let held: Vec<_> = (0..3)
            .map(|_| {
                let (client, url) = (client.clone(), env.url("/hold"));
                tokio::spawn(async move { fetch(&client, Request::get(url).body(empty()).unwrap()).await })
            })
            .collect();
        env.stats.held.subscribe().wait_for(|n| *n == 3).await.unwrap();
        let session = Arc::clone(&env.gateway.registry.all()[0]);
        let agent = env.agent.take().unwrap();
        agent.shutdown.cancel();
        // Once the gateway has heard the drain, new requests no longer reach the session: they
        // wait for another agent and, none coming, get 503.
        let mut routed_after = 0;
        loop {
            let (response, body) = get(&env.url("/bytes/1")).await;
            if response.status() == StatusCode::SERVICE_UNAVAILABLE {
                assert_eq!(json(&body)["error"]["code"], "tunnel_offline");
                break;
            }
            assert_eq!(response.status(), StatusCode::OK, "before the drain is heard");
            routed_after += 1;
            assert!(routed_after < 100, "the draining session still gets requests");
        }
        let total = session.to_json()["requests_total"].as_u64().unwrap();
        let (response, _) = get(&env.url("/bytes/1")).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(session.to_json()["requests_total"].as_u64().unwrap(), total, "nothing new reached it");
        env.stats.gate.add_permits(3);
        for request in held {
            let (response, body) = request.await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(body, "released");
        }
        agent.task.await.unwrap().unwrap();
        env.wait_for_sessions(0).await;
    })
    .await;
}

#[tokio::test]
async fn an_agent_drain_ends_at_its_drain_timeout() {
    bounded(async {
        let grace = Duration::from_millis(500);
        let mut env = TestEnv::start_with(GatewayConfig::default(), |c| c.drain_timeout = grace).await;
        let url = env.url("/hold");
        let held =
            tokio::spawn(async move { send(&client(), Request::get(url).body(empty()).unwrap()).await });
        env.stats.held.subscribe().wait_for(|n| *n == 1).await.unwrap();
        let started = Instant::now();
        let agent = env.agent.take().unwrap();
        agent.shutdown.cancel();
        agent.task.await.unwrap().unwrap();
        let took = started.elapsed();
        println!("agent drained and exited after {took:?} (drain timeout {grace:?})");
        assert!(took >= grace && took < grace + Duration::from_secs(2), "exited after {took:?}");
        // The request that outlived the grace is cut, visibly.
        let response = held.await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    })
    .await;
}

#[tokio::test]
async fn gateway_shutdown_finishes_requests_and_sends_agents_away() {
    bounded(async {
        let env = TestEnv::start().await;
        let url = env.url("/hold");
        let held = tokio::spawn(async move { get(&url).await });
        env.stats.held.subscribe().wait_for(|n| *n == 1).await.unwrap();
        env.gateway_run.shutdown.cancel();
        // New connections are no longer taken; the request in flight goes on.
        env.gateway.registry.wait_until(|r| r.all().iter().all(|s| !s.accepts_requests())).await;
        let refused = tokio::time::timeout(Duration::from_secs(2), get_status(&env.url("/bytes/1"))).await;
        assert!(!matches!(refused, Ok(Some(StatusCode::OK))), "a new request was served: {refused:?}");
        env.stats.gate.add_permits(1);
        let (response, body) = held.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body, "released");
    })
    .await;
}

#[tokio::test]
async fn a_gateway_drain_ends_at_its_drain_timeout() {
    bounded(async {
        let grace = Duration::from_millis(500);
        let config = GatewayConfig { drain_timeout: grace, ..GatewayConfig::default() };
        let mut env = TestEnv::start_with(config, |_| {}).await;
        let url = env.url("/hold");
        let held =
            tokio::spawn(async move { client().request(Request::get(url).body(empty()).unwrap()).await });
        env.stats.held.subscribe().wait_for(|n| *n == 1).await.unwrap();
        let started = Instant::now();
        env.gateway_run.shutdown.cancel();
        (&mut env.gateway_run.task).await.unwrap();
        let took = started.elapsed();
        println!("gateway stopped after {took:?} (drain timeout {grace:?})");
        // Requests get the grace, then sessions get theirs to close: at most two graces.
        assert!(took >= grace && took < grace * 2 + Duration::from_secs(2), "stopped after {took:?}");
        // The request that outlived the grace had its connection closed: no answer, not a made-up one.
        assert!(held.await.unwrap().is_err(), "a request cut at the drain deadline looked answered");
    })
    .await;
}

/// The status of a GET, or `None` when the connection was refused or closed.
async fn get_status(url: &str) -> Option<StatusCode> {
    client().request(Request::get(url).body(empty()).unwrap()).await.ok().map(|r| r.status())
}

#[tokio::test]
async fn heartbeats_detect_a_partition_without_fin() {
    bounded(async {
        let interval = Duration::from_millis(100);
        let config = GatewayConfig { heartbeat_interval: interval, ..GatewayConfig::default() };
        let mut env = TestEnv::start_without_agent(config).await;
        let proxy = PartitionProxy::start(env.gateway_addr).await;
        let mut agent_config = env.agent_config();
        agent_config.gateway =
            ferry_agent::config::GatewayUrl::parse(&format!("ws://{}/ws", proxy.addr)).unwrap();
        env.agent = Some(spawn_agent(agent_config));
        env.wait_for_sessions(1).await;
        let first = env.gateway.registry.all()[0].identity.id;

        let cut = Instant::now();
        proxy.partition();
        env.wait_for_sessions(0).await;
        let detected = cut.elapsed();
        println!("gateway dropped the silent session after {detected:?} (heartbeat {interval:?} x 3)");
        // Three silent intervals since the agent's last word (up to one interval before the
        // cut), checked on the next tick; slack for a busy machine.
        assert!(detected >= interval * 2, "detected too early: {detected:?}");
        assert!(detected < interval * 3 + Duration::from_millis(1500), "detected too late: {detected:?}");

        // Healed, the agent (which detected it too) comes back on a new session.
        proxy.heal();
        env.gateway.registry.wait_until(|r| r.all().iter().any(|s| s.identity.id != first)).await;
        let (response, _) = get(&env.url("/")).await;
        assert_eq!(response.status(), StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn misbehaving_agents_only_kill_their_own_session() {
    bounded(async {
        let env = TestEnv::start().await;
        let other = "agent_11111111-2222-3333-4444-555555555555_evil".parse().unwrap();

        // 1. Opens a flood of streams: the gateway allows only the control stream.
        let (ws, _, _, result) =
            raw_handshake(env.gateway_addr, &other, InstanceId(Uuid::new_v4()), None, None).await;
        assert!(matches!(result, AuthResult::Accepted(_)));
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
        for _ in 0..50 {
            let Ok((mut stream, slot)) = opener.open().await else { break };
            std::mem::forget(slot);
            // A stream exists for the peer once a frame crosses.
            if futures_util::io::AsyncWriteExt::write_all(&mut stream, b"x").await.is_err() {
                break;
            }
            std::mem::forget(stream);
        }
        let ended = driving.await.unwrap();
        println!("flooding agent's session ended: {ended:?}");
        assert!(env.gateway.registry.of(&other).is_empty());

        // 2. Garbage instead of yamux frames.
        let (mut ws, _, _, result) =
            raw_handshake(env.gateway_addr, &other, InstanceId(Uuid::new_v4()), None, None).await;
        assert!(matches!(result, AuthResult::Accepted(_)));
        ws.send(Message::binary(vec![0xffu8; 4096])).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            use futures_util::StreamExt;
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
        assert!(closed.is_ok(), "the gateway closes a session that sends garbage");

        // The well-behaved tunnel never noticed.
        let (response, body) = get(&env.url("/bytes/5000")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body.len(), 5000);
        assert_eq!(env.gateway.registry.of(&env.tunnel_id).len(), 1);
    })
    .await;
}

#[tokio::test]
async fn the_same_agent_instance_replaces_its_stale_session() {
    bounded(async {
        let mut env = TestEnv::start_without_agent(GatewayConfig::default()).await;
        let instance = InstanceId(Uuid::new_v4());
        // A session whose agent went silent (it never even opened its control stream).
        let (stale_ws, _, _, result) =
            raw_handshake(env.gateway_addr, &env.tunnel_id, instance, None, None).await;
        assert!(matches!(result, AuthResult::Accepted(_)));
        let (driver, opener) = session(
            WsIo::new(
                stale_ws,
                tokio_tungstenite::tungstenite::protocol::Role::Client,
                Arc::new(IoCounters::default()),
            ),
            multiplex::Mode::Client,
            &SessionConfig::default(),
        );
        let stale = tokio::spawn(driver.run(|_| {}, tokio_util::sync::CancellationToken::new()));
        let (mut control, _slot) = opener.open().await.unwrap();
        let mut hello = bytes::BytesMut::new();
        ferry_codec::ControlMessage::Ping { nonce: 1 }.encode(&mut hello).unwrap();
        futures_util::io::AsyncWriteExt::write_all(&mut control, &hello).await.unwrap();
        env.wait_for_sessions(1).await;
        let stale_id = env.gateway.registry.all()[0].identity.id;

        // The same instance comes back: the new session replaces the stale one.
        let mut config = env.agent_config();
        config.instance_id = instance;
        env.agent = Some(spawn_agent(config));
        env.gateway.registry.wait_until(|r| r.all().len() == 1 && r.all()[0].identity.id != stale_id).await;
        let _ = stale.await;
        let (response, _) = get(&env.url("/")).await;
        assert_eq!(response.status(), StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn requests_waiting_for_an_agent_are_capped() {
    bounded(async {
        let config = GatewayConfig {
            max_pending: 3,
            pending_timeout: Duration::from_secs(30),
            ..GatewayConfig::default()
        };
        let mut env = TestEnv::start_with(config, |_| {}).await;
        env.agent.take().unwrap().stop().await.unwrap();
        env.wait_for_sessions(0).await;
        // Three wait for the agent to come back...
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let url = env.url("/bytes/1");
                tokio::spawn(async move { get(&url).await })
            })
            .collect();
        let id = env.tunnel_id.clone();
        env.gateway.registry.wait_until(|r| r.waiting(&id) == 3).await;
        // ...the fourth is told at once.
        let started = Instant::now();
        let (response, body) = get(&env.url("/bytes/1")).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json(&body)["error"]["code"], "tunnel_offline");
        assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
        // The agent comes back: the three are served.
        env.agent = Some(spawn_agent(env.agent_config()));
        for request in waiting {
            assert_eq!(request.await.unwrap().0.status(), StatusCode::OK);
        }
        let metrics = env.gateway.metrics.render(&env.gateway.registry);
        assert!(metrics.contains("ferry_pending_requests_total{outcome=\"served\"} 3"), "{metrics}");
        assert!(metrics.contains("ferry_pending_requests_total{outcome=\"expired\"} 1"), "{metrics}");
    })
    .await;
}

#[tokio::test]
async fn extra_connections_to_a_lone_gateway_wait_for_it_instead_of_redialling() {
    bounded(async {
        let env = TestEnv::start_without_agent(GatewayConfig::default()).await;
        // Through a proxy that counts the agent's connections.
        let proxy = PartitionProxy::start(env.gateway_addr).await;
        let dialled = || proxy.connections.load(std::sync::atomic::Ordering::SeqCst);
        let mut config = env.agent_config();
        config.gateway = ferry_agent::config::GatewayUrl::parse(&format!("ws://{}/ws", proxy.addr)).unwrap();
        config.connections = 3;
        config.reconnect_initial = Duration::from_millis(10);
        config.reconnect_max = Duration::from_millis(10);
        let agent = spawn_agent(config);
        env.wait_for_sessions(1).await;
        // The two extra connections land once each, find the gateway (not a cluster node) in use
        // by the first, and wait. Redialling every 10 ms would dial ~60 times in this time.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(dialled() <= 3, "dialled {} times", dialled());
        assert_eq!(env.gateway.registry.all().len(), 1);

        // The session is closed at the gateway: a connection takes the gateway again, and the
        // others wait again.
        let first = env.gateway.registry.all()[0].identity.id;
        let close = Request::delete(env.gateway_url(&format!("/connections/{}", env.tunnel_id)));
        let (response, _) = fetch(&client(), close.body(empty()).unwrap()).await;
        assert_eq!(response.status(), StatusCode::OK);
        env.gateway.registry.wait_until(|r| r.all().len() == 1 && r.all()[0].identity.id != first).await;
        let (response, _) = get(&env.url("/")).await;
        assert_eq!(response.status(), StatusCode::OK);
        let before = dialled();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(dialled() <= before + 2, "dialled {} times after {before}", dialled());
        assert_eq!(env.gateway.registry.all().len(), 1);
        agent.stop().await.unwrap();
    })
    .await;
}
