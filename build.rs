//! Compiles the wire protocol with a vendored `protoc`, so a machine with only cargo builds it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("tapeline_descriptor.bin"))
        .bytes(".tapeline.v1.Record.payload")
        // Prost's codec plus a count of a publish's records before it is decoded (src/codec.rs).
        .codec_path("crate::codec::Codec")
        .compile_protos(&["proto/tapeline/v1/tapeline.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
