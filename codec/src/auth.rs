//! Authentication: the canonical transcript and its HMAC-SHA256 MACs.
//!
//! The agent proves it holds the tunnel's secret by MACing a transcript that includes the
//! gateway's fresh nonce; the gateway proves the same in return with a MAC over a transcript with a
//! different label (so one MAC can never be reflected as the other) that also names the session.
//!
//! The transcript is built by hand, never from serialized protobuf: every field is written as a
//! 4-byte big-endian length followed by its bytes, in a fixed order, so it has exactly one encoding
//! and no two different field lists produce the same bytes.
//!
//! ```text
//! client: field("ferry.v1 client-auth") field(version u32 BE) field(nonce 32)
//!         field(tunnel id, canonical text) field(instance id 16)
//! server: field("ferry.v1 server-auth") field(version u32 BE) field(nonce 32)
//!         field(tunnel id, canonical text) field(instance id 16) field(session id 16)
//! ```

use std::fmt;

use hmac::{Hmac, KeyInit, Mac as _};
use sha2::Sha256;

use crate::CodecError;
use crate::id::{InstanceId, SessionId, TunnelId};

type HmacSha256 = Hmac<Sha256>;

/// Domain label of the agent's transcript.
pub const CLIENT_LABEL: &[u8] = b"ferry.v1 client-auth";
/// Domain label of the gateway's transcript.
pub const SERVER_LABEL: &[u8] = b"ferry.v1 server-auth";
/// Length of a server nonce.
pub const NONCE_LEN: usize = 32;
/// Length of a MAC (HMAC-SHA256).
pub const MAC_LEN: usize = 32;

/// A shared secret. Its `Debug` never shows the bytes and it has no `Display`.
#[derive(Clone)]
pub struct Secret(Box<[u8]>);

impl Secret {
    /// Wraps secret bytes.
    ///
    /// # Errors
    /// The secret is empty (an empty key would make every MAC forgeable by anyone).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, CodecError> {
        let bytes = bytes.into();
        if bytes.is_empty() {
            return Err(CodecError::invalid("secret", "must not be empty"));
        }
        Ok(Self(bytes.into_boxed_slice()))
    }

    /// A secret as written in a file or an environment variable: surrounding whitespace (the
    /// newline editors add) is not part of it.
    ///
    /// # Errors
    /// Nothing is left after trimming.
    pub fn from_text(text: &str) -> Result<Self, CodecError> {
        Self::new(text.trim().as_bytes())
    }

    /// The secret bytes, for callers that must derive something from them (a fingerprint).
    /// Never log or send them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    fn hmac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.0).expect("HMAC accepts keys of any length")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The gateway's per-connection random challenge. The caller draws the bytes (this crate has no
/// randomness source of its own).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Nonce([u8; NONCE_LEN]);

impl Nonce {
    /// Wraps 32 random bytes.
    pub fn from_bytes(bytes: [u8; NONCE_LEN]) -> Self {
        Self(bytes)
    }

    /// The nonce bytes.
    pub fn as_bytes(&self) -> &[u8; NONCE_LEN] {
        &self.0
    }
}

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nonce({})", Hex(&self.0))
    }
}

/// An HMAC-SHA256 tag.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Mac([u8; MAC_LEN]);

impl Mac {
    /// Wraps 32 tag bytes.
    pub fn from_bytes(bytes: [u8; MAC_LEN]) -> Self {
        Self(bytes)
    }

    /// The tag bytes.
    pub fn as_bytes(&self) -> &[u8; MAC_LEN] {
        &self.0
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mac({})", Hex(&self.0))
    }
}

struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// The canonical bytes a MAC covers.
#[derive(Clone, PartialEq, Eq)]
pub struct Transcript(Vec<u8>);

impl Transcript {
    fn start(label: &[u8], version: u32, nonce: &Nonce, tunnel_id: &TunnelId, instance: &InstanceId) -> Self {
        let mut transcript = Self(Vec::with_capacity(192));
        transcript.field(label);
        transcript.field(&version.to_be_bytes());
        transcript.field(nonce.as_bytes());
        transcript.field(tunnel_id.as_str().as_bytes());
        transcript.field(instance.as_bytes());
        transcript
    }

    /// What the agent MACs in `ClientAuth`.
    pub fn client(version: u32, nonce: &Nonce, tunnel_id: &TunnelId, instance: &InstanceId) -> Self {
        Self::start(CLIENT_LABEL, version, nonce, tunnel_id, instance)
    }

    /// What the gateway MACs in `AuthAccepted`.
    pub fn server(
        version: u32,
        nonce: &Nonce,
        tunnel_id: &TunnelId,
        instance: &InstanceId,
        session: &SessionId,
    ) -> Self {
        let mut transcript = Self::start(SERVER_LABEL, version, nonce, tunnel_id, instance);
        transcript.field(session.as_bytes());
        transcript
    }

    fn field(&mut self, bytes: &[u8]) {
        let len = u32::try_from(bytes.len()).expect("transcript fields are short");
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(bytes);
    }

    /// The transcript bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// HMAC-SHA256 of the transcript under `secret`.
    pub fn sign(&self, secret: &Secret) -> Mac {
        let mut hmac = secret.hmac();
        hmac.update(&self.0);
        Mac(hmac.finalize().into_bytes().into())
    }

    /// Checks `mac` against the transcript under `secret`, in constant time.
    ///
    /// # Errors
    /// [`CodecError::BadMac`] when the tag does not match.
    pub fn verify(&self, secret: &Secret, mac: &Mac) -> Result<(), CodecError> {
        let mut hmac = secret.hmac();
        hmac.update(&self.0);
        hmac.verify_slice(mac.as_bytes()).map_err(|_| CodecError::BadMac)
    }
}

impl fmt::Debug for Transcript {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Transcript({})", Hex(&self.0))
    }
}
