//! `soak`: the long run with churn (fault matrix T-22), driven by `scripts/soak`.
//!
//! It starts the release binaries on loopback (a sample upstream, a gateway, three agents), and
//! for `--minutes` sends mixed traffic (small and large downloads, uploads, server-sent events,
//! WebSockets, a few slow readers) to two tunnels while it injects faults:
//!
//! - tunnel `steady`: two replicas; one is restarted with SIGTERM every 10 s (a drain), so none of
//!   its requests may fail;
//! - tunnel `churn`: one agent behind a relay that, every few seconds, resets every connection or
//!   stops forwarding for 3 s (a partition without FIN), and the agent is SIGKILLed and
//!   restarted every 20 s. Its requests may fail, but only around a fault.
//!
//! It reports requests, failures where a fault explains them, unexpected failures (must be 0),
//! the RSS and open files of the gateway and the steady agent at the 1-minute mark and at the end
//! (within 10 %), that nothing is left in flight once traffic stops, and that no log says
//! "panicked". Exit status 0 only if all of that holds.
#![allow(clippy::print_stdout)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

type Body = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

const STEADY: &str = "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_steady";
const CHURN: &str = "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_churn";
/// How long after a fault on `churn` a failure is still put down to it: the agent's backoff
/// (at most 2 s here), the gateway's pending timeout (10 s) and slack.
const FAULT_SHADOW: Duration = Duration::from_secs(15);

/// Soak test with churn: see the module docs.
#[derive(Debug, Parser)]
#[command(name = "soak")]
struct Args {
    /// How long to run.
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// Where the release `gateway`, `agent` and `sample-upstream` binaries are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
}

/// A child process and its stderr, kept for the panic check.
struct Proc {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(bin: &Path, args: &[String]) -> anyhow::Result<Self> {
        let mut child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().context("no stderr")?;
        let writer = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = writer.lock().unwrap_or_else(|e| e.into_inner());
                // Bounded: what matters is kept (panics, errors), the rest only its tail.
                if log.len() > 4 << 20 {
                    let cut = log.len() - (2 << 20);
                    log.drain(..cut);
                }
                log.push_str(&line);
                log.push('\n');
            }
        });
        Ok(Self { child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, name: &str) {
        let _ = Command::new("kill").args([&format!("-{name}"), &self.pid().to_string()]).status();
    }

    fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// RSS (KiB) and open files of a process.
fn vitals(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let files = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    (rss, files)
}

fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// A relay in front of the gateway for the `churn` agent: it can reset every connection it
/// carries, or stop forwarding (without closing) for a while.
struct Relay {
    addr: SocketAddr,
    paused: watch::Sender<bool>,
    resets: watch::Sender<u64>,
}

impl Relay {
    async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (paused, _) = watch::channel(false);
        let (resets, _) = watch::channel(0u64);
        let (p, r) = (paused.clone(), resets.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (mut paused, mut reset) = (p.subscribe(), r.subscribe());
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else { return };
                    let (mut ir, mut iw) = inbound.into_split();
                    let (mut or, mut ow) = outbound.into_split();
                    let mut paused_b = paused.clone();
                    let up = async move { forward(&mut ir, &mut ow, &mut paused).await };
                    let down = async move { forward(&mut or, &mut iw, &mut paused_b).await };
                    tokio::select! {
                        _ = async { tokio::join!(up, down) } => {}
                        _ = reset.changed() => {}
                    }
                });
            }
        });
        Ok(Self { addr, paused, resets })
    }
}

async fn forward(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    paused: &mut watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if paused.wait_for(|p| !*p).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// When faults on `churn` happened, to tell expected failures from unexpected ones.
#[derive(Default)]
struct Faults {
    times: Mutex<Vec<Instant>>,
}

impl Faults {
    fn record(&self) {
        self.times.lock().unwrap_or_else(|e| e.into_inner()).push(Instant::now());
    }

    /// Whether a request that ran from `start` to `end` overlaps a fault or its shadow.
    fn explains(&self, start: Instant, end: Instant) -> bool {
        self.times
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|&at| at <= end && start <= at + FAULT_SHADOW)
    }
}

#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    expected: AtomicU64,
    unexpected: AtomicU64,
    examples: Mutex<Vec<String>>,
}

fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// One request of a random kind; `Err` says what went wrong.
async fn one_request(
    client: &Client<HttpConnector, Body>,
    gateway: SocketAddr,
    tunnel: &str,
    dice: u64,
) -> Result<(), String> {
    let base = format!("http://{gateway}/t/{tunnel}");
    let check = |ok: bool, what: &str| if ok { Ok(()) } else { Err(what.to_owned()) };
    match dice % 100 {
        0..=69 => {
            let response =
                client.request(Request::get(format!("{base}/bytes/1024")).body(empty()).unwrap()).await;
            let response = response.map_err(|e| format!("small: {e}"))?;
            let status = response.status();
            let body =
                response.into_body().collect().await.map_err(|e| format!("small body: {e}"))?.to_bytes();
            check(status.is_success() && body.len() == 1024, &format!("small: {status} {} bytes", body.len()))
        }
        70..=79 => {
            let response =
                client.request(Request::get(format!("{base}/bytes/262144")).body(empty()).unwrap()).await;
            let response = response.map_err(|e| format!("download: {e}"))?;
            let status = response.status();
            let body =
                response.into_body().collect().await.map_err(|e| format!("download body: {e}"))?.to_bytes();
            check(
                status.is_success() && body.len() == 262_144,
                &format!("download: {status} {} bytes", body.len()),
            )
        }
        80..=89 => {
            let payload = Bytes::from(vec![7u8; 64 * 1024]);
            let body = Full::new(payload.clone()).map_err(|never| match never {}).boxed_unsync();
            let response = client.request(Request::post(format!("{base}/echo")).body(body).unwrap()).await;
            let response = response.map_err(|e| format!("upload: {e}"))?;
            let status = response.status();
            let body =
                response.into_body().collect().await.map_err(|e| format!("upload body: {e}"))?.to_bytes();
            check(status.is_success() && body == payload, &format!("upload: {status} {} bytes", body.len()))
        }
        90..=94 => {
            let response = client
                .request(Request::get(format!("{base}/sse?n=3&interval_ms=50")).body(empty()).unwrap())
                .await;
            let response = response.map_err(|e| format!("sse: {e}"))?;
            let status = response.status();
            let body = response.into_body().collect().await.map_err(|e| format!("sse body: {e}"))?.to_bytes();
            check(
                status.is_success() && body.windows(7).filter(|w| w == b"data: e").count() == 3,
                "sse: events missing",
            )
        }
        95..=98 => {
            let tcp = TcpStream::connect(gateway).await.map_err(|e| format!("ws connect: {e}"))?;
            let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{gateway}/t/{tunnel}/ws"), tcp)
                .await
                .map_err(|e| format!("ws upgrade: {e}"))?;
            for i in 0..3 {
                let text = format!("message {i}");
                ws.send(tokio_tungstenite::tungstenite::Message::text(text.clone()))
                    .await
                    .map_err(|e| format!("ws send: {e}"))?;
                let echo = ws.next().await.ok_or("ws closed")?.map_err(|e| format!("ws read: {e}"))?;
                check(echo.into_text().map(|t| t.as_str() == text).unwrap_or(false), "ws: wrong echo")?;
            }
            let _ = ws.close(None).await;
            Ok(())
        }
        _ => {
            // A slow reader: 1 MiB, 64 KiB every 50 ms (well within the send-idle deadline).
            let response =
                client.request(Request::get(format!("{base}/bytes/1048576")).body(empty()).unwrap()).await;
            let response = response.map_err(|e| format!("slow reader: {e}"))?;
            let mut body = response.into_body();
            let mut received = 0;
            while let Some(frame) = body.frame().await {
                received +=
                    frame.map_err(|e| format!("slow reader body: {e}"))?.into_data().map_or(0, |d| d.len());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            check(received == 1 << 20, &format!("slow reader: {received} bytes"))
        }
    }
}

fn agent_args(tunnel: &str, upstream: SocketAddr, gateway: SocketAddr) -> Vec<String> {
    [
        "--tunnel-id",
        tunnel,
        "--upstream",
        &upstream.to_string(),
        "--gateway",
        &format!("ws://{gateway}/ws"),
        "--drain-timeout",
        "5s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

async fn wait_for_sessions(
    client: &Client<HttpConnector, Body>,
    gateway: SocketAddr,
    tunnel: &str,
    n: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if sessions(client, gateway, tunnel).await.map(|s| s.len()).unwrap_or(0) == n {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "never {n} sessions for {tunnel}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn sessions(
    client: &Client<HttpConnector, Body>,
    gateway: SocketAddr,
    tunnel: &str,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let response =
        client.request(Request::get(format!("http://{gateway}/connections/{tunnel}")).body(empty())?).await?;
    let body = response.into_body().collect().await?.to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body)?;
    Ok(json["sessions"].as_array().cloned().unwrap_or_default())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = |name: &str| args.bin_dir.join(name);
    let duration = Duration::from_secs(args.minutes * 60);

    let upstream_addr = free_port()?;
    let _upstream = Proc::spawn(&bin("sample-upstream"), &["--listen".into(), upstream_addr.to_string()])?;
    while TcpStream::connect(upstream_addr).await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gateway_addr = free_port()?;
    let gateway = Proc::spawn(&bin("gateway"), &["--listen".into(), gateway_addr.to_string()])?;
    while TcpStream::connect(gateway_addr).await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let relay = Relay::start(gateway_addr).await?;
    let admin = client();

    let steady = Proc::spawn(&bin("agent"), &agent_args(STEADY, upstream_addr, gateway_addr))?;
    let restarted =
        Arc::new(Mutex::new(Proc::spawn(&bin("agent"), &agent_args(STEADY, upstream_addr, gateway_addr))?));
    let churn =
        Arc::new(Mutex::new(Proc::spawn(&bin("agent"), &agent_args(CHURN, upstream_addr, relay.addr))?));
    wait_for_sessions(&admin, gateway_addr, STEADY, 2).await?;
    wait_for_sessions(&admin, gateway_addr, CHURN, 1).await?;
    eprintln!("soak: {} minutes, {} clients, gateway on {gateway_addr}", args.minutes, args.clients);

    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let faults = Arc::new(Faults::default());
    let panics_in_old_agents = Arc::new(AtomicU64::new(0));

    // Clients.
    let mut workers = Vec::new();
    for worker in 0..args.clients as u64 {
        let (stop, tally, faults) = (Arc::clone(&stop), Arc::clone(&tally), Arc::clone(&faults));
        workers.push(tokio::spawn(async move {
            let client = client();
            let mut dice = worker.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            while !stop.load(Ordering::Relaxed) {
                dice = dice.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let to_churn = (dice >> 33) % 5 == 0;
                let tunnel = if to_churn { CHURN } else { STEADY };
                let start = Instant::now();
                let outcome = tokio::time::timeout(
                    Duration::from_secs(30),
                    one_request(&client, gateway_addr, tunnel, dice >> 40),
                )
                .await;
                let end = Instant::now();
                tally.requests.fetch_add(1, Ordering::Relaxed);
                let failure = match outcome {
                    Ok(Ok(())) => continue,
                    Ok(Err(what)) => what,
                    Err(_) => "no answer in 30 s".to_owned(),
                };
                if to_churn && faults.explains(start, end) {
                    tally.expected.fetch_add(1, Ordering::Relaxed);
                } else {
                    tally.unexpected.fetch_add(1, Ordering::Relaxed);
                    let mut examples = tally.examples.lock().unwrap_or_else(|e| e.into_inner());
                    if examples.len() < 20 {
                        examples.push(format!(
                            "{:>6.1}s {tunnel}: {failure}",
                            start.duration_since(started).as_secs_f64()
                        ));
                    }
                }
            }
        }));
    }

    // Churn: a drained restart of one steady replica every 10 s; on the churn tunnel, a fault
    // every 7 s (reset or partition) and a SIGKILL + restart every 20 s.
    let churner = {
        let (stop, faults, restarted, churn) =
            (Arc::clone(&stop), Arc::clone(&faults), Arc::clone(&restarted), Arc::clone(&churn));
        let (paused, resets) = (relay.paused.clone(), relay.resets.clone());
        let agent_bin = bin("agent");
        let relay_addr = relay.addr;
        let panics = Arc::clone(&panics_in_old_agents);
        tokio::spawn(async move {
            let mut tick = 0u64;
            // Drained agents, waited for in the background: their logs are checked once they exit.
            let mut draining = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                tick += 1;
                if tick.is_multiple_of(10) {
                    let old = std::mem::replace(
                        &mut *restarted.lock().unwrap_or_else(|e| e.into_inner()),
                        Proc::spawn(&agent_bin, &agent_args(STEADY, upstream_addr, gateway_addr))
                            .expect("restart"),
                    );
                    old.signal("TERM");
                    let mut old = old;
                    let panics = Arc::clone(&panics);
                    draining.push(tokio::task::spawn_blocking(move || {
                        let _ = old.child.wait();
                        if old.log().contains("panicked") {
                            panics.fetch_add(1, Ordering::Relaxed);
                        }
                    }));
                }
                if tick.is_multiple_of(7) {
                    faults.record();
                    if tick.is_multiple_of(14) {
                        paused.send_replace(true);
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        paused.send_replace(false);
                    } else {
                        resets.send_modify(|n| *n += 1);
                    }
                }
                if tick.is_multiple_of(20) {
                    faults.record();
                    let fresh = Proc::spawn(&agent_bin, &agent_args(CHURN, upstream_addr, relay_addr))
                        .expect("restart");
                    let old = std::mem::replace(&mut *churn.lock().unwrap_or_else(|e| e.into_inner()), fresh);
                    old.signal("KILL");
                    if old.log().contains("panicked") {
                        panics.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            for agent in draining {
                let _ = agent.await;
            }
        })
    };

    // Vitals at the 1-minute mark and at the end.
    let mark = Duration::from_secs(60).min(duration / 2);
    tokio::time::sleep(mark).await;
    let gateway_at_mark = vitals(gateway.pid());
    let steady_at_mark = vitals(steady.pid());
    eprintln!(
        "soak: at {mark:?}: gateway {} KiB, {} files; steady agent {} KiB, {} files",
        gateway_at_mark.0, gateway_at_mark.1, steady_at_mark.0, steady_at_mark.1
    );
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_secs(5)).await;
        eprintln!(
            "soak: {:>4}s requests={} expected_failures={} unexpected={}",
            started.elapsed().as_secs(),
            tally.requests.load(Ordering::Relaxed),
            tally.expected.load(Ordering::Relaxed),
            tally.unexpected.load(Ordering::Relaxed)
        );
    }
    let gateway_at_end = vitals(gateway.pid());
    let steady_at_end = vitals(steady.pid());
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.await;
    }
    let _ = churner.await;

    // Quiescence: nothing left in flight on any session.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut stuck = Vec::new();
    for tunnel in [STEADY, CHURN] {
        for session in sessions(&admin, gateway_addr, tunnel).await? {
            if session["in_flight"] != 0 || session["streams_open"] != 0 {
                stuck.push(format!("{tunnel}: {session}"));
            }
        }
    }

    let requests = tally.requests.load(Ordering::Relaxed);
    let expected = tally.expected.load(Ordering::Relaxed);
    let unexpected = tally.unexpected.load(Ordering::Relaxed);
    let within = |a: (u64, usize), b: (u64, usize)| {
        let rss_ok = (b.0 as f64) <= a.0 as f64 * 1.10;
        let files_ok = (b.1 as f64) <= (a.1 as f64 * 1.10).max(a.1 as f64 + 4.0);
        rss_ok && files_ok
    };
    let panics = [gateway.log(), steady.log()].iter().filter(|log| log.contains("panicked")).count() as u64
        + panics_in_old_agents.load(Ordering::Relaxed);
    println!("soak results ({} minutes, {} clients)", args.minutes, args.clients);
    println!("  requests                      {requests}");
    println!(
        "  failures explained by a fault {expected} ({:.2} %)",
        expected as f64 * 100.0 / requests.max(1) as f64
    );
    println!("  unexpected failures           {unexpected}");
    println!(
        "  gateway RSS / files at {:>3}s   {} KiB / {}",
        mark.as_secs(),
        gateway_at_mark.0,
        gateway_at_mark.1
    );
    println!("  gateway RSS / files at end    {} KiB / {}", gateway_at_end.0, gateway_at_end.1);
    println!(
        "  steady agent at {:>3}s          {} KiB / {}",
        mark.as_secs(),
        steady_at_mark.0,
        steady_at_mark.1
    );
    println!("  steady agent at end           {} KiB / {}", steady_at_end.0, steady_at_end.1);
    println!("  left in flight after the run  {}", stuck.len());
    println!("  logs that say 'panicked'      {panics}");
    for example in tally.examples.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        println!("  unexpected: {example}");
    }
    for session in &stuck {
        println!("  stuck: {session}");
    }
    if unexpected > 0 || !stuck.is_empty() || panics > 0 {
        bail!("soak failed");
    }
    if !within(gateway_at_mark, gateway_at_end) || !within(steady_at_mark, steady_at_end) {
        bail!("soak failed: memory or open files grew more than 10 % after the first minute");
    }
    println!("soak passed");
    Ok(())
}
