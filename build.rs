//! Compiles the wire protocol with a vendored `protoc`, so a machine with only cargo builds it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = ["proto/tapeline/v1/tapeline.proto"];
    // The messages and the client (`protocol::pb`).
    tonic_prost_build::configure()
        .build_server(false)
        .file_descriptor_set_path(out.join("tapeline_descriptor.bin"))
        .bytes(".tapeline.v1.Record.payload")
        .codec_path("crate::protocol::codec::Codec")
        .compile_protos(&protos, &["proto"])?;
    // The server, on the same messages except the one it sends most: a `SubscribeResponse` is
    // encoded by hand straight from the broker's records (`src/protocol/wire.rs`), with no intermediate
    // `pb::Record` per record. Clients decode it as the ordinary message.
    let server = out.join("server");
    std::fs::create_dir_all(&server)?;
    tonic_prost_build::configure()
        .build_client(false)
        .out_dir(&server)
        .extern_path(".tapeline.v1", "crate::protocol::pb")
        .extern_path(".tapeline.v1.SubscribeResponse", "crate::protocol::wire::SubscribeResponse")
        // Prost's codec plus a count of a publish's records before it is decoded (src/protocol/codec.rs).
        .codec_path("crate::protocol::codec::Codec")
        .compile_protos(&protos, &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
