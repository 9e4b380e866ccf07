//! Generates the protocol types from `proto/` with protox (a pure-Rust protobuf
//! compiler), so a fresh machine needs no system `protoc`.

use std::error::Error;

fn main() -> Result<(), Box<dyn Error>> {
    let protos = ["proto/libatbus_protocol.proto", "proto/libatbus_options.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    prost_build::Config::new()
        // Payload fields become `bytes::Bytes` so that decoding from a `Bytes`
        // buffer slices it instead of copying.
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
