//! TLS on the public port (HTTPS and `wss://`, ALPN `h2` and `http/1.1`) and on a cluster's peer
//! listener, with a certificate chain and key from PEM files, reloaded on SIGHUP without dropping
//! connections.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{Error, ServerConfig};

/// Where the certificate chain and its private key are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM file: the server certificate first, then its intermediates.
    pub cert: PathBuf,
    /// PEM file: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why the certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read or holds no valid PEM.
    #[error("cannot read {path}: {detail}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The certificate file holds no certificate.
    #[error("{0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    /// rustls refused the pair (typically: the key does not match the certificate).
    #[error("the certificate and key cannot be used together: {0}")]
    Invalid(#[source] Error),
}

/// The server configuration in force; replaced whole on reload so handshakes in progress keep
/// theirs.
#[derive(Debug)]
pub(crate) struct Tls {
    files: TlsFiles,
    alpn: &'static [&'static [u8]],
    config: RwLock<Arc<ServerConfig>>,
}

/// What the public port offers: HTTP/2 first.
const PUBLIC_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];
/// What a peer listener offers: its one endpoint is a WebSocket upgrade.
const PEER_ALPN: &[&[u8]] = &[b"http/1.1"];

impl Tls {
    /// Loads the files for the public port.
    pub(crate) fn load(files: TlsFiles) -> Result<Self, TlsError> {
        Self::load_with(files, PUBLIC_ALPN)
    }

    /// Loads the files for a peer listener.
    pub(crate) fn load_for_peers(files: TlsFiles) -> Result<Self, TlsError> {
        Self::load_with(files, PEER_ALPN)
    }

    fn load_with(files: TlsFiles, alpn: &'static [&'static [u8]]) -> Result<Self, TlsError> {
        let config = RwLock::new(server_config(&files, alpn)?);
        Ok(Self { files, alpn, config })
    }

    /// The acceptor for a new connection.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.config.read().unwrap_or_else(|e| e.into_inner())))
    }

    /// Reads the files again; on error the old certificate stays in force.
    pub(crate) fn reload(&self) -> Result<(), TlsError> {
        let fresh = server_config(&self.files, self.alpn)?;
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }
}

fn read_error(path: &Path, err: impl std::fmt::Display) -> TlsError {
    TlsError::Read { path: path.to_owned(), detail: err.to_string() }
}

fn server_config(files: &TlsFiles, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|err| read_error(&files.cert, err))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| read_error(&files.cert, err))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(files.cert.clone()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|err| read_error(&files.key, err))?;
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Invalid)?;
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(Arc::new(config))
}
