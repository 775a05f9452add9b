//! The 12-byte yamux frame header (spec: hashicorp/yamux `spec.md`).
//!
//! ```text
//! | version: u8 | type: u8 | flags: u16 | stream id: u32 | length: u32 |   (big endian)
//! ```
//!
//! `length` is the body length of a data frame, the credit of a window update, the opaque value of
//! a ping and the error code of a go-away. Only data frames have a body.

use bytes::BufMut;

/// Header length on the wire.
pub const HEADER_LEN: usize = 12;
/// The only version there is.
pub(super) const VERSION: u8 = 0;

/// Frame types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Stream data; `length` bytes follow.
    Data,
    /// Credit for the stream's sender (`length` bytes more).
    WindowUpdate,
    /// Session ping (SYN) or its answer (ACK); `length` is echoed.
    Ping,
    /// The session is ending; `length` is the error code.
    GoAway,
}

/// Flags: the first frame of a stream carries SYN, the first answer ACK; FIN half-closes, RST
/// resets.
pub mod flags {
    /// Opens a stream (or asks for a ping's answer).
    pub const SYN: u16 = 1;
    /// Acknowledges a stream (or answers a ping).
    pub const ACK: u16 = 2;
    /// The sender will send no more on this stream.
    pub const FIN: u16 = 4;
    /// The stream is aborted.
    pub const RST: u16 = 8;
}

/// Go-away error codes.
pub mod go_away {
    /// Normal end.
    pub const NORMAL: u32 = 0;
    /// The peer broke the protocol.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// An internal error.
    pub const INTERNAL_ERROR: u32 = 2;
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Frame type.
    pub kind: Kind,
    /// [`flags`] bits.
    pub flags: u16,
    /// 0 for the session (ping, go-away); odd for streams the client opened, even for the server's.
    pub stream: u32,
    /// See the module docs.
    pub length: u32,
}

/// A header that is not one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Not version 0.
    #[error("unsupported yamux version {0}")]
    Version(u8),
    /// Not one of the four frame types.
    #[error("unknown yamux frame type {0}")]
    Kind(u8),
}

impl Header {
    /// A header of `kind`.
    pub const fn new(kind: Kind, flags: u16, stream: u32, length: u32) -> Self {
        Self { kind, flags, stream, length }
    }

    /// Whether all of `flag` is set.
    pub const fn has(&self, flag: u16) -> bool {
        self.flags & flag == flag
    }

    /// Decodes the first [`HEADER_LEN`] bytes.
    ///
    /// # Errors
    /// Another version or an unknown type.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, HeaderError> {
        if bytes[0] != VERSION {
            return Err(HeaderError::Version(bytes[0]));
        }
        let kind = match bytes[1] {
            0 => Kind::Data,
            1 => Kind::WindowUpdate,
            2 => Kind::Ping,
            3 => Kind::GoAway,
            other => return Err(HeaderError::Kind(other)),
        };
        Ok(Self {
            kind,
            flags: u16::from_be_bytes([bytes[2], bytes[3]]),
            stream: u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            length: u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
        })
    }

    /// Appends the encoded header.
    pub fn encode(&self, out: &mut impl BufMut) {
        let kind = match self.kind {
            Kind::Data => 0,
            Kind::WindowUpdate => 1,
            Kind::Ping => 2,
            Kind::GoAway => 3,
        };
        out.put_u8(VERSION);
        out.put_u8(kind);
        out.put_u16(self.flags);
        out.put_u32(self.stream);
        out.put_u32(self.length);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_bad_ones_are_named() {
        for kind in [Kind::Data, Kind::WindowUpdate, Kind::Ping, Kind::GoAway] {
            let header = Header::new(kind, flags::SYN | flags::FIN, 0x0102_0304, 0xa0b0_c0d0);
            let mut out = Vec::new();
            header.encode(&mut out);
            let bytes: [u8; HEADER_LEN] = out.as_slice().try_into().unwrap();
            assert_eq!(Header::decode(&bytes), Ok(header));
        }
        // The spec's own layout: version, type, flags, id, length, big endian.
        let bytes = [0, 1, 0, 2, 0, 0, 0, 7, 0, 4, 0, 0];
        assert_eq!(Header::decode(&bytes), Ok(Header::new(Kind::WindowUpdate, flags::ACK, 7, 256 * 1024)));
        assert_eq!(Header::decode(&[1; HEADER_LEN]), Err(HeaderError::Version(1)));
        let mut bad = [0; HEADER_LEN];
        bad[1] = 4;
        assert_eq!(Header::decode(&bad), Err(HeaderError::Kind(4)));
    }
}
