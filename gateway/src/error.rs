//! Errors: [`GatewayError`] stops the gateway; [`PublicError`] ends one request with a JSON answer.

use bytes::Bytes;
use ferry_codec::AbortCode;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An I/O error on the listener.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The auth file could not be loaded.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthFileError),
    /// The TLS certificate or key could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Why the gateway answered a public request itself. Each maps to a status and a stable code.
///
/// What public clients see is the code and a fixed message: never an upstream's address, an
/// error chain or anything else the agent reported (that goes to the logs where it is known).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PublicError {
    /// No agent serves this tunnel.
    #[error("no agent is connected for this tunnel")]
    TunnelNotFound,
    /// The tunnel id in the path is not well-formed.
    #[error("not a tunnel id: {0}")]
    InvalidTunnelId(String),
    /// Nothing at this path on the gateway itself.
    #[error("no such endpoint on the gateway")]
    NotFound,
    /// The method is not allowed on a gateway endpoint.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A malformed request (for example a bad WebSocket upgrade to `/ws`).
    #[error("{0}")]
    BadRequest(&'static str),
    /// The session has no room for another stream.
    #[error("the tunnel is at its concurrent request limit")]
    AtCapacity,
    /// The gateway is at a global limit (agent handshakes in progress); retry shortly.
    #[error("the gateway is busy; retry shortly")]
    GatewayBusy,
    /// Every agent of the tunnel reports its upstream unhealthy.
    #[error("the upstream service is unhealthy")]
    UpstreamUnhealthy,
    /// This client has as many requests in flight to the tunnel as it may.
    #[error("too many requests in flight from this client; retry shortly")]
    ClientAtCapacity,
    /// The request target is longer than the gateway accepts.
    #[error("the request target is too long")]
    UriTooLong,
    /// The agent did not accept the stream in time.
    #[error("the agent did not accept the request in time")]
    AgentUnresponsive,
    /// The session died before the response head arrived.
    #[error("the connection to the agent was lost before it answered")]
    SessionLost,
    /// The agent could not reach its upstream (refused, reset, DNS, TLS).
    #[error("the agent could not reach the upstream service")]
    UpstreamUnreachable,
    /// The upstream (or the agent) did not answer in time.
    #[error("the upstream service did not answer in time")]
    UpstreamTimeout,
    /// The agent refused the request.
    #[error("the agent refused the request")]
    AgentRefused,
    /// The client stopped sending its request body.
    #[error("the request body stopped arriving")]
    RequestTimeout,
    /// The body is over a limit.
    #[error("the request body is too large")]
    PayloadTooLarge,
    /// The agent is shutting down.
    #[error("the agent is shutting down")]
    AgentShuttingDown,
    /// The agent broke the protocol or failed internally.
    #[error("the agent failed to handle the request")]
    AgentError,
    /// The request already went through this gateway.
    #[error("request loop detected")]
    LoopDetected,
    /// The tunnel had an agent recently, but none came back in time.
    #[error("the tunnel's agent is offline; retry later")]
    TunnelOffline,
    /// The tunnel has no session here, and which node holds it cannot be known (Redis has been
    /// unreachable for longer than the cluster's grace period).
    #[error("the gateway cluster cannot locate this tunnel right now; retry later")]
    ClusterUnavailable,
    /// A rate limit (requests, or failed handshakes) was reached; retry after the given seconds.
    #[error("rate limit reached; retry later")]
    RateLimited(u64),
    /// The tunnel's agent does not let clients from this address reach it.
    #[error("this tunnel does not accept requests from your address")]
    IpDenied,
    /// The tunnel asks for a user and password (its agent's `--basic-auth-file`), and the
    /// request brought none, or wrong ones.
    #[error("this tunnel asks for a user name and password")]
    AuthRequired,
    /// An admin endpoint without valid credentials.
    #[error("admin endpoints need a loopback client or the admin bearer token")]
    Unauthorized,
}

impl PublicError {
    /// The HTTP status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::TunnelNotFound | Self::NotFound => StatusCode::NOT_FOUND,
            Self::InvalidTunnelId(_) | Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::UriTooLong => StatusCode::URI_TOO_LONG,
            Self::AtCapacity
            | Self::GatewayBusy
            | Self::AgentRefused
            | Self::AgentShuttingDown
            | Self::UpstreamUnhealthy => StatusCode::SERVICE_UNAVAILABLE,
            Self::AgentUnresponsive | Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::SessionLost | Self::UpstreamUnreachable | Self::AgentError => StatusCode::BAD_GATEWAY,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::LoopDetected => StatusCode::LOOP_DETECTED,
            Self::TunnelOffline | Self::ClusterUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::RateLimited(_) | Self::ClientAtCapacity => StatusCode::TOO_MANY_REQUESTS,
            Self::Unauthorized | Self::AuthRequired => StatusCode::UNAUTHORIZED,
            Self::IpDenied => StatusCode::FORBIDDEN,
        }
    }

    /// The stable machine-readable code in the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TunnelNotFound => "tunnel_not_found",
            Self::InvalidTunnelId(_) => "invalid_tunnel_id",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::BadRequest(_) => "bad_request",
            Self::AtCapacity => "tunnel_at_capacity",
            Self::GatewayBusy => "gateway_busy",
            Self::UpstreamUnhealthy => "upstream_unhealthy",
            Self::ClientAtCapacity => "client_at_capacity",
            Self::UriTooLong => "uri_too_long",
            Self::AgentUnresponsive => "agent_unresponsive",
            Self::SessionLost => "session_lost",
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::AgentRefused => "agent_refused",
            Self::PayloadTooLarge => "payload_too_large",
            Self::RequestTimeout => "request_timeout",
            Self::AgentShuttingDown => "agent_shutting_down",
            Self::AgentError => "agent_error",
            Self::LoopDetected => "loop_detected",
            Self::TunnelOffline => "tunnel_offline",
            Self::ClusterUnavailable => "cluster_unavailable",
            Self::RateLimited(_) => "rate_limited",
            Self::Unauthorized => "unauthorized",
            Self::AuthRequired => "auth_required",
            Self::IpDenied => "ip_denied",
        }
    }

    /// Seconds after which a retry may succeed, for `Retry-After`.
    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::AtCapacity | Self::GatewayBusy | Self::AgentShuttingDown | Self::ClientAtCapacity => {
                Some(1)
            }
            Self::AgentRefused | Self::TunnelOffline | Self::UpstreamUnhealthy | Self::ClusterUnavailable => {
                Some(5)
            }
            Self::RateLimited(seconds) => Some(*seconds),
            _ => None,
        }
    }

    /// The error for an `Abort` the agent sent before any response head (its message is for
    /// the log, not for the client).
    pub fn from_abort(code: AbortCode) -> Self {
        match code {
            AbortCode::UpstreamUnreachable | AbortCode::UpstreamReset => Self::UpstreamUnreachable,
            AbortCode::UpstreamTimeout => Self::UpstreamTimeout,
            AbortCode::Refused => Self::AgentRefused,
            AbortCode::TooLarge => Self::PayloadTooLarge,
            AbortCode::ShuttingDown => Self::AgentShuttingDown,
            _ => Self::AgentError,
        }
    }

    /// The JSON answer: `{"error": {"code", "message"}, "request_id"}`.
    pub fn to_response(&self, request_id: &str) -> Response<Full<Bytes>> {
        let body = serde_json::json!({
            "error": { "code": self.code(), "message": self.to_string() },
            "request_id": request_id,
        });
        let mut response = json_response(self.status(), &body);
        if let Some(seconds) = self.retry_after() {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if matches!(self, Self::RequestTimeout) {
            // The rest of the body is not coming: the connection cannot carry another request.
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if matches!(self, Self::Unauthorized) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"ferry admin\""));
        }
        if matches!(self, Self::AuthRequired) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"ferry tunnel\", charset=\"UTF-8\""),
            );
        }
        response
    }
}

/// A JSON response with the given status.
pub(crate) fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
