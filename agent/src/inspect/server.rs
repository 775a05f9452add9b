//! The inspector's web server: the page (assets compiled into the binary) and the JSON API it
//! uses, which scripts may use too.
//!
//! - `GET /api/requests` — the kept records, newest first (`?status=2xx|404`, `?method=`,
//!   `?path=` (a substring), `?limit=`), with what they hold in memory.
//! - `GET /api/requests/{id}` — one record whole: heads, kept bodies, a `curl` line.
//! - `GET /api/requests/{id}/request/body`, `.../response/body` — a kept body's bytes.
//! - `POST /api/requests/{id}/replay` — sends the request again (a JSON object may change its
//!   `method`, `path`, `headers` and `body` / `body_base64`); answers with the new record.
//! - `DELETE /api/requests` — forgets every record.
//! - `GET /api/events` — server-sent events: `new` and `update` with a record's summary.
//!
//! Only loopback clients are served, unless the agent was told to allow others: they then
//! present the token (`Authorization: Bearer`, or `?token=` for the page and its event stream).
//! Requests whose `Host` is not the inspector's own address are refused, so a web page cannot
//! reach it through a DNS name that points to 127.0.0.1 (DNS rebinding); a `POST` must be JSON,
//! which a cross-site form cannot send without the browser asking first.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::{Event, Inspector, Side};
use crate::upstream::{Forwarder, Replay};

const PAGE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("page.js");
const STYLE: &str = include_str!("page.css");
/// Largest replay request the API reads (its edited body included).
const MAX_REPLAY_REQUEST: usize = 16 << 20;
/// A comment on an idle event stream this often keeps proxies and browsers from closing it.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

type Body = BoxBody<Bytes, Infallible>;

/// Serves the inspector on `listener` until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    inspector: Arc<Inspector>,
    forwarder: Arc<Forwarder>,
    shutdown: CancellationToken,
) {
    let Ok(local) = listener.local_addr() else { return };
    info!("inspector at http://{local}");
    let site = Arc::new(Site { inspector: Arc::clone(&inspector), forwarder, local });
    let connections = TaskTracker::new();
    // Progress held back by the throttle goes out a moment later.
    let flusher = {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(super::PROGRESS_EVERY);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = ticks.tick() => inspector.flush(),
                }
            }
        })
    };
    loop {
        let (socket, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(%err, "inspector: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let site = Arc::clone(&site);
        let stop = shutdown.clone();
        connections.spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let site = Arc::clone(&site);
                let stop = stop.clone();
                async move { Ok::<_, Infallible>(site.answer(request, peer, stop).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(socket), service);
            if let Err(err) = conn.await {
                debug!(%err, "inspector connection failed");
            }
        });
    }
    connections.close();
    let _ = flusher.await;
}

struct Site {
    inspector: Arc<Inspector>,
    forwarder: Arc<Forwarder>,
    local: SocketAddr,
}

impl Site {
    async fn answer(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
        stop: CancellationToken,
    ) -> Response<Body> {
        let (parts, body) = request.into_parts();
        if let Err(refusal) = admit(&parts, peer, self.local, self.inspector.config().token.as_ref()) {
            return refusal.response();
        }
        let request = Request::from_parts(parts, body);
        let path = request.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (request.method(), segments.as_slice()) {
            (&Method::GET, [""]) => asset(PAGE, "text/html; charset=utf-8"),
            (&Method::GET, ["inspector.js"]) => asset(SCRIPT, "text/javascript; charset=utf-8"),
            (&Method::GET, ["inspector.css"]) => asset(STYLE, "text/css; charset=utf-8"),
            (&Method::GET, ["api", "requests"]) => self.list(request.uri().query().unwrap_or("")),
            (&Method::DELETE, ["api", "requests"]) => {
                self.inspector.clear();
                json_response(StatusCode::OK, &json!({ "cleared": true }))
            }
            (&Method::GET, ["api", "events"]) => self.events(stop),
            (&Method::GET, ["api", "requests", id]) => match self.entry(id) {
                Ok(entry) => {
                    json_response(StatusCode::OK, &entry.detail(self.inspector.public_url().as_deref()))
                }
                Err(missing) => missing.response(),
            },
            (&Method::GET, ["api", "requests", id, side @ ("request" | "response"), "body"]) => {
                let side = if *side == "request" { Side::Request } else { Side::Response };
                match self.entry(id) {
                    Ok(entry) => raw_body(entry.body(side)),
                    Err(missing) => missing.response(),
                }
            }
            (&Method::POST, ["api", "requests", id, "replay"]) => {
                let id = id.to_string();
                self.replay(&id, request).await
            }
            (_, ["api", ..]) => error(StatusCode::NOT_FOUND, "not_found", "no such API path"),
            _ => error(StatusCode::NOT_FOUND, "not_found", "no such page: try /"),
        }
    }

    fn entry(&self, id: &str) -> Result<Arc<super::Entry>, Refused> {
        id.parse().ok().and_then(|id| self.inspector.get(id)).ok_or(Refused(
            StatusCode::NOT_FOUND,
            "no_such_request",
            "no such request (or no longer kept)",
        ))
    }

    fn list(&self, query: &str) -> Response<Body> {
        let status = query_value(query, "status");
        let method = query_value(query, "method").map(|m| m.to_ascii_uppercase());
        let path = query_value(query, "path");
        let limit = query_value(query, "limit").and_then(|l| l.parse().ok()).unwrap_or(usize::MAX);
        let requests: Vec<Value> = self
            .inspector
            .list()
            .iter()
            .map(|entry| entry.summary())
            .filter(|summary| status.as_deref().is_none_or(|wanted| status_matches(summary, wanted)))
            .filter(|summary| method.as_deref().is_none_or(|wanted| summary["method"] == wanted))
            .filter(|summary| {
                path.as_deref()
                    .is_none_or(|wanted| summary["path"].as_str().is_some_and(|p| p.contains(wanted)))
            })
            .take(limit)
            .collect();
        json_response(StatusCode::OK, &json!({ "requests": requests, "memory": self.memory() }))
    }

    fn memory(&self) -> Value {
        let config = self.inspector.config();
        json!({
            "held_bytes": self.inspector.held(),
            "bound_bytes": self.inspector.bound(),
            "max_requests": config.max_requests,
            "body_limit": config.body_limit,
            "kept": self.inspector.list().len(),
        })
    }

    fn events(&self, stop: CancellationToken) -> Response<Body> {
        let receiver = self.inspector.subscribe();
        let inspector = Arc::clone(&self.inspector);
        let hello = format!("event: hello\ndata: {}\n\n", json!({ "memory": self.memory() }));
        let state = (receiver, inspector, stop, Some(hello));
        let stream = futures_util::stream::unfold(
            state,
            |(mut receiver, inspector, stop, hello)| async move {
                if let Some(hello) = hello {
                    return Some((
                        Ok(http_body::Frame::data(Bytes::from(hello))),
                        (receiver, inspector, stop, None),
                    ));
                }
                loop {
                    let event = tokio::select! {
                        () = stop.cancelled() => return None,
                        () = tokio::time::sleep(KEEP_ALIVE) => {
                            return Some((Ok(http_body::Frame::data(Bytes::from_static(b": keep-alive\n\n"))), (receiver, inspector, stop, None)));
                        }
                        event = receiver.recv() => event,
                    };
                    let text = match event {
                        Ok(Event::New(id) | Event::Update(id)) => {
                            let kind = if matches!(event, Ok(Event::New(_))) { "new" } else { "update" };
                            let Some(entry) = inspector.get(id) else { continue };
                            format!("event: {kind}\ndata: {}\n\n", entry.summary())
                        }
                        // Too slow a reader: it missed events and should list again.
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            "event: resync\ndata: {}\n\n".to_owned()
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    };
                    return Some((
                        Ok(http_body::Frame::data(Bytes::from(text))),
                        (receiver, inspector, stop, None),
                    ));
                }
            },
        );
        let mut response = Response::new(StreamBody::new(stream).boxed());
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }

    async fn replay(&self, id: &str, request: Request<Incoming>) -> Response<Body> {
        let entry = match self.entry(id) {
            Ok(entry) => entry,
            Err(missing) => return missing.response(),
        };
        let body = match Limited::new(request.into_body(), MAX_REPLAY_REQUEST).collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) => {
                return error(StatusCode::PAYLOAD_TOO_LARGE, "too_large", "the replay request is too large");
            }
        };
        let edits: Value = if body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            match serde_json::from_slice(&body) {
                Ok(value @ Value::Object(_)) => value,
                _ => return error(StatusCode::BAD_REQUEST, "bad_json", "send a JSON object"),
            }
        };
        let replay = match edited(&entry, &edits) {
            Ok(replay) => replay,
            Err((status, code, message)) => return error(status, code, &message),
        };
        match crate::upstream::replay(&self.forwarder, &self.inspector, entry.id, replay).await {
            Ok(new) => match self.inspector.get(new) {
                Some(entry) => {
                    json_response(StatusCode::OK, &entry.detail(self.inspector.public_url().as_deref()))
                }
                None => json_response(StatusCode::OK, &json!({ "id": new })),
            },
            Err(message) => error(StatusCode::BAD_REQUEST, "bad_request", &message),
        }
    }
}

/// Loopback only (or the token); the inspector's own `Host` (any, for a remote client with the
/// token); JSON for a `POST`.
fn admit(
    request: &http::request::Parts,
    peer: SocketAddr,
    local: SocketAddr,
    token: Option<&ferry_codec::Secret>,
) -> Result<(), Refused> {
    let host = request.headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let own_host = match host.rsplit_once(':') {
        Some((name, port)) => {
            port.parse() == Ok(local.port())
                && (matches!(name, "localhost" | "127.0.0.1" | "[::1]")
                    || name.trim_start_matches('[').trim_end_matches(']').parse() == Ok(local.ip()))
        }
        None => false,
    };
    if !peer.ip().is_loopback() {
        let Some(token) = token else {
            return Err(Refused(
                StatusCode::FORBIDDEN,
                "not_loopback",
                "the inspector serves loopback clients only",
            ));
        };
        let presented = request
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .map(<[u8]>::to_vec)
            .or_else(|| query_value(request.uri.query().unwrap_or(""), "token").map(String::into_bytes))
            .unwrap_or_default();
        if !bool::from(presented.ct_eq(token.expose())) {
            return Err(Refused(StatusCode::UNAUTHORIZED, "unauthorized", "give the inspector token"));
        }
    } else if !own_host {
        return Err(Refused(
            StatusCode::MISDIRECTED_REQUEST,
            "wrong_host",
            "the inspector answers only to its own address (127.0.0.1 or localhost and its port)",
        ));
    }
    if request.method == Method::POST {
        let json = request
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().to_ascii_lowercase().starts_with("application/json"));
        if !json {
            return Err(Refused(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "json_required",
                "send Content-Type: application/json (an empty object replays as captured)",
            ));
        }
    }
    Ok(())
}

/// The request to replay: the record's, with `edits` applied.
fn edited(entry: &super::Entry, edits: &Value) -> Result<Replay, (StatusCode, &'static str, String)> {
    let bad = |message: &str| (StatusCode::BAD_REQUEST, "bad_request", message.to_owned());
    let (method, target, headers, body) = entry.request_parts();
    let method = match edits.get("method") {
        None => method,
        Some(Value::String(method)) => method.clone(),
        Some(_) => return Err(bad("method: a string")),
    };
    let target = match edits.get("path") {
        None => target,
        Some(Value::String(path)) => Bytes::from(path.clone()),
        Some(_) => return Err(bad("path: a string")),
    };
    let headers = match edits.get("headers") {
        None => headers,
        Some(Value::Array(pairs)) => {
            let mut headers = Vec::with_capacity(pairs.len());
            for pair in pairs {
                match pair.as_array().map(Vec::as_slice) {
                    Some([Value::String(name), Value::String(value)]) => {
                        headers.push((Bytes::from(name.clone()), Bytes::from(value.clone())));
                    }
                    _ => return Err(bad("headers: a list of [name, value] pairs of strings")),
                }
            }
            headers
        }
        Some(_) => return Err(bad("headers: a list of [name, value] pairs")),
    };
    let body = match (edits.get("body"), edits.get("body_base64")) {
        (Some(Value::String(text)), None) => Bytes::from(text.clone()),
        (None, Some(Value::String(encoded))) => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|_| bad("body_base64: not base64"))?,
        ),
        (None, None) => body.ok_or((
            StatusCode::CONFLICT,
            "body_not_kept",
            "the request body was larger than the inspector keeps (or still arriving): give one in \"body\""
                .to_owned(),
        ))?,
        _ => return Err(bad("give the body as \"body\" (text) or \"body_base64\", not both")),
    };
    Ok(Replay { method, target, path_routed: entry.request.path_routed, headers, body })
}

/// `2xx`-style classes or an exact status.
fn status_matches(summary: &Value, wanted: &str) -> bool {
    let Some(status) = summary["status"].as_u64() else { return false };
    match wanted.as_bytes() {
        [class, b'x', b'x'] | [class, b'X', b'X'] => u64::from(class.wrapping_sub(b'0')) == status / 100,
        _ => wanted.parse() == Ok(status),
    }
}

/// The value of `name` in a query string, percent-decoded.
fn query_value(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| percent_decode(value))
    })
}

fn percent_decode(text: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push(high * 16 + low);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn asset(text: &'static str, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())).boxed());
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

/// A kept body: images as themselves (for the preview), anything else as bytes to download.
fn raw_body((bytes, content_type): (Bytes, Option<Bytes>)) -> Response<Body> {
    let image = content_type
        .as_ref()
        .filter(|t| {
            t.len() < 100
                && t.to_ascii_lowercase().starts_with(b"image/")
                && !t.to_ascii_lowercase().starts_with(b"image/svg")
        })
        .and_then(|t| HeaderValue::from_maybe_shared(t.clone()).ok());
    let mut response = Response::new(Full::new(bytes).boxed());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        image.unwrap_or_else(|| HeaderValue::from_static("application/octet-stream")),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("sandbox; default-src 'none'"));
    response
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A request refused: its status, code and message.
#[derive(Debug)]
struct Refused(StatusCode, &'static str, &'static str);

impl Refused {
    fn response(&self) -> Response<Body> {
        error(self.0, self.1, self.2)
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(status, &json!({ "error": { "code": code, "message": message } }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: Method, host: &str, extra: &[(&str, &str)], uri: &str) -> http::request::Parts {
        let mut request = Request::builder().method(method).uri(uri).header(header::HOST, host);
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn only_loopback_its_own_host_or_the_token_and_json_posts_get_in() {
        let local: SocketAddr = "127.0.0.1:4040".parse().unwrap();
        let (here, away): (SocketAddr, SocketAddr) =
            ("127.0.0.1:5000".parse().unwrap(), "10.0.0.7:5000".parse().unwrap());
        let token = ferry_codec::Secret::from_text("let me see").unwrap();
        let status = |result: Result<(), Refused>| result.err().map(|r| r.0);
        for host in ["127.0.0.1:4040", "localhost:4040"] {
            assert_eq!(status(admit(&parts(Method::GET, host, &[], "/"), here, local, None)), None, "{host}");
        }
        // DNS rebinding: a name that resolves here, or another port.
        for host in ["evil.example:4040", "localhost:80", "", "127.0.0.1"] {
            let refused = status(admit(&parts(Method::GET, host, &[], "/"), here, local, None));
            assert_eq!(refused, Some(StatusCode::MISDIRECTED_REQUEST), "{host:?}");
        }
        let remote = parts(Method::GET, "agent.example:4040", &[], "/api/requests");
        assert_eq!(status(admit(&remote, away, local, None)), Some(StatusCode::FORBIDDEN));
        assert_eq!(status(admit(&remote, away, local, Some(&token))), Some(StatusCode::UNAUTHORIZED));
        let bearer = parts(Method::GET, "agent.example:4040", &[("authorization", "Bearer let me see")], "/");
        assert_eq!(status(admit(&bearer, away, local, Some(&token))), None);
        let query = parts(Method::GET, "agent.example:4040", &[], "/?token=let%20me%20see");
        assert_eq!(status(admit(&query, away, local, Some(&token))), None);
        let wrong = parts(Method::GET, "agent.example:4040", &[], "/?token=let%20me");
        assert_eq!(status(admit(&wrong, away, local, Some(&token))), Some(StatusCode::UNAUTHORIZED));
        // A cross-site form cannot post JSON without the browser asking first.
        let form = parts(
            Method::POST,
            "127.0.0.1:4040",
            &[("content-type", "text/plain")],
            "/api/requests/1/replay",
        );
        assert_eq!(status(admit(&form, here, local, None)), Some(StatusCode::UNSUPPORTED_MEDIA_TYPE));
        let json = parts(
            Method::POST,
            "127.0.0.1:4040",
            &[("content-type", "application/json")],
            "/api/requests/1/replay",
        );
        assert_eq!(status(admit(&json, here, local, None)), None);
    }

    #[test]
    fn queries_and_status_classes() {
        assert_eq!(query_value("a=1&path=%2Fhook%20x&b", "path").as_deref(), Some("/hook x"));
        assert_eq!(query_value("token=a+b%zz", "token").as_deref(), Some("a b%zz"));
        assert_eq!(query_value("b", "b").as_deref(), Some(""));
        assert_eq!(query_value("a=1", "b"), None);
        let summary = json!({ "status": 404 });
        assert!(status_matches(&summary, "4xx") && status_matches(&summary, "404"));
        assert!(!status_matches(&summary, "2xx") && !status_matches(&json!({ "status": null }), "4xx"));
    }
}
