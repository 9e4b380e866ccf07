//! Generates the protocol types from `proto/` with protox (a pure-Rust protobuf
//! compiler), so a fresh machine needs no system `protoc`.

use std::error::Error;

/// Discovery messages double as the YAML model: serde with defaults for every
/// absent field.
const DISCOVERY_MESSAGES: [&str; 7] = [
    "discovery_host",
    "discovery_metadata",
    "discovery_match",
    "discovery_gateway",
    "discovery_relay_selector",
    "discovery_node",
    "discovery_group",
];

fn main() -> Result<(), Box<dyn Error>> {
    let protos = [
        "proto/libatbus_protocol.proto",
        "proto/libatbus_options.proto",
        "proto/libatbus_discovery.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    let mut config = prost_build::Config::new();
    // Payload fields become `bytes::Bytes` so that decoding from a `Bytes`
    // buffer slices it instead of copying; maps are ordered (deterministic
    // encoding and YAML output).
    config.bytes(["."]).btree_map(["."]);
    for message in DISCOVERY_MESSAGES {
        config.type_attribute(
            format!(".atbus.protocol.{message}"),
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default, deny_unknown_fields)]",
        );
    }
    // The seed's files write a single address as a scalar.
    config.field_attribute(
        ".atbus.protocol.discovery_gateway.address",
        "#[serde(deserialize_with = \"crate::discovery::one_or_many\")]",
    );
    config.compile_fds(descriptors)?;
    Ok(())
}
