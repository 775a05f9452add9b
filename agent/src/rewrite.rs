//! What the agent changes in each exchange: header fields set or removed on the way to the
//! upstream and on the way back (`--request-header-add`, `--request-header-remove`,
//! `--response-header-add`, `--response-header-remove`), and the `/t/{tunnel_id}` prefix put back
//! on a path-routed target (`--keep-path-prefix`).
//!
//! Applied here, next to the upstream, rather than at the gateway: the rules change only what the
//! upstream sees and sends, the gateway's hot path stays as it is, and a request that crossed
//! another gateway node of a cluster is rewritten the same way without the nodes having to pass
//! the rules along.

use bytes::{BufMut, Bytes, BytesMut};
use ferry_codec::{Header, TunnelId};
use http::{HeaderName, HeaderValue};

/// Fields that frame the message or the connection: the proxies on both sides own them, so a
/// rule may neither set nor remove them.
const FRAMING: &[&str] = &[
    "connection",
    "content-length",
    "host",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Most rules of each kind.
pub const MAX_RULES: usize = 32;

/// Header rules for one direction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldRules {
    /// Fields set: any the message had with the name are replaced.
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Fields removed.
    pub remove: Vec<HeaderName>,
}

impl FieldRules {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }

    /// Removes the fields named in `remove` or `set`, then appends the `set` ones.
    pub fn apply(&self, fields: &mut Vec<Header>) {
        if self.is_empty() {
            return;
        }
        let named = |field: &Header, name: &HeaderName| field.name().eq_ignore_ascii_case(name.as_ref());
        fields.retain(|field| {
            !self.remove.iter().any(|name| named(field, name))
                && !self.set.iter().any(|(name, _)| named(field, name))
        });
        for (name, value) in &self.set {
            // Both parts were checked when the rule was parsed.
            if let Ok(field) = Header::new(
                Bytes::copy_from_slice(name.as_str().as_bytes()),
                Bytes::copy_from_slice(value.as_bytes()),
            ) {
                fields.push(field);
            }
        }
    }
}

/// The request and response rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderRules {
    /// On the way to the upstream.
    pub request: FieldRules,
    /// On the way back to the client.
    pub response: FieldRules,
}

/// Parses `Name: value` for `--request-header-add` / `--response-header-add`.
///
/// # Errors
/// Not a field, or one that frames the message (`Content-Length`, `Host`, ...).
pub fn parse_field(text: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = text.split_once(':').ok_or_else(|| format!("{text:?}: expected `Name: value`"))?;
    let name = parse_name(name)?;
    let value = HeaderValue::from_str(value.trim())
        .map_err(|_| format!("{text:?}: the value has bytes a header cannot carry"))?;
    Ok((name, value))
}

/// Parses a field name for `--request-header-remove` / `--response-header-remove`.
///
/// # Errors
/// Not a field name, or one that frames the message.
pub fn parse_name(text: &str) -> Result<HeaderName, String> {
    let name = HeaderName::from_bytes(text.trim().as_bytes())
        .map_err(|_| format!("{text:?} is not a header name"))?;
    if FRAMING.contains(&name.as_str()) {
        return Err(format!("{name} frames the message; the tunnel sets it, a rule may not"));
    }
    Ok(name)
}

/// `target` with `/t/{tunnel_id}` in front, as the client sent it before path routing took it
/// off (`/` alone becomes the bare prefix plus `/`).
pub fn with_path_prefix(tunnel_id: &TunnelId, target: &Bytes) -> Bytes {
    let id = tunnel_id.as_str();
    let mut prefixed = BytesMut::with_capacity(3 + id.len() + target.len());
    prefixed.put_slice(b"/t/");
    prefixed.put_slice(id.as_bytes());
    if !target.starts_with(b"/") {
        prefixed.put_u8(b'/');
    }
    prefixed.put_slice(target);
    prefixed.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(list: &[(&str, &str)]) -> Vec<Header> {
        list.iter().map(|(n, v)| Header::new(n.to_string(), v.to_string()).unwrap()).collect()
    }

    fn text(fields: &[Header]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|f| (String::from_utf8(f.name().to_vec()).unwrap(), f.value_str().unwrap().to_owned()))
            .collect()
    }

    #[test]
    fn set_replaces_and_remove_drops_every_copy() {
        let rules = FieldRules {
            set: vec![parse_field("X-Env:  prod ").unwrap()],
            remove: vec![parse_name("cookie").unwrap()],
        };
        let mut list = fields(&[("Cookie", "a=1"), ("x-env", "spoofed"), ("Accept", "*/*"), ("cookie", "b")]);
        rules.apply(&mut list);
        assert_eq!(text(&list), vec![("Accept".into(), "*/*".into()), ("x-env".into(), "prod".into())]);
        // Nothing to do: the list is left alone.
        let mut list = fields(&[("a", "1")]);
        FieldRules::default().apply(&mut list);
        assert_eq!(text(&list), vec![("a".into(), "1".into())]);
    }

    #[test]
    fn rules_are_checked_when_parsed() {
        assert!(parse_field("no colon").is_err());
        assert!(parse_field("bad name: v").is_err());
        assert!(parse_field("x-a: line\nbreak").is_err());
        assert!(parse_field("Content-Length: 5").is_err());
        assert!(parse_name("Transfer-Encoding").is_err());
        assert!(parse_name("host").is_err());
        assert_eq!(parse_field("X-Empty:").unwrap().1, "");
    }

    #[test]
    fn the_prefix_goes_back_in_front() {
        let id: TunnelId = "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_lab".parse().unwrap();
        let prefixed = |target: &'static str| with_path_prefix(&id, &Bytes::from_static(target.as_bytes()));
        assert_eq!(prefixed("/lab/tree?x=1"), format!("/t/{id}/lab/tree?x=1").as_bytes());
        assert_eq!(prefixed("/"), format!("/t/{id}/").as_bytes());
        assert_eq!(prefixed("?q"), format!("/t/{id}/?q").as_bytes());
    }
}
