//! Compiles `proto/ferry/v1/*.proto` with protox (pure Rust, no protoc binary) and generates the
//! tonic service and prost messages.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/ferry/v1/fleet.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // Chunk payloads as `bytes::Bytes`: sliced and forwarded without copies.
        .bytes(".ferry.v1.BlobChunk.data")
        .bytes(".ferry.v1.UploadChunk.data")
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
