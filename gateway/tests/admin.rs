//! The admin endpoints: who may use them, and what they do.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry_codec::Secret;
use ferry_gateway::GatewayConfig;
use http::{Method, Request, StatusCode, header};

const TOKEN: &str = "admin-token-for-tests";

/// A gateway that treats loopback clients like any other: only the token opens the admin pages.
fn locked() -> GatewayConfig {
    GatewayConfig {
        admin_token: Some(Secret::new(TOKEN).unwrap()),
        admin_loopback: false,
        ..GatewayConfig::default()
    }
}

async fn admin(
    env: &TestEnv,
    method: Method,
    path: &str,
    token: Option<&str>,
) -> (http::Response<()>, bytes::Bytes) {
    let mut request = Request::builder().method(method).uri(env.gateway_url(path));
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    fetch(&client(), request.body(empty()).unwrap()).await
}

#[tokio::test]
async fn admin_pages_need_the_token_when_loopback_is_not_trusted() {
    bounded(async {
        let env = TestEnv::start_with(locked(), |_| {}).await;
        let tunnel = env.tunnel_id.to_string();
        let paths = ["/connections".to_owned(), format!("/connections/{tunnel}"), "/metrics".to_owned()];
        for path in &paths {
            for token in [None, Some("wrong"), Some("")] {
                let (response, body) = admin(&env, Method::GET, path, token).await;
                assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{path} with {token:?}");
                assert!(response.headers()[header::WWW_AUTHENTICATE].to_str().unwrap().starts_with("Bearer"));
                assert_eq!(json(&body)["error"]["code"], "unauthorized");
            }
            let (response, _) = admin(&env, Method::GET, path, Some(TOKEN)).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
        }
        for (method, path) in [
            (Method::POST, format!("/connections/{tunnel}/ping")),
            (Method::DELETE, format!("/connections/{tunnel}")),
        ] {
            let (response, _) = admin(&env, method, &path, None).await;
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        }
        // Health and the tunnels themselves stay public.
        let (response, _) = get(&env.gateway_url("/")).await;
        assert_eq!(response.status(), StatusCode::OK);
        let (response, _) = get(&env.url("/")).await;
        assert_eq!(response.status(), StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn loopback_clients_are_trusted_by_default() {
    bounded(async {
        let env = TestEnv::start().await;
        let (response, _) = get(&env.gateway_url("/connections")).await;
        assert_eq!(response.status(), StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    bounded(async {
        let env = TestEnv::start_with(locked(), |_| {}).await;
        for path in ["/", "/status/404", "/status/503"] {
            get(&env.url(path)).await;
        }
        let (response, body) = admin(&env, Method::GET, "/metrics", Some(TOKEN)).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            response.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text")
        );
        let text = String::from_utf8(body.to_vec()).unwrap();
        for line in [
            "# TYPE ferry_sessions gauge",
            "ferry_sessions 1",
            "ferry_streams_in_flight 0",
            "ferry_requests_total{class=\"2xx\"} 1",
            "ferry_requests_total{class=\"4xx\"} 1",
            "ferry_requests_total{class=\"5xx\"} 1",
            "ferry_handshake_failures_total{code=\"bad_credentials\"} 0",
            "ferry_sessions_started_total 1",
            "ferry_limited_total{limit=\"send_idle\"} 0",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        let bytes_line =
            text.lines().find(|l| l.starts_with("ferry_bytes_total{direction=\"to_agents\"}")).unwrap();
        assert!(bytes_line.split(' ').nth(1).unwrap().parse::<u64>().unwrap() > 0);
        // Per tunnel: its sessions, and how long its requests took to their response head.
        let tunnel = env.tunnel_id.as_str();
        assert!(
            text.lines().any(|l| l == format!("ferry_tunnel_sessions{{tunnel=\"{tunnel}\"}} 1")),
            "{text}"
        );
        assert!(
            text.lines().any(|l| l == format!("ferry_reconnects_total{{tunnel=\"{tunnel}\"}} 0")),
            "{text}"
        );
        let count = format!("ferry_request_duration_seconds_count{{tunnel=\"{tunnel}\"}} ");
        let line =
            text.lines().find(|l| l.starts_with(&count)).unwrap_or_else(|| panic!("no {count} in {text}"));
        assert_eq!(line[count.len()..].parse::<u64>().unwrap(), 3, "three requests reached the tunnel");
    })
    .await;
}

#[tokio::test]
async fn ping_drain_and_close_one_tunnel() {
    bounded(async {
        let env = TestEnv::start_with(locked(), |_| {}).await;
        let tunnel = env.tunnel_id.to_string();

        let (response, body) =
            admin(&env, Method::POST, &format!("/connections/{tunnel}/ping"), Some(TOKEN)).await;
        assert_eq!(response.status(), StatusCode::OK);
        let rtt = json(&body)["sessions"][0]["rtt_ms"].as_f64().unwrap();
        assert!(rtt > 0.0);
        let (_, body) = admin(&env, Method::GET, &format!("/connections/{tunnel}"), Some(TOKEN)).await;
        assert!(json(&body)["sessions"][0]["heartbeat_rtt_ms"].as_f64().unwrap() > 0.0);

        // Drain: the agent finishes, reconnects at once, and a new session serves.
        let first = env.gateway.registry.all()[0].identity.id;
        let (response, _) =
            admin(&env, Method::POST, &format!("/connections/{tunnel}/drain"), Some(TOKEN)).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        env.gateway.registry.wait_until(|r| r.all().len() == 1 && r.all()[0].identity.id != first).await;
        let (response, _) = get(&env.url("/")).await;
        assert_eq!(response.status(), StatusCode::OK);

        // Close: the session goes; the agent reconnects by itself.
        let second = env.gateway.registry.all()[0].identity.id;
        let (response, body) =
            admin(&env, Method::DELETE, &format!("/connections/{tunnel}"), Some(TOKEN)).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(json(&body)["closed"], 1);
        env.gateway.registry.wait_until(|r| r.all().len() == 1 && r.all()[0].identity.id != second).await;

        let other = "/connections/agent_11111111-2222-3333-4444-555555555555_none/ping";
        let (response, _) = admin(&env, Method::POST, other, Some(TOKEN)).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let (response, _) =
            admin(&env, Method::GET, &format!("/connections/{tunnel}/ping"), Some(TOKEN)).await;
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    })
    .await;
}
