//! `101 Switching Protocols` turns a stream into a raw pipe: WebSocket clients work through the
//! tunnel.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn websocket_echo_through_the_tunnel() {
    bounded(async {
        let env = TestEnv::start().await;
        let url = format!("ws://{}/t/{}/ws", env.gateway_addr, env.tunnel_id);
        let tcp = tokio::net::TcpStream::connect(env.gateway_addr).await.unwrap();
        let (mut ws, response) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
        assert_eq!(response.status(), 101);

        ws.send(Message::text("hello through ferry")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello through ferry"));
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        for _ in 0..5 {
            ws.send(Message::binary(big.clone())).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(big.clone()));
        }
        ws.close(None).await.unwrap();
        while let Some(Ok(message)) = ws.next().await {
            assert!(message.is_close());
        }
        drop(ws);
        // The upgraded stream is counted as in flight until it closes.
        env.gateway.registry.all()[0].wait_idle().await;
    })
    .await;
}
