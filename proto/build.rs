//! Compiles `proto/graft/v1/*.proto` with the vendored `protoc`, so a fresh machine needs
//! nothing installed by hand, and writes the descriptor set that server reflection serves.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY of intent: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe_set_protoc(&protoc);
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let protos = [
        "proto/graft/v1/generation.proto",
        "proto/graft/v1/adapters.proto",
        "proto/graft/v1/training.proto",
        "proto/graft/v1/admin.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("graft_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}

#[allow(unsafe_code)]
fn unsafe_set_protoc(path: &std::path::Path) {
    // Rust 2024 marks set_var unsafe; this build script has no other threads.
    unsafe { env::set_var("PROTOC", path) };
}
