//! What feeds the circuit breaker besides requests: while it is open, a TCP connection to every
//! upstream each cool-down (requests alone could not close it: once the gateway hears the upstream
//! is unhealthy it stops sending them); and, with `--health-path`, an HTTP probe of every
//! upstream on a schedule.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::{AgentConfig, Upstream};
use crate::health::Health;
use crate::pool::{OutRequest, UpstreamPool};
use ferry_transport::h1::RequestFraming;

/// Longest a single health probe may take.
const MAX_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// While the breaker is open, tries a TCP connection to every upstream each cool-down and
/// closes the breaker when all connect.
pub(crate) async fn breaker_loop(health: &Health, config: &AgentConfig, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(health.cooldown()) => {}
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
            None => health.record(Instant::now(), Ok(())),
            Some(err) => health.record(Instant::now(), Err(&err)),
        }
    }
}

/// Probes `GET {upstream}{path}` for every upstream each `interval` until `stop`; 2xx and 3xx
/// pass.
pub(crate) async fn probe_loop(
    health: &Health,
    pool: &UpstreamPool,
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
            if let Err(err) = probe(pool, upstream, path, timeout).await {
                failures.push(format!("{upstream}{path}: {err}"));
            }
        }
        let result = if failures.is_empty() { Ok(()) } else { Err(failures.join("; ")) };
        if let Err(err) = &result {
            warn!(err, "health probe failed");
        }
        health.probe_result(result);
    }
}

async fn probe(
    pool: &UpstreamPool,
    upstream: &Upstream,
    path: &str,
    timeout: Duration,
) -> Result<(), String> {
    let target = path.parse::<http::uri::PathAndQuery>().map_err(|err| format!("bad path: {err}"))?;
    // Pooled connections take request bodies from the tunnel; a probe has none.
    let request = OutRequest {
        method: http::Method::GET,
        target: Bytes::copy_from_slice(target.as_str().as_bytes()),
        headers: Vec::new(),
        body: crate::upstream::empty_body(),
        framing: RequestFraming::None,
        client: None,
    };
    let (head, mut exchange) = match tokio::time::timeout(timeout, pool.send(upstream, request)).await {
        Ok(Ok(sent)) => sent,
        Ok(Err(err)) => return Err(crate::error_chain(&err)),
        Err(_) => return Err(format!("no answer within {} ms", timeout.as_millis())),
    };
    let status = head.status;
    // Drain a small body so the connection goes back to the pool.
    if let Ok(Ok(_)) = tokio::time::timeout(timeout, (&mut exchange).collect()).await {
        exchange.release();
    }
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(format!("status {}", status.as_u16()))
    }
}
