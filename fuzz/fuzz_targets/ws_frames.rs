//! Arbitrary bytes as a run of WebSocket frames, the way the session's reader meets them: every
//! header either parses, asks for more bytes or is refused, never panics; a parsed header encodes
//! back (in its minimal form) to one that parses the same; masking twice gives the payload back.
#![no_main]

use ferry_codec::ws::{FIN, FrameHeader, MAX_HEADER, apply_mask, encode_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some(header)) = FrameHeader::parse(rest) {
        assert!(header.size >= 2 && header.size <= MAX_HEADER && header.size <= rest.len());
        if let Ok(len) = usize::try_from(header.len) {
            let mut out = [0u8; MAX_HEADER];
            let first = if header.fin { FIN } else { 0 } | header.opcode;
            let n = encode_header(&mut out, first, len, header.mask);
            let again = FrameHeader::parse(&out[..n]).expect("our own header parses").expect("complete");
            assert_eq!(FrameHeader { size: header.size, ..again }, header);
        }
        rest = &rest[header.size..];
        let take = usize::try_from(header.len).unwrap_or(usize::MAX).min(rest.len());
        let (payload, tail) = rest.split_at(take);
        if let Some(key) = header.mask {
            let mut copy = payload.to_vec();
            apply_mask(&mut copy, key, 0);
            apply_mask(&mut copy, key, 0);
            assert_eq!(copy, payload);
        }
        rest = tail;
    }
});
