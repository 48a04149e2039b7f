//! The connection to the real etcd: one lazily-connecting HTTP/2 channel per endpoint, calls
//! spread round-robin over the endpoints that are up, TLS with reloading certificates, and a
//! metric for every connection made or lost. All connection code lives here.
//!
//! tonic's own balancer cannot take a custom connector, and the connector is what reloads
//! TLS files and counts connections; so [`Upstream`] balances itself: an endpoint whose
//! connection attempt fails is skipped until a connection or the readiness probe
//! (`crate::health`) succeeds again. Each channel reconnects on its own after a failure.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint};

use crate::config::UpstreamConfig;
use crate::tls::{self, Conn, Reloading, TlsError};

/// HTTP/2 stream window toward etcd: 4 MiB, so a 1.5 MiB Put or a large Range page flows
/// without waiting for WINDOW_UPDATEs.
const STREAM_WINDOW_BYTES: u32 = 4 << 20;
/// HTTP/2 connection window toward etcd: 16 MiB, room for ~4 such streams at full speed.
const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;

/// An upstream that cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// An endpoint URL that cannot be used.
    #[error("upstream.endpoints: {endpoint:?}: {reason}")]
    Endpoint {
        /// The endpoint URL as configured.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A TLS file that cannot be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// One configured etcd endpoint and whether it is believed up.
#[derive(Debug)]
pub struct EndpointState {
    /// The URL as configured (the `endpoint` label of the upstream metrics).
    pub url: String,
    up: AtomicBool,
}

impl EndpointState {
    /// True unless the last connection attempt or readiness probe failed.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Records the outcome of a probe or a connection attempt.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
        crate::metrics::get().upstream_up.with_label_values(&[&self.url]).set(up as i64);
    }
}

/// The channel to etcd: a tower service for tonic's generated clients
/// (`KvClient<Upstream>`), cheap to clone.
pub struct Upstream {
    endpoints: Arc<[Arc<EndpointState>]>,
    channels: Arc<[Channel]>,
    next: Arc<AtomicUsize>,
    /// The channel chosen (and polled ready) by `poll_ready`, used by the following `call`.
    picked: Option<Channel>,
}

impl Clone for Upstream {
    fn clone(&self) -> Self {
        // A clone has not been polled ready: it picks its own endpoint.
        Upstream { endpoints: self.endpoints.clone(), channels: self.channels.clone(), next: self.next.clone(), picked: None }
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("endpoints", &self.endpoints).finish()
    }
}

impl Upstream {
    /// Builds the lazily-connecting channels (connections are made on first use and re-made
    /// after failures) and loads the TLS files.
    ///
    /// Errors: an endpoint that is not a valid URL, a TLS file that cannot be loaded.
    pub fn new(config: &UpstreamConfig) -> Result<Upstream, UpstreamError> {
        let tls = client_tls(config)?.map(Arc::new);
        let mut endpoints = Vec::new();
        let mut channels = Vec::new();
        for url in &config.endpoints {
            let bad = |reason: String| UpstreamError::Endpoint { endpoint: url.clone(), reason };
            let uri: http::Uri = url.parse().map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?;
            let host = uri.host().ok_or_else(|| bad("no host".into()))?.trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().ok_or_else(|| bad("no port".into()))?;
            let https = uri.scheme_str() == Some("https");
            let state = Arc::new(EndpointState { url: url.clone(), up: AtomicBool::new(true) });
            let tls = match (https, &tls) {
                (true, Some(tls)) => {
                    let name = config.tls_server_name.clone().unwrap_or_else(|| host.clone());
                    let name = ServerName::try_from(name).map_err(|e| bad(format!("TLS server name: {e}")))?;
                    Some((tls.clone(), name))
                }
                (true, None) => return Err(bad("https needs upstream.tls_ca_file".into())),
                (false, _) => None,
            };
            let connector = Connector { state: state.clone(), host, port, timeout: config.connect_timeout, tls };
            // tonic sees a plain http:// URI (the connector does TLS itself, so tonic must not);
            // the origin keeps the configured scheme and authority on the wire.
            let endpoint = Endpoint::from_shared(format!("http://{}", uri.authority().expect("has host and port")))
                .map_err(|e| bad(e.to_string()))?
                .origin(uri.clone())
                .http2_keep_alive_interval(config.keepalive_interval)
                .keep_alive_timeout(config.keepalive_timeout)
                .keep_alive_while_idle(false)
                .initial_stream_window_size(STREAM_WINDOW_BYTES)
                .initial_connection_window_size(CONNECTION_WINDOW_BYTES);
            crate::metrics::get().upstream_up.with_label_values(&[url]).set(1);
            crate::metrics::get().upstream_connections_open.with_label_values(&[url]).add(0);
            channels.push(endpoint.connect_with_connector_lazy(connector));
            endpoints.push(state);
        }
        Ok(Upstream { endpoints: endpoints.into(), channels: channels.into(), next: Arc::new(AtomicUsize::new(0)), picked: None })
    }

    /// Every endpoint with its own channel (for probing each one).
    pub fn endpoints(&self) -> impl Iterator<Item = (&Arc<EndpointState>, &Channel)> {
        self.endpoints.iter().zip(self.channels.iter())
    }

    /// The next endpoint, round-robin, among those that are up (any, if none is).
    fn pick(&self) -> usize {
        let n = self.channels.len();
        if n == 1 {
            return 0;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n).map(|k| (start + k) % n).find(|&i| self.endpoints[i].is_up()).unwrap_or(start % n)
    }
}

impl tower::Service<http::Request<Body>> for Upstream {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future = <Channel as tower::Service<http::Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.picked.is_none() {
            self.picked = Some(self.channels[self.pick()].clone());
        }
        self.picked.as_mut().expect("set above").poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // `call` follows a ready `poll_ready` (tower's contract), whose channel it must use.
        let mut channel = self.picked.take().unwrap_or_else(|| self.channels[self.pick()].clone());
        channel.call(request)
    }
}

/// The client TLS config toward `https://` endpoints (one for all of them), when configured:
/// `upstream.tls_ca_file` roots, the optional client certificate, ALPN `h2`.
fn client_tls(config: &UpstreamConfig) -> Result<Option<Reloading<rustls::ClientConfig>>, TlsError> {
    let Some(ca) = config.tls_ca_file.clone() else {
        return Ok(None);
    };
    let identity = config.tls_cert_file.clone().zip(config.tls_key_file.clone());
    let mut files = vec![ca.clone()];
    files.extend(identity.iter().flat_map(|(c, k)| [c.clone(), k.clone()]));
    let build = move || {
        let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError { key: "upstream.tls_ca_file", path: ca.clone(), reason: e.to_string() })?
            .with_root_certificates(tls::load_roots("upstream.tls_ca_file", &ca)?);
        let mut config = match &identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(tls::load_certs("upstream.tls_cert_file", cert)?, tls::load_key("upstream.tls_key_file", key)?)
                .map_err(|e| TlsError {
                    key: "upstream.tls_key_file",
                    path: key.clone(),
                    reason: format!("does not match upstream.tls_cert_file: {e}"),
                })?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
        Ok(config)
    };
    Reloading::new("upstream", files, build).map(Some)
}

/// Makes one connection to one endpoint: DNS, TCP (each resolved address in turn), TLS for
/// `https://`, all within `upstream.connect_timeout`. Counts attempts and open connections.
#[derive(Clone)]
struct Connector {
    state: Arc<EndpointState>,
    host: String,
    port: u16,
    timeout: Duration,
    tls: Option<(Arc<Reloading<rustls::ClientConfig>>, ServerName<'static>)>,
}

type UpstreamConn = Conn<tokio_rustls::client::TlsStream<TcpStream>, OpenConnection>;

impl Connector {
    async fn connect(&self) -> io::Result<UpstreamConn> {
        let mut last_error = io::Error::new(io::ErrorKind::NotFound, format!("{} resolves to no address", self.host));
        let mut tcp = None;
        for addr in tokio::net::lookup_host((self.host.as_str(), self.port)).await? {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last_error = e,
            }
        }
        let tcp = tcp.ok_or(last_error)?;
        tcp.set_nodelay(true)?;
        Ok(match &self.tls {
            None => Conn::plain(tcp, OpenConnection::new(self.state.clone())),
            Some((config, name)) => {
                let connector = tokio_rustls::TlsConnector::from(config.current());
                let tls = connector.connect(name.clone(), tcp).await?;
                Conn::tls(tls, OpenConnection::new(self.state.clone()))
            }
        })
    }
}

impl tower::Service<http::Uri> for Connector {
    type Response = TokioIo<UpstreamConn>;
    type Error = io::Error;
    type Future = BoxFuture<'static, io::Result<TokioIo<UpstreamConn>>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let metrics = crate::metrics::get();
            let url = this.state.url.as_str();
            let result = match tokio::time::timeout(this.timeout, this.connect()).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("no connection after {:?}", this.timeout))),
            };
            match result {
                Ok(stream) => {
                    metrics.upstream_connects.with_label_values(&[url, "ok"]).inc();
                    this.state.set_up(true);
                    tracing::debug!(endpoint = url, "connected to etcd");
                    Ok(TokioIo::new(stream))
                }
                Err(e) => {
                    metrics.upstream_connects.with_label_values(&[url, "error"]).inc();
                    this.state.set_up(false);
                    tracing::warn!(endpoint = url, error = %e, "cannot connect to etcd");
                    Err(e)
                }
            }
        })
    }
}

/// Counts a connection in `etcd_squeeze_upstream_connections_open` while it is open.
struct OpenConnection(Arc<EndpointState>);

impl OpenConnection {
    fn new(state: Arc<EndpointState>) -> Self {
        crate::metrics::get().upstream_connections_open.with_label_values(&[&state.url]).inc();
        OpenConnection(state)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        crate::metrics::get().upstream_connections_open.with_label_values(&[&self.0.url]).dec();
        tracing::debug!(endpoint = %self.0.url, "connection to etcd closed");
    }
}
