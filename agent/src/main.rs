//! `agent`: the private side of a ferry tunnel. Parses flags, sets up logging and signals, and
//! runs the library.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ferry_agent::AgentConfig;
use ferry_agent::config::{DEFAULT_GATEWAY, GatewayUrl, Upstream};
use ferry_codec::{Secret, TunnelId};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Agent of a ferry tunnel: dials out to a gateway over one WebSocket and serves the public
/// requests it forwards from a local upstream service. No inbound port is needed.
///
/// Logging is controlled by RUST_LOG (default `info`), e.g. RUST_LOG=ferry_agent=debug.
#[derive(Debug, Parser)]
#[command(name = "agent", version)]
struct Args {
    /// Tunnel to serve: agent_{uuid}_{purpose}, e.g. agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_web
    /// (purpose: 1-20 of a-z, 0-9 and inner `-`).
    #[arg(long, value_parser = parse_tunnel_id, value_name = "ID")]
    tunnel_id: TunnelId,

    /// Local service to expose: HOST:PORT, http://HOST:PORT or https://HOST[:PORT].
    #[arg(long, value_parser = Upstream::parse, value_name = "ADDR")]
    upstream: Upstream,

    /// Extra CA certificates (PEM file) to trust for an https upstream, besides the system roots.
    #[arg(long, value_name = "PATH")]
    upstream_ca_file: Option<std::path::PathBuf>,

    /// Gateway agent endpoint: ws://HOST:PORT/ws or wss://HOST/ws.
    #[arg(long, env = "GATEWAY_URL", default_value = DEFAULT_GATEWAY, value_parser = GatewayUrl::parse, value_name = "URL")]
    gateway: GatewayUrl,

    /// Extra CA certificates (PEM file) to trust for a wss:// gateway, besides the system roots
    /// (for a gateway with a private CA or a self-signed certificate).
    #[arg(long, value_name = "PATH")]
    ca_file: Option<std::path::PathBuf>,

    /// Allow plain ws:// to a gateway that is not on loopback. Requests and responses then cross
    /// the network unencrypted; only for paths something else protects (VPN, SSH tunnel).
    #[arg(long)]
    insecure_plaintext: bool,

    /// File holding the tunnel's secret (or set FERRY_SECRET). Secrets are never taken from the
    /// command line, where other users could read them.
    #[arg(long, value_name = "PATH")]
    secret_file: Option<std::path::PathBuf>,

    /// Give up after N failed connection attempts in a row (default: retry forever).
    #[arg(long, value_name = "N")]
    max_retries: Option<u32>,

    /// How long the upstream may take to send its response head before the client gets 504.
    #[arg(long, default_value = "55s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    upstream_timeout: Duration,

    /// Worker threads. 1 runs everything on one thread (least overhead per request); more help
    /// when the machine has cores to spare for this process.
    #[arg(long, default_value_t = 1, value_name = "N")]
    threads: usize,

    /// How long a shutdown (SIGINT/SIGTERM) lets requests in flight finish.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    drain_timeout: Duration,
}

fn parse_tunnel_id(text: &str) -> Result<TunnelId, String> {
    text.parse().map_err(|err| format!("{err}"))
}

/// The secret from `--secret-file` or `FERRY_SECRET` (not both).
fn load_secret(file: Option<&std::path::Path>) -> anyhow::Result<Option<Secret>> {
    let from_env = std::env::var("FERRY_SECRET").ok();
    let text = match (file, from_env) {
        (Some(_), Some(_)) => anyhow::bail!("give the secret once: FERRY_SECRET or --secret-file, not both"),
        (Some(path), None) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the secret file {}", path.display()))?,
        (None, Some(text)) => text,
        (None, None) => return Ok(None),
    };
    Ok(Some(Secret::from_text(&text).context("the secret is empty")?))
}

impl Args {
    fn into_config(self) -> anyhow::Result<AgentConfig> {
        let secret = load_secret(self.secret_file.as_deref())?;
        let mut config = AgentConfig::new(self.tunnel_id, self.upstream, self.gateway);
        config.secret = secret;
        config.upstream_ca = self.upstream_ca_file;
        config.ca_file = self.ca_file;
        config.insecure_plaintext = self.insecure_plaintext;
        config.max_retries = self.max_retries;
        config.upstream_timeout = self.upstream_timeout;
        config.drain_timeout = self.drain_timeout;
        Ok(config)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = ferry_transport::runtime(args.threads).context("cannot start the async runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    ferry_agent::run(args.into_config()?, shutdown).await.context("agent stopped")?;
    Ok(())
}

/// Cancels `token` on SIGINT or SIGTERM.
async fn cancel_on_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("signal received; draining");
    token.cancel();
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn flags_are_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn bad_tunnel_id_is_a_clear_error() {
        let err = Args::try_parse_from(["agent", "--tunnel-id", "web", "--upstream", "127.0.0.1:8000"])
            .unwrap_err();
        assert!(err.to_string().contains("agent_"), "{err}");
    }
}
