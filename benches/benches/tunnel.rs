//! End-to-end loopback benches: a gateway, an agent and the sample upstream in this process, and
//! the same requests sent to the upstream directly and through the tunnel, in the same groups, so
//! the report shows the ratio. Everything is built once, outside the measured loops.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ferry_agent::AgentConfig;
use ferry_agent::config::{GatewayUrl, Upstream};
use ferry_benches::upstream::{UpstreamStats, pattern, serve};
use ferry_gateway::{Gateway, GatewayConfig};
use http::Request;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

type Body = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

const TUNNEL: &str = "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_bench";

struct Setup {
    runtime: Runtime,
    client: Client<HttpConnector, Body>,
    direct: String,
    tunnel: String,
    _shutdown: CancellationToken,
}

fn setup() -> Setup {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let shutdown = CancellationToken::new();
    let (direct, tunnel) = runtime.block_on(async {
        let upstream = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let upstream_addr = upstream.local_addr().expect("addr");
        tokio::spawn(serve(upstream, Arc::new(UpstreamStats::default()), shutdown.clone()));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let gateway_addr = listener.local_addr().expect("addr");
        let gateway = Gateway::new(GatewayConfig::default(), shutdown.clone()).expect("gateway");
        let serving = Arc::clone(&gateway);
        tokio::spawn(async move { serving.serve(listener).await });
        let config = AgentConfig::new(
            TUNNEL.parse().expect("tunnel id"),
            Upstream::parse(&upstream_addr.to_string()).expect("upstream"),
            GatewayUrl::parse(&format!("ws://{gateway_addr}/ws")).expect("gateway url"),
        );
        tokio::spawn(ferry_agent::run(config, shutdown.clone()));
        let id = TUNNEL.parse().expect("tunnel id");
        gateway.registry.wait_until(|r| !r.of(&id).is_empty()).await;
        (format!("http://{upstream_addr}"), format!("http://{gateway_addr}/t/{TUNNEL}"))
    });
    let client = Client::builder(TokioExecutor::new()).build_http();
    Setup { runtime, client, direct, tunnel, _shutdown: shutdown }
}

async fn get(client: &Client<HttpConnector, Body>, url: &str) -> usize {
    let request =
        Request::get(url).body(Empty::new().map_err(|never| match never {}).boxed_unsync()).expect("request");
    let response = client.request(request).await.expect("response");
    response.into_body().collect().await.expect("body").to_bytes().len()
}

async fn post(client: &Client<HttpConnector, Body>, url: &str, body: Bytes) -> usize {
    let body = Full::new(body).map_err(|never| match never {}).boxed_unsync();
    let response = client.request(Request::post(url).body(body).expect("request")).await.expect("response");
    response.into_body().collect().await.expect("body").to_bytes().len()
}

fn benches(c: &mut Criterion) {
    let setup = setup();
    let targets = [("direct", setup.direct.as_str()), ("tunnel", setup.tunnel.as_str())];

    let mut group = c.benchmark_group("request-1KiB");
    group.throughput(Throughput::Elements(1));
    for (name, base) in targets {
        let url = format!("{base}/bytes/1024");
        group.bench_function(name, |b| b.iter(|| setup.runtime.block_on(get(&setup.client, &url))));
    }
    group.finish();

    let mut group = c.benchmark_group("download");
    group.sample_size(10).measurement_time(Duration::from_secs(2));
    for size in [1 << 20, 64 << 20] {
        group.throughput(Throughput::Bytes(size as u64));
        for (name, base) in targets {
            let url = format!("{base}/bytes/{size}");
            let label = format!("{name}/{}MiB", size >> 20);
            group.bench_function(BenchmarkId::from_parameter(label), |b| {
                b.iter(|| setup.runtime.block_on(get(&setup.client, &url)));
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("upload");
    group.sample_size(10).measurement_time(Duration::from_secs(2));
    for size in [1usize << 20, 64 << 20] {
        let body: Bytes = (0..size as u64).step_by(64 * 1024).flat_map(|o| pattern(o, 64 * 1024)).collect();
        group.throughput(Throughput::Bytes(size as u64));
        for (name, base) in targets {
            let url = format!("{base}/sink");
            let label = format!("{name}/{}MiB", size >> 20);
            group.bench_function(BenchmarkId::from_parameter(label), |b| {
                b.iter(|| setup.runtime.block_on(post(&setup.client, &url, body.clone())));
            });
        }
    }
    group.finish();
}

criterion_group!(tunnel, benches);
criterion_main!(tunnel);
