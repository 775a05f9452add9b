//! Control-stream messages: heartbeats, upstream health, drain and go-away, stats.
//!
//! The control stream is the first yamux stream of a session (the agent opens it). It carries
//! `u32 length (big endian) | protobuf ControlMessage` frames in both directions.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use prost::Message;

use crate::frame::{decode_message, take_payload, truncated};
use crate::{CodecError, pb};

/// Bytes before each control message: its length.
pub const CONTROL_HEADER_LEN: usize = 4;
/// Largest control message. The biggest (health with its detail) is a few hundred bytes.
pub const MAX_CONTROL_LEN: usize = 16 * 1024;
/// Longest health detail text.
pub const MAX_HEALTH_DETAIL_LEN: usize = 1024;

/// State of the agent's upstream as its health probe sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HealthState {
    /// Not probed (yet, or at all).
    Unknown,
    /// The last probe succeeded.
    Healthy,
    /// The last probes failed.
    Unhealthy,
}

/// Why the gateway asks an agent to go away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GoAwayReason {
    /// The gateway is shutting down.
    Shutdown,
    /// An operator asked this session to drain; the agent reconnects.
    AdminDrain,
    /// A newer session of the same agent instance replaced this one.
    Replaced,
    /// The secret this session authenticated with was removed.
    CredentialsRevoked,
}

/// Counters an agent reports to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Requests being served now.
    pub streams_in_flight: u64,
    /// Requests served since the session started.
    pub streams_total: u64,
    /// Body bytes sent to the upstream.
    pub bytes_to_upstream: u64,
    /// Body bytes received from the upstream.
    pub bytes_from_upstream: u64,
}

/// One message on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    /// Heartbeat request; either side sends it.
    Ping {
        /// Echoed in the `Pong`.
        nonce: u64,
    },
    /// Heartbeat answer.
    Pong {
        /// The `Ping`'s nonce.
        nonce: u64,
    },
    /// Agent → gateway: upstream health.
    UpstreamHealth {
        /// Probe verdict.
        state: HealthState,
        /// Short reason, for `/connections`.
        detail: String,
    },
    /// Agent → gateway: route no new requests here; in-flight ones finish within `grace`.
    Drain {
        /// How long the agent keeps serving in-flight requests.
        grace: Duration,
    },
    /// Gateway → agent: no new streams will come; reconnect.
    GoAway {
        /// Why.
        reason: GoAwayReason,
        /// How long in-flight streams may still run.
        grace: Duration,
    },
    /// Agent → gateway: counters.
    Stats(Stats),
}

impl ControlMessage {
    /// Appends `length | message` to `dst`.
    ///
    /// # Errors
    /// The message would exceed [`MAX_CONTROL_LEN`].
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), CodecError> {
        let msg = pb::ControlMessage::from(self);
        let len = msg.encoded_len();
        if len > MAX_CONTROL_LEN {
            return Err(too_large(len));
        }
        dst.reserve(CONTROL_HEADER_LEN + len);
        dst.put_u32(len as u32);
        msg.encode_raw(dst);
        Ok(())
    }

    /// Takes one message off the front of `src`; `Ok(None)` means "need more bytes".
    ///
    /// # Errors
    /// A length over [`MAX_CONTROL_LEN`] (reported from the 4-byte header alone) or a payload that
    /// does not decode.
    pub fn decode(src: &mut BytesMut) -> Result<Option<Self>, CodecError> {
        let Some(&[l0, l1, l2, l3]) = src.get(..CONTROL_HEADER_LEN) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
        if len > MAX_CONTROL_LEN {
            return Err(too_large(len));
        }
        match take_payload(src, CONTROL_HEADER_LEN, len) {
            Some(payload) => decode_message::<pb::ControlMessage, _>(payload, "ControlMessage").map(Some),
            None => Ok(None),
        }
    }
}

fn too_large(len: usize) -> CodecError {
    CodecError::TooLarge { what: "ControlMessage", len, limit: MAX_CONTROL_LEN }
}

fn millis(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

impl From<&ControlMessage> for pb::ControlMessage {
    fn from(msg: &ControlMessage) -> Self {
        use pb::control_message::Kind;
        let kind = match msg {
            ControlMessage::Ping { nonce } => Kind::Ping(pb::Ping { nonce: *nonce }),
            ControlMessage::Pong { nonce } => Kind::Pong(pb::Pong { nonce: *nonce }),
            ControlMessage::UpstreamHealth { state, detail } => {
                let state = match state {
                    HealthState::Unknown => pb::HealthState::Unknown,
                    HealthState::Healthy => pb::HealthState::Healthy,
                    HealthState::Unhealthy => pb::HealthState::Unhealthy,
                };
                Kind::UpstreamHealth(pb::UpstreamHealth { state: state.into(), detail: detail.clone() })
            }
            ControlMessage::Drain { grace } => Kind::Drain(pb::Drain { grace_ms: millis(*grace) }),
            ControlMessage::GoAway { reason, grace } => {
                let reason = match reason {
                    GoAwayReason::Shutdown => pb::GoAwayReason::Shutdown,
                    GoAwayReason::AdminDrain => pb::GoAwayReason::AdminDrain,
                    GoAwayReason::Replaced => pb::GoAwayReason::Replaced,
                    GoAwayReason::CredentialsRevoked => pb::GoAwayReason::CredentialsRevoked,
                };
                Kind::GoAway(pb::GoAway { reason: reason.into(), grace_ms: millis(*grace) })
            }
            ControlMessage::Stats(stats) => Kind::Stats(pb::Stats {
                streams_in_flight: stats.streams_in_flight,
                streams_total: stats.streams_total,
                bytes_to_upstream: stats.bytes_to_upstream,
                bytes_from_upstream: stats.bytes_from_upstream,
            }),
        };
        Self { kind: Some(kind) }
    }
}

impl TryFrom<pb::ControlMessage> for ControlMessage {
    type Error = CodecError;

    fn try_from(msg: pb::ControlMessage) -> Result<Self, CodecError> {
        use pb::control_message::Kind;
        Ok(match msg.kind.ok_or(CodecError::MissingField("ControlMessage.kind"))? {
            Kind::Ping(ping) => Self::Ping { nonce: ping.nonce },
            Kind::Pong(pong) => Self::Pong { nonce: pong.nonce },
            Kind::UpstreamHealth(health) => {
                const FIELD: &str = "UpstreamHealth.state";
                let state = match pb::HealthState::try_from(health.state) {
                    Ok(pb::HealthState::Unknown) => HealthState::Unknown,
                    Ok(pb::HealthState::Healthy) => HealthState::Healthy,
                    Ok(pb::HealthState::Unhealthy) => HealthState::Unhealthy,
                    Ok(pb::HealthState::Unspecified) => {
                        return Err(CodecError::MissingField(FIELD));
                    }
                    Err(_) => return Err(CodecError::invalid(FIELD, "unknown health state")),
                };
                if health.detail.len() > MAX_HEALTH_DETAIL_LEN {
                    return Err(CodecError::invalid("UpstreamHealth.detail", "too long"));
                }
                Self::UpstreamHealth { state, detail: health.detail }
            }
            Kind::Drain(drain) => Self::Drain { grace: Duration::from_millis(drain.grace_ms.into()) },
            Kind::GoAway(go_away) => {
                const FIELD: &str = "GoAway.reason";
                let reason = match pb::GoAwayReason::try_from(go_away.reason) {
                    Ok(pb::GoAwayReason::Shutdown) => GoAwayReason::Shutdown,
                    Ok(pb::GoAwayReason::AdminDrain) => GoAwayReason::AdminDrain,
                    Ok(pb::GoAwayReason::Replaced) => GoAwayReason::Replaced,
                    Ok(pb::GoAwayReason::CredentialsRevoked) => GoAwayReason::CredentialsRevoked,
                    Ok(pb::GoAwayReason::Unspecified) => {
                        return Err(CodecError::MissingField(FIELD));
                    }
                    Err(_) => return Err(CodecError::invalid(FIELD, "unknown reason")),
                };
                Self::GoAway { reason, grace: Duration::from_millis(go_away.grace_ms.into()) }
            }
            Kind::Stats(stats) => Self::Stats(Stats {
                streams_in_flight: stats.streams_in_flight,
                streams_total: stats.streams_total,
                bytes_to_upstream: stats.bytes_to_upstream,
                bytes_from_upstream: stats.bytes_from_upstream,
            }),
        })
    }
}

/// [`tokio_util::codec`] adapter over [`ControlMessage::encode`] and [`ControlMessage::decode`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ControlCodec;

impl tokio_util::codec::Decoder for ControlCodec {
    type Item = ControlMessage;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ControlMessage>, CodecError> {
        ControlMessage::decode(src)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<ControlMessage>, CodecError> {
        match ControlMessage::decode(src)? {
            Some(msg) => Ok(Some(msg)),
            None if src.is_empty() => Ok(None),
            None => Err(truncated(src, CONTROL_HEADER_LEN)),
        }
    }
}

impl tokio_util::codec::Encoder<ControlMessage> for ControlCodec {
    type Error = CodecError;

    fn encode(&mut self, msg: ControlMessage, dst: &mut BytesMut) -> Result<(), CodecError> {
        msg.encode(dst)
    }
}
