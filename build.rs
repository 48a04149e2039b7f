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
    version_info();
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

/// `ETCD_SQUEEZE_COMMIT` and `ETCD_SQUEEZE_COMMIT_DATE` for `--version`, the build-info metric
/// and the proxy's identity: the git commit the binary was built from and its date (the commit's,
/// so a rebuild of the same commit is byte-identical), or `unknown` outside a git checkout.
fn version_info() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let date = git(&["log", "-1", "--format=%cs"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=ETCD_SQUEEZE_COMMIT={commit}");
    println!("cargo:rustc-env=ETCD_SQUEEZE_COMMIT_DATE={date}");
    for path in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        println!("cargo:rerun-if-changed={path}");
    }
}
