//! Generates the etcd v3 gRPC stubs from the vendored protos in `proto/` (see `proto/README.md`).
//!
//! Every `bytes` field becomes `bytes::Bytes`, so values move from the wire to the codec and back without a copy.
//! `protoc` comes from `protoc-bin-vendored` unless `PROTOC` is set, so a machine without Debian's
//! `protobuf-compiler` still builds.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .bytes(".")
        .compile_protos(
            &[
                "proto/etcd/api/etcdserverpb/rpc.proto",
                "proto/etcd/api/mvccpb/kv.proto",
                "proto/etcd/api/authpb/auth.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
