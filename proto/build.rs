// Generates the gRPC code from coca.proto with a vendored protoc: nothing
// needs installing by hand. The descriptor set is what the compatibility
// test compares with the committed snapshot.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let descriptor = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("coca.descriptor");
    tonic_prost_build::configure()
        .file_descriptor_set_path(descriptor)
        .compile_protos(&["coca.proto"], &["."])?;
    println!("cargo:rerun-if-changed=coca.proto");
    Ok(())
}
