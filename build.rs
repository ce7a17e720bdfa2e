//! Compiles etcd's gRPC API (`proto/etcd.proto`) into Rust with protox, a protobuf compiler
//! written in Rust: building needs nothing but a Rust toolchain (no protoc, no include files).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/etcd.proto");
    let descriptors = protox::compile(["etcd.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        // The snapshot's pieces are slices of the received buffer, not copies of it.
        .bytes(".etcdserverpb.SnapshotResponse.blob")
        .compile_fds(descriptors)?;
    Ok(())
}
