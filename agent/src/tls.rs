//! Trust for the agent's two TLS clients: `wss://` to the gateway and an `https` upstream. Both
//! trust the system roots plus the CA certificates of an optional PEM file.
//!
//! For the gateway there are two more ways, for private gateways with a certificate of their own:
//! a certificate in `--ca-file` that is *the* gateway's certificate (self-signed, as
//! `openssl req -x509` makes them; webpki refuses such a certificate as an end entity because it
//! says it is a CA) is accepted when it is byte for byte what the gateway presents and names the
//! host; and `--pin-sha256` pins the gateway's key (SHA-256 of its SubjectPublicKeyInfo, base64,
//! as curl's `--pinnedpubkey` and HPKP spell it), which then replaces every other check.

use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_name};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, Error, OtherError, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsConnector;

use crate::error::AgentError;

/// A `--pin-sha256` value: the SHA-256 of a certificate's SubjectPublicKeyInfo.
pub type Pin = [u8; 32];

/// Parses a pin: base64 of 32 bytes, optionally after `sha256//` (curl's spelling).
///
/// # Errors
/// A message saying what is wrong.
pub fn parse_pin(text: &str) -> Result<Pin, String> {
    let encoded = text.trim();
    let encoded = encoded.strip_prefix("sha256//").unwrap_or(encoded);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|err| format!("{text:?} is not base64 ({err})"))?;
    bytes.try_into().map_err(|bytes: Vec<u8>| {
        format!("{text:?} is {} bytes, a SHA-256 pin is 32 (base64 of the key's SHA-256)", bytes.len())
    })
}

/// The pin of a certificate's key, base64.
fn pin_of(cert: &CertificateDer<'_>) -> Option<String> {
    let parsed = ParsedCertificate::try_from(cert).ok()?;
    let digest = Sha256::digest(parsed.subject_public_key_info().as_ref());
    Some(base64::engine::general_purpose::STANDARD.encode(digest))
}

/// The system roots plus every certificate in `extra` (PEM bytes read from `flag`'s file).
pub(crate) fn root_store(extra: Option<&[u8]>, flag: &str) -> Result<rustls::RootCertStore, AgentError> {
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system certificates are skipped: the extra CA may be all that is needed.
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    for cert in extra_certs(extra, flag)? {
        roots.add(cert).map_err(|err| AgentError::Tls(format!("{flag}: {err}")))?;
    }
    if roots.is_empty() {
        return Err(AgentError::Tls(format!(
            "no trusted CA certificates: install the system roots or pass {flag}"
        )));
    }
    Ok(roots)
}

fn extra_certs(extra: Option<&[u8]>, flag: &str) -> Result<Vec<CertificateDer<'static>>, AgentError> {
    let Some(pem) = extra else { return Ok(Vec::new()) };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| AgentError::Tls(format!("{flag}: {err}")))?;
    if certs.is_empty() {
        return Err(AgentError::Tls(format!("{flag} holds no PEM certificate")));
    }
    Ok(certs)
}

/// Reads a CA file named by `flag`.
pub(crate) async fn read_ca(path: Option<&Path>, flag: &str) -> Result<Option<Vec<u8>>, AgentError> {
    match path {
        Some(path) => tokio::fs::read(path)
            .await
            .map(Some)
            .map_err(|err| AgentError::Tls(format!("{flag}: cannot read {}: {err}", path.display()))),
        None => Ok(None),
    }
}

/// The connector for `wss://` to the gateway. ALPN says `http/1.1`: the WebSocket upgrade is an
/// HTTP/1.1 request.
pub(crate) fn gateway_connector(extra_ca: Option<&[u8]>, pins: &[Pin]) -> Result<TlsConnector, AgentError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = if pins.is_empty() {
        let roots = Arc::new(root_store(extra_ca, "--ca-file")?);
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
            .build()
            .map_err(|err| AgentError::Tls(format!("--ca-file: {err}")))?;
        Arc::new(GatewayVerifier {
            webpki: Some(webpki),
            exact: extra_certs(extra_ca, "--ca-file")?,
            pins: Vec::new(),
            algorithms: provider.signature_verification_algorithms,
        })
    } else {
        Arc::new(GatewayVerifier {
            webpki: None,
            exact: Vec::new(),
            pins: pins.to_vec(),
            algorithms: provider.signature_verification_algorithms,
        })
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| AgentError::Tls(err.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Trust in the gateway's certificate; see the module docs.
#[derive(Debug)]
struct GatewayVerifier {
    /// Chains to the system roots or a `--ca-file` CA (`None` with pins).
    webpki: Option<Arc<WebPkiServerVerifier>>,
    /// The certificates of `--ca-file`, any of which the gateway may present as it is.
    exact: Vec<CertificateDer<'static>>,
    /// `--pin-sha256` keys; when set, nothing else counts.
    pins: Vec<Pin>,
    algorithms: WebPkiSupportedAlgorithms,
}

/// Why the gateway's certificate was not trusted, with what to do about it. rustls shows it with
/// `Debug`, so that is the message too.
#[derive(thiserror::Error)]
enum Untrusted {
    #[error(
        "the gateway's key does not match --pin-sha256 (it presented sha256//{presented}); \
         if the gateway's key was changed on purpose, pin the new one"
    )]
    WrongPin { presented: String },
    #[error(
        "the gateway's certificate cannot be verified ({cause}). For a private CA pass its \
         certificate with --ca-file; for a self-signed certificate pass the certificate itself \
         with --ca-file, or pin its key with --pin-sha256 {pin} (after checking, on the gateway, \
         that this is its key)"
    )]
    Unverified { cause: Error, pin: String },
}

impl std::fmt::Debug for Untrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

fn untrusted(reason: Untrusted) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(reason))))
}

impl ServerCertVerifier for GatewayVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let pin = pin_of(end_entity).unwrap_or_else(|| "(unparsable certificate)".into());
        let Some(webpki) = &self.webpki else {
            let parsed = ParsedCertificate::try_from(end_entity)?;
            let presented: Pin = Sha256::digest(parsed.subject_public_key_info().as_ref()).into();
            return if self.pins.contains(&presented) {
                Ok(ServerCertVerified::assertion())
            } else {
                Err(untrusted(Untrusted::WrongPin { presented: pin }))
            };
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Ok(verified) => Ok(verified),
            Err(cause) => {
                if self.exact.iter().any(|cert| cert.as_ref() == end_entity.as_ref()) {
                    // The very certificate the operator handed us: it only has to name the host.
                    verify_server_name(&ParsedCertificate::try_from(end_entity)?, server_name)?;
                    return Ok(ServerCertVerified::assertion());
                }
                Err(untrusted(Untrusted::Unverified { cause, pin: format!("sha256//{pin}") }))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse() {
        let pin = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(parse_pin(&pin).unwrap(), [7u8; 32]);
        assert_eq!(parse_pin(&format!("sha256//{pin}")).unwrap(), [7u8; 32]);
        assert!(parse_pin("not base64!").is_err());
        assert!(
            parse_pin(&base64::engine::general_purpose::STANDARD.encode([7u8; 20]))
                .unwrap_err()
                .contains("32")
        );
    }
}
