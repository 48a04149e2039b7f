//! TLS material read from PEM files and re-read when the files change.
//!
//! Both sides use it: the listener ([`server_config`], used by `server::listener`) and the
//! connection to etcd (`crate::upstream`). A [`Reloading`] config is checked when a connection
//! is made, so a rotated certificate (cert-manager, kubeadm `certs renew`, a Secret update) is
//! picked up by the next connection while open connections keep theirs. rustls with the `ring`
//! provider, TLS 1.2 and 1.3.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::ServerConfig;

/// ALPN protocol of HTTP/2: grpc-go ≥ 1.67 refuses a TLS peer that does not negotiate it.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN protocol of HTTP/1.1: etcd's `/version`, `/health`, `/metrics` on the client port.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// A TLS file that cannot be used: names the config key, the file and the reason.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {}: {reason}", path.display())]
pub struct TlsError {
    /// The config key naming the file, e.g. `server.tls_cert_file`.
    pub key: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

impl TlsError {
    fn new(key: &'static str, path: &Path, reason: impl ToString) -> Self {
        TlsError { key, path: path.to_path_buf(), reason: reason.to_string() }
    }
}

/// The crypto provider every TLS config uses: ring (no process-wide default is assumed).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate of a PEM file (a chain: leaf first).
pub fn load_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| TlsError::new(key, path, e))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::new(key, path, e))?;
    if certs.is_empty() {
        return Err(TlsError::new(key, path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| TlsError::new(key, path, e))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::new(key, path, format!("no usable PEM private key: {e}")))
}

/// A CA bundle as a root store.
pub fn load_roots(key: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(key, path)? {
        roots.add(cert).map_err(|e| TlsError::new(key, path, e))?;
    }
    Ok(roots)
}

/// What identifies one version of a file without reading it: modification time, size, inode.
/// A Kubernetes Secret volume swaps a symlink, cert-manager renames, `cp` rewrites in place:
/// each changes at least one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint(Vec<Option<(SystemTime, u64, u64)>>);

impl Fingerprint {
    fn of(files: &[PathBuf]) -> Self {
        Fingerprint(
            files
                .iter()
                .map(|f| {
                    let m = std::fs::metadata(f).ok()?;
                    #[cfg(unix)]
                    let ino = std::os::unix::fs::MetadataExt::ino(&m);
                    #[cfg(not(unix))]
                    let ino = 0;
                    Some((m.modified().ok()?, m.len(), ino))
                })
                .collect(),
        )
    }
}

type Build<T> = Box<dyn Fn() -> Result<T, TlsError> + Send + Sync>;

/// A TLS config built from files and rebuilt when one of them changes.
///
/// [`Reloading::current`] is called once per new connection: it stats the files (cheap next
/// to a handshake) and rebuilds only when a fingerprint changed. A rebuild that fails (a
/// half-written file, a key that does not match its certificate) keeps the previous config,
/// logs a warning and counts `etcd_squeeze_tls_reloads_total{result="error"}`; it is tried
/// again when the files change again.
pub struct Reloading<T> {
    side: &'static str,
    files: Vec<PathBuf>,
    build: Build<T>,
    // A std Mutex: nothing awaits while it is held, and a rebuild is rare.
    state: Mutex<(Fingerprint, Arc<T>)>,
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading").field("side", &self.side).field("files", &self.files).finish()
    }
}

impl<T> Reloading<T> {
    /// Builds the first config (an error here stops the start: a bad file is a config error).
    /// `side` labels metrics and logs (`server`, `upstream`).
    pub fn new(side: &'static str, files: Vec<PathBuf>, build: impl Fn() -> Result<T, TlsError> + Send + Sync + 'static) -> Result<Self, TlsError> {
        let fingerprint = Fingerprint::of(&files);
        let config = Arc::new(build()?);
        Ok(Reloading { side, files, build: Box::new(build), state: Mutex::new((fingerprint, config)) })
    }

    /// The config for a new connection: rebuilt first if a file changed since the last build.
    pub fn current(&self) -> Arc<T> {
        let now = Fingerprint::of(&self.files);
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.0 != now {
            state.0 = now;
            let reloads = &crate::metrics::get().tls_reloads;
            match (self.build)() {
                Ok(config) => {
                    state.1 = Arc::new(config);
                    reloads.with_label_values(&[self.side, "ok"]).inc();
                    tracing::info!(side = self.side, files = ?self.files, "TLS files changed: reloaded");
                }
                Err(e) => {
                    reloads.with_label_values(&[self.side, "error"]).inc();
                    tracing::warn!(side = self.side, error = %e, "TLS files changed but cannot be loaded: keeping the previous ones");
                }
            }
        }
        state.1.clone()
    }
}

/// The listener's TLS config, when `server.tls_cert_file` is set: the certificate and key,
/// ALPN `h2`, and client certificates required (and verified against
/// `server.tls_client_ca_file`) when a client CA is set.
pub fn server_config(config: &ServerConfig) -> Result<Option<Reloading<rustls::ServerConfig>>, TlsError> {
    let (Some(cert), Some(key)) = (config.tls_cert_file.clone(), config.tls_key_file.clone()) else {
        return Ok(None);
    };
    let ca = config.tls_client_ca_file.clone();
    let files = [Some(cert.clone()), Some(key.clone()), ca.clone()].into_iter().flatten().collect();
    let build = move || {
        let provider = provider();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::new("server.tls_cert_file", &cert, e))?;
        let builder = match &ca {
            Some(ca) => {
                let roots = Arc::new(load_roots("server.tls_client_ca_file", ca)?);
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| TlsError::new("server.tls_client_ca_file", ca, e))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut tls = builder
            .with_single_cert(load_certs("server.tls_cert_file", &cert)?, load_key("server.tls_key_file", &key)?)
            .map_err(|e| TlsError::new("server.tls_key_file", &key, format!("does not match server.tls_cert_file: {e}")))?;
        tls.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
        Ok(tls)
    };
    Reloading::new("server", files, build).map(Some)
}

/// A TCP connection, in plain text or TLS (`T` is tokio-rustls' client or server stream), with
/// a `guard` dropped when the connection is (to count open connections).
pub struct Conn<T, G = ()> {
    stream: Stream<T>,
    _guard: G,
}

enum Stream<T> {
    Plain(TcpStream),
    // Boxed: a TLS stream is ~1 KiB of buffers and state, a TcpStream a few words.
    Tls(Box<T>),
}

impl<T, G> Conn<T, G> {
    /// A plain-text connection.
    pub fn plain(tcp: TcpStream, guard: G) -> Self {
        Conn { stream: Stream::Plain(tcp), _guard: guard }
    }

    /// A TLS connection.
    pub fn tls(tls: T, guard: G) -> Self {
        Conn { stream: Stream::Tls(Box::new(tls)), _guard: guard }
    }

    /// The TLS session, if this is a TLS connection.
    pub fn tls_session(&self) -> Option<&T> {
        match &self.stream {
            Stream::Plain(_) => None,
            Stream::Tls(t) => Some(t),
        }
    }

    /// The TCP stream, if this is a plain-text connection.
    pub fn plain_tcp(&self) -> Option<&TcpStream> {
        match &self.stream {
            Stream::Plain(s) => Some(s),
            Stream::Tls(_) => None,
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin, G: Unpin> Conn<T, G> {
    fn io(&mut self) -> Pin<&mut (dyn Io + '_)> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s),
            Stream::Tls(s) => Pin::new(&mut **s),
        }
    }
}

/// Both halves of a byte stream.
trait Io: AsyncRead + AsyncWrite + Unpin {}
impl<S: AsyncRead + AsyncWrite + Unpin> Io for S {}

impl<T: AsyncRead + AsyncWrite + Unpin, G: Unpin> AsyncRead for Conn<T, G> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.get_mut().io().poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin, G: Unpin> AsyncWrite for Conn<T, G> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().io().poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().io().poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().io().poll_shutdown(cx)
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        self.get_mut().io().poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reloads(side: &str, result: &str) -> u64 {
        crate::metrics::get().tls_reloads.with_label_values(&[side, result]).get()
    }

    #[test]
    fn rebuilt_when_a_file_changes_and_kept_when_the_new_one_is_broken() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cert.pem");
        std::fs::write(&file, "one").unwrap();
        let path = file.clone();
        let build = move || {
            let text = std::fs::read_to_string(&path).map_err(|e| TlsError::new("server.tls_cert_file", &path, e))?;
            if text.starts_with("broken") {
                return Err(TlsError::new("server.tls_cert_file", &path, "broken"));
            }
            Ok(text)
        };
        let reloading = Reloading::new("test", vec![file.clone()], build).unwrap();
        assert_eq!(*reloading.current(), "one");
        assert_eq!(*reloading.current(), "one", "unchanged files are not re-read");

        let replace = |text: &str| {
            let tmp = dir.path().join("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &file).unwrap();
        };
        replace("two");
        assert_eq!(*reloading.current(), "two");
        assert_eq!(reloads("test", "ok"), 1);
        replace("broken!");
        assert_eq!(*reloading.current(), "two", "a broken file keeps the previous config");
        assert_eq!(*reloading.current(), "two");
        assert_eq!(reloads("test", "error"), 1, "a broken file is reported once, not on every connection");
        replace("three");
        assert_eq!(*reloading.current(), "three");
    }

    #[test]
    fn errors_name_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.crt");
        let err = load_certs("upstream.tls_ca_file", &missing).unwrap_err().to_string();
        assert!(err.starts_with("upstream.tls_ca_file: ") && err.contains("missing.crt"), "{err}");
        let empty = dir.path().join("empty.crt");
        std::fs::write(&empty, "no PEM here").unwrap();
        assert!(load_certs("server.tls_cert_file", &empty).unwrap_err().to_string().contains("no PEM certificate"));
        assert!(load_key("server.tls_key_file", &empty).unwrap_err().to_string().contains("server.tls_key_file"));
    }
}
