//! Agent authentication: the HMAC challenge-response both ways, replay, stalling agents, secret
//! files and rotation, rate limiting of failed attempts.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use ferry_agent::{AgentError, ConnectError};
use ferry_codec::{AuthErrorCode, AuthResult, InstanceId, Secret};
use ferry_gateway::GatewayConfig;
use ferry_gateway::auth::AuthSource;
use futures_util::StreamExt;
use http::StatusCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use uuid::Uuid;

fn secret(text: &str) -> Secret {
    Secret::new(text).unwrap()
}

fn shared(text: &str) -> GatewayConfig {
    GatewayConfig { auth: AuthSource::Shared(secret(text)), ..GatewayConfig::default() }
}

/// Runs an agent that gives up after one attempt and returns why.
async fn failing_agent(env: &TestEnv, agent_secret: Option<&str>) -> ConnectError {
    let mut config = env.agent_config();
    config.secret = agent_secret.map(secret);
    config.max_retries = Some(1);
    match spawn_agent(config).task.await.unwrap() {
        Err(AgentError::GaveUp { last, .. }) => last,
        other => panic!("expected the agent to give up, got {other:?}"),
    }
}

/// Reads until the gateway closes; returns the close frame's code and reason.
async fn close_reason(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
) -> (CloseCode, String) {
    while let Some(message) = ws.next().await {
        if let Ok(Message::Close(Some(frame))) = message {
            return (frame.code, frame.reason.to_string());
        }
    }
    panic!("the gateway closed without a close frame");
}

#[tokio::test]
async fn matching_shared_secret_connects_both_ways() {
    bounded(async {
        let env = TestEnv::start_with(shared("correct horse battery staple"), |config| {
            config.secret = Some(secret("correct horse battery staple"));
        })
        .await;
        let (response, _) = get(&env.url("/")).await;
        assert_eq!(response.status(), StatusCode::OK);
        let (_, body) = get(&env.gateway_url("/connections")).await;
        assert_eq!(json(&body)["sessions"][0]["authenticated"], true);
    })
    .await;
}

#[tokio::test]
async fn wrong_secret_is_refused_with_a_reason() {
    bounded(async {
        let env = TestEnv::start_without_agent(shared("the right one")).await;
        let err = failing_agent(&env, Some("the wrong one")).await;
        assert!(matches!(err, ConnectError::Rejected { code: AuthErrorCode::BadCredentials, .. }), "{err:?}");
        assert!(err.needs_attention());
        assert!(err.hint().contains("FERRY_SECRET"));

        // On the wire: AuthResult rejected, then close 1008 naming the code.
        let tunnel = env.tunnel_id.clone();
        let (mut ws, _, _, result) =
            raw_handshake(env.gateway_addr, &tunnel, InstanceId(Uuid::new_v4()), Some(&secret("nope")), None)
                .await;
        assert!(matches!(result, AuthResult::Rejected(r) if r.code == AuthErrorCode::BadCredentials));
        assert_eq!(close_reason(&mut ws).await, (CloseCode::Policy, "bad_credentials".to_owned()));
        let metrics = env.gateway.metrics.render(&env.gateway.registry);
        assert!(metrics.contains("ferry_handshake_failures_total{code=\"bad_credentials\"} 2"), "{metrics}");
    })
    .await;
}

#[tokio::test]
async fn agent_without_secret_is_told_to_set_one() {
    bounded(async {
        let env = TestEnv::start_without_agent(shared("s3cret")).await;
        let err = failing_agent(&env, None).await;
        assert!(matches!(err, ConnectError::SecretRequired), "{err:?}");
        assert!(err.needs_attention());
    })
    .await;
}

#[tokio::test]
async fn agent_refuses_a_gateway_that_cannot_prove_the_secret() {
    bounded(async {
        // This gateway accepts anyone, so it cannot sign its answer: the agent must not serve it.
        let env = TestEnv::start_without_agent(GatewayConfig::default()).await;
        let err = failing_agent(&env, Some("agent has a secret")).await;
        assert!(matches!(err, ConnectError::GatewayNotAuthenticated), "{err:?}");
    })
    .await;
}

#[tokio::test]
async fn t12b_replayed_handshake() {
    bounded(async {
        let env = TestEnv::start_without_agent(shared("replay me")).await;
        let key = secret("replay me");
        let instance = InstanceId(Uuid::new_v4());
        let (ws, _, recorded, result) =
            raw_handshake(env.gateway_addr, &env.tunnel_id, instance, Some(&key), None).await;
        assert!(matches!(result, AuthResult::Accepted(_)), "a fresh, correct MAC is accepted");
        drop(ws);
        // The same bytes on a new connection face a new nonce.
        let (mut ws, _, _, result) =
            raw_handshake(env.gateway_addr, &env.tunnel_id, instance, None, Some(recorded)).await;
        assert!(matches!(result, AuthResult::Rejected(r) if r.code == AuthErrorCode::BadCredentials));
        assert_eq!(close_reason(&mut ws).await.0, CloseCode::Policy);
    })
    .await;
}

#[tokio::test]
async fn agent_that_never_answers_the_challenge_is_cut_off() {
    bounded(async {
        let config = GatewayConfig { handshake_timeout: Duration::from_millis(300), ..shared("x") };
        let env = TestEnv::start_without_agent(config).await;
        let mut ws = raw_ws(env.gateway_addr).await;
        let hello = ws.next().await.unwrap().unwrap();
        assert!(hello.is_binary());
        // Say nothing: the gateway gives up at its deadline with the reason.
        let mut rejected = false;
        let mut close = None;
        while let Some(Ok(message)) = ws.next().await {
            match message {
                Message::Binary(data) => {
                    let result = AuthResult::decode(data).unwrap();
                    rejected = matches!(result, AuthResult::Rejected(r) if r.code == AuthErrorCode::HandshakeTimeout);
                }
                Message::Close(frame) => {
                    close = frame;
                    break;
                }
                _ => {}
            }
        }
        assert!(rejected);
        assert_eq!(close.unwrap().reason.as_str(), "handshake_timeout");
    })
    .await;
}

#[tokio::test]
async fn failed_attempts_are_rate_limited_per_address() {
    bounded(async {
        let env = TestEnv::start_without_agent(shared("limit")).await;
        for _ in 0..ferry_gateway::auth::MAX_FAILURES {
            let (_ws, _, _, result) = raw_handshake(
                env.gateway_addr,
                &env.tunnel_id,
                InstanceId(Uuid::new_v4()),
                Some(&secret("bad")),
                None,
            )
            .await;
            assert!(matches!(result, AuthResult::Rejected(_)));
        }
        let (response, body) = get(&env.gateway_url("/ws")).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(response.headers().contains_key("retry-after"));
        assert_eq!(json(&body)["error"]["code"], "rate_limited");
    })
    .await;
}

fn auth_file(contents: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("ferry-auth-{}.toml", Uuid::new_v4()));
    std::fs::write(&path, contents).unwrap();
    path
}

#[tokio::test]
async fn per_tunnel_secrets_rotate_and_revoked_sessions_close() {
    bounded(async {
        let path = auth_file(&format!("[tunnels.{TUNNEL}]\nsecrets = [\"old secret\", \"new secret\"]\n"));
        let config = GatewayConfig { auth: AuthSource::File(path.clone()), ..GatewayConfig::default() };
        // An agent on the old secret connects while both are listed.
        let env = TestEnv::start_with(config, |c| c.secret = Some(secret("old secret"))).await;
        let old_session = env.gateway.registry.all()[0].identity.id;

        // A tunnel the file does not list is refused as unknown.
        let other = "agent_11111111-2222-3333-4444-555555555555_api".parse().unwrap();
        let (_ws, _, _, result) = raw_handshake(
            env.gateway_addr,
            &other,
            InstanceId(Uuid::new_v4()),
            Some(&secret("old secret")),
            None,
        )
        .await;
        assert!(matches!(result, AuthResult::Rejected(r) if r.code == AuthErrorCode::UnknownTunnel));

        // Rotation done: the old secret is removed and the file reloaded (what SIGHUP does).
        std::fs::write(&path, format!("[tunnels.{TUNNEL}]\nsecrets = [\"new secret\"]\n")).unwrap();
        env.gateway.reload_auth().await.unwrap();
        env.gateway.registry.wait_until(|r| r.all().iter().all(|s| s.identity.id != old_session)).await;

        // An agent with the new secret is served.
        let mut config = env.agent_config();
        config.secret = Some(secret("new secret"));
        let _agent = spawn_agent(config);
        env.gateway.registry.wait_until(|r| r.all().iter().any(|s| s.identity.id != old_session)).await;
        let (response, _) = get(&env.url("/")).await;
        assert_eq!(response.status(), StatusCode::OK);

        // A broken file on reload keeps the secrets in force.
        std::fs::write(&path, "[tunnels.not-an-id]\nsecrets = [\"x\"]\n").unwrap();
        let err = env.gateway.reload_auth().await.unwrap_err();
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
        let (response, _) = get(&env.url("/")).await;
        assert_eq!(response.status(), StatusCode::OK);
        std::fs::remove_file(path).unwrap();
    })
    .await;
}
