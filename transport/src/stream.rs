//! Ferry frames on one yamux stream: [`FrameReader`] and [`FrameWriter`], the two halves of a
//! [`TunnelStream`], and the way back to raw bytes after `101 Switching Protocols`.

use std::task::{Context, Poll};

use bytes::BytesMut;
use ferry_codec::frame::{DEFAULT_DATA_CHUNK, HEADER_LEN, data_header};
use ferry_codec::{Frame, FrameCodec};
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_util::codec::FramedRead;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

use crate::TransportError;

/// A yamux stream with tokio's I/O traits.
pub type TunnelStream = Compat<yamux::Stream>;

/// Read buffer of a [`FrameReader`]: one large read takes several `Data` frames at once.
const READ_CAPACITY: usize = 64 * 1024;

/// Acknowledges an inbound stream at once, before anything else is written on it.
///
/// yamux acknowledges a stream with the first frame sent on it, and an opener may have at most
/// 256 unacknowledged streams: without this, an agent holding 256 slow requests (no response
/// head yet) would stop the gateway from opening a 257th. An empty write sends a zero-length data
/// frame carrying the ACK flag; the peer's frame reader never sees it.
///
/// # Errors
/// The stream is already closed or reset.
pub async fn acknowledge(stream: &mut yamux::Stream) -> std::io::Result<()> {
    futures_util::io::AsyncWriteExt::write(stream, &[]).await.map(drop)
}

/// Splits a yamux stream into its frame reader and writer.
pub fn split(stream: yamux::Stream) -> (FrameReader, FrameWriter) {
    let (read, write) = tokio::io::split(stream.compat());
    (
        FrameReader { inner: FramedRead::with_capacity(read, FrameCodec, READ_CAPACITY) },
        FrameWriter { io: write, buf: BytesMut::with_capacity(HEADER_LEN + DEFAULT_DATA_CHUNK) },
    )
}

/// Reads frames from one stream.
#[derive(Debug)]
pub struct FrameReader {
    inner: FramedRead<ReadHalf<TunnelStream>, FrameCodec>,
}

impl FrameReader {
    /// The next frame; `None` when the peer closed its side (after `End`, a clean finish; before,
    /// an abort).
    ///
    /// # Errors
    /// Undecodable bytes, or the stream failed (reset by the peer, session lost).
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn next(&mut self) -> Option<Result<Frame, TransportError>> {
        self.inner.next().await.map(|r| r.map_err(TransportError::from))
    }

    /// Polls for the next frame; see [`FrameReader::next`].
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame, TransportError>>> {
        self.inner.poll_next_unpin(cx).map(|r| r.map(|r| r.map_err(TransportError::from)))
    }

    /// Gives back the raw half and the bytes already read past the last frame (the start of a raw
    /// byte pipe after an upgrade).
    pub fn into_raw(self) -> (ReadHalf<TunnelStream>, BytesMut) {
        let parts = self.inner.into_parts();
        (parts.io, parts.read_buf)
    }
}

/// Writes frames to one stream.
#[derive(Debug)]
pub struct FrameWriter {
    io: WriteHalf<TunnelStream>,
    buf: BytesMut,
}

impl FrameWriter {
    /// Writes one frame.
    ///
    /// # Errors
    /// The frame is over its limit, or the stream failed (reset by the peer, session lost).
    pub async fn send(&mut self, frame: &Frame) -> Result<(), TransportError> {
        if let Frame::Data(data) = frame {
            return self.send_data(data).await;
        }
        self.buf.clear();
        frame.encode(&mut self.buf)?;
        self.io.write_all(&self.buf).await?;
        Ok(())
    }

    /// Writes body bytes as `Data` frames of at most [`DEFAULT_DATA_CHUNK`] bytes each. Waits for
    /// yamux credit: this is where a slow reader on the other side slows the writer down.
    ///
    /// # Errors
    /// The stream failed.
    pub async fn send_data(&mut self, mut data: &[u8]) -> Result<(), TransportError> {
        while !data.is_empty() {
            let n = data.len().min(DEFAULT_DATA_CHUNK);
            // One buffer for header and payload: yamux makes one frame of each write.
            self.buf.clear();
            self.buf.extend_from_slice(&data_header(n)?);
            self.buf.extend_from_slice(&data[..n]);
            self.io.write_all(&self.buf).await?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Closes our side of the stream (yamux FIN) after the last frame.
    ///
    /// # Errors
    /// The stream failed.
    pub async fn finish(&mut self) -> Result<(), TransportError> {
        self.io.shutdown().await?;
        Ok(())
    }

    /// Gives back the raw half, for a byte pipe after an upgrade.
    pub fn into_raw(self) -> WriteHalf<TunnelStream> {
        self.io
    }
}

/// After `101 Switching Protocols`: copies bytes both ways between the stream and `other` until
/// both directions are closed (half-close preserved), starting with any bytes the reader had
/// already buffered past the last frame. Returns the bytes moved (to `other`, from `other`).
///
/// # Errors
/// Either side failed.
pub async fn pipe<T>(reader: FrameReader, writer: FrameWriter, mut other: T) -> std::io::Result<(u64, u64)>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (read, leftover) = reader.into_raw();
    other.write_all(&leftover).await?;
    let mut stream = read.unsplit(writer.into_raw());
    let (from_stream, to_stream) = tokio::io::copy_bidirectional(&mut stream, &mut other).await?;
    Ok((from_stream + leftover.len() as u64, to_stream))
}
