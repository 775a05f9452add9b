//! Certificates for tests, made with rcgen: a CA and a server certificate it signed.

use std::path::PathBuf;

use ferry_gateway::GatewayConfig;
use ferry_gateway::tls::TlsFiles;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A CA and a server certificate it signed for `localhost` and 127.0.0.1, as PEM files in a
/// fresh directory.
pub struct Pki {
    /// Where the files are.
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ferry-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Self { dir };
        pki.issue();
        pki
    }

    /// Makes a new CA and server certificate (overwriting the files).
    pub fn issue(&self) {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        std::fs::write(self.ca(), ca.pem()).unwrap();
        std::fs::write(self.dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(self.dir.join("key.pem"), key.serialize_pem()).unwrap();
    }

    /// Replaces the files with a self-signed certificate for `localhost` that says it is a CA,
    /// as `openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=localhost -addext
    /// subjectAltName=DNS:localhost` makes it; returns the pin of its key.
    pub fn issue_self_signed(&self) -> String {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(self.dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(self.dir.join("key.pem"), key.serialize_pem()).unwrap();
        use base64::Engine as _;
        use sha2::Digest as _;
        base64::engine::general_purpose::STANDARD
            .encode(sha2::Sha256::digest(rcgen::PublicKeyData::subject_public_key_info(&key)))
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn files(&self) -> TlsFiles {
        TlsFiles { cert: self.dir.join("cert.pem"), key: self.dir.join("key.pem") }
    }

    pub fn gateway_config(&self) -> GatewayConfig {
        GatewayConfig { tls: Some(self.files()), ..GatewayConfig::default() }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
