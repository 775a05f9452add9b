//! Ferry frames on one yamux stream: [`FrameReader`] and [`FrameWriter`], its two halves, and the
//! way back to raw bytes after `101 Switching Protocols`.
//!
//! The reader takes the stream's received chunks as they are (one per yamux data frame, each a
//! view of the session's read buffer) and decodes frames straight from them: a `Data` payload is a
//! view of the same buffer, never copied. Only a frame that spans chunks is gathered in a buffer
//! of the reader's own (one copy of exactly its bytes).

use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use ferry_codec::frame::{DEFAULT_DATA_CHUNK, HEADER_LEN, data_header};
use ferry_codec::{CodecError, Frame};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::TransportError;
use crate::multiplex;
use crate::mux::StreamSlot;

/// A whole stream with tokio's I/O traits (for raw byte pipes).
pub type TunnelStream = multiplex::Stream;

/// The two halves share the stream; the lock is held only inside one `poll_*` call, never across
/// an `.await`, and the halves rarely contend (one reads, one writes).
type Shared = Arc<SharedStream>;

#[derive(Debug)]
struct SharedStream {
    stream: Mutex<multiplex::Stream>,
    /// Counts the stream against its session's limit while either half (or a pipe) lives.
    slot: Option<StreamSlot>,
}

fn lock(stream: &Shared) -> MutexGuard<'_, multiplex::Stream> {
    stream.stream.lock().unwrap_or_else(|e| e.into_inner())
}

/// Acknowledges an inbound stream at once, before anything else is written on it.
///
/// yamux acknowledges a stream with the first frame sent on it, and an opener may have at most
/// 256 unacknowledged streams: without this, an agent holding 256 slow requests (no response
/// head yet) would stop the gateway from opening a 257th. An empty write sends a zero-length data
/// frame carrying the ACK flag; the peer's frame reader never sees it.
///
/// # Errors
/// The stream is already closed or reset.
pub async fn acknowledge(stream: &mut multiplex::Stream) -> std::io::Result<()> {
    poll_fn(|cx| stream.poll_write_frame(cx, &[])).await.map(drop)
}

/// Splits a yamux stream into its frame reader and writer.
pub fn split(stream: multiplex::Stream) -> (FrameReader, FrameWriter) {
    split_with(stream, None)
}

/// Splits a stream from [`crate::StreamOpener::open`]; it counts against the session's limit
/// until both halves (or the pipe made of them) are gone.
pub fn split_counted(stream: multiplex::Stream, slot: StreamSlot) -> (FrameReader, FrameWriter) {
    split_with(stream, Some(slot))
}

fn split_with(stream: multiplex::Stream, slot: Option<StreamSlot>) -> (FrameReader, FrameWriter) {
    let shared = Arc::new(SharedStream { stream: Mutex::new(stream), slot });
    (
        FrameReader { stream: Arc::clone(&shared), chunk: Bytes::new(), buf: BytesMut::new(), eof: false },
        FrameWriter { stream: shared, buf: BytesMut::new() },
    )
}

/// Reads frames from one stream.
#[derive(Debug)]
pub struct FrameReader {
    stream: Shared,
    /// The chunk being decoded.
    chunk: Bytes,
    /// The start of a frame that spans chunks.
    buf: BytesMut,
    eof: bool,
}

impl FrameReader {
    /// The next frame; `None` when the peer closed its side (after `End`, a clean finish; before,
    /// an abort).
    ///
    /// # Errors
    /// Undecodable bytes, input that ends inside a frame, or a failed stream (reset by the peer,
    /// session lost).
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn next(&mut self) -> Option<Result<Frame, TransportError>> {
        poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Polls for the next frame; see [`FrameReader::next`].
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame, TransportError>>> {
        loop {
            let decoded = if self.buf.is_empty() {
                // Whole frames straight from the chunk; the start of a frame that goes on in the
                // next chunk is kept aside.
                match Frame::decode_bytes(&mut self.chunk) {
                    Ok(None) if !self.chunk.is_empty() => {
                        self.buf.extend_from_slice(&self.chunk);
                        crate::stats::copied(self.chunk.len());
                        self.chunk = Bytes::new();
                        Ok(None)
                    }
                    other => other,
                }
            } else {
                // Complete the frame that spans chunks with just the bytes it lacks; what follows
                // it is decoded from the chunk again.
                let need = match self.buf.get(..4) {
                    Some(&[l0, l1, l2, l3]) => (HEADER_LEN + u32::from_be_bytes([l0, l1, l2, l3]) as usize)
                        .saturating_sub(self.buf.len()),
                    _ => HEADER_LEN.saturating_sub(self.buf.len()),
                };
                let take = need.min(self.chunk.len());
                self.buf.extend_from_slice(&self.chunk.split_to(take));
                crate::stats::copied(take);
                Frame::decode(&mut self.buf)
            };
            match decoded {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                // The frame's header just completed: now its payload's length is known.
                Ok(None) if !self.chunk.is_empty() => continue,
                Ok(None) => {}
                Err(err) => return Poll::Ready(Some(Err(err.into()))),
            }
            if self.eof {
                if self.buf.is_empty() {
                    return Poll::Ready(None);
                }
                let err = CodecError::Truncated { have: self.buf.len(), need: self.buf.len() + 1 };
                self.buf.clear();
                return Poll::Ready(Some(Err(err.into())));
            }
            match ready!(lock(&self.stream).poll_chunk(cx, usize::MAX)) {
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(err)) => return Poll::Ready(Some(Err(err.into()))),
                None => self.eof = true,
            }
        }
    }

    /// Gives back the shared stream and the bytes already received past the last frame (the
    /// start of a raw byte pipe after an upgrade).
    fn into_raw(mut self) -> (Shared, BytesMut) {
        self.buf.extend_from_slice(&self.chunk);
        (self.stream, self.buf)
    }
}

/// Writes frames to one stream.
///
/// Frames can be queued with [`FrameWriter::queue`] and written together with
/// [`FrameWriter::flush`]: a response head, a small body and `End` then leave as one yamux frame
/// instead of three.
#[derive(Debug)]
pub struct FrameWriter {
    stream: Shared,
    /// Encoded frames not yet written.
    buf: BytesMut,
}

/// Queued body bytes beyond which [`FrameWriter::send_data`] writes them: one yamux frame.
const FLUSH_THRESHOLD: usize = DEFAULT_DATA_CHUNK;
/// What queueing a head reserves: a head of typical size, a 1 KiB body and `End`.
const HEAD_ROOM: usize = 2 * 1024;
/// Body chunks at least this large are written from where they are instead of being copied into
/// the queue: a second, 5-byte yamux frame for the header costs less than copying 16 KiB.
const DIRECT_WRITE: usize = 16 * 1024;

impl FrameWriter {
    /// Writes one frame (after anything queued).
    ///
    /// # Errors
    /// The frame is over its limit, or the stream failed (reset by the peer, session lost).
    pub async fn send(&mut self, frame: &Frame) -> Result<(), TransportError> {
        self.queue(frame)?;
        self.flush().await
    }

    /// Queues one frame without writing it; `Data` larger than a chunk is split into several.
    ///
    /// # Errors
    /// The frame is over its limit.
    pub fn queue(&mut self, frame: &Frame) -> Result<(), TransportError> {
        match frame {
            Frame::Data(data) => self.queue_data(data),
            other => {
                // Room for the head, a small body and `End` at once: a small exchange is encoded
                // into one allocation instead of three.
                if self.buf.capacity() == 0 {
                    self.buf.reserve(HEAD_ROOM);
                }
                let before = self.buf.len();
                other.encode(&mut self.buf)?;
                crate::stats::copied(self.buf.len() - before);
                Ok(())
            }
        }
    }

    /// Sends body bytes as `Data` frames. Small chunks are queued (see [`FrameWriter::queue`]) and
    /// written once a yamux frame's worth waits; a large chunk is written straight from `data`,
    /// each piece after its 5-byte header, so body bytes are not copied into our buffer (yamux
    /// copies them once, into its frame) and the buffer never grows past one yamux frame.
    ///
    /// # Errors
    /// The stream failed.
    pub async fn send_data(&mut self, data: &[u8]) -> Result<(), TransportError> {
        if data.len() < DIRECT_WRITE {
            self.queue_data(data)?;
            if self.buf.len() >= FLUSH_THRESHOLD {
                self.flush().await?;
            }
            return Ok(());
        }
        self.flush().await?;
        for piece in data.chunks(DEFAULT_DATA_CHUNK) {
            // The 5-byte header rides in the same yamux frame as the piece, so the reader gets
            // the whole frame in one chunk and takes it without a copy.
            let header = data_header(piece.len())?;
            let n = poll_fn(|cx| lock(&self.stream).poll_write_prefixed(cx, &header, piece)).await?;
            write_all(&self.stream, &piece[n..]).await?;
        }
        Ok(())
    }

    fn queue_data(&mut self, data: &[u8]) -> Result<(), TransportError> {
        for chunk in data.chunks(DEFAULT_DATA_CHUNK) {
            self.buf.reserve(HEADER_LEN + chunk.len());
            self.buf.extend_from_slice(&data_header(chunk.len())?);
            self.buf.extend_from_slice(chunk);
            crate::stats::copied(chunk.len());
        }
        Ok(())
    }

    /// Writes everything queued. Waits for yamux credit: this is where a slow reader on the other
    /// side slows the writer down.
    ///
    /// # Errors
    /// The stream failed.
    pub async fn flush(&mut self) -> Result<(), TransportError> {
        write_all(&self.stream, &self.buf).await?;
        self.buf.clear();
        // Keep a small buffer around, not the largest one ever needed (thousands of idle streams).
        if self.buf.capacity() > 2 * FLUSH_THRESHOLD {
            self.buf = BytesMut::new();
        }
        Ok(())
    }

    /// Closes our side of the stream (yamux FIN) after the last frame.
    ///
    /// # Errors
    /// The stream failed.
    pub async fn finish(&mut self) -> Result<(), TransportError> {
        self.flush().await?;
        poll_fn(|_| lock(&self.stream).poll_finish()).await?;
        Ok(())
    }
}

/// Writes all of `bytes` to the stream, waiting for yamux credit as needed.
async fn write_all(stream: &Shared, mut bytes: &[u8]) -> Result<(), TransportError> {
    while !bytes.is_empty() {
        let n = poll_fn(|cx| lock(stream).poll_write_frame(cx, bytes)).await?;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
        }
        bytes = &bytes[n..];
    }
    Ok(())
}

/// After `101 Switching Protocols`: copies bytes both ways between the stream and `other` until
/// both directions are closed (half-close preserved), starting with any bytes the reader had
/// already received past the last frame. Returns the bytes moved (to `other`, from `other`).
///
/// # Errors
/// Either side failed.
pub async fn pipe<T>(reader: FrameReader, writer: FrameWriter, mut other: T) -> std::io::Result<(u64, u64)>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (shared, leftover) = reader.into_raw();
    drop(writer);
    let SharedStream { stream, slot: _slot } =
        Arc::try_unwrap(shared).map_err(|_| std::io::Error::other("stream halves still shared"))?;
    let mut stream = stream.into_inner().unwrap_or_else(|e| e.into_inner());
    other.write_all(&leftover).await?;
    let (from_stream, to_stream) = tokio::io::copy_bidirectional(&mut stream, &mut other).await?;
    Ok((from_stream + leftover.len() as u64, to_stream))
}
