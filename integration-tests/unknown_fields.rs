//! Fields a newer etcd adds to its responses reach the client byte-identical through the proxy,
//! for keys inside and outside compressed prefixes: the proxy rewrites values in the wire bytes
//! and keeps everything else.
//!
//! No real etcd sends a field this build does not know, so a fake upstream stands between the
//! proxy and a real etcd: it forwards every KV and Watch call as bytes and appends field 100
//! (a string, "new") to every response message.

use std::convert::Infallible;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use etcd_squeeze::proto::etcdserverpb::{
    request_op, watch_request, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse,
    RequestOp, TxnRequest, TxnResponse, WatchCreateRequest, WatchRequest, WatchResponse,
};
use etcd_squeeze::server::raw::RawCodec;
use futures::StreamExt;
use http::uri::PathAndQuery;
use prost::Message;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::harness::{Etcd, ProxyConfig, FLYTE};

/// Field 100, length-delimited, "new": what a newer etcd might add.
const UNKNOWN: &[u8] = &[0xa2, 0x06, 0x03, b'n', b'e', b'w'];

fn with_unknown(b: Bytes) -> Bytes {
    let mut out = BytesMut::from(&b[..]);
    out.extend_from_slice(UNKNOWN);
    out.freeze()
}

/// Forwards `etcdserverpb.KV` or `etcdserverpb.Watch` to etcd as bytes, adding [`UNKNOWN`] to
/// every response message.
#[derive(Clone)]
struct Fake<const WATCH: bool> {
    etcd: Channel,
}

impl NamedService for Fake<false> {
    const NAME: &'static str = "etcdserverpb.KV";
}

impl NamedService for Fake<true> {
    const NAME: &'static str = "etcdserverpb.Watch";
}

impl<const WATCH: bool> tower::Service<http::Request<Body>> for Fake<WATCH> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let handler = Handler { etcd: self.etcd.clone(), path: PathAndQuery::try_from(req.uri().path()).unwrap() };
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec);
            Ok(if WATCH { grpc.streaming(handler, req).await } else { grpc.unary(handler, req).await })
        })
    }
}

#[derive(Clone)]
struct Handler {
    etcd: Channel,
    path: PathAndQuery,
}

impl tonic::server::UnaryService<Bytes> for Handler {
    type Response = Bytes;
    type Future = futures::future::BoxFuture<'static, Result<Response<Bytes>, Status>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let mut grpc = tonic::client::Grpc::new(this.etcd);
            grpc.ready().await.unwrap();
            let response = grpc.unary(Request::new(request.into_inner()), this.path, RawCodec).await?;
            Ok(response.map(with_unknown))
        })
    }
}

impl tonic::server::StreamingService<Bytes> for Handler {
    type Response = Bytes;
    type ResponseStream = futures::stream::BoxStream<'static, Result<Bytes, Status>>;
    type Future = futures::future::BoxFuture<'static, Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let mut grpc = tonic::client::Grpc::new(this.etcd);
            grpc.ready().await.unwrap();
            let inbound = tokio_stream::StreamExt::map_while(request.into_inner(), |r| r.ok());
            let response = grpc.streaming(Request::new(inbound), this.path, RawCodec).await?;
            Ok(response.map(|s| s.map(|r| r.map(with_unknown)).boxed()))
        })
    }
}

/// Starts the fake upstream in front of `etcd`; returns its URL.
async fn start_fake(etcd: &Etcd) -> String {
    let channel = Channel::from_shared(etcd.url.clone()).unwrap().connect().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router = tonic::transport::Server::builder()
        .add_service(Fake::<false> { etcd: channel.clone() })
        .add_service(Fake::<true> { etcd: channel });
    tokio::spawn(router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)));
    url
}

/// A raw unary call: request message in, response bytes out.
async fn call(channel: &Channel, method: &'static str, request: impl Message) -> Bytes {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let path = PathAndQuery::from_static(method);
    grpc.unary(Request::new(Bytes::from(request.encode_to_vec())), path, RawCodec).await.unwrap().into_inner()
}

fn put(key: &str, value: &Bytes) -> PutRequest {
    PutRequest { key: key.as_bytes().to_vec().into(), value: value.clone(), prev_kv: true, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_response_fields_reach_the_client_byte_identical() {
    let etcd = Etcd::start().await;
    let fake = start_fake(&etcd).await;
    // Per-object frames: with delta frames a Put is sent as a Txn, and its answer is built from
    // the Txn's (src/server/rebuild.rs).
    let proxy = ProxyConfig::new(&fake).prefix(FLYTE).delta(false).start().await;
    let via = Channel::from_shared(proxy.url.clone()).unwrap().connect().await.unwrap();
    let to_fake = Channel::from_shared(fake.clone()).unwrap().connect().await.unwrap();
    let logical = Bytes::from(format!("{{\"status\":{{\"phase\":\"{}\"}}}}", "Running ".repeat(200)));

    for key in ["/registry/pods/default/a", &format!("{FLYTE}ns/wf")] {
        let inside = key.starts_with(FLYTE);
        // Put, twice: the second one returns the first as prev_kv.
        let first = call(&via, "/etcdserverpb.KV/Put", put(key, &logical)).await;
        assert!(first.ends_with(UNKNOWN), "{key}: Put response lost the unknown field");
        let second = call(&via, "/etcdserverpb.KV/Put", put(key, &logical)).await;
        assert!(second.ends_with(UNKNOWN), "{key}: Put response with prev_kv lost the unknown field");
        assert_eq!(PutResponse::decode(&second[..]).unwrap().prev_kv.unwrap().value, logical, "{key}: prev_kv decoded");

        // Range: through the proxy vs straight from the fake upstream.
        let range = RangeRequest { key: key.as_bytes().to_vec().into(), ..Default::default() };
        let through = call(&via, "/etcdserverpb.KV/Range", range.clone()).await;
        let direct = call(&to_fake, "/etcdserverpb.KV/Range", range.clone()).await;
        assert!(through.ends_with(UNKNOWN), "{key}: Range response lost the unknown field");
        assert_eq!(RangeResponse::decode(&through[..]).unwrap().kvs[0].value, logical);
        if inside {
            assert_ne!(through, direct, "{key}: etcd stores a frame; the client gets the JSON");
            // Every byte but the value is etcd's: same length change as the value's.
            let stored = RangeResponse::decode(&direct[..]).unwrap().kvs[0].value.len();
            let grew = logical.len() - stored;
            assert!(through.len() >= direct.len() + grew, "{key}: nothing but the value changed size");
        } else {
            assert_eq!(through, direct, "{key}: a pass-through Range is etcd's bytes, byte for byte");
        }

        // Txn: a Put and a Range in the success branch.
        let txn = TxnRequest {
            success: vec![
                RequestOp { request: Some(request_op::Request::RequestPut(put(key, &logical))) },
                RequestOp { request: Some(request_op::Request::RequestRange(range.clone())) },
            ],
            ..Default::default()
        };
        let t = call(&via, "/etcdserverpb.KV/Txn", txn).await;
        assert!(t.ends_with(UNKNOWN), "{key}: Txn response lost the unknown field");
        let decoded = TxnResponse::decode(&t[..]).unwrap();
        assert_eq!(decoded.responses.len(), 2);
        let Some(etcd_squeeze::proto::etcdserverpb::response_op::Response::ResponseRange(r)) = &decoded.responses[1].response else { panic!("{key}: a Range response") };
        assert_eq!(r.kvs[0].value, logical, "{key}: value read inside the Txn decoded");

        // Watch: create on the key, write it, read the event.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(WatchCreateRequest { key: key.as_bytes().to_vec().into(), prev_kv: true, ..Default::default() })),
        };
        tx.send(Bytes::from(create.encode_to_vec())).unwrap();
        let mut grpc = tonic::client::Grpc::new(via.clone());
        grpc.ready().await.unwrap();
        let mut events = grpc
            .streaming(Request::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)), PathAndQuery::from_static("/etcdserverpb.Watch/Watch"), RawCodec)
            .await
            .unwrap()
            .into_inner();
        let created = events.message().await.unwrap().unwrap();
        assert!(created.ends_with(UNKNOWN) && WatchResponse::decode(&created[..]).unwrap().created);
        call(&via, "/etcdserverpb.KV/Put", put(key, &logical)).await;
        let event = events.message().await.unwrap().unwrap();
        assert!(event.ends_with(UNKNOWN), "{key}: watch event response lost the unknown field");
        let w = WatchResponse::decode(&event[..]).unwrap();
        assert_eq!(w.events[0].kv.as_ref().unwrap().value, logical, "{key}: event value decoded");
        assert_eq!(w.events[0].prev_kv.as_ref().unwrap().value, logical, "{key}: event prev_kv decoded");
        drop(tx);

        // DeleteRange with prev_kv.
        let d = call(&via, "/etcdserverpb.KV/DeleteRange", DeleteRangeRequest { key: key.as_bytes().to_vec().into(), prev_kv: true, ..Default::default() }).await;
        assert!(d.ends_with(UNKNOWN), "{key}: DeleteRange response lost the unknown field");
        assert_eq!(DeleteRangeResponse::decode(&d[..]).unwrap().prev_kvs[0].value, logical);
    }
}
