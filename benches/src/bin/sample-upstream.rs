//! `sample-upstream`: the sample service behind the demo tunnel and the load harness.
//! See `ferry_benches::upstream` for its endpoints.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use ferry_benches::upstream::{UpstreamStats, serve};
use tokio_util::sync::CancellationToken;

/// A small HTTP server to put behind a ferry tunnel: `/`, `/bytes/{n}`, `/echo`, `/sse`, `/slow`,
/// `/headers`, `/ws` and more (see the crate docs).
#[derive(Debug, Parser)]
#[command(name = "sample-upstream", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    eprintln!("sample upstream listening on http://{}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        signal.cancel();
    });
    serve(listener, Arc::new(UpstreamStats::default()), shutdown).await;
    Ok(())
}
