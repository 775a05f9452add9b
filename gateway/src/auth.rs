//! Agent authentication: which secrets a tunnel id may use, checking an agent's MAC, and the
//! gateway's MAC in return; plus the per-address limit on failed attempts.
//!
//! Secrets come from one of:
//! - nowhere: any well-formed tunnel id is accepted (the gateway warns at start-up);
//! - one shared secret (`FERRY_SECRET` or `--secret-file`) for every tunnel;
//! - an auth file (`--auth-file tunnels.toml`) with one or two secrets per tunnel (two while a
//!   secret is rotated), reloaded on SIGHUP:
//!
//! ```toml
//! [tunnels.agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_web]
//! secrets = ["a long random secret", "the next one, during rotation"]
//! tcp-ports = [5432]   # public TCP ports reserved for this tunnel (optional)
//! allow-ip = ["10.0.0.0/8"]   # who may reach it at most, whatever the agent says (optional)
//! deny-ip = []
//! ```

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_codec::{InstanceId, Mac, Nonce, PROTOCOL_VERSION, Secret, SessionId, Transcript, TunnelId};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Most secrets one tunnel may have at once: the current one and the next during a rotation.
pub const MAX_SECRETS_PER_TUNNEL: usize = 2;
/// Failed handshakes one address may cause within [`FAILURE_WINDOW`] before `/ws` answers 429.
pub const MAX_FAILURES: u32 = 10;
/// Window over which failures are counted.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at once; beyond this, expired entries are dropped first.
const MAX_TRACKED_ADDRESSES: usize = 65_536;

/// Where the secrets come from.
#[derive(Debug, Clone, Default)]
pub enum AuthSource {
    /// No secrets: every well-formed tunnel id is accepted.
    #[default]
    Open,
    /// One secret for every tunnel.
    Shared(Secret),
    /// Per-tunnel secrets from a TOML file, reloaded on SIGHUP.
    File(PathBuf),
}

/// A SHA-256 of a secret: names which secret a session used without keeping it twice.
pub type Fingerprint = [u8; 32];

fn fingerprint(secret: &Secret) -> Fingerprint {
    Sha256::digest(secret.expose()).into()
}

/// The secrets in force.
#[derive(Debug, Clone)]
pub enum Secrets {
    /// No authentication.
    Open,
    /// One shared secret.
    Shared(Secret),
    /// Secrets (and TCP ports, address rules) by tunnel; and which tunnel each reserved TCP
    /// port belongs to.
    PerTunnel(HashMap<TunnelId, TunnelGrant>, HashMap<u16, TunnelId>),
}

/// What the auth file gives one tunnel.
#[derive(Debug, Clone)]
pub struct TunnelGrant {
    secrets: Vec<Secret>,
    /// Public TCP ports reserved for this tunnel (`tcp-ports = [5432]`).
    pub tcp_ports: Vec<u16>,
    /// Who may reach the tunnel at most (`allow-ip`, `deny-ip`), whatever its agent declares.
    pub ip_floor: crate::access::IpRules,
    /// Sessions must declare basic-auth users (`basic-auth-required = true`).
    pub basic_auth_required: bool,
}

/// Why an auth file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthFileError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this format (unknown keys included), with its position.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong and where.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default)]
    tunnels: HashMap<String, TunnelEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct TunnelEntry {
    secrets: Vec<String>,
    #[serde(default)]
    tcp_ports: Vec<u16>,
    #[serde(default)]
    allow_ip: Vec<String>,
    #[serde(default)]
    deny_ip: Vec<String>,
    #[serde(default)]
    basic_auth_required: bool,
}

impl Secrets {
    /// Loads the secrets a source names (reads the file for [`AuthSource::File`]).
    ///
    /// # Errors
    /// The file cannot be read or is invalid.
    pub fn load(source: &AuthSource) -> Result<Self, AuthFileError> {
        match source {
            AuthSource::Open => Ok(Self::Open),
            AuthSource::Shared(secret) => Ok(Self::Shared(secret.clone())),
            AuthSource::File(path) => Self::from_file(path),
        }
    }

    fn from_file(path: &Path) -> Result<Self, AuthFileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| AuthFileError::Read { path: path.to_owned(), source })?;
        Self::parse(&text).map_err(|message| AuthFileError::Parse { path: path.to_owned(), message })
    }

    /// Parses an auth file's text.
    ///
    /// # Errors
    /// A message naming the problem and, for TOML errors, the line and key — never the text of
    /// the file, which holds secrets (toml's own message quotes the offending line and values).
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: AuthFile = toml::from_str(text).map_err(|err| describe_toml_error(text, &err))?;
        if file.tunnels.is_empty() {
            // Fail closed, and loudly: a file that lists nobody refuses every agent.
            return Err("the file lists no tunnel (add a [tunnels.<tunnel id>] table with secrets)".into());
        }
        let mut tunnels = HashMap::with_capacity(file.tunnels.len());
        for (id, entry) in file.tunnels {
            let tunnel: TunnelId = id.parse().map_err(|err| format!("tunnels.{id}: {err}"))?;
            if entry.secrets.is_empty() || entry.secrets.len() > MAX_SECRETS_PER_TUNNEL {
                return Err(format!("tunnels.{id}.secrets: give one secret, or two while rotating"));
            }
            let secrets = entry
                .secrets
                .into_iter()
                .map(|s| {
                    Secret::new(s.into_bytes())
                        .map_err(|_| format!("tunnels.{id}.secrets: a secret is empty"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if entry.tcp_ports.contains(&0) {
                return Err(format!("tunnels.{id}.tcp-ports: 0 is not a port"));
            }
            let ip_floor = crate::access::IpRules::parse(&entry.allow_ip, &entry.deny_ip)
                .map_err(|err| format!("tunnels.{id}: {err}"))?;
            let grant = TunnelGrant {
                secrets,
                tcp_ports: entry.tcp_ports,
                ip_floor,
                basic_auth_required: entry.basic_auth_required,
            };
            tunnels.insert(tunnel, grant);
        }
        let mut reserved = HashMap::new();
        for (tunnel, grant) in &tunnels {
            for port in &grant.tcp_ports {
                if let Some(other) = reserved.insert(*port, tunnel.clone()) {
                    return Err(format!("tcp-ports: port {port} is granted to both {other} and {tunnel}"));
                }
            }
        }
        Ok(Self::PerTunnel(tunnels, reserved))
    }

    /// Whether agents must authenticate.
    pub fn required(&self) -> bool {
        !matches!(self, Self::Open)
    }

    /// Number of tunnels with their own secrets (for logs).
    pub fn tunnel_count(&self) -> Option<usize> {
        match self {
            Self::PerTunnel(map, _) => Some(map.len()),
            _ => None,
        }
    }

    /// Checks an agent's MAC. On success returns the secret it used (to sign our answer) and its
    /// fingerprint (to find the session again if that secret is revoked).
    ///
    /// Every candidate secret is checked, each in constant time, so the time taken does not say
    /// which one matched.
    ///
    /// # Errors
    /// The code to send back.
    pub fn verify(
        &self,
        nonce: &Nonce,
        tunnel: &TunnelId,
        instance: &InstanceId,
        mac: Option<&Mac>,
    ) -> Result<Option<(Secret, Fingerprint)>, ferry_codec::AuthErrorCode> {
        use ferry_codec::AuthErrorCode;
        let candidates: &[Secret] = match self {
            Self::Open => return Ok(None),
            Self::Shared(secret) => std::slice::from_ref(secret),
            Self::PerTunnel(map, _) => &map.get(tunnel).ok_or(AuthErrorCode::UnknownTunnel)?.secrets,
        };
        let mac = mac.ok_or(AuthErrorCode::BadCredentials)?;
        let transcript = Transcript::client(PROTOCOL_VERSION, nonce, tunnel, instance);
        let mut matched = None;
        for secret in candidates {
            if transcript.verify(secret, mac).is_ok() && matched.is_none() {
                matched = Some(secret);
            }
        }
        let secret = matched.ok_or(AuthErrorCode::BadCredentials)?;
        Ok(Some((secret.clone(), fingerprint(secret))))
    }

    /// Whether a session that authenticated with `used` may stay under these secrets.
    pub fn still_allows(&self, tunnel: &TunnelId, used: Option<&Fingerprint>) -> bool {
        match (self, used) {
            (Self::Open, _) => true,
            (_, None) => false,
            (Self::Shared(secret), Some(used)) => fingerprint(secret) == *used,
            (Self::PerTunnel(map, _), Some(used)) => {
                map.get(tunnel).is_some_and(|grant| grant.secrets.iter().any(|s| fingerprint(s) == *used))
            }
        }
    }

    /// The TCP ports the auth file reserves for `tunnel`.
    pub fn tcp_ports(&self, tunnel: &TunnelId) -> &[u16] {
        match self {
            Self::PerTunnel(map, _) => map.get(tunnel).map_or(&[], |grant| &grant.tcp_ports),
            _ => &[],
        }
    }

    /// The address rules the auth file sets for `tunnel`, if any.
    pub fn ip_floor(&self, tunnel: &TunnelId) -> Option<&crate::access::IpRules> {
        match self {
            Self::PerTunnel(map, _) => map.get(tunnel).map(|grant| &grant.ip_floor),
            _ => None,
        }
    }

    /// Whether the auth file requires `tunnel`'s sessions to ask for basic auth.
    pub fn basic_auth_required(&self, tunnel: &TunnelId) -> bool {
        match self {
            Self::PerTunnel(map, _) => map.get(tunnel).is_some_and(|grant| grant.basic_auth_required),
            _ => false,
        }
    }

    /// Whether the auth file reserves `port` for a tunnel other than `tunnel`.
    pub fn tcp_port_reserved_for_other(&self, port: u16, tunnel: &TunnelId) -> bool {
        match self {
            Self::PerTunnel(_, reserved) => reserved.get(&port).is_some_and(|owner| owner != tunnel),
            _ => false,
        }
    }
}

/// Where a TOML error is and what kind it is, without quoting anything from the file but key
/// names the format defines.
fn describe_toml_error(text: &str, err: &toml::de::Error) -> String {
    let at = err.span().map(|span| span.start.min(text.len()));
    let line = at.map(|at| text[..at].matches('\n').count() + 1);
    let message = err.message();
    let what = if let Some(rest) = message.strip_prefix("unknown field") {
        // "unknown field `secret`, expected `secrets`": the key the file used, and the one it means.
        let expected = rest.split_once("expected").map(|(_, e)| e.trim()).unwrap_or("");
        format!("unknown key (expected {expected})")
    } else if message.starts_with("missing field") {
        message.to_owned()
    } else if message.starts_with("invalid type") {
        // "invalid type: string \"...\", expected a sequence": the quoted value may be a secret.
        let expected = message.split_once("expected").map(|(_, e)| e.trim()).unwrap_or("another type");
        format!("a value has the wrong type (expected {expected})")
    } else {
        "invalid TOML".to_owned()
    };
    // The key on that line, when the line is `key = ...`.
    let key = at.and_then(|at| {
        let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
        let line = text[start..].lines().next()?;
        let (key, _) = line.split_once('=')?;
        let key = key.trim();
        key.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)).then(|| key.to_owned())
    });
    match (line, key) {
        (Some(line), Some(key)) => format!("line {line}, key `{key}`: {what}"),
        (Some(line), None) => format!("line {line}: {what}"),
        _ => what,
    }
}

/// The gateway's answer MAC for an accepted agent.
pub fn server_mac(
    secret: &Secret,
    nonce: &Nonce,
    tunnel: &TunnelId,
    instance: &InstanceId,
    session: &SessionId,
) -> Mac {
    Transcript::server(PROTOCOL_VERSION, nonce, tunnel, instance, session).sign(secret)
}

/// Counts failed handshakes per source address.
#[derive(Debug, Default)]
pub struct FailureLimiter {
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl FailureLimiter {
    /// Whether `ip` used up its failures for now; if so, how long until it may try again.
    pub fn blocked(&self, ip: IpAddr) -> Option<Duration> {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let (count, since) = failures.get(&ip)?;
        let elapsed = since.elapsed();
        (*count >= MAX_FAILURES && elapsed < FAILURE_WINDOW).then(|| FAILURE_WINDOW - elapsed)
    }

    /// Records one failure from `ip`.
    pub fn record(&self, ip: IpAddr) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= MAX_TRACKED_ADDRESSES {
            failures.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
            if failures.len() >= MAX_TRACKED_ADDRESSES {
                return;
            }
        }
        let entry = failures.entry(ip).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= FAILURE_WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    const ID: &str = "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_web";

    #[test]
    fn auth_file_parses_and_rejects_unknown_keys_with_a_line() {
        let ok = format!("[tunnels.{ID}]\nsecrets = [\"one\", \"two\"]\n");
        let secrets = Secrets::parse(&ok).unwrap();
        assert_eq!(secrets.tunnel_count(), Some(1));

        let typo = format!("[tunnels.{ID}]\nsecret = [\"one\"]\n");
        let err = Secrets::parse(&typo).unwrap_err();
        assert!(err.contains("secret") && err.contains("line 2"), "{err}");

        let three = format!("[tunnels.{ID}]\nsecrets = [\"a\", \"b\", \"c\"]\n");
        assert!(Secrets::parse(&three).unwrap_err().contains("two while rotating"));
        assert!(Secrets::parse("[tunnels.web]\nsecrets = [\"a\"]\n").unwrap_err().contains("tunnels.web"));
        assert!(Secrets::parse(&format!("[tunnels.{ID}]\nsecrets = [\"\"]\n")).is_err());
        assert!(Secrets::parse("[other]\n").is_err());
    }

    #[test]
    fn auth_file_errors_never_quote_the_file() {
        let secret = "s3cr3t-that-must-not-be-logged";
        for text in [
            format!("[tunnels.{ID}]\nsecrets = \"{secret}\"\n"),
            format!("[tunnels.{ID}]\nsecrets = [\"{secret}\", 5]\n"),
            format!("[tunnels.{ID}]\nsecrets = [\"{secret}\"\n"),
            format!("[tunnels.{ID}]\nsecret = [\"{secret}\"]\n"),
            format!("[tunnels.{ID}]\nsecrets = [\"{secret}\"] extra\n"),
            format!("[tunnels.{ID}]\nsecrets = [\"a\\q{secret}\"]\n"),
        ] {
            let err = Secrets::parse(&text).unwrap_err();
            assert!(!err.contains(secret) && !err.contains("s3cr3t"), "{err}");
            assert!(err.contains("line 2"), "{err}");
        }
        let err = Secrets::parse(&format!("[tunnels.{ID}]\nsecrets = \"{secret}\"\n")).unwrap_err();
        assert!(err.contains("`secrets`") && err.contains("wrong type"), "{err}");
    }

    #[test]
    fn verify_finds_either_rotation_secret_and_refuses_others() {
        let secrets = Secrets::parse(&format!("[tunnels.{ID}]\nsecrets = [\"old\", \"new\"]\n")).unwrap();
        let tunnel: TunnelId = ID.parse().unwrap();
        let instance = InstanceId(Uuid::from_u128(7));
        let nonce = Nonce::from_bytes([3; 32]);
        let sign = |secret: &str| {
            Transcript::client(PROTOCOL_VERSION, &nonce, &tunnel, &instance)
                .sign(&Secret::new(secret).unwrap())
        };
        for good in ["old", "new"] {
            let (_, used) = secrets.verify(&nonce, &tunnel, &instance, Some(&sign(good))).unwrap().unwrap();
            assert!(secrets.still_allows(&tunnel, Some(&used)));
        }
        use ferry_codec::AuthErrorCode;
        assert_eq!(
            secrets.verify(&nonce, &tunnel, &instance, Some(&sign("bad"))).unwrap_err(),
            AuthErrorCode::BadCredentials
        );
        assert_eq!(
            secrets.verify(&nonce, &tunnel, &instance, None).unwrap_err(),
            AuthErrorCode::BadCredentials
        );
        let other: TunnelId = ID.replace("_web", "_api").parse().unwrap();
        assert_eq!(
            secrets.verify(&nonce, &other, &instance, Some(&sign("old"))).unwrap_err(),
            AuthErrorCode::UnknownTunnel
        );
        // After a reload without "old", sessions that used it must go.
        let (_, used_old) = secrets.verify(&nonce, &tunnel, &instance, Some(&sign("old"))).unwrap().unwrap();
        let rotated = Secrets::parse(&format!("[tunnels.{ID}]\nsecrets = [\"new\"]\n")).unwrap();
        assert!(!rotated.still_allows(&tunnel, Some(&used_old)));
    }

    #[test]
    fn failures_are_limited_per_address() {
        let limiter = FailureLimiter::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..MAX_FAILURES - 1 {
            limiter.record(ip);
        }
        assert!(limiter.blocked(ip).is_none());
        limiter.record(ip);
        assert!(limiter.blocked(ip).is_some());
        assert!(limiter.blocked("192.0.2.2".parse().unwrap()).is_none());
    }
}
