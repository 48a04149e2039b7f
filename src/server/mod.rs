//! The client port: etcd's gRPC API (and its HTTP/1.1 endpoints) on one listener.
//!
//! listener (`listener`: TCP, TLS, HTTP/2 or not) → `relay` (one task per HTTP/2 connection,
//! frames carried to etcd; each new stream routed once by `front::road` and `crate::classify`)
//! → either etcd, unchanged (no compressed key involved), or the gRPC services, one file per
//! etcd service (`kv`, `watch`, `raw`, gRPC health) → value rewrite (`values`, `rebuild`,
//! `crate::rewrite`) → upstream etcd (`crate::upstream`). HTTP/1.1: `front` → `etcd_http`.

pub mod etcd_http;
pub mod etcd_status;
pub mod front;
pub mod kv;
pub mod listener;
pub mod metadata;
pub mod methods;
pub mod observe;
pub mod raw;
pub mod rebuild;
pub mod relay;
pub mod reserved;
pub mod shared;
pub mod status;
pub mod values;
pub mod watch;

pub use metadata::{forward, requests_until_dropped, upstream_metadata, with_metadata, EndRequests};
pub use methods::{method_info, MethodInfo};
pub use shared::Shared;
pub use status::{decode_status, encode_status, keep_stored, ETCD_REQUEST_TOO_LARGE};

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::Config;
use crate::upstream::Upstream;

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listen address cannot be bound.
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        /// The config key: `server.listen` or `metrics.listen`.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// An upstream endpoint or its TLS files cannot be used.
    #[error(transparent)]
    Upstream(#[from] crate::upstream::UpstreamError),
    /// The listener's TLS files cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The metrics listener failed.
    #[error("metrics.listen: {0}")]
    Metrics(std::io::Error),
}

/// A started proxy: its bound addresses and the future that serves until shutdown.
pub struct Running {
    /// The gRPC listener's address (useful with port 0).
    pub addr: SocketAddr,
    /// The `/metrics`, `/healthz`, `/readyz` listener's address.
    pub metrics_addr: SocketAddr,
    /// Serves until the shutdown signal, then drains (see [`start`]) and resolves.
    pub serve: Pin<Box<dyn Future<Output = Result<(), ServeError>> + Send>>,
    /// This replica's view of the replicas sharing etcd (`delta = "auto"`).
    pub members: Arc<crate::members::Members>,
}

/// How long [`start`] waits for this replica's first announcement when etcd answers.
const ANNOUNCE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A proxy serving in the background of the current tokio runtime (tests, benchmarks, the demo):
/// its addresses, and a handle whose drop shuts it down.
pub struct Background {
    /// The gRPC listener's address.
    pub addr: SocketAddr,
    /// The `/metrics`, `/healthz`, `/readyz` listener's address.
    pub metrics_addr: SocketAddr,
    /// Dropping it (or sending) starts the graceful shutdown of [`start`].
    pub stop: tokio::sync::oneshot::Sender<()>,
    /// This replica's view of the replicas sharing etcd (`delta = "auto"`).
    pub members: Arc<crate::members::Members>,
}

/// [`start`], spawned on the current runtime; shuts down when the returned handle is dropped.
pub async fn spawn(config: Config) -> Result<Background, ServeError> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = start(config, async move {
        let _ = stopped.await;
    })
    .await?;
    tokio::spawn(running.serve);
    Ok(Background { addr: running.addr, metrics_addr: running.metrics_addr, stop, members: running.members })
}

/// Binds `server.listen` and `metrics.listen`, loads the TLS files, probes etcd once, and
/// returns the addresses and a future that serves until `shutdown` resolves.
///
/// Shutdown: the listener closes at once; the gRPC health service turns NOT_SERVING and
/// `/readyz` fails; long-lived streams (Watch, LeaseKeepAlive, …) end with UNAVAILABLE so
/// clients re-open them elsewhere; unary calls in flight may finish for
/// `server.shutdown_grace`, after which whatever is left is cut. Then the future resolves `Ok`.
pub async fn start(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<Running, ServeError> {
    let bind = |key, addr| async move {
        let l = TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { key, addr, source })?;
        let local = l.local_addr().map_err(|source| ServeError::Bind { key, addr, source })?;
        Ok::<_, ServeError>((l, local))
    };
    let (listener, local) = bind("server.listen", config.server.listen).await?;
    let (metrics_listener, metrics_addr) = bind("metrics.listen", config.metrics.listen).await?;
    let server_tls = crate::tls::server_config(&config.server)?.map(Arc::new);
    let upstream = Upstream::new(&config.upstream)?;
    // The proxy's own token (upstream.user) before anything of its own reads etcd.
    if let Err(e) = upstream.authenticate().await {
        tracing::warn!(error = %e, "cannot authenticate upstream.user with etcd: retrying in the background");
    }
    let token_refresh = upstream.spawn_token_refresh();
    let shared = Shared::new(config, upstream.clone());
    // Dictionary store follower and trainer: they run while the server serves.
    let dictionary_tasks = shared.dictionaries.spawn();
    // The replica announcement (delta = "auto", base collection): revoked at shutdown.
    let (members_stop, members_stop_rx) = tokio::sync::watch::channel(false);
    let members = shared.deltas.members().clone();
    let (members_task, sweep_task) = if shared.config.announce {
        // The orphan sweep (one replica at a time) needs the horizon the announcements give.
        let sweep = shared.deltas.enabled().then(|| {
            let prefixes = shared.deltas.base_prefixes();
            tokio::spawn(crate::delta::sweep::run(upstream.own(), members.id().to_string(), prefixes, members.clone(), shared.config.sweep_interval, members_stop_rx.clone()))
        });
        (members.spawn(upstream.own(), members_stop_rx), sweep)
    } else {
        (tokio::spawn(async {}), None)
    };
    let metrics = crate::metrics::get();
    metrics.init_prefixes(shared.config.prefixes.iter().map(|p| p.prefix.as_str()));

    if server_tls.is_none() && !local.ip().is_loopback() {
        tracing::warn!(listen = %local, "serving plain text beyond loopback (server.allow_non_loopback): \
            anyone who can reach this address can read and write etcd; prefer server.tls_cert_file and server.tls_client_ca_file");
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let readiness = crate::health::Readiness::new(upstream.own(), health_reporter, shared.config.health.clone(), &shared.config.dictionaries.key_prefix);
    readiness.probe().await;
    tokio::spawn(readiness.clone().run(stop_rx.clone()));
    // A replica whose watches decode delta frames is announced before it serves: a watch opened
    // by an unannounced replica could start below a compaction the others collect up to.
    if shared.config.announce && shared.deltas.enabled() && readiness.is_ready() && !members.wait_announced(ANNOUNCE_WAIT).await {
        tracing::warn!(wait = ?ANNOUNCE_WAIT, "serving before this replica is announced under /etcd-squeeze/members/ (see the warnings above): \
            delta = \"auto\" writes per-object frames until it is");
    }

    // Each service applies limits.max_request_bytes to the requests it decodes.
    let routes = tonic::service::Routes::new(kv::KvService::new(shared.clone(), upstream.clone()))
        .add_service(watch::WatchService::new(shared.clone(), upstream.clone()))
        .add_service(raw::RawService::<raw::LeaseSpec>::new(shared.clone(), upstream.clone()))
        .add_service(raw::RawService::<raw::ClusterSpec>::new(shared.clone(), upstream.clone()))
        .add_service(raw::RawService::<raw::MaintenanceSpec>::new(shared.clone(), upstream.clone()))
        .add_service(raw::RawService::<raw::AuthSpec>::new(shared.clone(), upstream.clone()))
        .add_service(raw::RawService::<raw::LockSpec>::new(shared.clone(), upstream.clone()))
        .add_service(raw::RawService::<raw::ElectionSpec>::new(shared.clone(), upstream.clone()))
        .add_service(health_service)
        .prepare();
    let grpc = tower::ServiceBuilder::new()
        .layer(observe::GrpcLayer::new(stop_rx.clone()))
        .layer(etcd_status::EtcdStatusLayer)
        .service(front::Dispatch::new(shared.clone(), upstream.clone(), routes));
    let grpc = tower::util::BoxCloneSyncService::new(grpc);
    let http = Arc::new(etcd_http::EtcdHttp::new(upstream.clone(), readiness.clone()));
    let front = front::Front::new(http.clone());
    let relays = Arc::new(relay::RelayContext {
        shared: shared.clone(),
        upstream: upstream.clone(),
        services: relay::terminated::Services { grpc, http },
        stop: stop_rx.clone(),
    });
    // HTTP/1.1 only: HTTP/2 connections go to the relay. hyper enforces its header read
    // timeout (30 s) only with a timer.
    let mut connections = hyper::server::conn::http1::Builder::new();
    connections.timer(hyper_util::rt::TokioTimer::new());
    tracing::info!(listen = %local, tls = server_tls.is_some(), metrics = %metrics_addr, upstream = ?shared.config.upstream.endpoints,
        prefixes = ?shared.config.prefixes.iter().map(|p| p.prefix.as_str()).collect::<Vec<_>>(), "etcd-squeeze serving");

    let incoming = listener::incoming(listener, server_tls, shared.config.server.tls_handshake_timeout);
    let grace = shared.config.server.shutdown_grace;
    let admin_stop = stop_rx.clone();
    let mut resign_on = stop_rx.clone();
    let serve = async move {
        // At shutdown a leading dictionary trainer resigns at once, while the calls drain.
        let resign = tokio::spawn(async move {
            let _ = resign_on.wait_for(|s| *s).await;
            let _ = members_stop.send(true);
            dictionary_tasks.stop().await;
            let _ = members_task.await;
            if let Some(sweep) = sweep_task {
                let _ = sweep.await;
            }
        });
        let (admin_done_tx, admin_done_rx) = tokio::sync::oneshot::channel::<()>();
        let admin = tokio::spawn(crate::health::serve(metrics_listener, readiness.clone(), async move {
            let _ = admin_done_rx.await;
        }));
        let signal = async move {
            shutdown.await;
            tracing::info!(in_flight = metrics.grpc_inflight_requests.get(), grace = ?grace,
                "shutting down: listener closed, long-lived streams end with UNAVAILABLE, unary calls may finish");
            readiness.stop().await;
            let _ = stop_tx.send(true);
        };
        let grpc = serve_connections(incoming, connections, front, relays, signal);
        let mut stopping = admin_stop;
        let deadline = async move {
            let _ = stopping.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        };
        let result = tokio::select! {
            r = grpc => r,
            _ = deadline => {
                tracing::warn!(cut = metrics.grpc_inflight_requests.get(), "server.shutdown_grace expired: cutting the calls still in flight");
                Ok(())
            }
        };
        let _ = admin_done_tx.send(());
        if let Some(refresh) = token_refresh {
            refresh.abort();
        }
        let abort_resign = resign.abort_handle();
        if tokio::time::timeout(std::time::Duration::from_secs(3), resign).await.is_err() {
            abort_resign.abort();
        }
        match admin.await {
            Ok(Err(e)) if result.is_ok() => return Err(ServeError::Metrics(e)),
            _ => {}
        }
        tracing::info!("stopped");
        result
    };
    Ok(Running { addr: local, metrics_addr, serve: Box::pin(serve), members })
}

/// Serves each accepted connection until `signal`: HTTP/2 (the connection preface, or ALPN
/// `h2`) by the relay, HTTP/1.1 by `front`. Then closes the listener at once (the accept
/// stream is dropped), asks every connection to finish (HTTP/2 GOAWAY, HTTP/1.1
/// `Connection: close`) and waits for them.
async fn serve_connections(
    incoming: impl futures::Stream<Item = Result<listener::ClientConn, std::io::Error>>,
    connections: hyper::server::conn::http1::Builder,
    front: front::Front,
    relays: Arc<relay::RelayContext>,
    signal: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    use futures::StreamExt;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // Relays, and connections being sniffed; HTTP/1.1 connections come back to be served here.
    let mut relayed = tokio::task::JoinSet::new();
    let (http1_tx, mut http1_rx) = tokio::sync::mpsc::unbounded_channel::<listener::Sniffed>();
    {
        let mut incoming = std::pin::pin!(incoming);
        let mut signal = std::pin::pin!(signal);
        loop {
            let conn = tokio::select! {
                _ = &mut signal => break,
                Some(_) = relayed.join_next(), if !relayed.is_empty() => continue,
                Some(http1) = http1_rx.recv() => {
                    let served = connections.serve_connection(hyper_util::rt::TokioIo::new(http1), front.clone());
                    let served = graceful.watch(served);
                    tokio::spawn(async move {
                        if let Err(e) = served.await {
                            tracing::debug!(error = %crate::upstream::describe(&e), "client connection ended with an error");
                        }
                    });
                    continue;
                }
                conn = incoming.next() => match conn {
                    Some(Ok(conn)) => conn,
                    Some(Err(_)) => continue,
                    None => break,
                },
            };
            let (relays, http1_tx) = (relays.clone(), http1_tx.clone());
            // A client that sends nothing is not waited for longer than a TLS handshake.
            let first_bytes = relays.shared.config.server.tls_handshake_timeout;
            relayed.spawn(async move {
                match tokio::time::timeout(first_bytes, listener::sniff_http2(conn)).await {
                    Ok(Ok((conn, true))) => relay::serve(Box::new(conn), relays).await,
                    Ok(Ok((conn, false))) => {
                        let _ = http1_tx.send(conn);
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "client connection ended before its first request"),
                    Err(_) => tracing::debug!(timeout = ?first_bytes, "client connection sent no request in time: closed"),
                }
            });
        }
    }
    // HTTP/1.1 connections are asked to close; relays end themselves (GOAWAY, then their streams).
    tokio::join!(graceful.shutdown(), async move { while relayed.join_next().await.is_some() {} });
    Ok(())
}

/// Loads what `--check-config` can check beyond [`Config::validate`]: the TLS files of both sides.
pub fn check(config: &Config) -> Result<(), ServeError> {
    crate::tls::server_config(&config.server)?;
    Upstream::new(&config.upstream)?;
    Ok(())
}

