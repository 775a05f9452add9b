//! TLS on the public port: HTTPS (ALPN h2 and http/1.1) and `wss://` for agents on one port, a
//! certificate reloaded in place, a handshake deadline, and an agent that refuses a gateway whose
//! certificate it cannot verify. Certificates are made in the test with rcgen.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::pki::Pki;
use common::*;
use ferry_agent::config::GatewayUrl;
use ferry_agent::{AgentError, ConnectError};
use ferry_gateway::GatewayConfig;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A TLS client trusting only the CA in `ca`, offering `alpn`.
fn connector(ca: &Path, alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

async fn tls_connect(env: &TestEnv, ca: &Path, alpn: &[&[u8]]) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(env.gateway_addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    connector(ca, alpn).connect(name, tcp).await.unwrap()
}

/// Starts upstream + TLS gateway + an agent dialling `wss://localhost:port/ws` trusting `ca`.
async fn start(pki: &Pki) -> TestEnv {
    let ca = pki.ca();
    let mut env = TestEnv::start_without_agent(pki.gateway_config()).await;
    let mut config = env.agent_config();
    config.gateway = GatewayUrl::parse(&format!("wss://localhost:{}/ws", env.gateway_addr.port())).unwrap();
    config.ca_file = Some(ca);
    env.agent = Some(spawn_agent(config));
    env.wait_for_sessions(1).await;
    env
}

#[tokio::test]
async fn https_and_wss_share_the_port() {
    bounded(async {
        let pki = Pki::new("share");
        let env = start(&pki).await;
        let tls = tls_connect(&env, &pki.ca(), &[b"http/1.1"]).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn);
        let path = format!("/t/{}/headers", env.tunnel_id);
        let request = Request::get(path).header("host", "localhost").body(empty()).unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = json(&response.into_body().collect().await.unwrap().to_bytes());
        let proto = body["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|pair| pair[0] == "x-forwarded-proto")
            .map(|pair| pair[1].clone());
        assert_eq!(proto, Some("https".into()), "{body}");
    })
    .await;
}

#[tokio::test]
async fn alpn_negotiates_http2() {
    bounded(async {
        let pki = Pki::new("h2");
        let env = start(&pki).await;
        let tls = tls_connect(&env, &pki.ca(), &[b"h2", b"http/1.1"]).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn);
        let uri = format!("https://localhost:{}/t/{}/bytes/100000", env.gateway_addr.port(), env.tunnel_id);
        let response = sender.send_request(Request::get(uri).body(empty()).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.version(), http::Version::HTTP_2);
        assert_eq!(response.into_body().collect().await.unwrap().to_bytes().len(), 100_000);
    })
    .await;
}

#[tokio::test]
async fn certificate_reload_applies_to_new_connections() {
    bounded(async {
        let pki = Pki::new("reload");
        let env = start(&pki).await;
        let old_ca = std::fs::read(pki.ca()).unwrap();
        let old_ca_path = pki.dir.join("old-ca.pem");
        std::fs::write(&old_ca_path, &old_ca).unwrap();

        // A broken file: the reload fails and the old certificate stays.
        std::fs::write(pki.dir.join("key.pem"), "not a key").unwrap();
        assert!(env.gateway.reload_tls().is_err());
        tls_connect(&env, &old_ca_path, &[]).await;

        // A new CA and certificate: new connections get it, the old CA no longer verifies it.
        pki.issue();
        env.gateway.reload_tls().unwrap();
        tls_connect(&env, &pki.ca(), &[]).await;
        let tcp = TcpStream::connect(env.gateway_addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let refused = connector(&old_ca_path, &[]).connect(name, tcp).await;
        assert!(refused.is_err(), "the old CA must not verify the new certificate");
        // The agent's session, opened before the reload, still serves.
        assert_eq!(https_get(&env, &pki.ca(), "/bytes/10").await, StatusCode::OK);
    })
    .await;
}

/// `GET https://localhost/t/{tunnel}{path}` over HTTP/1.1, trusting `ca`.
async fn https_get(env: &TestEnv, ca: &Path, path: &str) -> StatusCode {
    let tls = tls_connect(env, ca, &[b"http/1.1"]).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let request = Request::get(format!("/t/{}{path}", env.tunnel_id))
        .header("host", "localhost")
        .body(empty())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    response.into_body().collect().await.unwrap();
    status
}

#[tokio::test]
async fn t28_untrusted_gateway_certificate() {
    bounded(async {
        let pki = Pki::new("refuse");
        let other = Pki::new("refuse-other");
        let env = TestEnv::start_without_agent(pki.gateway_config()).await;
        let url = GatewayUrl::parse(&format!("wss://localhost:{}/ws", env.gateway_addr.port())).unwrap();
        // Trusting another CA, then only the system roots: neither verifies the gateway.
        for ca in [Some(other.ca()), None] {
            let mut config = env.agent_config();
            config.gateway = url.clone();
            config.ca_file = ca;
            config.max_retries = Some(1);
            let err = spawn_agent(config).task.await.unwrap().unwrap_err();
            let AgentError::GaveUp { last, .. } = err else { panic!("unexpected error: {err}") };
            assert!(matches!(last, ConnectError::Tls { .. }), "{last}");
            assert!(last.needs_attention(), "an untrusted certificate needs a person");
            let chain = error_chain(&last);
            for says in ["localhost", "--ca-file", "--pin-sha256"] {
                assert!(chain.contains(says), "the error does not say {says:?}: {chain}");
            }
        }
        assert!(env.gateway.registry.all().is_empty());
    })
    .await;
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        text = format!("{text}: {err}");
        source = err.source();
    }
    text
}

/// An agent for `env`'s TLS gateway with `tweak` applied, that gives up after one attempt.
async fn dial(env: &TestEnv, tweak: impl FnOnce(&mut ferry_agent::AgentConfig)) -> Result<(), ConnectError> {
    let mut config = env.agent_config();
    config.gateway = GatewayUrl::parse(&format!("wss://localhost:{}/ws", env.gateway_addr.port())).unwrap();
    tweak(&mut config);
    let mut agent = spawn_agent(config);
    let id = env.tunnel_id.clone();
    let up = env.gateway.registry.wait_until(|r| !r.of(&id).is_empty());
    tokio::select! {
        () = up => {
            agent.kill();
            Ok(())
        }
        ended = &mut agent.task => match ended.unwrap() {
            Err(AgentError::GaveUp { last, .. }) => Err(last),
            other => panic!("unexpected end: {other:?}"),
        },
    }
}

#[tokio::test]
async fn a_self_signed_gateway_certificate_given_as_ca_file_is_trusted() {
    bounded(async {
        let pki = Pki::new("self-signed");
        pki.issue_self_signed();
        let env = TestEnv::start_without_agent(pki.gateway_config()).await;
        let cert = pki.dir.join("cert.pem");
        dial(&env, |c| {
            c.ca_file = Some(cert.clone());
            c.max_retries = Some(1);
        })
        .await
        .expect("the gateway's own certificate, given as --ca-file, is trusted");
        // Dialled by a name it does not carry, the same certificate is refused.
        let mut config = env.agent_config();
        config.gateway =
            GatewayUrl::parse(&format!("wss://127.0.0.1:{}/ws", env.gateway_addr.port())).unwrap();
        config.ca_file = Some(cert);
        config.max_retries = Some(1);
        let err = spawn_agent(config).task.await.unwrap().unwrap_err();
        assert!(error_chain(&err).contains("not valid for name"), "{}", error_chain(&err));
    })
    .await;
}

#[tokio::test]
async fn a_pinned_key_is_trusted_and_a_wrong_pin_refused() {
    bounded(async {
        let pki = Pki::new("pinned");
        let pin = pki.issue_self_signed();
        let env = TestEnv::start_without_agent(pki.gateway_config()).await;
        for spelling in [pin.clone(), format!("sha256//{pin}")] {
            let parsed = ferry_agent::tls::parse_pin(&spelling).unwrap();
            dial(&env, |c| {
                c.pins = vec![parsed];
                c.max_retries = Some(1);
            })
            .await
            .expect("the pinned key is trusted");
            env.gateway.registry.wait_until(|r| r.is_empty()).await;
        }
        let wrong = ferry_agent::tls::parse_pin(&base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            [9u8; 32],
        ))
        .unwrap();
        let err = dial(&env, |c| {
            c.pins = vec![wrong];
            c.max_retries = Some(1);
        })
        .await
        .unwrap_err();
        assert!(err.needs_attention());
        let chain = error_chain(&err);
        assert!(chain.contains("--pin-sha256") && chain.contains(&pin), "{chain}");
    })
    .await;
}

#[tokio::test]
async fn a_silent_client_is_cut_off_at_the_handshake_deadline() {
    bounded(async {
        let pki = Pki::new("deadline");
        let config =
            GatewayConfig { tls_handshake_timeout: Duration::from_millis(200), ..pki.gateway_config() };
        let env = TestEnv::start_without_agent(config).await;
        let mut tcp = TcpStream::connect(env.gateway_addr).await.unwrap();
        let mut buf = [0u8; 16];
        // The gateway closes the connection (read returns 0) instead of holding it forever.
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await.unwrap().unwrap_or(0);
        assert_eq!(n, 0);
    })
    .await;
}
