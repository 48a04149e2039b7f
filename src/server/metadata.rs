//! The client's metadata on its way to etcd, and the request streams of forwarded bidi calls.

use tonic::metadata::MetadataMap;
use tonic::Request;

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
