//! RFC 6455 frame headers and masking, for the session's WebSocket framing in `ferry-transport`
//! (which reads and writes the payload bytes themselves as a stream, never a whole frame at once).

use crate::CodecError;

/// Longest frame header: 2 bytes, an 8-byte extended length, a 4-byte mask key.
pub const MAX_HEADER: usize = 14;
/// Largest control frame payload (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// The final-fragment bit of the first header byte.
pub const FIN: u8 = 0x80;

/// Frame opcodes (RFC 6455 §5.2).
pub mod opcode {
    /// The next fragment of a message.
    pub const CONTINUATION: u8 = 0x0;
    /// A text message (refused on a ferry session).
    pub const TEXT: u8 = 0x1;
    /// A binary message.
    pub const BINARY: u8 = 0x2;
    /// Close.
    pub const CLOSE: u8 = 0x8;
    /// Ping.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xA;
}

/// A frame header read off the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The final fragment of its message.
    pub fin: bool,
    /// See [`opcode`].
    pub opcode: u8,
    /// The masking key, for frames a client sent.
    pub mask: Option<[u8; 4]>,
    /// Payload length.
    pub len: u64,
    /// Bytes the header itself took.
    pub size: usize,
}

impl FrameHeader {
    /// Parses the header at the start of `buf`; `Ok(None)` until it is all there.
    ///
    /// # Errors
    /// Reserved bits set (ferry negotiates no extension), a length with its top bit set, or a
    /// control frame that is fragmented or longer than [`MAX_CONTROL_PAYLOAD`].
    pub fn parse(buf: &[u8]) -> Result<Option<Self>, CodecError> {
        let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
            return Ok(None);
        };
        if b0 & 0x70 != 0 {
            return Err(invalid("reserved bits set (no extension was negotiated)"));
        }
        let (len, mut size) = match b1 & 0x7F {
            126 => match buf.get(2..4) {
                Some(&[a, b]) => (u64::from(u16::from_be_bytes([a, b])), 4),
                _ => return Ok(None),
            },
            127 => match buf.get(2..10) {
                Some(bytes) => {
                    let mut word = [0u8; 8];
                    word.copy_from_slice(bytes);
                    let len = u64::from_be_bytes(word);
                    if len >> 63 != 0 {
                        return Err(invalid("frame length with the top bit set"));
                    }
                    (len, 10)
                }
                None => return Ok(None),
            },
            short => (u64::from(short), 2),
        };
        let mask = if b1 & 0x80 != 0 {
            let Some(&[k0, k1, k2, k3]) = buf.get(size..size + 4) else {
                return Ok(None);
            };
            size += 4;
            Some([k0, k1, k2, k3])
        } else {
            None
        };
        let header = Self { fin: b0 & FIN != 0, opcode: b0 & 0x0F, mask, len, size };
        if header.opcode & 0x8 != 0 && (!header.fin || len > MAX_CONTROL_PAYLOAD as u64) {
            return Err(invalid("fragmented or oversized control frame"));
        }
        Ok(Some(header))
    }
}

fn invalid(reason: &'static str) -> CodecError {
    CodecError::invalid("websocket frame", reason)
}

/// Writes the header of a frame (`first`: FIN and opcode) carrying `len` payload bytes into the
/// start of `out`, with the minimal length encoding; returns its length.
pub fn encode_header(out: &mut [u8; MAX_HEADER], first: u8, len: usize, mask: Option<[u8; 4]>) -> usize {
    out[0] = first;
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut n = if len <= 125 {
        out[1] = mask_bit | len as u8;
        2
    } else if let Ok(short) = u16::try_from(len) {
        out[1] = mask_bit | 126;
        out[2..4].copy_from_slice(&short.to_be_bytes());
        4
    } else {
        out[1] = mask_bit | 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    if let Some(key) = mask {
        out[n..n + 4].copy_from_slice(&key);
        n += 4;
    }
    n
}

/// XORs `data` with the mask `key` (masking and unmasking are the same), `data` starting
/// `offset` bytes into the masked payload. Eight bytes at a time.
pub fn apply_mask(data: &mut [u8], key: [u8; 4], offset: usize) {
    let r = offset % 4;
    let k = [key[r], key[(r + 1) % 4], key[(r + 2) % 4], key[(r + 3) % 4]];
    let wide = u64::from_ne_bytes([k[0], k[1], k[2], k[3], k[0], k[1], k[2], k[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    // Whole words are a multiple of 4 bytes: the rest starts at key offset 0.
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= k[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_is_its_own_inverse_at_any_offset() {
        let key = [0x12, 0x34, 0x56, 0x78];
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let mut masked = data.clone();
        apply_mask(&mut masked, key, 0);
        for (i, (&m, &d)) in masked.iter().zip(&data).enumerate() {
            assert_eq!(m, d ^ key[i % 4]);
        }
        // Unmasked in pieces of every size from 1 to 17, each at its own offset.
        let mut offset = 0;
        for size in (1..=17).cycle() {
            if offset >= masked.len() {
                break;
            }
            let end = (offset + size).min(masked.len());
            apply_mask(&mut masked[offset..end], key, offset);
            offset = end;
        }
        assert_eq!(masked, data);
    }

    #[test]
    fn headers_round_trip_with_minimal_lengths() {
        for (len, size) in [(0, 2), (125, 2), (126, 4), (65_535, 4), (65_536, 10), (1 << 40, 10)] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let mut out = [0u8; MAX_HEADER];
                let n = encode_header(&mut out, FIN | opcode::BINARY, len, mask);
                assert_eq!(n, size + if mask.is_some() { 4 } else { 0 });
                let header = FrameHeader::parse(&out[..n]).unwrap().unwrap();
                assert_eq!((header.len, header.size, header.mask, header.fin), (len as u64, n, mask, true));
                assert!(FrameHeader::parse(&out[..n - 1]).unwrap().is_none(), "a cut header is incomplete");
            }
        }
    }

    #[test]
    fn bad_headers_are_refused() {
        assert!(FrameHeader::parse(&[FIN | 0x40 | opcode::BINARY, 0]).is_err(), "reserved bit");
        let mut huge = [0u8; 10];
        huge[0] = FIN | opcode::BINARY;
        huge[1] = 127;
        huge[2] = 0x80;
        assert!(FrameHeader::parse(&huge).is_err(), "length with the top bit");
        assert!(FrameHeader::parse(&[opcode::PING, 0]).is_err(), "fragmented ping");
        assert!(FrameHeader::parse(&[FIN | opcode::PING, 126, 0, 126]).is_err(), "126-byte ping");
    }
}
