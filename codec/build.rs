//! Compiles `proto/ferry/v1/*.proto` with protox (pure Rust, so no `protoc` is needed on the build
//! machine) and generates the prost types that `src/pb.rs` includes.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let files =
        ["handshake.proto", "control.proto", "stream.proto"].map(|name| root.join("ferry/v1").join(name));
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let descriptors = protox::compile(&files, [&root])?;
    prost_build::Config::new()
        // Header names and values, nonces and MACs become `Bytes`: decoding from a `Bytes` buffer
        // then slices it instead of copying.
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
