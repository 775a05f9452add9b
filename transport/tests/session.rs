//! The shared I/O stack without sockets: two yamux sessions over WebSockets over an in-memory
//! duplex pipe, exchanging frames and bodies.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use ferry_codec::{AbortCode, Frame};
use ferry_transport::body::{BodyError, send_body};
use ferry_transport::mux::{STREAM_WINDOW, SessionConfig, session};
use ferry_transport::stream::split;
use ferry_transport::ws::websocket_config;
use ferry_transport::{FrameBody, IoCounters, StreamOpener, WsIo, multiplex};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;

const TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A "gateway" session (server mode) and the inbound streams of an "agent" session (client mode).
async fn pair() -> (StreamOpener, mpsc::Receiver<multiplex::Stream>, CancellationToken) {
    let (a, b) = tokio::io::duplex(256 * 1024);
    let cfg = Some(websocket_config());
    let server_ws = WebSocketStream::from_raw_socket(a, Role::Server, cfg).await;
    let client_ws = WebSocketStream::from_raw_socket(b, Role::Client, cfg).await;
    let config = SessionConfig::default();
    let shutdown = CancellationToken::new();

    let (server, opener) = session(
        WsIo::new(server_ws, Role::Server, Arc::new(IoCounters::default())),
        multiplex::Mode::Server,
        &config,
    );
    let (client, _client_opener) = session(
        WsIo::new(client_ws, Role::Client, Arc::new(IoCounters::default())),
        multiplex::Mode::Client,
        &config,
    );
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(server.run(|_| {}, shutdown.clone()));
    tokio::spawn(
        client.run(move |stream| tx.try_send(stream).expect("test channel has room"), shutdown.clone()),
    );
    (opener, rx, shutdown)
}

#[tokio::test]
async fn frames_and_a_large_body_cross_both_ways() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (opener, mut inbound, _shutdown) = pair().await;
        // The "agent" echoes every body it gets back on the same stream.
        tokio::spawn(async move {
            while let Some(stream) = inbound.recv().await {
                tokio::spawn(async move {
                    let (reader, mut writer) = split(stream);
                    send_body(FrameBody::new(reader, None), &mut writer, AbortCode::UpstreamReset)
                        .await
                        .unwrap();
                    writer.finish().await.unwrap();
                });
            }
        });

        let payload: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let payload = Bytes::from(payload);
        let (stream, _slot) = opener.open().await.unwrap();
        let (reader, mut writer) = split(stream);
        let upload = tokio::spawn({
            let payload = payload.clone();
            async move {
                let body = http_body_util::Full::new(payload);
                send_body(body, &mut writer, AbortCode::ClientGone).await.unwrap();
                writer.finish().await.unwrap();
            }
        });
        let echoed = FrameBody::new(reader, None).collect().await.unwrap().to_bytes();
        upload.await.unwrap();
        assert_eq!(echoed.len(), payload.len());
        assert!(echoed == payload);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn many_concurrent_streams_are_independent() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (opener, mut inbound, _shutdown) = pair().await;
        // The "agent" never reads the first stream; it echoes every other one.
        tokio::spawn(async move {
            let unread = inbound.recv().await.unwrap();
            while let Some(stream) = inbound.recv().await {
                tokio::spawn(async move {
                    let (mut reader, mut writer) = split(stream);
                    while let Some(frame) = reader.next().await {
                        let frame = frame.unwrap();
                        let end = frame == Frame::End;
                        writer.send(&frame).await.unwrap();
                        if end {
                            break;
                        }
                    }
                    writer.finish().await.unwrap();
                });
            }
            drop(unread);
        });
        // Far more than a stream window goes into the unread stream: the writer fills the window
        // (and every buffer of the session on the way) and then waits.
        let (stalled, _slot) = opener.open().await.unwrap();
        let (_stalled_reader, mut stalled_writer) = split(stalled);
        let written = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&written);
        let stalled_task = tokio::spawn(async move {
            let chunk = Bytes::from(vec![7u8; 64 * 1024]);
            for _ in 0..64 {
                stalled_writer.send_data(&chunk).await.unwrap();
                stalled_writer.flush().await.unwrap();
                counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        });
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = written.load(Ordering::Relaxed);
            if now == last && now > 0 {
                break;
            }
            last = now;
        }
        assert!(!stalled_task.is_finished(), "4 MiB went into a stream nobody reads");
        // Counted per finished 64 KiB chunk: the one that waits for credit is not counted.
        assert!(
            last + 64 * 1024 >= STREAM_WINDOW as u64,
            "the stalled stream did not fill its window: {last}"
        );

        // 500 streams opened now, each with its own deadline, all get their echo.
        let mut tasks = Vec::new();
        for i in 0..500u32 {
            let opener = opener.clone();
            tasks.push(tokio::spawn(async move {
                let (stream, _slot) = opener.open().await.unwrap();
                let (mut reader, mut writer) = split(stream);
                let data = Frame::Data(Bytes::from(i.to_be_bytes().to_vec()));
                writer.send(&data).await.unwrap();
                writer.send(&Frame::End).await.unwrap();
                assert_eq!(reader.next().await.unwrap().unwrap(), data);
                assert_eq!(reader.next().await.unwrap().unwrap(), Frame::End);
                assert!(reader.next().await.is_none());
            }));
        }
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("a stream waited behind the unread one")
                .unwrap();
        }
        assert!(!stalled_task.is_finished());
        assert_eq!(written.load(Ordering::Relaxed), last, "the stalled stream stayed stalled");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_stream_cut_before_end_is_an_error_not_a_short_body() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (opener, mut inbound, _shutdown) = pair().await;
        tokio::spawn(async move {
            let stream = inbound.recv().await.unwrap();
            let (_reader, mut writer) = split(stream);
            writer.send(&Frame::Data(Bytes::from_static(b"partial"))).await.unwrap();
            // Dropping the stream without `End` resets it.
        });
        let (reader, mut writer) = split(opener.open().await.unwrap().0);
        writer.send(&Frame::End).await.unwrap();
        let mut body = FrameBody::new(reader, None);
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "partial");
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(matches!(err, BodyError::Truncated | BodyError::Transport(_)), "{err:?}");
    })
    .await
    .expect("test timed out");
}
