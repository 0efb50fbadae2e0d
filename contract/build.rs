// Generates the gRPC code from coca.proto with a vendored protoc: nothing
// needs installing by hand.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure().compile_protos(&["coca.proto"], &["."])?;
    println!("cargo:rerun-if-changed=coca.proto");
    Ok(())
}
