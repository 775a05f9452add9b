//! The agent's side of a TCP stream: dial the endpoint's upstream, say the connection is up, then
//! carry raw bytes both ways until both sides have finished. Half-closes cross as they happen;
//! a reset on either side becomes a reset on the other.

use std::time::Duration;

use ferry_codec::{Abort, AbortCode, Frame, Head, TcpOpen};
use ferry_transport::stream::{FrameReader, FrameWriter, pipe};
use tokio::net::TcpStream;
use tracing::debug;

use crate::config::TcpTarget;

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

async fn abort(writer: &mut FrameWriter, code: AbortCode, message: &str) {
    if writer.send(&Frame::Abort(Abort::new(code, message))).await.is_ok() {
        let _ = writer.finish().await;
    }
}
