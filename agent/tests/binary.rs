//! The real `agent` binary, as an operator runs it: the secret from `FERRY_SECRET`, SIGTERM and
//! SIGINT drain and exit 0, a secret source that is configured but empty stops it at start,
//! `--metrics` serves what the agent sees, and the inspector shows requests and stays on loopback.
//! The gateway runs in this process; the upstream is a small hyper server.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_codec::{Secret, TunnelId};
use ferry_gateway::auth::AuthSource;
use ferry_gateway::{Gateway, GatewayConfig};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

const TUNNEL: &str = "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_web";
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// An upstream: `/hold` waits for a permit of the gate (and says it arrived), anything else is
/// `ok`.
async fn upstream(gate: Arc<Semaphore>, arrived: Arc<Notify>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (gate, arrived) = (Arc::clone(&gate), Arc::clone(&arrived));
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let (gate, arrived) = (Arc::clone(&gate), Arc::clone(&arrived));
                    async move {
                        if request.uri().path() == "/hold" {
                            arrived.notify_one();
                            gate.acquire().await.unwrap().forget();
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    addr
}

async fn gateway(config: GatewayConfig) -> (Arc<Gateway>, SocketAddr, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let gateway = Gateway::new(config, stop.clone()).unwrap();
    let serving = Arc::clone(&gateway);
    tokio::spawn(async move { serving.serve(listener).await });
    (gateway, addr, stop)
}

/// The agent binary for `TUNNEL`, serving `upstream` through `gateway`, with `more` flags; its
/// stderr piped, the environment's secret and gateway left out.
fn agent_command(gateway: SocketAddr, upstream: SocketAddr, more: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_agent"));
    command
        .args(["--tunnel-id", TUNNEL, "--upstream", &upstream.to_string()])
        .args(["--gateway", &format!("ws://{gateway}/ws")])
        .args(more)
        .env_remove("FERRY_SECRET")
        .env_remove("GATEWAY_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

fn agent(gateway: SocketAddr, upstream: SocketAddr, secret: Option<&str>) -> Child {
    let mut command = agent_command(gateway, upstream, &["--drain-timeout", "10s"]);
    if let Some(secret) = secret {
        command.env("FERRY_SECRET", secret);
    }
    command.spawn().unwrap()
}

async fn get(url: String) -> (StatusCode, Bytes) {
    let client =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response = client.request(Request::get(url).body(Empty::new()).unwrap()).await.unwrap();
    let status = response.status();
    (status, response.into_body().collect().await.unwrap().to_bytes())
}

fn signal(child: &Child, name: &str) {
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args([&format!("-{name}"), &pid]).status().unwrap().success());
}

#[tokio::test]
async fn the_secret_comes_from_the_environment_and_signals_drain() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let gate = Arc::new(Semaphore::new(0));
        let arrived = Arc::new(Notify::new());
        let up = upstream(Arc::clone(&gate), Arc::clone(&arrived)).await;
        let config = GatewayConfig {
            auth: AuthSource::Shared(Secret::new("from the environment").unwrap()),
            ..GatewayConfig::default()
        };
        let (gateway, addr, _stop) = gateway(config).await;
        let id: TunnelId = TUNNEL.parse().unwrap();
        for signal_name in ["TERM", "INT"] {
            let mut child = agent(addr, up, Some("from the environment"));
            gateway.registry.wait_until(|r| r.of(&id).len() == 1).await;
            let url = format!("http://{addr}/t/{TUNNEL}/hold");
            let held = tokio::spawn(get(url));
            arrived.notified().await;
            let started = Instant::now();
            signal(&child, signal_name);
            // The gateway hears the drain and stops routing to this agent...
            gateway.registry.wait_until(|r| r.of(&id).iter().all(|s| !s.accepts_requests())).await;
            // ...the request in flight completes, and the agent exits 0.
            gate.add_permits(1);
            assert_eq!(held.await.unwrap(), (StatusCode::OK, Bytes::from_static(b"ok")));
            let status = child.wait().await.unwrap();
            println!("SIG{signal_name}: agent drained and exited {status} after {:?}", started.elapsed());
            assert!(status.success(), "SIG{signal_name}: {status}");
            gateway.registry.wait_until(|r| r.of(&id).is_empty()).await;
        }
        // The wrong secret in the environment: refused, and the agent says so.
        let mut child = agent(addr, up, Some("another one"));
        let mut stderr = child.stderr.take().unwrap();
        let mut log = Vec::new();
        let reading = async {
            use tokio::io::AsyncReadExt;
            let mut chunk = [0u8; 4096];
            while !String::from_utf8_lossy(&log).contains("bad_credentials") {
                let n = stderr.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the agent ended without saying why");
                log.extend(&chunk[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(10), reading).await.unwrap();
        assert!(gateway.registry.of(&id).is_empty());
        child.kill().await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_empty_secret_source_stops_the_agent_at_start() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let empty = std::env::temp_dir().join(format!("ferry-empty-secret-{}", std::process::id()));
        std::fs::write(&empty, "\n").unwrap();
        let cases: [(Vec<String>, Option<&str>, &str); 3] = [
            (vec![], Some(""), "FERRY_SECRET"),
            (vec!["--secret-file".into(), empty.display().to_string()], None, "ferry-empty-secret"),
            (vec!["--secret-file".into(), "/nonexistent/secret".into()], None, "/nonexistent/secret"),
        ];
        for (args, env, named) in cases {
            let mut command = Command::new(env!("CARGO_BIN_EXE_agent"));
            command
                .args(["--tunnel-id", TUNNEL, "--upstream", "127.0.0.1:9"])
                .args(&args)
                .env_remove("FERRY_SECRET");
            if let Some(value) = env {
                command.env("FERRY_SECRET", value);
            }
            let output = command.output().await.unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "{args:?} {env:?} started");
            assert!(stderr.contains(named), "{args:?} {env:?}: {stderr}");
        }
        std::fs::remove_file(empty).unwrap();
    })
    .await
    .unwrap();
}

/// `--metrics ADDR` serves the agent's view of its tunnel: upstream times and answers, what it
/// refused itself, its sessions, its upstream's health.
#[tokio::test]
async fn metrics_show_upstream_times_answers_and_sessions() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let up = upstream(Arc::new(Semaphore::new(0)), Arc::new(Notify::new())).await;
        let (gateway, addr, _stop) = gateway(GatewayConfig::default()).await;
        let id: TunnelId = TUNNEL.parse().unwrap();
        let mut command = agent_command(addr, up, &["--allow-method", "GET", "--metrics", "127.0.0.1:0"]);
        let mut child = command.spawn().unwrap();
        // The log says where the metrics are.
        let mut stderr = child.stderr.take().unwrap();
        let metrics_url =
            format!("http://{}/metrics", address_in_log(&mut stderr, "metrics at http://").await);
        gateway.registry.wait_until(|r| r.of(&id).len() == 1).await;
        for _ in 0..3 {
            assert_eq!(get(format!("http://{addr}/t/{TUNNEL}/")).await.0, StatusCode::OK);
        }
        // Refused by the agent itself: not GET.
        let client =
            hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let refused = client
            .request(Request::post(format!("http://{addr}/t/{TUNNEL}/")).body(Empty::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::METHOD_NOT_ALLOWED);

        let (status, body) = get(metrics_url).await;
        assert_eq!(status, StatusCode::OK);
        let text = String::from_utf8(body.to_vec()).unwrap();
        for line in [
            format!("ferry_agent_tunnel{{tunnel=\"{TUNNEL}\"}} 1"),
            format!("ferry_agent_upstream_duration_seconds_count{{tunnel=\"{TUNNEL}\"}} 3"),
            "ferry_agent_upstream_responses_total{class=\"2xx\"} 3".to_owned(),
            "ferry_agent_own_answers_total{code=\"method_not_allowed\"} 1".to_owned(),
            "ferry_agent_sessions_started_total 1".to_owned(),
            "ferry_agent_requests_in_flight 0".to_owned(),
            "ferry_agent_upstream_healthy 1".to_owned(),
            "# EOF".to_owned(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        child.kill().await.unwrap();
    })
    .await
    .unwrap();
}

/// Reads the log until `before` and an address after it; the address.
async fn address_in_log(stderr: &mut tokio::process::ChildStderr, before: &str) -> String {
    let mut log = String::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(at) = log.find(before) {
                let rest = &log[at + before.len()..];
                if let Some(end) = rest.find(|c: char| !(c.is_ascii_alphanumeric() || ".:[]".contains(c))) {
                    return rest[..end].to_owned();
                }
            }
            let n = stderr.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the agent ended: {log}");
            log.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {before:?} in the log: {log}"))
}

/// The inspector is on by default (here on a port of its own), shows the requests, and is
/// refused on an address other than loopback without `--inspect-allow-remote` and a token.
#[tokio::test]
async fn the_inspector_shows_requests_and_stays_on_loopback_unless_told() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let up = upstream(Arc::new(Semaphore::new(0)), Arc::new(Notify::new())).await;
        let (gateway, addr, _stop) = gateway(GatewayConfig::default()).await;
        let id: TunnelId = TUNNEL.parse().unwrap();
        let mut child = agent_command(addr, up, &["--inspect", "127.0.0.1:0"]).spawn().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let inspector = address_in_log(&mut stderr, "inspector at http://").await;
        gateway.registry.wait_until(|r| r.of(&id).len() == 1).await;
        assert_eq!(get(format!("http://{addr}/t/{TUNNEL}/hello?x=1")).await.0, StatusCode::OK);
        let (status, body) = get(format!("http://{inspector}/api/requests")).await;
        assert_eq!(status, StatusCode::OK);
        let list: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(list["requests"][0]["path"], "/hello?x=1", "{list}");
        assert_eq!(list["requests"][0]["response_bytes"], 2, "{list}");
        child.kill().await.unwrap();

        // Refused before anything listens (nothing here binds other than loopback).
        for (flags, token, says) in [
            (&["--inspect", "0.0.0.0:4040"][..], None, "not a loopback address"),
            (&["--inspect", "0.0.0.0:4040", "--inspect-allow-remote"][..], None, "needs a token"),
            (&["--inspect", "nowhere"][..], None, "is not HOST:PORT"),
            (&["--inspect", "10.0.0.1:4040"][..], Some("a token"), "not a loopback address"),
        ] {
            let mut command = agent_command(addr, up, flags);
            if let Some(token) = token {
                command.env("FERRY_INSPECT_TOKEN", token);
            }
            let output = command.output().await.unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "{flags:?} started");
            assert!(stderr.contains(says), "{flags:?}: {stderr}");
        }
    })
    .await
    .unwrap();
}

/// On a terminal (`script` gives the agent one) the agent draws its status screen in place of
/// the scrolling log: the tunnel up, its URL, the inspector, the requests counted.
#[tokio::test]
async fn on_a_terminal_the_agent_draws_its_status_screen() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        if std::process::Command::new("script").arg("--version").output().is_err() {
            assert!(std::env::var_os("FERRY_CI").is_none(), "the console test needs script (util-linux)");
            eprintln!("SKIPPED: no `script` to give the agent a terminal");
            return;
        }
        let up = upstream(Arc::new(Semaphore::new(0)), Arc::new(Notify::new())).await;
        let (gateway, addr, _stop) = gateway(GatewayConfig::default()).await;
        let id: TunnelId = TUNNEL.parse().unwrap();
        let agent = format!(
            "{} --tunnel-id {TUNNEL} --upstream {up} --gateway ws://{addr}/ws --inspect 127.0.0.1:0",
            env!("CARGO_BIN_EXE_agent")
        );
        let mut child = Command::new("script")
            .args(["-qfec", &agent, "/dev/null"])
            .env_remove("FERRY_SECRET")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        gateway.registry.wait_until(|r| r.of(&id).len() == 1).await;
        for _ in 0..2 {
            assert_eq!(get(format!("http://{addr}/t/{TUNNEL}/")).await.0, StatusCode::OK);
        }
        let mut stdout = child.stdout.take().unwrap();
        let mut screen = String::new();
        let drawn = tokio::time::timeout(Duration::from_secs(10), async {
            use tokio::io::AsyncReadExt;
            let mut chunk = [0u8; 4096];
            loop {
                // The last whole screen: after the last "home, clear".
                if let Some(last) = screen.rsplit("\x1b[H\x1b[J").next()
                    && last.contains("in all\r\n")
                    && last.contains("2 in all")
                {
                    return last.to_owned();
                }
                let n = stdout.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the agent ended: {screen}");
                screen.push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no screen with two requests: {screen}"));
        assert!(drawn.contains("Tunnel        up"), "{drawn}");
        assert!(drawn.contains(&format!("Public URL    http://{addr}/t/{TUNNEL}/")), "{drawn}");
        assert!(drawn.contains("Inspector     http://127.0.0.1:"), "{drawn}");
        assert!(drawn.contains("Gateway RTT"), "{drawn}");
        // The log lines are on the screen, not scrolling under it.
        assert!(drawn.contains("public URL"), "{drawn}");
        child.kill().await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn log_format_json_writes_one_object_per_line() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let up = upstream(Arc::new(Semaphore::new(0)), Arc::new(Notify::new())).await;
        let (gateway, addr, _stop) = gateway(GatewayConfig::default()).await;
        let id: TunnelId = TUNNEL.parse().unwrap();
        let mut command = agent_command(addr, up, &["--log-format", "json"]);
        let child = command.env("RUST_LOG", "info").spawn().unwrap();
        gateway.registry.wait_until(|r| r.of(&id).len() == 1).await;
        signal(&child, "TERM");
        let output = child.wait_with_output().await.unwrap();
        let log = String::from_utf8(output.stderr).unwrap();
        let lines: Vec<serde_json::Value> = log
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {line:?}")))
            .collect();
        let public_url = lines
            .iter()
            .find(|line| line["fields"]["message"] == "public URL")
            .unwrap_or_else(|| panic!("no public URL line: {log}"));
        assert_eq!(public_url["level"], "INFO");
        assert!(public_url["fields"]["url"].as_str().unwrap().contains(TUNNEL), "{public_url}");
        assert!(public_url["timestamp"].is_string());

        let bad = std::process::Command::new(env!("CARGO_BIN_EXE_agent"))
            .args(["--tunnel-id", TUNNEL, "--log-format", "xml"])
            .output()
            .unwrap();
        assert!(!bad.status.success());
        assert!(String::from_utf8_lossy(&bad.stderr).contains("text or json"));
    })
    .await
    .unwrap();
}
