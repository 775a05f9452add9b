//! The ferry gateway: the public side of a tunnel.
//!
//! ```text
//! public clients ──▶ server (h1: http1, h2: hyper) ──▶ routes ──▶ proxy ──▶ registry ──▶ session ══▶ agent
//!                                                   │                                 ▲
//!                                                   └──▶ GET /ws ──▶ endpoint ──▶ lifecycle┘
//! ```
//!
//! Agents dial in to `GET /ws` on the same port as public traffic; after the handshake the
//! WebSocket carries a yamux session, and each public request becomes one stream on it.
//!
//! # Layout
//!
//! - [`config`] — [`GatewayConfig`] and its defaults.
//! - `node` — [`Gateway`]: the state every part shares (config, registry, limits, metrics, the
//!   trackers and tokens of the drain).
//! - `server` — [`Gateway::serve`] (accept until shutdown, then drain), the accept loop and
//!   per-connection serving.
//! - `shards` — a gateway on several threads: one current-thread runtime and one `SO_REUSEPORT`
//!   listener per thread ([`bind`], [`Gateway::spawn_shards`]).
//! - `http1` — the gateway's own HTTP/1.1 server (HTTP/2 is hyper's); `inbound` — the request body
//!   it reads for the request's holder; `upgrade` — the connection handed over after `101`.
//! - `watch` — what a connection's requests tell its server task (head seen, bodies stalled).
//! - `routes` — Host and path routing rules.
//! - `proxy` — forwarding one request through a tunnel.
//! - `endpoint` — the agent endpoint: upgrade, handshake, refusals.
//! - `lifecycle` — one session from its handshake to its close: registration, control messages.
//! - [`registry`] — live sessions by tunnel id.
//! - [`cluster`] — with `--cluster`: this node's tunnels published to Redis, and a view of the
//!   other nodes' (who holds which tunnel, how to reach them).
//! - [`session`] — one session as the rest of the gateway sees it.
//! - [`auth`] — agent secrets, MAC checks, the failed-attempt limiter.
//! - `admin` — `GET /`, the admin endpoints (`/connections`, actions, `/metrics`).
//! - [`metrics`] — counters and their Prometheus rendering.
//! - [`tls`] — HTTPS on the public port, certificate reload.
//! - [`limits`] — connections per address, request rates.
//! - [`error`] — [`GatewayError`] and [`PublicError`] (the JSON errors clients see).
#![forbid(unsafe_code)]
#![warn(clippy::unwrap_used)]

pub mod access;
mod admin;
pub mod auth;
pub mod basic_auth;
pub mod cluster;
pub mod config;
mod endpoint;
pub mod error;
mod http1;
mod inbound;
mod lifecycle;
pub mod limits;
pub mod metrics;
mod node;
mod proxy;
pub mod registry;
mod routes;
mod server;
pub mod session;
mod shards;
pub mod tcp;
pub mod tls;
mod upgrade;
mod watch;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::GatewayConfig;
pub use error::{GatewayError, PublicError};
pub use node::Gateway;
pub use registry::Registry;
pub use shards::{Shards, bind};

/// Runs a gateway on `listener` until `shutdown` fires, then drains (see [`Gateway::serve`]).
///
/// # Errors
/// The configuration is invalid.
pub async fn run(
    config: GatewayConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    Gateway::new(config, shutdown)?.serve(listener).await;
    Ok(())
}
