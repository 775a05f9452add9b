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

#[tokio::test]
async fn basic_auth_is_checked_at_the_gateway_right_wrong_and_missing() {
    bounded(async {
        let env = TestEnv::start_with(GatewayConfig::default(), |agent| {
            agent.basic_auth = vec![htpasswd("alice", "correct horse"), htpasswd("bob", "b:b")];
        })
        .await;
        let path = format!("/t/{TUNNEL}/headers");
        let served = env.stats.requests.load(Ordering::Relaxed);
        for fields in [
            vec![],
            vec![("Authorization", basic("alice", "wrong"))],
            vec![("Authorization", basic("mallory", "correct horse"))],
            vec![("Authorization", "Bearer abc".to_owned())],
        ] {
            let fields: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let (status, head, body) = get_from_with("127.0.0.1", env.gateway_addr, &path, &fields).await;
            assert_eq!(status, 401, "{fields:?}: {body}");
            assert!(
                head.to_ascii_lowercase().contains("www-authenticate: basic realm=\"ferry tunnel\""),
                "{head}"
            );
            assert_eq!(json(body.as_bytes())["error"]["code"], "auth_required");
        }
        assert_eq!(
            env.stats.requests.load(Ordering::Relaxed),
            served,
            "a refused request reached the upstream"
        );

        // Right: served, and the tunnel's password is not passed on to the upstream. Twice
        // (the second answered from the gateway's memory of the credential), and for the
        // second user, whose password holds a `:`.
        for (user, password) in [("alice", "correct horse"), ("alice", "correct horse"), ("bob", "b:b")] {
            let authorization = basic(user, password);
            let (status, _, body) =
                get_from_with("127.0.0.1", env.gateway_addr, &path, &[("Authorization", &authorization)])
                    .await;
            assert_eq!(status, 200, "{body}");
            let seen = json(body.as_bytes());
            let names: Vec<&str> =
                seen["headers"].as_array().unwrap().iter().map(|h| h[0].as_str().unwrap()).collect();
            assert!(!names.contains(&"authorization"), "{names:?}");
        }

        let metrics = env.gateway.metrics.render(&env.gateway.registry);
        assert!(
            metrics.contains("ferry_access_refused_total{rule=\"basic_auth\",kind=\"http\"} 4"),
            "{metrics}"
        );
        let (_, listing) = get(&env.gateway_url("/connections")).await;
        assert_eq!(json(&listing)["sessions"][0]["basic_auth_users"], serde_json::json!(["alice", "bob"]));
    })
    .await;
}

#[tokio::test]
async fn header_rules_and_the_kept_path_prefix_change_what_the_upstream_sees() {
    bounded(async {
        let config = GatewayConfig { domain: Some("tunnel.test".into()), ..GatewayConfig::default() };
        let env = TestEnv::start_with(config, |agent| {
            use ferry_agent::rewrite::{parse_field, parse_name};
            agent.headers.request.set = vec![parse_field("X-Env: prod").unwrap()];
            agent.headers.request.remove = vec![parse_name("cookie").unwrap()];
            agent.headers.response.set = vec![parse_field("X-Frame-Options: DENY").unwrap()];
            agent.headers.response.remove = vec![parse_name("content-type").unwrap()];
            agent.keep_path_prefix = true;
        })
        .await;
        // Host routing: the path is the upstream's already; nothing to put back.
        let host = format!("{}.tunnel.test", env.tunnel_id.to_label());
        let (status, head, body) = get_from_with(
            "127.0.0.1",
            env.gateway_addr,
            "/headers?x=1",
            &[("Host", &host), ("X-Env", "spoofed"), ("Cookie", "session=1")],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let head = head.to_ascii_lowercase();
        assert!(head.contains("x-frame-options: deny"), "{head}");
        assert!(!head.contains("content-type"), "{head}");
        let seen = json(body.as_bytes());
        let fields: Vec<(String, String)> = serde_json::from_value(seen["headers"].clone()).unwrap();
        assert!(fields.contains(&("x-env".into(), "prod".into())), "{fields:?}");
        assert_eq!(fields.iter().filter(|(name, _)| name == "x-env").count(), 1, "{fields:?}");
        assert!(!fields.iter().any(|(name, _)| name == "cookie"), "{fields:?}");
        assert_eq!(seen["target"], "/headers?x=1");

        // Path routing: the upstream sees the whole path, as an app with that base URL expects.
        let path = format!("/t/{TUNNEL}/lab/tree?token=1");
        let (status, head, _) = get_from_with("127.0.0.1", env.gateway_addr, &path, &[]).await;
        assert_eq!(status, 404, "the sample upstream has no /t/...: {head}");
        assert!(head.to_ascii_lowercase().contains("x-frame-options: deny"), "{head}");
        let targets = env.stats.targets.lock().unwrap().clone();
        assert_eq!(targets.back().map(String::as_str), Some(path.as_str()), "{targets:?}");
    })
    .await;
}

#[tokio::test]
async fn the_auth_file_can_require_basic_auth_of_a_tunnel() {
    bounded(async {
        let path = std::env::temp_dir().join(format!("ferry-auth-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(
            &path,
            format!("[tunnels.{TUNNEL}]\nsecrets = [\"s1\"]\nbasic-auth-required = true\n"),
        )
        .unwrap();
        let config = GatewayConfig {
            auth: ferry_gateway::auth::AuthSource::File(path.clone()),
            ..GatewayConfig::default()
        };
        let mut env = TestEnv::start_without_agent(config).await;
        let mut agent = env.agent_config();
        agent.secret = Some(ferry_codec::Secret::from_text("s1").unwrap());

        // Without users: refused at the handshake, with a reason a person can act on.
        let mut without = agent.clone();
        without.max_retries = Some(1);
        match spawn_agent(without).task.await.unwrap() {
            Err(ferry_agent::AgentError::GaveUp { last, .. }) => {
                assert!(
                    matches!(
                        last,
                        ferry_agent::ConnectError::Rejected {
                            code: ferry_codec::AuthErrorCode::BasicAuthRequired,
                            ..
                        }
                    ),
                    "{last:?}"
                );
                assert!(last.needs_attention());
            }
            other => panic!("expected the agent to give up, got {other:?}"),
        }

        // With users: served, behind the password.
        agent.basic_auth = vec![htpasswd("alice", "pw")];
        env.agent = Some(spawn_agent(agent));
        env.wait_for_sessions(1).await;
        let path_in_tunnel = format!("/t/{TUNNEL}/");
        assert_eq!(get_from("127.0.0.1", env.gateway_addr, &path_in_tunnel).await.0, 401);
        let right = basic("alice", "pw");
        let (status, _, _) =
            get_from_with("127.0.0.1", env.gateway_addr, &path_in_tunnel, &[("Authorization", &right)]).await;
        assert_eq!(status, 200);
        let _ = std::fs::remove_file(&path);
    })
    .await;
}

/// An HTTP/1.1 upstream behind PROXY protocol v1: each connection starts with the header; each
/// request on it is answered with the client the header named and the request's number on the
/// connection (`127.0.0.2:40000 #2`).
async fn http_upstream_behind_proxy_protocol() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut source = None;
                let mut served = 0;
                loop {
                    if source.is_none()
                        && let Some(end) = buf.windows(2).position(|w| w == b"\r\n")
                    {
                        let line = String::from_utf8(buf[..end].to_vec()).unwrap();
                        let words: Vec<&str> = line.split(' ').collect();
                        assert_eq!(&words[..2], ["PROXY", "TCP4"], "{line}");
                        source = Some(format!("{}:{}", words[2], words[4]));
                        buf.drain(..end + 2);
                    }
                    if let Some(source) = &source
                        && let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n")
                    {
                        buf.drain(..end + 4);
                        served += 1;
                        let body = format!("{source} #{served}");
                        let response =
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                        socket.write_all(response.as_bytes()).await.unwrap();
                        continue;
                    }
                    let n = socket.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_http_upstream_behind_proxy_protocol_hears_each_client_on_its_own_connections() {
    bounded(async {
        let upstream = http_upstream_behind_proxy_protocol().await;
        let env = TestEnv::start_with(GatewayConfig::default(), |agent| {
            let target = format!("127.0.0.1:{},proxy-protocol=v1", upstream.port());
            agent.upstream = Some(ferry_agent::config::Upstream::parse(&target).unwrap());
        })
        .await;
        // A keep-alive client: both its requests go over one upstream connection, whose header
        // names it.
        let mut client = connect_from("127.0.0.2", env.gateway_addr).await;
        let me = client.local_addr().unwrap();
        let path = format!("/t/{TUNNEL}/");
        for n in 1..=2 {
            let request = format!("GET {path} HTTP/1.1\r\nHost: gateway\r\n\r\n");
            client.write_all(request.as_bytes()).await.unwrap();
            let mut response = vec![0u8; 4096];
            let mut got = 0;
            let expected = format!("{me} #{n}");
            while !String::from_utf8_lossy(&response[..got]).ends_with(&expected) {
                let read = client.read(&mut response[got..]).await.unwrap();
                assert!(read > 0, "{}", String::from_utf8_lossy(&response[..got]));
                got += read;
            }
        }
        // Another client never gets that connection, though it sits idle in the agent's pool.
        let (status, body) = get_from("127.0.0.3", env.gateway_addr, &path).await;
        assert_eq!(status, 200);
        assert!(body.starts_with("127.0.0.3:") && body.ends_with(" #1"), "{body}");
    })
    .await;
}
