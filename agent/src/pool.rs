//! The agent's upstream connections: HTTP/1.1 keep-alive connections (hyper's connection API),
//! kept per upstream and reused last-in first-out.
//!
//! This replaces hyper-util's legacy client, whose pool cost about a tenth of the agent's
//! instructions per small request (callgrind): a boxed request future, the pool key hashed with
//! SipHash on checkout and again on return, the request URI rebuilt to origin form, and per
//! connection two boxed futures besides hyper's own state. Here a checkout is a short linear scan
//! (an agent has one upstream, or a few routes) and a pop; a request is written on the connection
//! it was checked out with and the connection goes back once its response body has been read.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, Uri, header};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tower_service::Service;
use tracing::debug;

use crate::config::Upstream;
use crate::upstream::UpstreamBody;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request got no response head from its upstream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PoolError {
    /// No connection could be made (refused, unreachable, TLS or connect timeout).
    #[error("cannot connect to the upstream")]
    Connect(#[source] BoxError),
    /// The connection failed while the request was sent or its response awaited.
    #[error("the upstream request failed")]
    Request(#[source] hyper::Error),
}

impl PoolError {
    /// Whether no connection was ever made (a verdict on the upstream's health).
    pub(crate) fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_))
    }
}

/// Connections to each upstream, idle ones kept for reuse.
#[derive(Debug)]
pub(crate) struct UpstreamPool {
    connector: HttpsConnector<HttpConnector>,
    /// Largest read buffer per connection.
    max_buf_size: usize,
    idle: Mutex<Vec<IdleList>>,
    idle_timeout: Duration,
    max_idle: usize,
}

#[derive(Debug)]
struct IdleList {
    scheme: Scheme,
    authority: Authority,
    /// Oldest first; checkouts take the newest.
    conns: Vec<Idle>,
}

impl IdleList {
    fn is_for(&self, upstream: &Upstream) -> bool {
        self.scheme == upstream.scheme && self.authority == upstream.authority
    }
}

#[derive(Debug)]
struct Idle {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

/// A connection checked out for one request. [`Pooled::release`] gives it back once the response
/// body has been read to its end; dropped instead, the connection closes after what it is doing.
#[derive(Debug)]
pub(crate) struct Pooled<'a> {
    pool: &'a UpstreamPool,
    upstream: &'a Upstream,
    sender: SendRequest<UpstreamBody>,
}

impl UpstreamPool {
    pub(crate) fn new(
        connector: HttpsConnector<HttpConnector>,
        max_buf_size: usize,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Self {
        Self { connector, max_buf_size, idle: Mutex::new(Vec::new()), idle_timeout, max_idle }
    }

    /// Sends `request` (its URI in origin form, `/path?query`) to `upstream` and waits for the
    /// response head. A reused connection that the upstream closed before it took the request
    /// (the race every keep-alive client has) is retried once on a new connection.
    ///
    /// # Errors
    /// See [`PoolError`].
    pub(crate) async fn send<'a>(
        &'a self,
        upstream: &'a Upstream,
        mut request: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Pooled<'a>), PoolError> {
        if !request.headers().contains_key(header::HOST)
            && let Ok(host) = HeaderValue::from_str(upstream.authority.as_str())
        {
            request.headers_mut().insert(header::HOST, host);
        }
        // Connecting is rare once the pool is warm: its future is boxed so that it does not
        // make every request's task larger (a task is allocated, and moved, at its full size).
        let (mut pooled, reused) = match self.take_idle(upstream) {
            Some(sender) => (Pooled { pool: self, upstream, sender }, true),
            None => (Box::pin(self.connect(upstream)).await?, false),
        };
        match pooled.sender.try_send_request(request).await {
            Ok(response) => Ok((response, pooled)),
            Err(mut err) => match err.take_message() {
                Some(request) if reused => {
                    debug!(err = %err.error(), "pooled upstream connection closed; retrying on a new one");
                    Box::pin(self.send_fresh(upstream, request)).await
                }
                _ => Err(PoolError::Request(err.into_error())),
            },
        }
    }

    async fn send_fresh<'a>(
        &'a self,
        upstream: &'a Upstream,
        request: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Pooled<'a>), PoolError> {
        let mut fresh = self.connect(upstream).await?;
        let response = fresh.sender.send_request(request).await.map_err(PoolError::Request)?;
        Ok((response, fresh))
    }

    fn lists(&self) -> std::sync::MutexGuard<'_, Vec<IdleList>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_idle(&self, upstream: &Upstream) -> Option<SendRequest<UpstreamBody>> {
        let mut lists = self.lists();
        let list = lists.iter_mut().find(|list| list.is_for(upstream))?;
        while let Some(idle) = list.conns.pop() {
            if idle.sender.is_ready() && idle.since.elapsed() < self.idle_timeout {
                return Some(idle.sender);
            }
        }
        None
    }

    async fn connect<'a>(&'a self, upstream: &'a Upstream) -> Result<Pooled<'a>, PoolError> {
        let uri = Uri::builder()
            .scheme(upstream.scheme.clone())
            .authority(upstream.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|err| PoolError::Connect(err.into()))?;
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx)).await.map_err(PoolError::Connect)?;
        let io = connector.call(uri).await.map_err(PoolError::Connect)?;
        let (sender, connection) = http1::Builder::new()
            .max_buf_size(self.max_buf_size)
            .handshake(io)
            .await
            .map_err(|err| PoolError::Connect(err.into()))?;
        tokio::spawn(async move {
            if let Err(err) = connection.with_upgrades().await {
                debug!(%err, "upstream connection ended");
            }
        });
        Ok(Pooled { pool: self, upstream, sender })
    }

    /// Closes idle connections older than the idle timeout (they would only be found stale at
    /// the next checkout otherwise).
    pub(crate) fn reap(&self) {
        let mut lists = self.lists();
        for list in lists.iter_mut() {
            list.conns.retain(|idle| !idle.sender.is_closed() && idle.since.elapsed() < self.idle_timeout);
        }
    }

    /// Idle connections kept now, over all upstreams.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.lists().iter().map(|list| list.conns.len()).sum()
    }
}

impl Pooled<'_> {
    /// Gives the connection back for the next request, if it is ready for one: the response
    /// body was read to its end and the upstream keeps the connection open. Otherwise (the
    /// upstream said `Connection: close`, the request body is still going) it is dropped and
    /// closes on its own.
    pub(crate) async fn release(self) {
        if !self.sender.is_ready() {
            // Reading the last body bytes wakes the connection's task, which then marks it
            // idle: let it run once.
            tokio::task::yield_now().await;
            if !self.sender.is_ready() {
                return;
            }
        }
        let Self { pool, upstream, sender } = self;
        let mut lists = pool.lists();
        let index = match lists.iter().position(|list| list.is_for(upstream)) {
            Some(index) => index,
            None => {
                lists.push(IdleList {
                    scheme: upstream.scheme.clone(),
                    authority: upstream.authority.clone(),
                    conns: Vec::new(),
                });
                lists.len() - 1
            }
        };
        let conns = &mut lists[index].conns;
        if conns.len() < pool.max_idle {
            conns.push(Idle { sender, since: Instant::now() });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Limited};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    fn pool() -> UpstreamPool {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        UpstreamPool::new(connector, 64 * 1024, Duration::from_secs(90), 8)
    }

    fn get(path: &str) -> Request<UpstreamBody> {
        let mut request = Request::new(Limited::new(ferry_transport::FrameBody::empty(), usize::MAX));
        *request.uri_mut() = path.parse().unwrap();
        request
    }

    /// An upstream that answers `requests_per_conn` requests per connection (then closes it)
    /// and counts the connections it accepted.
    async fn upstream(requests_per_conn: usize) -> (Upstream, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for _ in 0..requests_per_conn {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 1024];
                            match socket.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end);
                        let host =
                            head.lines().find_map(|l| l.strip_prefix("host: ")).unwrap_or("-").to_owned();
                        let body = format!("{} {host}", head.lines().next().unwrap());
                        let reply =
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                        if socket.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (Upstream::parse(&addr.to_string()).unwrap(), accepted)
    }

    /// Runs a test body with a deadline, so a hang fails instead of stalling the run.
    async fn within(test: impl Future<Output = ()>) {
        tokio::time::timeout(Duration::from_secs(10), test).await.expect("the test timed out");
    }

    async fn body(response: Response<Incoming>) -> String {
        String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reuses_a_released_connection_and_sends_origin_form_with_host() {
        within(async {
            let pool = pool();
            let (upstream, accepted) = upstream(100).await;
            for i in 0..5 {
                let (response, pooled) = pool.send(&upstream, get(&format!("/n/{i}?q=1"))).await.unwrap();
                let text = body(response).await;
                assert_eq!(text, format!("GET /n/{i}?q=1 HTTP/1.1 {}", upstream.authority), "{i}");
                pooled.release().await;
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection for five requests");
            assert_eq!(pool.idle_count(), 1);
        })
        .await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_unreleased_connection_is_not_reused() {
        within(async {
            let pool = pool();
            let (upstream, accepted) = upstream(100).await;
            let (first, _held) = pool.send(&upstream, get("/a")).await.unwrap();
            let (second, pooled) = pool.send(&upstream, get("/b")).await.unwrap();
            assert_eq!(body(second).await, format!("GET /b HTTP/1.1 {}", upstream.authority));
            assert_eq!(body(first).await, format!("GET /a HTTP/1.1 {}", upstream.authority));
            pooled.release().await;
            assert_eq!(accepted.load(Ordering::SeqCst), 2);
        })
        .await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_the_upstream_closed_is_replaced() {
        within(async {
            let pool = pool();
            // One request per connection: the upstream closes each after its answer.
            let (upstream, accepted) = upstream(1).await;
            for i in 0..3 {
                let (response, pooled) = pool.send(&upstream, get(&format!("/{i}"))).await.unwrap();
                assert_eq!(body(response).await, format!("GET /{i} HTTP/1.1 {}", upstream.authority));
                pooled.release().await;
                // Whether it was kept or not, the next request must succeed.
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 3);
        })
        .await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn refused_connections_are_connect_errors() {
        within(async {
            let pool = pool();
            let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let upstream = Upstream::parse(&closed.local_addr().unwrap().to_string()).unwrap();
            drop(closed);
            let err = pool.send(&upstream, get("/")).await.unwrap_err();
            assert!(err.is_connect(), "{err:?}");
        })
        .await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reap_drops_expired_idle_connections() {
        within(async {
            let mut pool = pool();
            pool.idle_timeout = Duration::from_millis(1);
            let (upstream, _) = upstream(100).await;
            let (response, pooled) = pool.send(&upstream, get("/")).await.unwrap();
            body(response).await;
            pooled.release().await;
            assert_eq!(pool.idle_count(), 1);
            tokio::time::sleep(Duration::from_millis(5)).await;
            pool.reap();
            assert_eq!(pool.idle_count(), 0);
        })
        .await;
    }
}
