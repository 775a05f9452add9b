//! HTTP basic authentication a tunnel's agent asks for (`agent --basic-auth-file`): the gateway
//! checks `Authorization: Basic` against the bcrypt hashes the agent sent in its handshake,
//! before any stream is opened, so a request without the right password never crosses the
//! tunnel.
//!
//! bcrypt is slow on purpose (tens of milliseconds at the usual cost), far too slow to run on
//! every request, and a flood of guesses must not take the gateway's cores. So:
//! - a credential once checked is remembered (by a keyed SHA-256 digest, never the password
//!   itself), right or wrong, and answered from memory after that: a browser sends the same
//!   header with every request;
//! - at most [`VERIFIERS`] checks run at once, on the blocking pool, and when more than
//!   [`MAX_WAITING`] wait the request is refused as busy (503, `Retry-After`) instead of queued.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

use crate::error::PublicError;

/// bcrypt checks at once, in the whole gateway.
pub const VERIFIERS: usize = 2;
/// Checks waiting for a turn before more are refused as busy.
pub const MAX_WAITING: usize = 64;
/// Credentials remembered per session; the memory is emptied when it is full.
const REMEMBERED: usize = 1024;
/// Longest `Authorization` value looked at.
pub const MAX_CREDENTIAL_LEN: usize = 4096;

static VERIFYING: Semaphore = Semaphore::const_new(VERIFIERS);
static WAITING: AtomicUsize = AtomicUsize::new(0);

/// The users of one agent session.
#[derive(Debug)]
pub struct BasicAuth {
    users: Vec<(String, String)>,
    /// Random per session: the digests of remembered credentials mean nothing elsewhere.
    key: [u8; 32],
    /// Digest of an `Authorization` value → whether it was right.
    checked: Mutex<HashMap<[u8; 32], bool>>,
}

impl BasicAuth {
    /// The users in `lines` (`user:bcrypt-hash`, as the handshake checked their shape); `None`
    /// for none.
    ///
    /// # Errors
    /// A hash bcrypt cannot read.
    pub fn parse(lines: &[String]) -> Result<Option<Self>, String> {
        if lines.is_empty() {
            return Ok(None);
        }
        let users = lines
            .iter()
            .map(|line| {
                let (user, hash) = line.split_once(':').ok_or("a basic-auth line without `:`")?;
                hash.parse::<bcrypt::HashParts>()
                    .map_err(|err| format!("basic-auth user {user:?}: {err}"))?;
                Ok((user.to_owned(), hash.to_owned()))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|err| err.to_string())?;
        Ok(Some(Self { users, key, checked: Mutex::new(HashMap::new()) }))
    }

    /// The user names, for `/connections`.
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.users.iter().map(|(user, _)| user.as_str())
    }

    /// Whether `authorization` (the request's `Authorization` value) names one of the users with
    /// the right password.
    ///
    /// # Errors
    /// [`PublicError::AuthRequired`] for a missing, malformed or wrong credential;
    /// [`PublicError::GatewayBusy`] when too many checks are waiting.
    pub async fn check(&self, authorization: Option<&[u8]>) -> Result<(), PublicError> {
        let value =
            authorization.filter(|v| v.len() <= MAX_CREDENTIAL_LEN).ok_or(PublicError::AuthRequired)?;
        let digest: [u8; 32] = Sha256::new().chain_update(self.key).chain_update(value).finalize().into();
        let remembered = self.checked.lock().unwrap_or_else(|e| e.into_inner()).get(&digest).copied();
        let right = match remembered {
            Some(right) => right,
            None => {
                let (user, password) = decode(value).ok_or(PublicError::AuthRequired)?;
                let right = self.verify(&user, password).await?;
                let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
                if checked.len() >= REMEMBERED {
                    checked.clear();
                }
                checked.insert(digest, right);
                right
            }
        };
        if right { Ok(()) } else { Err(PublicError::AuthRequired) }
    }

    /// Runs bcrypt for `user`, on the blocking pool, at most [`VERIFIERS`] at once. An unknown
    /// user is checked against another user's hash (and fails), so the time taken does not tell
    /// which users exist.
    async fn verify(&self, user: &[u8], password: Vec<u8>) -> Result<bool, PublicError> {
        let known = self.users.iter().find(|(name, _)| bool::from(name.as_bytes().ct_eq(user)));
        let hash = known.unwrap_or(&self.users[0]).1.clone();
        if WAITING.fetch_add(1, Ordering::Relaxed) >= MAX_WAITING {
            WAITING.fetch_sub(1, Ordering::Relaxed);
            return Err(PublicError::GatewayBusy);
        }
        let permit = VERIFYING.acquire().await;
        WAITING.fetch_sub(1, Ordering::Relaxed);
        let _permit = permit.map_err(|_| PublicError::GatewayBusy)?;
        let matched = tokio::task::spawn_blocking(move || bcrypt::verify(&password, &hash).unwrap_or(false))
            .await
            .unwrap_or(false);
        Ok(matched && known.is_some())
    }
}

/// `Basic base64(user:password)` → the user and the password.
fn decode(value: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, encoded) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some((decoded[..colon].to_vec(), decoded[colon + 1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(credentials: &str) -> Vec<u8> {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(credentials)).into_bytes()
    }

    #[tokio::test]
    async fn right_wrong_missing_and_remembered() {
        tokio::time::timeout(std::time::Duration::from_secs(30), async {
            let hash = bcrypt::hash("s3cret", 4).unwrap();
            let auth = BasicAuth::parse(&[format!("alice:{hash}")]).unwrap().unwrap();
            assert!(auth.check(Some(&header("alice:s3cret"))).await.is_ok());
            // Answered from memory the second time.
            assert!(auth.check(Some(&header("alice:s3cret"))).await.is_ok());
            assert_eq!(auth.checked.lock().unwrap().len(), 1);
            for bad in [header("alice:wrong"), header("bob:s3cret"), header("alice"), b"Bearer x".to_vec()] {
                assert!(matches!(auth.check(Some(&bad)).await, Err(PublicError::AuthRequired)));
            }
            assert!(matches!(auth.check(None).await, Err(PublicError::AuthRequired)));
            // The scheme is case-insensitive; a password may hold `:`.
            let hash = bcrypt::hash("a:b", 4).unwrap();
            let auth = BasicAuth::parse(&[format!("carol:{hash}")]).unwrap().unwrap();
            let mut value = header("carol:a:b");
            value[..5].copy_from_slice(b"bASIC");
            assert!(auth.check(Some(&value)).await.is_ok());
            assert_eq!(auth.users().collect::<Vec<_>>(), ["carol"]);
        })
        .await
        .unwrap();
    }

    #[test]
    fn unreadable_hashes_and_no_users() {
        assert!(BasicAuth::parse(&[]).unwrap().is_none());
        assert!(BasicAuth::parse(&[format!("alice:$2y$99${}", "a".repeat(53))]).is_err());
    }
}
