//! Compiles `proto/` with the pure-Rust `protox` compiler, so building haul needs no
//! system `protoc`; generates the prost messages and the tonic services, and keeps the
//! encoded descriptor set for gRPC server reflection.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto");
    let files = ["haul/v1/haul.proto"];
    let fds = protox::compile(files, [proto_dir])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("haul_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    for f in files {
        println!("cargo:rerun-if-changed={proto_dir}/{f}");
    }
    Ok(())
}
