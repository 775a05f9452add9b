//! Counts, not timings: what one small request and one MiB of body cost the gateway and the agent.
//!
//! The gateway and the agent each run on a current-thread runtime of their own thread (as the
//! shipped binaries do with `--threads 1`); the sample upstream and the client run on other
//! threads. Around each phase, every counter is read on the gateway's and the agent's thread:
//!
//! - heap allocations, bytes allocated, and allocations of 4 KiB or more (a counting global
//!   allocator, per thread);
//! - bytes copied by ferry's code (`ferry_transport::stats`);
//! - syscalls (`perf stat -e raw_syscalls:sys_enter` on the two threads, when `perf` works);
//! - wake-ups: how often the runtime parked its thread (went to sleep for lack of work, to be
//!   woken again), and the thread's context switches;
//! - CPU time of the thread.
//!
//! `cargo bench -p ferry-benches --bench counts` prints the table; the issue notes quote it.

#![allow(unsafe_code)] // the counting allocator; see `benches/Cargo.toml`

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_agent::AgentConfig;
use ferry_agent::config::{GatewayUrl, Upstream};
use ferry_benches::upstream::{UpstreamStats, pattern, serve};
use ferry_gateway::{Gateway, GatewayConfig};
use http::Request;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

const TUNNEL: &str = "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_counts";
/// Small requests measured, and how many run at once (each on its own keep-alive connection).
const SMALL_REQUESTS: usize = 8_000;
const SMALL_CONCURRENCY: usize = 16;
/// Body bytes moved each way in the bulk phases.
const BULK_BYTES: usize = 64 << 20;

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
    static ALLOC_BYTES: Cell<u64> = const { Cell::new(0) };
    static LARGE_ALLOCS: Cell<u64> = const { Cell::new(0) };
    /// Bytes allocated minus bytes freed on this thread: what it holds (its tasks' memory stays
    /// on it, the runtimes being current-thread).
    static LIVE: Cell<i64> = const { Cell::new(0) };
}

/// Allocations at least this large are counted apart: buffers, not bookkeeping.
const LARGE: usize = 4096;

fn count(bytes: usize) {
    let _ = LIVE.try_with(|c| c.set(c.get() + bytes as i64));
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
    let _ = ALLOC_BYTES.try_with(|c| c.set(c.get() + bytes as u64));
    if bytes >= LARGE {
        let _ = LARGE_ALLOCS.try_with(|c| c.set(c.get() + 1));
    }
}

// SAFETY: every call is passed to `System` unchanged; the counters are plain thread-locals with
// no destructor, so counting never allocates or fails.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = LIVE.try_with(|c| c.set(c.get() - layout.size() as i64));
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = LIVE.try_with(|c| c.set(c.get() - layout.size() as i64));
        count(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Counters of one thread at one moment.
#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    allocs: u64,
    alloc_bytes: u64,
    large_allocs: u64,
    copied: u64,
    parks: u64,
    switches: u64,
    cpu_us: u64,
    /// Heap bytes the thread holds.
    live: i64,
}

impl Sample {
    /// Read on the thread it describes. `parks` is filled in by the caller.
    fn here() -> Self {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
        let field = |name: &str| -> u64 {
            status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
        };
        let switches = field("voluntary_ctxt_switches:") + field("nonvoluntary_ctxt_switches:");
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
        let fields: Vec<&str> =
            stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // utime and stime, in clock ticks (100 per second on Linux).
        let cpu_us = (ticks(11) + ticks(12)) * 10_000;
        Self {
            allocs: ALLOCS.with(Cell::get),
            alloc_bytes: ALLOC_BYTES.with(Cell::get),
            large_allocs: LARGE_ALLOCS.with(Cell::get),
            copied: ferry_transport::stats::copied_on_this_thread(),
            parks: 0,
            switches,
            cpu_us,
            live: LIVE.with(Cell::get),
        }
    }

    fn minus(self, before: Self) -> Self {
        Self {
            allocs: self.allocs - before.allocs,
            alloc_bytes: self.alloc_bytes - before.alloc_bytes,
            large_allocs: self.large_allocs - before.large_allocs,
            copied: self.copied - before.copied,
            parks: self.parks - before.parks,
            switches: self.switches - before.switches,
            cpu_us: self.cpu_us - before.cpu_us,
            live: self.live - before.live,
        }
    }
}

/// A component on a thread of its own, with a current-thread runtime.
struct Component {
    handle: Handle,
    tid: String,
}

impl Component {
    fn start<F, Fut>(name: &str, main: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let runtime =
                    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                let tid = std::fs::read_link("/proc/thread-self")
                    .ok()
                    .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .unwrap_or_default();
                tx.send((runtime.handle().clone(), tid)).expect("send");
                runtime.block_on(main());
            })
            .expect("thread");
        let (handle, tid) = rx.recv().expect("component started");
        Self { handle, tid }
    }

    async fn sample(&self) -> Sample {
        let mut sample = self.handle.spawn(async { Sample::here() }).await.expect("sample task");
        sample.parks = self.handle.metrics().worker_park_count(0);
        sample
    }
}

/// `perf stat` counting syscalls on the given threads until stopped; `None` without perf.
struct Syscalls(Option<Child>);

impl Syscalls {
    fn start(tids: &[&str]) -> Self {
        let child = Command::new("perf")
            .args(["stat", "--per-thread", "-x", ",", "-e", "raw_syscalls:sys_enter", "-t", &tids.join(",")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok();
        // perf attaches asynchronously; give it a moment before the phase starts.
        std::thread::sleep(Duration::from_millis(300));
        Self(child)
    }

    /// Syscalls per thread id.
    fn stop(self) -> Vec<(String, u64)> {
        let Some(child) = self.0 else { return Vec::new() };
        let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
        let Ok(out) = child.wait_with_output() else { return Vec::new() };
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter_map(|line| {
                // "<comm>-<tid>,<count>,,raw_syscalls:sys_enter,..."
                let mut cells = line.split(',');
                let thread = cells.next()?;
                let count = cells.next()?.trim().parse().ok()?;
                let tid = thread.rsplit('-').next()?.to_owned();
                Some((tid, count))
            })
            .collect()
    }
}

type Body = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

async fn get(client: &Client<HttpConnector, Body>, url: &str) -> usize {
    let request =
        Request::get(url).body(Empty::new().map_err(|never| match never {}).boxed_unsync()).expect("request");
    let response = client.request(request).await.expect("response");
    assert!(response.status().is_success(), "{url}: {}", response.status());
    response.into_body().collect().await.expect("body").to_bytes().len()
}

async fn post(client: &Client<HttpConnector, Body>, url: &str, body: Bytes) {
    let body = Full::new(body).map_err(|never| match never {}).boxed_unsync();
    let response = client.request(Request::post(url).body(body).expect("request")).await.expect("response");
    assert!(response.status().is_success());
    response.into_body().collect().await.expect("body");
}

struct Phase {
    name: &'static str,
    unit: &'static str,
    units: f64,
    gateway: Sample,
    agent: Sample,
    syscalls: (Option<u64>, Option<u64>),
}

async fn measure<F, Fut>(
    name: &'static str,
    unit: &'static str,
    units: f64,
    gateway: &Component,
    agent: &Component,
    work: F,
) -> Phase
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let syscalls = Syscalls::start(&[&gateway.tid, &agent.tid]);
    let (g0, a0) = (gateway.sample().await, agent.sample().await);
    work().await;
    let (g1, a1) = (gateway.sample().await, agent.sample().await);
    let counted = syscalls.stop();
    let of = |tid: &str| counted.iter().find(|(t, _)| t == tid).map(|(_, n)| *n);
    Phase {
        name,
        unit,
        units,
        gateway: g1.minus(g0),
        agent: a1.minus(a0),
        syscalls: (of(&gateway.tid), of(&agent.tid)),
    }
}

#[allow(clippy::print_stdout)] // the report is the point of this bench
fn print(phases: &[Phase]) {
    println!("\n| per unit | gateway | agent | both |");
    println!("|---|---|---|---|");
    for phase in phases {
        println!("| **{}**, per {} | | | |", phase.name, phase.unit);
        let per = |n: u64| n as f64 / phase.units;
        type Field = fn(&Sample) -> u64;
        let rows: [(&str, Field); 7] = [
            ("heap allocations", |s| s.allocs),
            ("bytes allocated", |s| s.alloc_bytes),
            ("allocations of 4 KiB or more", |s| s.large_allocs),
            ("bytes copied by ferry", |s| s.copied),
            ("runtime parks (wake-ups)", |s| s.parks),
            ("context switches", |s| s.switches),
            ("CPU µs", |s| s.cpu_us),
        ];
        for (label, get) in rows {
            let (g, a) = (per(get(&phase.gateway)), per(get(&phase.agent)));
            println!("| {label} | {g:.1} | {a:.1} | {:.1} |", g + a);
        }
        match phase.syscalls {
            (Some(g), Some(a)) => {
                println!("| syscalls | {:.1} | {:.1} | {:.1} |", per(g), per(a), per(g + a));
            }
            _ => println!("| syscalls | (perf not available) | | |"),
        }
    }
}

/// Connections held open at once for the memory figures.
const HELD: usize = 1_000;

/// What the gateway's and the agent's threads hold (heap bytes), and the whole process's resident
/// memory (KiB, which counts the client and the upstream too), per public connection.
struct Held {
    /// `HELD` requests in flight, each on its own connection, waiting for the upstream's answer.
    in_flight: (f64, f64, f64),
    /// The same connections after their answers, idle keep-alive connections.
    idle: (f64, f64, f64),
}

fn resident_kib() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Reads one response with a `Content-Length` (head and body) from `stream`.
async fn read_response(stream: &mut tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::with_capacity(512);
    let mut buf = [0u8; 2048];
    loop {
        let n = stream.read(&mut buf).await.expect("read");
        assert!(n > 0, "the gateway closed the connection mid-response");
        got.extend_from_slice(&buf[..n]);
        let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("content-length");
        if got.len() >= end + 4 + length {
            return;
        }
    }
}

/// Opens `HELD` connections to the gateway with a `/hold` request on each, measures while all
/// wait at the upstream, lets them go, and measures again with the connections idle.
async fn held(
    gateway: &Component,
    agent: &Component,
    stats: &UpstreamStats,
    addr: std::net::SocketAddr,
    path: &str,
) -> Held {
    use tokio::io::AsyncWriteExt;
    let (g0, a0, r0) = (gateway.sample().await, agent.sample().await, resident_kib());
    let request = Bytes::from(format!("GET {path} HTTP/1.1\r\nHost: counts\r\n\r\n"));
    let mut waiting = Vec::with_capacity(HELD);
    for _ in 0..HELD {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = request.clone();
        waiting.push(tokio::spawn(async move {
            stream.write_all(&request).await.expect("write");
            read_response(&mut stream).await;
            stream
        }));
    }
    let mut held = stats.held.subscribe();
    held.wait_for(|n| *n as usize == HELD).await.expect("upstream");
    let (g1, a1, r1) = (gateway.sample().await, agent.sample().await, resident_kib());
    stats.gate.add_permits(HELD);
    let mut idle = Vec::with_capacity(HELD);
    for task in waiting {
        idle.push(task.await.expect("client task"));
    }
    let (g2, a2, r2) = (gateway.sample().await, agent.sample().await, resident_kib());
    drop(idle);
    let per = |after: Sample, before: Sample| (after.live - before.live) as f64 / HELD as f64;
    let kib = |after: i64| (after - r0) as f64 * 1024.0 / HELD as f64;
    Held { in_flight: (per(g1, g0), per(a1, a0), kib(r1)), idle: (per(g2, g0), per(a2, a0), kib(r2)) }
}

#[allow(clippy::print_stdout)] // the report is the point of this bench
fn print_held(held: &Held) {
    println!(
        "\n| bytes held per public connection ({HELD} at once) | gateway heap | agent heap | process RSS |"
    );
    println!("|---|---|---|---|");
    for (label, (g, a, r)) in [("request in flight", held.in_flight), ("idle keep-alive", held.idle)] {
        println!("| {label} | {g:.0} | {a:.0} | {r:.0} |");
    }
}

fn main() {
    // `cargo bench` passes criterion's flags to every bench target; this one takes none.
    let shutdown = CancellationToken::new();
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let upstream_addr = upstream.local_addr().expect("addr");
    upstream.set_nonblocking(true).expect("nonblocking");
    let stats = Arc::new(UpstreamStats::default());
    let _upstream = Component::start("upstream", {
        let shutdown = shutdown.clone();
        let upstream_stats = Arc::clone(&stats);
        move || async move {
            let listener = TcpListener::from_std(upstream).expect("listener");
            serve(listener, upstream_stats, shutdown).await;
        }
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let gateway_addr = listener.local_addr().expect("addr");
    listener.set_nonblocking(true).expect("nonblocking");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let gateway = Component::start("ferry-gateway", {
        let shutdown = shutdown.clone();
        move || async move {
            let gateway = Gateway::new(GatewayConfig::default(), shutdown).expect("gateway");
            ready_tx.send(Arc::clone(&gateway)).expect("send");
            gateway.serve(TcpListener::from_std(listener).expect("listener")).await;
        }
    });
    let node = ready_rx.recv().expect("gateway started");
    let agent = Component::start("ferry-agent", {
        let shutdown = shutdown.clone();
        move || async move {
            let config = AgentConfig::new(
                TUNNEL.parse().expect("tunnel id"),
                Upstream::parse(&upstream_addr.to_string()).expect("upstream"),
                GatewayUrl::parse(&format!("ws://{gateway_addr}/ws")).expect("gateway url"),
            );
            let _ = ferry_agent::run(config, shutdown).await;
        }
    });

    let client_runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (phases, held) = client_runtime.block_on(async {
        let id = TUNNEL.parse().expect("tunnel id");
        gateway
            .handle
            .spawn(async move { node.registry.wait_until(|r| !r.of(&id).is_empty()).await })
            .await
            .expect("up");
        let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
        let base = format!("http://{gateway_addr}/t/{TUNNEL}");
        let small_url = format!("{base}/bytes/1024");
        let small_round = |count: usize| {
            let (client, url) = (client.clone(), small_url.clone());
            async move {
                let tasks: Vec<_> = (0..SMALL_CONCURRENCY)
                    .map(|_| {
                        let (client, url) = (client.clone(), url.clone());
                        tokio::spawn(async move {
                            for _ in 0..count / SMALL_CONCURRENCY {
                                get(&client, &url).await;
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.expect("client task");
                }
            }
        };
        // Warm up: connections, pools, buffers.
        small_round(SMALL_CONCURRENCY * 50).await;
        let mut phases = Vec::new();
        phases.push(
            measure("1 KiB GET", "request", SMALL_REQUESTS as f64, &gateway, &agent, || {
                small_round(SMALL_REQUESTS)
            })
            .await,
        );
        let mib = (BULK_BYTES >> 20) as f64;
        let down_url = format!("{base}/bytes/{}", BULK_BYTES / 4);
        phases.push(
            measure("download (4 × 16 MiB)", "MiB", mib, &gateway, &agent, || async {
                for _ in 0..4 {
                    get(&client, &down_url).await;
                }
            })
            .await,
        );
        let body: Bytes =
            (0..BULK_BYTES as u64).step_by(64 * 1024).flat_map(|o| pattern(o, 64 * 1024)).collect();
        let sink = format!("{base}/sink");
        phases.push(
            measure("upload (1 × 64 MiB)", "MiB", mib, &gateway, &agent, || {
                post(&client, &sink, body.clone())
            })
            .await,
        );
        let held = held(&gateway, &agent, &stats, gateway_addr, &format!("/t/{TUNNEL}/hold")).await;
        (phases, held)
    });
    print(&phases);
    print_held(&held);
    shutdown.cancel();
}
