//! Generates the gRPC code from the `.proto` files. Needs `protoc` (Debian: protobuf-compiler);
//! set PROTOC to point at another one.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "rollgate/agent/v1/agent.proto",
        "rollgate/operator/v1/operator.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    if std::env::var_os("PROTOC").is_none() && which_protoc().is_none() {
        return Err(
            "protoc not found: install it (Debian: apt-get install protobuf-compiler) \
                    or set PROTOC to its path"
                .into(),
        );
    }
    // The agent service with smaller codec buffers (see src/codec.rs); the operator API as is.
    tonic_prost_build::configure()
        .codec_path("crate::codec::SmallCodec")
        .compile_protos(&protos[..1], &["."])?;
    tonic_prost_build::configure().compile_protos(&protos[1..], &["."])?;
    Ok(())
}

fn which_protoc() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("protoc"))
        .find(|p| p.is_file())
}
