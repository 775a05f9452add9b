//! Many requests in flight over one session, independent of each other.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;

use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;

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

#[tokio::test]
async fn one_slow_stream_never_blocks_another() {
    bounded(async {
        let env = TestEnv::start().await;
        let client = client();
        // A huge download nobody reads, and an upload the upstream reads very slowly.
        let stalled_download =
            send(&client, Request::get(env.url("/bytes/10000000000")).body(empty()).unwrap()).await;
        assert_eq!(stalled_download.status(), StatusCode::OK);
        let produced_before = env.stats.produced.load(Ordering::Relaxed);
        // Other requests on the same session are unaffected.
        for i in 0..50 {
            let (response, body) = get(&env.url(&format!("/bytes/{}", 1000 + i))).await;
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(body.len(), 1000 + i);
        }
        let request = Request::post(env.url("/echo")).body(full("still flowing")).unwrap();
        let (_, body) = fetch(&client, request).await;
        assert_eq!(body, "still flowing");
        assert!(produced_before < 10_000_000_000);
        // The stalled one still works when read.
        let mut body = stalled_download.into_body();
        let frame = body.frame().await.unwrap().unwrap();
        assert!(frame.is_data());
    })
    .await;
}
