//! The accept loop: TCP connections, TLS handshakes (concurrent, bounded by
//! `server.tls_handshake_timeout`), and the stream of ready connections tonic serves.
//!
//! The loop ends, closing the listening socket, as soon as tonic stops reading the stream
//! (at shutdown), so new clients are refused at once instead of waiting in the backlog.

use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::tls::{Conn, Reloading};

/// A client connection: plain text or TLS.
pub type ClientConn = Conn<tokio_rustls::server::TlsStream<TcpStream>>;

/// Connections waiting for tonic: a few, so a burst of handshakes never blocks the loop.
const READY_CONNECTIONS: usize = 64;
/// Pause after an accept error such as EMFILE, so the loop does not spin while out of descriptors.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

impl Connected for ClientConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        let tcp = self.tls_session().map(|tls| tls.get_ref().0).or(self.plain_tcp());
        TcpConnectInfo {
            local_addr: tcp.and_then(|t| t.local_addr().ok()),
            remote_addr: tcp.and_then(|t| t.peer_addr().ok()),
        }
    }
}

/// Accepts connections on `listener`, with a TLS handshake when `tls` is set.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<Reloading<rustls::ServerConfig>>>,
    handshake_timeout: Duration,
) -> impl Stream<Item = Result<ClientConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(READY_CONNECTIONS);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = tx.closed() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let Some(tls) = &tls else {
                if tx.send(Conn::plain(tcp, ())).await.is_err() {
                    break;
                }
                continue;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Conn::tls(stream, ())).await;
                    }
                    Ok(Err(e)) => {
                        crate::metrics::get().tls_handshake_failures.inc();
                        tracing::warn!(%peer, error = %e, "TLS handshake failed: connection refused");
                    }
                    Err(_) => {
                        crate::metrics::get().tls_handshake_failures.inc();
                        tracing::warn!(%peer, timeout = ?handshake_timeout, "TLS handshake timed out: connection closed");
                    }
                }
            });
        }
        tracing::debug!("listener closed");
    });
    ReceiverStream::new(rx).map(Ok)
}
