//! `swarm`: opens many idle agent sessions to one gateway, for scale tests (10,000 idle sessions
//! on one gateway). Each session does the real handshake, opens its control stream and answers
//! heartbeats; nothing else. Sessions are opened a batch at a time so the gateway's accept queue
//! does not overflow. Prints `ready N` on stdout once all are up, then waits to be killed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use clap::Parser;
use ferry_codec::control::HealthState;
use ferry_codec::handshake::check_version;
use ferry_codec::{
    AuthResult, ClientAuth, ControlMessage, InstanceId, PROTOCOL_VERSION, ServerHello, TunnelId,
};
use ferry_transport::control::{self, Heartbeat};
use ferry_transport::mux::{SessionConfig, session};
use ferry_transport::ws::{SUBPROTOCOL, recv_message, send_message, websocket_config};
use ferry_transport::{WsIo, multiplex};
use http::HeaderValue;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;

/// Opens N idle ferry agent sessions to a gateway (for scale tests).
#[derive(Debug, Parser)]
#[command(name = "swarm")]
struct Args {
    /// The gateway's address.
    #[arg(long)]
    gateway: SocketAddr,
    /// How many sessions.
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// Handshakes in progress at once.
    #[arg(long, default_value_t = 64)]
    parallel: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = ferry_transport::runtime(1)?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let up = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(args.parallel));
    let stop = CancellationToken::new();
    let mut failures = 0;
    let mut handles = Vec::with_capacity(args.sessions);
    for i in 0..args.sessions {
        let permit = Arc::clone(&gate).acquire_owned().await.context("semaphore")?;
        let (up, stop) = (Arc::clone(&up), stop.clone());
        let gateway = args.gateway;
        handles.push(tokio::spawn(async move {
            let result = session_task(gateway, i, permit, up, stop).await;
            if let Err(err) = &result {
                eprintln!("session {i}: {err:#}");
            }
            result.is_ok()
        }));
    }
    let _ = gate.acquire_many(args.parallel as u32).await;
    let ready = up.load(Ordering::SeqCst);
    // The readiness line the scale test waits for.
    #[allow(clippy::print_stdout)]
    {
        println!("ready {ready}");
    }
    for handle in handles {
        if !handle.await.unwrap_or(false) {
            failures += 1;
        }
    }
    anyhow::ensure!(failures == 0, "{failures} sessions failed");
    Ok(())
}

async fn session_task(
    gateway: SocketAddr,
    i: usize,
    permit: tokio::sync::OwnedSemaphorePermit,
    up: Arc<AtomicUsize>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let tunnel: TunnelId = format!("agent_00000000-0000-4000-8000-{i:012}_swarm").parse()?;
    let tcp = TcpStream::connect(gateway).await.context("connect")?;
    tcp.set_nodelay(true)?;
    let mut request = format!("ws://{gateway}/ws").into_client_request()?;
    request.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static(SUBPROTOCOL));
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(request, tcp, Some(websocket_config())).await?;
    let hello = ServerHello::decode(recv_message(&mut ws).await?)?;
    check_version(hello.version)?;
    let auth = ClientAuth {
        version: PROTOCOL_VERSION,
        tunnel_id: tunnel,
        instance_id: InstanceId(uuid::Uuid::from_u128(i as u128 + 1)),
        agent_version: "swarm".into(),
        mac: None,
        tcp: Vec::new(),
        allow_ip: Vec::new(),
        deny_ip: Vec::new(),
        basic_auth: Vec::new(),
    };
    send_message(&mut ws, auth.encode()).await?;
    let AuthResult::Accepted(accepted) = AuthResult::decode(recv_message(&mut ws).await?)? else {
        anyhow::bail!("refused");
    };
    let (driver, opener) = session(
        WsIo::new(ws, Role::Client, Arc::default()),
        multiplex::Mode::Client,
        &SessionConfig::with_max_streams(16),
    );
    let driving = tokio::spawn(driver.run(|_| {}, stop.clone()));
    let (handle, control_loop, _events) = control::channel();
    handle
        .send(ControlMessage::UpstreamHealth { state: HealthState::Unknown, detail: String::new() })
        .await?;
    let (stream, _slot) = opener.open().await?;
    up.fetch_add(1, Ordering::SeqCst);
    drop(permit);
    let heartbeat = Heartbeat { interval: accepted.heartbeat_interval, misses: 3 };
    let ended = control::run(stream, heartbeat, control_loop).await;
    let _ = driving.await;
    anyhow::bail!("session ended: {ended}")
}
