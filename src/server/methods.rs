//! The gRPC methods the proxy serves, with their shape: the `method` label of the request
//! metrics, and which streams are long-lived (ended with UNAVAILABLE at shutdown).

use std::collections::HashMap;
use std::sync::LazyLock;

use super::raw::{self, RawSpec, Shape};

/// One gRPC method the proxy serves.
#[derive(Debug)]
pub struct MethodInfo {
    /// The gRPC path, `/etcdserverpb.KV/Range`: the `method` label of the request metrics.
    pub path: String,
    /// Unary or streaming.
    pub shape: Shape,
    /// A stream that lives as long as the client wants (Watch, LeaseKeepAlive,
    /// Election.Observe, health Watch): ended with UNAVAILABLE at shutdown rather than awaited.
    pub long_lived: bool,
}

/// The KV methods (decoded by `kv`).
const KV_METHODS: &[(&str, Shape)] = &[
    ("Range", Shape::Unary), ("Put", Shape::Unary), ("DeleteRange", Shape::Unary), ("Txn", Shape::Unary),
    ("Compact", Shape::Unary), ("RangeStream", Shape::ServerStreaming),
];
/// Streaming methods that end when their answer is complete; every other stream is long-lived.
const FINITE_STREAMS: &[&str] = &["RangeStream", "Snapshot"];

static METHODS: LazyLock<HashMap<String, MethodInfo>> = LazyLock::new(|| {
    fn spec<S: RawSpec>() -> (&'static str, &'static [(&'static str, Shape)]) {
        (S::NAME, S::METHODS)
    }
    let services: [(&str, &[(&str, Shape)]); 9] = [
        ("etcdserverpb.KV", KV_METHODS),
        ("etcdserverpb.Watch", &[("Watch", Shape::Bidi)]),
        spec::<raw::LeaseSpec>(),
        spec::<raw::ClusterSpec>(),
        spec::<raw::MaintenanceSpec>(),
        spec::<raw::AuthSpec>(),
        spec::<raw::LockSpec>(),
        spec::<raw::ElectionSpec>(),
        ("grpc.health.v1.Health", &[("Check", Shape::Unary), ("Watch", Shape::ServerStreaming)]),
    ];
    let mut methods = HashMap::new();
    for (service, list) in services {
        for &(name, shape) in list {
            let path = format!("/{service}/{name}");
            let long_lived = shape != Shape::Unary && !FINITE_STREAMS.contains(&name);
            methods.insert(path.clone(), MethodInfo { path, shape, long_lived });
        }
    }
    methods
});

/// The method served at a gRPC path, if the proxy serves it (any other answers UNIMPLEMENTED).
pub fn method_info(path: &str) -> Option<&'static MethodInfo> {
    METHODS.get(path)
}
