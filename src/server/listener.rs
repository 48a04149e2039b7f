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

/// A client connection with the bytes already read from it (by [`sniff_http2`]) put back in
/// front of what it reads next.
pub struct Sniffed {
    read: bytes::Bytes,
    conn: ClientConn,
}

impl tokio::io::AsyncRead for Sniffed {
    fn poll_read(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> std::task::Poll<std::io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            let head = self.read.split_to(n);
            buf.put_slice(&head);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.conn).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Sniffed {
    fn poll_write(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.conn).poll_write(cx, buf)
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.conn).poll_flush(cx)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.conn).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.conn).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.conn.is_write_vectored()
    }
}

/// Tells an HTTP/2 connection (ALPN `h2` under TLS, else the client's connection preface)
/// from anything else (HTTP/1.1), reading no more than the preface's 24 bytes, which the
/// returned connection reads again.
pub async fn sniff_http2(mut conn: ClientConn) -> std::io::Result<(Sniffed, bool)> {
    use tokio::io::AsyncReadExt;
    const PREFACE: &[u8] = crate::server::relay::frame::PREFACE;
    if let Some(tls) = conn.tls_session() {
        if let Some(alpn) = tls.get_ref().1.alpn_protocol() {
            let h2 = alpn == b"h2";
            return Ok((Sniffed { read: bytes::Bytes::new(), conn }, h2));
        }
    }
    let mut buf = vec![0u8; PREFACE.len()];
    let mut n = 0;
    while n < PREFACE.len() {
        let m = conn.read(&mut buf[n..]).await?;
        if m == 0 || buf[..n + m] != PREFACE[..n + m] {
            n += m;
            break;
        }
        n += m;
    }
    buf.truncate(n);
    let h2 = buf == PREFACE;
    Ok((Sniffed { read: buf.into(), conn }, h2))
}
