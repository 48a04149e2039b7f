//! `etcdserverpb.KV`: Range, RangeStream, Put, DeleteRange, Txn, Compact, served on bytes.
//!
//! Every call reads top to bottom: **classify** the request bytes once ([`crate::classify`]),
//! then take one of three roads:
//! - **forward**: no key under a prefix (or `/etcd-squeeze/`) can be involved — the request bytes
//!   go to etcd and etcd's response bytes come back, never decoded (pods, leases, events…);
//! - **in place**: values are encoded in the request and decoded in the response in their wire
//!   bytes ([`super::values`]); every other byte, unknown fields included, is etcd's or the client's;
//! - **rebuild**: calls whose request the proxy must change in shape — delta frames (base writes in
//!   the same Txn), VALUE compares on compressed keys (evaluated on logical values, guarded), a
//!   Range sorted by VALUE — are decoded with prost and rebuilt ([`super::rebuild`]).
//!
//! etcd's statuses, headers and trailers pass through untouched on every road.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use http::uri::PathAndQuery;
use prost::Message;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

use super::raw::{self, SplicedCodec};
use super::rebuild::Rebuild;
use super::values;
use super::shared::Shared;
use crate::classify::{classify, Call, Route};
use crate::proto::etcdserverpb::kv_server::Kv;
use crate::proto::etcdserverpb::{CompactionRequest, DeleteRangeRequest, PutRequest, RangeRequest, TxnRequest};
use crate::rewrite::EncodeStats;
use crate::upstream::Upstream;
use crate::wire::{self, Shape, Spliced};

/// The KV service: classifies each call, forwards or rewrites it.
#[derive(Clone)]
pub struct KvService {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    upstream: Upstream,
    rebuild: Rebuild,
}

/// The KV methods, with their gRPC path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Range,
    RangeStream,
    Put,
    DeleteRange,
    Txn,
    Compact,
}

impl Method {
    fn from_path(path: &str) -> Option<Method> {
        Some(match path.strip_prefix("/etcdserverpb.KV/")? {
            "Range" => Method::Range,
            "RangeStream" => Method::RangeStream,
            "Put" => Method::Put,
            "DeleteRange" => Method::DeleteRange,
            "Txn" => Method::Txn,
            "Compact" => Method::Compact,
            _ => return None,
        })
    }

    fn path(self) -> PathAndQuery {
        PathAndQuery::from_static(match self {
            Method::Range => "/etcdserverpb.KV/Range",
            Method::RangeStream => "/etcdserverpb.KV/RangeStream",
            Method::Put => "/etcdserverpb.KV/Put",
            Method::DeleteRange => "/etcdserverpb.KV/DeleteRange",
            Method::Txn => "/etcdserverpb.KV/Txn",
            Method::Compact => "/etcdserverpb.KV/Compact",
        })
    }

    fn call(self) -> Option<Call> {
        Some(match self {
            Method::Range => Call::Range,
            Method::RangeStream => Call::RangeStream,
            Method::Put => Call::Put,
            Method::DeleteRange => Call::DeleteRange,
            Method::Txn => Call::Txn,
            Method::Compact => return None,
        })
    }
}

impl KvService {
    /// A KV service forwarding to `upstream`.
    pub fn new(shared: Arc<Shared>, upstream: Upstream) -> Self {
        let rebuild = Rebuild::new(shared.clone(), upstream.clone());
        KvService { inner: Arc::new(Inner { shared, upstream, rebuild }) }
    }
}

impl NamedService for KvService {
    const NAME: &'static str = "etcdserverpb.KV";
}

impl tower::Service<http::Request<Body>> for KvService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let method = Method::from_path(req.uri().path());
        let call = KvCall { inner: self.inner.clone(), method: method.unwrap_or(Method::Range) };
        let mut grpc = self.inner.shared.grpc(SplicedCodec);
        Box::pin(async move {
            Ok(match method {
                Some(Method::RangeStream) => grpc.server_streaming(call, req).await,
                Some(_) => grpc.unary(call, req).await,
                None => Status::unimplemented("").into_http(),
            })
        })
    }
}

/// One KV call.
#[derive(Clone)]
struct KvCall {
    inner: Arc<Inner>,
    method: Method,
}

impl tonic::server::UnaryService<Bytes> for KvCall {
    type Response = Spliced;
    type Future = BoxFuture<'static, Result<Response<Spliced>, Status>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let (inner, method) = (self.inner.clone(), self.method);
        Box::pin(async move {
            if method == Method::Compact {
                return inner.compact(request).await;
            }
            let call = method.call().unwrap_or(Call::Range);
            // The front classified calls it read whole; others (large, or several DATA frames) here.
            let route = request.extensions().get::<Route>().copied().unwrap_or_else(|| classify(call, request.get_ref(), &inner.shared.scope));
            match route {
                Route::Forward => Ok(raw::unary(inner.upstream.clone(), method.path(), request).await?.map(Spliced::from)),
                Route::Rewrite(needs) if needs.rebuild() => inner.rebuild(method, request).await,
                Route::Rewrite(_) => inner.in_place(method, request).await,
            }
        })
    }
}

impl tonic::server::ServerStreamingService<Bytes> for KvCall {
    type Response = Spliced;
    type ResponseStream = BoxStream<'static, Result<Spliced, Status>>;
    type Future = BoxFuture<'static, Result<Response<Self::ResponseStream>, Status>>;

    /// etcd ≥ 3.7's streamed Range: each chunk's values are decoded; an older etcd answers
    /// UNIMPLEMENTED itself, which passes through (kube-apiserver then falls back to Range).
    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            let route = classify(Call::RangeStream, request.get_ref(), &inner.shared.scope);
            if let Route::Rewrite(needs) = route {
                if needs.sort_by_value {
                    // etcd would sort chunks by the stored frames: refuse rather than return a wrong order.
                    return Err(Status::invalid_argument(
                        "etcd-squeeze: RangeStream sorted by VALUE over compressed keys is not supported; use Range",
                    ));
                }
            }
            let read_revision = wire::varint_field(request.get_ref(), 4).unwrap_or(0);
            let response = raw::server_streaming(inner.upstream.clone(), Method::RangeStream.path(), request).await?;
            if route == Route::Forward {
                return Ok(response.map(|s| s.map(|r| r.map(Spliced::from)).boxed()));
            }
            let (md, chunks, ext) = response.into_parts();
            Ok(Response::from_parts(md, decode_chunks(inner, chunks, read_revision), ext))
        })
    }
}

/// Decodes each chunk of a RangeStream; the first one that cannot be decoded ends the stream
/// with its status (no chunk is ever passed on half-decoded).
fn decode_chunks(inner: Arc<Inner>, chunks: tonic::Streaming<Bytes>, read_revision: i64) -> BoxStream<'static, Result<Spliced, Status>> {
    let decoded = chunks.then(move |item| {
        let inner = inner.clone();
        async move {
            match item {
                Ok(bytes) => match values::decode_response(&inner.shared, Shape::RangeStreamResponse, bytes, &[read_revision], false).await {
                    Ok(bytes) => (Ok(bytes), false),
                    Err(failure) => (Err(Status::from(failure)), true),
                },
                Err(status) => (Err(status), false),
            }
        }
    });
    let mut failed = false;
    decoded
        .take_while(move |(_, decode_failed)| {
            let go = !failed;
            failed |= *decode_failed;
            std::future::ready(go)
        })
        .map(|(item, _)| item)
        .boxed()
}

impl Inner {
    /// Compact: forwarded as bytes; a compaction etcd accepted is noted for delta frames' bases.
    async fn compact(&self, request: Request<Bytes>) -> Result<Response<Spliced>, Status> {
        let revision = wire::varint_field(request.get_ref(), 1).unwrap_or(0);
        let response = raw::unary(self.upstream.clone(), Method::Compact.path(), request).await?;
        self.shared.deltas.observe_compaction(revision);
        Ok(response.map(Spliced::from))
    }

    /// The in-place road: values encoded and decoded in the wire bytes.
    async fn in_place(&self, method: Method, request: Request<Bytes>) -> Result<Response<Spliced>, Status> {
        let shared = &self.shared;
        let mut stats = EncodeStats::default();
        let mut read_revisions = Vec::new();
        let (metadata, extensions, body) = request.into_parts();
        let (shape, body) = match method {
            Method::Range => {
                read_revisions.push(wire::varint_field(&body, 4)?);
                (Shape::RangeResponse, Spliced::from(body))
            }
            Method::Put => {
                let encoded = values::encode_put(shared, &body, &mut stats)?;
                (Shape::PutResponse, encoded.unwrap_or_else(|| Spliced::from(body)))
            }
            Method::DeleteRange => (Shape::DeleteRangeResponse, Spliced::from(body)),
            Method::Txn => {
                let body = values::encode_txn(shared, &body, &mut stats, &mut read_revisions)?;
                (Shape::TxnResponse, body)
            }
            Method::RangeStream | Method::Compact => return Err(Status::internal("etcd-squeeze: not a unary KV call")),
        };
        let request = Request::from_parts(metadata, extensions, body);
        let (md, resp, ext) = raw::unary_spliced(self.upstream.clone(), method.path(), request).await?.into_parts();
        if stats.values > 0 {
            crate::metrics::get().record_encode(&stats);
        }
        // A write's prev_kvs were current just before its revision.
        let revision = wire::header_revision(&resp).unwrap_or(0);
        if method != Method::Range {
            read_revisions.push(revision - 1);
        }
        // A write etcd applied is never reported as failed (its values are passed on as stored
        // rather than fail); a read fails only on etcd's status or a response over the budget.
        let applied = match method {
            Method::Put | Method::DeleteRange => true,
            Method::Txn => values::txn_wrote(&resp),
            _ => false,
        };
        match values::decode_response(shared, shape, resp, &read_revisions, applied).await {
            Ok(bytes) => Ok(Response::from_parts(md, bytes, ext)),
            Err(failure) => Err(Status::from(failure)),
        }
    }

    /// The rebuild road: the request is decoded with prost and handled by [`Rebuild`].
    async fn rebuild(&self, method: Method, request: Request<Bytes>) -> Result<Response<Spliced>, Status> {
        fn decoded<M: Message + Default>(request: Request<Bytes>) -> Result<Request<M>, Status> {
            let (metadata, extensions, body) = request.into_parts();
            let message = M::decode(body).map_err(|e| Status::internal(format!("grpc: error unmarshalling request: {e}")))?;
            Ok(Request::from_parts(metadata, extensions, message))
        }
        fn encoded<M: Message>(response: Response<M>) -> Response<Spliced> {
            response.map(|m| Spliced::from(Bytes::from(m.encode_to_vec())))
        }
        let r = &self.rebuild;
        Ok(match method {
            Method::Range => encoded(r.range(decoded::<RangeRequest>(request)?).await?),
            Method::Put => encoded(r.put(decoded::<PutRequest>(request)?).await?),
            Method::DeleteRange => encoded(r.delete_range(decoded::<DeleteRangeRequest>(request)?).await?),
            Method::Txn => encoded(r.txn(decoded::<TxnRequest>(request)?).await?),
            Method::Compact => encoded(r.compact(decoded::<CompactionRequest>(request)?).await?),
            Method::RangeStream => return Err(Status::internal("etcd-squeeze: RangeStream is not rebuilt")),
        })
    }
}
