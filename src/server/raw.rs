//! Lease, Cluster, Maintenance, Auth, and etcd's Lock and Election services: forwarded as raw protobuf bytes, never decoded.
//!
//! Their messages carry no values, and decoding them with prost would drop fields this build
//! does not know (a newer etcd's), so the bytes go through untouched. (Lock and Election
//! values are written by etcd itself, never through the proxy's KV, so they are never framed.) Only the methods listed
//! here are forwarded; any other path answers UNIMPLEMENTED (an unknown method could carry
//! compressed values to the client).

use std::convert::Infallible;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use http::uri::PathAndQuery;
use tokio_stream::StreamExt;
use tonic::body::Body;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};

use super::metadata::{forward, requests_until_dropped};
use super::shared::Shared;
use crate::upstream::Upstream;

/// The shape of a gRPC method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// One request, one response.
    Unary,
    /// One request, a stream of responses (Maintenance.Snapshot).
    ServerStreaming,
    /// Streams both ways (Lease.LeaseKeepAlive).
    Bidi,
}

/// One etcd service forwarded as bytes: its gRPC name and methods.
pub trait RawSpec: Send + Sync + 'static {
    /// Fully qualified service name, e.g. `etcdserverpb.Lease`.
    const NAME: &'static str;
    /// Method names and shapes, from etcd v3.7.2's `rpc.proto`, `v3lock.proto` and `v3election.proto`.
    const METHODS: &'static [(&'static str, Shape)];
}

macro_rules! raw_spec {
    ($ty:ident, $name:literal, [$(($m:literal, $shape:ident)),* $(,)?]) => {
        #[doc = concat!("`", $name, "`, forwarded as bytes.")]
        pub struct $ty;
        impl RawSpec for $ty {
            const NAME: &'static str = $name;
            const METHODS: &'static [(&'static str, Shape)] = &[$(($m, Shape::$shape)),*];
        }
    };
}

raw_spec!(LeaseSpec, "etcdserverpb.Lease", [
    ("LeaseGrant", Unary), ("LeaseRevoke", Unary), ("LeaseKeepAlive", Bidi),
    ("LeaseTimeToLive", Unary), ("LeaseLeases", Unary),
]);
raw_spec!(ClusterSpec, "etcdserverpb.Cluster", [
    ("MemberAdd", Unary), ("MemberRemove", Unary), ("MemberUpdate", Unary), ("MemberList", Unary), ("MemberPromote", Unary),
]);
raw_spec!(MaintenanceSpec, "etcdserverpb.Maintenance", [
    ("Alarm", Unary), ("Status", Unary), ("Defragment", Unary), ("Hash", Unary), ("HashKV", Unary),
    ("Snapshot", ServerStreaming), ("MoveLeader", Unary), ("Downgrade", Unary),
]);
raw_spec!(AuthSpec, "etcdserverpb.Auth", [
    ("AuthEnable", Unary), ("AuthDisable", Unary), ("AuthStatus", Unary), ("Authenticate", Unary),
    ("UserAdd", Unary), ("UserGet", Unary), ("UserList", Unary), ("UserDelete", Unary),
    ("UserChangePassword", Unary), ("UserGrantRole", Unary), ("UserRevokeRole", Unary),
    ("RoleAdd", Unary), ("RoleGet", Unary), ("RoleList", Unary), ("RoleDelete", Unary),
    ("RoleGrantPermission", Unary), ("RoleRevokePermission", Unary),
]);

raw_spec!(LockSpec, "v3lockpb.Lock", [("Lock", Unary), ("Unlock", Unary)]);
raw_spec!(ElectionSpec, "v3electionpb.Election", [
    ("Campaign", Unary), ("Proclaim", Unary), ("Leader", Unary), ("Observe", ServerStreaming), ("Resign", Unary),
]);

/// A tower service that forwards the methods of `S` to etcd as raw bytes.
pub struct RawService<S> {
    shared: Arc<Shared>,
    upstream: Upstream,
    _spec: PhantomData<fn() -> S>,
}

impl<S> Clone for RawService<S> {
    fn clone(&self) -> Self {
        RawService { shared: self.shared.clone(), upstream: self.upstream.clone(), _spec: PhantomData }
    }
}

impl<S: RawSpec> RawService<S> {
    /// Forwards `S`'s methods to `upstream`.
    pub fn new(shared: Arc<Shared>, upstream: Upstream) -> Self {
        RawService { shared, upstream, _spec: PhantomData }
    }
}

impl<S: RawSpec> NamedService for RawService<S> {
    const NAME: &'static str = S::NAME;
}

impl<S: RawSpec> tower::Service<http::Request<Body>> for RawService<S> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let path = req.uri().path().to_string();
        let shape = path
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(S::NAME))
            .and_then(|p| p.strip_prefix('/'))
            .and_then(|m| S::METHODS.iter().find(|(name, _)| *name == m))
            .map(|(_, shape)| *shape);
        let forwarder = Forwarder { upstream: self.upstream.clone(), path: PathAndQuery::from_maybe_shared(path).ok() };
        let mut grpc = self.shared.grpc(RawCodec);
        Box::pin(async move {
            Ok(match shape {
                Some(Shape::Unary) => grpc.unary(forwarder, req).await,
                Some(Shape::ServerStreaming) => grpc.server_streaming(forwarder, req).await,
                Some(Shape::Bidi) => grpc.streaming(forwarder, req).await,
                None => Status::unimplemented("").into_http(),
            })
        })
    }
}

/// Forwards one call to the same path upstream.
#[derive(Clone)]
struct Forwarder {
    upstream: Upstream,
    path: Option<PathAndQuery>,
}

impl Forwarder {
    fn path(&self) -> Result<PathAndQuery, Status> {
        self.path.clone().ok_or_else(|| Status::unimplemented(""))
    }
}

/// A gRPC client toward etcd for raw bytes, readied (an upstream that cannot be reached answers
/// UNAVAILABLE before anything is sent).
pub(crate) async fn client(upstream: Upstream) -> Result<tonic::client::Grpc<Upstream>, Status> {
    let mut grpc = tonic::client::Grpc::new(upstream).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX);
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    Ok(grpc)
}

/// Sends the request bytes of a unary call to `path` upstream and returns etcd's response bytes
/// (or its status) as they are.
pub(crate) async fn unary(upstream: Upstream, path: PathAndQuery, request: Request<Bytes>) -> Result<Response<Bytes>, Status> {
    client(upstream).await?.unary(forward(request), path, RawCodec).await
}

/// [`unary`] for a request in pieces (values encoded by the proxy), written out in one copy.
pub(crate) async fn unary_spliced(upstream: Upstream, path: PathAndQuery, request: Request<crate::wire::Spliced>) -> Result<Response<Bytes>, Status> {
    client(upstream).await?.unary(forward(request), path, SplicedCodec).await
}

/// [`unary`] for a server-streaming call: etcd's response messages as bytes.
pub(crate) async fn server_streaming(upstream: Upstream, path: PathAndQuery, request: Request<Bytes>) -> Result<Response<Streaming<Bytes>>, Status> {
    client(upstream).await?.server_streaming(forward(request), path, RawCodec).await
}

impl tonic::server::UnaryService<Bytes> for Forwarder {
    type Response = Bytes;
    type Future = BoxFuture<'static, Result<Response<Bytes>, Status>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let path = this.path()?;
            unary(this.upstream, path, request).await
        })
    }
}

impl tonic::server::ServerStreamingService<Bytes> for Forwarder {
    type Response = Bytes;
    type ResponseStream = Streaming<Bytes>;
    type Future = BoxFuture<'static, Result<Response<Streaming<Bytes>>, Status>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let path = this.path()?;
            server_streaming(this.upstream, path, request).await
        })
    }
}

impl tonic::server::StreamingService<Bytes> for Forwarder {
    type Response = Bytes;
    type ResponseStream = BoxStream<'static, Result<Bytes, Status>>;
    type Future = BoxFuture<'static, Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
        let this = self.clone();
        // A client-side stream error (or half-close) ends what is sent upstream, and so does
        // the end of the response stream (see `requests_until_dropped`).
        let (metadata, _, inbound) = request.into_parts();
        let (outbound, end_requests) = requests_until_dropped(inbound.map_while(|r| r.ok()));
        let request = Request::from_parts(metadata, Default::default(), outbound);
        Box::pin(async move {
            let path = this.path()?;
            let response = client(this.upstream).await?.streaming(forward(request), path, RawCodec).await?;
            Ok(response.map(|responses| {
                futures::StreamExt::boxed(responses.map(move |r| {
                    let _until_the_responses_end = &end_requests;
                    r
                }))
            }))
        })
    }
}

/// A gRPC codec whose outgoing messages are in pieces ([`crate::wire::Spliced`]: bytes with
/// encoded or decoded values spliced in), written out in one copy, and whose incoming messages
/// are the protobuf bytes: the KV and Watch services' server side, and the KV requests the proxy
/// sends etcd on the in-place road.
#[derive(Debug, Clone, Copy, Default)]
pub struct SplicedCodec;

impl Codec for SplicedCodec {
    type Encode = crate::wire::Spliced;
    type Decode = Bytes;
    type Encoder = SplicedCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        SplicedCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for SplicedCodec {
    type Item = crate::wire::Spliced;
    type Error = Status;

    fn encode(&mut self, item: crate::wire::Spliced, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.len());
        for chunk in item.chunks() {
            dst.put_slice(chunk);
        }
        Ok(())
    }
}

/// A gRPC codec whose messages are the protobuf bytes themselves.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let len = src.remaining();
        Ok(Some(src.copy_to_bytes(len)))
    }
}
