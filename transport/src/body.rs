//! Bodies over a stream: [`FrameBody`] turns incoming frames into an `http_body::Body`;
//! [`send_body`] turns a body into outgoing frames.
//!
//! Both are pulled by their consumer. hyper polls a [`FrameBody`] only when it can write what it
//! gets, so a slow reader stops us reading the stream, yamux stops granting credit, and the writer
//! on the other side waits: backpressure end to end, with at most a stream window in flight.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use ferry_codec::{Abort, AbortCode, Frame, Trailers};
use http::HeaderMap;
use http_body::{Body, SizeHint};

use crate::TransportError;
use crate::heads::{headers_from_wire, headers_to_wire};
use futures_util::FutureExt;

use crate::stream::{FrameReader, FrameWriter};

/// Why a [`FrameBody`] ended without its `End` frame: the body is incomplete and the consumer must
/// make that visible (hyper then cuts the connection or resets the HTTP/2 stream).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    /// The sender aborted the stream.
    #[error("stream aborted by peer: {:?} {}", .0.code, .0.message)]
    Aborted(Abort),
    /// The stream ended (or was reset) before `End`.
    #[error("stream ended before the body was complete")]
    Truncated,
    /// More bytes than the announced length.
    #[error("body longer than its announced length")]
    TooLong,
    /// A frame that has no place in a body.
    #[error("unexpected {0} frame in a body")]
    Unexpected(&'static str),
    /// Reading the stream failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// An `http_body::Body` fed by `Data`, `Trailers` and `End` frames from a stream.
#[derive(Debug)]
pub struct FrameBody {
    reader: Option<FrameReader>,
    /// Bytes still expected when the length is known.
    remaining: Option<u64>,
}

impl FrameBody {
    /// A body read from `reader`, of `len` bytes when known.
    pub fn new(reader: FrameReader, len: Option<u64>) -> Self {
        Self { reader: Some(reader), remaining: len }
    }

    /// A body that is already complete.
    pub fn empty() -> Self {
        Self { reader: None, remaining: Some(0) }
    }
}

impl Body for FrameBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let Some(reader) = this.reader.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = match ready!(reader.poll_next(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(err)) => {
                this.reader = None;
                return Poll::Ready(Some(Err(err.into())));
            }
            None => {
                this.reader = None;
                return Poll::Ready(Some(Err(BodyError::Truncated)));
            }
        };
        let result = match frame {
            Frame::Data(data) => {
                if let Some(remaining) = this.remaining.as_mut() {
                    match remaining.checked_sub(data.len() as u64) {
                        Some(rest) => *remaining = rest,
                        None => {
                            this.reader = None;
                            return Poll::Ready(Some(Err(BodyError::TooLong)));
                        }
                    }
                }
                return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
            }
            Frame::Trailers(trailers) => {
                Some(Ok(http_body::Frame::trailers(headers_from_wire(trailers.headers))))
            }
            Frame::End if this.remaining.is_some_and(|r| r > 0) => Some(Err(BodyError::Truncated)),
            Frame::End => None,
            Frame::Abort(abort) => Some(Err(BodyError::Aborted(abort))),
            Frame::Head(_) => Some(Err(BodyError::Unexpected("Head"))),
        };
        // After trailers only `End` may follow; we stop reading here either way. What is left of
        // the stream is dropped with this body.
        this.reader = None;
        Poll::Ready(result)
    }

    fn is_end_stream(&self) -> bool {
        self.reader.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(len) => SizeHint::with_exact(len),
            None => SizeHint::default(),
        }
    }
}

/// How a [`send_body`] failed: the body's side or the stream's side.
#[derive(Debug, thiserror::Error)]
pub enum SendBodyError<E> {
    /// The body failed; an `Abort` was sent (if the stream still worked).
    #[error("body failed")]
    Body(#[source] E),
    /// The stream failed (the peer reset it, or the session is gone).
    #[error(transparent)]
    Stream(#[from] TransportError),
}

/// Sends `body` as `Data` frames, then `Trailers` if any, then `End`. If the body fails, sends
/// `Abort(on_error)` instead of `End`, so the other side can never mistake a cut body for a
/// complete one. Waits for stream credit as it goes (backpressure).
///
/// Frames are queued while the body has more ready at once and written together when it would
/// wait (or a yamux frame's worth is queued): a small response goes out with its head (if the
/// caller queued it) as one write. Does not close the stream: an upgraded stream goes on as a raw
/// pipe.
///
/// # Errors
/// The body or the stream failed.
pub async fn send_body<B>(
    mut body: B,
    writer: &mut FrameWriter,
    on_error: AbortCode,
) -> Result<u64, SendBodyError<B::Error>>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut sent = 0u64;
    let mut trailers: Option<HeaderMap> = None;
    loop {
        let frame = match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).now_or_never() {
            Some(frame) => frame,
            None => {
                // Nothing more right now: what is queued goes out before we wait.
                writer.flush().await?;
                std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            }
        };
        match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    sent += data.len() as u64;
                    writer.send_data(&data).await?;
                }
                Err(frame) => {
                    if let Ok(map) = frame.into_trailers() {
                        trailers.get_or_insert_with(HeaderMap::new).extend(map);
                    }
                }
            },
            Some(Err(err)) => {
                let abort = Abort::new(on_error, "body failed before its end");
                // The stream may be what failed; the body error is the one to report.
                let _ = writer.send(&Frame::Abort(abort)).await;
                return Err(SendBodyError::Body(err));
            }
            None => break,
        }
    }
    if let Some(map) = trailers {
        writer.queue(&Frame::Trailers(Trailers { headers: headers_to_wire(&map) }))?;
    }
    writer.send(&Frame::End).await?;
    Ok(sent)
}

/// A body that gives up when its source goes quiet: `idle` spent waiting for the next frame
/// (time the consumer spends elsewhere does not count) ends it with [`IdleError`]. For bodies
/// whose sender may stall forever: a client that pauses its upload, an upstream that stops
/// mid-response. The consumer then aborts the other side, so the stall becomes a visible failure
/// instead of a stream held open for nobody.
#[derive(Debug)]
pub struct IdleTimeout<B> {
    inner: B,
    idle: std::time::Duration,
    /// Armed while `inner` is pending.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
}

/// The body's source sent nothing for the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("no body bytes for {0:?}")]
pub struct IdleError(pub std::time::Duration);

impl<B> IdleTimeout<B> {
    /// Wraps `inner`; a wait longer than `idle` for its next frame fails it.
    pub fn new(inner: B, idle: std::time::Duration) -> Self {
        Self { inner, idle, timer: None, waiting: false }
    }

    /// The wrapped body.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = false;
                Poll::Ready(frame.map(|result| result.map_err(Into::into)))
            }
            Poll::Pending => {
                let deadline = tokio::time::Instant::now() + this.idle;
                if !this.waiting {
                    this.waiting = true;
                    match this.timer.as_mut() {
                        Some(timer) => timer.as_mut().reset(deadline),
                        None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                }
                let timer = this.timer.as_mut().expect("armed above");
                ready!(timer.as_mut().poll(cx));
                this.waiting = false;
                Poll::Ready(Some(Err(Box::new(IdleError(this.idle)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod idle_tests {
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_quiet_source_fails_after_the_idle_time_and_a_slow_consumer_does_not() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(4);
        let stream =
            futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
        let mut body = IdleTimeout::new(StreamBody::new(Box::pin(stream)), Duration::from_secs(10));
        tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"a")))).await.unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        // The consumer takes a minute before asking again: that is not the source's silence.
        tokio::time::sleep(Duration::from_secs(60)).await;
        tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"b")))).await.unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        // 9 s of silence is fine, then the source speaks; then 10 s of silence is not.
        let started = tokio::time::Instant::now();
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(9)).await;
            tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"c")))).await.unwrap();
            tx
        });
        assert!(body.frame().await.unwrap().is_ok());
        let _tx = sender.await.unwrap();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<IdleError>());
        assert_eq!(started.elapsed(), Duration::from_secs(19));
    }
}
