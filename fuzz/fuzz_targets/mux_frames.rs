//! Arbitrary bytes as what a peer sends to ferry's yamux (`ferry_transport::multiplex`), in both
//! roles, with one stream of our own open: every input ends the connection (cleanly at a frame
//! boundary, or with an error), never a panic or a hang, and every stream it opened then reads
//! to its end or an error.
#![no_main]

use std::future::poll_fn;
use std::sync::OnceLock;
use std::task::Poll;

use ferry_transport::multiplex::{self, Config, Mode};
use futures_util::FutureExt;
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use tokio::runtime::Runtime;

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime"))
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        for mode in [Mode::Client, Mode::Server] {
            let (ours, mut peer) = tokio::io::duplex(1 << 20);
            let config = Config { max_streams: 8, max_connection_window: 8 * 256 * 1024 + (1 << 20), split_send_size: 16 * 1024 };
            let (mut driver, opener) = multiplex::connection(ours, mode, config);
            let mut mine = opener.open().await.expect("a fresh connection opens a stream");
            mine.write_all(b"hello").await.expect("within the initial window");
            peer.write_all(data).await.expect("the pipe holds the input");
            peer.shutdown().await.expect("shutdown of an in-memory pipe");
            let mut inbound = Vec::new();
            let ended = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                poll_fn(|cx| driver.poll_drive(cx, &mut |stream| inbound.push(stream))),
            )
            .await;
            assert!(ended.is_ok(), "the connection did not end at the end of its input");
            for mut stream in inbound.into_iter().chain([mine]) {
                loop {
                    match poll_fn(|cx| Poll::Ready(stream.poll_chunk(cx, usize::MAX))).now_or_never() {
                        Some(Poll::Ready(Some(Ok(_)))) => {}
                        Some(Poll::Ready(None | Some(Err(_)))) => break,
                        _ => panic!("a stream of an ended connection waits"),
                    }
                }
            }
            drop(peer);
        }
    });
});
