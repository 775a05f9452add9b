//! The inspector's page in a real browser: headless Chromium, driven over the DevTools protocol,
//! watches the page while requests go through a real tunnel. The list updates without a reload,
//! the detail view shows the webhook's body, and replay adds an exchange with the upstream's
//! answer. A screenshot is kept as `target/inspector.png`.
//!
//! Without `chromium` this test says so and returns; under `.ci/run` (which installs it and sets
//! `FERRY_CI`) it fails instead.
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use ferry_gateway::GatewayConfig;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode, header};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// Headless Chromium with a profile of its own; killed, and its profile removed, on drop.
struct Browser {
    child: Child,
    profile: std::path::PathBuf,
    devtools: SocketAddr,
}

impl Browser {
    async fn start() -> Option<Self> {
        let binary = std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".to_owned());
        if std::process::Command::new(&binary).arg("--version").output().is_err() {
            assert!(
                std::env::var_os("FERRY_CI").is_none(),
                "the browser test needs Chromium: apt-get install -y chromium"
            );
            eprintln!("SKIPPED: no Chromium ({binary}); apt-get install -y chromium");
            return None;
        }
        let profile = std::env::temp_dir().join(format!("ferry-chromium-{}", std::process::id()));
        let mut child = Command::new(binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-extensions",
                "--disable-sync",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,800",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // Readiness: Chromium says where its DevTools endpoint is.
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let devtools = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(rest) = line.strip_prefix("DevTools listening on ws://") {
                    let addr = rest.split('/').next().unwrap();
                    return addr.parse::<SocketAddr>().unwrap();
                }
            }
            panic!("Chromium ended before its DevTools endpoint was up");
        })
        .await
        .expect("Chromium's DevTools endpoint");
        // The rest of its log is drained, so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Some(Self { child, profile, devtools })
    }

    /// A new tab at `url`, and a DevTools connection to it.
    async fn open(&self, url: &str) -> Page {
        let request = Request::put(format!("http://{}/json/new?{url}", self.devtools)).body(empty()).unwrap();
        let (response, body) = fetch(&client(), request).await;
        assert_eq!(response.status(), StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let target: Value = serde_json::from_slice(&body).unwrap();
        let ws_url = target["webSocketDebuggerUrl"].as_str().unwrap();
        let tcp = TcpStream::connect(self.devtools).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(ws_url, tcp).await.unwrap();
        Page { ws, next_id: 0 }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// One tab, over the DevTools protocol.
struct Page {
    ws: WebSocketStream<TcpStream>,
    next_id: u64,
}

impl Page {
    /// Sends a command and waits for its answer (events in between are let go).
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let command = json!({ "id": id, "method": method, "params": params });
        self.ws.send(Message::Text(command.to_string().into())).await.unwrap();
        loop {
            let message = self.ws.next().await.expect("DevTools connection open").unwrap();
            let Message::Text(text) = message else { continue };
            let value: Value = serde_json::from_str(&text).unwrap();
            if value["id"] == id {
                assert!(value.get("error").is_none(), "{method}: {value}");
                return value["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression in the page.
    async fn eval(&mut self, expression: &str) -> Value {
        let params = json!({ "expression": expression, "returnByValue": true, "awaitPromise": true });
        let result = self.call("Runtime.evaluate", params).await;
        assert!(result.get("exceptionDetails").is_none(), "{expression}: {result}");
        result["result"]["value"].clone()
    }

    /// Waits until `expression` is true in the page (an exception counts as not yet: the page
    /// may still be loading); how long it took.
    async fn until(&mut self, expression: &str) -> Duration {
        let started = Instant::now();
        loop {
            let params = json!({ "expression": expression, "returnByValue": true });
            let result = self.call("Runtime.evaluate", params).await;
            if result["result"]["value"] == Value::Bool(true) {
                return started.elapsed();
            }
            assert!(started.elapsed() < Duration::from_secs(20), "never true: {expression}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn the_page_updates_live_shows_the_body_and_replays_with_one_click() {
    bounded(async {
        let Some(browser) = Browser::start().await else { return };
        let env = TestEnv::start_without_agent(GatewayConfig::default()).await;
        let (agent, inspector) = spawn_agent_with_inspector(env.agent_config()).await;
        env.wait_for_sessions(1).await;

        let mut page = browser.open(&format!("http://{inspector}/")).await;
        let viewport = json!({ "width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": false });
        page.call("Emulation.setDeviceMetricsOverride", viewport).await;
        page.until("document.readyState === 'complete' && document.getElementById('live').textContent === 'live'")
            .await;
        assert_eq!(page.eval("document.querySelectorAll('#requests tbody tr').length").await, 0);

        // A webhook through the tunnel: its row appears without a reload.
        let payload = json!({ "event": "invoice.paid", "invoice": "in_1042", "amount": 4200 }).to_string();
        let sent = Instant::now();
        let request = Request::post(env.url("/echo?hook=billing"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(full(payload.clone()))
            .unwrap();
        let (response, _) = fetch(&client(), request).await;
        assert_eq!(response.status(), StatusCode::OK);
        page.until("[...document.querySelectorAll('#requests tbody tr')].some(r => r.textContent.includes('/echo?hook=billing') && r.querySelector('.status').textContent === '200')").await;
        println!("the webhook's row was on the page {:?} after it was sent", sent.elapsed());
        // Still the page first loaded: no navigation happened.
        assert_eq!(page.eval("performance.getEntriesByType('navigation').length").await, 1);

        // Its detail: the body, pretty-printed JSON.
        page.eval("document.querySelector('#requests tbody tr').click(), true").await;
        page.until("document.getElementById('original').textContent.includes('\"invoice\": \"in_1042\"')").await;
        let curl = page.eval("document.getElementById('curl').textContent").await;
        assert!(curl.as_str().unwrap().starts_with("curl -X POST"), "{curl}");

        // Replay with one click: a new exchange beside the old one, with the upstream's answer.
        let before = env.stats.requests.load(Ordering::SeqCst);
        page.eval("document.getElementById('replay').click(), true").await;
        page.until("!document.getElementById('replayed').hidden && document.getElementById('replayed').textContent.includes('→ 200') && document.getElementById('replayed').textContent.includes('in_1042')").await;
        assert_eq!(env.stats.requests.load(Ordering::SeqCst), before + 1);
        page.until("document.querySelectorAll('#requests tbody tr.replay').length === 1").await;

        // What the records hold is on the page too.
        page.until("document.getElementById('memory').textContent.startsWith('2 kept')").await;

        // The screenshot, for the README.
        let shot = page.call("Page.captureScreenshot", json!({ "format": "png" })).await;
        let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/inspector.png");
        std::fs::write(&path, &png).unwrap();
        println!("screenshot: {} ({} bytes)", path.display(), png.len());
        agent.stop().await.unwrap();
    })
    .await;
}
