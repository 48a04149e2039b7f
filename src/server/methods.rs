//! The gRPC methods the proxy serves, with their shape: the `method` label of the request
//! metrics, and which streams are long-lived (ended with UNAVAILABLE at shutdown).

use std::collections::HashMap;
use std::sync::{LazyLock, OnceLock};

use prometheus::{Histogram, IntCounter};

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
    /// A method that carries no values (Lease, Cluster, Maintenance, Auth, Lock, Election):
    /// its HTTP/2 request and response are forwarded whole (`super::front`).
    pub forwarded_whole: bool,
    /// `etcd_squeeze_grpc_requests_total{method, code="OK"}` and
    /// `etcd_squeeze_grpc_request_duration_seconds{method}`, looked up once (not on every call).
    series: OnceLock<(IntCounter, Histogram)>,
}

impl MethodInfo {
    /// This method's `code="OK"` request counter and its duration histogram.
    pub fn series(&self) -> &(IntCounter, Histogram) {
        self.series.get_or_init(|| {
            let m = crate::metrics::get();
            (m.grpc_requests.with_label_values(&[&self.path, "OK"]), m.grpc_request_duration.with_label_values(&[&self.path]))
        })
    }
}

/// The KV methods (decoded by `kv`).
const KV_METHODS: &[(&str, Shape)] = &[
    ("Range", Shape::Unary), ("Put", Shape::Unary), ("DeleteRange", Shape::Unary), ("Txn", Shape::Unary),
    ("Compact", Shape::Unary), ("RangeStream", Shape::ServerStreaming),
];
/// Streaming methods that end when their answer is complete; every other stream is long-lived.
const FINITE_STREAMS: &[&str] = &["RangeStream", "Snapshot"];

/// A gRPC service: its name, its methods, and whether they are forwarded whole.
type Service = (&'static str, &'static [(&'static str, Shape)], bool);

static METHODS: LazyLock<HashMap<String, MethodInfo>> = LazyLock::new(|| {
    fn spec<S: RawSpec>() -> (&'static str, &'static [(&'static str, Shape)]) {
        (S::NAME, S::METHODS)
    }
    // (service, methods, forwarded whole)
    let services: [Service; 9] = [
        ("etcdserverpb.KV", KV_METHODS, false),
        ("etcdserverpb.Watch", &[("Watch", Shape::Bidi)], false),
        whole(spec::<raw::LeaseSpec>()),
        whole(spec::<raw::ClusterSpec>()),
        whole(spec::<raw::MaintenanceSpec>()),
        whole(spec::<raw::AuthSpec>()),
        whole(spec::<raw::LockSpec>()),
        whole(spec::<raw::ElectionSpec>()),
        ("grpc.health.v1.Health", &[("Check", Shape::Unary), ("Watch", Shape::ServerStreaming)], false),
    ];
    fn whole((name, methods): (&'static str, &'static [(&'static str, Shape)])) -> Service {
        (name, methods, true)
    }
    let mut methods = HashMap::new();
    for (service, list, forwarded_whole) in services {
        for &(name, shape) in list {
            let path = format!("/{service}/{name}");
            let long_lived = shape != Shape::Unary && !FINITE_STREAMS.contains(&name);
            methods.insert(path.clone(), MethodInfo { path, shape, long_lived, forwarded_whole, series: OnceLock::new() });
        }
    }
    methods
});

/// The method served at a gRPC path, if the proxy serves it (any other answers UNIMPLEMENTED).
pub fn method_info(path: &str) -> Option<&'static MethodInfo> {
    METHODS.get(path)
}
