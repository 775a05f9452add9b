//! Who may reach a tunnel: the address blocks an agent declares (`--allow-ip`, `--deny-ip`) are
//! enforced at the gateway, for HTTP requests and TCP connections, before anything crosses the
//! tunnel. Clients are bound to `127.0.0.1` and `127.0.0.2`.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use common::*;
use ferry_agent::config::{TcpTarget, parse_ip_block};
use ferry_gateway::GatewayConfig;
use ferry_gateway::tcp::TcpConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn blocks(list: &[&str]) -> Vec<ipnet::IpNet> {
    list.iter().map(|b| parse_ip_block(b).unwrap()).collect()
}

#[tokio::test]
async fn http_requests_from_addresses_the_agent_refuses_get_403_and_never_reach_it() {
    bounded(async {
        let env = TestEnv::start_with(GatewayConfig::default(), |agent| {
            agent.allow_ip = blocks(&["127.0.0.0/8"]);
            agent.deny_ip = blocks(&["127.0.0.2"]);
        })
        .await;
        let path = format!("/t/{TUNNEL}/");
        let (status, _) = get_from("127.0.0.1", env.gateway_addr, &path).await;
        assert_eq!(status, 200);
        let served = env.stats.requests.load(Ordering::Relaxed);
        let (status, body) = get_from("127.0.0.2", env.gateway_addr, &path).await;
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("\"ip_denied\""), "{body}");
        assert_eq!(
            env.stats.requests.load(Ordering::Relaxed),
            served,
            "the refused request reached the upstream"
        );
        let metrics = env.gateway.metrics.render(&env.gateway.registry);
        assert!(metrics.contains("ferry_access_refused_total{rule=\"ip\",kind=\"http\"} 1"), "{metrics}");
        let (_, listing) = get(&env.gateway_url("/connections")).await;
        assert_eq!(
            json(&listing)["sessions"][0]["ip_rules"],
            serde_json::json!({ "allow": ["127.0.0.0/8"], "deny": ["127.0.0.2/32"] })
        );
    })
    .await;
}

#[tokio::test]
async fn tcp_connections_from_outside_the_allowed_blocks_are_reset_at_the_gateway() {
    bounded(async {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
        let config = GatewayConfig {
            tcp: TcpConfig { ports: Some(port..=port), ..TcpConfig::default() },
            ..GatewayConfig::default()
        };
        let _env = TestEnv::start_with(config, |agent| {
            agent.allow_ip = blocks(&["127.0.0.1"]);
            agent.tcp = vec![TcpTarget::parse(&upstream_addr.to_string()).unwrap()];
        })
        .await;
        let public: SocketAddr = ([127, 0, 0, 1], port).into();

        expect_reset(&mut connect_from("127.0.0.2", public).await).await;

        let mut allowed = connect_from("127.0.0.1", public).await;
        // The first connection the upstream sees is the allowed client's: the refused one (made
        // first) never reached it, or this would read from that one and wait forever.
        let (mut accepted, _) = upstream.accept().await.unwrap();
        allowed.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        accepted.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
    })
    .await;
}

#[tokio::test]
async fn the_auth_files_floor_holds_whatever_the_agent_allows() {
    bounded(async {
        let path = std::env::temp_dir().join(format!("ferry-auth-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(
            &path,
            format!("[tunnels.{TUNNEL}]\nsecrets = [\"s1\"]\nallow-ip = [\"127.0.0.1\"]\n"),
        )
        .unwrap();
        let config = GatewayConfig {
            auth: ferry_gateway::auth::AuthSource::File(path.clone()),
            ..GatewayConfig::default()
        };
        let env = TestEnv::start_with(config, |agent| {
            agent.secret = Some(ferry_codec::Secret::from_text("s1").unwrap());
            agent.allow_ip = blocks(&["0.0.0.0/0"]);
        })
        .await;
        let path_in_tunnel = format!("/t/{TUNNEL}/");
        assert_eq!(get_from("127.0.0.1", env.gateway_addr, &path_in_tunnel).await.0, 200);
        let (status, body) = get_from("127.0.0.2", env.gateway_addr, &path_in_tunnel).await;
        assert_eq!(status, 403, "{body}");
        let _ = std::fs::remove_file(&path);
    })
    .await;
}
