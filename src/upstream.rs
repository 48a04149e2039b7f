//! The connection to the real etcd: one lazily-connecting HTTP/2 channel per endpoint, calls
//! spread round-robin over the endpoints that are up, TLS with reloading certificates, and a
//! metric for every connection made or lost. All connection code lives here.
//!
//! tonic's own balancer cannot take a custom connector, and the connector is what reloads
//! TLS files and counts connections; so [`Upstream`] balances itself: an endpoint whose
//! connection attempt fails is skipped until a connection or the readiness probe
//! (`crate::health`) succeeds again. Each channel reconnects on its own after a failure.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
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
    /// `upstream.password_file` cannot be read.
    #[error("upstream.password_file: {path}: {reason}")]
    Password {
        /// The file.
        path: std::path::PathBuf,
        /// Why it cannot be read.
        reason: String,
    },
}

/// The proxy's own etcd credentials (`upstream.user`, `upstream.password_file`) and the token
/// etcd gave for them.
struct Credentials {
    user: String,
    password: String,
    token: std::sync::RwLock<Option<http::HeaderValue>>,
    /// Wakes the refresh task at once: etcd refused the token (expired, auth store changed).
    refresh_now: tokio::sync::Notify,
}

impl Credentials {
    /// Asks for a new token now when `response` (to a call made with this token) says etcd
    /// refused it: UNAUTHENTICATED, or etcd's "invalid auth token" / "auth store is old" /
    /// "user name is empty".
    fn notice_refusal(&self, headers: &http::HeaderMap) {
        let code = headers.get("grpc-status").map(|v| v.as_bytes());
        let message = headers.get("grpc-message").map(|v| String::from_utf8_lossy(v.as_bytes()).to_lowercase()).unwrap_or_default();
        let refused = code == Some(b"16")
            || ["invalid%20auth%20token", "invalid auth token", "auth%20store%20is%20old", "auth store is old", "user%20name%20is%20empty", "user name is empty"]
                .iter()
                .any(|m| message.contains(m));
        if refused {
            self.refresh_now.notify_one();
        }
    }
}

/// How long etcd's `/version`, `/health` or `/metrics` may take to answer (headers).
const HTTP1_TIMEOUT: Duration = Duration::from_secs(10);

/// At most one "cannot connect to etcd" line per endpoint in this long.
const CONNECT_WARNING_EVERY: Duration = Duration::from_secs(10);

/// How often the proxy's own token is renewed (etcd's simple tokens and JWTs last 5 minutes by default).
const TOKEN_REFRESH: Duration = Duration::from_secs(60);
/// The pause before trying again after a failed authentication.
const TOKEN_RETRY: Duration = Duration::from_secs(5);

/// One configured etcd endpoint and whether it is believed up.
#[derive(Debug)]
pub struct EndpointState {
    /// The URL as configured (the `endpoint` label of the upstream metrics).
    pub url: String,
    up: AtomicBool,
    /// "cannot connect to etcd": one line per 10 s while it stays down (every call retries).
    connect_warnings: crate::throttle::Throttle,
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
    connectors: Arc<[Connector]>,
    channels: Arc<[Channel]>,
    next: Arc<AtomicUsize>,
    /// The channel chosen (and polled ready) by `poll_ready`, used by the following `call`.
    picked: Option<(usize, Channel)>,
    /// Why the channel chosen by `poll_ready` cannot take calls: the following `call` answers UNAVAILABLE.
    not_ready: Option<String>,
    credentials: Option<Arc<Credentials>>,
    /// Calls carry the proxy's own token ([`Upstream::own`]).
    own: bool,
}

impl Clone for Upstream {
    fn clone(&self) -> Self {
        // A clone has not been polled ready: it picks its own endpoint.
        Upstream {
            endpoints: self.endpoints.clone(),
            connectors: self.connectors.clone(),
            channels: self.channels.clone(),
            next: self.next.clone(),
            picked: None,
            not_ready: None,
            credentials: self.credentials.clone(),
            own: self.own,
        }
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
        let mut connectors = Vec::new();
        for url in &config.endpoints {
            let bad = |reason: String| UpstreamError::Endpoint { endpoint: url.clone(), reason };
            let uri: http::Uri = url.parse().map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?;
            let host = uri.host().ok_or_else(|| bad("no host".into()))?.trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().ok_or_else(|| bad("no port".into()))?;
            let https = uri.scheme_str() == Some("https");
            let state = Arc::new(EndpointState { url: url.clone(), up: AtomicBool::new(true), connect_warnings: crate::throttle::Throttle::new(CONNECT_WARNING_EVERY) });
            let tls = match (https, &tls) {
                (true, Some(tls)) => {
                    let name = config.tls_server_name.clone().unwrap_or_else(|| host.clone());
                    let name = ServerName::try_from(name).map_err(|e| bad(format!("TLS server name: {e}")))?;
                    Some((tls.clone(), name))
                }
                (true, None) => return Err(bad("https needs upstream.tls_ca_file".into())),
                (false, _) => None,
            };
            let authority = uri.authority().map_or_else(String::new, |a| a.to_string());
            let connector = Connector { state: state.clone(), host, port, timeout: config.connect_timeout, tls, authority, https };
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
            channels.push(endpoint.connect_with_connector_lazy(connector.clone()));
            connectors.push(connector);
            endpoints.push(state);
        }
        let credentials = match (&config.user, &config.password_file) {
            (Some(user), Some(path)) => {
                let password = std::fs::read_to_string(path)
                    .map_err(|e| UpstreamError::Password { path: path.clone(), reason: e.to_string() })?
                    .trim_end_matches(['\r', '\n'])
                    .to_string();
                Some(Arc::new(Credentials { user: user.clone(), password, token: std::sync::RwLock::new(None), refresh_now: tokio::sync::Notify::new() }))
            }
            _ => None,
        };
        Ok(Upstream {
            endpoints: endpoints.into(),
            connectors: connectors.into(),
            channels: channels.into(),
            next: Arc::new(AtomicUsize::new(0)),
            picked: None,
            not_ready: None,
            credentials,
            own: false,
        })
    }

    /// This upstream for what the proxy does on its own behalf: every call carries the proxy's
    /// own token (`upstream.user`) unless it already has one. Without `upstream.user`, the same
    /// as `self` (then etcd sees no credentials, as with etcd's auth off).
    pub fn own(&self) -> Upstream {
        Upstream { own: true, ..self.clone() }
    }

    /// The proxy's own token (`upstream.user`), when it has one: for calls made on a raw channel
    /// of [`Upstream::endpoints`] (the readiness probe of each endpoint).
    pub fn own_token(&self) -> Option<http::HeaderValue> {
        self.credentials.as_ref().and_then(|c| c.token.read().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// Authenticates `upstream.user` once and keeps the token for [`Upstream::own`] calls.
    /// `Ok(false)` when no user is configured or etcd's authentication is off.
    pub async fn authenticate(&self) -> Result<bool, tonic::Status> {
        let Some(c) = &self.credentials else { return Ok(false) };
        let request = crate::proto::etcdserverpb::AuthenticateRequest { name: c.user.clone(), password: c.password.clone() };
        let client = crate::proto::etcdserverpb::auth_client::AuthClient::new(Upstream { own: false, ..self.clone() });
        match client.clone().authenticate(request).await {
            Ok(r) => {
                let token = http::HeaderValue::from_str(&r.into_inner().token).map_err(|e| tonic::Status::internal(format!("etcd's token: {e}")))?;
                *c.token.write().unwrap_or_else(|p| p.into_inner()) = Some(token);
                Ok(true)
            }
            Err(s) if s.message().contains("authentication is not enabled") => {
                *c.token.write().unwrap_or_else(|p| p.into_inner()) = None;
                Ok(false)
            }
            Err(s) => Err(s),
        }
    }

    /// Keeps the proxy's own token fresh (every minute; every 5 s after a failure; at once when
    /// etcd refused it, as clientv3 does) until the returned task is aborted. Nothing to do
    /// without `upstream.user`.
    pub fn spawn_token_refresh(&self) -> Option<tokio::task::JoinHandle<()>> {
        let credentials = self.credentials.clone()?;
        let user = credentials.user.clone();
        let this = self.clone();
        Some(tokio::spawn(async move {
            loop {
                let pause = match this.authenticate().await {
                    Ok(_) => TOKEN_REFRESH,
                    Err(e) => {
                        tracing::warn!(user = %user, error = %e, "cannot authenticate upstream.user with etcd");
                        TOKEN_RETRY
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = credentials.refresh_now.notified() => {}
                }
            }
        }))
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

    /// Sends one HTTP/1.1 request to etcd's client URL — etcd's own `/version`, `/health`,
    /// `/metrics` — on a connection of its own (TLS with ALPN `http/1.1` for `https://`),
    /// to an endpoint that is up. The request's path and query are kept; `Host` is the endpoint's.
    ///
    /// Errors: the connection or the exchange failed (the text says why).
    pub async fn http1<B>(&self, request: http::Request<B>) -> Result<http::Response<hyper::body::Incoming>, String>
    where
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let connector = &self.connectors[self.pick()];
        let conn = tokio::time::timeout(connector.timeout, connector.connect(Alpn::Http1))
            .await
            .map_err(|_| format!("no connection to {} after {:?}", connector.state.url, connector.timeout))?
            .map_err(|e| format!("cannot connect to {}: {e}", connector.state.url))?;
        let exchange = async move {
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn)).await.map_err(|e| describe(&e))?;
            tokio::spawn(connection);
            let (mut parts, body) = request.into_parts();
            parts.uri = parts.uri.path_and_query().map_or("/", |p| p.as_str()).parse().map_err(|e: http::uri::InvalidUri| e.to_string())?;
            parts.version = http::Version::HTTP_11;
            let host = if connector.host.contains(':') { format!("[{}]:{}", connector.host, connector.port) } else { format!("{}:{}", connector.host, connector.port) };
            parts.headers.insert(http::header::HOST, http::HeaderValue::from_str(&host).map_err(|e| e.to_string())?);
            sender.send_request(http::Request::from_parts(parts, body)).await.map_err(|e| describe(&e))
        };
        // etcd answers these at once; one that accepts and then stalls is not waited for long.
        tokio::time::timeout(HTTP1_TIMEOUT, exchange).await.map_err(|_| format!("no answer from {} within {HTTP1_TIMEOUT:?}", connector.state.url))?
    }
}

/// The application protocol a connection to etcd is made for (ALPN under TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alpn {
    /// gRPC.
    H2,
    /// etcd's HTTP/1.1 endpoints.
    Http1,
}

impl tower::Service<http::Request<Body>> for Upstream {
    type Response = http::Response<Body>;
    /// Never fails: a failure to reach or hear from etcd is answered as etcd's clients see it,
    /// `UNAVAILABLE` (see [`unavailable`]), by every client built on this service.
    type Error = Infallible;
    type Future = UpstreamFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.picked.is_none() {
            let i = self.pick();
            self.picked = Some((i, self.channels[i].clone()));
        }
        match self.picked.as_mut().map(|(i, c)| (*i, c.poll_ready(cx))) {
            Some((_, Poll::Pending)) => Poll::Pending,
            Some((i, Poll::Ready(Err(e)))) => {
                // The channel's worker is gone: this call answers UNAVAILABLE without sending.
                self.not_ready = Some(format!("etcd-squeeze cannot reach etcd at {}: {}", self.endpoints[i].url, describe(&e)));
                self.picked = None;
                Poll::Ready(Ok(()))
            }
            _ => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        if self.own {
            if let Some(token) = self.own_token() {
                request.headers_mut().entry("token").or_insert(token);
            }
        }
        if let Some(reason) = self.not_ready.take() {
            return UpstreamFuture { inner: None, not_ready: Some(reason), endpoint: None, credentials: None };
        }
        // `call` follows a ready `poll_ready` (tower's contract), whose channel it must use.
        let (i, mut channel) = self.picked.take().unwrap_or_else(|| {
            let i = self.pick();
            (i, self.channels[i].clone())
        });
        let credentials = if self.own { self.credentials.clone() } else { None };
        UpstreamFuture { inner: Some(channel.call(request)), not_ready: None, endpoint: Some(self.endpoints[i].clone()), credentials }
    }
}

/// The future of one call to etcd: its response, with a body that ends in `UNAVAILABLE`
/// trailers instead of an error when the stream breaks; or `UNAVAILABLE` at once when the call
/// could not be sent or answered.
pub struct UpstreamFuture {
    inner: Option<<Channel as tower::Service<http::Request<Body>>>::Future>,
    not_ready: Option<String>,
    /// The proxy's own credentials, when the call carried its token (a refusal renews it).
    credentials: Option<Arc<Credentials>>,
    /// The endpoint the call went to (named in the status when it fails).
    endpoint: Option<Arc<EndpointState>>,
}

impl Future for UpstreamFuture {
    type Output = Result<http::Response<Body>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(inner) = self.inner.as_mut() else {
            let reason = self.not_ready.take().unwrap_or_default();
            return Poll::Ready(Ok(unavailable(&format!("connection error: {reason}"))));
        };
        let answer = ready!(Pin::new(inner).poll(cx));
        if let (Some(c), Ok(response)) = (&self.credentials, &answer) {
            c.notice_refusal(response.headers());
        }
        let url = self.endpoint.as_ref().map_or("", |e| e.url.as_str()).to_string();
        Poll::Ready(Ok(match answer {
            Ok(response) => response.map(|body| Body::new(UnavailableOnError { inner: body, done: false, url })),
            Err(e) => unavailable(&format!("connection error: etcd-squeeze cannot reach etcd at {url}: {}", describe(&e))),
        }))
    }
}

/// A trailers-only gRPC response `UNAVAILABLE` with `message`: what a call through the proxy
/// gets when etcd cannot be reached or stops answering (connection refused, reset, GOAWAY, a
/// broken body, HTTP/2 errors). grpc-go's clients (clientv3, kube-apiserver) see the same code
/// when they lose etcd themselves, and retry safe calls or treat it as transient.
pub fn unavailable(message: &str) -> http::Response<Body> {
    tonic::Status::unavailable(message).into_http()
}

/// An error and its sources, `: `-separated (hyper's and h2's errors say little at the top).
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// etcd's response body, whose failure (reset, GOAWAY, lost connection) becomes `UNAVAILABLE`
/// trailers ("error reading from server: …", grpc-go's words) instead of an HTTP/2 error that
/// tonic would report as `UNKNOWN`.
struct UnavailableOnError {
    inner: Body,
    done: bool,
    /// The etcd endpoint, for the message.
    url: String,
}

impl http_body::Body for UnavailableOnError {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Err(e)) => {
                self.done = true;
                let status = tonic::Status::unavailable(format!("error reading from server: etcd-squeeze lost etcd at {}: {}", self.url, describe(&e)));
                let mut trailers = http::HeaderMap::new();
                let _ = status.add_header(&mut trailers);
                Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
            }
            frame => Poll::Ready(frame),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
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
    /// The endpoint's `host:port` as configured (the `:authority` of calls to it).
    authority: String,
    /// `https://`.
    https: bool,
}

type UpstreamConn = Conn<tokio_rustls::client::TlsStream<TcpStream>, OpenConnection>;

impl Connector {
    async fn connect(&self, alpn: Alpn) -> io::Result<UpstreamConn> {
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
                let config = match alpn {
                    Alpn::H2 => config.current(),
                    Alpn::Http1 => {
                        let mut http1 = (*config.current()).clone();
                        http1.alpn_protocols = vec![tls::ALPN_HTTP1.to_vec()];
                        Arc::new(http1)
                    }
                };
                let connector = tokio_rustls::TlsConnector::from(config);
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
        Box::pin(async move { this.connect_counted().await.map(TokioIo::new) })
    }
}

impl Connector {
    /// An HTTP/2 connection within `upstream.connect_timeout`: counted, and the endpoint marked
    /// up or down by the outcome.
    async fn connect_counted(&self) -> io::Result<UpstreamConn> {
        let metrics = crate::metrics::get();
        let url = self.state.url.as_str();
        let result = match tokio::time::timeout(self.timeout, self.connect(Alpn::H2)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("no connection after {:?}", self.timeout))),
        };
        match result {
            Ok(stream) => {
                metrics.upstream_connects.with_label_values(&[url, "ok"]).inc();
                self.state.set_up(true);
                self.state.connect_warnings.reset();
                tracing::debug!(endpoint = url, "connected to etcd");
                Ok(stream)
            }
            Err(e) => {
                metrics.upstream_connects.with_label_values(&[url, "error"]).inc();
                self.state.set_up(false);
                if let Some(left_out) = self.state.connect_warnings.allow() {
                    tracing::warn!(endpoint = url, error = %e, left_out, "cannot connect to etcd (one line per 10 s while it lasts; left_out: since the last one)");
                }
                Err(e)
            }
        }
    }
}

/// A connection's byte stream (TCP, or TLS over TCP) as the relay drives it.
pub trait ByteStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> ByteStream for S {}

/// A new HTTP/2 connection being made to one endpoint ([`Upstream::dial`]).
pub struct Dial {
    /// The endpoint's URL as configured (named in statuses when it fails).
    pub url: String,
    /// Its `host:port`: the `:authority` of calls sent on it.
    pub authority: String,
    /// Its scheme: the `:scheme` of calls sent on it (`http` or `https`).
    pub scheme: &'static str,
    /// The connection (TCP, TLS with ALPN `h2` for `https://`), within `upstream.connect_timeout`.
    pub connect: BoxFuture<'static, io::Result<Box<dyn ByteStream>>>,
}

impl Upstream {
    /// A new connection of its own to an endpoint that is up (round-robin, as calls pick
    /// them), for a client connection the relay ([`crate::server`]) carries to etcd. Counted in
    /// `etcd_squeeze_upstream_connects_total` and `_connections_open` like the channels'.
    pub fn dial(&self) -> Dial {
        let connector = self.connectors[self.pick()].clone();
        Dial {
            url: connector.state.url.clone(),
            authority: connector.authority.clone(),
            scheme: if connector.https { "https" } else { "http" },
            connect: Box::pin(async move { connector.connect_counted().await.map(|c| Box::new(c) as Box<dyn ByteStream>) }),
        }
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
