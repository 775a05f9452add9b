//! Many streams at once over a real loopback socket, both directions busy, must all finish: a
//! smoke test at scale. The deadlock it guards against (yamux stops reading while it owes a
//! pong it cannot write; see `ws.rs`) depends on timing here; `ws_read_ahead.rs` checks the
//! mechanism that prevents it deterministically.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_transport::mux::{SessionConfig, session};
use ferry_transport::ws::websocket_config;
use ferry_transport::{IoCounters, WsIo, multiplex};
use futures_util::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_streams_both_ways_do_not_stall() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client_tcp = TcpStream::connect(addr).await.unwrap();
    let (server_tcp, _) = listener.accept().await.unwrap();
    let cfg = Some(websocket_config());
    let server_ws = WebSocketStream::from_raw_socket(server_tcp, Role::Server, cfg).await;
    let client_ws = WebSocketStream::from_raw_socket(client_tcp, Role::Client, cfg).await;
    let config = SessionConfig::default();
    let stop = CancellationToken::new();
    let (server, opener) = session(
        WsIo::new(server_ws, Role::Server, Arc::new(IoCounters::default())),
        multiplex::Mode::Server,
        &config,
    );
    let (client, _) = session(
        WsIo::new(client_ws, Role::Client, Arc::new(IoCounters::default())),
        multiplex::Mode::Client,
        &config,
    );
    tokio::spawn(server.run(|_| {}, stop.clone()));
    // The "agent": on each stream, sends 1 MiB and reads 1 MiB, at the same time.
    tokio::spawn(client.run(
        |stream| {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let sending = async {
                    let chunk = vec![3u8; 64 * 1024];
                    for _ in 0..16 {
                        write.write_all(&chunk).await.unwrap();
                    }
                };
                let receiving = async {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut got = 0;
                    while got < 1 << 20 {
                        got += read.read(&mut buf).await.unwrap();
                    }
                };
                tokio::join!(sending, receiving);
                let _ = write.close().await;
            });
        },
        stop.clone(),
    ));
    let received = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let (opener, received) = (opener.clone(), Arc::clone(&received));
        tasks.push(tokio::spawn(async move {
            let (stream, _slot) = opener.open().await.unwrap();
            let (mut read, mut write) = stream.split();
            let sending = async {
                let chunk = vec![5u8; 64 * 1024];
                for _ in 0..16 {
                    write.write_all(&chunk).await.unwrap();
                }
            };
            let receiving = async {
                let mut buf = vec![0u8; 64 * 1024];
                let mut got = 0;
                while got < 1 << 20 {
                    let n = read.read(&mut buf).await.unwrap();
                    assert!(n > 0);
                    got += n;
                    received.fetch_add(n as u64, Ordering::Relaxed);
                }
            };
            tokio::join!(sending, receiving);
        }));
    }
    let watch = {
        let received = Arc::clone(&received);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                println!("{:?}: {} MiB", started.elapsed(), received.load(Ordering::Relaxed) >> 20);
            }
        })
    };
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task).await.expect("the session stalled").unwrap();
    }
    watch.abort();
    println!("1000 streams, 1 GiB each way, in {:?}", started.elapsed());
    stop.cancel();
}
