//! Many requests in flight over one session, independent of each other.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};

#[tokio::test]
async fn a_thousand_requests_are_in_flight_at_once() {
    bounded(async {
        let env = TestEnv::start().await;
        let client = client();
        let requests: Vec<_> = (0..1000)
            .map(|_| {
                let client = client.clone();
                let url = env.url("/hold");
                tokio::spawn(async move { fetch(&client, Request::get(url).body(empty()).unwrap()).await })
            })
            .collect();
        // Every request must reach the upstream while none has been answered: if the tunnel
        // serialised or capped them, this wait would never end.
        let mut held = env.stats.held.subscribe();
        held.wait_for(|n| *n == 1000).await.unwrap();
        let connections = env.gateway.registry.all()[0].in_flight();
        assert_eq!(connections, 1000, "all on the one session");
        env.stats.gate.add_permits(1000);
        for request in requests {
            let (response, body) = request.await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(body, "released");
        }
        env.gateway.registry.all()[0].wait_idle().await;
    })
    .await;
}

/// Waits until `counter` stops moving (unchanged across 5 looks 100 ms apart) and returns it.
async fn plateau(counter: impl Fn() -> u64) -> u64 {
    let (mut last, mut still) = (counter(), 0);
    while still < 5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = counter();
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    last
}

/// Most bytes a stalled download may have produced at the source: its stream window (which may
/// have grown while it flowed) plus the socket and WebSocket buffers on the path. Far below what
/// it asked for: the upstream waits too.
const STALLED_BOUND: u64 = 16 * 1024 * 1024;

#[tokio::test]
async fn one_slow_stream_never_blocks_another() {
    bounded(async {
        let env = TestEnv::start().await;
        let client = client();
        // A huge download nobody reads: it fills its window, and every buffer on its way, first.
        let before = env.stats.produced.load(Ordering::Relaxed);
        let stalled_download =
            send(&client, Request::get(env.url("/bytes/10000000000")).body(empty()).unwrap()).await;
        assert_eq!(stalled_download.status(), StatusCode::OK);
        let stalled = plateau(|| env.stats.produced.load(Ordering::Relaxed)).await - before;
        println!("stalled download: {} KiB produced at the source", stalled / 1024);
        assert!(stalled < STALLED_BOUND, "the stalled download kept flowing: {stalled} bytes");

        // And an upload the upstream reads very slowly (one chunk a second), its window full.
        let consumed_before = env.stats.consumed.load(Ordering::Relaxed);
        let sent = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&sent);
        let chunks = futures_util::stream::unfold((), move |()| {
            let counter = Arc::clone(&counter);
            async move {
                counter.fetch_add(64 * 1024, Ordering::Relaxed);
                Some((Ok::<_, BoxError>(Frame::data(Bytes::from(vec![1u8; 64 * 1024]))), ()))
            }
        });
        let request = Request::post(env.url("/sink?delay_ms=1000"))
            .body(StreamBody::new(chunks).boxed_unsync())
            .unwrap();
        let upload = tokio::spawn({
            let client = client.clone();
            async move { client.request(request).await }
        });
        let uploaded = plateau(|| sent.load(Ordering::Relaxed)).await;
        assert!(uploaded > 1024 * 1024, "the upload never filled its window ({uploaded} bytes)");
        assert!(!upload.is_finished(), "the slow upload must still be running");

        // Other requests on the same session are unaffected: each finishes in its own deadline.
        for i in 0..50 {
            let (response, body) =
                tokio::time::timeout(Duration::from_secs(5), get(&env.url(&format!("/bytes/{}", 1000 + i))))
                    .await
                    .expect("a request waited behind a stalled stream");
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(body.len(), 1000 + i);
        }
        let request = Request::post(env.url("/echo")).body(full("still flowing")).unwrap();
        let (_, body) = tokio::time::timeout(Duration::from_secs(5), fetch(&client, request)).await.unwrap();
        assert_eq!(body, "still flowing");

        // The stalled ones did not move meanwhile, and still work when read.
        assert!(env.stats.produced.load(Ordering::Relaxed) - before < stalled + 1_000_000);
        assert!(env.stats.consumed.load(Ordering::Relaxed) - consumed_before < uploaded);
        let mut body = stalled_download.into_body();
        let frame = body.frame().await.unwrap().unwrap();
        assert!(frame.is_data());
        upload.abort();
    })
    .await;
}
