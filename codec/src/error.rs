//! [`CodecError`]: everything that can be wrong with bytes received from a peer.

use crate::frame::FrameKind;
use crate::id::TunnelIdError;

/// Why bytes from the peer (or a value about to be sent) were rejected.
///
/// Decoding errors are fatal for the stream or session they happened on: the framing cannot be
/// resynchronised after them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The frame's kind byte is not one of the known kinds.
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    /// A frame or message is longer than the limit for its kind; detected before allocating.
    #[error("{what} of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// What was too large (a frame kind or a message name).
        what: &'static str,
        /// The announced or actual length.
        len: usize,
        /// The limit it exceeded.
        limit: usize,
    },
    /// The input ended in the middle of a frame.
    #[error("input ended inside a frame: {have} of {need} bytes")]
    Truncated {
        /// Bytes available.
        have: usize,
        /// Bytes the frame needs.
        need: usize,
    },
    /// The payload is not valid protobuf for the expected message.
    #[error("malformed {what} message")]
    Protobuf {
        /// The message that failed to decode.
        what: &'static str,
        /// What prost found wrong.
        #[source]
        source: prost::DecodeError,
    },
    /// A required field is absent (or has its zero value where that is not allowed).
    #[error("missing field {0}")]
    MissingField(&'static str),
    /// A field is present but its value is not acceptable.
    #[error("invalid {field}: {reason}")]
    InvalidField {
        /// The field, as `message.field`.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The tunnel id in a handshake does not follow the grammar.
    #[error(transparent)]
    TunnelId(#[from] TunnelIdError),
    /// The peer speaks a protocol version this build does not.
    #[error("unsupported protocol version {0} (this build speaks {ours})", ours = crate::PROTOCOL_VERSION)]
    UnsupportedVersion(u32),
    /// A MAC did not verify: the peer does not hold the same secret, or the transcript differs.
    #[error("MAC verification failed")]
    BadMac,
    /// An I/O error from the underlying stream (only through the `tokio_util` codecs).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl CodecError {
    pub(crate) fn invalid(field: &'static str, reason: &'static str) -> Self {
        Self::InvalidField { field, reason }
    }

    pub(crate) fn too_large(kind: FrameKind, len: usize) -> Self {
        Self::TooLarge { what: kind.name(), len, limit: kind.max_len() }
    }
}
