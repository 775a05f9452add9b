//! The request inspector: the last requests through the tunnel, as the agent saw them, for a page
//! and a JSON API on a loopback port ([`server`]).
//!
//! Capture is a tee: the bodies stream on as they would without it, and the first
//! [`InspectConfig::body_limit`] bytes of each are copied aside (the rest only counted). Heads are
//! copied out of the frame and read buffers they arrived in, so a kept record never holds on to a
//! connection's buffer. At most [`InspectConfig::max_requests`] records are kept; the oldest goes
//! first, and stops capturing if its exchange is still going.

pub(crate) mod server;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use ferry_codec::{Header, Secret};
use http_body::{Body, Frame, SizeHint};
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// Records kept by default.
pub const DEFAULT_MAX_REQUESTS: usize = 200;
/// Bytes of each body kept by default.
pub const DEFAULT_BODY_LIMIT: usize = 64 * 1024;
/// Most records that may be kept.
pub const MAX_REQUESTS: usize = 100_000;
/// Most bytes of one body that may be kept.
pub const MAX_BODY_LIMIT: usize = 16 << 20;
/// Least time between two progress events of one record once its captures are full (or on an
/// upgraded connection).
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// What the inspector keeps.
#[derive(Debug, Clone)]
pub struct InspectConfig {
    /// Records kept (the oldest go first).
    pub max_requests: usize,
    /// Bytes kept of each request and response body; the rest is counted.
    pub body_limit: usize,
    /// What a client that is not on loopback must present (`Authorization: Bearer`, or
    /// `?token=` for the page); without it such clients are refused.
    pub token: Option<Secret>,
}

impl Default for InspectConfig {
    fn default() -> Self {
        Self { max_requests: DEFAULT_MAX_REQUESTS, body_limit: DEFAULT_BODY_LIMIT, token: None }
    }
}

/// A change to one record, for the live page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// A record was added.
    New(u64),
    /// A record changed (head, progress, end).
    Update(u64),
}

/// The records and who listens for their changes.
#[derive(Debug)]
pub(crate) struct Inspector {
    config: InspectConfig,
    records: Mutex<VecDeque<Arc<Entry>>>,
    next_id: AtomicU64,
    /// Bytes the kept records hold (heads and captured bodies).
    held: AtomicUsize,
    events: broadcast::Sender<Event>,
    /// The tunnel's first public URL, once a session is up (for the `curl` lines).
    public_url: Mutex<Option<String>>,
    /// Records whose last progress event was held back.
    unsent: Mutex<Vec<u64>>,
}

impl Inspector {
    pub(crate) fn new(config: InspectConfig) -> Self {
        Self {
            config,
            records: Mutex::default(),
            next_id: AtomicU64::new(1),
            held: AtomicUsize::new(0),
            events: broadcast::Sender::new(1024),
            public_url: Mutex::default(),
            unsent: Mutex::default(),
        }
    }

    /// Sends the progress events held back (called every [`PROGRESS_EVERY`] while someone
    /// listens), so a record whose traffic stopped shows where it stopped.
    pub(crate) fn flush(&self) {
        let ids = std::mem::take(&mut *self.unsent.lock().unwrap_or_else(|e| e.into_inner()));
        for id in ids {
            let Some(entry) = self.get(id) else { continue };
            let mut state = entry.state();
            if state.unsent {
                state.unsent = false;
                state.last_progress = Some(Instant::now());
                drop(state);
                let _ = self.events.send(Event::Update(id));
            }
        }
    }

    pub(crate) fn config(&self) -> &InspectConfig {
        &self.config
    }

    fn records(&self) -> MutexGuard<'_, VecDeque<Arc<Entry>>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub(crate) fn set_public_url(&self, url: Option<String>) {
        *self.public_url.lock().unwrap_or_else(|e| e.into_inner()) = url;
    }

    pub(crate) fn public_url(&self) -> Option<String> {
        self.public_url.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Starts a record of a request from the tunnel (or a replay of record `replay_of`).
    pub(crate) fn begin(self: &Arc<Self>, request: RequestRecord, replay_of: Option<u64>) -> Record {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let size = request.size();
        let entry = Arc::new(Entry {
            id,
            replay_of,
            at: SystemTime::now(),
            started: Instant::now(),
            request,
            evicted: AtomicBool::new(false),
            size: AtomicUsize::new(size),
            state: Mutex::new(State::default()),
        });
        self.held.fetch_add(size, Ordering::Relaxed);
        let evicted = {
            let mut records = self.records();
            records.push_back(Arc::clone(&entry));
            let over = records.len().saturating_sub(self.config.max_requests.max(1));
            records.drain(..over).collect::<Vec<_>>()
        };
        for old in evicted {
            old.evicted.store(true, Ordering::Relaxed);
            self.held.fetch_sub(old.size(), Ordering::Relaxed);
        }
        let _ = self.events.send(Event::New(id));
        Record { inspector: Arc::clone(self), entry }
    }

    /// The record `id`, if still kept.
    pub(crate) fn get(&self, id: u64) -> Option<Arc<Entry>> {
        let records = self.records();
        // Ids grow along the list: a binary search finds it.
        let at = records.binary_search_by_key(&id, |entry| entry.id).ok()?;
        records.get(at).cloned()
    }

    /// The kept records, newest first.
    pub(crate) fn list(&self) -> Vec<Arc<Entry>> {
        self.records().iter().rev().cloned().collect()
    }

    /// Forgets every record.
    pub(crate) fn clear(&self) {
        let old: Vec<_> = self.records().drain(..).collect();
        for entry in old {
            entry.evicted.store(true, Ordering::Relaxed);
            self.held.fetch_sub(entry.size(), Ordering::Relaxed);
        }
    }

    /// Bytes the kept records hold.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// The most the records may hold: their bodies at the limit, heads aside.
    pub(crate) fn bound(&self) -> usize {
        self.config.max_requests.saturating_mul(self.config.body_limit.saturating_mul(2))
    }
}

/// What is known of a request when it arrives.
#[derive(Debug)]
pub(crate) struct RequestRecord {
    pub(crate) method: String,
    /// As the gateway sent it (without `/t/{tunnel}` for a path-routed request).
    pub(crate) target: Bytes,
    pub(crate) path_routed: bool,
    pub(crate) client: Option<SocketAddr>,
    /// As the client sent them, copied.
    pub(crate) headers: Vec<(Bytes, Bytes)>,
}

impl RequestRecord {
    /// A record of `head`'s parts; the target and fields are copied out of the frame they came
    /// in, into one buffer.
    pub(crate) fn of(head: &ferry_codec::RequestHead) -> Self {
        let (target, headers) = copy_together(&head.target, &head.headers);
        Self {
            method: head.method.clone(),
            target,
            path_routed: head.path_routed,
            client: head.client_addr,
            headers,
        }
    }

    fn size(&self) -> usize {
        self.method.len() + self.target.len() + fields_size(&self.headers)
    }
}

/// Copies of `fields`, owning their bytes (one buffer for them all).
pub(crate) fn copy_fields(fields: &[Header]) -> Vec<(Bytes, Bytes)> {
    copy_together(&[], fields).1
}

/// A copy of `first` and of `fields`, all in one buffer: a record costs a few allocations, not two
/// per field.
fn copy_together(first: &[u8], fields: &[Header]) -> (Bytes, Vec<(Bytes, Bytes)>) {
    let size = first.len() + fields.iter().map(|f| f.name().len() + f.value().len()).sum::<usize>();
    let mut buffer = bytes::BytesMut::with_capacity(size);
    buffer.extend_from_slice(first);
    for field in fields {
        buffer.extend_from_slice(field.name());
        buffer.extend_from_slice(field.value());
    }
    let all = buffer.freeze();
    let mut at = first.len();
    let mut copies = Vec::with_capacity(fields.len());
    for field in fields {
        let (name, value) = (field.name().len(), field.value().len());
        copies.push((all.slice(at..at + name), all.slice(at + name..at + name + value)));
        at += name + value;
    }
    (all.slice(..first.len()), copies)
}

fn fields_size(fields: &[(Bytes, Bytes)]) -> usize {
    fields.iter().map(|(name, value)| name.len() + value.len()).sum()
}

/// One request and what became of it.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) id: u64,
    replay_of: Option<u64>,
    at: SystemTime,
    started: Instant,
    pub(crate) request: RequestRecord,
    /// Out of the list: captures stop.
    evicted: AtomicBool,
    /// Bytes held: the heads and the kept body bytes.
    size: AtomicUsize,
    state: Mutex<State>,
}

/// Which body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Request,
    Response,
}

#[derive(Debug, Default)]
struct State {
    upstream: Option<crate::config::Upstream>,
    status: Option<u16>,
    response_headers: Vec<(Bytes, Bytes)>,
    request_body: Capture,
    response_body: Capture,
    /// Time to the response head.
    first_byte: Option<Duration>,
    /// Time to the end (or the failure).
    duration: Option<Duration>,
    /// What went wrong: a code and a message.
    error: Option<(String, String)>,
    /// Bytes each way after `101`: to the upstream, from it.
    upgraded: Option<(u64, u64)>,
    /// When the last progress event went out.
    last_progress: Option<Instant>,
    /// A progress event was held back and has not been sent since.
    unsent: bool,
}

/// The first bytes of a body, and how many there were in all.
#[derive(Debug, Default)]
struct Capture {
    kept: Vec<u8>,
    total: u64,
    done: bool,
}

impl Entry {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes this record holds.
    fn size(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }

    /// Counts `n` more bytes held, unless the record is out of the list (then they are not kept).
    fn hold(&self, inspector: &Inspector, n: usize) -> bool {
        if self.evicted.load(Ordering::Relaxed) {
            return false;
        }
        self.size.fetch_add(n, Ordering::Relaxed);
        inspector.held.fetch_add(n, Ordering::Relaxed);
        true
    }

    /// The line of the list.
    pub(crate) fn summary(&self) -> Value {
        let state = self.state();
        self.summary_of(&state)
    }

    fn summary_of(&self, state: &State) -> Value {
        let phase = if state.error.is_some() {
            "failed"
        } else if state.upgraded.is_some() {
            "upgraded"
        } else if state.duration.is_some() {
            "complete"
        } else {
            "in_flight"
        };
        let millis = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3);
        json!({
            "id": self.id,
            "replay_of": self.replay_of,
            "time_ms": self.at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            "method": self.request.method,
            "path": String::from_utf8_lossy(&self.request.target),
            "client": self.request.client.map(|addr| addr.ip().to_string()),
            "upstream": state.upstream.as_ref().map(ToString::to_string),
            "status": state.status,
            "phase": phase,
            "duration_ms": millis(state.duration),
            "first_byte_ms": millis(state.first_byte),
            "request_bytes": state.request_body.total,
            "response_bytes": state.response_body.total,
            "error": state.error.as_ref().map(|(code, message)| json!({ "code": code, "message": message })),
            "upgraded": state.upgraded.map(|(up, down)| json!({ "to_upstream": up, "from_upstream": down })),
        })
    }

    /// The whole record: the summary, both heads, both bodies as far as they were kept, and a
    /// `curl` command line for it.
    pub(crate) fn detail(&self, public_url: Option<&str>) -> Value {
        let state = self.state();
        let mut value = self.summary_of(&state);
        value["request"] = json!({
            "headers": fields_json(&self.request.headers),
            "body": body_json(&state.request_body),
        });
        value["response"] = json!({
            "headers": fields_json(&state.response_headers),
            "body": body_json(&state.response_body),
        });
        value["curl"] = Value::String(self.curl(public_url, &state.request_body));
        value
    }

    /// The kept bytes of a body and the record's content type for it.
    pub(crate) fn body(&self, side: Side) -> (Bytes, Option<Bytes>) {
        let state = self.state();
        let (capture, fields) = match side {
            Side::Request => (&state.request_body, &self.request.headers),
            Side::Response => (&state.response_body, &state.response_headers),
        };
        let content_type = fields
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(b"content-type"))
            .map(|(_, value)| value.clone());
        (Bytes::copy_from_slice(&capture.kept), content_type)
    }

    /// The request as a replay would send it: method, target, fields, and the body if it was
    /// kept whole (`None` otherwise).
    pub(crate) fn request_parts(&self) -> (String, Bytes, Vec<(Bytes, Bytes)>, Option<Bytes>) {
        let state = self.state();
        let body = &state.request_body;
        let whole =
            (body.done && body.total == body.kept.len() as u64).then(|| Bytes::copy_from_slice(&body.kept));
        (self.request.method.clone(), self.request.target.clone(), self.request.headers.clone(), whole)
    }

    fn curl(&self, public_url: Option<&str>, body: &Capture) -> String {
        let base = public_url.unwrap_or("http://127.0.0.1").trim_end_matches('/');
        let url = format!("{base}{}", String::from_utf8_lossy(&self.request.target));
        let mut line = format!("curl -X {} {}", self.request.method, shell_quote(&url));
        for (name, value) in &self.request.headers {
            let name = String::from_utf8_lossy(name);
            if SKIPPED_IN_CURL.iter().any(|n| name.eq_ignore_ascii_case(n)) {
                continue;
            }
            line.push_str(" -H ");
            line.push_str(&shell_quote(&format!("{name}: {}", String::from_utf8_lossy(value))));
        }
        if body.total > 0 {
            match std::str::from_utf8(&body.kept) {
                Ok(text) if body.total == body.kept.len() as u64 => {
                    line.push_str(" --data-binary ");
                    line.push_str(&shell_quote(text));
                }
                _ => line.push_str(&format!(
                    " --data-binary @body.bin  # the {}-byte body is not shown here",
                    body.total
                )),
            }
        }
        line
    }
}

/// Fields a `curl` line leaves out: curl writes the first ones itself from the URL and the body,
/// the gateway adds the others again.
const SKIPPED_IN_CURL: [&str; 9] = [
    "host",
    "content-length",
    "connection",
    "transfer-encoding",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
    "via",
];

/// `text` in single quotes for a POSIX shell.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn fields_json(fields: &[(Bytes, Bytes)]) -> Value {
    Value::Array(
        fields
            .iter()
            .map(|(name, value)| json!([String::from_utf8_lossy(name), String::from_utf8_lossy(value)]))
            .collect(),
    )
}

fn body_json(capture: &Capture) -> Value {
    let kept = &capture.kept;
    let (encoding, data) = match std::str::from_utf8(kept) {
        Ok(text) => ("utf8", text.to_owned()),
        // Cut inside a character at the limit: the rest is text all the same.
        Err(err) if capture.total > kept.len() as u64 && err.error_len().is_none() => {
            ("utf8", String::from_utf8_lossy(&kept[..err.valid_up_to()]).into_owned())
        }
        Err(_) => ("base64", base64::engine::general_purpose::STANDARD.encode(kept)),
    };
    json!({
        "size": capture.total,
        "kept": kept.len(),
        "truncated": capture.total > kept.len() as u64,
        "complete": capture.done,
        "encoding": encoding,
        "data": data,
    })
}

/// A record being written by the exchange it describes.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    inspector: Arc<Inspector>,
    entry: Arc<Entry>,
}

impl Record {
    pub(crate) fn id(&self) -> u64 {
        self.entry.id
    }

    fn changed(&self, mut state: MutexGuard<'_, State>, progress: bool) {
        if progress {
            let now = Instant::now();
            if state.last_progress.is_some_and(|last| now.duration_since(last) < PROGRESS_EVERY) {
                // Held back; [`Inspector::flush`] sends it, so the last change is never lost.
                if !state.unsent {
                    state.unsent = true;
                    self.inspector.unsent.lock().unwrap_or_else(|e| e.into_inner()).push(self.entry.id);
                }
                return;
            }
            state.last_progress = Some(now);
        }
        state.unsent = false;
        drop(state);
        let _ = self.inspector.events.send(Event::Update(self.entry.id));
    }

    /// Which upstream the request went to.
    pub(crate) fn upstream(&self, upstream: &crate::config::Upstream) {
        self.entry.state().upstream = Some(upstream.clone());
    }

    /// The response head, as the client gets it.
    pub(crate) fn response(&self, status: u16, fields: &[Header]) {
        let fields = copy_fields(fields);
        let mut state = self.entry.state();
        if self.entry.hold(&self.inspector, fields_size(&fields)) {
            state.response_headers = fields;
        }
        state.status = Some(status);
        state.first_byte = Some(self.entry.started.elapsed());
        self.changed(state, false);
    }

    /// Bytes of a body went by.
    fn capture(&self, side: Side, data: &[u8]) {
        let limit = self.inspector.config.body_limit;
        let mut state = self.entry.state();
        let capture = match side {
            Side::Request => &mut state.request_body,
            Side::Response => &mut state.response_body,
        };
        capture.total += data.len() as u64;
        let room = limit.saturating_sub(capture.kept.len());
        let take = room.min(data.len());
        let kept = if take > 0 && self.entry.hold(&self.inspector, take) {
            capture.kept.extend_from_slice(&data[..take]);
            take
        } else {
            0
        };
        // Each kept chunk shows at once (server-sent events, a webhook's body); past the limit,
        // progress goes out a few times a second.
        self.changed(state, kept == 0);
    }

    fn body_end(&self, side: Side, error: Option<String>) {
        let mut state = self.entry.state();
        match side {
            Side::Request => state.request_body.done = error.is_none(),
            Side::Response => state.response_body.done = error.is_none(),
        }
        if let Some(message) = error {
            state.error.get_or_insert_with(|| ("body_failed".to_owned(), message));
        }
    }

    /// The exchange is over: the response was sent whole.
    pub(crate) fn complete(&self) {
        let mut state = self.entry.state();
        state.duration = Some(self.entry.started.elapsed());
        self.changed(state, false);
    }

    /// The exchange failed: `code` names why (an `Abort` code, or the agent's own answer).
    pub(crate) fn fail(&self, status: Option<u16>, code: &str, message: &str) {
        let mut state = self.entry.state();
        state.duration = Some(self.entry.started.elapsed());
        if status.is_some() {
            state.status = status;
        }
        state.error.get_or_insert_with(|| (code.to_owned(), message.to_owned()));
        self.changed(state, false);
    }

    /// The connection was upgraded and has closed, having moved these bytes.
    pub(crate) fn upgraded(&self, to_upstream: u64, from_upstream: u64) {
        let mut state = self.entry.state();
        state.duration = Some(self.entry.started.elapsed());
        state.upgraded = Some((to_upstream, from_upstream));
        self.changed(state, false);
    }

    /// Bytes moved on an upgraded connection that is still open.
    fn upgraded_bytes(&self, to_upstream: u64, from_upstream: u64) {
        let mut state = self.entry.state();
        let (up, down) = state.upgraded.get_or_insert((0, 0));
        *up += to_upstream;
        *down += from_upstream;
        self.changed(state, true);
    }
}

/// An upgraded upstream connection whose bytes each way are counted into a record as they move
/// (a WebSocket shows its traffic while it is open). Without a record it only passes them on.
#[derive(Debug)]
pub(crate) struct Metered<T> {
    inner: T,
    tap: Option<Record>,
}

impl<T> Metered<T> {
    pub(crate) fn new(inner: T, tap: Option<Record>) -> Self {
        Self { inner, tap }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Metered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let read = buf.filled().len() - before;
        if let (Some(record), true) = (&self.tap, read > 0) {
            record.upgraded_bytes(0, read as u64);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Metered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        if let (Some(record), true) = (&self.tap, written > 0) {
            record.upgraded_bytes(written as u64, 0);
        }
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A body whose data is copied into a record as it passes (up to the inspector's limit). Without
/// a record it only passes the body on.
#[derive(Debug)]
pub(crate) struct Tee<B> {
    inner: B,
    tap: Option<(Record, Side)>,
}

impl<B> Tee<B> {
    pub(crate) fn new(inner: B, tap: Option<(Record, Side)>) -> Self {
        Self { inner, tap }
    }

    pub(crate) fn into_inner(self) -> B {
        self.inner
    }
}

impl<B> Body for Tee<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some((record, side)) = &this.tap {
            match &polled {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        record.capture(*side, data);
                    }
                }
                Some(Err(err)) => {
                    record.body_end(*side, Some(err.to_string()));
                    this.tap = None;
                }
                None => {
                    record.body_end(*side, None);
                    this.tap = None;
                }
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn request(target: &'static str) -> RequestRecord {
        RequestRecord {
            method: "POST".into(),
            target: Bytes::from_static(target.as_bytes()),
            path_routed: false,
            client: Some("127.0.0.2:5000".parse().unwrap()),
            headers: vec![(Bytes::from_static(b"content-type"), Bytes::from_static(b"text/plain"))],
        }
    }

    fn inspector(max_requests: usize, body_limit: usize) -> Arc<Inspector> {
        Arc::new(Inspector::new(InspectConfig { max_requests, body_limit, token: None }))
    }

    #[tokio::test]
    async fn a_tee_keeps_the_first_bytes_counts_the_rest_and_passes_everything_on() {
        let inspector = inspector(10, 8);
        let record = inspector.begin(request("/hook"), None);
        let chunks = ["hello ", "world, ", "and more"]
            .map(|s| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(s))));
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(chunks));
        let tee = Tee::new(body, Some((record.clone(), Side::Request)));
        let passed = tee.collect().await.unwrap().to_bytes();
        assert_eq!(passed, "hello world, and more");
        let detail = inspector.get(record.id()).unwrap().detail(None);
        assert_eq!(detail["request"]["body"]["data"], "hello wo");
        assert_eq!(detail["request"]["body"]["size"], 21);
        assert_eq!(detail["request"]["body"]["truncated"], true);
        assert_eq!(detail["request"]["body"]["complete"], true);
        // The request head and eight body bytes.
        assert_eq!(inspector.held(), "POST".len() + "/hook".len() + "content-typetext/plain".len() + 8);
    }

    #[test]
    fn the_oldest_records_go_and_their_bytes_are_given_back() {
        let inspector = inspector(3, 4);
        let records: Vec<_> = (0..5).map(|_| inspector.begin(request("/x"), None)).collect();
        for record in &records {
            record.capture(Side::Response, b"abcdefgh");
        }
        let ids: Vec<u64> = inspector.list().iter().map(|entry| entry.id).collect();
        assert_eq!(ids, [5, 4, 3]);
        assert!(inspector.get(1).is_none() && inspector.get(4).is_some());
        // Evicted records stop keeping bytes; the held count is the three kept ones.
        let one = "POST".len() + "/x".len() + "content-typetext/plain".len() + 4;
        assert_eq!(inspector.held(), 3 * one);
        inspector.clear();
        assert_eq!(inspector.held(), 0);
        assert!(inspector.list().is_empty());
    }

    #[test]
    fn progress_held_back_by_the_throttle_is_sent_by_the_flush() {
        let inspector = inspector(10, 4);
        let mut events = inspector.subscribe();
        let record = inspector.begin(request("/big"), None);
        assert_eq!(events.try_recv().unwrap(), Event::New(1));
        record.capture(Side::Response, b"abcd");
        // Past the limit: the first progress goes out, the next ones within the interval wait.
        for _ in 0..3 {
            record.capture(Side::Response, b"efgh");
        }
        let sent: Vec<Event> = std::iter::from_fn(|| events.try_recv().ok()).collect();
        assert_eq!(sent, [Event::Update(1), Event::Update(1)]);
        inspector.flush();
        assert_eq!(events.try_recv().unwrap(), Event::Update(1));
        inspector.flush();
        assert!(events.try_recv().is_err(), "nothing held back any more");
        assert_eq!(inspector.get(1).unwrap().summary()["response_bytes"], 16);
    }

    #[test]
    fn binary_bodies_are_base64_and_a_cut_character_is_still_text() {
        let inspector = inspector(10, 5);
        let record = inspector.begin(request("/bin"), None);
        record.capture(Side::Response, &[0, 159, 146, 150]);
        let detail = inspector.get(record.id()).unwrap().detail(None);
        assert_eq!(detail["response"]["body"]["encoding"], "base64");
        let record = inspector.begin(request("/text"), None);
        record.capture(Side::Response, "abcdé".as_bytes());
        let detail = inspector.get(record.id()).unwrap().detail(None);
        assert_eq!(detail["response"]["body"]["encoding"], "utf8");
        assert_eq!(detail["response"]["body"]["data"], "abcd");
    }

    #[test]
    fn the_curl_line_quotes_and_skips_what_curl_writes_itself() {
        let inspector = inspector(10, 64);
        let mut head = request("/it's?a=1");
        head.headers.push((Bytes::from_static(b"Host"), Bytes::from_static(b"x.example")));
        head.headers.push((Bytes::from_static(b"X-Sig"), Bytes::from_static(b"a'b")));
        let record = inspector.begin(head, None);
        record.capture(Side::Request, b"{\"ok\":true}");
        record.body_end(Side::Request, None);
        let curl = inspector.get(record.id()).unwrap().detail(Some("https://t.example/"))["curl"].clone();
        assert_eq!(
            curl,
            r#"curl -X POST 'https://t.example/it'\''s?a=1' -H 'content-type: text/plain' -H 'X-Sig: a'\''b' --data-binary '{"ok":true}'"#
        );
    }
}
