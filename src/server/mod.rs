//! The gRPC server: one file per etcd service, all on one HTTP/2 listener.
//!
//! listener → service (`kv`, `watch`, `raw` for Lease/Cluster/Maintenance/Auth, gRPC health)
//! → value rewrite (`crate::rewrite`) → upstream etcd (`crate::upstream`).

pub mod kv;
pub mod raw;
pub mod watch;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::metadata::MetadataMap;
use tonic::transport::Server;
use tonic::{Request, Status};

use crate::codec::{DecodeError, DecodeReason, EncodeError, EncodeReason, KeyDisplay, ValueCodec};
use crate::proto::etcdserverpb::ResponseHeader;
use crate::config::Config;
use crate::dictionary::Dictionaries;
use crate::proto::etcdserverpb::kv_server::KvServer;
use crate::proto::etcdserverpb::watch_server::WatchServer;

/// State shared by every request: the validated config, the value codec and its dictionaries.
#[derive(Debug)]
pub struct Shared {
    /// The configuration the proxy started with.
    pub config: Config,
    /// Prefix rules, limits and the dictionary cache.
    pub codec: ValueCodec,
    /// Loads the dictionaries responses need, samples Puts, follows the store, trains.
    pub dictionaries: Arc<Dictionaries>,
}

impl Shared {
    /// Builds the shared state from a validated config; dictionaries are read over `channel`.
    pub fn new(config: Config, channel: tonic::transport::Channel) -> Arc<Self> {
        let codec = ValueCodec::from_config(&config);
        let dictionaries = Dictionaries::new(&config, codec.clone(), channel);
        Arc::new(Shared { config, codec, dictionaries })
    }
}

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address cannot be bound.
    #[error("server.listen: cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// An upstream endpoint is not a valid URI.
    #[error(transparent)]
    Upstream(#[from] crate::upstream::UpstreamError),
    /// The HTTP/2 server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Binds `config.server.listen` and returns the bound address (useful with port 0) and a
/// future that serves until `shutdown` resolves.
pub async fn bind(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, impl Future<Output = Result<(), ServeError>>), ServeError> {
    let addr = config.server.listen;
    let listener = TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(|source| ServeError::Bind { addr, source })?;
    let channel = crate::upstream::channel(&config.upstream)?;
    let shared = Shared::new(config, channel.clone());
    // Dictionary store follower and trainer: they run while the server serves.
    let dictionary_tasks = shared.dictionaries.spawn();
    let max_decoding = shared.config.limits.max_request_bytes.as_u64() as usize;

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;

    let kv = KvServer::new(kv::KvService::new(shared.clone(), channel.clone()))
        .max_decoding_message_size(max_decoding)
        .max_encoding_message_size(usize::MAX);
    let watch = WatchServer::new(watch::WatchService::new(shared.clone(), channel.clone()))
        .max_decoding_message_size(max_decoding)
        .max_encoding_message_size(usize::MAX);
    let router = Server::builder()
        .max_concurrent_streams(shared.config.server.max_concurrent_streams)
        .tcp_nodelay(true)
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .add_service(kv)
        .add_service(watch)
        .add_service(raw::RawService::<raw::LeaseSpec>::new(shared.clone(), channel.clone()))
        .add_service(raw::RawService::<raw::ClusterSpec>::new(shared.clone(), channel.clone()))
        .add_service(raw::RawService::<raw::MaintenanceSpec>::new(shared.clone(), channel.clone()))
        .add_service(raw::RawService::<raw::AuthSpec>::new(shared.clone(), channel.clone()))
        .add_service(raw::RawService::<raw::LockSpec>::new(shared.clone(), channel.clone()))
        .add_service(raw::RawService::<raw::ElectionSpec>::new(shared.clone(), channel))
        .add_service(health_service);
    tracing::info!(listen = %local, upstream = ?shared.config.upstream.endpoints,
        prefixes = ?shared.config.prefixes.iter().map(|p| p.prefix.as_str()).collect::<Vec<_>>(), "etcd-squeeze serving");
    let serve = async move {
        let _dictionary_tasks = dictionary_tasks;
        // Accepted sockets need TCP_NODELAY explicitly (the builder's setting only applies to
        // listeners it binds itself): without it small responses wait ~40 ms for delayed ACKs.
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        router.serve_with_incoming_shutdown(incoming, shutdown).await?;
        Ok(())
    };
    Ok((local, serve))
}

/// Headers that belong to this hop, not to the call: tonic sets its own, and a forwarded
/// `grpc-accept-encoding` could make etcd compress responses the proxy did not ask for.
const HOP_HEADERS: &[&str] = &["te", "content-type", "user-agent", "grpc-encoding", "grpc-accept-encoding", "host", "connection"];

/// The client's metadata as sent upstream: everything (`token`, `hasleader`,
/// `client-api-version`, `traceparent`, `grpc-timeout`, …) except [`HOP_HEADERS`].
pub fn upstream_metadata(incoming: &MetadataMap) -> MetadataMap {
    let mut headers = incoming.clone().into_headers();
    for h in HOP_HEADERS {
        headers.remove(*h);
    }
    MetadataMap::from_headers(headers)
}

/// A client request re-addressed to etcd with the client's metadata.
pub fn forward<T>(request: Request<T>) -> Request<T> {
    let (metadata, _, message) = request.into_parts();
    with_metadata(&metadata, message)
}

/// A new upstream request carrying `metadata` (filtered by [`upstream_metadata`]).
pub fn with_metadata<T>(metadata: &MetadataMap, message: T) -> Request<T> {
    let mut r = Request::new(message);
    *r.metadata_mut() = upstream_metadata(metadata);
    r
}

/// A stored frame that cannot be decoded: `DATA_LOSS` naming the key and the reason; a
/// response that would decompress beyond `limits.max_response_bytes`: `RESOURCE_EXHAUSTED`.
pub fn decode_status(e: DecodeError) -> Status {
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
