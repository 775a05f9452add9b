//! The agent's side of a TCP stream: dial the endpoint's upstream, say the connection is up, then
//! carry raw bytes both ways until both sides have finished. Half-closes cross as they happen;
//! a reset on either side becomes a reset on the other.

use std::net::SocketAddr;
use std::time::Duration;

use ferry_codec::{AbortCode, Frame, Head, TcpOpen};
use ferry_transport::stream::{FrameReader, FrameWriter, pipe};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::debug;

use crate::config::{ProxyProtocol, TcpTarget};
use crate::upstream::abort;

/// Serves a stream that started with `open` to the end.
pub(crate) async fn serve(
    targets: &[TcpTarget],
    connect_timeout: Duration,
    open: TcpOpen,
    reader: FrameReader,
    mut writer: FrameWriter,
) {
    let Some(target) = targets.iter().find(|t| t.name == open.endpoint) else {
        debug!(endpoint = open.endpoint, "TCP stream for an endpoint this agent does not serve");
        abort(&mut writer, AbortCode::Refused, "no such TCP endpoint at this agent").await;
        return;
    };
    let dial = TcpStream::connect((target.host.as_str(), target.port));
    let mut upstream = match tokio::time::timeout(connect_timeout, dial).await {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(err)) => {
            debug!(%err, endpoint = target.name, "cannot connect to the TCP upstream");
            abort(&mut writer, AbortCode::UpstreamUnreachable, "cannot connect to the TCP upstream").await;
            return;
        }
        Err(_) => {
            debug!(endpoint = target.name, "connecting to the TCP upstream timed out");
            abort(&mut writer, AbortCode::UpstreamTimeout, "connecting to the TCP upstream timed out").await;
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    if let Some(version) = target.proxy_protocol {
        let header = proxy_header(version, open.client_addr, open.public_addr);
        if let Err(err) = upstream.write_all(&header).await {
            debug!(%err, endpoint = target.name, "the TCP upstream closed before the PROXY header");
            abort(&mut writer, AbortCode::UpstreamReset, "the TCP upstream closed at once").await;
            return;
        }
    }
    if writer.send(&Frame::Head(Head::TcpAccepted)).await.is_err() {
        return;
    }
    match pipe(reader, writer, &mut upstream).await {
        Ok((to_upstream, from_upstream)) => {
            debug!(to_upstream, from_upstream, client = %open.client_addr, "TCP connection closed");
        }
        Err(err) => {
            // The stream was reset (it is, by `pipe` dropping it, if the upstream failed): the
            // upstream sees a reset too, not an orderly end.
            let _ = upstream.set_zero_linger();
            debug!(%err, client = %open.client_addr, "TCP connection reset");
        }
    }
}

/// The PROXY protocol header for a connection from `client` to `public`. Addresses of two
/// families (an IPv4 client mapped into an IPv6 listener is shown as IPv4 first) are sent as
/// unknown, which the protocol allows.
pub(crate) fn proxy_header(version: ProxyProtocol, client: SocketAddr, public: SocketAddr) -> Vec<u8> {
    let (client, public) = (canonical(client), canonical(public));
    match version {
        ProxyProtocol::V1 => {
            let addresses = match (client, public) {
                (SocketAddr::V4(c), SocketAddr::V4(p)) => {
                    ppp::v1::Addresses::new_tcp4(*c.ip(), *p.ip(), c.port(), p.port())
                }
                (SocketAddr::V6(c), SocketAddr::V6(p)) => {
                    ppp::v1::Addresses::new_tcp6(*c.ip(), *p.ip(), c.port(), p.port())
                }
                _ => ppp::v1::Addresses::Unknown,
            };
            addresses.to_string().into_bytes()
        }
        ProxyProtocol::V2 => {
            use ppp::v2::{Builder, Command, Protocol, Version};
            Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (client, public))
                .build()
                // Only an oversized header fails to build; two socket addresses never are.
                .unwrap_or_else(|_| local_proxy_header(ProxyProtocol::V2))
        }
    }
}

/// The PROXY protocol header of a connection the agent makes for itself (a health probe): no
/// client to name.
pub(crate) fn local_proxy_header(version: ProxyProtocol) -> Vec<u8> {
    match version {
        ProxyProtocol::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        ProxyProtocol::V2 => {
            use ppp::v2::{Builder, Command, Version};
            Builder::new(Version::Two | Command::Local, 0).build().unwrap_or_default()
        }
    }
}

/// An IPv4 address mapped into IPv6 (`::ffff:a.b.c.d`) as the IPv4 address it is.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_headers_name_the_client_and_the_public_address() {
        let client: SocketAddr = "127.0.0.2:40000".parse().unwrap();
        let public: SocketAddr = "[::ffff:127.0.0.1]:20000".parse().unwrap();
        let v1 = proxy_header(ProxyProtocol::V1, client, public);
        assert_eq!(v1, b"PROXY TCP4 127.0.0.2 127.0.0.1 40000 20000\r\n");
        let v2 = proxy_header(ProxyProtocol::V2, client, public);
        match ppp::HeaderResult::parse(&v2) {
            ppp::HeaderResult::V2(Ok(header)) => {
                assert_eq!(header.addresses, ppp::v2::Addresses::from((client, canonical(public))));
                assert_eq!(header.len(), v2.len());
            }
            other => panic!("{other:?}"),
        }
        let v6: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        assert_eq!(proxy_header(ProxyProtocol::V1, v6, "127.0.0.1:2".parse().unwrap()), b"PROXY UNKNOWN\r\n");
    }
}
