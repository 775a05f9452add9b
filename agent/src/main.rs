//! `agent`: the private side of a ferry tunnel. Parses flags, sets up logging and signals, and
//! runs the library.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ferry_agent::AgentConfig;
use ferry_agent::config::{DEFAULT_GATEWAY, GatewayUrl, Route, TcpTarget, Upstream};
use ferry_agent::filter::Filters;
use ferry_codec::TunnelId;
use http::Method;
use tokio_util::sync::CancellationToken;

/// Agent of a ferry tunnel: dials out to a gateway over one WebSocket and serves the public
/// requests it forwards from a local upstream service. No inbound port is needed.
///
/// Logging is controlled by RUST_LOG (default `info`), e.g. RUST_LOG=ferry_agent=debug.
#[derive(Debug, Parser)]
#[command(name = "agent", version, args_override_self = true)]
struct Args {
    /// TOML file with any of these flags as keys (`tunnel-id = "..."`, `[[route]]` tables with
    /// `prefix` and `upstream`); flags given on the command line win over the file.
    #[arg(long, value_name = "PATH")]
    config: Option<std::path::PathBuf>,

    /// Tunnel to serve (required): agent_{uuid}_{purpose}, e.g.
    /// agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_web (purpose: 1-20 of a-z, 0-9 and inner `-`).
    #[arg(long, value_parser = parse_tunnel_id, value_name = "ID")]
    tunnel_id: Option<TunnelId>,

    /// Local service to expose (required unless a route covers `/`): HOST:PORT,
    /// http://HOST:PORT or https://HOST[:PORT].
    #[arg(long, value_parser = Upstream::parse, value_name = "ADDR")]
    upstream: Option<Upstream>,

    /// Requests under a path prefix go to another local service: PREFIX=ADDR, e.g.
    /// /api=127.0.0.1:8000 (repeatable; the longest matching prefix wins).
    #[arg(long, value_parser = Route::parse, value_name = "PREFIX=ADDR")]
    route: Vec<Route>,

    /// A raw TCP service to expose on a public port of the gateway: HOST:PORT, e.g.
    /// 127.0.0.1:5432, or PORT=HOST:PORT to ask for that public port; add
    /// `,proxy-protocol=v1` or `v2` to send the upstream the client's address first
    /// (repeatable, up to 8).
    #[arg(long, value_parser = TcpTarget::parse, value_name = "[PORT=]HOST:PORT[,OPTION]")]
    tcp: Vec<TcpTarget>,

    /// Only clients in these address blocks may reach the tunnel (CIDR or one address,
    /// repeatable): the gateway refuses the others before anything reaches the agent.
    #[arg(long, value_parser = ferry_agent::config::parse_ip_block, value_name = "CIDR")]
    allow_ip: Vec<ipnet::IpNet>,

    /// Clients in these address blocks may not reach the tunnel (repeatable; wins over
    /// --allow-ip).
    #[arg(long, value_parser = ferry_agent::config::parse_ip_block, value_name = "CIDR")]
    deny_ip: Vec<ipnet::IpNet>,

    /// Ask every public HTTP request for a user and password (HTTP basic authentication),
    /// checked by the gateway: an htpasswd file of `user:hash` lines with bcrypt hashes (make one
    /// with --hash-password). Only the hashes leave this machine.
    #[arg(long, value_name = "PATH")]
    basic_auth_file: Option<std::path::PathBuf>,

    /// Print an htpasswd line for USER, with a bcrypt hash of the password read from stdin, and
    /// exit.
    #[arg(long, value_name = "USER", exclusive = true)]
    hash_password: Option<String>,

    /// Set a header on every request to the upstream, replacing any the client sent:
    /// `Name: value` (repeatable).
    #[arg(long, value_parser = ferry_agent::rewrite::parse_field, value_name = "NAME: VALUE")]
    request_header_add: Vec<(http::HeaderName, http::HeaderValue)>,

    /// Remove a header from every request before the upstream sees it (repeatable).
    #[arg(long, value_parser = ferry_agent::rewrite::parse_name, value_name = "NAME")]
    request_header_remove: Vec<http::HeaderName>,

    /// Set a header on every response to the client, replacing any the upstream sent:
    /// `Name: value` (repeatable).
    #[arg(long, value_parser = ferry_agent::rewrite::parse_field, value_name = "NAME: VALUE")]
    response_header_add: Vec<(http::HeaderName, http::HeaderValue)>,

    /// Remove a header from every response before the client sees it (repeatable).
    #[arg(long, value_parser = ferry_agent::rewrite::parse_name, value_name = "NAME")]
    response_header_remove: Vec<http::HeaderName>,

    /// Under path routing (`/t/{tunnel_id}/...`), send the upstream the whole path, prefix
    /// included, for an application configured with that base path (JupyterLab's base_url,
    /// Grafana's root_url); by default the upstream sees the path after it.
    #[arg(long)]
    keep_path_prefix: bool,

    /// Only these methods get through (comma-separated or repeated); others get 405.
    #[arg(long, value_delimiter = ',', value_parser = parse_method, value_name = "METHOD")]
    allow_method: Vec<Method>,

    /// Only paths under these prefixes get through (repeatable); others get 403.
    #[arg(long, value_name = "PREFIX")]
    allow_path: Vec<String>,

    /// Largest request body (e.g. 10MiB); larger ones get 413 from the agent.
    #[arg(long, value_parser = ferry_transport::cli::parse_size, value_name = "SIZE")]
    max_request_body: Option<u64>,

    /// Most requests served at once; more get 503 from the agent.
    #[arg(long, value_name = "N")]
    max_concurrent: Option<usize>,

    /// Probe GET PATH on the upstream(s) every --health-interval; the gateway prefers healthy
    /// agents and answers 503 upstream_unhealthy when none is.
    #[arg(long, value_name = "PATH")]
    health_path: Option<String>,

    /// Time between health probes.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    health_interval: Duration,

    /// Upstream connection failures in a row that open the circuit breaker (requests then get
    /// 503 at once, with one trial request per --breaker-cooldown).
    #[arg(long, default_value_t = ferry_agent::config::BREAKER_FAILURES, value_name = "N")]
    breaker_failures: u32,

    /// How long an open circuit breaker waits before a trial request.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    breaker_cooldown: Duration,

    /// Extra CA certificates (PEM file) to trust for an https upstream, besides the system roots.
    #[arg(long, value_name = "PATH")]
    upstream_ca_file: Option<std::path::PathBuf>,

    /// Gateway agent endpoint: ws://HOST:PORT/ws or wss://HOST/ws. Repeatable: the nodes of a
    /// cluster (or balancers in front of it); connections spread over them and move on failure.
    #[arg(long, env = "GATEWAY_URL", default_value = DEFAULT_GATEWAY, value_parser = GatewayUrl::parse, value_name = "URL")]
    gateway: Vec<GatewayUrl>,

    /// Sessions to keep at once, each to a different gateway node of a cluster (`gateway
    /// --cluster`), so a node's death costs only the requests in flight on it. Through one
    /// balancer URL, a connection that lands on a node another one uses tries again.
    #[arg(long, default_value_t = 1, value_name = "N")]
    connections: usize,

    /// Extra CA certificates (PEM file) to trust for a wss:// gateway, besides the system roots
    /// (for a gateway with a private CA or a self-signed certificate).
    #[arg(long, value_name = "PATH")]
    ca_file: Option<std::path::PathBuf>,

    /// Trust a wss:// gateway that presents this key: base64 of the SHA-256 of its
    /// SubjectPublicKeyInfo (`sha256//` prefix optional; repeatable, for key rotation). Replaces
    /// every other check of its certificate. Get it with: openssl x509 -in cert.pem -pubkey
    /// -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64
    #[arg(long, value_parser = ferry_agent::tls::parse_pin, value_name = "BASE64")]
    pin_sha256: Vec<ferry_agent::tls::Pin>,

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

    /// How long the upstream may pause in the middle of a response body before the response is
    /// cut (the client sees it incomplete).
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    upstream_idle_timeout: Duration,

    /// Worker threads: a number or `auto` (one per core this process may use). 1 runs everything
    /// on one thread (least overhead per request, and the agent shares its host with the service
    /// it exposes); more help when the host has cores to spare for it.
    #[arg(long, default_value = "1", value_name = "N|auto")]
    threads: ferry_transport::Threads,

    /// Log lines as `text` (for people) or `json` (one object per line, for log collectors).
    #[arg(long, default_value = "text", value_parser = ferry_transport::cli::parse_log_format, value_name = "text|json")]
    log_format: ferry_transport::cli::LogFormat,

    /// How long a shutdown (SIGINT/SIGTERM) lets requests in flight finish.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    drain_timeout: Duration,

    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9090); off by default.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,

    /// Log lines instead of the status screen, even on a terminal (the screen is only ever
    /// drawn when stderr is a terminal and the log format is text).
    #[arg(long = "no-console", action = clap::ArgAction::SetFalse)]
    console: bool,

    /// The request inspector's address, or `off` [default: 127.0.0.1:4040, or the next free
    /// port up to 4049 when another agent has it].
    #[arg(long, value_parser = parse_inspect, value_name = "ADDR|off")]
    inspect: Option<Inspect>,

    /// Let the inspector listen on an address other than loopback. Clients from elsewhere must
    /// give the token from --inspect-token-file or FERRY_INSPECT_TOKEN.
    #[arg(long)]
    inspect_allow_remote: bool,

    /// File holding the token remote inspector clients present (or set FERRY_INSPECT_TOKEN).
    #[arg(long, value_name = "PATH")]
    inspect_token_file: Option<std::path::PathBuf>,

    /// Requests the inspector keeps (the oldest go first).
    #[arg(long, default_value_t = ferry_agent::inspect::DEFAULT_MAX_REQUESTS, value_name = "N")]
    inspect_requests: usize,

    /// Bytes of each request and response body the inspector keeps; the rest is counted, not kept.
    #[arg(long, default_value = "64KiB", value_parser = ferry_transport::cli::parse_size, value_name = "SIZE")]
    inspect_body_limit: u64,
}

/// `--inspect`: off, or where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inspect {
    Off,
    At(std::net::SocketAddr),
}

fn parse_inspect(text: &str) -> Result<Inspect, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(Inspect::Off);
    }
    let text = text.trim();
    let text = if text.starts_with(':') { format!("127.0.0.1{text}") } else { text.to_owned() };
    text.parse().map(Inspect::At).map_err(|_| {
        format!("{text:?} is not HOST:PORT (an IP address and a port, e.g. 127.0.0.1:4040) or off")
    })
}

/// Where the inspector listens when --inspect is not given; when it is busy (another agent on
/// this host), the next ports up to `+ INSPECT_FALLBACKS`.
const INSPECT_DEFAULT: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 4040);
const INSPECT_FALLBACKS: u16 = 9;

/// Binds the inspector's listener: the address asked for (an error if it cannot be had), or the
/// default and the ports after it (a warning and no inspector if none is free).
async fn inspect_listener(
    inspect: Option<Inspect>,
    default: std::net::SocketAddr,
) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    match inspect {
        Some(Inspect::Off) => Ok(None),
        Some(Inspect::At(addr)) => tokio::net::TcpListener::bind(addr).await.map(Some).with_context(|| {
            format!("cannot listen on --inspect {addr} (another agent there? --inspect off turns it off)")
        }),
        None => {
            for port in default.port()..=default.port().saturating_add(INSPECT_FALLBACKS) {
                let addr = std::net::SocketAddr::new(default.ip(), port);
                match tokio::net::TcpListener::bind(addr).await {
                    Ok(listener) => return Ok(Some(listener)),
                    Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => continue,
                    Err(err) => {
                        tracing::warn!(%err, %addr, "the inspector cannot listen; going on without it");
                        return Ok(None);
                    }
                }
            }
            tracing::warn!(
                "the inspector's ports {}..={} are all in use; going on without it (--inspect ADDR picks another)",
                default.port(),
                default.port().saturating_add(INSPECT_FALLBACKS)
            );
            Ok(None)
        }
    }
}

fn parse_method(text: &str) -> Result<Method, String> {
    let upper = text.trim().to_ascii_uppercase();
    Method::from_bytes(upper.as_bytes()).map_err(|_| format!("{text:?} is not an HTTP method"))
}

/// The keys a config file may have: every flag, in kebab-case, with its type. Only for checking
/// the file (unknown keys and wrong types are errors naming the line).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
#[allow(dead_code)]
struct ConfigFile {
    tunnel_id: Option<String>,
    upstream: Option<String>,
    route: Option<Vec<RouteTable>>,
    tcp: Option<Vec<String>>,
    allow_ip: Option<Vec<String>>,
    deny_ip: Option<Vec<String>>,
    basic_auth_file: Option<std::path::PathBuf>,
    request_header_add: Option<Vec<String>>,
    request_header_remove: Option<Vec<String>>,
    response_header_add: Option<Vec<String>>,
    response_header_remove: Option<Vec<String>>,
    keep_path_prefix: Option<bool>,
    allow_method: Option<Vec<String>>,
    allow_path: Option<Vec<String>>,
    max_request_body: Option<toml::Value>,
    max_concurrent: Option<u64>,
    health_path: Option<String>,
    health_interval: Option<String>,
    breaker_failures: Option<u64>,
    breaker_cooldown: Option<String>,
    upstream_ca_file: Option<std::path::PathBuf>,
    gateway: Option<toml::Value>,
    connections: Option<u64>,
    ca_file: Option<std::path::PathBuf>,
    pin_sha256: Option<Vec<String>>,
    insecure_plaintext: Option<bool>,
    secret_file: Option<std::path::PathBuf>,
    max_retries: Option<u64>,
    upstream_timeout: Option<String>,
    upstream_idle_timeout: Option<String>,
    threads: Option<toml::Value>,
    log_format: Option<String>,
    drain_timeout: Option<String>,
    metrics: Option<String>,
    no_console: Option<bool>,
    inspect: Option<String>,
    inspect_allow_remote: Option<bool>,
    inspect_token_file: Option<std::path::PathBuf>,
    inspect_requests: Option<u64>,
    inspect_body_limit: Option<toml::Value>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct RouteTable {
    prefix: String,
    upstream: String,
}

/// Renders a `[[route]]` table as the flag's `PREFIX=ADDR`.
fn render_table(key: &str, table: &toml::Table) -> Option<String> {
    if key != "route" {
        return None;
    }
    let prefix = table.get("prefix")?.as_str()?;
    let upstream = table.get("upstream")?.as_str()?;
    Some(format!("{prefix}={upstream}"))
}

fn parse_tunnel_id(text: &str) -> Result<TunnelId, String> {
    text.parse().map_err(|err| format!("{err}"))
}

impl Args {
    fn into_config(self) -> anyhow::Result<AgentConfig> {
        let secret =
            ferry_transport::cli::load_secret(self.secret_file.as_deref(), "--secret-file", "FERRY_SECRET")
                .context("the tunnel secret")?;
        let tunnel_id =
            self.tunnel_id.context("--tunnel-id is required (or tunnel-id in the config file)")?;
        // Without --upstream, a route for `/` is the default.
        let mut routes = self.route;
        // An agent with only --tcp endpoints serves no HTTP.
        let upstream = match self.upstream {
            Some(upstream) => Some(upstream),
            None => match routes.iter().position(|r| r.prefix.trim_end_matches('/').is_empty()) {
                Some(root) => Some(routes.remove(root).upstream),
                None if !self.tcp.is_empty() => None,
                None => anyhow::bail!(
                    "--upstream is required (or a route for /, a --tcp endpoint, or upstream in the config file)"
                ),
            },
        };
        let mut gateways = self.gateway.into_iter();
        let first = gateways.next().context("--gateway is required")?;
        let mut config = AgentConfig::with_upstream(tunnel_id, upstream, first);
        config.more_gateways = gateways.collect();
        config.connections = self.connections;
        config.routes = routes;
        config.tcp = self.tcp;
        config.allow_ip = self.allow_ip;
        config.deny_ip = self.deny_ip;
        if let Some(path) = &self.basic_auth_file {
            config.basic_auth = ferry_agent::config::load_htpasswd(path)
                .map_err(anyhow::Error::msg)
                .context("--basic-auth-file")?;
        }
        config.headers = ferry_agent::rewrite::HeaderRules {
            request: ferry_agent::rewrite::FieldRules {
                set: self.request_header_add,
                remove: self.request_header_remove,
            },
            response: ferry_agent::rewrite::FieldRules {
                set: self.response_header_add,
                remove: self.response_header_remove,
            },
        };
        config.keep_path_prefix = self.keep_path_prefix;
        config.filters = Filters {
            methods: (!self.allow_method.is_empty()).then_some(self.allow_method),
            paths: (!self.allow_path.is_empty()).then_some(self.allow_path),
            max_request_body: self.max_request_body,
            max_concurrent: self.max_concurrent,
        };
        if let Some(paths) = &config.filters.paths
            && let Some(bad) = paths.iter().find(|p| !p.starts_with('/'))
        {
            anyhow::bail!("--allow-path {bad:?} must start with /");
        }
        anyhow::ensure!(config.filters.max_concurrent != Some(0), "--max-concurrent must be positive");
        config.health_path = self.health_path;
        config.health_interval = self.health_interval;
        anyhow::ensure!(self.breaker_failures > 0, "--breaker-failures must be positive");
        config.breaker_failures = self.breaker_failures;
        config.breaker_cooldown = self.breaker_cooldown;
        config.secret = secret;
        config.upstream_ca = self.upstream_ca_file;
        config.ca_file = self.ca_file;
        config.pins = self.pin_sha256;
        config.insecure_plaintext = self.insecure_plaintext;
        config.max_retries = self.max_retries;
        config.upstream_timeout = self.upstream_timeout;
        anyhow::ensure!(!self.upstream_idle_timeout.is_zero(), "--upstream-idle-timeout must be positive");
        config.upstream_idle_timeout = self.upstream_idle_timeout;
        config.drain_timeout = self.drain_timeout;
        config.inspect.max_requests = self.inspect_requests;
        config.inspect.body_limit = usize::try_from(self.inspect_body_limit).unwrap_or(usize::MAX);
        config.inspect.token = ferry_transport::cli::load_secret(
            self.inspect_token_file.as_deref(),
            "--inspect-token-file",
            "FERRY_INSPECT_TOKEN",
        )
        .context("the inspector token")?;
        match self.inspect {
            Some(Inspect::At(addr)) if !addr.ip().is_loopback() => {
                anyhow::ensure!(
                    self.inspect_allow_remote,
                    "--inspect {addr} is not a loopback address: anyone who reaches it sees every request \
                     through the tunnel; pass --inspect-allow-remote (with a token) if that is what you want"
                );
                anyhow::ensure!(
                    config.inspect.token.is_some(),
                    "--inspect-allow-remote needs a token for remote clients: --inspect-token-file or FERRY_INSPECT_TOKEN"
                );
            }
            _ => {}
        }
        Ok(config)
    }
}

fn main() -> anyhow::Result<()> {
    let argv = ferry_transport::cli::args_with_config_file::<ConfigFile>(
        std::env::args_os().collect(),
        render_table,
    )?;
    let args = Args::parse_from(argv);
    if let Some(user) = &args.hash_password {
        return hash_password(user);
    }
    let runtime = ferry_transport::runtime(args.threads.get()).context("cannot start the async runtime")?;
    runtime.block_on(run(args))
}

/// bcrypt cost of `--hash-password`: 2^10 rounds, ~60 ms per check on one core. The gateway
/// checks a credential once and remembers the answer, so this is paid once per client, not per
/// request.
const HASH_COST: u32 = 10;

/// `--hash-password USER`: the password from stdin (one line), an htpasswd line on stdout.
fn hash_password(user: &str) -> anyhow::Result<()> {
    let line = format!("{user}:{}", "$2y$10$".to_owned() + &"x".repeat(53));
    anyhow::ensure!(
        ferry_codec::handshake::is_basic_auth_entry(&line),
        "{user:?}: a user name is 1 to 64 printable characters, without `:` or spaces"
    );
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        eprint!("password for {user} (shown as typed; or pipe it in): ");
    }
    let mut password = String::new();
    std::io::stdin().read_line(&mut password).context("reading the password from stdin")?;
    let password = password.trim_end_matches(['\r', '\n']);
    anyhow::ensure!(!password.is_empty(), "an empty password");
    anyhow::ensure!(password.len() <= 72, "bcrypt uses at most 72 bytes of a password");
    let hash = bcrypt::hash(password, HASH_COST).context("hashing")?;
    use std::io::Write;
    writeln!(std::io::stdout(), "{user}:{hash}").context("writing the line")?;
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    // On a terminal (and unless told otherwise) a status screen, with the last log lines on it;
    // elsewhere (systemd, a pipe, CI) the log lines as they come.
    let console = args.console
        && args.log_format == ferry_transport::cli::LogFormat::Text
        && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let console = console.then(|| {
        (Arc::new(ferry_agent::status::Status::default()), ferry_agent::console::LogLines::default())
    });
    match &console {
        Some((_, log)) => ferry_transport::cli::init_logging_to(args.log_format, log.clone(), false),
        None => ferry_transport::cli::init_logging(args.log_format),
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(
        ferry_transport::cli::cancel_on_signal(shutdown.clone(), "draining")
            .context("cannot listen for SIGINT and SIGTERM")?,
    );
    let metrics = match args.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on --metrics {addr}"))?,
        ),
        None => None,
    };
    let inspect = args.inspect;
    let config = args.into_config()?;
    let inspect = inspect_listener(inspect, INSPECT_DEFAULT).await?;
    let status = console.as_ref().map(|(status, _)| Arc::clone(status));
    let screen = console.map(|(status, log)| {
        let stop = CancellationToken::new();
        let drawing =
            tokio::spawn(ferry_agent::console::run(status, log, config.tunnel_id.to_string(), stop.clone()));
        (stop, drawing)
    });
    let extras = ferry_agent::Extras { metrics, inspect, status };
    let result = ferry_agent::run_with(config, extras, shutdown).await;
    if let Some((stop, drawing)) = screen {
        stop.cancel();
        let _ = drawing.await;
    }
    result.context("agent stopped")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[tokio::test]
    async fn the_default_inspector_port_moves_on_when_taken_and_an_asked_for_one_does_not() {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = taken.local_addr().unwrap();
        let next = inspect_listener(None, at).await.unwrap().expect("a port after the taken one");
        let got = next.local_addr().unwrap().port();
        assert!(got > at.port() && got <= at.port() + INSPECT_FALLBACKS, "{got} after {}", at.port());
        let err = inspect_listener(Some(Inspect::At(at)), at).await.unwrap_err();
        assert!(format!("{err:#}").contains("cannot listen on --inspect"), "{err:#}");
        assert!(inspect_listener(Some(Inspect::Off), at).await.unwrap().is_none());
    }

    #[test]
    fn inspect_addresses_parse() {
        assert_eq!(parse_inspect("off"), Ok(Inspect::Off));
        assert_eq!(parse_inspect(":4041"), Ok(Inspect::At("127.0.0.1:4041".parse().unwrap())));
        assert_eq!(parse_inspect("[::1]:4040"), Ok(Inspect::At("[::1]:4040".parse().unwrap())));
        assert!(parse_inspect("localhost").is_err());
    }

    #[test]
    fn flags_are_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn the_example_config_file_parses_and_flags_win() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/agent.toml");
        let argv = ["agent", "--config", path, "--max-concurrent", "7", "--allow-path", "/only"];
        let argv = ferry_transport::cli::args_with_config_file::<ConfigFile>(
            argv.iter().map(std::ffi::OsString::from).collect(),
            render_table,
        )
        .unwrap();
        let args = Args::try_parse_from(argv).unwrap();
        assert_eq!(args.max_concurrent, Some(7));
        assert_eq!(args.allow_path, ["/only"]);
        assert_eq!(args.allow_method, [Method::GET, Method::HEAD, Method::POST]);
        assert_eq!(args.route, [Route::parse("/api=127.0.0.1:8000").unwrap()]);
        assert_eq!(args.health_path.as_deref(), Some("/health"));
        assert_eq!(args.request_header_add[0].0, "x-env");
        assert_eq!(args.response_header_remove[0], "server");
        assert!(args.gateway[0].tls);
    }

    #[test]
    fn the_readme_shows_the_example_config_file() {
        assert!(include_str!("../../README.md").contains(include_str!("../../examples/agent.toml")));
    }

    #[test]
    fn a_route_for_the_root_can_replace_upstream() {
        let args = Args::try_parse_from([
            "agent",
            "--tunnel-id",
            "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_web",
            "--route",
            "/=127.0.0.1:5173",
            "--route",
            "/api=127.0.0.1:8000",
        ])
        .unwrap();
        let config = args.into_config().unwrap();
        assert_eq!(config.upstream.unwrap().to_string(), "http://127.0.0.1:5173");
        assert_eq!(config.routes.len(), 1);
        let missing =
            Args::try_parse_from(["agent", "--tunnel-id", "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_web"]);
        assert!(missing.unwrap().into_config().unwrap_err().to_string().contains("--upstream"));
    }

    #[test]
    fn an_agent_with_tcp_endpoints_needs_no_http_upstream() {
        let args = Args::try_parse_from([
            "agent",
            "--tunnel-id",
            "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_db",
            "--tcp",
            "127.0.0.1:5432",
            "--tcp",
            "6380=[::1]:6379,proxy-protocol=v1",
            "--allow-ip",
            "10.1.2.3/8",
            "--deny-ip",
            "10.9.9.9",
        ])
        .unwrap();
        let config = args.into_config().unwrap();
        assert!(config.upstream.is_none());
        assert_eq!(config.allow_ip[0].to_string(), "10.0.0.0/8");
        assert_eq!(config.deny_ip[0].to_string(), "10.9.9.9/32");
        assert!(Args::try_parse_from(["agent", "--allow-ip", "10.0.0.0/40"]).is_err());
        assert_eq!(config.tcp[1].name, "[::1]:6379");
        assert_eq!((config.tcp[1].host.as_str(), config.tcp[1].port), ("::1", 6379));
        assert_eq!(config.tcp[1].public_port, Some(6380));
        for bad in ["5432", "0=127.0.0.1:5432", "127.0.0.1:0", "127.0.0.1:5432,proxy-protocol=v3", ":5432"] {
            assert!(Args::try_parse_from(["agent", "--tcp", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_tunnel_id_is_a_clear_error() {
        let err = Args::try_parse_from(["agent", "--tunnel-id", "web", "--upstream", "127.0.0.1:8000"])
            .unwrap_err();
        assert!(err.to_string().contains("agent_"), "{err}");
    }
}
