//! Codec micro-benches: request heads, `Data` frames of several sizes, and the handshake MAC.
//!
//! Goals on a 2-core machine: a typical head encodes and decodes in ≤ 2 µs; `Data` frames decode
//! at ≥ 5 GB/s for 16 KiB payloads (they are split off the buffer, never copied).

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ferry_benches::typical_request_head;
use ferry_codec::{Frame, Head, InstanceId, Nonce, PROTOCOL_VERSION, Secret, Transcript, TunnelId};
use uuid::Uuid;

fn encoded(frame: &Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    frame.encode(&mut buf).expect("bench frames are within limits");
    buf
}

fn head(c: &mut Criterion) {
    let frame = Frame::Head(Head::Request(typical_request_head()));
    let wire = encoded(&frame);
    let mut group = c.benchmark_group("head");
    group.throughput(Throughput::Bytes(wire.len() as u64));
    group.bench_function("encode/12-headers", |b| {
        let mut buf = BytesMut::with_capacity(4096);
        b.iter(|| {
            buf.clear();
            black_box(&frame).encode(&mut buf).expect("within limits");
        });
    });
    group.bench_function("decode/12-headers", |b| {
        b.iter_batched(
            || wire.clone(),
            |mut buf| Frame::decode(&mut buf).expect("valid").expect("whole frame"),
            BatchSize::SmallInput,
        );
    });
    group.bench_function("roundtrip/12-headers", |b| {
        let mut buf = BytesMut::with_capacity(4096);
        b.iter(|| {
            black_box(&frame).encode(&mut buf).expect("within limits");
            Frame::decode(&mut buf).expect("valid").expect("whole frame")
        });
    });
    group.finish();
}

fn data(c: &mut Criterion) {
    let mut group = c.benchmark_group("data");
    for (label, size) in [("1KiB", 1024), ("16KiB", 16 * 1024), ("1MiB", 1024 * 1024)] {
        let frame = Frame::Data(Bytes::from(vec![0xa5; size]));
        let wire = encoded(&frame);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("encode", label), &frame, |b, frame| {
            let mut buf = BytesMut::with_capacity(size + 16);
            b.iter(|| {
                buf.clear();
                frame.encode(&mut buf).expect("within limits");
            });
        });
        group.bench_with_input(BenchmarkId::new("decode", label), &wire, |b, wire| {
            b.iter_batched(
                || wire.clone(),
                |mut buf| Frame::decode(&mut buf).expect("valid").expect("whole frame"),
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

fn mac(c: &mut Criterion) {
    let secret = Secret::new(&b"a 32-byte shared secret for mac!"[..]).expect("not empty");
    let tunnel: TunnelId = "agent_0b6f4c1e-8a51-4c3e-9d2a-51f0e6a7b9c4_web".parse().expect("valid id");
    let transcript = Transcript::client(
        PROTOCOL_VERSION,
        &Nonce::from_bytes([7; 32]),
        &tunnel,
        &InstanceId(Uuid::from_u128(42)),
    );
    let tag = transcript.sign(&secret);
    let mut group = c.benchmark_group("mac");
    group.throughput(Throughput::Bytes(transcript.as_bytes().len() as u64));
    group.bench_function("sign", |b| b.iter(|| black_box(&transcript).sign(&secret)));
    group.bench_function("verify", |b| {
        b.iter(|| black_box(&transcript).verify(&secret, &tag).expect("valid tag"));
    });
    group.finish();
}

criterion_group!(benches, head, data, mac);
criterion_main!(benches);
