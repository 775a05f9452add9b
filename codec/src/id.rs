//! Identifiers that travel on the wire: [`TunnelId`], [`StreamId`], [`SessionId`], [`InstanceId`].
//!
//! A tunnel id names the service an agent exposes: `agent_{uuid}_{purpose}`, for example
//! `agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_web`. Because `_` is not allowed in DNS names, Host
//! routing uses its *label* form `agent-{uuid}-{purpose}`, which always fits one 63-octet DNS label.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

/// Prefix of every tunnel id.
const ID_PREFIX: &str = "agent_";
/// Prefix of every tunnel label (the DNS-safe form).
const LABEL_PREFIX: &str = "agent-";
/// Length of a UUID in canonical hyphenated form.
const UUID_LEN: usize = 36;
/// Longest purpose: `agent-` (6) + uuid (36) + `-` (1) + 20 = 63, the longest DNS label.
pub const MAX_PURPOSE_LEN: usize = 20;
/// Longest tunnel id (and label), in bytes.
pub const MAX_TUNNEL_ID_LEN: usize = ID_PREFIX.len() + UUID_LEN + 1 + MAX_PURPOSE_LEN;

/// Why a string is not a tunnel id (or not a tunnel label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelIdError {
    /// Longer than [`MAX_TUNNEL_ID_LEN`].
    #[error("tunnel id is longer than {MAX_TUNNEL_ID_LEN} characters")]
    TooLong,
    /// Contains a character outside ASCII.
    #[error("tunnel id must be ASCII")]
    NotAscii,
    /// Does not start with `agent_` (or `agent-` for a label).
    #[error("tunnel id must start with `agent_` (expected agent_{{uuid}}_{{purpose}})")]
    MissingPrefix,
    /// The part after the prefix is not a canonical hyphenated UUID.
    #[error(
        "tunnel id must contain a UUID in canonical hyphenated form, like \
         agent_123e4567-e89b-12d3-a456-426614174000_web"
    )]
    InvalidUuid,
    /// No `_{purpose}` after the UUID.
    #[error("tunnel id must end with `_` and a purpose after the UUID, like `_web`")]
    MissingPurpose,
    /// The purpose is longer than [`MAX_PURPOSE_LEN`].
    #[error("tunnel purpose must be at most {MAX_PURPOSE_LEN} characters")]
    PurposeTooLong,
    /// The purpose contains something other than `a-z`, `0-9` and `-`, or starts or ends with `-`.
    #[error(
        "tunnel purpose must be lowercase letters, digits and `-`, starting and ending with a \
         letter or digit"
    )]
    InvalidPurpose,
}

/// A validated tunnel id, `agent_{uuid}_{purpose}`, with the UUID in lowercase canonical form.
///
/// Purpose grammar: `[a-z0-9][a-z0-9-]{0,19}`, and it may not end with `-` (the label form must be
/// a valid DNS label, which cannot end with a hyphen).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TunnelId {
    /// The canonical text form; kept whole because it is what logs, maps and the wire use.
    repr: Box<str>,
}

impl TunnelId {
    /// Builds a tunnel id from its parts.
    ///
    /// # Errors
    /// The purpose does not follow the grammar.
    pub fn new(uuid: Uuid, purpose: &str) -> Result<Self, TunnelIdError> {
        check_purpose(purpose)?;
        // Built in place at its exact length: the gateway parses an id from every request's path,
        // and `format!` took four allocations for it where this takes one.
        let mut uuid_text = Uuid::encode_buffer();
        let uuid_text = uuid.hyphenated().encode_lower(&mut uuid_text);
        let mut repr = String::with_capacity(ID_PREFIX.len() + uuid_text.len() + 1 + purpose.len());
        repr.push_str(ID_PREFIX);
        repr.push_str(uuid_text);
        repr.push('_');
        repr.push_str(purpose);
        Ok(Self { repr: repr.into_boxed_str() })
    }

    /// The canonical text form, `agent_{uuid}_{purpose}`.
    pub fn as_str(&self) -> &str {
        &self.repr
    }

    /// The UUID part.
    pub fn uuid(&self) -> Uuid {
        let text = &self.repr[ID_PREFIX.len()..ID_PREFIX.len() + UUID_LEN];
        Uuid::parse_str(text).expect("a TunnelId always holds a valid uuid")
    }

    /// The purpose part.
    pub fn purpose(&self) -> &str {
        &self.repr[ID_PREFIX.len() + UUID_LEN + 1..]
    }

    /// The DNS-safe host label, `agent-{uuid}-{purpose}` (at most 63 octets).
    pub fn to_label(&self) -> String {
        self.repr.replace('_', "-")
    }

    /// Parses a host label produced by [`TunnelId::to_label`]. Case-insensitive, as DNS is.
    ///
    /// # Errors
    /// The label is not `agent-{uuid}-{purpose}`.
    pub fn from_label(label: &str) -> Result<Self, TunnelIdError> {
        if label.len() > MAX_TUNNEL_ID_LEN {
            return Err(TunnelIdError::TooLong);
        }
        let label = label.to_ascii_lowercase();
        parse(&label, LABEL_PREFIX, b'-')
    }
}

/// Parses `{prefix}{uuid}{sep}{purpose}`; `prefix` and `sep` differ between id and label forms.
fn parse(text: &str, prefix: &str, sep: u8) -> Result<TunnelId, TunnelIdError> {
    if text.len() > MAX_TUNNEL_ID_LEN {
        return Err(TunnelIdError::TooLong);
    }
    if !text.is_ascii() {
        return Err(TunnelIdError::NotAscii);
    }
    let rest = text.strip_prefix(prefix).ok_or(TunnelIdError::MissingPrefix)?;
    // ASCII was checked above, so byte offsets are char boundaries.
    if rest.len() < UUID_LEN {
        return Err(TunnelIdError::InvalidUuid);
    }
    let (uuid_text, rest) = rest.split_at(UUID_LEN);
    let uuid = parse_canonical_uuid(uuid_text)?;
    let purpose = match rest.as_bytes().first() {
        Some(&b) if b == sep => &rest[1..],
        Some(_) => return Err(TunnelIdError::InvalidUuid),
        None => return Err(TunnelIdError::MissingPurpose),
    };
    if purpose.is_empty() {
        return Err(TunnelIdError::MissingPurpose);
    }
    TunnelId::new(uuid, purpose)
}

/// Accepts only the 8-4-4-4-12 hyphenated form (either case); `Uuid::parse_str` alone would also
/// take the simple, braced and URN forms, which would give one tunnel several spellings.
fn parse_canonical_uuid(text: &str) -> Result<Uuid, TunnelIdError> {
    let shape_ok = text.len() == UUID_LEN
        && text.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    if !shape_ok {
        return Err(TunnelIdError::InvalidUuid);
    }
    Uuid::parse_str(text).map_err(|_| TunnelIdError::InvalidUuid)
}

fn check_purpose(purpose: &str) -> Result<(), TunnelIdError> {
    if purpose.is_empty() {
        return Err(TunnelIdError::MissingPurpose);
    }
    if purpose.len() > MAX_PURPOSE_LEN {
        return Err(TunnelIdError::PurposeTooLong);
    }
    let bytes = purpose.as_bytes();
    let allowed = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
    if !bytes.iter().all(allowed) || bytes[0] == b'-' || bytes[bytes.len() - 1] == b'-' {
        return Err(TunnelIdError::InvalidPurpose);
    }
    Ok(())
}

impl FromStr for TunnelId {
    type Err = TunnelIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse(text, ID_PREFIX, b'_')
    }
}

impl TryFrom<&str> for TunnelId {
    type Error = TunnelIdError;

    fn try_from(text: &str) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl fmt::Display for TunnelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.repr)
    }
}

impl fmt::Debug for TunnelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TunnelId({})", self.repr)
    }
}

/// A yamux stream id, for logs and admin listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u32);

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Defines a 16-byte UUID newtype with the conversions the wire needs.
macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub Uuid);

        impl $name {
            /// The 16 bytes sent on the wire.
            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }

            /// Reads the 16 wire bytes.
            pub(crate) fn from_wire(bytes: &[u8]) -> Result<Self, crate::CodecError> {
                let bytes: [u8; 16] = bytes
                    .try_into()
                    .map_err(|_| crate::CodecError::invalid($field, "must be 16 bytes"))?;
                Ok(Self(Uuid::from_bytes(bytes)))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }
    };
}

uuid_id!(
    /// Names one agent session (one WebSocket); chosen by the gateway.
    SessionId,
    "AuthAccepted.session_id"
);
uuid_id!(
    /// Names one agent process; stays the same across its reconnects, so the gateway can replace a
    /// stale session of the same agent instead of keeping both.
    InstanceId,
    "ClientAuth.instance_id"
);

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4";

    fn id(text: &str) -> Result<TunnelId, TunnelIdError> {
        text.parse()
    }

    #[test]
    fn parses_and_normalises_uppercase_uuid() {
        let parsed = id(&format!("agent_{}_web", UUID.to_uppercase())).unwrap();
        assert_eq!(parsed.as_str(), format!("agent_{UUID}_web"));
        assert_eq!(parsed.purpose(), "web");
        assert_eq!(parsed.uuid().to_string(), UUID);
    }

    #[test]
    fn label_round_trip_and_length() {
        let long = "a".repeat(MAX_PURPOSE_LEN);
        let parsed = id(&format!("agent_{UUID}_{long}")).unwrap();
        let label = parsed.to_label();
        assert_eq!(label.len(), 63);
        assert_eq!(label, format!("agent-{UUID}-{long}"));
        assert_eq!(TunnelId::from_label(&label).unwrap(), parsed);
        assert_eq!(TunnelId::from_label(&label.to_uppercase()).unwrap(), parsed);
    }

    #[test]
    fn purpose_with_hyphens_in_label_parses_back() {
        let parsed = id(&format!("agent_{UUID}_my-api-2")).unwrap();
        assert_eq!(TunnelId::from_label(&parsed.to_label()).unwrap(), parsed);
    }

    #[test]
    fn rejects_bad_ids_with_typed_errors() {
        let cases = [
            (String::new(), TunnelIdError::MissingPrefix),
            (format!("agnt_{UUID}_web"), TunnelIdError::MissingPrefix),
            (format!("agent-{UUID}-web"), TunnelIdError::MissingPrefix),
            (format!("agent_{UUID}"), TunnelIdError::MissingPurpose),
            (format!("agent_{UUID}_"), TunnelIdError::MissingPurpose),
            (format!("agent_{UUID}-web"), TunnelIdError::InvalidUuid),
            ("agent_0b6f4c1e8a514c3e9d2a51f0e6a7b9c4_web".into(), TunnelIdError::InvalidUuid),
            ("agent_{0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c}_web".into(), TunnelIdError::InvalidUuid),
            ("agent_zb6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_web".into(), TunnelIdError::InvalidUuid),
            (format!("agent_{UUID}_Web"), TunnelIdError::InvalidPurpose),
            (format!("agent_{UUID}_-web"), TunnelIdError::InvalidPurpose),
            (format!("agent_{UUID}_web-"), TunnelIdError::InvalidPurpose),
            (format!("agent_{UUID}_we_b"), TunnelIdError::InvalidPurpose),
            (format!("agent_{UUID}_{}", "a".repeat(21)), TunnelIdError::TooLong),
            (format!("agent_{UUID}_wéb"), TunnelIdError::NotAscii),
        ];
        for (text, want) in cases {
            assert_eq!(id(&text), Err(want), "{text:?}");
        }
        assert_eq!(TunnelId::new(Uuid::nil(), &"a".repeat(21)), Err(TunnelIdError::PurposeTooLong));
    }

    #[test]
    fn rejects_multibyte_text_without_panicking() {
        // 35 ASCII bytes then a two-byte character straddling the uuid boundary.
        let text = format!("agent_{}é_web", &UUID[..35]);
        assert_eq!(id(&text), Err(TunnelIdError::NotAscii));
        assert_eq!(TunnelId::from_label("agent-é"), Err(TunnelIdError::NotAscii));
    }

    #[test]
    fn rejects_bad_labels() {
        assert_eq!(TunnelId::from_label(&format!("agent_{UUID}_web")), Err(TunnelIdError::MissingPrefix));
        assert_eq!(TunnelId::from_label("www"), Err(TunnelIdError::MissingPrefix));
        assert_eq!(TunnelId::from_label(&"x".repeat(64)), Err(TunnelIdError::TooLong));
    }
}
