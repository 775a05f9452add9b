//! Arbitrary valid values (the codec's `arbitrary` feature) through encode then decode: what comes
//! out must equal what went in, for frames, control messages and handshake messages.
#![no_main]

use bytes::BytesMut;
use ferry_codec::{AuthResult, ClientAuth, ControlMessage, Frame, FrameCodec, ServerHello};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|input: (Vec<Frame>, Vec<ControlMessage>, ServerHello, ClientAuth, AuthResult)| {
    let (frames, controls, hello, auth, result) = input;

    let mut wire = BytesMut::new();
    for frame in &frames {
        frame.encode(&mut wire).expect("arbitrary frames are within limits");
    }
    let mut decoded = Vec::new();
    while let Some(frame) = FrameCodec.decode(&mut wire).expect("own encoding decodes") {
        decoded.push(frame);
    }
    assert!(wire.is_empty());
    assert_eq!(decoded, frames);

    let mut wire = BytesMut::new();
    for msg in &controls {
        msg.encode(&mut wire).expect("arbitrary control messages are within limits");
    }
    let mut decoded = Vec::new();
    while let Some(msg) = ControlMessage::decode(&mut wire).expect("own encoding decodes") {
        decoded.push(msg);
    }
    assert_eq!(decoded, controls);

    assert_eq!(ServerHello::decode(hello.encode()).expect("decodes"), hello);
    assert_eq!(ClientAuth::decode(auth.encode()).expect("decodes"), auth);
    assert_eq!(AuthResult::decode(result.encode()).expect("decodes"), result);
});
