//! Compiles `proto/` with the pure-Rust `protox` compiler, so building haul needs no
//! system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto");
    let files = ["haul/v1/haul.proto"];
    let fds = protox::compile(files, [proto_dir])?;
    prost_build::Config::new().compile_fds(fds)?;
    for f in files {
        println!("cargo:rerun-if-changed={proto_dir}/{f}");
    }
    Ok(())
}
