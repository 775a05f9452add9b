//! Backpressure end to end: a client that stops reading stops the upstream, a slow upstream stops
//! the uploading client, and memory stays bounded whatever the body size. One test per file
//! direction runs alone in this binary so the process's memory is the tunnel's.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::*;
use ferry_benches::upstream::pattern;
use futures_util::stream;
use http::Request;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1024 * 1024;
/// Most bytes a stalled transfer may hold between its two ends: its stream window (256 KiB,
/// more if it grew while flowing), the WebSocket buffers (512 KiB + 16 KiB each way), hyper's
/// buffers, and the kernel's socket buffers on the three loopback hops (a few MiB each, as
/// autotuning grows them; up to 32 MiB each on this kind of machine). Measured: about 10 MiB.
const IN_FLIGHT_BOUND: u64 = 24 * MIB;
/// Most the process (gateway, agent, upstream and client together) may grow meanwhile: what is
/// in flight plus allocator slack.
const RSS_BOUND: u64 = 32 * MIB;

/// Resident memory of this process.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
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
        let already = env.stats.produced.load(Ordering::Relaxed);
        let mut socket = tokio::net::TcpStream::connect(env.gateway_addr).await.unwrap();
        let request =
            format!("GET /t/{}/bytes/{} HTTP/1.1\r\nHost: x\r\n\r\n", env.tunnel_id, 100 * 1024 * MIB);
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut head = [0u8; 512];
        let n = socket.read(&mut head).await.unwrap();
        assert!(head[..n].starts_with(b"HTTP/1.1 200"));
        let produced = plateau(|| env.stats.produced.load(Ordering::Relaxed)).await - already;
        let growth = rss().saturating_sub(baseline);
        println!(
            "stalled download: upstream produced {} KiB, RSS grew {} MiB",
            produced / 1024,
            growth / MIB
        );
        assert!(produced < IN_FLIGHT_BOUND, "the upstream kept producing: {} MiB", produced / MIB);
        assert!(growth < RSS_BOUND, "memory grew by {} MiB", growth / MIB);
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
        let baseline = rss();
        let consumed_before = env.stats.consumed.load(Ordering::Relaxed);
        let upload = tokio::spawn(async move { client.request(request).await });
        let sent_total = plateau(|| sent.load(Ordering::Relaxed)).await;
        let consumed = env.stats.consumed.load(Ordering::Relaxed) - consumed_before;
        let growth = rss().saturating_sub(baseline);
        let in_flight = sent_total.saturating_sub(consumed);
        println!(
            "slow upstream: client sent {} KiB, upstream read {} KiB, {} KiB in flight, RSS grew {} MiB",
            sent_total / 1024,
            consumed / 1024,
            in_flight / 1024,
            growth / MIB
        );
        // The upload is held back, not failed: it is still waiting to send more.
        assert!(!upload.is_finished(), "the upload ended: {:?}", upload.await);
        assert!(sent_total > consumed, "the client is ahead of the upstream by what the path holds");
        assert!(in_flight < IN_FLIGHT_BOUND, "{} MiB in flight", in_flight / MIB);
        assert!(growth < RSS_BOUND, "memory grew by {} MiB", growth / MIB);
        upload.abort();
    })
    .await;
}
