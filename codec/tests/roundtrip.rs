//! Round-trip properties: every value the domain types can hold survives encode then decode,
//! whole or fed in arbitrary pieces. Values come from the `arbitrary` generators the fuzz targets
//! use, driven by proptest so failures shrink.

use arbitrary::{Arbitrary, Unstructured};
use bytes::BytesMut;
use ferry_codec::{
    AuthResult, ClientAuth, ControlCodec, ControlMessage, Frame, FrameCodec, ServerHello, TunnelId,
};
use proptest::collection::vec;
use proptest::prelude::*;
use tokio_util::codec::Decoder;

/// A proptest strategy drawing `T` from random bytes through its `Arbitrary` impl.
fn arb<T: for<'a> Arbitrary<'a> + std::fmt::Debug>(max_bytes: usize) -> impl Strategy<Value = T> {
    vec(any::<u8>(), 0..max_bytes)
        .prop_filter_map("not enough bytes", |bytes| T::arbitrary_take_rest(Unstructured::new(&bytes)).ok())
}

/// Feeds `wire` to `decoder` in pieces cut at `cuts` and collects everything it yields.
fn decode_in_pieces<D: Decoder>(mut decoder: D, wire: &[u8], cuts: &[usize]) -> Vec<D::Item>
where
    D::Error: std::fmt::Debug,
{
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
    points.push(wire.len());
    points.sort_unstable();
    let (mut buf, mut out, mut fed) = (BytesMut::new(), Vec::new(), 0);
    for point in points {
        buf.extend_from_slice(&wire[fed..point]);
        fed = point;
        while let Some(item) = decoder.decode(&mut buf).expect("valid input") {
            out.push(item);
        }
    }
    assert!(decoder.decode_eof(&mut buf).expect("no trailing bytes").is_none());
    out
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        // Failures print their shrunk input; CI runs on fresh clones, so a regressions file
        // would never be read back.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn frame_round_trip(frame in arb::<Frame>(4096)) {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf).unwrap();
        let decoded = Frame::decode(&mut buf).unwrap();
        prop_assert_eq!(decoded, Some(frame));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn frame_sequence_round_trip_in_pieces(
        frames in vec(arb::<Frame>(1024), 0..8),
        cuts in vec(any::<usize>(), 0..16),
    ) {
        let mut wire = BytesMut::new();
        for frame in &frames {
            frame.encode(&mut wire).unwrap();
        }
        prop_assert_eq!(decode_in_pieces(FrameCodec, &wire, &cuts), frames);
    }

    #[test]
    fn frames_decode_the_same_from_bytes(frames in vec(arb::<Frame>(1024), 0..8), cut in any::<usize>()) {
        let mut wire = BytesMut::new();
        for frame in &frames {
            frame.encode(&mut wire).unwrap();
        }
        let mut bytes = wire.freeze();
        let mut decoded = Vec::new();
        while let Some(frame) = Frame::decode_bytes(&mut bytes).unwrap() {
            decoded.push(frame);
        }
        prop_assert!(bytes.is_empty());
        prop_assert_eq!(&decoded, &frames);
        // A frame cut short is not taken, and nothing is consumed.
        if let Some(first) = frames.first() {
            let mut one = BytesMut::new();
            first.encode(&mut one).unwrap();
            let len = one.len();
            let mut short = one.freeze().slice(..cut % len);
            let before = short.clone();
            prop_assert_eq!(Frame::decode_bytes(&mut short).unwrap(), None);
            prop_assert_eq!(short, before);
        }
    }

    #[test]
    fn control_round_trip_in_pieces(
        msgs in vec(arb::<ControlMessage>(256), 0..8),
        cuts in vec(any::<usize>(), 0..16),
    ) {
        let mut wire = BytesMut::new();
        for msg in &msgs {
            msg.encode(&mut wire).unwrap();
        }
        prop_assert_eq!(decode_in_pieces(ControlCodec, &wire, &cuts), msgs);
    }

    #[test]
    fn server_hello_round_trip(hello in arb::<ServerHello>(256)) {
        prop_assert_eq!(ServerHello::decode(hello.encode()).unwrap(), hello);
    }

    #[test]
    fn client_auth_round_trip(auth in arb::<ClientAuth>(256)) {
        prop_assert_eq!(ClientAuth::decode(auth.encode()).unwrap(), auth);
    }

    #[test]
    fn auth_result_round_trip(result in arb::<AuthResult>(256)) {
        prop_assert_eq!(AuthResult::decode(result.encode()).unwrap(), result);
    }

    #[test]
    fn tunnel_id_text_and_label_round_trip(id in arb::<TunnelId>(64)) {
        prop_assert_eq!(id.to_string().parse::<TunnelId>().unwrap(), id.clone());
        let label = id.to_label();
        prop_assert!(label.len() <= 63);
        prop_assert!(label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        prop_assert!(!label.ends_with('-'));
        prop_assert_eq!(TunnelId::from_label(&label).unwrap(), id);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoders(bytes in vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = Frame::decode(&mut buf) {}
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = ControlMessage::decode(&mut buf) {}
        let _ = ServerHello::decode(bytes.clone());
        let _ = ClientAuth::decode(bytes.clone());
        let _ = AuthResult::decode(bytes.clone());
        let _ = String::from_utf8(bytes).map(|text| text.parse::<TunnelId>());
    }
}
