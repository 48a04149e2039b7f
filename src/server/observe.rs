//! The tower layer around the whole gRPC router: counts, times and traces every call
//! (`etcd_squeeze_grpc_*`), and ends long-lived streams with UNAVAILABLE at shutdown.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::Frame;
use tokio::sync::watch;
use tonic::body::Body;
use tonic::Status;

use super::raw::Shape;
use crate::metrics;

/// The name grpc-go gives a status code (`OK`, `Unavailable`, …): what dashboards expect in `code`.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// The status of a gRPC response from its `grpc-status` header or trailer.
fn grpc_code(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let v = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(tonic::Code::from_i32(v))
}

/// The tower layer around the gRPC router: counts, times and traces every call, and ends
/// long-lived streams with UNAVAILABLE when `shutdown` turns true.
#[derive(Clone)]
pub struct GrpcLayer {
    shutdown: watch::Receiver<bool>,
}

impl GrpcLayer {
    /// A layer whose long-lived streams end when `shutdown` becomes true.
    pub fn new(shutdown: watch::Receiver<bool>) -> Self {
        GrpcLayer { shutdown }
    }
}

impl<S> tower::Layer<S> for GrpcLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner, shutdown: self.shutdown.clone() }
    }
}

/// The service made by [`GrpcLayer`].
#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    shutdown: watch::Receiver<bool>,
}

impl<S> tower::Service<http::Request<Body>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<ObservedBody>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The clone that was polled ready serves this call; the fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let info = super::methods::method_info(req.uri().path());
        let (method, shape, long_lived) = match info {
            Some(m) => (m.path.as_str(), m.shape, m.long_lived),
            None => ("unknown", Shape::Unary, false),
        };
        let call = Call::start(method, info, shape == Shape::Unary);
        let req = if shape == Shape::Bidi {
            req
        } else {
            let bytes = call.request_bytes.clone();
            req.map(|b| Body::new(CountedBody { inner: b, bytes }))
        };
        let shutdown = long_lived.then(|| {
            let mut rx = self.shutdown.clone();
            Box::pin(async move {
                let _ = rx.wait_for(|stop| *stop).await;
            }) as Pin<Box<dyn Future<Output = ()> + Send>>
        });
        // A debug span: at the default level it costs nothing on the pass-through road.
        let span = tracing::debug_span!("rpc", method);
        Box::pin(tracing::Instrument::instrument(
            async move {
                let response = inner.call(req).await?;
                let mut call = call;
                if let Some(code) = grpc_code(response.headers()) {
                    call.code = Some(code);
                }
                Ok(response.map(|inner| ObservedBody { inner, call: Some(call), shutdown, done: false }))
            },
            span,
        ))
    }
}

/// One call being measured; recorded exactly once, when it is dropped.
struct Call {
    method: &'static str,
    info: Option<&'static super::methods::MethodInfo>,
    unary: bool,
    start: Instant,
    code: Option<tonic::Code>,
    request_bytes: Arc<AtomicI64>,
}

impl Call {
    fn start(method: &'static str, info: Option<&'static super::methods::MethodInfo>, unary: bool) -> Self {
        metrics::get().grpc_inflight_requests.inc();
        Call { method, info, unary, start: Instant::now(), code: None, request_bytes: Arc::new(AtomicI64::new(0)) }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let m = metrics::get();
        m.grpc_inflight_requests.dec();
        m.grpc_inflight_request_bytes.sub(self.request_bytes.load(Ordering::Relaxed));
        // No status at all: the client went away (or the call was cut after the shutdown grace).
        let code = self.code.unwrap_or(tonic::Code::Cancelled);
        match self.info.map(|i| i.series()) {
            Some((ok, _)) if code == tonic::Code::Ok => ok.inc(),
            _ => m.grpc_requests.with_label_values(&[self.method, code_name(code)]).inc(),
        }
        if self.unary {
            let elapsed = self.start.elapsed().as_secs_f64();
            match self.info.map(|i| i.series()) {
                Some((_, duration)) => duration.observe(elapsed),
                None => m.grpc_request_duration.with_label_values(&[self.method]).observe(elapsed),
            }
        }
    }
}

/// A call the relay ([`super::relay`]) carries to etcd, counted and timed as [`GrpcLayer`]
/// counts the calls it serves; recorded when dropped.
pub struct RelayedCall(Call);

impl RelayedCall {
    /// A call to gRPC `path` whose headers arrived `at`.
    pub fn start(path: &str, at: Instant) -> Self {
        let info = super::methods::method_info(path);
        let (method, unary) = match info {
            Some(m) => (m.path.as_str(), m.shape == Shape::Unary),
            None => ("unknown", true),
        };
        let mut call = Call::start(method, info, unary);
        call.start = at;
        RelayedCall(call)
    }

    /// The call's status (from etcd's `grpc-status`, or the proxy's own).
    pub fn set_code(&mut self, code: tonic::Code) {
        self.0.code = Some(code);
    }

    /// Counts `n` request bytes in `etcd_squeeze_grpc_inflight_request_bytes` while the call lasts.
    pub fn count_request_bytes(&self, n: usize) {
        self.0.request_bytes.fetch_add(n as i64, Ordering::Relaxed);
        metrics::get().grpc_inflight_request_bytes.add(n as i64);
    }
}

/// A request body that adds what it delivers to `etcd_squeeze_grpc_inflight_request_bytes`
/// (the [`Call`] subtracts it when the call ends).
struct CountedBody {
    inner: Body,
    bytes: Arc<AtomicI64>,
}

impl http_body::Body for CountedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(data) = frame.as_ref().and_then(|f| f.as_ref().ok()).and_then(Frame::data_ref) {
            let n = data.len() as i64;
            self.bytes.fetch_add(n, Ordering::Relaxed);
            metrics::get().grpc_inflight_request_bytes.add(n);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that records the call's status when it ends, and, for long-lived streams,
/// ends the stream with UNAVAILABLE when the proxy shuts down.
pub struct ObservedBody {
    inner: Body,
    call: Option<Call>,
    shutdown: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    done: bool,
}

/// The status that ends Watch, LeaseKeepAlive and other long-lived streams at shutdown:
/// clientv3 treats UNAVAILABLE as transient and re-opens the stream on another endpoint.
pub fn shutdown_status() -> Status {
    Status::unavailable("etcd-squeeze: shutting down")
}

impl ObservedBody {
    fn finish(&mut self, code: Option<tonic::Code>) {
        self.done = true;
        if let Some(mut call) = self.call.take() {
            call.code = code.or(call.code);
        }
    }
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(stop) = this.shutdown.as_mut() {
            if stop.as_mut().poll(cx).is_ready() {
                // Stop between two messages: the inner body only ever yields whole messages.
                // Dropping it drops the upstream stream (etcd cancels the watch).
                this.inner = Body::empty();
                let status = shutdown_status();
                this.finish(Some(status.code()));
                let mut trailers = http::HeaderMap::new();
                if status.add_header(&mut trailers).is_err() {
                    return Poll::Ready(None);
                }
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
        }
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(code) = f.trailers_ref().and_then(grpc_code) {
                    this.finish(Some(code));
                }
            }
            Some(Err(status)) => this.finish(Some(status.code())),
            None => this.finish(None),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_grpc_go_names() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(code_name(tonic::Code::Unavailable), "Unavailable");
        assert_eq!(code_name(tonic::Code::DataLoss), "DataLoss");
    }
}
