//! Known-answer vectors for the transcript and MACs. The expected bytes were computed outside
//! this code base (Python's `hmac` and `hashlib`, building the transcript from the layout in the
//! `auth` module docs), so a change in field order, length prefixes or labels fails here.

use ferry_codec::{
    CodecError, InstanceId, Mac, Nonce, PROTOCOL_VERSION, Secret, SessionId, Transcript, TunnelId,
};
use uuid::Uuid;

const CLIENT_TRANSCRIPT: &str = "0000001466657272792e763120636c69656e742d6175746800000004000000010000\
    0020000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f0000002e6167656e745f306236\
    66346331652d386135312d346333652d396432612d3531663065366137623963345f7765620000001000112233445566\
    778899aabbccddeeff";
const CLIENT_MAC: &str = "90699fac5f3c9743a30aa8385c7b5fa5583c3069f60ba0cb0391bb03da1af729";
const SERVER_MAC: &str = "f43fd2e8e0caafa00b63a649e1c8c29511fa3c9d175d36236bf344012aff6a3d";

fn hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    digits.chunks(2).map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap()).collect()
}

fn mac(text: &str) -> Mac {
    Mac::from_bytes(hex(text).try_into().unwrap())
}

struct Fixture {
    secret: Secret,
    nonce: Nonce,
    tunnel: TunnelId,
    instance: InstanceId,
    session: SessionId,
}

fn fixture() -> Fixture {
    let mut nonce = [0u8; 32];
    nonce.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
    Fixture {
        secret: Secret::new(&b"ferry test secret"[..]).unwrap(),
        nonce: Nonce::from_bytes(nonce),
        tunnel: "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_web".parse().unwrap(),
        instance: InstanceId(Uuid::from_u128(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff)),
        session: SessionId(Uuid::from_u128(0xffee_ddcc_bbaa_9988_7766_5544_3322_1100)),
    }
}

impl Fixture {
    fn client(&self) -> Transcript {
        Transcript::client(PROTOCOL_VERSION, &self.nonce, &self.tunnel, &self.instance)
    }

    fn server(&self) -> Transcript {
        Transcript::server(PROTOCOL_VERSION, &self.nonce, &self.tunnel, &self.instance, &self.session)
    }
}

#[test]
fn client_transcript_bytes() {
    let f = fixture();
    assert_eq!(f.client().as_bytes(), &hex(CLIENT_TRANSCRIPT)[..]);
}

#[test]
fn client_and_server_macs() {
    let f = fixture();
    assert_eq!(f.client().sign(&f.secret), mac(CLIENT_MAC));
    assert_eq!(f.server().sign(&f.secret), mac(SERVER_MAC));
    f.client().verify(&f.secret, &mac(CLIENT_MAC)).unwrap();
    f.server().verify(&f.secret, &mac(SERVER_MAC)).unwrap();
}

#[test]
fn wrong_mac_is_refused() {
    let f = fixture();
    let mut bytes = hex(CLIENT_MAC);
    bytes[31] ^= 1;
    assert!(matches!(f.client().verify(&f.secret, &mac_of(bytes)), Err(CodecError::BadMac)));
    let other = Secret::new(&b"another secret"[..]).unwrap();
    assert!(matches!(f.client().verify(&other, &mac(CLIENT_MAC)), Err(CodecError::BadMac)));
}

fn mac_of(bytes: Vec<u8>) -> Mac {
    Mac::from_bytes(bytes.try_into().unwrap())
}

#[test]
fn mac_for_another_nonce_is_refused() {
    // A MAC recorded on one connection does not verify against the next connection's nonce.
    let f = fixture();
    let recorded = f.client().sign(&f.secret);
    let fresh = Transcript::client(PROTOCOL_VERSION, &Nonce::from_bytes([9; 32]), &f.tunnel, &f.instance);
    assert!(matches!(fresh.verify(&f.secret, &recorded), Err(CodecError::BadMac)));
}

#[test]
fn client_mac_cannot_be_reflected_as_server_mac() {
    let f = fixture();
    let client_mac = f.client().sign(&f.secret);
    assert!(f.server().verify(&f.secret, &client_mac).is_err());
}

#[test]
fn mac_binds_tunnel_and_instance() {
    let f = fixture();
    let signed = f.client().sign(&f.secret);
    let other_tunnel: TunnelId = "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_api".parse().unwrap();
    let t = Transcript::client(PROTOCOL_VERSION, &f.nonce, &other_tunnel, &f.instance);
    assert!(t.verify(&f.secret, &signed).is_err());
    let t = Transcript::client(PROTOCOL_VERSION, &f.nonce, &f.tunnel, &InstanceId(Uuid::nil()));
    assert!(t.verify(&f.secret, &signed).is_err());
}

#[test]
fn secrets_never_print_and_cannot_be_empty() {
    let f = fixture();
    assert_eq!(format!("{:?}", f.secret), "Secret(***)");
    assert!(Secret::new(Vec::new()).is_err());
}
