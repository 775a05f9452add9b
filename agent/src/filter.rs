//! The agent's own checks on each request before anything reaches the upstream: allowed methods,
//! allowed path prefixes, body size, concurrency. A refusal is a JSON response made here, in the
//! gateway's error format, so the client sees why and the local service never sees the request.

use bytes::Bytes;
use ferry_codec::{Frame, Head, HttpVersion, RequestHead, ResponseHead};
use ferry_transport::heads::headers_to_wire;
use ferry_transport::stream::FrameWriter;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};

/// What the agent lets through. `None` everywhere (the default) lets everything through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    /// Methods allowed; others get 405 with `Allow`.
    pub methods: Option<Vec<Method>>,
    /// Path prefixes allowed (`/api` allows `/api` and `/api/...`, not `/apix`); others get 403.
    pub paths: Option<Vec<String>>,
    /// Largest request body in bytes; larger ones get 413.
    pub max_request_body: Option<u64>,
    /// Most requests served at once; more get 503 with `Retry-After`.
    pub max_concurrent: Option<usize>,
}

/// A request the agent answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: String,
    pub(crate) headers: HeaderMap,
}

impl Refusal {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), headers: HeaderMap::new() }
    }

    fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// 503: the agent is at its concurrency limit.
    pub(crate) fn at_capacity() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "agent_at_capacity",
            "the agent is at its concurrent request limit",
        )
        .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
    }

    /// 413: the body is over the agent's limit.
    pub(crate) fn too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is over the agent's limit of {limit} bytes"),
        )
    }

    /// 503: the upstream is failing and the circuit breaker is open. What failed is for the
    /// agent's log, not for the public client.
    pub(crate) fn unhealthy() -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "upstream_unhealthy", "the upstream service is unhealthy")
            .with_header(header::RETRY_AFTER, HeaderValue::from_static("5"))
    }

    /// 404: the agent serves no HTTP upstream for this path (it was started with `--tcp`
    /// endpoints only, or routes that do not cover it).
    pub(crate) fn no_upstream() -> Self {
        Self::new(StatusCode::NOT_FOUND, "no_upstream", "this tunnel serves no HTTP service at this path")
    }

    /// Sends the refusal as a complete response on `writer`.
    pub(crate) async fn send(self, writer: &mut FrameWriter, request_id: &str) {
        let body = serde_json::json!({
            "error": { "code": self.code, "message": self.message },
            "request_id": request_id,
        })
        .to_string();
        let mut headers = self.headers;
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let head = ResponseHead {
            status: self.status.as_u16(),
            version: HttpVersion::Http11,
            headers: headers_to_wire(&headers),
        };
        let sent = async {
            writer.queue(&Frame::Head(Head::Response(head)))?;
            writer.queue(&Frame::Data(Bytes::from(body)))?;
            writer.finish().await
        };
        if let Err(err) = sent.await {
            tracing::debug!(%err, "could not send the refusal");
        }
    }
}

/// Whether `path` is `prefix` or below it, on a segment boundary.
pub(crate) fn path_matches(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.is_empty(),
        None => false,
    }
}

/// The path of a request target, without the query.
pub(crate) fn target_path(target: &[u8]) -> &str {
    let text = std::str::from_utf8(target).unwrap_or("");
    text.split(['?', '#']).next().unwrap_or("")
}

/// Whether a path could name something else once the upstream normalises it: dot segments;
/// path parameters (`/public/..;/admin` is `/admin` to Tomcat, Jetty and Spring); percent-encoded
/// dots, slashes, backslashes, semicolons, NULs or percent signs (double encoding). Prefix rules
/// cannot vouch for such a path.
fn ambiguous(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    ["%2e", "%2f", "%5c", "%3b", "%00", "%25"].iter().any(|encoded| lower.contains(encoded))
        || path.contains(['\\', ';'])
        || path.split('/').any(|segment| segment == "." || segment == "..")
}

impl Filters {
    /// The refusal for `head`, if any (the body size is checked against the announced length
    /// here, and while streaming by the caller).
    pub(crate) fn check(&self, head: &RequestHead) -> Result<(), Box<Refusal>> {
        if let Some(methods) = &self.methods
            && !methods.iter().any(|m| m.as_str() == head.method)
        {
            let allow: Vec<&str> = methods.iter().map(Method::as_str).collect();
            let refusal = Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{} is not allowed through this tunnel", head.method),
            );
            return Err(Box::new(match HeaderValue::from_str(&allow.join(", ")) {
                Ok(value) => refusal.with_header(header::ALLOW, value),
                Err(_) => refusal,
            }));
        }
        if let Some(paths) = &self.paths {
            let path = target_path(&head.target);
            if ambiguous(path) || !paths.iter().any(|prefix| path_matches(path, prefix)) {
                return Err(Box::new(Refusal::new(
                    StatusCode::FORBIDDEN,
                    "path_not_allowed",
                    "this path is not served through this tunnel",
                )));
            }
        }
        if let (Some(limit), Some(len)) = (self.max_request_body, head.body_len)
            && len > limit
        {
            return Err(Box::new(Refusal::too_large(limit)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: &str, target: &str, body_len: Option<u64>) -> RequestHead {
        RequestHead {
            method: method.into(),
            target: Bytes::copy_from_slice(target.as_bytes()),
            version: HttpVersion::Http11,
            headers: Vec::new(),
            client_addr: None,
            request_id: "r".into(),
            body_len,
            path_routed: false,
        }
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        assert!(path_matches("/api", "/api"));
        assert!(path_matches("/api/users", "/api"));
        assert!(path_matches("/api/users", "/api/"));
        assert!(!path_matches("/apix", "/api"));
        assert!(path_matches("/anything", "/"));
        assert!(!path_matches("/", "/api"));
    }

    #[test]
    fn filters_refuse_with_the_right_status() {
        let filters = Filters {
            methods: Some(vec![Method::GET, Method::HEAD]),
            paths: Some(vec!["/api".into(), "/static/".into()]),
            max_request_body: Some(10),
            max_concurrent: None,
        };
        assert!(filters.check(&head("GET", "/api/x?y=1", None)).is_ok());
        let refused = filters.check(&head("POST", "/api/x", Some(1))).unwrap_err();
        assert_eq!(refused.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(refused.headers[header::ALLOW], "GET, HEAD");
        assert_eq!(filters.check(&head("GET", "/admin", None)).unwrap_err().status, StatusCode::FORBIDDEN);
        for sneaky in [
            "/api/../admin",
            "/api/%2e%2e/admin",
            "/api/..%2Fadmin",
            "/api\\..\\admin",
            "/api/./x",
            "/api/..;/admin",
            "/api;x=1/../admin",
            "/api/%2e%2e;/admin",
            "/api/..%3Badmin",
            "/api/%252e%252e/admin",
            "/api/x%00.html",
        ] {
            assert_eq!(
                filters.check(&head("GET", sneaky, None)).unwrap_err().status,
                StatusCode::FORBIDDEN,
                "{sneaky}"
            );
        }
        assert_eq!(
            filters.check(&head("GET", "/api", Some(11))).unwrap_err().status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert!(Filters::default().check(&head("DELETE", "/../x", Some(u64::MAX))).is_ok());
    }
}
