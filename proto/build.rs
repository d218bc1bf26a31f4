//! Compiles `orchestrator/v1/orchestrator.proto` (server and client) and the client-only slices
//! of the Context and Planning services with tonic-prost-build and the vendored `protoc`, and
//! writes a file descriptor set of each for server reflection.

use std::path::PathBuf;

const ORCHESTRATOR: &str = "orchestrator/v1/orchestrator.proto";
const CONTEXT: &str = "context/v1/context.proto";
const PLANNING: &str = "planning/v1/planning.proto";

/// A prost config that runs `PROTOC` when set, else the vendored protoc (no system install needed).
fn prost_config() -> Result<tonic_prost_build::Config, Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    let protoc = match std::env::var_os("PROTOC") {
        Some(p) => PathBuf::from(p),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    config.protoc_executable(protoc);
    Ok(config)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let include = protoc_bin_vendored::include_path()?;
    let includes = [PathBuf::from("."), include];

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .file_descriptor_set_path(out.join("orchestrator_descriptor.bin"))
        .compile_with_config(prost_config()?, &[PathBuf::from(ORCHESTRATOR)], &includes)?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .file_descriptor_set_path(out.join("clients_descriptor.bin"))
        .compile_with_config(
            prost_config()?,
            &[PathBuf::from(CONTEXT), PathBuf::from(PLANNING)],
            &includes,
        )?;

    for p in [ORCHESTRATOR, CONTEXT, PLANNING] {
        println!("cargo:rerun-if-changed={p}");
    }
    println!("cargo:rerun-if-env-changed=PROTOC");
    Ok(())
}
