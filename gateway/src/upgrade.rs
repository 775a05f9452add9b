//! A connection handed over after `101 Switching Protocols`, whichever server read the request:
//! hyper (HTTP/2 connections) or the gateway's own HTTP/1.1 server ([`crate::http1`]).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// A byte stream both ways.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// The connection after `101`: the client's bytes from the first one after its request head.
pub(crate) type Upgraded = Box<dyn Io>;

/// Where the connection of an upgrade request will come from once `101` has been written.
pub(crate) enum OnUpgrade {
    Hyper(hyper::upgrade::OnUpgrade),
    Own(oneshot::Receiver<Upgraded>),
}

/// What the HTTP/1.1 server puts in a request that asks for an upgrade: the other end of the
/// channel it sends the connection on after writing `101`. (Extensions must be `Clone`; only
/// the first to take it gets the connection.)
#[derive(Clone)]
pub(crate) struct OwnUpgrade(Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

impl OwnUpgrade {
    pub(crate) fn new() -> (oneshot::Sender<Upgraded>, Self) {
        let (tx, rx) = oneshot::channel();
        (tx, Self(Arc::new(Mutex::new(Some(rx)))))
    }
}

/// The connection `request` will hand over after `101` (from whichever server read it).
pub(crate) fn on<B>(request: &mut Request<B>) -> OnUpgrade {
    let own = request.extensions_mut().remove::<OwnUpgrade>();
    match own.and_then(|own| own.0.lock().unwrap_or_else(|e| e.into_inner()).take()) {
        Some(rx) => OnUpgrade::Own(rx),
        None => OnUpgrade::Hyper(hyper::upgrade::on(request)),
    }
}

impl OnUpgrade {
    /// Waits for the connection.
    ///
    /// # Errors
    /// The `101` was never written (the client left first, or the server gave up).
    pub(crate) async fn upgraded(self) -> Result<Upgraded, io::Error> {
        match self {
            Self::Hyper(on) => match on.await {
                Ok(upgraded) => Ok(Box::new(TokioIo::new(upgraded))),
                Err(err) => Err(io::Error::other(err)),
            },
            Self::Own(rx) => {
                rx.await.map_err(|_| io::Error::new(io::ErrorKind::ConnectionAborted, "no upgrade"))
            }
        }
    }
}

/// A stream whose first bytes were already read (into `prefix`): they are read again first.
#[derive(Debug)]
pub(crate) struct Rewind<I> {
    prefix: Bytes,
    inner: I,
}

impl<I> Rewind<I> {
    pub(crate) fn new(prefix: Bytes, inner: I) -> Self {
        Self { prefix, inner }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn rewind_reads_the_prefix_then_the_stream() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b" world").await.unwrap();
        drop(client);
        let mut io = Rewind::new(Bytes::from_static(b"hello"), server);
        let mut got = String::new();
        tokio::time::timeout(std::time::Duration::from_secs(5), io.read_to_string(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, "hello world");
    }
}
