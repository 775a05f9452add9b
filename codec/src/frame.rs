//! Request-stream framing: `u32 length (big endian) | u8 kind | payload`.
//!
//! `Data` payloads are raw body bytes and decode without a copy (they are split off the input
//! buffer); the other kinds carry protobuf. Every announced length is checked against the limit for
//! its kind *before* any byte of the payload is awaited or any buffer reserved, so a peer cannot
//! make us allocate more than [`FrameKind::max_len`] plus the header for one frame.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use crate::head::{Abort, Head, Trailers};
use crate::{CodecError, head_wire, pb};

/// Bytes before every payload: 4 length bytes and 1 kind byte.
pub const HEADER_LEN: usize = 5;
/// Largest `Head` payload. Well above what the gateway lets a client send (its header limits
/// answer 431 first) so a legitimate head is never cut, yet small enough to bound one allocation.
pub const MAX_HEAD_LEN: usize = 256 * 1024;
/// Largest `Data` payload. Writers send at most [`DEFAULT_DATA_CHUNK`]; 1 MiB lets a reader take
/// bigger chunks from a peer that batches more without a protocol change.
pub const MAX_DATA_LEN: usize = 1024 * 1024;
/// Largest `Trailers` payload.
pub const MAX_TRAILERS_LEN: usize = 64 * 1024;
/// Largest `Abort` payload: a code and a short message.
pub const MAX_ABORT_LEN: usize = 1024;
/// Size of the body chunks ferry's own writers put in one `Data` frame: large enough that the
/// 5-byte header is noise, and header plus payload fill exactly one 64 KiB yamux frame (the
/// transport's split size), so a frame rarely straddles two yamux frames.
pub const DEFAULT_DATA_CHUNK: usize = 64 * 1024 - HEADER_LEN;

/// The kind byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Protobuf `Head`.
    Head = 1,
    /// Raw body bytes.
    Data = 2,
    /// Protobuf `Trailers`.
    Trailers = 3,
    /// Empty: the body is complete.
    End = 4,
    /// Protobuf `Abort`.
    Abort = 5,
}

impl FrameKind {
    /// Largest payload accepted for this kind.
    pub const fn max_len(self) -> usize {
        match self {
            Self::Head => MAX_HEAD_LEN,
            Self::Data => MAX_DATA_LEN,
            Self::Trailers => MAX_TRAILERS_LEN,
            Self::End => 0,
            Self::Abort => MAX_ABORT_LEN,
        }
    }

    /// Name for errors and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Head => "Head frame",
            Self::Data => "Data frame",
            Self::Trailers => "Trailers frame",
            Self::End => "End frame",
            Self::Abort => "Abort frame",
        }
    }
}

impl TryFrom<u8> for FrameKind {
    type Error = CodecError;

    fn try_from(byte: u8) -> Result<Self, CodecError> {
        Ok(match byte {
            1 => Self::Head,
            2 => Self::Data,
            3 => Self::Trailers,
            4 => Self::End,
            5 => Self::Abort,
            other => return Err(CodecError::UnknownKind(other)),
        })
    }
}

/// One frame of a request stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A request or response head.
    Head(Head),
    /// A chunk of body bytes.
    Data(Bytes),
    /// Trailer fields.
    Trailers(Trailers),
    /// The body is complete.
    End,
    /// The stream failed.
    Abort(Abort),
}

impl Frame {
    /// The kind byte this frame is sent with.
    pub fn kind(&self) -> FrameKind {
        match self {
            Self::Head(_) => FrameKind::Head,
            Self::Data(_) => FrameKind::Data,
            Self::Trailers(_) => FrameKind::Trailers,
            Self::End => FrameKind::End,
            Self::Abort(_) => FrameKind::Abort,
        }
    }

    /// Appends the encoded frame to `dst`.
    ///
    /// `Data` payloads are copied into `dst` here; a writer that wants to avoid that copy sends
    /// [`data_header`] and then the payload itself (see `ferry-transport`).
    ///
    /// # Errors
    /// The payload is longer than the limit for its kind (the peer would reject it).
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), CodecError> {
        match self {
            Self::Head(head) => encode_with(
                FrameKind::Head,
                head_wire::head_len(head),
                |dst| head_wire::put_head(head, dst),
                dst,
            ),
            Self::Data(data) => {
                dst.reserve(HEADER_LEN + data.len());
                dst.put_slice(&data_header(data.len())?);
                dst.put_slice(data);
                Ok(())
            }
            Self::Trailers(trailers) => encode_with(
                FrameKind::Trailers,
                head_wire::trailers_len(trailers),
                |dst| head_wire::put_trailers(trailers, dst),
                dst,
            ),
            Self::End => {
                put_header(FrameKind::End, 0, dst);
                Ok(())
            }
            Self::Abort(abort) => encode_message(FrameKind::Abort, &pb::Abort::from(abort), dst),
        }
    }

    /// Takes one frame off the front of `src`.
    ///
    /// Returns `Ok(None)` when `src` does not hold a whole frame yet (nothing is consumed; enough
    /// capacity for the rest of the frame is reserved). A `Data` payload is split off `src`
    /// without copying.
    ///
    /// # Errors
    /// Unknown kind, a length over the kind's limit (reported as soon as the 5-byte header is
    /// there), or a payload that does not decode. The stream cannot continue after an error.
    pub fn decode(src: &mut BytesMut) -> Result<Option<Self>, CodecError> {
        let Some((kind, len)) = peek_header(src)? else {
            return Ok(None);
        };
        let Some(payload) = take_payload(src, HEADER_LEN, len) else {
            return Ok(None);
        };
        Self::from_payload(kind, payload.freeze())
    }

    /// [`Frame::decode`] from `Bytes` (as a multiplexer stream hands them out): a `Data`
    /// payload is a view of `src`. `Ok(None)` when `src` does not hold a whole frame (nothing is
    /// consumed).
    ///
    /// # Errors
    /// As [`Frame::decode`].
    pub fn decode_bytes(src: &mut Bytes) -> Result<Option<Self>, CodecError> {
        let Some((kind, len)) = peek_header(src)? else {
            return Ok(None);
        };
        if src.len() < HEADER_LEN + len {
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        Self::from_payload(kind, src.split_to(len))
    }

    fn from_payload(kind: FrameKind, payload: Bytes) -> Result<Option<Self>, CodecError> {
        Ok(Some(match kind {
            FrameKind::Data => Self::Data(payload),
            FrameKind::End => Self::End,
            FrameKind::Head => Self::Head(decode_message::<pb::Head, _>(payload, "Head")?),
            FrameKind::Trailers => Self::Trailers(decode_message::<pb::Trailers, _>(payload, "Trailers")?),
            FrameKind::Abort => Self::Abort(decode_message::<pb::Abort, _>(payload, "Abort")?),
        }))
    }
}

/// The kind and payload length of the frame at the front of `src`, once its header is there.
fn peek_header(src: &[u8]) -> Result<Option<(FrameKind, usize)>, CodecError> {
    let Some(&[l0, l1, l2, l3, kind]) = src.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let kind = FrameKind::try_from(kind)?;
    let len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
    if len > kind.max_len() {
        return Err(CodecError::too_large(kind, len));
    }
    Ok(Some((kind, len)))
}

/// The 5-byte header of a `Data` frame carrying `len` bytes; the payload follows it as is.
///
/// # Errors
/// `len` is over [`MAX_DATA_LEN`].
pub fn data_header(len: usize) -> Result<[u8; HEADER_LEN], CodecError> {
    if len > MAX_DATA_LEN {
        return Err(CodecError::too_large(FrameKind::Data, len));
    }
    let [l0, l1, l2, l3] = (len as u32).to_be_bytes();
    Ok([l0, l1, l2, l3, FrameKind::Data as u8])
}

fn put_header(kind: FrameKind, len: usize, dst: &mut BytesMut) {
    debug_assert!(len <= kind.max_len());
    dst.put_u32(len as u32);
    dst.put_u8(kind as u8);
}

fn encode_message(kind: FrameKind, msg: &impl Message, dst: &mut BytesMut) -> Result<(), CodecError> {
    encode_with(kind, msg.encoded_len(), |dst| msg.encode_raw(dst), dst)
}

/// Appends a frame of `kind` whose `len`-byte payload `put` writes.
fn encode_with(
    kind: FrameKind,
    len: usize,
    put: impl FnOnce(&mut BytesMut),
    dst: &mut BytesMut,
) -> Result<(), CodecError> {
    if len > kind.max_len() {
        return Err(CodecError::too_large(kind, len));
    }
    dst.reserve(HEADER_LEN + len);
    put_header(kind, len, dst);
    let start = dst.len();
    put(dst);
    debug_assert_eq!(dst.len() - start, len);
    Ok(())
}

/// If `src` holds `header_len + len` bytes, drops the header and splits off the payload;
/// otherwise reserves room for the rest (the caller checked `len` against its limit) and returns
/// `None`.
pub(crate) fn take_payload(src: &mut BytesMut, header_len: usize, len: usize) -> Option<BytesMut> {
    let total = header_len + len;
    if src.len() < total {
        src.reserve(total - src.len());
        return None;
    }
    src.advance(header_len);
    Some(src.split_to(len))
}

/// Decodes protobuf `P` from a payload and converts it to the domain type `T`.
pub(crate) fn decode_message<P, T>(payload: impl Into<Bytes>, what: &'static str) -> Result<T, CodecError>
where
    P: Message + Default,
    T: TryFrom<P, Error = CodecError>,
{
    let message = P::decode(payload.into()).map_err(|source| CodecError::Protobuf { what, source })?;
    T::try_from(message)
}

/// [`tokio_util::codec`] adapter over [`Frame::encode`] and [`Frame::decode`].
#[derive(Debug, Clone, Copy, Default)]
pub struct FrameCodec;

impl tokio_util::codec::Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        Frame::decode(src)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        match Frame::decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(truncated(src, HEADER_LEN)),
        }
    }
}

/// The error for input that ends inside a frame whose header is `header_len` bytes.
pub(crate) fn truncated(src: &BytesMut, header_len: usize) -> CodecError {
    let need = match src.get(..4) {
        Some(&[l0, l1, l2, l3]) => header_len + u32::from_be_bytes([l0, l1, l2, l3]) as usize,
        _ => header_len,
    };
    CodecError::Truncated { have: src.len(), need }
}

impl tokio_util::codec::Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        frame.encode(dst)
    }
}

impl tokio_util::codec::Encoder<&Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        frame.encode(dst)
    }
}
