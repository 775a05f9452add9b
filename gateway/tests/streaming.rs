//! Bodies stream through the tunnel in both directions, as they arrive: large transfers with
//! checksums, server-sent events one by one, full-duplex echo, and broken upstreams that must
//! look broken to the client.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use ferry_benches::upstream::{pattern, pattern_sha256};
use futures_util::stream;
use http::{Request, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

const GIB: u64 = 1024 * 1024 * 1024;
/// Bound on each step of a paced exchange: a tunnel that buffers would stall here.
const STEP: Duration = Duration::from_secs(10);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn one_gib_download_arrives_intact() {
    bounded(async {
        let env = TestEnv::start().await;
        let expected = tokio::task::spawn_blocking(|| pattern_sha256(GIB));
        let response =
            send(&client(), Request::get(env.url(&format!("/bytes/{GIB}"))).body(empty()).unwrap()).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_LENGTH], GIB.to_string().as_str());
        let mut body = response.into_body();
        let (mut hasher, mut total) = (Sha256::new(), 0u64);
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                total += data.len() as u64;
                hasher.update(&data);
            }
        }
        assert_eq!(total, GIB);
        assert_eq!(hex(&hasher.finalize()), expected.await.unwrap());
    })
    .await;
}

#[tokio::test]
async fn one_gib_upload_arrives_intact() {
    bounded(async {
        let env = TestEnv::start().await;
        let hasher = std::sync::Arc::new(std::sync::Mutex::new(Sha256::new()));
        let sent = std::sync::Arc::clone(&hasher);
        let chunks = stream::unfold(0u64, move |offset| {
            let sent = std::sync::Arc::clone(&sent);
            async move {
                if offset >= GIB {
                    return None;
                }
                let data = pattern(offset, (GIB - offset).min(64 * 1024) as usize);
                sent.lock().unwrap().update(&data);
                let next = offset + data.len() as u64;
                Some((Ok::<_, BoxError>(Frame::data(data)), next))
            }
        });
        let request = Request::post(env.url("/sink"))
            .header(header::CONTENT_LENGTH, GIB)
            .body(StreamBody::new(chunks).boxed_unsync())
            .unwrap();
        let (response, body) = fetch(&client(), request).await;
        assert_eq!(response.status(), StatusCode::OK);
        let report = json(&body);
        assert_eq!(report["bytes"], GIB);
        let expected = hex(&hasher.lock().unwrap().clone().finalize());
        assert_eq!(report["sha256"], expected.as_str());
    })
    .await;
}

#[tokio::test]
async fn upload_of_unknown_length_is_streamed_chunked() {
    bounded(async {
        let env = TestEnv::start().await;
        let chunks =
            stream::iter((0..50u64).map(|i| Ok::<_, BoxError>(Frame::data(pattern(i * 1000, 1000)))));
        let request = Request::post(env.url("/sink")).body(StreamBody::new(chunks).boxed_unsync()).unwrap();
        let (response, body) = fetch(&client(), request).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(json(&body)["bytes"], 50_000);
        assert_eq!(json(&body)["sha256"], pattern_sha256(50_000).as_str());
    })
    .await;
}

#[tokio::test]
async fn server_sent_events_arrive_one_by_one() {
    bounded(async {
        let env = TestEnv::start().await;
        // The upstream sends each event after the first only when the test lets it: if anything on
        // the path waited for more data (or for the end), the next event would never be allowed.
        let response =
            send(&client(), Request::get(env.url("/sse?n=4&gated=1")).body(empty()).unwrap()).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "text/event-stream");
        let mut body = response.into_body();
        let mut text = String::new();
        for i in 0..4 {
            let want = format!("data: event {i}\n\n");
            while !text.contains(&want) {
                let frame = tokio::time::timeout(STEP, body.frame())
                    .await
                    .unwrap_or_else(|_| panic!("event {i} did not arrive on its own"))
                    .unwrap()
                    .unwrap();
                if let Ok(data) = frame.into_data() {
                    text.push_str(std::str::from_utf8(&data).unwrap());
                }
            }
            assert!(!text.contains(&format!("event {}", i + 1)), "event {} arrived early", i + 1);
            env.stats.gate.add_permits(1);
        }
        assert!(body.frame().await.is_none());
    })
    .await;
}

#[tokio::test]
async fn echo_is_full_duplex() {
    bounded(async {
        let env = TestEnv::start().await;
        let (tx, rx) = mpsc::channel::<Bytes>(1);
        let chunks = stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|data| (Ok::<_, BoxError>(Frame::data(data)), rx))
        });
        let request = Request::post(env.url("/echo")).body(StreamBody::new(chunks).boxed_unsync()).unwrap();
        let client = client();
        let pending = tokio::spawn(async move { client.request(request).await });
        tx.send(Bytes::from_static(b"ping 0;")).await.unwrap();
        // The response head and each echoed chunk come back while the upload is still open.
        let response =
            tokio::time::timeout(STEP, pending).await.expect("head before upload end").unwrap().unwrap();
        let mut body = response.into_body();
        for i in 0..5 {
            let want = format!("ping {i};");
            let mut got = String::new();
            while got.len() < want.len() {
                let frame = tokio::time::timeout(STEP, body.frame())
                    .await
                    .expect("echo before upload end")
                    .unwrap()
                    .unwrap();
                got.push_str(std::str::from_utf8(&frame.into_data().unwrap()).unwrap());
            }
            assert_eq!(got, want);
            if i < 4 {
                tx.send(Bytes::from(format!("ping {};", i + 1))).await.unwrap();
            }
        }
        drop(tx);
        assert!(body.frame().await.is_none(), "the echo ends when the upload does");
    })
    .await;
}

#[tokio::test]
async fn upstream_dying_mid_body_gives_a_broken_response() {
    bounded(async {
        let env = TestEnv::start().await;
        for client in [client(), h2c_client()] {
            for path in ["/reset?declared=1048576&after=1000", "/reset?after=1000"] {
                let response = send(&client, Request::get(env.url(path)).body(empty()).unwrap()).await;
                assert_eq!(response.status(), StatusCode::OK);
                let result = response.into_body().collect().await;
                assert!(result.is_err(), "{path}: a cut body must not look complete");
            }
        }
    })
    .await;
}
