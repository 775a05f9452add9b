//! Trust for the agent's two TLS clients: `wss://` to the gateway and an `https` upstream. Both
//! trust the system roots plus the CA certificates of an optional PEM file.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_rustls::TlsConnector;

use crate::error::AgentError;

/// The system roots plus every certificate in `extra` (PEM bytes read from `flag`'s file).
pub(crate) fn root_store(extra: Option<&[u8]>, flag: &str) -> Result<rustls::RootCertStore, AgentError> {
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system certificates are skipped: the extra CA may be all that is needed.
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(pem) = extra {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| AgentError::Tls(format!("{flag}: {err}")))?;
        if certs.is_empty() {
            return Err(AgentError::Tls(format!("{flag} holds no PEM certificate")));
        }
        for cert in certs {
            roots.add(cert).map_err(|err| AgentError::Tls(format!("{flag}: {err}")))?;
        }
    }
    if roots.is_empty() {
        return Err(AgentError::Tls(format!(
            "no trusted CA certificates: install the system roots or pass {flag}"
        )));
    }
    Ok(roots)
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
pub(crate) fn gateway_connector(extra_ca: Option<&[u8]>) -> Result<TlsConnector, AgentError> {
    let roots = root_store(extra_ca, "--ca-file")?;
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}
