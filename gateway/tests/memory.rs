//! Backpressure end to end: a client that stops reading stops the upstream, a slow upstream stops
//! the uploading client, and memory stays bounded whatever the body size. One test per file
//! direction runs alone in this binary so the process's memory is the tunnel's.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use ferry_benches::upstream::pattern;
use futures_util::stream;
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1024 * 1024;
/// The goal for gateway + agent growth, and for bytes in flight anywhere on the path.
const BOUND: u64 = 64 * MIB;

/// Resident memory of this process.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// Waits until `counter` stops moving (unchanged across 10 looks 100 ms apart) and returns it.
async fn plateau(counter: impl Fn() -> u64) -> u64 {
    let (mut last, mut still) = (counter(), 0);
    while still < 10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = counter();
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    last
}

#[tokio::test]
async fn stalled_client_and_slow_upstream_keep_memory_bounded() {
    bounded(async {
        let env = TestEnv::start().await;
        // Warm up allocator pools and connection state with one full transfer each way.
        let (_, body) = get(&env.url("/bytes/33554432")).await;
        assert_eq!(body.len() as u64, 32 * MIB);
        let baseline = rss();

        // 1. A client asks for 100 GiB and reads nothing past the head.
        let mut socket = tokio::net::TcpStream::connect(env.gateway_addr).await.unwrap();
        let request =
            format!("GET /t/{}/bytes/{} HTTP/1.1\r\nHost: x\r\n\r\n", env.tunnel_id, 100 * 1024 * MIB);
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut head = [0u8; 512];
        let n = socket.read(&mut head).await.unwrap();
        assert!(head[..n].starts_with(b"HTTP/1.1 200"));
        let already = env.stats.produced.load(Ordering::Relaxed);
        let produced = plateau(|| env.stats.produced.load(Ordering::Relaxed)).await - already;
        let growth = rss().saturating_sub(baseline);
        println!("stalled download: upstream produced {} MiB, RSS grew {} MiB", produced / MIB, growth / MIB);
        assert!(produced < BOUND, "the upstream kept producing: {} MiB", produced / MIB);
        assert!(growth < BOUND, "memory grew by {} MiB", growth / MIB);
        drop(socket);

        // 2. A client uploads 100 GiB to an upstream that reads one chunk a second.
        let sent = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&sent);
        let chunks = stream::unfold(0u64, move |offset| {
            let counter = Arc::clone(&counter);
            async move {
                let data = pattern(offset, 64 * 1024);
                counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                Some((Ok::<_, BoxError>(Frame::data(data)), offset + 64 * 1024))
            }
        });
        let request = Request::post(env.url("/sink?delay_ms=1000"))
            .header("content-length", 100 * 1024 * MIB)
            .body(StreamBody::new(chunks).boxed_unsync())
            .unwrap();
        let client = client();
        let upload = tokio::spawn(async move { client.request(request).await });
        let baseline = rss();
        let sent_total = plateau(|| sent.load(Ordering::Relaxed)).await;
        let consumed = env.stats.consumed.load(Ordering::Relaxed);
        let growth = rss().saturating_sub(baseline);
        println!(
            "slow upstream: client sent {} MiB, upstream read {} MiB, RSS grew {} MiB",
            sent_total / MIB,
            consumed / MIB,
            growth / MIB
        );
        assert!(
            sent_total - consumed.min(sent_total) < BOUND,
            "{} MiB in flight",
            (sent_total - consumed) / MIB
        );
        assert!(growth < BOUND, "memory grew by {} MiB", growth / MIB);
        upload.abort();
        let _ = StatusCode::OK;
    })
    .await;
}
