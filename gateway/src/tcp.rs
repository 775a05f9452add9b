//! Raw TCP endpoints: public ports whose connections are carried to an agent's TCP upstream.
//!
//! An agent declares its endpoints in the handshake (`agent --tcp 127.0.0.1:5432`); the gateway
//! gives each one a public port: the one the agent asked for, if the tunnel may have it, or one
//! granted to the tunnel in the auth file (`tcp-ports = [5432]`), or any free port of
//! `--tcp-ports`. A port is **leased** to its tunnel and endpoint name: while any session of the
//! tunnel declares the endpoint the lease holds, and for `--tcp-lease` after the last one ended,
//! so a reconnecting agent gets the same port back. Meanwhile the listener stays up: connections
//! that arrive wait for a session (as HTTP requests do, up to `--pending-timeout`) and are reset
//! if none comes.
//!
//! Each accepted connection becomes one stream: a `TcpOpen` head, the agent's `TcpAccepted` once
//! its upstream connection is up, then raw bytes both ways, with half-closes and resets crossing
//! as they happen.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use ferry_codec::handshake::{TcpBinding, TcpEndpoint};
use ferry_codec::{Frame, Head, TcpOpen, TunnelId};
use ferry_transport::stream::{pipe, split_counted};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::Gateway;
use crate::session::Session;

/// How long a port stays leased to its tunnel after its last session ended.
pub const TCP_LEASE: Duration = Duration::from_secs(600);

/// Settings of the TCP endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpConfig {
    /// Ports any tunnel may be given (`--tcp-ports 20000-20999`); `None`: only ports the auth
    /// file grants.
    pub ports: Option<RangeInclusive<u16>>,
    /// See [`TCP_LEASE`].
    pub lease: Duration,
    /// Address the public ports listen on (the `--listen` address's).
    pub bind: IpAddr,
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self { ports: None, lease: TCP_LEASE, bind: IpAddr::V4(Ipv4Addr::LOCALHOST) }
    }
}

/// Parses `LOW-HIGH` (or one port) for `--tcp-ports`.
///
/// # Errors
/// A message saying what is wrong.
pub fn parse_port_range(text: &str) -> Result<RangeInclusive<u16>, String> {
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
    };
    let (low, high) = match text.split_once('-') {
        Some((low, high)) => (port(low)?, port(high)?),
        None => (port(text)?, port(text)?),
    };
    if low > high {
        return Err(format!("{text}: the first port must not be above the last"));
    }
    Ok(low..=high)
}

/// The public ports leased to tunnels, and their listeners.
#[derive(Debug, Default)]
pub struct TcpPorts {
    leases: Mutex<HashMap<u16, Lease>>,
}

#[derive(Debug)]
struct Lease {
    tunnel: TunnelId,
    endpoint: String,
    /// Sessions that hold it now.
    holders: usize,
    /// Bumped whenever the lease is taken again, so an expiry timer started earlier lets it be.
    generation: u64,
    /// Stops the listener.
    stop: CancellationToken,
}

/// What a session holds: its endpoints' ports, released (into their lease time) when dropped.
#[derive(Debug)]
pub struct TcpClaims {
    gateway: Weak<Gateway>,
    /// Endpoint name and port, for each endpoint that got one.
    pub bound: Vec<(String, u16)>,
}

impl Drop for TcpClaims {
    fn drop(&mut self) {
        if let Some(gateway) = self.gateway.upgrade() {
            for (_, port) in &self.bound {
                gateway.tcp_ports.release(&gateway, *port);
            }
        }
    }
}

impl TcpPorts {
    /// Gives each endpoint of a session of `tunnel` a port, or the reason it has none; `granted`
    /// are the ports the auth file grants this tunnel, `granted_elsewhere` tells a port granted
    /// to another.
    pub(crate) fn claim(
        &self,
        gateway: &Arc<Gateway>,
        tunnel: &TunnelId,
        endpoints: &[TcpEndpoint],
        granted: &[u16],
        granted_elsewhere: &dyn Fn(u16) -> bool,
    ) -> (Vec<TcpBinding>, TcpClaims) {
        let config = &gateway.config.tcp;
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        let mut bindings = Vec::with_capacity(endpoints.len());
        let mut claims = TcpClaims { gateway: Arc::downgrade(gateway), bound: Vec::new() };
        for endpoint in endpoints {
            let result =
                Self::claim_one(gateway, config, &mut leases, tunnel, endpoint, granted, granted_elsewhere);
            if let Ok(port) = result {
                claims.bound.push((endpoint.name.clone(), port));
            }
            bindings.push(TcpBinding { name: endpoint.name.clone(), port: result });
        }
        (bindings, claims)
    }

    fn claim_one(
        gateway: &Arc<Gateway>,
        config: &TcpConfig,
        leases: &mut HashMap<u16, Lease>,
        tunnel: &TunnelId,
        endpoint: &TcpEndpoint,
        granted: &[u16],
        granted_elsewhere: &dyn Fn(u16) -> bool,
    ) -> Result<u16, String> {
        // The endpoint's own lease first: the same port across reconnects and replicas.
        let own = leases.iter_mut().find(|(port, lease)| {
            &lease.tunnel == tunnel
                && lease.endpoint == endpoint.name
                && endpoint.port.is_none_or(|wanted| wanted == **port)
        });
        if let Some((port, lease)) = own {
            lease.holders += 1;
            lease.generation += 1;
            return Ok(*port);
        }
        let in_range = |port: u16| config.ports.as_ref().is_some_and(|range| range.contains(&port));
        // The ports to try, in order, looked at lazily: a range may be large.
        let candidates: Box<dyn Iterator<Item = u16>> = match endpoint.port {
            Some(port) if !granted.contains(&port) && (!in_range(port) || granted_elsewhere(port)) => {
                return Err(format!("port {port} is not granted to this tunnel"));
            }
            Some(port) if leases.contains_key(&port) => {
                return Err(format!("port {port} is in use by another endpoint"));
            }
            Some(port) => Box::new(std::iter::once(port)),
            None if config.ports.is_none() && granted.is_empty() => {
                return Err("this gateway gives no TCP ports to this tunnel".into());
            }
            None => {
                let range = config.ports.clone().into_iter().flatten().filter(|p| !granted_elsewhere(*p));
                Box::new(granted.iter().copied().chain(range))
            }
        };
        let mut last_error = None;
        for port in candidates.filter(|p| !leases.contains_key(p)) {
            match bind(config.bind, port) {
                Ok(listener) => {
                    let stop = gateway.shutdown.child_token();
                    leases.insert(
                        port,
                        Lease {
                            tunnel: tunnel.clone(),
                            endpoint: endpoint.name.clone(),
                            holders: 1,
                            generation: 0,
                            stop: stop.clone(),
                        },
                    );
                    info!(port, tunnel_id = %tunnel, endpoint = endpoint.name, "TCP port leased");
                    tokio::spawn(accept(
                        Arc::downgrade(gateway),
                        listener,
                        tunnel.clone(),
                        endpoint.name.clone(),
                        stop,
                    ));
                    return Ok(port);
                }
                Err(err) => {
                    debug!(port, %err, "cannot listen on a TCP port; trying the next");
                    last_error = Some((port, err));
                }
            }
        }
        Err(match last_error {
            Some((port, err)) => format!("cannot listen on port {port}: {err}"),
            None => "every TCP port this tunnel may have is taken".into(),
        })
    }

    /// A session let go of `port`: the lease runs out after [`TcpConfig::lease`] unless a
    /// session takes it again.
    fn release(&self, gateway: &Arc<Gateway>, port: u16) {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        let Some(lease) = leases.get_mut(&port) else { return };
        lease.holders = lease.holders.saturating_sub(1);
        if lease.holders > 0 {
            return;
        }
        lease.generation += 1;
        let generation = lease.generation;
        let after = gateway.config.tcp.lease;
        let weak = Arc::downgrade(gateway);
        let stop = lease.stop.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            stop.cancel();
            leases.remove(&port);
            return;
        };
        runtime.spawn(async move {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(after) => {}
            }
            let Some(gateway) = weak.upgrade() else { return };
            let mut leases = gateway.tcp_ports.leases.lock().unwrap_or_else(|e| e.into_inner());
            if leases.get(&port).is_some_and(|l| l.holders == 0 && l.generation == generation)
                && let Some(lease) = leases.remove(&port)
            {
                lease.stop.cancel();
                info!(port, tunnel_id = %lease.tunnel, endpoint = lease.endpoint, "TCP port lease ended");
            }
        });
    }
}

fn bind(ip: IpAddr, port: u16) -> std::io::Result<TcpListener> {
    let socket = match ip {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::new(ip, port))?;
    socket.listen(1024)
}

/// Accepts on a leased port until the lease ends.
async fn accept(
    gateway: Weak<Gateway>,
    listener: TcpListener,
    tunnel: TunnelId,
    endpoint: String,
    stop: CancellationToken,
) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
    let Some(slots) = gateway.upgrade().map(|g| Arc::clone(&g.connection_slots)) else { return };
    loop {
        // The same limits as the HTTP port: a permit among the gateway's connections, then a
        // slot among the client address's.
        let accepted = async {
            let permit = Arc::clone(&slots).acquire_owned().await.ok()?;
            match listener.accept().await {
                Ok((socket, client)) => Some((socket, client, permit)),
                Err(err) => {
                    // Out of descriptors, mostly: pause rather than spin.
                    warn!(port, %err, "cannot accept on a TCP port");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    None
                }
            }
        };
        let (socket, client, permit) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = accepted => match accepted {
                Some(accepted) => accepted,
                None => continue,
            },
        };
        let Some(serving) = gateway.upgrade() else { return };
        let Some(address_slot) = serving.limits.connection(client.ip()) else {
            let _ = socket.set_zero_linger();
            continue;
        };
        let tracker = serving.tracker.clone();
        let (tunnel, endpoint) = (tunnel.clone(), endpoint.clone());
        tracker.spawn(async move {
            let _held = (permit, address_slot);
            if let Err(reason) = connection(&serving, socket, client, port, &tunnel, &endpoint).await {
                debug!(port, %client, reason, "TCP connection reset");
            }
        });
    }
}

/// Carries one public connection to a session of the tunnel; `Err` with why it was reset.
async fn connection(
    gateway: &Arc<Gateway>,
    mut socket: TcpStream,
    client: SocketAddr,
    port: u16,
    tunnel: &TunnelId,
    endpoint: &str,
) -> Result<(), &'static str> {
    let _ = socket.set_nodelay(true);
    let reset = |socket: &TcpStream, reason| {
        let _ = socket.set_zero_linger();
        Err(reason)
    };
    let Some(session) = session_for(gateway, tunnel, endpoint, port).await else {
        gateway.metrics.tcp_connection("no_session");
        return reset(&socket, "no session of the tunnel came within the pending timeout");
    };
    if !session.identity.ip_rules.allows(client.ip()) {
        gateway.metrics.access_refused("ip", "tcp");
        gateway.metrics.tcp_connection("ip_denied");
        return reset(&socket, "the tunnel's agent does not accept this client's address");
    }
    let _in_flight = session.begin_request();
    let opened = tokio::time::timeout(gateway.config.stream_open_timeout, session.open_stream()).await;
    let Ok(Ok((stream, slot))) = opened else {
        gateway.metrics.tcp_connection("agent_unavailable");
        return reset(&socket, "cannot open a stream to the agent");
    };
    let (mut reader, mut writer) = split_counted(stream, slot);
    let public_addr = socket.local_addr().unwrap_or(SocketAddr::new(gateway.config.tcp.bind, port));
    let open = TcpOpen { endpoint: endpoint.to_owned(), client_addr: client, public_addr };
    if writer.send(&Frame::Head(Head::TcpOpen(open))).await.is_err() {
        gateway.metrics.tcp_connection("agent_unavailable");
        return reset(&socket, "the agent's stream failed");
    }
    match tokio::time::timeout(gateway.config.response_timeout, reader.next()).await {
        Ok(Some(Ok(Frame::Head(Head::TcpAccepted)))) => {}
        Ok(Some(Ok(Frame::Abort(abort)))) => {
            debug!(code = abort.code.as_str(), message = abort.message, "the agent refused a TCP connection");
            gateway.metrics.tcp_connection(abort.code.as_str());
            return reset(&socket, "the agent could not connect to its upstream");
        }
        Ok(_) => {
            gateway.metrics.tcp_connection("protocol_error");
            return reset(&socket, "the agent did not accept the connection");
        }
        Err(_) => {
            gateway.metrics.tcp_connection("upstream_timeout");
            return reset(&socket, "the agent did not answer in time");
        }
    }
    gateway.metrics.tcp_connection("ok");
    match pipe(reader, writer, &mut socket).await {
        Ok((to_client, from_client)) => {
            debug!(port, %client, to_client, from_client, "TCP connection closed");
            Ok(())
        }
        Err(_) => reset(&socket, "the other side reset the connection"),
    }
}

/// A session of `tunnel` that serves `endpoint` on `port`, waiting up to the pending timeout
/// for one (a reconnecting agent).
async fn session_for(
    gateway: &Gateway,
    tunnel: &TunnelId,
    endpoint: &str,
    port: u16,
) -> Option<Arc<Session>> {
    // The least loaded of the sessions that declared the endpoint on this port.
    let find = || {
        gateway
            .registry
            .of(tunnel)
            .into_iter()
            .filter(|s| {
                s.accepts_requests()
                    && s.identity
                        .tcp
                        .as_ref()
                        .is_some_and(|c| c.bound.iter().any(|(n, p)| n == endpoint && *p == port))
            })
            .min_by_key(|s| s.in_flight())
    };
    if let Some(session) = find() {
        return Some(session);
    }
    let waiting = gateway.registry.wait_until(|_| find().is_some());
    tokio::select! {
        () = gateway.shutdown.cancelled() => None,
        result = tokio::time::timeout(gateway.config.pending_timeout, waiting) => result.ok().and_then(|()| find()),
    }
}
