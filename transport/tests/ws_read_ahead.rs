//! `WsIo` keeps reading while a write waits: a peer that is itself blocked writing to us (and so
//! not reading) must get its bytes through, or two busy yamux peers each holding a pong for the
//! other deadlock (see `ws.rs`). Deterministic: a 64 KiB pipe, the peer reads nothing until its
//! own writes are through.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_transport::ws::websocket_config;
use ferry_transport::{IoCounters, WsIo};
use futures_util::io::{AsyncReadExt, AsyncWriteExt};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

#[tokio::test]
async fn a_blocked_write_still_lets_the_peer_write() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let cfg = Some(websocket_config());
        let mut ours = WsIo::new(
            WebSocketStream::from_raw_socket(ours, Role::Server, cfg).await,
            Role::Server,
            Arc::new(IoCounters::default()),
        );
        let mut theirs = WebSocketStream::from_raw_socket(theirs, Role::Client, cfg).await;

        // We write 4 MiB, far more than the pipe and every buffer hold: the write waits for the
        // peer to read.
        let outgoing: Vec<u8> = (0..4u32 << 20).map(|i| i as u8).collect();
        let writing = tokio::spawn(async move {
            ours.write_all(&outgoing).await.unwrap();
            ours.flush().await.unwrap();
            ours
        });

        // The peer, which reads nothing yet, sends 512 KiB in 8 messages: 8 times the pipe.
        let messages: Vec<Bytes> = (0..8u8).map(|i| Bytes::from(vec![i; 64 * 1024])).collect();
        for message in &messages {
            tokio::time::timeout(Duration::from_secs(5), theirs.send(Message::Binary(message.clone())))
                .await
                .expect("the peer's write is stuck: the blocked writer stopped reading")
                .unwrap();
        }
        assert!(!writing.is_finished(), "our write should still be waiting for the peer");

        // Now the peer reads everything we wrote, and we read everything it sent, in order.
        let mut received = Vec::new();
        while received.len() < 4 << 20 {
            match theirs.next().await.unwrap().unwrap() {
                Message::Binary(data) => received.extend_from_slice(&data),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(received.iter().enumerate().all(|(i, &b)| b == i as u8), "bytes out of order");
        let mut ours = writing.await.unwrap();
        for message in &messages {
            let mut buf = vec![0u8; message.len()];
            ours.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, message.as_ref());
        }
    })
    .await
    .expect("test timed out");
}
