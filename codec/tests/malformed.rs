//! One test per kind of bad input: each must give its typed error (never a panic, never an
//! allocation beyond the limits, never a silently accepted value).

use bytes::{BufMut, Bytes, BytesMut};
use ferry_codec::frame::{HEADER_LEN, MAX_DATA_LEN, MAX_HEAD_LEN};
use ferry_codec::handshake::{MAX_HANDSHAKE_LEN, check_version};
use ferry_codec::{
    Abort, AbortCode, ClientAuth, CodecError, ControlCodec, ControlMessage, Frame, FrameCodec, InstanceId,
    Nonce, PROTOCOL_VERSION, ServerHello, TunnelIdError,
};
use tokio_util::codec::Decoder;
use uuid::Uuid;

const TUNNEL: &str = "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_web";

fn frame_bytes(len: u32, kind: u8, payload: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u32(len);
    buf.put_u8(kind);
    buf.put_slice(payload);
    buf
}

/// A protobuf field: tag (field number, wire type) and a length-delimited payload.
fn pb_field(number: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 128);
    let mut out = vec![(number << 3) | 2, payload.len() as u8];
    out.extend_from_slice(payload);
    out
}

#[test]
fn truncated_header_needs_more_bytes() {
    for len in 0..HEADER_LEN {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 1, 2][..len]);
        assert!(Frame::decode(&mut buf).unwrap().is_none());
        assert_eq!(buf.len(), len, "nothing consumed");
    }
}

#[test]
fn truncated_payload_needs_more_bytes_then_fails_at_eof() {
    let mut buf = BytesMut::new();
    Frame::Data(Bytes::from_static(b"hello world")).encode(&mut buf).unwrap();
    buf.truncate(buf.len() - 3);
    let mut codec = FrameCodec;
    assert!(codec.decode(&mut buf).unwrap().is_none());
    match codec.decode_eof(&mut buf) {
        Err(CodecError::Truncated { have, need }) => assert_eq!((have, need), (13, 16)),
        other => panic!("expected Truncated, got {other:?}"),
    }
}

#[test]
fn oversized_data_frame_is_refused_from_its_header_alone() {
    let mut buf = frame_bytes(MAX_DATA_LEN as u32 + 1, 2, b"");
    let capacity = buf.capacity();
    match Frame::decode(&mut buf) {
        Err(CodecError::TooLarge { len, limit, .. }) => {
            assert_eq!((len, limit), (MAX_DATA_LEN + 1, MAX_DATA_LEN))
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(buf.capacity(), capacity, "nothing reserved for a refused frame");
}

#[test]
fn oversized_head_and_max_length_are_refused() {
    assert!(matches!(
        Frame::decode(&mut frame_bytes(MAX_HEAD_LEN as u32 + 1, 1, b"")),
        Err(CodecError::TooLarge { .. })
    ));
    assert!(matches!(Frame::decode(&mut frame_bytes(u32::MAX, 3, b"")), Err(CodecError::TooLarge { .. })));
}

#[test]
fn end_frame_with_payload_is_refused() {
    assert!(matches!(Frame::decode(&mut frame_bytes(1, 4, b"x")), Err(CodecError::TooLarge { .. })));
}

#[test]
fn unknown_kinds_are_refused() {
    for kind in [0u8, 6, 0x7f, 0xff] {
        match Frame::decode(&mut frame_bytes(0, kind, b"")) {
            Err(CodecError::UnknownKind(k)) => assert_eq!(k, kind),
            other => panic!("kind {kind}: expected UnknownKind, got {other:?}"),
        }
    }
}

#[test]
fn garbage_protobuf_in_head_is_refused() {
    // Field 1, wire type 2, announcing 100 bytes that are not there.
    let garbage = [0x0a, 100, 1, 2];
    let mut buf = frame_bytes(garbage.len() as u32, 1, &garbage);
    assert!(matches!(Frame::decode(&mut buf), Err(CodecError::Protobuf { what: "Head", .. })));
}

#[test]
fn head_without_kind_is_refused() {
    let mut buf = frame_bytes(0, 1, b"");
    assert!(matches!(Frame::decode(&mut buf), Err(CodecError::MissingField("Head.kind"))));
}

#[test]
fn head_with_injected_header_value_is_refused() {
    // Head { request: RequestHead { method: "GET", target: "/", version: 2,
    //        headers: [Header { name: "x", value: "a\r\nb" }], request_id: "r" } }
    let header = [pb_field(1, b"x"), pb_field(2, b"a\r\nb")].concat();
    let request =
        [pb_field(1, b"GET"), pb_field(2, b"/"), vec![3 << 3, 2], pb_field(4, &header), pb_field(6, b"r")]
            .concat();
    let head = pb_field(1, &request);
    let mut buf = frame_bytes(head.len() as u32, 1, &head);
    assert!(matches!(Frame::decode(&mut buf), Err(CodecError::InvalidField { field: "Header.value", .. })));
}

#[test]
fn unknown_abort_code_is_refused() {
    // Abort { code: 99 }
    let abort = [1 << 3, 99];
    let mut buf = frame_bytes(abort.len() as u32, 5, &abort);
    assert!(matches!(Frame::decode(&mut buf), Err(CodecError::InvalidField { field: "Abort.code", .. })));
}

#[test]
fn encoder_refuses_frames_the_peer_would_refuse() {
    let big = Frame::Data(Bytes::from(vec![0; MAX_DATA_LEN + 1]));
    assert!(matches!(big.encode(&mut BytesMut::new()), Err(CodecError::TooLarge { .. })));
    let long = Frame::Abort(Abort::new(AbortCode::Internal, "x".repeat(2000)));
    assert!(matches!(long.encode(&mut BytesMut::new()), Err(CodecError::TooLarge { .. })));
}

#[test]
fn oversized_and_garbage_control_messages_are_refused() {
    let mut buf = BytesMut::new();
    buf.put_u32(1 << 20);
    assert!(matches!(ControlCodec.decode(&mut buf), Err(CodecError::TooLarge { .. })));

    let mut buf = BytesMut::new();
    buf.put_u32(2);
    buf.put_slice(&[0xff, 0xff]);
    assert!(matches!(ControlMessage::decode(&mut buf), Err(CodecError::Protobuf { .. })));

    let mut buf = BytesMut::new();
    buf.put_u32(0);
    assert!(matches!(ControlMessage::decode(&mut buf), Err(CodecError::MissingField(_))));
}

fn client_auth(tunnel_id: &str) -> Vec<u8> {
    [vec![1 << 3, PROTOCOL_VERSION as u8], pb_field(2, tunnel_id.as_bytes()), pb_field(3, &[7; 16])].concat()
}

#[test]
fn client_auth_with_bad_tunnel_id_is_refused() {
    assert!(ClientAuth::decode(client_auth(TUNNEL)).is_ok());
    let bad = TUNNEL.replace("_web", "_WEB");
    assert!(matches!(
        ClientAuth::decode(client_auth(&bad)),
        Err(CodecError::TunnelId(TunnelIdError::InvalidPurpose))
    ));
}

#[test]
fn client_auth_with_short_instance_id_is_refused() {
    // Re-encode with a 15-byte instance id: drop the last byte and fix its length prefix.
    let mut auth = client_auth(TUNNEL);
    auth.truncate(auth.len() - 1);
    let prefix = auth.len() - 16;
    auth[prefix] = 15;
    assert!(ClientAuth::decode(auth).is_err());
}

#[test]
fn oversized_handshake_is_refused_before_decoding() {
    let big = vec![0u8; MAX_HANDSHAKE_LEN + 1];
    assert!(matches!(ClientAuth::decode(big.clone()), Err(CodecError::TooLarge { .. })));
    assert!(matches!(ServerHello::decode(big), Err(CodecError::TooLarge { .. })));
}

#[test]
fn server_hello_with_short_nonce_is_refused() {
    let hello = [vec![1 << 3, 1], pb_field(2, &[1; 31])].concat();
    assert!(matches!(
        ServerHello::decode(hello),
        Err(CodecError::InvalidField { field: "ServerHello.server_nonce", .. })
    ));
}

#[test]
fn other_protocol_versions_are_refused() {
    assert!(check_version(PROTOCOL_VERSION).is_ok());
    assert!(matches!(check_version(2), Err(CodecError::UnsupportedVersion(2))));
    let hello = ServerHello {
        version: 9,
        nonce: Nonce::from_bytes([0; 32]),
        gateway_version: String::new(),
        auth_required: false,
    };
    let decoded = ServerHello::decode(hello.encode()).unwrap();
    assert!(check_version(decoded.version).is_err());
}

/// A plain `ClientAuth`, for tests to change one field of.
fn plain_client_auth() -> ClientAuth {
    ClientAuth {
        version: PROTOCOL_VERSION,
        tunnel_id: TUNNEL.parse().unwrap(),
        instance_id: InstanceId(Uuid::from_u128(42)),
        agent_version: "ferry-agent 0.1.0".into(),
        mac: None,
        tcp: Vec::new(),
        allow_ip: Vec::new(),
        deny_ip: Vec::new(),
        basic_auth: Vec::new(),
    }
}

/// A plain `AuthAccepted`, for tests to change one field of.
fn plain_accepted() -> ferry_codec::handshake::AuthAccepted {
    ferry_codec::handshake::AuthAccepted {
        session_id: ferry_codec::SessionId(Uuid::from_u128(7)),
        server_mac: None,
        heartbeat_interval: std::time::Duration::from_secs(20),
        limits: ferry_codec::handshake::SessionLimits { max_streams: 10, max_data_frame_len: 1 << 20 },
        public_urls: Vec::new(),
        node_id: None,
        tcp: Vec::new(),
    }
}

#[test]
fn instance_ids_survive_the_handshake() {
    let auth = plain_client_auth();
    assert_eq!(ClientAuth::decode(auth.encode()).unwrap(), auth);
}

#[test]
fn a_node_id_in_auth_accepted_must_be_one() {
    use ferry_codec::AuthResult;
    use ferry_codec::handshake::AuthAccepted;
    let accepted = |node_id: Option<&str>| {
        AuthResult::Accepted(AuthAccepted { node_id: node_id.map(str::to_owned), ..plain_accepted() })
    };
    for good in [None, Some("node-a"), Some("n-0123456789ab"), Some("gw_1.eu")] {
        assert_eq!(AuthResult::decode(accepted(good).encode()).unwrap(), accepted(good));
    }
    for bad in ["node a", "node\n", &"x".repeat(65), "nöde"] {
        assert!(
            matches!(
                AuthResult::decode(accepted(Some(bad)).encode()),
                Err(CodecError::InvalidField { field: "AuthAccepted.node_id", .. })
            ),
            "{bad:?}"
        );
    }
}

/// A `ClientAuth` declaring `endpoints` (name, port) as TCP endpoints.
fn client_auth_with_tcp(endpoints: &[(&str, u32)]) -> Vec<u8> {
    let mut auth = client_auth(TUNNEL);
    for (name, port) in endpoints {
        let mut endpoint = pb_field(1, name.as_bytes());
        let mut port_field = vec![2 << 3];
        let mut value = *port;
        while value >= 0x80 {
            port_field.push((value as u8) | 0x80);
            value >>= 7;
        }
        port_field.push(value as u8);
        endpoint.extend(port_field);
        auth.extend(pb_field(6, &endpoint));
    }
    auth
}

#[test]
fn tcp_endpoints_in_client_auth_are_checked() {
    let auth = ClientAuth::decode(client_auth_with_tcp(&[("127.0.0.1:5432", 0), ("db", 20_001)])).unwrap();
    assert_eq!(auth.tcp.len(), 2);
    assert_eq!((auth.tcp[0].port, auth.tcp[1].port), (None, Some(20_001)));
    let nine: Vec<String> = (0..9).map(|i| format!("e{i}")).collect();
    let nine: Vec<(&str, u32)> = nine.iter().map(|n| (n.as_str(), 0)).collect();
    let long = "x".repeat(65);
    for bad in [
        vec![("a b", 0)],
        vec![("", 0)],
        vec![(long.as_str(), 0)],
        vec![("db", 70_000)],
        vec![("db", 0), ("db", 1)],
        nine,
    ] {
        assert!(
            matches!(
                ClientAuth::decode(client_auth_with_tcp(&bad)),
                Err(CodecError::InvalidField { field: "ClientAuth.tcp", .. })
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn a_tcp_binding_has_a_port_or_a_short_error() {
    use ferry_codec::AuthResult;
    use ferry_codec::handshake::{AuthAccepted, TcpBinding};
    let accepted = |port: Result<u16, String>| {
        AuthResult::Accepted(AuthAccepted {
            tcp: vec![TcpBinding { name: "127.0.0.1:5432".into(), port }],
            ..plain_accepted()
        })
    };
    for good in [Ok(20_000), Err("port 5432 is not granted to this tunnel".to_owned())] {
        assert_eq!(AuthResult::decode(accepted(good.clone()).encode()).unwrap(), accepted(good));
    }
    for bad in [Ok(0), Err(String::new()), Err("x".repeat(201)), Err("line\nbreak".to_owned())] {
        assert!(
            matches!(
                AuthResult::decode(accepted(bad.clone()).encode()),
                Err(CodecError::InvalidField { field: "AuthAccepted.tcp", .. })
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn a_tcp_open_head_needs_an_endpoint_a_client_and_a_public_port() {
    use ferry_codec::{Head, TcpOpen};
    let open = TcpOpen {
        endpoint: "db".into(),
        client_addr: "127.0.0.2:4000".parse().unwrap(),
        public_addr: "127.0.0.1:20000".parse().unwrap(),
    };
    let mut buf = BytesMut::new();
    Frame::Head(Head::TcpOpen(open.clone())).encode(&mut buf).unwrap();
    assert_eq!(Frame::decode(&mut buf).unwrap(), Some(Frame::Head(Head::TcpOpen(open.clone()))));
    for bad in [
        TcpOpen { public_addr: "127.0.0.1:0".parse().unwrap(), ..open.clone() },
        TcpOpen { endpoint: String::new(), ..open.clone() },
        TcpOpen { endpoint: "a b".into(), ..open.clone() },
    ] {
        let mut buf = BytesMut::new();
        Frame::Head(Head::TcpOpen(bad.clone())).encode(&mut buf).unwrap();
        assert!(Frame::decode(&mut buf).is_err(), "{bad:?}");
    }
    // Without a client address (only field 1 of the TcpOpen message).
    let open = pb_field(1, b"db");
    let head = pb_field(3, &open);
    let mut buf = frame_bytes(head.len() as u32, 1, &head);
    assert!(matches!(Frame::decode(&mut buf), Err(CodecError::MissingField("TcpOpen.client_addr"))));
}

#[test]
fn address_blocks_in_client_auth_are_checked() {
    let auth = |allow: Vec<String>| ClientAuth {
        allow_ip: allow,
        deny_ip: vec!["2001:db8::/32".into()],
        ..plain_client_auth()
    };
    let good = auth(vec!["10.0.0.0/8".into(), "127.0.0.1".into()]);
    assert_eq!(ClientAuth::decode(good.encode()).unwrap(), good);
    for bad in [
        vec!["10.0.0.0/8 ".to_owned()],
        vec!["evil".to_owned()],
        vec!["1".to_owned()],
        vec!["1.2.3.4/8".to_owned(); 33],
    ] {
        assert!(
            matches!(
                ClientAuth::decode(auth(bad.clone()).encode()),
                Err(CodecError::InvalidField { field: "ClientAuth.allow_ip", .. })
                    | Err(CodecError::TooLarge { .. })
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn basic_auth_lines_in_client_auth_are_checked() {
    let hash = format!("$2y$10${}", "a".repeat(53));
    let auth = |lines: Vec<String>| ClientAuth { basic_auth: lines, ..plain_client_auth() };
    let good = auth(vec![format!("alice:{hash}"), format!("bob:{}", hash.replace("$2y$", "$2b$"))]);
    assert_eq!(ClientAuth::decode(good.encode()).unwrap(), good);
    for bad in [
        vec![format!("alice:{hash}"), format!("alice:{hash}")],
        vec![format!(":{hash}")],
        vec![format!("al ice:{hash}")],
        vec!["alice:secret".to_owned()],
        vec![format!("alice:{}", hash.replace("$2y$", "$1$x"))],
        vec![format!("alice:{hash}x")],
        vec![format!("{}:{hash}", "u".repeat(65))],
        (0..17).map(|i| format!("u{i}:{hash}")).collect(),
    ] {
        assert!(
            matches!(
                ClientAuth::decode(auth(bad.clone()).encode()),
                Err(CodecError::InvalidField { field: "ClientAuth.basic_auth", .. })
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn the_largest_client_auth_fits_the_handshake_limit() {
    use ferry_codec::handshake::{
        MAX_BASIC_AUTH_USERS, MAX_IP_RULES, MAX_SOFTWARE_VERSION_LEN, MAX_TCP_ENDPOINTS, TcpEndpoint,
    };
    let longest_block = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128".to_owned();
    let auth = ClientAuth {
        version: PROTOCOL_VERSION,
        tunnel_id: format!("agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_{}", "p".repeat(20)).parse().unwrap(),
        instance_id: InstanceId(Uuid::from_u128(u128::MAX)),
        agent_version: "v".repeat(MAX_SOFTWARE_VERSION_LEN),
        mac: Some(ferry_codec::Mac::from_bytes([0xff; 32])),
        tcp: (0..MAX_TCP_ENDPOINTS)
            .map(|i| TcpEndpoint { name: format!("{i}{}", "n".repeat(63)), port: Some(u16::MAX) })
            .collect(),
        allow_ip: vec![longest_block.clone(); MAX_IP_RULES],
        deny_ip: vec![longest_block; MAX_IP_RULES],
        basic_auth: (0..MAX_BASIC_AUTH_USERS)
            .map(|i| format!("{i:0>64}:$2y$31${}", "x".repeat(53)))
            .collect(),
    };
    let wire = auth.encode();
    assert!(wire.len() <= MAX_HANDSHAKE_LEN, "{} bytes", wire.len());
    assert_eq!(ClientAuth::decode(wire).unwrap(), auth);
}
