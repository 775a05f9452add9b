//! [`Stream`]: one stream of a connection, as chunks of `Bytes` or through either family of I/O
//! traits (`futures` and `tokio`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;

use super::{Header, Kind, OUT_HIGH_WATER, SharedRef, flags, lock};

/// One stream. Dropping it before both sides finished resets it (RST), so the peer sees an
/// abort, never a clean end.
#[derive(Debug)]
pub struct Stream {
    id: u32,
    shared: SharedRef,
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "the session is closed")
}

fn reset() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "the stream was reset")
}

impl Stream {
    pub(super) fn new(id: u32, shared: SharedRef) -> Self {
        Self { id, shared }
    }

    /// The stream id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The next received chunk, at most `max` bytes, as it arrived (no copy); `None` once the
    /// peer finished its side.
    ///
    /// # Errors
    /// The stream was reset, or the session ended before the peer finished.
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<Option<io::Result<Bytes>>> {
        let mut shared = lock(&self.shared);
        let closed_session = shared.closed;
        let Some(entry) = shared.streams.get_mut(&self.id) else {
            return Poll::Ready(Some(Err(reset())));
        };
        if let Some(front) = entry.recv.front_mut() {
            let chunk = if front.len() > max {
                front.split_to(max)
            } else {
                let Some(chunk) = entry.recv.pop_front() else {
                    unreachable!("the front was just seen");
                };
                chunk
            };
            entry.buffered -= chunk.len();
            shared.consumed(self.id);
            return Poll::Ready(Some(Ok(chunk)));
        }
        // The peer finished its side cleanly; a reset after that only stops our writing.
        if entry.got_fin {
            return Poll::Ready(None);
        }
        if entry.reset {
            return Poll::Ready(Some(Err(reset())));
        }
        if closed_session {
            return Poll::Ready(Some(Err(closed())));
        }
        entry.starved = true;
        if !entry.reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            entry.reader = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    fn poll_read_into(&mut self, cx: &mut Context<'_>, dst: &mut [u8]) -> Poll<io::Result<usize>> {
        if dst.is_empty() {
            return Poll::Ready(Ok(0));
        }
        match self.poll_chunk(cx, dst.len()) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(Ok(0)),
            Poll::Ready(Some(Err(err))) => Poll::Ready(Err(err)),
            Poll::Ready(Some(Ok(chunk))) => {
                dst[..chunk.len()].copy_from_slice(&chunk);
                Poll::Ready(Ok(chunk.len()))
            }
        }
    }

    /// Queues up to one frame of `buf` (as much as the stream's credit allows). An empty write
    /// sends an empty frame if the stream still has to be announced or acknowledged.
    ///
    /// # Errors
    /// The stream was reset or closed for writing, or the session ended.
    pub fn poll_write_frame(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_prefixed(cx, &[], buf)
    }

    /// Like [`Stream::poll_write_frame`], with `prefix` (a header of the caller's, at most a few
    /// bytes) in the same frame before `buf`, so the peer receives both in one chunk. The prefix
    /// is always written whole; the count returned is of `buf` bytes (possibly 0 if the credit
    /// only covered the prefix).
    ///
    /// # Errors
    /// As [`Stream::poll_write_frame`].
    pub fn poll_write_prefixed(
        &mut self,
        cx: &mut Context<'_>,
        prefix: &[u8],
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut shared = lock(&self.shared);
        if shared.closed {
            return Poll::Ready(Err(closed()));
        }
        let out_full = shared.out.len() >= OUT_HIGH_WATER;
        let split = shared.config.split_send_size;
        let Some(entry) = shared.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(reset()));
        };
        if entry.reset {
            return Poll::Ready(Err(reset()));
        }
        if entry.sent_fin {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the stream is closed for writing",
            )));
        }
        if buf.is_empty() && prefix.is_empty() {
            if entry.flag != 0 {
                let flag = shared.take_flag(self.id);
                shared.queue(Header::new(Kind::Data, flag, self.id, 0));
            }
            return Poll::Ready(Ok(0));
        }
        // Credit for the whole prefix and at least one byte.
        if (entry.send_window as usize) < prefix.len().max(1) {
            if !entry.writer.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                entry.writer = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        if out_full {
            shared.out_waiters.push(cx.waker().clone());
            return Poll::Pending;
        }
        let room = (entry.send_window as usize).min(split).saturating_sub(prefix.len());
        let n = buf.len().min(room);
        let len = prefix.len() + n;
        entry.send_window -= len as u32;
        let flag = shared.take_flag(self.id);
        let was_empty = shared.out.is_empty();
        shared.out.reserve(super::HEADER_LEN + len);
        Header::new(Kind::Data, flag, self.id, len as u32).encode(&mut shared.out);
        shared.out.extend_from_slice(prefix);
        shared.out.extend_from_slice(&buf[..n]);
        crate::stats::copied(len);
        if was_empty {
            shared.wake_driver();
        }
        Poll::Ready(Ok(n))
    }

    /// Half-closes: the peer reads to the end of what was written, then sees the end (FIN).
    ///
    /// # Errors
    /// The stream was reset, or the session ended.
    pub fn poll_finish(&mut self) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.shared);
        if shared.closed {
            return Poll::Ready(Err(closed()));
        }
        let Some(entry) = shared.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(reset()));
        };
        if entry.sent_fin {
            return Poll::Ready(Ok(()));
        }
        if entry.reset {
            return Poll::Ready(Err(reset()));
        }
        entry.sent_fin = true;
        let flag = shared.take_flag(self.id);
        shared.queue(Header::new(Kind::Data, flag | flags::FIN, self.id, 0));
        Poll::Ready(Ok(()))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        lock(&self.shared).release(self.id);
    }
}

impl futures_util::Stream for Stream {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_chunk(cx, usize::MAX)
    }
}

impl futures_util::io::AsyncRead for Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        self.poll_read_into(cx, buf)
    }
}

impl futures_util::io::AsyncWrite for Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_frame(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_finish()
    }
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        match self.poll_chunk(cx, buf.remaining()) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(Ok(())),
            Poll::Ready(Some(Err(err))) => Poll::Ready(Err(err)),
            Poll::Ready(Some(Ok(chunk))) => {
                buf.put_slice(&chunk);
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_frame(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_finish()
    }
}
