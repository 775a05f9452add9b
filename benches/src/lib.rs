//! Benchmarks and test fixtures for ferry.
//!
//! # Layout
//!
//! - [`fixtures`] — values the codec benches encode and decode.
//! - [`upstream`] — the sample upstream: a small hyper server with the endpoints the tunnel tests,
//!   the end-to-end benches, the demo and the load harness need (downloads, echo, SSE, slow
//!   answers, resets, trailers, WebSocket echo). Also the `sample-upstream` binary.
#![forbid(unsafe_code)]

pub mod fixtures;
pub mod upstream;

pub use fixtures::typical_request_head;
