//! Health: the readiness probe toward etcd, and the plain-HTTP listener on `metrics.listen`
//! serving `/metrics`, `/healthz` and `/readyz`.
//!
//! Every `health.probe_interval`, each etcd endpoint gets a count-only Range of the dictionary
//! store (`dictionaries.key_prefix`; an empty store is ready): one linearizable read proves both that etcd answers (it
//! has a leader) and that the dictionaries can be read. The proxy is ready while at least one
//! endpoint passes. The result drives `/readyz`, `etcd_squeeze_ready`,
//! `etcd_squeeze_upstream_up{endpoint}`, the round-robin in `crate::upstream`, and the gRPC
//! health service (`grpc.health.v1.Health`, service `""`: SERVING / NOT_SERVING).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::config::HealthConfig;
use crate::proto::etcdserverpb::kv_client::KvClient;
use crate::proto::etcdserverpb::RangeRequest;
use crate::upstream::Upstream;

/// The proxy's readiness, shared by the prober, the HTTP handlers and the gRPC health service.
pub struct Readiness {
    upstream: Upstream,
    reporter: HealthReporter,
    config: HealthConfig,
    /// `dictionaries.key_prefix`: the store the probe reads.
    store_prefix: Bytes,
    ready: AtomicBool,
    /// Set by the first probe (whose result is always logged).
    probed: AtomicBool,
    stopping: AtomicBool,
    /// Why the proxy is not ready (empty when it is).
    reason: Mutex<String>,
}

impl Readiness {
    /// Not ready until the first probe succeeds. `store_prefix` is the configured `dictionaries.key_prefix` (the probe reads it).
    pub fn new(upstream: Upstream, reporter: HealthReporter, config: HealthConfig, store_prefix: &str) -> Arc<Self> {
        Arc::new(Readiness {
            upstream,
            reporter,
            config,
            store_prefix: Bytes::copy_from_slice(store_prefix.as_bytes()),
            ready: AtomicBool::new(false),
            probed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            reason: Mutex::new("not probed yet".into()),
        })
    }

    /// True while at least one endpoint passed its last probe and the proxy is not stopping.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.stopping.load(Ordering::Relaxed)
    }

    /// Probes every endpoint once (concurrently, each bounded by `health.probe_timeout`) and
    /// publishes the result.
    pub async fn probe(&self) {
        let timeout = self.config.probe_timeout;
        let results = futures::future::join_all(self.upstream.endpoints().map(|(state, channel)| {
            let mut client = KvClient::new(channel.clone());
            async move {
                let request = RangeRequest {
                    key: self.store_prefix.clone(),
                    range_end: Bytes::from(crate::codec::prefix_end(&self.store_prefix).unwrap_or_else(|| vec![0])),
                    count_only: true,
                    ..Default::default()
                };
                let mut request = tonic::Request::new(request);
                if let Some(token) = self.upstream.own_token().and_then(|t| tonic::metadata::AsciiMetadataValue::try_from(t.as_bytes()).ok()) {
                    request.metadata_mut().insert("token", token);
                }
                let start = Instant::now();
                let result = match tokio::time::timeout(timeout, client.range(request)).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(status)) => Err(format!("{}: {:?}: {}", state.url, status.code(), status.message())),
                    Err(_) => Err(format!("{}: no answer within {timeout:?}", state.url)),
                };
                crate::metrics::get()
                    .upstream_probe_duration
                    .with_label_values(&[&state.url])
                    .observe(start.elapsed().as_secs_f64());
                state.set_up(result.is_ok());
                result
            }
        }))
        .await;
        let ready = results.iter().any(Result::is_ok);
        let reason = if ready {
            String::new()
        } else {
            let errors: Vec<_> = results.into_iter().filter_map(Result::err).collect();
            format!("etcd is unreachable or cannot read {}: {}", String::from_utf8_lossy(&self.store_prefix), errors.join("; "))
        };
        let was = self.ready.swap(ready, Ordering::Relaxed);
        let first = !self.probed.swap(true, Ordering::Relaxed);
        if first || was != ready {
            if ready {
                tracing::info!("ready: etcd answers");
            } else {
                tracing::warn!(%reason, "not ready");
            }
        }
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = reason;
        self.publish().await;
    }

    /// Marks the proxy as stopping: not ready from now on.
    pub async fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = "shutting down".into();
        self.publish().await;
    }

    async fn publish(&self) {
        let ready = self.is_ready();
        crate::metrics::get().ready.set(ready as i64);
        let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
        self.reporter.set_service_status("", status).await;
    }

    /// Probes every `health.probe_interval` until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.config.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate: start() has just probed
        loop {
            tokio::select! {
                _ = tick.tick() => self.probe().await,
                _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
            }
        }
    }

    /// Why the proxy is not ready (empty when it is).
    pub fn reason(&self) -> String {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, readiness: Arc<Readiness>, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    use axum::routing::get;
    let ready = readiness.clone();
    let router = axum::Router::new()
        .route(
            "/metrics",
            get(|| async {
                ([(axum::http::header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], crate::metrics::get().encode_text())
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || async move {
                if ready.is_ready() {
                    (StatusCode::OK, "ok\n".to_string()).into_response()
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", ready.reason())).into_response()
                }
            }),
        );
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}
