//! A request body read by the HTTP/1.1 connection's task and taken by whoever holds the request
//! (the upload task): one piece at a time through a single slot, so the connection reads the
//! next piece only after the last one was taken (backpressure to the client's socket), and
//! learns when the body is first wanted (the moment to send `100 Continue`) or dropped.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

type Item = Result<Frame<Bytes>, io::Error>;

#[derive(Default)]
struct State {
    item: Option<Item>,
    /// The body ended where its framing says (after the item in the slot, if any).
    finished: bool,
    /// The sender will send nothing more (the body ended, failed, or the connection is gone).
    sender_done: bool,
    /// The body was dropped: nothing more is wanted.
    receiver_gone: bool,
    /// The body was polled at least once.
    wanted: bool,
    sender_waker: Option<Waker>,
    receiver_waker: Option<Waker>,
}

impl State {
    fn wake_receiver(&mut self) {
        if let Some(waker) = self.receiver_waker.take() {
            waker.wake();
        }
    }

    fn wake_sender(&mut self) {
        if let Some(waker) = self.sender_waker.take() {
            waker.wake();
        }
    }
}

struct Shared(Mutex<State>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The connection's end: puts the pieces of the body in the slot.
pub(crate) struct Sender(Arc<Shared>);

/// The request body (no slot at all when the head said there is none).
pub(crate) struct Inbound {
    shared: Option<Arc<Shared>>,
    /// Bytes still to come, when the head announced them.
    exact: Option<u64>,
    ended: bool,
}

/// A body fed by the returned sender; `length` is the announced length, if any.
pub(crate) fn channel(length: Option<u64>) -> (Sender, Inbound) {
    let shared = Arc::new(Shared(Mutex::new(State::default())));
    (Sender(Arc::clone(&shared)), Inbound { shared: Some(shared), exact: length, ended: false })
}

impl Inbound {
    /// The body of a request whose head says it has none.
    pub(crate) fn empty() -> Self {
        Self { shared: None, exact: Some(0), ended: true }
    }
}

/// What [`Sender::poll_ready`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ready {
    /// The slot is free.
    Free,
    /// The body was dropped: stop reading it.
    Gone,
}

impl Sender {
    /// Ready when the slot is free (or the body is gone).
    pub(crate) fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<Ready> {
        let mut state = self.0.lock();
        if state.receiver_gone {
            Poll::Ready(Ready::Gone)
        } else if state.item.is_none() {
            Poll::Ready(Ready::Free)
        } else {
            state.sender_waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// Ready once the body has been polled (or dropped); `true` if it is still wanted.
    pub(crate) fn poll_wanted(&self, cx: &mut Context<'_>) -> Poll<bool> {
        let mut state = self.0.lock();
        if state.receiver_gone {
            Poll::Ready(false)
        } else if state.wanted {
            Poll::Ready(true)
        } else {
            state.sender_waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// Puts `item` in the slot (which [`poll_ready`](Self::poll_ready) found free).
    pub(crate) fn send(&self, item: Item) {
        let mut state = self.0.lock();
        debug_assert!(state.item.is_none());
        state.item = Some(item);
        state.wake_receiver();
    }

    /// The body ended where its framing says (nothing is sent after this).
    pub(crate) fn finish(&self) {
        let mut state = self.0.lock();
        state.finished = true;
        state.wake_receiver();
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.sender_done = true;
        state.wake_receiver();
    }
}

impl Drop for Inbound {
    fn drop(&mut self) {
        if let Some(shared) = &self.shared {
            let mut state = shared.lock();
            state.receiver_gone = true;
            state.item = None;
            state.wake_sender();
        }
    }
}

impl Body for Inbound {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let Some(shared) = &self.shared else { return Poll::Ready(None) };
        let mut state = shared.lock();
        if !state.wanted {
            state.wanted = true;
            state.wake_sender();
        }
        let item = match state.item.take() {
            Some(item) => {
                state.wake_sender();
                item
            }
            None if state.finished => {
                drop(state);
                self.ended = true;
                return Poll::Ready(None);
            }
            None if state.sender_done => {
                drop(state);
                self.ended = true;
                return Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection ended before the request body",
                ))));
            }
            None => {
                state.receiver_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
        };
        drop(state);
        match &item {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    self.exact = self.exact.map(|left| left.saturating_sub(data.len() as u64));
                }
                if frame.is_trailers() || self.exact == Some(0) {
                    self.ended = true;
                }
            }
            Err(_) => self.ended = true,
        }
        Poll::Ready(Some(item))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        match self.exact {
            Some(left) => SizeHint::with_exact(left),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::future::poll_fn;

    #[tokio::test]
    async fn pieces_pass_one_at_a_time_and_the_end_is_seen() {
        let (sender, mut body) = channel(Some(5));
        assert_eq!(body.size_hint().exact(), Some(5));
        assert_eq!(poll_fn(|cx| sender.poll_ready(cx)).await, Ready::Free);
        sender.send(Ok(Frame::data(Bytes::from_static(b"ab"))));
        // The slot is full until the piece is taken.
        let waker = futures_util::task::noop_waker();
        assert!(sender.poll_ready(&mut Context::from_waker(&waker)).is_pending());
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        assert_eq!(body.size_hint().exact(), Some(3));
        assert_eq!(poll_fn(|cx| sender.poll_ready(cx)).await, Ready::Free);
        sender.send(Ok(Frame::data(Bytes::from_static(b"cde"))));
        sender.finish();
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "cde");
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_chunked_body_ends_when_its_sender_finishes() {
        let (sender, mut body) = channel(None);
        assert_eq!(body.size_hint().exact(), None);
        sender.send(Ok(Frame::data(Bytes::from_static(b"x"))));
        sender.finish();
        drop(sender);
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "x");
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_connection_gone_mid_body_is_an_error() {
        let (sender, mut body) = channel(Some(10));
        drop(sender);
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn the_sender_learns_when_the_body_is_wanted_or_dropped() {
        let (sender, mut body) = channel(Some(1));
        let waker = futures_util::task::noop_waker();
        assert!(sender.poll_wanted(&mut Context::from_waker(&waker)).is_pending());
        // A first poll (nothing there yet) is what makes it wanted.
        assert!(Pin::new(&mut body).poll_frame(&mut Context::from_waker(&waker)).is_pending());
        assert!(poll_fn(|cx| sender.poll_wanted(cx)).await);
        drop(body);
        assert_eq!(poll_fn(|cx| sender.poll_ready(cx)).await, Ready::Gone);

        let (sender, body) = channel(Some(1));
        drop(body);
        assert!(!poll_fn(|cx| sender.poll_wanted(cx)).await);
    }

    #[test]
    fn an_empty_body_has_ended() {
        let body = Inbound::empty();
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
    }
}
