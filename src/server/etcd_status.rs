//! Statuses tonic itself produces, answered the way etcd (grpc-go) answers them.
//!
//! - The client's deadline (`grpc-timeout`): tonic's server enforces it but answers CANCELLED
//!   "Timeout expired"; etcd answers DEADLINE_EXCEEDED "context deadline exceeded". This layer
//!   sits inside tonic's timer and fires [`DEADLINE_MARGIN`] earlier, so a client whose deadline
//!   passes while etcd stalls gets etcd's status. Dropping the inner future cancels the upstream call.
//! - A request over `limits.max_request_bytes`: tonic answers OUT_OF_RANGE "Error, decoded message
//!   length too large: found N bytes, the limit is: M bytes"; etcd answers RESOURCE_EXHAUSTED
//!   "grpc: received message larger than max (N vs. M)". OUT_OF_RANGE is also etcd's code for
//!   "compacted", so the status is rewritten wherever tonic puts it (headers or trailers).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;

/// How much earlier than tonic's own `grpc-timeout` timer this layer answers: both timers start
/// in the same call chain, so a few milliseconds always win the race.
pub const DEADLINE_MARGIN: Duration = Duration::from_millis(5);

/// Parses a `grpc-timeout` header value (`<up to 8 digits><H|M|S|m|u|n>`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

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
    // Only OUT_OF_RANGE (11) is ever rewritten: skip parsing every other status.
    if headers.get("grpc-status").is_none_or(|v| v.as_bytes() != b"11") {
        return;
    }
    let Some(status) = tonic::Status::from_header_map(headers) else { return };
    if status.code() != tonic::Code::OutOfRange {
        return;
    }
    if let Some(message) = etcd_message(status.message()) {
        // Replaces grpc-status and grpc-message (percent-encoded as gRPC requires).
        let _ = tonic::Status::resource_exhausted(message).add_header(headers);
    }
}

/// A tower layer answering DEADLINE_EXCEEDED when the client's `grpc-timeout` expires, and
/// etcd's RESOURCE_EXHAUSTED for a request over the size limit.
#[derive(Clone, Copy, Debug, Default)]
pub struct EtcdStatusLayer;

impl<S> tower::Layer<S> for EtcdStatusLayer {
    type Service = EtcdStatus<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EtcdStatus { inner }
    }
}

/// The service made by [`EtcdStatusLayer`].
#[derive(Clone, Debug)]
pub struct EtcdStatus<S> {
    inner: S,
}

impl<S> tower::Service<http::Request<Body>> for EtcdStatus<S>
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
        let timeout = req.headers().get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let response = match timeout {
                None => fut.await?,
                Some(t) => match tokio::time::timeout(t.saturating_sub(DEADLINE_MARGIN), fut).await {
                    Ok(r) => r?,
                    Err(_) => return Ok(tonic::Status::deadline_exceeded("context deadline exceeded").into_http()),
                },
            };
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
    fn grpc_timeout_values() {
        assert_eq!(parse_grpc_timeout("1S"), Some(Duration::from_secs(1)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "1", "1x", "123456789S", "-1S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    /// A call that outlives its `grpc-timeout` gets etcd's DEADLINE_EXCEEDED, in time.
    #[tokio::test]
    async fn expired_deadline_is_deadline_exceeded() {
        use tower::{Layer, Service};
        let stalled = tower::service_fn(|_req: http::Request<Body>| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::empty()))
        });
        let mut svc = EtcdStatusLayer.layer(stalled);
        let req = http::Request::builder().header("grpc-timeout", "100m").body(Body::empty()).unwrap();
        let started = std::time::Instant::now();
        let resp = svc.call(req).await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(100));
        let status = tonic::Status::from_header_map(resp.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(status.message(), "context deadline exceeded");
    }

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
