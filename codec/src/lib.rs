//! The ferry.v1 wire protocol, sans-IO.
//!
//! This crate knows what goes over the wire between a ferry gateway and a ferry agent, and nothing
//! about sockets, runtimes or clocks: every function takes bytes or values and returns bytes or
//! values, so the whole protocol can be fuzzed and benchmarked on its own. The I/O lives in
//! `ferry-transport`, `ferry-gateway` and `ferry-agent`.
//!
//! ```text
//! public client ─▶ gateway ══ WebSocket: handshake, then yamux ══ agent ─▶ upstream
//!                          control stream:  ControlMessage frames
//!                          request streams: Head | Data | Trailers | End | Abort frames
//! ```
//!
//! Generated protobuf types stay private (`pb`); the public API is hand-written domain types that
//! are validated once, at the boundary (`TryFrom` on decode), so the rest of ferry never sees a
//! missing field or a header with a newline in it.
//!
//! # Layout
//!
//! - [`id`] — [`TunnelId`] (`agent_{uuid}_{purpose}` and its DNS label), [`StreamId`], [`SessionId`],
//!   [`InstanceId`].
//! - [`head`] — HTTP heads, headers, trailers and abort codes as they travel on a request stream.
//! - [`frame`] — the request-stream framing (`length | kind | payload`) and [`FrameCodec`].
//! - [`control`] — control-stream messages and [`ControlCodec`].
//! - [`handshake`] — [`ServerHello`], [`ClientAuth`], [`AuthResult`].
//! - [`auth`] — the canonical transcript, HMAC-SHA256 MACs, the [`Secret`] type.
//! - [`ws`] — WebSocket frame headers and masking (RFC 6455), for the session's framing.
//! - [`error`] — [`CodecError`].
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, clippy::unwrap_used)]

#[cfg(feature = "arbitrary")]
mod arbitrary;
pub mod auth;
pub mod control;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod head;
mod head_wire;
pub mod id;
mod pb;
pub mod ws;

pub use auth::{Mac, Nonce, Secret, Transcript};
pub use control::{ControlCodec, ControlMessage};
pub use error::CodecError;
pub use frame::{Frame, FrameCodec, FrameKind};
pub use handshake::{AuthErrorCode, AuthResult, ClientAuth, PROTOCOL_VERSION, ServerHello};
pub use head::{Abort, AbortCode, Head, Header, HttpVersion, RequestHead, ResponseHead, TcpOpen, Trailers};
pub use id::{InstanceId, SessionId, StreamId, TunnelId, TunnelIdError};
