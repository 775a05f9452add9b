//! [`TransportError`]: failures of the shared I/O layer.

use ferry_codec::CodecError;

/// What went wrong below the HTTP layer: the WebSocket, the yamux session or the framing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Reading or writing the stream or socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The peer sent bytes that do not decode, or we tried to send a frame over a limit.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The WebSocket layer failed.
    #[error("websocket error")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    /// The multiplexed session failed.
    #[error("multiplexer error")]
    Mux(#[from] crate::multiplex::MuxError),
    /// The session already has as many streams open as it may; it goes on.
    #[error("too many streams open on the session")]
    TooManyStreams,
    /// The session is closed; no stream can be opened on it.
    #[error("session closed")]
    SessionClosed,
    /// The peer closed the connection before the expected message.
    #[error("connection closed by peer")]
    Closed,
    /// The peer sent a message of the wrong kind at this point of the protocol.
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
}
