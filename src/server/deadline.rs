//! The client's deadline (`grpc-timeout`) answered the way etcd answers it.
//!
//! tonic's server enforces `grpc-timeout` itself, but answers CANCELLED "Timeout expired";
//! etcd (grpc-go) answers DEADLINE_EXCEEDED "context deadline exceeded". This layer sits inside
//! tonic's timer and fires [`DEADLINE_MARGIN`] earlier, so a client whose deadline passes while
//! etcd stalls gets etcd's status. Dropping the inner future cancels the upstream call.

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

/// A tower layer answering DEADLINE_EXCEEDED when the client's `grpc-timeout` expires.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeadlineLayer;

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline { inner }
    }
}

/// The service made by [`DeadlineLayer`].
#[derive(Clone, Debug)]
pub struct Deadline<S> {
    inner: S,
}

impl<S> tower::Service<http::Request<Body>> for Deadline<S>
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
        match timeout {
            None => Box::pin(fut),
            Some(t) => Box::pin(async move {
                match tokio::time::timeout(t.saturating_sub(DEADLINE_MARGIN), fut).await {
                    Ok(r) => r,
                    Err(_) => Ok(tonic::Status::deadline_exceeded("context deadline exceeded").into_http()),
                }
            }),
        }
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
        let mut svc = DeadlineLayer.layer(stalled);
        let req = http::Request::builder().header("grpc-timeout", "100m").body(Body::empty()).unwrap();
        let started = std::time::Instant::now();
        let resp = svc.call(req).await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(100));
        let status = tonic::Status::from_header_map(resp.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(status.message(), "context deadline exceeded");
    }
}
