//! Arbitrary bytes into every decoder a peer can reach: request-stream frames (fed whole and in
//! two pieces), control messages and the three handshake messages. None may panic, and no buffer
//! may grow past the input plus the largest frame the limits allow.
#![no_main]

use bytes::BytesMut;
use ferry_codec::frame::{HEADER_LEN, MAX_DATA_LEN};
use ferry_codec::{AuthResult, ClientAuth, ControlMessage, FrameCodec, ServerHello};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

/// The most any decoder may reserve for one frame.
const MAX_FRAME: usize = HEADER_LEN + MAX_DATA_LEN;

fuzz_target!(|data: &[u8]| {
    // Whole input at once, then end of stream.
    let mut buf = BytesMut::from(data);
    let mut codec = FrameCodec;
    while let Ok(Some(_)) = codec.decode(&mut buf) {}
    assert!(buf.capacity() <= data.len() + MAX_FRAME);
    let _ = codec.decode_eof(&mut buf);

    // The same bytes in two pieces must decode to the same frames.
    if let Some((&cut, rest)) = data.split_first() {
        let cut = usize::from(cut).min(rest.len());
        let whole = decode_all(rest, rest.len());
        let pieces = decode_all(rest, cut);
        assert_eq!(whole, pieces);
    }

    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = ControlMessage::decode(&mut buf) {}
    assert!(buf.capacity() <= data.len() + MAX_FRAME);

    let _ = ServerHello::decode(data.to_vec());
    let _ = ClientAuth::decode(data.to_vec());
    let _ = AuthResult::decode(data.to_vec());
});

/// Decodes `data` fed in two pieces split at `cut`; returns the frames and whether it failed.
fn decode_all(data: &[u8], cut: usize) -> (Vec<ferry_codec::Frame>, bool) {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in [&data[..cut], &data[cut..]] {
        buf.extend_from_slice(piece);
        loop {
            match FrameCodec.decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(_) => return (frames, true),
            }
        }
    }
    (frames, false)
}
