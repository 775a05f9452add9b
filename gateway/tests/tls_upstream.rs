//! An `https://` upstream: the agent verifies its certificate (here a CA made in the test and
//! passed as the upstream CA file) and refuses one it cannot verify.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use ferry_agent::config::Upstream;
use ferry_benches::upstream::{UpstreamStats, serve_connection};
use ferry_gateway::GatewayConfig;
use http::StatusCode;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A TLS sample upstream for `localhost`; returns its port and the certificate (PEM).
async fn tls_upstream(shutdown: CancellationToken) -> (u16, String) {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = CertificateDer::from(generated.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(generated.signing_key.serialize_der()));
    let config =
        rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(vec![cert], key).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stats = Arc::new(UpstreamStats::default());
    tokio::spawn(async move {
        loop {
            let (socket, _) = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted.unwrap(),
            };
            let (acceptor, stats, shutdown) = (acceptor.clone(), Arc::clone(&stats), shutdown.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(socket).await {
                    serve_connection(tls, stats, shutdown).await;
                }
            });
        }
    });
    (port, generated.cert.pem())
}

fn ca_file(pem: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("ferry-test-ca-{}.pem", uuid_like()));
    std::fs::write(&path, pem).unwrap();
    path
}

fn uuid_like() -> String {
    format!("{}-{:?}", std::process::id(), std::thread::current().id()).replace(['(', ')'], "")
}

#[tokio::test]
async fn https_upstream_with_a_trusted_ca() {
    bounded(async {
        let shutdown = CancellationToken::new();
        let (port, pem) = tls_upstream(shutdown.clone()).await;
        let ca = ca_file(&pem);
        let env = TestEnv::start_with(GatewayConfig::default(), |config| {
            config.upstream = Some(Upstream::parse(&format!("https://localhost:{port}")).unwrap());
            config.upstream_ca = Some(ca.clone());
        })
        .await;
        let (response, body) = get(&env.url("/bytes/100000")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body.len(), 100_000);
        std::fs::remove_file(ca).unwrap();
        shutdown.cancel();
    })
    .await;
}

#[tokio::test]
async fn https_upstream_with_an_unknown_certificate_is_refused() {
    bounded(async {
        let shutdown = CancellationToken::new();
        let (port, _pem) = tls_upstream(shutdown.clone()).await;
        // Trust a different CA: the upstream's certificate must not verify.
        let (_, other_pem) = tls_upstream(shutdown.clone()).await;
        let ca = ca_file(&other_pem);
        let env = TestEnv::start_with(GatewayConfig::default(), |config| {
            config.upstream = Some(Upstream::parse(&format!("https://localhost:{port}")).unwrap());
            config.upstream_ca = Some(ca.clone());
        })
        .await;
        let (response, body) = get(&env.url("/")).await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(json(&body)["error"]["code"], "upstream_unreachable");
        std::fs::remove_file(ca).unwrap();
        shutdown.cancel();
    })
    .await;
}

#[tokio::test]
async fn a_route_may_lead_to_an_https_upstream_when_the_default_is_plain() {
    bounded(async {
        let shutdown = CancellationToken::new();
        let (port, pem) = tls_upstream(shutdown.clone()).await;
        let ca = ca_file(&pem);
        let env = TestEnv::start_with(GatewayConfig::default(), |config| {
            let route = format!("/bytes=https://localhost:{port}");
            config.routes = vec![ferry_agent::config::Route::parse(&route).unwrap()];
            config.upstream_ca = Some(ca.clone());
        })
        .await;
        let (response, body) = get(&env.url("/bytes/1000")).await;
        assert_eq!(response.status(), StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        assert_eq!(body.len(), 1000);
        assert_eq!(get(&env.url("/headers")).await.0.status(), StatusCode::OK);
        std::fs::remove_file(ca).unwrap();
        shutdown.cancel();
    })
    .await;
}
