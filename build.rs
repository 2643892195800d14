fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    println!("cargo:rerun-if-changed=proto/agent.proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/csi.proto"], &["proto"])?;
    // The agent API reads its streams with a smaller starting buffer
    // (src/lvm/codec.rs): the controller keeps one stream per node.
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::lvm::codec::AgentCodec")
        .compile_protos(&["proto/agent.proto"], &["proto"])?;
    Ok(())
}
