//! The roads a gRPC call takes, decided once from its path (and, for a unary KV call, its one
//! request message), and the HTTP/1.1 side of the client port.
//!
//! HTTP/2 connections are carried by [`super::relay`], which uses [`road`] to route each new
//! stream:
//! - **forwarded whole**: Lease, Cluster, Maintenance, Auth, Lock and Election carry no values;
//!   their streams go to etcd as they came and etcd's answers come back as etcd sent them;
//! - **KV, classified**: a unary Range, Put, DeleteRange or Txn whose request ([`crate::classify`])
//!   involves no key under a compressed prefix or `/etcd-squeeze/` is forwarded the same way;
//! - **everything else** (KV calls that touch compressed keys, Compact, Watch, gRPC health,
//!   unknown methods): the gRPC services ([`super::kv`], [`super::watch`], …) behind
//!   [`Dispatch`], with the layers that count and trace every call ([`super::observe`]) and answer
//!   deadlines and size limits as etcd does ([`super::etcd_status`]).
//!
//! [`Dispatch`] also classifies a KV call that reaches the services unclassified (a message over
//! the relay's classification size, in several gRPC messages, or compressed) and forwards it as
//! an HTTP/2 request through [`crate::upstream`] when no compressed key is involved.
//!
//! HTTP/1.1 on the same port (`GET /version`, `/health`, …) is served by hyper with [`Front`]:
//! [`super::etcd_http`], etcd's own answers. A failure to reach etcd is `UNAVAILABLE`
//! ([`crate::upstream::unavailable`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures::future::BoxFuture;
use http_body::Frame;
use http_body_util::BodyExt;
use tonic::body::Body;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};

use super::observe::ObservedBody;
use super::raw::Shape;
use super::shared::Shared;
use crate::classify::{classify, Call, Route};
use crate::upstream::Upstream;

/// The gRPC services behind the relay: the routes with their layers.
pub type GrpcService = BoxCloneSyncService<http::Request<Body>, http::Response<ObservedBody>, Infallible>;

/// The service each HTTP/1.1 client connection is served by (cheap to clone: one per connection).
#[derive(Clone)]
pub struct Front {
    http: Arc<super::etcd_http::EtcdHttp>,
}

impl Front {
    /// A front answering HTTP/1.1 with `http` (etcd's endpoints).
    pub fn new(http: Arc<super::etcd_http::EtcdHttp>) -> Self {
        Front { http }
    }
}

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for Front {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn call(&self, request: http::Request<hyper::body::Incoming>) -> Self::Future {
        // gRPC needs HTTP/2: over HTTP/1.1 it is a path etcd's HTTP side does not know either.
        let http = self.http.clone();
        Box::pin(async move { Ok(http.serve(request).await) })
    }
}

/// The road of a gRPC call, from its path alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Road {
    /// A method that carries no values: forwarded whole.
    Whole(Shape),
    /// A unary KV call: classified on its request bytes.
    Kv(Call),
    /// The gRPC services.
    Services,
    /// [`IDENTIFY_PATH`]: answered by the proxy itself.
    Identify,
}

/// A gRPC method only etcd-squeeze answers (etcd answers UNIMPLEMENTED): how an operator command
/// finds out that it was pointed at the proxy instead of etcd. The request is empty; the answer
/// is a protobuf message: `1: string` the proxy's name and version, `2: repeated string` its
/// `upstream.endpoints` (where the command should point instead).
pub const IDENTIFY_PATH: &str = "/etcdsqueeze.Proxy/Identify";

pub(crate) fn road(path: &str) -> Road {
    if path == IDENTIFY_PATH {
        return Road::Identify;
    }
    if let Some(method) = path.strip_prefix("/etcdserverpb.KV/") {
        return match method {
            "Range" => Road::Kv(Call::Range),
            "Put" => Road::Kv(Call::Put),
            "DeleteRange" => Road::Kv(Call::DeleteRange),
            "Txn" => Road::Kv(Call::Txn),
            _ => Road::Services,
        };
    }
    match super::methods::method_info(path) {
        Some(info) if info.forwarded_whole => Road::Whole(info.shape),
        _ => Road::Services,
    }
}

/// The dispatch inside the gRPC layers: forward whole, classify KV, or hand to the services.
#[derive(Clone)]
pub struct Dispatch<S> {
    shared: Arc<Shared>,
    upstream: Upstream,
    services: S,
}

impl<S> Dispatch<S> {
    /// Dispatches between `upstream` (forwarded calls) and `services` (the gRPC routes).
    pub fn new(shared: Arc<Shared>, upstream: Upstream, services: S) -> Self {
        Dispatch { shared, upstream, services }
    }
}

impl<S> Service<http::Request<Body>> for Dispatch<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let road = road(request.uri().path());
        let services = self.services.clone();
        match road {
            Road::Services | Road::Whole(_) => Box::pin(services.oneshot(request)),
            Road::Identify => {
                let answer = identify(&self.shared.config.upstream.endpoints);
                Box::pin(async move { Ok(answer) })
            }
            // Classified already (by the relay): the KV service takes its route.
            Road::Kv(_) if request.extensions().get::<Route>().is_some() => Box::pin(services.oneshot(request)),
            Road::Kv(call) => {
                let (shared, upstream) = (self.shared.clone(), self.upstream.clone());
                Box::pin(async move {
                    let limit = shared.config.limits.max_request_bytes.as_u64();
                    let (parts, body) = request.into_parts();
                    let message = match read_message(body, limit).await {
                        Ok(m) => m,
                        Err(Unread::TooLarge(found)) => {
                            return Ok(tonic::Status::resource_exhausted(format!("grpc: received message larger than max ({found} vs. {limit})"))
                                .into_http())
                        }
                        Err(Unread::Body(status)) => return Ok(status.into_http()),
                        // Compressed, several messages, or cut short: the services answer as gRPC does.
                        Err(Unread::NotOneMessage(chunks)) => {
                            return services.oneshot(http::Request::from_parts(parts, replay(chunks))).await
                        }
                    };
                    let route = classify(call, &message.as_ref()[5..], &shared.scope);
                    let mut request = http::Request::from_parts(parts, Body::new(http_body_util::Full::new(message)));
                    match route {
                        Route::Forward => upstream.oneshot(to_etcd(request)).await,
                        Route::Rewrite(_) => {
                            // Classified once: the KV service reads the route instead of walking the request again.
                            request.extensions_mut().insert(route);
                            services.oneshot(request).await
                        }
                    }
                })
            }
        }
    }
}

/// The answer to [`IDENTIFY_PATH`]: one gRPC message, then `grpc-status: 0`.
fn identify(upstream: &[String]) -> http::Response<Body> {
    let mut message = Vec::new();
    prost::encoding::string::encode(1, &format!("etcd-squeeze {}", crate::VERSION), &mut message);
    prost::encoding::string::encode_repeated(2, upstream, &mut message);
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames: Vec<Result<Frame<Bytes>, tonic::Status>> = vec![Ok(Frame::data(Bytes::from(framed))), Ok(Frame::trailers(trailers))];
    let mut response = http::Response::new(Body::new(http_body_util::StreamBody::new(futures::stream::iter(frames))));
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    response
}

/// A request re-addressed to etcd (the channel sets scheme and authority): hop-by-hop headers
/// removed, every other header — `token`, `grpc-timeout`, `grpc-accept-encoding`, … — kept,
/// since etcd's answer comes back to this client unchanged.
fn to_etcd(mut request: http::Request<Body>) -> http::Request<Body> {
    let headers = request.headers_mut();
    headers.remove(http::header::HOST);
    headers.remove(http::header::CONNECTION);
    request
}

/// Why a unary request is not classified by the front.
enum Unread {
    /// The message's length prefix is over the limit (the declared length).
    TooLarge(u64),
    /// The client's body failed (reset, cancelled).
    Body(tonic::Status),
    /// Not one uncompressed message in one DATA frame: the chunks as read, which the services
    /// decode (and classify) as gRPC does. A large message (over one 16 KiB frame) takes this
    /// road too, so that its bytes are copied once, by the gRPC decoder, as before the front.
    NotOneMessage(Vec<Bytes>),
}

/// Reads the whole body of a unary call: its bytes, gRPC's 5-byte prefix included, when they
/// are exactly one uncompressed message of at most `limit` bytes in one DATA frame.
async fn read_message(mut body: Body, limit: u64) -> Result<Bytes, Unread> {
    let mut chunks: Vec<Bytes> = Vec::with_capacity(1);
    let mut joined: Option<BytesMut> = None;
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Unread::Body)?;
        let Ok(data) = frame.into_data() else { continue };
        if data.is_empty() {
            continue; // a client may end its body with an empty DATA frame
        }
        if total == 0 && data.len() >= 5 {
            let declared = (&data[1..5]).get_u32() as u64;
            if declared > limit {
                return Err(Unread::TooLarge(declared));
            }
        }
        total += data.len() as u64;
        match joined.as_mut() {
            Some(j) => j.extend_from_slice(&data),
            // Many tiny DATA frames: from here on joined as they come, so their count costs nothing.
            None if chunks.len() >= MAX_CHUNKS => {
                let mut j = BytesMut::with_capacity(total as usize);
                for c in chunks.drain(..) {
                    j.extend_from_slice(&c);
                }
                j.extend_from_slice(&data);
                joined = Some(j);
            }
            None => chunks.push(data),
        }
        if total > limit + 5 {
            break; // more than one message: the decoder answers
        }
    }
    if let Some(j) = joined {
        chunks.push(j.freeze());
    }
    let one = match &chunks[..] {
        [one] => one.clone(),
        // A small message in several frames: one copy here costs less than the services' road.
        _ if total <= JOIN_BYTES => chunks.iter().fold(BytesMut::with_capacity(total as usize), |mut b, c| {
            b.extend_from_slice(c);
            b
        }).freeze(),
        _ => return Err(Unread::NotOneMessage(chunks)),
    };
    if one.len() >= 5 && one[0] == 0 && (&one[1..5]).get_u32() as usize == one.len() - 5 {
        Ok(one)
    } else {
        Err(Unread::NotOneMessage(chunks))
    }
}

/// A unary request kept as more DATA frames than this is joined into one buffer as it is read.
const MAX_CHUNKS: usize = 64;

/// Up to this many bytes, a unary KV message that came in several DATA frames is joined and
/// classified at the front; a larger one goes to the services as it came (one copy, theirs).
const JOIN_BYTES: u64 = 16 << 10;

/// A request body replaying `chunks`, as the client sent them.
fn replay(chunks: Vec<Bytes>) -> Body {
    let frames = chunks.into_iter().map(|c| Ok::<_, tonic::Status>(Frame::data(c)));
    Body::new(http_body_util::StreamBody::new(futures::stream::iter(frames)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roads() {
        assert_eq!(road("/etcdserverpb.KV/Range"), Road::Kv(Call::Range));
        assert_eq!(road("/etcdserverpb.KV/Txn"), Road::Kv(Call::Txn));
        assert_eq!(road("/etcdserverpb.KV/Compact"), Road::Services);
        assert_eq!(road("/etcdserverpb.KV/RangeStream"), Road::Services);
        assert_eq!(road("/etcdserverpb.Watch/Watch"), Road::Services);
        assert_eq!(road("/etcdserverpb.Lease/LeaseKeepAlive"), Road::Whole(Shape::Bidi));
        assert_eq!(road("/etcdserverpb.Lease/LeaseGrant"), Road::Whole(Shape::Unary));
        assert_eq!(road("/etcdserverpb.Maintenance/Snapshot"), Road::Whole(Shape::ServerStreaming));
        assert_eq!(road("/v3electionpb.Election/Observe"), Road::Whole(Shape::ServerStreaming));
        assert_eq!(road("/etcdserverpb.Lease/NoSuchMethod"), Road::Services);
        assert_eq!(road("/grpc.health.v1.Health/Check"), Road::Services);
        assert_eq!(road("/etcdserverpb.KV/"), Road::Services);
        assert_eq!(road(IDENTIFY_PATH), Road::Identify);
    }

    fn body_of(chunks: &[&[u8]]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, tonic::Status>> = chunks.iter().map(|c| Ok(Frame::data(Bytes::copy_from_slice(c)))).collect();
        Body::new(http_body_util::StreamBody::new(futures::stream::iter(frames)))
    }

    #[tokio::test]
    async fn reads_one_small_message_in_any_chunking() {
        let message = [0u8, 0, 0, 0, 3, 10, 1, b'a'];
        assert_eq!(&read_message(body_of(&[&message]), 100).await.ok().unwrap()[..], &message[..]);
        // tonic's client ends the body with an empty DATA frame.
        assert_eq!(&read_message(body_of(&[&message, b""]), 100).await.ok().unwrap()[..], &message[..]);
        for split in 1..message.len() {
            let (a, b) = message.split_at(split);
            assert_eq!(&read_message(body_of(&[a, b]), 100).await.ok().unwrap()[..], &message[..], "split at {split}");
        }
    }

    #[tokio::test]
    async fn a_message_in_many_tiny_frames_is_joined_as_it_is_read() {
        let mut message = vec![0u8];
        message.extend_from_slice(&(20_000u32).to_be_bytes());
        message.extend(std::iter::repeat_n(3u8, 20_000));
        let chunks: Vec<&[u8]> = message.chunks(7).collect();
        let got = read_message(body_of(&chunks), 1 << 20).await;
        let bytes = match got {
            Ok(b) => b,
            Err(Unread::NotOneMessage(read)) => {
                assert!(read.len() <= MAX_CHUNKS + 1, "{} chunks kept", read.len());
                replay(read).collect().await.ok().unwrap().to_bytes()
            }
            Err(_) => panic!("refused"),
        };
        assert_eq!(&bytes[..], &message[..]);
    }

    #[tokio::test]
    async fn a_large_message_in_several_frames_is_replayed_as_it_came() {
        let mut message = vec![0u8];
        message.extend_from_slice(&(40_000u32).to_be_bytes());
        message.extend(std::iter::repeat_n(7u8, 40_000));
        let chunks: Vec<&[u8]> = message.chunks(16 << 10).collect();
        let Err(Unread::NotOneMessage(read)) = read_message(body_of(&chunks), 1 << 20).await else { panic!("joined") };
        assert_eq!(read.len(), chunks.len());
        let replayed = replay(read).collect().await.ok().unwrap().to_bytes();
        assert_eq!(&replayed[..], &message[..]);
    }

    #[tokio::test]
    async fn refuses_what_is_not_one_small_message() {
        assert!(matches!(read_message(body_of(&[&[0, 0, 0, 1, 0]]), 100).await, Err(Unread::TooLarge(256))));
        assert!(matches!(read_message(body_of(&[&[1, 0, 0, 0, 1, 7]]), 100).await, Err(Unread::NotOneMessage(_))));
        assert!(matches!(read_message(body_of(&[&[0, 0, 0, 0, 2, 7]]), 100).await, Err(Unread::NotOneMessage(_))));
        assert!(matches!(read_message(body_of(&[&[0, 0, 0, 0, 1, 7, 0, 0, 0, 0, 0]]), 100).await, Err(Unread::NotOneMessage(_))));
        assert!(matches!(read_message(body_of(&[&[0, 0]]), 100).await, Err(Unread::NotOneMessage(_))));
        assert!(matches!(read_message(body_of(&[]), 100).await, Err(Unread::NotOneMessage(_))));
    }
}
