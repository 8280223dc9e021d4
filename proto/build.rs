//! Compiles `govshare/v1/*.proto` with protox (pure Rust), so that no protoc install is needed.

use prost::Message;
use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &[
    "govshare/v1/common.proto",
    "govshare/v1/node.proto",
    "govshare/v1/catalog.proto",
    "govshare/v1/sharing.proto",
    "govshare/v1/exchange.proto",
    "govshare/v1/federation.proto",
    "govshare/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // Kept for gRPC server reflection, so that grpcurl and friends can list and call the API.
    fs::write(out.join("govshare_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
