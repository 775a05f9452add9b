//! The agent as the last line of defence and its view of the upstream: filters answered by the
//! agent itself (the upstream never sees those requests), routes to several upstreams by path
//! prefix, the health probe and the circuit breaker, and how the gateway routes around an
//! unhealthy upstream.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use ferry_agent::config::Route;
use ferry_agent::filter::Filters;
use ferry_benches::upstream::{UpstreamStats, serve};
use ferry_gateway::GatewayConfig;
use http::{Method, Request, StatusCode, header};
use tokio::net::TcpListener;

fn upstream_requests(env: &TestEnv) -> u64 {
    env.stats.requests.load(Ordering::SeqCst)
}

#[tokio::test]
async fn filtered_requests_are_answered_by_the_agent() {
    bounded(async {
        let env = TestEnv::start_with(GatewayConfig::default(), |config| {
            config.filters = Filters {
                methods: Some(vec![Method::GET, Method::POST]),
                paths: Some(vec!["/bytes".into(), "/echo".into()]),
                max_request_body: Some(1000),
                max_concurrent: None,
            };
        })
        .await;
        let client = client();

        let request = Request::delete(env.url("/bytes/1")).body(empty()).unwrap();
        let (response, body) = fetch(&client, request).await;
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[header::ALLOW], "GET, POST");
        assert_eq!(json(&body)["error"]["code"], "method_not_allowed");
        assert!(json(&body)["request_id"].as_str().is_some_and(|id| !id.is_empty()));

        let (response, body) = get(&env.url("/headers")).await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(json(&body)["error"]["code"], "path_not_allowed");
        let (response, _) = get(&env.url("/bytes/../headers")).await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN);

        let request = Request::post(env.url("/echo")).body(full(vec![0u8; 2000])).unwrap();
        let (response, body) = fetch(&client, request).await;
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(json(&body)["error"]["code"], "payload_too_large");
        assert_eq!(upstream_requests(&env), 0, "refused requests never reach the upstream");

        // Allowed: served.
        let (response, body) = get(&env.url("/bytes/10")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body.len(), 10);
        let request = Request::post(env.url("/echo")).body(full(vec![3u8; 900])).unwrap();
        let (response, body) = fetch(&client, request).await;
        assert_eq!((response.status(), body.len()), (StatusCode::OK, 900));
    })
    .await;
}

#[tokio::test]
async fn a_chunked_body_over_the_agent_limit_gets_413() {
    bounded(async {
        let env = TestEnv::start_with(GatewayConfig::default(), |config| {
            config.filters.max_request_body = Some(20_000);
        })
        .await;
        let chunks =
            futures_util::stream::iter((0..8).map(|_| {
                Ok::<_, BoxError>(hyper::body::Frame::data(bytes::Bytes::from(vec![1u8; 8 * 1024])))
            }));
        let body = http_body_util::BodyExt::boxed_unsync(http_body_util::StreamBody::new(chunks));
        let request = Request::post(env.url("/sink")).body(body).unwrap();
        let (response, body) = fetch(&client(), request).await;
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE, "{}", String::from_utf8_lossy(&body));
        assert_eq!(json(&body)["error"]["code"], "payload_too_large");
    })
    .await;
}

#[tokio::test]
async fn the_agent_caps_concurrent_requests() {
    bounded(async {
        let env = TestEnv::start_with(GatewayConfig::default(), |config| {
            config.filters.max_concurrent = Some(1);
        })
        .await;
        let client = client();
        let url = env.url("/hold");
        let held = tokio::spawn({
            let client = client.clone();
            async move { client.request(Request::get(url).body(empty()).unwrap()).await }
        });
        env.stats.held.subscribe().wait_for(|n| *n == 1).await.unwrap();
        let (response, body) = get(&env.url("/bytes/1")).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json(&body)["error"]["code"], "agent_at_capacity");
        assert!(response.headers().contains_key(header::RETRY_AFTER));
        env.stats.gate.add_permits(1);
        assert_eq!(held.await.unwrap().unwrap().status(), StatusCode::OK);
        assert_eq!(get(&env.url("/bytes/1")).await.0.status(), StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn routes_send_path_prefixes_to_other_upstreams() {
    bounded(async {
        let other_stats = Arc::new(UpstreamStats::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let other = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(serve(listener, Arc::clone(&other_stats), stop.clone()));
        let env = TestEnv::start_with(GatewayConfig::default(), |config| {
            config.routes = vec![Route::parse(&format!("/bytes={other}")).unwrap()];
        })
        .await;
        assert_eq!(get(&env.url("/bytes/7")).await.1.len(), 7);
        assert_eq!(get(&env.url("/headers")).await.0.status(), StatusCode::OK);
        assert_eq!(other_stats.requests.load(Ordering::SeqCst), 1, "/bytes went to the routed upstream");
        assert_eq!(upstream_requests(&env), 1, "/headers went to the default upstream");
        stop.cancel();
    })
    .await;
}

#[tokio::test]
async fn an_unhealthy_upstream_is_routed_around_then_refused() {
    bounded(async {
        // A replica whose health probe fails (the probe path answers 503), beside a healthy one.
        let mut env = TestEnv::start_with(GatewayConfig::default(), |config| {
            config.health_path = Some("/status/503".into());
            config.health_interval = Duration::from_millis(50);
        })
        .await;
        let id = env.tunnel_id.clone();
        env.gateway.registry.wait_until(|r| r.of(&id).iter().any(|s| s.is_unhealthy())).await;
        let connections = get(&env.gateway_url("/connections")).await.1;
        assert!(String::from_utf8_lossy(&connections).contains("\"unhealthy\""), "{connections:?}");

        // Every agent unhealthy: 503 from the gateway at once.
        let (response, body) = get(&env.url("/bytes/1")).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json(&body)["error"]["code"], "upstream_unhealthy");
        assert_eq!(response.headers()[header::RETRY_AFTER], "5");
        let sick = env.gateway.registry.of(&id)[0].identity.id;
        let served_by = |session| {
            let sessions = env.gateway.registry.of(&id);
            let s = sessions.iter().find(|s| s.identity.id == session).unwrap();
            s.to_json()["requests_total"].as_u64().unwrap()
        };
        assert_eq!(served_by(sick), 0, "the gateway answered without bothering the agent");

        // A healthy replica joins: it gets the requests.
        let mut healthy = env.agent_config();
        healthy.health_path = Some("/status/204".into());
        healthy.health_interval = Duration::from_millis(50);
        let second = spawn_agent(healthy);
        env.wait_for_sessions(2).await;
        env.gateway
            .registry
            .wait_until(|r| r.of(&id).iter().filter(|s| !s.is_unhealthy()).count() == 1)
            .await;
        let well = env.gateway.registry.of(&id).iter().find(|s| s.identity.id != sick).unwrap().identity.id;
        for _ in 0..5 {
            assert_eq!(get(&env.url("/bytes/1")).await.0.status(), StatusCode::OK);
        }
        assert_eq!((served_by(sick), served_by(well)), (0, 5), "every request went to the healthy one");
        second.kill();
        env.agent.take().unwrap().kill();
    })
    .await;
}

#[tokio::test]
async fn the_circuit_breaker_opens_on_connection_failures_and_closes_on_recovery() {
    bounded(async {
        let down = closed_port().await;
        let env = TestEnv::start_with(GatewayConfig::default(), |config| {
            config.upstream = Some(ferry_agent::config::Upstream::parse(&down.to_string()).unwrap());
            config.breaker_failures = 2;
            config.breaker_cooldown = Duration::from_millis(200);
        })
        .await;
        for _ in 0..2 {
            let (response, body) = get(&env.url("/bytes/1")).await;
            assert_eq!(response.status(), StatusCode::BAD_GATEWAY, "{}", String::from_utf8_lossy(&body));
            assert_eq!(json(&body)["error"]["code"], "upstream_unreachable");
        }
        // Open: refused at once, by the agent or (once it heard) the gateway.
        let (response, body) = get(&env.url("/bytes/1")).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json(&body)["error"]["code"], "upstream_unhealthy");

        // The upstream comes back on its port: after the cool-down a trial request goes
        // through and closes the breaker.
        let listener = TcpListener::bind(down).await.unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(serve(listener, Arc::new(UpstreamStats::default()), stop.clone()));
        let id = env.tunnel_id.clone();
        let mut served = false;
        for _ in 0..50 {
            // The gateway refuses while the agent reports the breaker open; the agent lets
            // a trial through once the cool-down passed — wait for either to change.
            let (response, _) = get(&env.url("/bytes/1")).await;
            if response.status() == StatusCode::OK {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(served, "the breaker never closed");
        env.gateway.registry.wait_until(|r| r.of(&id).iter().all(|s| !s.is_unhealthy())).await;
        stop.cancel();
    })
    .await;
}
