//! Requests through the tunnel behave like requests to the upstream directly: methods, statuses,
//! headers, bodies, trailers, HTTP/2 clients, Host routing; and the gateway's own errors are JSON.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use ferry_gateway::GatewayConfig;
use http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Headers that legitimately differ between two responses of the same upstream.
const VOLATILE: [&str; 2] = ["date", "connection"];

#[tokio::test]
async fn methods_match_the_upstream_reached_directly() {
    bounded(async {
        let env = TestEnv::start().await;
        let client = client();
        let cases = [
            (Method::GET, "/", ""),
            (Method::GET, "/bytes/100000", ""),
            (Method::GET, "/status/204", ""),
            (Method::GET, "/status/418", ""),
            (Method::GET, "/cookies", ""),
            (Method::HEAD, "/bytes/5000", ""),
            (Method::POST, "/echo", "posted body"),
            (Method::PUT, "/echo", "put body"),
            (Method::POST, "/sink", "some bytes to hash"),
            (Method::DELETE, "/nope", ""),
        ];
        for (method, path, body) in cases {
            let request = |url: String| {
                Request::builder().method(method.clone()).uri(url).body(full(body.to_owned())).unwrap()
            };
            let (direct, direct_body) = fetch(&client, request(env.direct_url(path))).await;
            let (tunnel, tunnel_body) = fetch(&client, request(env.url(path))).await;
            assert_eq!(tunnel.status(), direct.status(), "{method} {path}");
            assert_eq!(tunnel_body, direct_body, "{method} {path}");
            let fields = |r: &http::Response<()>| -> Vec<(String, String)> {
                r.headers()
                    .iter()
                    .filter(|(n, _)| !VOLATILE.contains(&n.as_str()))
                    .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
                    .collect()
            };
            assert_eq!(fields(&tunnel), fields(&direct), "{method} {path}");
        }
    })
    .await;
}

#[tokio::test]
async fn repeated_headers_order_and_status_are_preserved() {
    bounded(async {
        let env = TestEnv::start().await;
        let (response, _) = get(&env.url("/cookies")).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let cookies: Vec<_> = response.headers().get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; Path=/", "b=2; HttpOnly"]);
        let multi: Vec<_> = response.headers().get_all("x-multi").iter().collect();
        assert_eq!(multi, ["one", "two"]);
        let names: Vec<_> = response.headers().keys().map(|k| k.as_str()).collect();
        let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
        assert!(pos("content-type") < pos("set-cookie") && pos("set-cookie") < pos("x-first"));
    })
    .await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_and_forwarding_headers_added() {
    bounded(async {
        let env = TestEnv::start().await;
        let request = Request::get(env.url("/headers?x=1"))
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "secret")
            .header("keep-alive", "timeout=5")
            .header("proxy-authorization", "Basic Zm9vOmJhcg==")
            .header("x-forwarded-for", "198.51.100.9")
            .header("X-Custom", "Kept")
            .body(empty())
            .unwrap();
        let (response, body) = fetch(&client(), request).await;
        assert_eq!(response.status(), StatusCode::OK);
        let seen = json(&body);
        assert_eq!(seen["target"], "/headers?x=1", "path routing strips /t/{{id}}");
        let headers: Vec<(String, String)> = serde_json::from_value(seen["headers"].clone()).unwrap();
        let get = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        for hop in ["x-hop", "keep-alive", "proxy-authorization"] {
            assert_eq!(get(hop), None, "{hop} must not be forwarded");
        }
        assert_eq!(get("connection"), None);
        assert_eq!(get("x-custom"), Some("Kept"));
        assert_eq!(get("x-forwarded-for"), Some("198.51.100.9, 127.0.0.1"));
        assert_eq!(get("x-forwarded-proto"), Some("http"));
        let gateway_host = env.gateway_addr.to_string();
        assert_eq!(get("x-forwarded-host"), Some(gateway_host.as_str()));
        assert_eq!(get("host"), Some(gateway_host.as_str()));
        assert!(get("forwarded").unwrap().contains("for=127.0.0.1;proto=http"));
        assert!(get("via").unwrap().starts_with("1.1 ferry-"));
    })
    .await;
}

#[tokio::test]
async fn chunked_responses_and_trailers_pass_through() {
    bounded(async {
        let env = TestEnv::start().await;
        let (response, body) = get(&env.url("/chunked/300000?chunk=1000")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers().get(header::CONTENT_LENGTH).is_none());
        assert_eq!(body.len(), 300_000);
        assert!(body.iter().enumerate().all(|(i, b)| *b == ferry_benches::upstream::pattern_byte(i as u64)));

        // Trailers reach an HTTP/1.1 client that says it accepts them, and an HTTP/2 client.
        for client in [client(), h2c_client()] {
            let request = Request::get(env.url("/trailers")).header("te", "trailers").body(empty()).unwrap();
            let response = send(&client, request).await;
            let collected = response.into_body().collect().await.unwrap();
            let trailers = collected.trailers().cloned().expect("trailers arrive");
            assert_eq!(trailers["x-checksum"], "abc123");
            assert_eq!(collected.to_bytes(), "body before trailers");
        }
    })
    .await;
}

#[tokio::test]
async fn http2_clients_work() {
    bounded(async {
        let env = TestEnv::start().await;
        let client = h2c_client();
        let (response, body) =
            fetch(&client, Request::get(env.url("/bytes/70000")).body(empty()).unwrap()).await;
        assert_eq!(response.version(), http::Version::HTTP_2);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body.len(), 70_000);
        let request = Request::post(env.url("/echo")).body(full("over h2")).unwrap();
        let (response, body) = fetch(&client, request).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body, "over h2");
        // h2 has no Host header: the upstream still gets one, from :authority.
        let (_, body) = fetch(&client, Request::get(env.url("/headers")).body(empty()).unwrap()).await;
        let headers: Vec<(String, String)> = serde_json::from_value(json(&body)["headers"].clone()).unwrap();
        assert!(headers.iter().any(|(n, v)| n == "host" && *v == env.gateway_addr.to_string()));
    })
    .await;
}

#[tokio::test]
async fn host_routing_by_dns_label() {
    bounded(async {
        let config = GatewayConfig { domain: Some("tunnel.test".into()), ..GatewayConfig::default() };
        let env = TestEnv::start_with(config, |_| {}).await;
        let host =
            format!("{}.Tunnel.Test:{}", env.tunnel_id.to_label().to_uppercase(), env.gateway_addr.port());
        let request = Request::get(format!("http://{}/headers?q=2", env.gateway_addr))
            .header(header::HOST, host.as_str())
            .body(empty())
            .unwrap();
        let (response, body) = fetch(&client(), request).await;
        assert_eq!(response.status(), StatusCode::OK);
        let seen = json(&body);
        assert_eq!(seen["target"], "/headers?q=2", "Host routing keeps the path");

        let request = Request::get(format!("http://{}/", env.gateway_addr))
            .header(header::HOST, "agent-00000000-0000-0000-0000-000000000000-none.tunnel.test")
            .body(empty())
            .unwrap();
        let (response, body) = fetch(&client(), request).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(json(&body)["error"]["code"], "tunnel_not_found");
    })
    .await;
}

#[tokio::test]
async fn unknown_tunnel_and_bad_ids_get_json_errors() {
    bounded(async {
        let env = TestEnv::start().await;
        let other = format!("http://{}/t/agent_11111111-2222-3333-4444-555555555555_api/x", env.gateway_addr);
        let (response, body) = get(&other).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let error = json(&body);
        assert_eq!(error["error"]["code"], "tunnel_not_found");
        assert!(error["error"]["message"].as_str().unwrap().len() > 5);
        assert!(!error["request_id"].as_str().unwrap().is_empty());

        let (response, body) = get(&format!("http://{}/t/not-a-tunnel/x", env.gateway_addr)).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(json(&body)["error"]["code"], "invalid_tunnel_id");

        let (response, body) = get(&format!("http://{}/nothing-here", env.gateway_addr)).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(json(&body)["error"]["code"], "not_found");
    })
    .await;
}

#[tokio::test]
async fn upstream_down_is_a_fast_502() {
    bounded(async {
        let dead = closed_port().await;
        let env = TestEnv::start_with(GatewayConfig::default(), |config| {
            config.upstream = Some(ferry_agent::config::Upstream::parse(&dead.to_string()).unwrap());
        })
        .await;
        let started = Instant::now();
        let (response, body) = get(&env.url("/")).await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(json(&body)["error"]["code"], "upstream_unreachable");
        // Not a timeout: a refused connection is reported at once (the timeouts are 55-60 s).
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    })
    .await;
}

#[tokio::test]
async fn gateway_pages_answer() {
    bounded(async {
        let env = TestEnv::start().await;
        let (response, body) = get(&format!("http://{}/", env.gateway_addr)).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(json(&body)["status"], "ok");
        assert_eq!(json(&body)["sessions"], 1);

        // Traffic both ways first: a session is listed when the agent's control stream opens,
        // which can be before the gateway's first frame to the agent has been written.
        assert_eq!(get(&env.url("/bytes/1")).await.0.status(), StatusCode::OK);
        let (response, body) = get(&format!("http://{}/connections", env.gateway_addr)).await;
        assert_eq!(response.status(), StatusCode::OK);
        let sessions = json(&body)["sessions"].clone();
        let session = &sessions[0];
        assert_eq!(session["tunnel_id"], env.tunnel_id.as_str());
        assert!(session["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(session["connected_since"].as_str().unwrap().ends_with('Z'));
        assert_eq!(session["in_flight"], 0);
        assert!(session["bytes_to_agent"].as_u64().unwrap() > 0);
        assert!(session["bytes_from_agent"].as_u64().unwrap() > 0);

        let (_, body) = get(&format!("http://{}/connections/{}", env.gateway_addr, env.tunnel_id)).await;
        assert_eq!(json(&body)["sessions"].as_array().unwrap().len(), 1);
    })
    .await;
}

/// Sends raw `request` bytes and returns the status line's code (`0`: closed without answer).
async fn raw_status(env: &TestEnv, request: &str) -> u16 {
    let mut socket = tokio::net::TcpStream::connect(env.gateway_addr).await.unwrap();
    // The gateway may answer (and close) before it has read everything we send.
    let _ = socket.write_all(request.as_bytes()).await;
    let mut answer = vec![0u8; 4096];
    let mut n = 0;
    while n < 12 {
        match socket.read(&mut answer[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(read) => n += read,
        }
    }
    std::str::from_utf8(&answer[..n]).ok().and_then(|a| a.get(9..12)?.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn oversized_request_headers_get_431() {
    bounded(async {
        let env = TestEnv::start().await;
        // --max-headers 100 (the default), counted with Host: 95 and 100 pass, 101 does not.
        let with_fields = |n: usize| {
            let fields: String = (1..n).map(|i| format!("X-F{i}: v\r\n")).collect();
            format!("GET / HTTP/1.1\r\nHost: a\r\n{fields}\r\n")
        };
        assert_eq!(raw_status(&env, &with_fields(95)).await, 200);
        assert_eq!(raw_status(&env, &with_fields(100)).await, 200);
        assert_eq!(raw_status(&env, &with_fields(101)).await, 431);

        // --max-header-bytes 64 KiB: a head just under it goes all the way to the upstream, one
        // just over it gets 431 from the gateway.
        let with_bytes = |n: usize| {
            let prefix = format!("GET /t/{}/headers HTTP/1.1\r\nHost: a\r\nX-Big: ", env.tunnel_id);
            let value = "x".repeat(n - prefix.len() - 4);
            format!("{prefix}{value}\r\n\r\n")
        };
        assert_eq!(raw_status(&env, &with_bytes(63 * 1024)).await, 200);
        assert_eq!(raw_status(&env, &with_bytes(65 * 1024)).await, 431);
        assert_eq!(raw_status(&env, &with_bytes(100 * 1024)).await, 431);
        assert_eq!(
            env.stats.requests.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "only the one under the limit"
        );
    })
    .await;
}

/// Reads from `socket` until `until` holds for what arrived (or the connection closes).
async fn read_until(socket: &mut tokio::net::TcpStream, until: impl Fn(&str) -> bool) -> String {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !until(&String::from_utf8_lossy(&got)) {
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn expect_100_continue_is_answered_when_the_body_is_wanted() {
    bounded(async {
        let env = TestEnv::start().await;
        let mut socket = tokio::net::TcpStream::connect(env.gateway_addr).await.unwrap();
        let head = format!(
            "POST /t/{}/echo HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
            env.tunnel_id
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        // The client holds its body back until told to send it.
        let interim = read_until(&mut socket, |got| got.contains("\r\n\r\n")).await;
        assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
        socket.write_all(b"hello").await.unwrap();
        let answer = read_until(&mut socket, |got| got.ends_with("hello")).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");

        // A request refused before its body is wanted gets its answer without the `100`, and
        // the connection closes after it (the body may still come).
        let mut socket = tokio::net::TcpStream::connect(env.gateway_addr).await.unwrap();
        let head = "POST /t/agent_22222222-3333-4444-5555-666666666666_gone/x HTTP/1.1\r\nHost: a\r\n\
                    Expect: 100-continue\r\nContent-Length: 5\r\n\r\n";
        socket.write_all(head.as_bytes()).await.unwrap();
        let answer = read_until(&mut socket, |_| false).await;
        assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");
        assert!(!answer.contains("100 Continue"), "{answer}");
    })
    .await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    bounded(async {
        let env = TestEnv::start().await;
        let mut socket = tokio::net::TcpStream::connect(env.gateway_addr).await.unwrap();
        let id = &env.tunnel_id;
        let requests = format!(
            "GET /t/{id}/bytes/3 HTTP/1.1\r\nHost: a\r\n\r\n\
             POST /t/{id}/echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n4\r\necho\r\n0\r\n\r\n\
             GET /t/{id}/bytes/5 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        );
        socket.write_all(requests.as_bytes()).await.unwrap();
        let answer = read_until(&mut socket, |_| false).await;
        let statuses: Vec<_> = answer.match_indices("HTTP/1.1 ").map(|(at, _)| &answer[at + 9..at + 12]).collect();
        assert_eq!(statuses, ["200", "200", "200"], "{answer}");
        let echo = answer.find("echo").expect("the echoed body");
        assert!(answer.find("content-length: 3").unwrap() < echo, "{answer}");
        assert!(answer.rfind("content-length: 5").unwrap() > echo, "{answer}");
        assert!(answer.contains("connection: close"), "{answer}");
    })
    .await;
}

#[tokio::test]
async fn http10_clients_keep_alive_only_when_they_ask() {
    bounded(async {
        let env = TestEnv::start().await;
        let mut socket = tokio::net::TcpStream::connect(env.gateway_addr).await.unwrap();
        let request = format!("GET /t/{}/bytes/5 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", env.tunnel_id);
        for _ in 0..2 {
            socket.write_all(request.as_bytes()).await.unwrap();
            let answer = read_until(&mut socket, |got| {
                got.contains("\r\n\r\n") && got.len() >= got.find("\r\n\r\n").unwrap() + 9
            })
            .await;
            assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
            assert!(answer.contains("connection: keep-alive\r\n"), "{answer}");
            assert!(answer.contains("content-length: 5\r\n"), "{answer}");
        }
        // Without asking, the connection closes after the answer.
        let mut socket = tokio::net::TcpStream::connect(env.gateway_addr).await.unwrap();
        let request = format!("GET /t/{}/bytes/5 HTTP/1.0\r\n\r\n", env.tunnel_id);
        socket.write_all(request.as_bytes()).await.unwrap();
        let answer = read_until(&mut socket, |_| false).await;
        assert!(
            answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.contains("connection: close\r\n"),
            "{answer}"
        );
    })
    .await;
}
