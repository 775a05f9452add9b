//! The agent's request inspector, through a real tunnel: requests show up live on the event
//! stream with their heads and bodies, bodies are kept up to the limit while the exchange streams
//! whole, streaming responses and upgrades are shown as they go, the agent's own answers are
//! recorded, and replay (as captured or edited) sends the request to the upstream again.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use common::*;
use ferry_gateway::GatewayConfig;
use http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Value, json};

/// A tunnel whose agent runs the inspector on a loopback port.
struct Inspected {
    env: TestEnv,
    agent: AgentRun,
    inspector: SocketAddr,
}

impl Inspected {
    async fn start(tweak: impl FnOnce(&mut ferry_agent::AgentConfig)) -> Self {
        let env = TestEnv::start_without_agent(GatewayConfig::default()).await;
        let mut config = env.agent_config();
        tweak(&mut config);
        let (agent, inspector) = spawn_agent_with_inspector(config).await;
        env.wait_for_sessions(1).await;
        Self { env, agent, inspector }
    }

    fn api(&self, path: &str) -> String {
        format!("http://{}{path}", self.inspector)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let (response, body) = get(&self.api(path)).await;
        (response.status(), serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    async fn replay(&self, id: u64, edits: &str) -> (StatusCode, Value) {
        let request = Request::post(self.api(&format!("/api/requests/{id}/replay")))
            .header(header::CONTENT_TYPE, "application/json")
            .body(full(edits.to_owned()))
            .unwrap();
        let (response, body) = fetch(&client(), request).await;
        (response.status(), serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    /// The event stream, open.
    async fn events(&self) -> Events {
        let response = send(&client(), Request::get(self.api("/api/events")).body(empty()).unwrap()).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "text/event-stream");
        let mut events = Events { body: response.into_body(), buffer: String::new() };
        assert_eq!(events.next().await.0, "hello");
        events
    }
}

struct Events {
    body: Incoming,
    buffer: String,
}

impl Events {
    /// The next event: its name and data.
    async fn next(&mut self) -> (String, Value) {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if block.starts_with(':') {
                    continue;
                }
                let field = |name: &str| {
                    block
                        .lines()
                        .find_map(|l| l.strip_prefix(name))
                        .map(str::trim)
                        .unwrap_or_default()
                        .to_owned()
                };
                return (field("event:"), serde_json::from_str(&field("data:")).unwrap());
            }
            let frame = self.body.frame().await.expect("the event stream ended").unwrap();
            if let Ok(data) = frame.into_data() {
                self.buffer.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
    }

    /// Events until one of `kind` whose summary satisfies `wanted`.
    async fn until(&mut self, kind: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        loop {
            let (name, data) = self.next().await;
            if name == kind && wanted(&data) {
                return data;
            }
        }
    }
}

#[tokio::test]
async fn a_webhook_shows_up_live_with_its_body_and_replays_as_captured_and_edited() {
    bounded(async {
        let t = Inspected::start(|_| {}).await;
        let mut events = t.events().await;

        let payload = r#"{"event":"invoice.paid","amount":4200}"#;
        let sent = Instant::now();
        let request = Request::post(t.env.url("/echo?source=stripe"))
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-signature", "t=1,v1=abc")
            .body(full(payload))
            .unwrap();
        let (response, body) = fetch(&client(), request).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body, payload);
        let new = events.until("new", |s| s["path"] == "/echo?source=stripe").await;
        println!("the webhook was on the event stream {:?} after it was sent", sent.elapsed());
        let id = new["id"].as_u64().unwrap();
        assert_eq!(new["method"], "POST");
        let done = events.until("update", |s| s["id"] == id && s["phase"] == "complete").await;
        assert_eq!(done["status"], 200);
        assert_eq!(done["request_bytes"], payload.len());
        assert_eq!(done["response_bytes"], payload.len());
        assert_eq!(done["client"], "127.0.0.1");
        assert_eq!(done["upstream"], format!("http://{}", t.env.upstream_addr));

        let (status, detail) = t.get(&format!("/api/requests/{id}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(detail["request"]["body"]["data"], payload);
        assert_eq!(detail["request"]["body"]["complete"], true);
        assert_eq!(detail["response"]["body"]["data"], payload);
        let headers = detail["request"]["headers"].as_array().unwrap();
        assert!(headers.contains(&json!(["x-signature", "t=1,v1=abc"])), "{headers:?}");
        let curl = detail["curl"].as_str().unwrap();
        assert!(curl.starts_with(&format!("curl -X POST 'http://{}/t/", t.env.gateway_addr)), "{curl}");
        assert!(
            curl.contains("-H 'x-signature: t=1,v1=abc'")
                && curl.ends_with(&format!("--data-binary '{payload}'")),
            "{curl}"
        );

        // The list, filtered.
        let (_, list) = t.get("/api/requests?method=post&status=2xx&path=stripe").await;
        assert_eq!(list["requests"].as_array().unwrap().len(), 1);
        let (_, list) = t.get("/api/requests?status=4xx").await;
        assert!(list["requests"].as_array().unwrap().is_empty());

        // Replay as captured: the upstream gets it again; a new record says what it replays.
        let before = t.env.stats.requests.load(Ordering::SeqCst);
        let (status, replayed) = t.replay(id, "{}").await;
        assert_eq!(status, StatusCode::OK, "{replayed}");
        assert_eq!(replayed["replay_of"], id);
        assert_eq!(replayed["status"], 200);
        assert_eq!(replayed["response"]["body"]["data"], payload);
        assert_eq!(t.env.stats.requests.load(Ordering::SeqCst), before + 1);
        events.until("new", |s| s["id"] == replayed["id"] && s["replay_of"] == id).await;

        // Edited: another path, a field added, another body.
        let mut fields = detail["request"]["headers"].as_array().unwrap().clone();
        fields.push(json!(["x-replayed", "yes"]));
        let edits = json!({ "method": "PUT", "path": "/headers", "headers": fields, "body": "changed" });
        let (status, edited) = t.replay(id, &edits.to_string()).await;
        assert_eq!(status, StatusCode::OK, "{edited}");
        let seen: Value = serde_json::from_str(edited["response"]["body"]["data"].as_str().unwrap()).unwrap();
        assert_eq!(seen["method"], "PUT");
        assert!(seen["headers"].as_array().unwrap().contains(&json!(["x-replayed", "yes"])), "{seen}");
        assert_eq!(edited["request"]["body"]["data"], "changed");

        // Bad edits are refused before anything is sent.
        for (edits, code) in [
            (r#"{"method": "NOT A METHOD"}"#, StatusCode::BAD_REQUEST),
            (r#"{"path": "no-slash"}"#, StatusCode::BAD_REQUEST),
            (r#"{"headers": [["bad name", "x"]]}"#, StatusCode::BAD_REQUEST),
            (r#"{"headers": "x"}"#, StatusCode::BAD_REQUEST),
            ("[1]", StatusCode::BAD_REQUEST),
        ] {
            let before = t.env.stats.requests.load(Ordering::SeqCst);
            let (status, answer) = t.replay(id, edits).await;
            assert_eq!(status, code, "{edits}: {answer}");
            assert_eq!(t.env.stats.requests.load(Ordering::SeqCst), before, "{edits}");
        }
        let (status, _) = t.replay(999_999, "{}").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        t.agent.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn bodies_are_kept_up_to_the_limit_while_the_exchange_streams_whole() {
    bounded(async {
        let t = Inspected::start(|config| {
            config.inspect.body_limit = 1024;
            config.inspect.max_requests = 3;
        })
        .await;
        const SIZE: usize = 8 << 20;
        let (response, body) = get(&t.env.url(&format!("/bytes/{SIZE}"))).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body.len(), SIZE);
        let (_, list) = t.get("/api/requests").await;
        let id = list["requests"][0]["id"].as_u64().unwrap();
        let (_, detail) = t.get(&format!("/api/requests/{id}")).await;
        let kept = &detail["response"]["body"];
        assert_eq!(kept["size"], SIZE);
        assert_eq!(kept["kept"], 1024);
        assert_eq!(kept["truncated"], true);
        assert_eq!(kept["complete"], true);
        // The kept bytes are the body's first ones.
        let (response, raw) = get(&t.api(&format!("/api/requests/{id}/response/body"))).await;
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/octet-stream");
        assert_eq!(&raw[..], &body[..1024]);

        // A body larger than what is kept cannot be replayed as captured.
        let request = Request::post(t.env.url("/sink")).body(full(vec![b'x'; 4096])).unwrap();
        let (response, _) = fetch(&client(), request).await;
        assert_eq!(response.status(), StatusCode::OK);
        let (_, list) = t.get("/api/requests?limit=1").await;
        let id = list["requests"][0]["id"].as_u64().unwrap();
        let (status, answer) = t.replay(id, "{}").await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(answer["error"]["code"], "body_not_kept");
        let (status, answer) = t.replay(id, r#"{"body": "small"}"#).await;
        assert_eq!(status, StatusCode::OK, "{answer}");

        // Three kept, the newest; memory within the bound.
        for _ in 0..4 {
            get(&t.env.url("/")).await;
        }
        let (_, list) = t.get("/api/requests").await;
        let ids: Vec<u64> =
            list["requests"].as_array().unwrap().iter().map(|s| s["id"].as_u64().unwrap()).collect();
        assert_eq!(ids.len(), 3);
        assert!(ids.windows(2).all(|w| w[0] > w[1]), "{ids:?}");
        let memory = &list["memory"];
        assert!(
            memory["held_bytes"].as_u64().unwrap() <= memory["bound_bytes"].as_u64().unwrap() + 3 * 4096,
            "{memory}"
        );
        let request = Request::delete(t.api("/api/requests")).body(empty()).unwrap();
        let (response, _) = fetch(&client(), request).await;
        assert_eq!(response.status(), StatusCode::OK);
        let (_, list) = t.get("/api/requests").await;
        assert_eq!(list["memory"]["held_bytes"], 0);
        t.agent.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn server_sent_events_show_as_they_arrive_and_an_upgrade_shows_its_bytes() {
    bounded(async {
        let t = Inspected::start(|_| {}).await;
        let mut events = t.events().await;
        let response =
            send(&client(), Request::get(t.env.url("/sse?n=3&gated=1")).body(empty()).unwrap()).await;
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        // The first event comes at once; each next one when the gate lets it. The record shows
        // each before the next is let out.
        for n in 1..=3u32 {
            if n > 1 {
                t.env.stats.gate.add_permits(1);
            }
            let frame = body.frame().await.unwrap().unwrap();
            assert!(frame.is_data());
            let update = events
                .until("update", |s| {
                    s["path"] == "/sse?n=3&gated=1" && s["response_bytes"].as_u64() > Some(0)
                })
                .await;
            let id = update["id"].as_u64().unwrap();
            let (_, detail) = t.get(&format!("/api/requests/{id}")).await;
            let kept = detail["response"]["body"]["data"].as_str().unwrap().to_owned();
            assert_eq!(kept.matches("data:").count(), n as usize, "{kept}");
        }
        while body.frame().await.is_some() {}

        // A WebSocket through the tunnel: the 101 and the bytes each way once it closes.
        let url = format!("ws://{}/t/{}/ws", t.env.gateway_addr, t.env.tunnel_id);
        let tcp = tokio::net::TcpStream::connect(t.env.gateway_addr).await.unwrap();
        let (mut ws, response) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        use futures_util::{SinkExt, StreamExt};
        ws.send(tokio_tungstenite::tungstenite::Message::Text("hello through the tunnel".into()))
            .await
            .unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap(), "hello through the tunnel");
        // While it is open, its bytes show.
        let open = events
            .until("update", |s| {
                s["path"] == "/ws"
                    && s["duration_ms"].is_null()
                    && s["upgraded"]["from_upstream"].as_u64() > Some(24)
            })
            .await;
        assert_eq!(open["status"], 101);
        ws.close(None).await.unwrap();
        while ws.next().await.is_some() {}
        drop(ws);
        let upgraded = events
            .until("update", |s| {
                s["path"] == "/ws" && s["phase"] == "upgraded" && !s["duration_ms"].is_null()
            })
            .await;
        assert_eq!(upgraded["status"], 101);
        assert!(upgraded["upgraded"]["to_upstream"].as_u64().unwrap() > 24, "{upgraded}");
        assert!(upgraded["upgraded"]["from_upstream"].as_u64().unwrap() > 24, "{upgraded}");
        t.agent.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn the_agents_own_answers_and_failures_are_recorded() {
    bounded(async {
        let t = Inspected::start(|config| {
            config.filters.methods = Some(vec![Method::GET]);
        })
        .await;
        let request = Request::delete(t.env.url("/")).body(empty()).unwrap();
        let (response, _) = fetch(&client(), request).await;
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        let (_, list) = t.get("/api/requests?status=4xx").await;
        let refused = &list["requests"][0];
        assert_eq!(refused["method"], "DELETE");
        assert_eq!(refused["phase"], "failed");
        assert_eq!(refused["error"]["code"], "method_not_allowed", "{refused}");
        t.agent.stop().await.unwrap();

        // An upstream that is not there.
        let t = Inspected::start(|config| {
            config.upstream =
                Some(ferry_agent::config::Upstream::parse(&closed_port_now().to_string()).unwrap());
        })
        .await;
        let (response, _) = get(&t.env.url("/")).await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        let (_, list) = t.get("/api/requests").await;
        assert_eq!(list["requests"][0]["error"]["code"], "upstream_unreachable", "{list}");
        t.agent.stop().await.unwrap();
    })
    .await;
}

/// A loopback port nothing listens on (bound, then let go).
fn closed_port_now() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_from_the_binary() {
    bounded(async {
        let t = Inspected::start(|_| {}).await;
        let (response, page) = get(&t.api("/")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            response.headers()[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .contains("default-src 'self'")
        );
        let page = String::from_utf8(page.to_vec()).unwrap();
        for asset in ["inspector.js", "inspector.css"] {
            assert!(page.contains(asset), "{asset}");
            let (response, body) = get(&t.api(&format!("/{asset}"))).await;
            assert_eq!(response.status(), StatusCode::OK, "{asset}");
            assert!(!body.is_empty());
        }
        // Another Host (a DNS name pointing here) is refused.
        let request = Request::get(t.api("/api/requests"))
            .header(header::HOST, "attacker.example")
            .body(empty())
            .unwrap();
        let (response, _) = fetch(&client(), request).await;
        assert_eq!(response.status(), StatusCode::MISDIRECTED_REQUEST);
        let (status, _) = t.get("/nothing-here").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        t.agent.stop().await.unwrap();
    })
    .await;
}
