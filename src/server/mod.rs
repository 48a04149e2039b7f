//! The gRPC server: one file per etcd service, all on one HTTP/2 listener.
//!
//! listener → service (`kv`, `watch`, `raw` for Lease/Cluster/Maintenance/Auth/Lock/Election, gRPC health)
//! → value rewrite (`crate::rewrite`) → upstream etcd (`crate::upstream`).

pub mod etcd_status;
pub mod kv;
pub mod listener;
pub mod observe;
pub mod raw;
pub mod watch;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};

use tokio::net::TcpListener;
use tonic::metadata::MetadataMap;
use tonic::transport::Server;
use tonic::{Request, Status};

use crate::codec::{DecodeError, DecodeReason, EncodeError, EncodeReason, KeyDisplay, ValueCodec};
use crate::proto::etcdserverpb::ResponseHeader;
use crate::config::Config;
use crate::delta::cache::BaseCache;
use crate::dictionary::{cache::DictionaryCache, Dictionaries};
use crate::proto::etcdserverpb::kv_server::KvServer;
use crate::proto::etcdserverpb::watch_server::WatchServer;
use crate::upstream::Upstream;
use raw::{RawSpec, Shape};

/// State shared by every request: the validated config, the value codec and its dictionaries.
#[derive(Debug)]
pub struct Shared {
    /// The configuration the proxy started with.
    pub config: Config,
    /// Prefix rules, limits and the dictionary cache.
    pub codec: ValueCodec,
    /// Loads the dictionaries responses need, samples Puts, follows the store, trains.
    pub dictionaries: Arc<Dictionaries>,
    /// Delta frames: which base each write uses, loading bases for reads.
    pub deltas: Arc<crate::delta::Deltas>,
}

impl Shared {
    /// Builds the shared state from a validated config; dictionaries are read from `upstream`.
    pub fn new(config: Config, upstream: Upstream) -> Arc<Self> {
        let dictionary_cache = Arc::new(DictionaryCache::new());
        let codec = ValueCodec::from_config(&config).with_dictionaries(dictionary_cache.clone());
        let base_cache = Arc::new(BaseCache::for_rules(codec.rules()));
        let codec = codec.with_bases(base_cache.clone());
        let dictionaries = Dictionaries::new(&config, codec.clone(), dictionary_cache, upstream.clone());
        let deltas = crate::delta::Deltas::new(codec.clone(), base_cache, upstream, dictionaries.clone());
        Arc::new(Shared { config, codec, dictionaries, deltas })
    }
}

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listen address cannot be bound.
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        /// The config key: `server.listen` or `metrics.listen`.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// An upstream endpoint or its TLS files cannot be used.
    #[error(transparent)]
    Upstream(#[from] crate::upstream::UpstreamError),
    /// The listener's TLS files cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The HTTP/2 server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The metrics listener failed.
    #[error("metrics.listen: {0}")]
    Metrics(std::io::Error),
}

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

/// A started proxy: its bound addresses and the future that serves until shutdown.
pub struct Running {
    /// The gRPC listener's address (useful with port 0).
    pub addr: SocketAddr,
    /// The `/metrics`, `/healthz`, `/readyz` listener's address.
    pub metrics_addr: SocketAddr,
    /// Serves until the shutdown signal, then drains (see [`start`]) and resolves.
    pub serve: Pin<Box<dyn Future<Output = Result<(), ServeError>> + Send>>,
}

/// A proxy serving in the background of the current tokio runtime (tests, benchmarks, the demo):
/// its addresses, and a handle whose drop shuts it down.
pub struct Background {
    /// The gRPC listener's address.
    pub addr: SocketAddr,
    /// The `/metrics`, `/healthz`, `/readyz` listener's address.
    pub metrics_addr: SocketAddr,
    /// Dropping it (or sending) starts the graceful shutdown of [`start`].
    pub stop: tokio::sync::oneshot::Sender<()>,
}

/// [`start`], spawned on the current runtime; shuts down when the returned handle is dropped.
pub async fn spawn(config: Config) -> Result<Background, ServeError> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = start(config, async move {
        let _ = stopped.await;
    })
    .await?;
    tokio::spawn(running.serve);
    Ok(Background { addr: running.addr, metrics_addr: running.metrics_addr, stop })
}

/// Binds `server.listen` and `metrics.listen`, loads the TLS files, probes etcd once, and
/// returns the addresses and a future that serves until `shutdown` resolves.
///
/// Shutdown: the listener closes at once; the gRPC health service turns NOT_SERVING and
/// `/readyz` fails; long-lived streams (Watch, LeaseKeepAlive, …) end with UNAVAILABLE so
/// clients re-open them elsewhere; unary calls in flight may finish for
/// `server.shutdown_grace`, after which whatever is left is cut. Then the future resolves `Ok`.
pub async fn start(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<Running, ServeError> {
    let bind = |key, addr| async move {
        let l = TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { key, addr, source })?;
        let local = l.local_addr().map_err(|source| ServeError::Bind { key, addr, source })?;
        Ok::<_, ServeError>((l, local))
    };
    let (listener, local) = bind("server.listen", config.server.listen).await?;
    let (metrics_listener, metrics_addr) = bind("metrics.listen", config.metrics.listen).await?;
    let server_tls = crate::tls::server_config(&config.server)?.map(Arc::new);
    let upstream = Upstream::new(&config.upstream)?;
    let shared = Shared::new(config, upstream.clone());
    // Dictionary store follower and trainer: they run while the server serves.
    let dictionary_tasks = shared.dictionaries.spawn();
    let metrics = crate::metrics::get();
    metrics.init_prefixes(shared.config.prefixes.iter().map(|p| p.prefix.as_str()));

    if server_tls.is_none() && !local.ip().is_loopback() {
        tracing::warn!(listen = %local, "serving plain text beyond loopback (server.allow_non_loopback): \
            anyone who can reach this address can read and write etcd; prefer server.tls_cert_file and server.tls_client_ca_file");
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let readiness = crate::health::Readiness::new(upstream.clone(), health_reporter, shared.config.health.clone(), &shared.config.dictionaries.key_prefix);
    readiness.probe().await;
    tokio::spawn(readiness.clone().run(stop_rx.clone()));

    let max_decoding = shared.config.limits.max_request_bytes.as_u64() as usize;
    let kv = KvServer::new(kv::KvService::new(shared.clone(), upstream.clone()))
        .max_decoding_message_size(max_decoding)
        .max_encoding_message_size(usize::MAX);
    let watch = WatchServer::new(watch::WatchService::new(shared.clone(), upstream.clone()))
        .max_decoding_message_size(max_decoding)
        .max_encoding_message_size(usize::MAX);
    let router = Server::builder()
        .max_concurrent_streams(shared.config.server.max_concurrent_streams)
        .tcp_nodelay(true)
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .layer(observe::GrpcLayer::new(stop_rx.clone()))
        .layer(etcd_status::EtcdStatusLayer)
        .add_service(kv)
        .add_service(watch)
        .add_service(raw::RawService::<raw::LeaseSpec>::new(shared.clone(), upstream.clone()))
        .add_service(raw::RawService::<raw::ClusterSpec>::new(shared.clone(), upstream.clone()))
        .add_service(raw::RawService::<raw::MaintenanceSpec>::new(shared.clone(), upstream.clone()))
        .add_service(raw::RawService::<raw::AuthSpec>::new(shared.clone(), upstream.clone()))
        .add_service(raw::RawService::<raw::LockSpec>::new(shared.clone(), upstream.clone()))
        .add_service(raw::RawService::<raw::ElectionSpec>::new(shared.clone(), upstream))
        .add_service(health_service);
    tracing::info!(listen = %local, tls = server_tls.is_some(), metrics = %metrics_addr, upstream = ?shared.config.upstream.endpoints,
        prefixes = ?shared.config.prefixes.iter().map(|p| p.prefix.as_str()).collect::<Vec<_>>(), "etcd-squeeze serving");

    let incoming = listener::incoming(listener, server_tls, shared.config.server.tls_handshake_timeout);
    let grace = shared.config.server.shutdown_grace;
    let admin_stop = stop_rx.clone();
    let serve = async move {
        let _dictionary_tasks = dictionary_tasks;
        let (admin_done_tx, admin_done_rx) = tokio::sync::oneshot::channel::<()>();
        let admin = tokio::spawn(crate::health::serve(metrics_listener, readiness.clone(), async move {
            let _ = admin_done_rx.await;
        }));
        let signal = async move {
            shutdown.await;
            tracing::info!(in_flight = metrics.grpc_inflight_requests.get(), grace = ?grace,
                "shutting down: listener closed, long-lived streams end with UNAVAILABLE, unary calls may finish");
            readiness.stop().await;
            let _ = stop_tx.send(true);
        };
        let grpc = router.serve_with_incoming_shutdown(incoming, signal);
        let mut stopping = admin_stop;
        let deadline = async move {
            let _ = stopping.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        };
        let result = tokio::select! {
            r = grpc => r.map_err(ServeError::from),
            _ = deadline => {
                tracing::warn!(cut = metrics.grpc_inflight_requests.get(), "server.shutdown_grace expired: cutting the calls still in flight");
                Ok(())
            }
        };
        let _ = admin_done_tx.send(());
        match admin.await {
            Ok(Err(e)) if result.is_ok() => return Err(ServeError::Metrics(e)),
            _ => {}
        }
        tracing::info!("stopped");
        result
    };
    Ok(Running { addr: local, metrics_addr, serve: Box::pin(serve) })
}

/// Loads what `--check-config` can check beyond [`Config::validate`]: the TLS files of both sides.
pub fn check(config: &Config) -> Result<(), ServeError> {
    crate::tls::server_config(&config.server)?;
    Upstream::new(&config.upstream)?;
    Ok(())
}

/// A client's request stream, forwarded upstream, that also ends when the returned
/// [`EndRequests`] is dropped.
///
/// An upstream bidi call (Watch, LeaseKeepAlive) keeps polling the client's requests for as
/// long as the client sends; when the response to the client ends first (shutdown, DATA_LOSS,
/// etcd ending it), dropping the guard kept with the response ends the requests too. Both
/// directions of the client's HTTP/2 stream then close, and a graceful shutdown can finish.
pub fn requests_until_dropped<S>(requests: S) -> (impl futures::Stream<Item = S::Item> + Send, EndRequests)
where
    S: futures::Stream + Send,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    (futures::StreamExt::take_until(requests, rx), EndRequests(tx))
}

/// Ends the request stream of [`requests_until_dropped`] when dropped.
pub struct EndRequests(#[allow(dead_code)] tokio::sync::oneshot::Sender<()>);

/// Headers that belong to this hop, not to the call: tonic sets its own, and a forwarded
/// `grpc-accept-encoding` could make etcd compress responses the proxy did not ask for.
const HOP_HEADERS: &[&str] = &["te", "content-type", "user-agent", "grpc-encoding", "grpc-accept-encoding", "host", "connection"];

/// The client's metadata as sent upstream: everything (`token`, `hasleader`,
/// `client-api-version`, `traceparent`, `grpc-timeout`, …) except [`HOP_HEADERS`].
pub fn upstream_metadata(incoming: &MetadataMap) -> MetadataMap {
    without_hop_headers(incoming.clone())
}

fn without_hop_headers(metadata: MetadataMap) -> MetadataMap {
    let mut headers = metadata.into_headers();
    for h in HOP_HEADERS {
        headers.remove(*h);
    }
    MetadataMap::from_headers(headers)
}

/// A client request re-addressed to etcd with the client's metadata (moved, not copied: this
/// runs on every forwarded call).
pub fn forward<T>(request: Request<T>) -> Request<T> {
    let (metadata, _, message) = request.into_parts();
    let mut r = Request::new(message);
    *r.metadata_mut() = without_hop_headers(metadata);
    r
}

/// A new upstream request carrying a copy of `metadata` (filtered by [`upstream_metadata`]), for
/// callers that send several upstream requests for one client call.
pub fn with_metadata<T>(metadata: &MetadataMap, message: T) -> Request<T> {
    let mut r = Request::new(message);
    *r.metadata_mut() = upstream_metadata(metadata);
    r
}

/// A stored frame that cannot be decoded: `DATA_LOSS` naming the key and the reason; a
/// response that would decompress beyond `limits.max_response_bytes`: `RESOURCE_EXHAUSTED`.
pub fn decode_status(e: DecodeError) -> Status {
    crate::metrics::get().decode_errors.with_label_values(&[e.reason.kind()]).inc();
    if let DecodeReason::ResponseTooLarge { .. } = e.reason {
        tracing::warn!(key = %KeyDisplay(&e.key), reason = %e.reason, "response too large");
        return Status::resource_exhausted(e.to_string());
    }
    tracing::error!(key = %KeyDisplay(&e.key), reason = %e.reason, "cannot decode stored value");
    Status::data_loss(e.to_string())
}

/// [`decode_status`] for a response whose write etcd has already applied (a `prev_kv` that
/// cannot be decoded): the status says so, so a client does not take the write for failed.
pub fn applied_decode_status(e: DecodeError, header: Option<&ResponseHeader>) -> Status {
    let status = decode_status(e);
    let revision = header.map_or(0, |h| h.revision);
    Status::new(status.code(), format!("{} (the write itself was applied at revision {revision})", status.message()))
}

/// A value that cannot be stored. Over `limits.max_value_bytes`: etcd's own
/// `InvalidArgument "etcdserver: request is too large"`, byte-exact, so kube-apiserver (and
/// Flyte) react as they do to etcd. A zstd failure (not expected): `INTERNAL` naming the key.
pub fn encode_status(e: EncodeError) -> Status {
    match e.reason {
        EncodeReason::TooLarge { .. } => {
            tracing::info!(key = %KeyDisplay(&e.key), reason = %e.reason, "refused: value too large");
            Status::invalid_argument(ETCD_REQUEST_TOO_LARGE)
        }
        EncodeReason::Zstd(_) => {
            tracing::error!(key = %KeyDisplay(&e.key), reason = %e.reason, "cannot compress value");
            Status::internal(e.to_string())
        }
    }
}

/// etcd's `rpctypes.ErrGRPCRequestTooLarge` message (code INVALID_ARGUMENT).
pub const ETCD_REQUEST_TOO_LARGE: &str = "etcdserver: request is too large";
