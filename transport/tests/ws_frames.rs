//! `WsIo` frames the session itself; tungstenite is the reference on the other end, in both roles:
//! bytes in order both ways whatever the message and fragment sizes, pings answered, a close
//! answered and read as the end, and a protocol error told to the peer with close code 1002.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_transport::ws::websocket_config;
use ferry_transport::{IoCounters, WsIo};
use futures_util::io::{AsyncReadExt, AsyncWriteExt};
use futures_util::{SinkExt, StreamExt};
use tokio::io::DuplexStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};

async fn pair(our_role: Role) -> (WsIo<DuplexStream>, WebSocketStream<DuplexStream>) {
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    let their_role = if our_role == Role::Server { Role::Client } else { Role::Server };
    let cfg = Some(websocket_config());
    let ours = WebSocketStream::from_raw_socket(ours, our_role, cfg).await;
    let theirs = WebSocketStream::from_raw_socket(theirs, their_role, cfg).await;
    (WsIo::new(ours, our_role, Arc::new(IoCounters::default())), theirs)
}

/// A deterministic byte pattern and a spread of sizes (no RNG needed).
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_mul(31).wrapping_add(seed) >> 3) as u8).collect()
}

fn sizes() -> impl Iterator<Item = usize> {
    [0, 1, 2, 125, 126, 127, 4_000, 65_535, 65_536, 65_537, 300_000].into_iter()
}

/// One raw frame (tungstenite masks it when it is the client).
fn raw_frame(opcode: OpCode, fin: bool, payload: Vec<u8>) -> Frame {
    Frame::from_payload(FrameHeader { is_final: fin, opcode, ..FrameHeader::default() }, payload.into())
}

async fn both_ways(our_role: Role) {
    let (mut ours, mut theirs) = pair(our_role).await;

    // The peer sends whole messages, fragmented messages and pings in between.
    let mut expected = Vec::new();
    let peer = tokio::spawn(async move {
        for (i, size) in sizes().enumerate() {
            let data = pattern(size, i as u32);
            if i % 2 == 0 {
                theirs.send(Message::Binary(data.clone().into())).await.unwrap();
            } else {
                let (a, b) = data.split_at(size / 3);
                let first = raw_frame(OpCode::Data(Data::Binary), false, a.to_vec());
                theirs.send(Message::Frame(first)).await.unwrap();
                theirs.send(Message::Ping(Bytes::from_static(b"are you there"))).await.unwrap();
                let last = raw_frame(OpCode::Data(Data::Continue), true, b.to_vec());
                theirs.send(Message::Frame(last)).await.unwrap();
            }
        }
        // Then it reads what we send, skipping the pongs (and counting them).
        let mut received = Vec::new();
        let mut pongs = 0;
        let total: usize = sizes().sum();
        while received.len() < total {
            match theirs.next().await.unwrap().unwrap() {
                Message::Binary(data) => received.extend_from_slice(&data),
                Message::Pong(payload) => {
                    assert_eq!(&payload[..], b"are you there");
                    pongs += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        (theirs, received, pongs)
    });
    for (i, size) in sizes().enumerate() {
        expected.extend(pattern(size, i as u32));
    }
    let mut got = vec![0u8; expected.len()];
    ours.read_exact(&mut got).await.unwrap();
    assert!(got == expected, "bytes from the peer differ");

    // We write in odd pieces, flushing after each.
    let mut outgoing = Vec::new();
    for (i, size) in sizes().enumerate() {
        let data = pattern(size, 1000 + i as u32);
        ours.write_all(&data).await.unwrap();
        ours.flush().await.unwrap();
        outgoing.extend(data);
    }
    ours.flush().await.unwrap();
    let (mut theirs, received, pongs) = peer.await.unwrap();
    assert!(received == outgoing, "bytes to the peer differ");
    assert!(pongs >= 1, "pings get pongs");

    // A close from the peer ends our reads and is answered.
    theirs.close(None).await.unwrap();
    let mut rest = Vec::new();
    ours.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    ours.flush().await.unwrap();
    match theirs.next().await {
        Some(Ok(Message::Close(_))) | None => {}
        other => panic!("expected the close to be answered, got {other:?}"),
    }
}

#[tokio::test]
async fn as_server_against_a_tungstenite_client() {
    tokio::time::timeout(Duration::from_secs(30), both_ways(Role::Server)).await.expect("timed out");
}

#[tokio::test]
async fn as_client_against_a_tungstenite_server() {
    tokio::time::timeout(Duration::from_secs(30), both_ways(Role::Client)).await.expect("timed out");
}

#[tokio::test]
async fn a_text_message_is_refused_with_close_code_1002() {
    tokio::time::timeout(Duration::from_secs(10), async {
        let (mut ours, mut theirs) = pair(Role::Server).await;
        theirs.send(Message::Text("hello".into())).await.unwrap();
        let mut buf = [0u8; 16];
        let err = ours.read(&mut buf).await.unwrap_err();
        assert!(err.to_string().contains("text message"), "{err}");
        match theirs.next().await.unwrap().unwrap() {
            Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Protocol),
            other => panic!("expected close 1002, got {other:?}"),
        }
    })
    .await
    .expect("timed out");
}

#[tokio::test]
async fn the_socket_ending_inside_a_frame_is_an_error_and_between_frames_an_end() {
    tokio::time::timeout(Duration::from_secs(10), async {
        // A frame header announcing 100 bytes, then 10 bytes, then the end.
        let (ours, mut raw) = tokio::io::duplex(1024);
        let ws = WebSocketStream::from_raw_socket(ours, Role::Client, None).await;
        let mut ours = WsIo::new(ws, Role::Client, Arc::new(IoCounters::default()));
        tokio::io::AsyncWriteExt::write_all(&mut raw, &[0x82, 100]).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut raw, &[7; 10]).await.unwrap();
        drop(raw);
        let mut buf = vec![0u8; 100];
        assert_eq!(ours.read(&mut buf).await.unwrap(), 10);
        let err = ours.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);

        let (ours, mut raw) = tokio::io::duplex(1024);
        let ws = WebSocketStream::from_raw_socket(ours, Role::Client, None).await;
        let mut ours = WsIo::new(ws, Role::Client, Arc::new(IoCounters::default()));
        tokio::io::AsyncWriteExt::write_all(&mut raw, &[0x82, 3, 1, 2, 3]).await.unwrap();
        drop(raw);
        let mut all = Vec::new();
        ours.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, [1, 2, 3]);
    })
    .await
    .expect("timed out");
}
