//! A request over `limits.max_request_bytes`, answered the way etcd answers one over its gRPC limit.
//!
//! tonic refuses such a message with OUT_OF_RANGE "Error, decoded message length too large:
//! found N bytes, the limit is: M bytes"; etcd (grpc-go) with RESOURCE_EXHAUSTED "grpc: received
//! message larger than max (N vs. M)". OUT_OF_RANGE is also etcd's code for "compacted", so a
//! client matching on codes could mistake one for the other; this layer rewrites that one status,
//! wherever tonic puts it: response headers (trailers-only) or trailers.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::body::Body;

/// The grpc-go message for a received message over the limit, from tonic's message; `None` when
/// `message` is not tonic's "decoded message length too large".
pub fn etcd_message(message: &str) -> Option<String> {
    let rest = message.strip_prefix("Error, decoded message length too large: found ")?;
    let (found, rest) = rest.split_once(" bytes, the limit is: ")?;
    let limit = rest.strip_suffix(" bytes")?;
    let (found, limit): (u64, u64) = (found.parse().ok()?, limit.parse().ok()?);
    Some(format!("grpc: received message larger than max ({found} vs. {limit})"))
}

/// Rewrites tonic's OUT_OF_RANGE "decoded message length too large" in `headers` (response
/// headers or trailers) to etcd's RESOURCE_EXHAUSTED; any other status is left as it is.
fn rewrite_status(headers: &mut http::HeaderMap) {
    let Some(status) = tonic::Status::from_header_map(headers) else { return };
    if status.code() != tonic::Code::OutOfRange {
        return;
    }
    if let Some(message) = etcd_message(status.message()) {
        // Replaces grpc-status and grpc-message (percent-encoded as gRPC requires).
        let _ = tonic::Status::resource_exhausted(message).add_header(headers);
    }
}

/// A tower layer mapping tonic's "message too large" status to etcd's.
#[derive(Clone, Copy, Debug, Default)]
pub struct OversizeLayer;

impl<S> tower::Layer<S> for OversizeLayer {
    type Service = Oversize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Oversize { inner }
    }
}

/// The service made by [`OversizeLayer`].
#[derive(Clone, Debug)]
pub struct Oversize<S> {
    inner: S,
}

impl<S> tower::Service<http::Request<Body>> for Oversize<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let response = fut.await?;
            let (mut parts, body) = response.into_parts();
            rewrite_status(&mut parts.headers);
            let body = http_body_util::BodyExt::map_frame(body, |frame| match frame.into_trailers() {
                Ok(mut trailers) => {
                    rewrite_status(&mut trailers);
                    http_body::Frame::trailers(trailers)
                }
                Err(frame) => frame,
            });
            Ok(http::Response::from_parts(parts, Body::new(body)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_only_tonics_too_large_message() {
        assert_eq!(
            etcd_message("Error, decoded message length too large: found 41943058 bytes, the limit is: 33554432 bytes").as_deref(),
            Some("grpc: received message larger than max (41943058 vs. 33554432)")
        );
        assert_eq!(etcd_message("etcdserver: mvcc: required revision has been compacted"), None);
        assert_eq!(etcd_message("Error, decoded message length too large: found x bytes, the limit is: 1 bytes"), None);
    }
}
