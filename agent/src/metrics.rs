//! `agent --metrics ADDR`: the agent's view of its tunnel in the OpenMetrics text format
//! (`prometheus-client`), on a listener of its own (off by default; the way cloudflared's
//! `--metrics` works). What only the agent sees: how long the upstream takes to answer, what it
//! answered, what the agent refused or aborted itself, its sessions with the gateway.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_codec::control::HealthState;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    class: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelLabels {
    tunnel: String,
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The agent's metrics; cheap to update from every stream.
#[derive(Debug)]
pub(crate) struct AgentMetrics {
    tunnel: TunnelLabels,
    upstream_duration: Family<TunnelLabels, Histogram, fn() -> Histogram>,
    /// This tunnel's series of `upstream_duration`, at hand for every request.
    upstream_duration_here: Histogram,
    responses: Family<ClassLabels, Counter>,
    by_class: [Counter; 5],
    /// Requests the agent answered or ended itself, by code (filters, breaker, upstream errors).
    own_answers: Family<CodeLabels, Counter>,
    sessions_started: Counter,
    sessions_lost: Counter,
}

impl AgentMetrics {
    pub(crate) fn new(tunnel: &str) -> Self {
        let tunnel = TunnelLabels { tunnel: tunnel.to_owned() };
        let upstream_duration: Family<TunnelLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 18)));
        let upstream_duration_here = upstream_duration.get_or_create_owned(&tunnel);
        let responses: Family<ClassLabels, Counter> = Family::default();
        let by_class = CLASSES.map(|class| responses.get_or_create_owned(&ClassLabels { class }));
        Self {
            tunnel,
            upstream_duration,
            upstream_duration_here,
            responses,
            by_class,
            own_answers: Family::default(),
            sessions_started: Counter::default(),
            sessions_lost: Counter::default(),
        }
    }

    /// The upstream sent its response head `status` after `elapsed`.
    pub(crate) fn upstream_answered(&self, status: StatusCode, elapsed: Duration) {
        self.upstream_duration_here.observe(elapsed.as_secs_f64());
        self.by_class[usize::from(status.as_u16() / 100).clamp(1, 5) - 1].inc();
    }

    /// The agent answered or ended a request itself with `code`.
    pub(crate) fn own_answer(&self, code: &'static str) {
        self.own_answers.get_or_create(&CodeLabels { code }).inc();
    }

    /// A session with the gateway came up.
    pub(crate) fn session_started(&self) {
        self.sessions_started.inc();
    }

    /// A session with the gateway ended without our asking (reconnects follow).
    pub(crate) fn session_lost(&self) {
        self.sessions_lost.inc();
    }

    /// The exposition, with the gauges as given (read now by the caller).
    pub(crate) fn render(&self, in_flight: usize, health: HealthState) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        let info: Family<TunnelLabels, ConstGauge, fn() -> ConstGauge> =
            Family::new_with_constructor(|| ConstGauge::new(1));
        drop(info.get_or_create(&self.tunnel));
        registry.register("ferry_agent_tunnel", "The tunnel this agent serves (always 1)", info);
        registry.register(
            "ferry_agent_requests_in_flight",
            "Requests the agent is serving now",
            ConstGauge::new(i64::try_from(in_flight).unwrap_or(i64::MAX)),
        );
        let health = match health {
            HealthState::Unknown => -1,
            HealthState::Unhealthy => 0,
            HealthState::Healthy => 1,
        };
        registry.register(
            "ferry_agent_upstream_healthy",
            "What the agent reports of its upstream: 1 healthy, 0 unhealthy (breaker open or probe failing), -1 not known yet",
            ConstGauge::new(health),
        );
        registry.register(
            "ferry_agent_upstream_duration_seconds",
            "Time from sending a request to the upstream to its response head",
            self.upstream_duration.clone(),
        );
        registry.register(
            "ferry_agent_upstream_responses",
            "Upstream response heads, by status class",
            self.responses.clone(),
        );
        registry.register(
            "ferry_agent_own_answers",
            "Requests the agent answered or ended itself, by code",
            self.own_answers.clone(),
        );
        registry.register(
            "ferry_agent_sessions_started",
            "Sessions established with the gateway",
            self.sessions_started.clone(),
        );
        registry.register(
            "ferry_agent_sessions_lost",
            "Sessions the gateway or the network ended (each followed by a reconnect)",
            self.sessions_lost.clone(),
        );
        let mut text = String::with_capacity(2048);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}

/// Renders the exposition now (built by the caller, which knows where the gauges live).
pub(crate) type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub(crate) async fn serve(listener: TcpListener, render: Render, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics at http://{addr}/metrics");
    }
    let connections = TaskTracker::new();
    loop {
        let (socket, _) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(%err, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let render = Arc::clone(&render);
        let stop = shutdown.clone();
        connections.spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let render = Arc::clone(&render);
                async move { Ok::<_, Infallible>(answer(&request, &*render)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(socket), service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => if let Err(err) = result {
                    debug!(%err, "metrics connection failed");
                },
                () = stop.cancelled() => {}
            }
        });
    }
    connections.close();
    connections.wait().await;
}

fn answer(request: &Request<Incoming>, render: &(dyn Fn() -> String + Send + Sync)) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", render())
        }
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    response
}
