//! etcd's HTTP/1.1 endpoints on the client port, answered by etcd itself.
//!
//! etcd serves HTTP/1.1 beside gRPC on its client URL, and tools rely on it: kubeadm's
//! external-etcd preflight reads `GET /version`, Prometheus scrapes `/metrics`, operators
//! `curl /health`. Through the proxy these paths reach etcd's client URL and etcd's answer comes
//! back as it is (status, headers, body), so `/version` and `/metrics` are etcd's own.
//! `/health` is etcd's answer while the proxy is ready, and `503 {"health":"false",…}` (etcd's
//! shape) when it is not. Every other path is `404 page not found`, as etcd answers: etcd's JSON
//! gateway (`/v3/…`) would bypass the value codec, so it is never forwarded.
//! The proxy's own metrics stay on `metrics.listen`.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use tonic::body::Body;

use crate::health::Readiness;
use crate::upstream::Upstream;

/// The paths forwarded to etcd's client URL (with their query).
pub const FORWARDED_PATHS: &[&str] = &["/version", "/health", "/readyz", "/livez", "/metrics"];

/// Answers HTTP/1.1 requests on the client port.
pub struct EtcdHttp {
    upstream: Upstream,
    readiness: Arc<Readiness>,
}

impl EtcdHttp {
    /// Forwards [`FORWARDED_PATHS`] to `upstream`; `/health` also needs `readiness`.
    pub fn new(upstream: Upstream, readiness: Arc<Readiness>) -> Self {
        EtcdHttp { upstream, readiness }
    }

    /// The answer to one request: etcd's for [`FORWARDED_PATHS`]; `503` when etcd cannot be
    /// reached (or, for `/health`, the proxy is not ready); `404 page not found` otherwise.
    pub async fn serve<B>(&self, request: http::Request<B>) -> http::Response<Body>
    where
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = request.uri().path();
        if !FORWARDED_PATHS.contains(&path) {
            return text(http::StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "404 page not found\n");
        }
        if path == "/health" && !self.readiness.is_ready() {
            return unhealthy(&format!("etcd-squeeze is not ready: {}", self.readiness.reason()));
        }
        match self.upstream.http1(request).await {
            Ok(response) => response.map(|b| Body::new(b.map_err(|e| tonic::Status::unavailable(e.to_string())))),
            Err(reason) => {
                tracing::warn!(%reason, "cannot forward an HTTP/1.1 request to etcd");
                unhealthy(&format!("etcd-squeeze cannot reach etcd: {reason}"))
            }
        }
    }
}

/// etcd's unhealthy answer, `503 {"health":"false","reason":"…"}`.
fn unhealthy(reason: &str) -> http::Response<Body> {
    let body = serde_json::json!({ "health": "false", "reason": reason }).to_string();
    text(http::StatusCode::SERVICE_UNAVAILABLE, "application/json", &body)
}

fn text(status: http::StatusCode, content_type: &'static str, body: &str) -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(http_body_util::Full::new(Bytes::copy_from_slice(body.as_bytes()))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    headers.insert("x-content-type-options", http::HeaderValue::from_static("nosniff"));
    response
}
