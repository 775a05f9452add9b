//! ferry's yamux against the `yamux` crate (the reference), in both roles, on arbitrary plans:
//! streams of arbitrary sizes opened at once by one side and echoed by the other, some dropped
//! half-way. Every stream that is not dropped gets exactly its bytes back; a dropped one ends the
//! other side's copy with an error or an end, never a hang.
#![no_main]

use std::future::poll_fn;
use std::task::Poll;
use std::time::Duration;

use arbitrary::Arbitrary;
use ferry_transport::multiplex::{self, Config, Mode};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

#[derive(Debug, Arbitrary)]
struct Plan {
    /// Which side opens: ours (client) or the crate's (client).
    ours_open: bool,
    streams: Vec<StreamPlan>,
}

#[derive(Debug, Arbitrary)]
struct StreamPlan {
    len: u32,
    /// Dropped after writing half, without reading.
    drop_half_way: bool,
}

/// A runtime per input: dropping it ends the echo tasks and connections the input left running.
fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime")
}

fn payload(len: usize, seed: usize) -> Vec<u8> {
    (0..len).map(|i| (i ^ seed) as u8).collect()
}

async fn echo<S: AsyncRead + AsyncWrite>(stream: S) {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let _ = tokio::io::copy(&mut reader, &mut writer).await;
    let _ = writer.shutdown().await;
}

/// Runs one stream's side of the plan; `Some(bytes back)` unless it was dropped.
async fn run<S: AsyncRead + AsyncWrite>(stream: S, data: Vec<u8>, drop_half_way: bool) -> Option<(Vec<u8>, Vec<u8>)> {
    let (mut reader, mut writer) = tokio::io::split(stream);
    if drop_half_way {
        let _ = writer.write_all(&data[..data.len() / 2]).await;
        return None;
    }
    let write = async {
        writer.write_all(&data).await.expect("write");
        writer.shutdown().await.expect("finish");
    };
    let read = async {
        let mut back = Vec::new();
        reader.read_to_end(&mut back).await.expect("read the echo");
        back
    };
    let ((), back) = tokio::join!(write, read);
    Some((back, data))
}

/// The crate's side: a task owns the connection; opens go through a channel.
fn theirs(io: DuplexStream, mode: yamux::Mode) -> (mpsc::UnboundedSender<oneshot::Sender<yamux::Stream>>, mpsc::UnboundedReceiver<yamux::Stream>) {
    let mut conn = yamux::Connection::new(io.compat(), yamux::Config::default(), mode);
    let (open_tx, mut open_rx) = mpsc::unbounded_channel::<oneshot::Sender<yamux::Stream>>();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(poll_fn(move |cx| {
        while let Poll::Ready(Some(reply)) = open_rx.poll_recv(cx) {
            match conn.poll_new_outbound(cx) {
                Poll::Ready(Ok(stream)) => drop(reply.send(stream)),
                // The plan stays under the crate's limits (64 streams).
                _ => panic!("the crate could not open a stream"),
            }
        }
        loop {
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(stream))) => drop(tx.send(stream)),
                Poll::Ready(_) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
    }));
    (open_tx, rx)
}

fuzz_target!(|plan: Plan| {
    let streams: Vec<(usize, bool)> =
        plan.streams.iter().take(64).map(|s| ((s.len % 600_000) as usize, s.drop_half_way)).collect();
    runtime().block_on(async {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (ours_mode, their_mode) = if plan.ours_open {
            (Mode::Client, yamux::Mode::Server)
        } else {
            (Mode::Server, yamux::Mode::Client)
        };
        let (mut driver, opener) = multiplex::connection(a, ours_mode, Config::default());
        let (our_tx, mut our_inbound) = mpsc::unbounded_channel();
        let driving = tokio::spawn(async move {
            let _ = poll_fn(|cx| driver.poll_drive(cx, &mut |stream| drop(our_tx.send(stream)))).await;
        });
        let (their_open, mut their_inbound) = theirs(b, their_mode);
        let mut tasks = Vec::new();
        if plan.ours_open {
            tokio::spawn(async move {
                while let Some(stream) = their_inbound.recv().await {
                    tokio::spawn(echo(stream.compat()));
                }
            });
            for (i, &(len, drop_half_way)) in streams.iter().enumerate() {
                let stream = opener.open().await.expect("our side opens");
                tasks.push(tokio::spawn(run(stream, payload(len, i), drop_half_way)));
            }
        } else {
            tokio::spawn(async move {
                while let Some(stream) = our_inbound.recv().await {
                    tokio::spawn(echo(stream));
                }
            });
            for (i, &(len, drop_half_way)) in streams.iter().enumerate() {
                let (reply, stream) = oneshot::channel();
                their_open.send(reply).expect("the crate's side runs");
                let mut stream = stream.await.expect("the crate's side opens");
                // The crate announces a stream only with a write (see the interop tests).
                futures_util::io::AsyncWriteExt::write(&mut stream, &[]).await.expect("announce");
                tasks.push(tokio::spawn(run(stream.compat(), payload(len, i), drop_half_way)));
            }
        }
        for task in tasks {
            let done = tokio::time::timeout(Duration::from_secs(20), task).await.expect("a stream hung");
            if let Some((back, data)) = done.expect("the stream's task") {
                assert!(back == data, "{} bytes came back as {} bytes, or different", data.len(), back.len());
            }
        }
        driving.abort();
    });
});
