//! Upstream health: an optional HTTP probe on a schedule, and a circuit breaker that opens after
//! consecutive connection failures. The combined state goes to the gateway on the control stream,
//! so it can prefer healthy replicas and answer at once when none is.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferry_codec::control::HealthState;
use http::{Request, Uri};
use http_body_util::{BodyExt, Limited};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::upstream::UpstreamClient;

/// The state the gateway is told, with a short reason.
pub(crate) type Report = (HealthState, String);

/// Longest a single health probe may take.
const MAX_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct State {
    /// Connection failures in a row.
    failures: u32,
    /// When the breaker opened (and the last failure while open).
    open_since: Option<Instant>,
    /// A trial request is under way while the breaker is open.
    trial: bool,
    /// The last error that counted.
    last_error: String,
    /// The last probe's failure (`None`: it passed, or no probe ran yet).
    probe_failure: Option<String>,
    /// Something (a probe or a request) reached the upstream since start.
    reached: bool,
}

/// Health of the upstream(s), shared by every stream and session.
#[derive(Debug)]
pub(crate) struct Health {
    state: Mutex<State>,
    /// Fast path for every request: the breaker is closed and nothing has failed since the
    /// last success, so neither `admit` nor a successful `record` needs the lock.
    clean: AtomicBool,
    report: watch::Sender<Report>,
    failures_to_open: u32,
    cooldown: Duration,
}

/// Whether a request may go upstream now.
#[derive(Debug)]
pub(crate) enum Admission<'a> {
    /// Yes.
    Go,
    /// Yes, as the one trial while the breaker is open; resolve it with [`Health::record`].
    Trial(TrialGuard<'a>),
    /// No: the breaker is open. The reason, for the client.
    Refuse(String),
}

/// Releases the trial slot if the trial request ends without a verdict (client gone, timeout).
#[derive(Debug)]
pub(crate) struct TrialGuard<'a>(&'a Health);

impl Drop for TrialGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().trial = false;
    }
}

impl Health {
    pub(crate) fn new(config: &AgentConfig) -> Self {
        Self {
            state: Mutex::default(),
            clean: AtomicBool::new(false),
            report: watch::Sender::new((HealthState::Unknown, String::new())),
            failures_to_open: config.breaker_failures.max(1),
            cooldown: config.breaker_cooldown,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes of the reported state, starting with the current one.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Report> {
        self.report.subscribe()
    }

    /// Asks to send a request upstream.
    pub(crate) fn admit(&self) -> Admission<'_> {
        if self.clean.load(Ordering::Relaxed) {
            return Admission::Go;
        }
        let mut state = self.lock();
        let Some(since) = state.open_since else {
            return Admission::Go;
        };
        if since.elapsed() >= self.cooldown && !state.trial {
            state.trial = true;
            return Admission::Trial(TrialGuard(self));
        }
        Admission::Refuse(format!(
            "{} connection failures in a row (last: {}); retrying",
            state.failures, state.last_error
        ))
    }

    /// The outcome of connecting to the upstream: `Ok` once a connection was made (whatever
    /// the response), `Err` when it could not be.
    pub(crate) fn record(&self, outcome: Result<(), &str>) {
        if outcome.is_ok() && self.clean.load(Ordering::Relaxed) {
            return;
        }
        {
            let mut state = self.lock();
            match outcome {
                Ok(()) => {
                    if state.open_since.is_some() {
                        info!("upstream reachable again; circuit breaker closed");
                    }
                    state.failures = 0;
                    state.open_since = None;
                    state.reached = true;
                }
                Err(err) => {
                    state.failures = state.failures.saturating_add(1);
                    state.last_error = err.to_owned();
                    if state.open_since.is_some() || state.failures >= self.failures_to_open {
                        if state.open_since.is_none() {
                            warn!(
                                failures = state.failures,
                                err, "upstream unreachable; circuit breaker open"
                            );
                        }
                        state.open_since = Some(Instant::now());
                    }
                }
            }
            state.trial = false;
        }
        self.publish();
    }

    fn is_open(&self) -> bool {
        self.lock().open_since.is_some()
    }

    fn probe_result(&self, result: Result<(), String>) {
        {
            let mut state = self.lock();
            if result.is_ok() {
                // A passing probe closes the breaker: the upstream is back.
                state.failures = 0;
                state.open_since = None;
                state.reached = true;
            }
            state.probe_failure = result.err();
        }
        self.publish();
    }

    fn publish(&self) {
        let report = {
            let state = self.lock();
            self.clean
                .store(state.failures == 0 && state.open_since.is_none() && state.reached, Ordering::Relaxed);
            if state.open_since.is_some() {
                (HealthState::Unhealthy, format!("circuit open: {}", state.last_error))
            } else if let Some(failure) = &state.probe_failure {
                (HealthState::Unhealthy, failure.clone())
            } else if state.reached {
                (HealthState::Healthy, String::new())
            } else {
                (HealthState::Unknown, String::new())
            }
        };
        self.report.send_if_modified(|current| {
            let changed = *current != report;
            *current = report;
            changed
        });
    }
}

/// While the breaker is open, tries a TCP connection to every upstream each cool-down and
/// closes the breaker when all connect. Requests alone could not close it: once the gateway
/// hears the upstream is unhealthy it stops sending them.
pub(crate) async fn breaker_loop(health: &Health, config: &AgentConfig, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(health.cooldown) => {}
        }
        if !health.is_open() {
            continue;
        }
        let mut failure = None;
        for upstream in config.upstreams() {
            let authority = &upstream.authority;
            let port = authority.port_u16().unwrap_or(if upstream.scheme == http::uri::Scheme::HTTPS {
                443
            } else {
                80
            });
            let host = authority.host().trim_start_matches('[').trim_end_matches(']');
            let connect = tokio::net::TcpStream::connect((host, port));
            match tokio::time::timeout(config.upstream_connect_timeout, connect).await {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => failure = Some(format!("{upstream}: {err}")),
                Err(_) => failure = Some(format!("{upstream}: connect timed out")),
            }
        }
        match failure {
            None => health.record(Ok(())),
            Some(err) => health.record(Err(&err)),
        }
    }
}

/// Probes `GET {upstream}{path}` for every upstream each `interval` until `stop`; 2xx and 3xx
/// pass.
pub(crate) async fn probe_loop(
    health: &Health,
    client: &UpstreamClient,
    config: &AgentConfig,
    path: &str,
    stop: CancellationToken,
) {
    let timeout = config.health_interval.min(MAX_PROBE_TIMEOUT);
    let mut ticks = tokio::time::interval(config.health_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let mut failures = Vec::new();
        for upstream in config.upstreams() {
            let uri = format!("{upstream}{path}");
            if let Err(err) = probe(client, &uri, timeout).await {
                failures.push(format!("{uri}: {err}"));
            }
        }
        let result = if failures.is_empty() { Ok(()) } else { Err(failures.join("; ")) };
        if let Err(err) = &result {
            warn!(err, "health probe failed");
        }
        health.probe_result(result);
    }
}

async fn probe(client: &UpstreamClient, uri: &str, timeout: Duration) -> Result<(), String> {
    let uri: Uri = uri.parse().map_err(|err| format!("bad URL: {err}"))?;
    let mut request = Request::new(Limited::new(ferry_transport::FrameBody::empty(), usize::MAX));
    *request.uri_mut() = uri;
    let response = match tokio::time::timeout(timeout, client.request(request)).await {
        Ok(Ok(response)) => response,
        Ok(Err(err)) => return Err(crate::error_chain(&err)),
        Err(_) => return Err(format!("no answer within {} ms", timeout.as_millis())),
    };
    let status = response.status();
    // Drain a small body so the connection goes back to the pool.
    let _ = tokio::time::timeout(timeout, response.into_body().collect()).await;
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(format!("status {}", status.as_u16()))
    }
}
