//! The sample upstream: a hyper server (HTTP/1.1 and h2c) with endpoints that exercise every part
//! of the tunnel. Counters in [`UpstreamStats`] let tests check what the upstream really produced
//! and consumed (for example that a stalled client stopped the download at the source).
//!
//! | endpoint | answer |
//! |---|---|
//! | `GET /` | a small HTML page |
//! | `GET /bytes/{n}` | `n` pattern bytes with `Content-Length` ([`pattern`]) |
//! | `GET /chunked/{n}?chunk=K` | `n` pattern bytes, chunked, `K` bytes per chunk |
//! | `POST`/`PUT /echo` | the request body, streamed back as it arrives |
//! | `POST`/`PUT /sink?delay_ms=D&hash=0` | reads the body (pausing `D` ms per chunk); JSON byte count and SHA-256 (`hash=0`: the count alone, for load runs) |
//! | `GET /sse?n=N&interval_ms=I` | `N` server-sent events, one every `I` ms (`gated=1`: one per gate permit) |
//! | `GET /slow?ms=M` | answers after `M` ms (counts concurrent requests) |
//! | `GET /hold` | waits for a permit of [`UpstreamStats::gate`] (the count waiting is watchable) |
//! | `ANY /headers` | JSON with the method, target and headers it received |
//! | `GET /status/{code}` | that status |
//! | `GET /cookies` | two `Set-Cookie` fields and custom headers |
//! | `GET /trailers` | a chunked body followed by trailers |
//! | `GET /reset?declared=N&after=M` | announces `N` bytes (none: chunked), sends `M`, then drops the connection |
//! | `GET /ws` | WebSocket echo |
//! | `GET /drip?n=N&chunk=C&interval_ms=I` | `N` bytes with `Content-Length`, `C` bytes every `I` ms |
//! | `GET /barrier?n=N&id=X` | waits until `N` barrier requests have arrived (in all), then answers `X` |
//! | `GET /stall?after=N` | announces 1 GiB, sends `N` bytes, then nothing (the connection stays open) |

use std::collections::HashMap;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, stream};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Error type of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// How many request targets [`UpstreamStats::targets`] keeps.
pub const TARGETS_KEPT: usize = 1024;

/// Body chunk size of `/bytes`: large enough to be cheap, small enough to stream.
const CHUNK: usize = 64 * 1024;
/// The byte pattern repeats every 251 bytes (a prime, so chunk boundaries never line up with it).
const PERIOD: usize = 251;

/// What the upstream did, for tests to check, and gates tests open to pace it.
#[derive(Debug)]
pub struct UpstreamStats {
    /// Response body bytes handed to hyper (produced at the source).
    pub produced: AtomicU64,
    /// Request body bytes read.
    pub consumed: AtomicU64,
    /// `/slow` requests being served now.
    pub slow_in_flight: AtomicU64,
    /// Most `/slow` requests served at once.
    pub slow_peak: AtomicU64,
    /// Requests received.
    pub requests: AtomicU64,
    /// The targets (path and query) of the last [`TARGETS_KEPT`] requests, oldest first.
    pub targets: Mutex<VecDeque<String>>,
    /// Response bodies dropped before their end (`/drip`, `/stall`, `/bytes`): the client or
    /// the tunnel gave up on them, and the upstream saw it.
    pub cancelled: AtomicU64,
    /// `/hold` requests waiting now (watchable, so a test can wait for a count).
    pub held: watch::Sender<u64>,
    /// `/barrier` requests that have arrived (watchable; they are answered once it reaches
    /// their `n`).
    pub barrier: watch::Sender<u64>,
    /// `/hold` requests each take one permit to finish; `/sse?gated=1` takes one per event
    /// after the first.
    pub gate: Semaphore,
}

impl Default for UpstreamStats {
    fn default() -> Self {
        Self {
            produced: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            slow_in_flight: AtomicU64::new(0),
            slow_peak: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            targets: Mutex::default(),
            cancelled: AtomicU64::new(0),
            held: watch::Sender::new(0),
            barrier: watch::Sender::new(0),
            gate: Semaphore::new(0),
        }
    }
}

/// The download pattern: byte `i` of every download is `i % 251`.
pub fn pattern_byte(i: u64) -> u8 {
    (i % PERIOD as u64) as u8
}

/// `len` bytes of the pattern starting at offset `start`, without allocating.
pub fn pattern(start: u64, len: usize) -> Bytes {
    static BUF: OnceLock<Bytes> = OnceLock::new();
    let buf = BUF.get_or_init(|| (0..CHUNK + PERIOD).map(|i| pattern_byte(i as u64)).collect());
    let offset = (start % PERIOD as u64) as usize;
    buf.slice(offset..offset + len.min(CHUNK))
}

/// SHA-256 of the first `n` pattern bytes, hex.
pub fn pattern_sha256(n: u64) -> String {
    let mut hasher = Sha256::new();
    let mut offset = 0;
    while offset < n {
        let chunk = pattern(offset, (n - offset).min(CHUNK as u64) as usize);
        hasher.update(&chunk);
        offset += chunk.len() as u64;
    }
    hex(&hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Serves the sample upstream on `listener` until `shutdown` fires.
pub async fn serve(listener: TcpListener, stats: Arc<UpstreamStats>, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    loop {
        let (socket, _) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = socket.set_nodelay(true);
        tracker.spawn(serve_connection(socket, Arc::clone(&stats), shutdown.clone()));
    }
    tracker.close();
    tracker.wait().await;
}

/// Serves the sample upstream on one accepted connection (plain TCP, or TLS the caller set up).
pub async fn serve_connection<I>(io: I, stats: Arc<UpstreamStats>, shutdown: CancellationToken)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        let stats = Arc::clone(&stats);
        async move { Ok::<_, Infallible>(handle(request, stats).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

fn query(request: &Request<Incoming>) -> HashMap<String, String> {
    request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn number(params: &HashMap<String, String>, key: &str, default: u64) -> u64 {
    params.get(key).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()).map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

async fn handle(request: Request<Incoming>, stats: Arc<UpstreamStats>) -> Response<Body> {
    stats.requests.fetch_add(1, Ordering::Relaxed);
    {
        let target = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let mut targets = stats.targets.lock().unwrap_or_else(|e| e.into_inner());
        if targets.len() == TARGETS_KEPT {
            targets.pop_front();
        }
        targets.push_back(target);
    }
    let path = request.uri().path().to_owned();
    let params = query(&request);
    let segments: Vec<&str> = path.trim_start_matches('/').splitn(2, '/').collect();
    match (request.method().clone(), segments.as_slice()) {
        (Method::GET | Method::HEAD, [""]) => full(
            StatusCode::OK,
            "text/html; charset=utf-8",
            "<!doctype html><title>ferry</title><h1>Hello through ferry</h1>\n<p>This page comes from \
             the sample upstream, through the agent and the gateway.</p>\n",
        ),
        (Method::GET | Method::HEAD, ["bytes", n]) => match n.parse::<u64>() {
            Ok(n) => download(n, CHUNK, true, stats),
            Err(_) => full(StatusCode::BAD_REQUEST, "text/plain", "bad length"),
        },
        (Method::GET, ["chunked", n]) => match n.parse::<u64>() {
            Ok(n) => {
                let chunk = number(&params, "chunk", CHUNK as u64).clamp(1, CHUNK as u64) as usize;
                download(n, chunk, false, stats)
            }
            Err(_) => full(StatusCode::BAD_REQUEST, "text/plain", "bad length"),
        },
        (Method::POST | Method::PUT, ["echo"]) => echo(request, stats),
        (Method::POST | Method::PUT, ["sink"]) => {
            let hash = number(&params, "hash", 1) != 0;
            sink(request, number(&params, "delay_ms", 0), hash, stats).await
        }
        (Method::GET, ["sse"]) => {
            let gated = params.get("gated").is_some_and(|v| v == "1");
            sse(number(&params, "n", 5), number(&params, "interval_ms", 100), gated.then_some(stats))
        }
        (Method::GET, ["slow"]) => slow(number(&params, "ms", 1000), &stats).await,
        (Method::GET, ["hold"]) => hold(&stats).await,
        (_, ["headers"]) => headers(&request),
        (Method::GET, ["status", code]) => {
            match code.parse::<u16>().ok().and_then(|c| StatusCode::from_u16(c).ok()) {
                Some(status) => {
                    let mut response =
                        Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
                    *response.status_mut() = status;
                    response
                }
                None => full(StatusCode::BAD_REQUEST, "text/plain", "bad status"),
            }
        }
        (Method::GET, ["cookies"]) => {
            let mut response = full(StatusCode::CREATED, "text/plain", "cookies");
            let headers = response.headers_mut();
            headers.append(header::SET_COOKIE, HeaderValue::from_static("a=1; Path=/"));
            headers.append("x-first", HeaderValue::from_static("1"));
            headers.append(header::SET_COOKIE, HeaderValue::from_static("b=2; HttpOnly"));
            headers.append("x-multi", HeaderValue::from_static("one"));
            headers.append("x-multi", HeaderValue::from_static("two"));
            response
        }
        (Method::GET, ["trailers"]) => {
            let frames = vec![
                Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"body before trailers"))),
                Ok(Frame::trailers({
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("x-checksum", HeaderValue::from_static("abc123"));
                    trailers
                })),
            ];
            let mut response = Response::new(StreamBody::new(stream::iter(frames)).boxed_unsync());
            response.headers_mut().insert(header::TRAILER, HeaderValue::from_static("x-checksum"));
            response
        }
        (Method::GET, ["reset"]) => {
            let declared = params.get("declared").and_then(|v| v.parse().ok());
            reset(declared, number(&params, "after", 1000), stats)
        }
        (Method::GET, ["ws"]) => websocket(request),
        (Method::GET, ["drip"]) => drip(
            number(&params, "n", 1 << 20),
            number(&params, "chunk", CHUNK as u64).clamp(1, CHUNK as u64) as usize,
            number(&params, "interval_ms", 10),
            stats,
        ),
        (Method::GET, ["barrier"]) => {
            let id = params.get("id").cloned().unwrap_or_default();
            barrier(number(&params, "n", 1), id, &stats).await
        }
        (Method::GET, ["stall"]) => stall(number(&params, "after", 1024).min(CHUNK as u64) as usize, stats),
        _ => full(StatusCode::NOT_FOUND, "text/plain", "not found"),
    }
}

/// Counts a body dropped before its end in [`UpstreamStats::cancelled`].
struct CancelWatch {
    stats: Arc<UpstreamStats>,
    done: bool,
}

impl CancelWatch {
    fn finished(&mut self) {
        self.done = true;
    }
}

impl Drop for CancelWatch {
    fn drop(&mut self) {
        if !self.done {
            self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `n` pattern bytes, `chunk` bytes every `interval_ms`.
fn drip(n: u64, chunk: usize, interval_ms: u64, stats: Arc<UpstreamStats>) -> Response<Body> {
    let watch = CancelWatch { stats, done: false };
    let frames = stream::unfold((0u64, watch), move |(offset, mut watch)| async move {
        if offset >= n {
            watch.finished();
            return None;
        }
        if offset > 0 {
            tokio::time::sleep(Duration::from_millis(interval_ms)).await;
        }
        let data = pattern(offset, (n - offset).min(chunk as u64) as usize);
        watch.stats.produced.fetch_add(data.len() as u64, Ordering::Relaxed);
        let next = offset + data.len() as u64;
        if next >= n {
            // hyper drops a body whose announced length is complete without asking for its end.
            watch.finished();
        }
        Some((Ok::<_, BoxError>(Frame::data(data)), (next, watch)))
    });
    let mut response = Response::new(StreamBody::new(frames).boxed_unsync());
    response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    response
}

/// Announces 1 GiB, sends `after` bytes, then waits forever (until the body is dropped).
fn stall(after: usize, stats: Arc<UpstreamStats>) -> Response<Body> {
    let watch = CancelWatch { stats, done: false };
    let frames = stream::unfold((false, watch), move |(sent, watch)| async move {
        if sent {
            std::future::pending::<()>().await;
        }
        Some((Ok::<_, BoxError>(Frame::data(pattern(0, after))), (true, watch)))
    });
    let mut response = Response::new(StreamBody::new(frames).boxed_unsync());
    response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(1u64 << 30));
    response
}

/// `n` pattern bytes in `chunk`-byte frames, produced only as hyper asks for them.
fn download(n: u64, chunk: usize, with_length: bool, stats: Arc<UpstreamStats>) -> Response<Body> {
    let watch = CancelWatch { stats, done: false };
    let frames = stream::unfold((0u64, watch), move |(offset, mut watch)| async move {
        if offset >= n {
            watch.finished();
            return None;
        }
        let data = pattern(offset, (n - offset).min(chunk as u64) as usize);
        watch.stats.produced.fetch_add(data.len() as u64, Ordering::Relaxed);
        let next = offset + data.len() as u64;
        if next >= n {
            // hyper drops a body whose announced length is complete without asking for its end.
            watch.finished();
        }
        Some((Ok::<_, BoxError>(Frame::data(data)), (next, watch)))
    });
    let mut response = Response::new(StreamBody::new(frames).boxed_unsync());
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    if with_length {
        response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    response
}

/// The request body, streamed back frame by frame as it arrives.
fn echo(request: Request<Incoming>, stats: Arc<UpstreamStats>) -> Response<Body> {
    let length = request.headers().get(header::CONTENT_LENGTH).cloned();
    let body = request
        .into_body()
        .map_frame(move |frame| {
            if let Some(data) = frame.data_ref() {
                stats.consumed.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            frame
        })
        .map_err(BoxError::from)
        .boxed_unsync();
    let mut response = Response::new(body);
    if let Some(length) = length {
        response.headers_mut().insert(header::CONTENT_LENGTH, length);
    }
    response
}

async fn sink(
    request: Request<Incoming>,
    delay_ms: u64,
    hash: bool,
    stats: Arc<UpstreamStats>,
) -> Response<Body> {
    let mut body = request.into_body();
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    if hash {
                        hasher.update(data);
                    }
                    total += data.len() as u64;
                    stats.consumed.fetch_add(data.len() as u64, Ordering::Relaxed);
                    if delay_ms > 0 {
                        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    }
                }
            }
            Err(err) => {
                return full(StatusCode::BAD_REQUEST, "text/plain", format!("body failed: {err}"));
            }
        }
    }
    let json = match hash {
        true => serde_json::json!({ "bytes": total, "sha256": hex(&hasher.finalize()) }),
        false => serde_json::json!({ "bytes": total }),
    };
    full(StatusCode::OK, "application/json", json.to_string())
}

/// `n` events; after the first, each waits `interval_ms`, or a permit of the gate when `gated`.
fn sse(n: u64, interval_ms: u64, gated: Option<Arc<UpstreamStats>>) -> Response<Body> {
    let events = stream::unfold(0u64, move |i| {
        let gated = gated.clone();
        async move {
            if i >= n {
                return None;
            }
            if i > 0 {
                match &gated {
                    Some(stats) => stats.gate.acquire().await.ok()?.forget(),
                    None => tokio::time::sleep(Duration::from_millis(interval_ms)).await,
                }
            }
            let event = Bytes::from(format!("id: {i}\ndata: event {i}\n\n"));
            Some((Ok::<_, BoxError>(Frame::data(event)), i + 1))
        }
    });
    let mut response = Response::new(StreamBody::new(events).boxed_unsync());
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn slow(ms: u64, stats: &UpstreamStats) -> Response<Body> {
    let now = stats.slow_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    stats.slow_peak.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    stats.slow_in_flight.fetch_sub(1, Ordering::SeqCst);
    full(StatusCode::OK, "text/plain", "slow done")
}

/// Waits until `n` barrier requests arrived, then answers with `id`: each client must get its
/// own answer back, however many are in flight.
async fn barrier(n: u64, id: String, stats: &UpstreamStats) -> Response<Body> {
    stats.barrier.send_modify(|count| *count += 1);
    let mut arrived = stats.barrier.subscribe();
    if arrived.wait_for(|count| *count >= n).await.is_err() {
        return full(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "barrier gone");
    }
    full(StatusCode::OK, "text/plain", id)
}

/// Waits for a permit of the gate; the count of waiting requests is watchable.
async fn hold(stats: &UpstreamStats) -> Response<Body> {
    stats.held.send_modify(|n| *n += 1);
    let permit = stats.gate.acquire().await;
    stats.held.send_modify(|n| *n -= 1);
    match permit {
        Ok(permit) => {
            permit.forget();
            full(StatusCode::OK, "text/plain", "released")
        }
        Err(_) => full(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "gate closed"),
    }
}

fn headers(request: &Request<Incoming>) -> Response<Body> {
    let headers: Vec<(String, String)> = request
        .headers()
        .iter()
        .map(|(name, value)| (name.to_string(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
        .collect();
    let json = serde_json::json!({
        "method": request.method().as_str(),
        "target": request.uri().to_string(),
        "version": format!("{:?}", request.version()),
        "headers": headers,
    });
    full(StatusCode::OK, "application/json", json.to_string())
}

/// Announces `declared` bytes (or none: chunked), sends `after`, then fails the body: hyper drops
/// the connection.
fn reset(declared: Option<u64>, after: u64, stats: Arc<UpstreamStats>) -> Response<Body> {
    let frames = stream::unfold(0u8, move |step| {
        let stats = Arc::clone(&stats);
        async move {
            match step {
                0 => {
                    let data = pattern(0, after.min(CHUNK as u64) as usize);
                    stats.produced.fetch_add(data.len() as u64, Ordering::Relaxed);
                    Some((Ok::<_, BoxError>(Frame::data(data)), 1))
                }
                1 => {
                    // Let the head and the first bytes leave before the "crash".
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let crash = io::Error::new(io::ErrorKind::ConnectionReset, "simulated upstream crash");
                    Some((Err(BoxError::from(crash)), 2))
                }
                _ => None,
            }
        }
    });
    let mut response = Response::new(StreamBody::new(frames).boxed_unsync());
    if let Some(declared) = declared {
        response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(declared));
    }
    response
}

/// WebSocket echo: text and binary messages come back as they are.
fn websocket(mut request: Request<Incoming>) -> Response<Body> {
    let Some(key) = request.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return full(StatusCode::BAD_REQUEST, "text/plain", "not a websocket request");
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = ws.next().await {
            if message.is_text() || message.is_binary() {
                if ws.send(message).await.is_err() {
                    break;
                }
            } else if message.is_close() {
                break;
            }
        }
    });
    let mut response = Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}
