//! TLS on both sides, with certificates generated at test time: kube-apiserver's view (etcdctl
//! with a client certificate, ALPN h2), refusals, and certificate rotation without dropping
//! connections.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use etcd_squeeze::config::{Config, UpstreamConfig};
use etcd_squeeze::proto::etcdserverpb::watch_client::WatchClient;
use etcd_squeeze::proto::etcdserverpb::{watch_request, WatchCreateRequest, WatchRequest};
use etcd_squeeze::upstream::Upstream;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_stream::wrappers::ReceiverStream;

use crate::harness::{etcdctl_output, eventually, http_get, sample, Etcd, Proxy, ProxyConfig, FLYTE};
use crate::pki::{Ca, Files};

/// A proxy config serving TLS with `server` files (client certificates required), forwarding to `upstream`.
fn tls_proxy_config(server: &Files, upstream: &str) -> Config {
    ProxyConfig::new(upstream)
        .prefix(FLYTE)
        .with(|c| {
            c.server.tls_cert_file = Some(server.cert.clone());
            c.server.tls_key_file = Some(server.key.clone());
            c.server.tls_client_ca_file = Some(server.ca.clone());
        })
        .build()
}

/// One TLS handshake with the proxy, as a raw rustls client: the certificate it presents and
/// the ALPN protocol it selected, once the connection has proven usable (the server accepted
/// our certificate, or refused it: then an error).
async fn handshake(addr: &str, ca: &Path, client: Option<&Files>) -> std::io::Result<(Vec<u8>, Option<Vec<u8>>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        Some(f) => builder
            .with_client_auth_cert(CertificateDer::pem_file_iter(&f.cert).unwrap().map(Result::unwrap).collect(), PrivateKeyDer::from_pem_file(&f.key).unwrap())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr.trim_start_matches("http://")).await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(ServerName::try_from("127.0.0.1").unwrap(), tcp).await?;
    // TLS 1.3: the server checks our certificate after the client considers the handshake
    // done, so only a round trip proves acceptance. Speak HTTP/2: the server answers SETTINGS.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await?;
    let mut buf = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut buf)).await??;
    let (_, session) = tls.get_ref();
    let cert = session.peer_certificates().expect("server certificate")[0].to_vec();
    Ok((cert, session.alpn_protocol().map(<[u8]>::to_vec)))
}

/// kube-apiserver's setup: it talks mutual TLS to the proxy (`--etcd-cafile`, `--etcd-certfile`),
/// and the proxy talks mutual TLS to an etcd that requires client certificates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("etcd-ca");
    let (etcd_files, _) = ca.issue(dir.path(), "etcd-server", &["127.0.0.1", "localhost"]);
    let (proxy_files, proxy_leaf) = ca.issue(dir.path(), "etcd-squeeze", &["127.0.0.1", "localhost"]);
    let (apiserver, _) = ca.issue(dir.path(), "apiserver-etcd-client", &[]);
    let etcd = Etcd::start_tls(&etcd_files).await;

    let mut config = tls_proxy_config(&proxy_files, &etcd.url);
    config.upstream.tls_ca_file = Some(apiserver.ca.clone());
    config.upstream.tls_cert_file = Some(apiserver.cert.clone());
    config.upstream.tls_key_file = Some(apiserver.key.clone());
    let proxy = Proxy::start_config(config).await;

    // etcdctl (grpc-go, as kube-apiserver) with a client certificate: writes and reads back.
    let key = format!("{FLYTE}ns/tls-wf");
    let value = etcd_squeeze::corpus::small_set(3).remove(1).json;
    let value = std::str::from_utf8(&value).unwrap();
    let put = apiserver.etcdctl(&proxy.url, &["put", &key], Some(value));
    assert!(put.status.success(), "put through the TLS proxy: {}", String::from_utf8_lossy(&put.stderr));
    let got = apiserver.etcdctl(&proxy.url, &["get", &key, "--print-value-only"], None);
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim_end(), value.trim_end());
    // Stored compressed in the TLS etcd: the value begins with the frame magic FF 53 51 5A.
    let stored = etcd_files.etcdctl(&etcd.url, &["get", &key, "-w", "json"], None);
    let stored = String::from_utf8_lossy(&stored.stdout);
    assert!(stored.contains("\"value\":\"/1NRW"), "stored value is not a frame: {stored:.200}");

    // ALPN h2 is negotiated (grpc-go ≥ 1.67 requires it) and the proxy presents its certificate.
    let (cert, alpn) = handshake(&proxy.url, &apiserver.ca, Some(&apiserver)).await.unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(cert, proxy_leaf.der);

    // Refused: no client certificate, or one from another CA.
    assert!(handshake(&proxy.url, &apiserver.ca, None).await.is_err(), "a client without a certificate was served");
    let rogue_dir = tempfile::tempdir().unwrap();
    let (rogue, _) = Ca::new("rogue-ca").issue(rogue_dir.path(), "rogue", &[]);
    let rogue = Files { ca: apiserver.ca.clone(), ..rogue };
    assert!(handshake(&proxy.url, &apiserver.ca, Some(&rogue)).await.is_err(), "a certificate from another CA was accepted");
    let refused = rogue.etcdctl(&proxy.url, &["--command-timeout=2s", "get", &key], None);
    assert!(!refused.status.success(), "etcdctl with a rogue certificate was served");
    let cacert = format!("--cacert={}", apiserver.ca.display());
    let no_cert = etcdctl_output(&proxy.url, &[&cacert, "--command-timeout=2s", "get", &key], None);
    assert!(!no_cert.status.success(), "etcdctl without a client certificate was served");

    let (_, scrape) = http_get(&proxy.metrics_url, "/metrics").await.unwrap();
    assert!(sample(&scrape, "etcd_squeeze_tls_handshake_failures_total").unwrap() >= 2.0, "{scrape}");
    assert_eq!(sample(&scrape, &format!("etcd_squeeze_upstream_up{{endpoint=\"{}\"}}", etcd.url)), Some(1.0));
}

/// New certificate files are served to new connections; a watch opened before keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("etcd-ca");
    let (server, first) = ca.issue(dir.path(), "etcd-squeeze", &["127.0.0.1"]);
    let (client, _) = ca.issue(dir.path(), "client", &[]);
    let etcd = Etcd::start().await;
    let proxy = Proxy::start_config(tls_proxy_config(&server, &etcd.url)).await;

    // A long-lived client connection: the proxy's own upstream code, pointed at the TLS proxy.
    let upstream = Upstream::new(&UpstreamConfig {
        endpoints: vec![proxy.url.replace("http://", "https://")],
        tls_ca_file: Some(client.ca.clone()),
        tls_cert_file: Some(client.cert.clone()),
        tls_key_file: Some(client.key.clone()),
        ..UpstreamConfig::default()
    })
    .unwrap();
    let (requests, rx) = tokio::sync::mpsc::channel(4);
    let create = WatchCreateRequest { key: FLYTE.into(), range_end: etcd_squeeze::codec::prefix_end(FLYTE.as_bytes()).unwrap().into(), ..Default::default() };
    requests.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) }).await.unwrap();
    let mut watch = WatchClient::new(upstream).watch(ReceiverStream::new(rx)).await.unwrap().into_inner();
    assert!(watch.message().await.unwrap().unwrap().created);
    assert_eq!(handshake(&proxy.url, &client.ca, Some(&client)).await.unwrap().0, first.der);

    // Rotate: new connections get the new certificate.
    let second = ca.leaf("etcd-squeeze-rotated", &["127.0.0.1"]);
    server.replace(&second);
    assert_eq!(handshake(&proxy.url, &client.ca, Some(&client)).await.unwrap().0, second.der);

    // A broken file (a half-finished copy) keeps the last good certificate.
    std::fs::write(&server.cert, "-----BEGIN CERTIFICATE-----\ntruncated").unwrap();
    assert_eq!(handshake(&proxy.url, &client.ca, Some(&client)).await.unwrap().0, second.der);

    // The watch opened before the rotation still delivers events.
    let mut direct = etcd.client().await;
    direct.put(format!("{FLYTE}ns/after-rotation"), "{}", None).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), watch.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(event.events.len(), 1);

    eventually(Duration::from_secs(5), "reload metrics", || async {
        let (_, scrape) = http_get(&proxy.metrics_url, "/metrics").await.unwrap();
        sample(&scrape, "etcd_squeeze_tls_reloads_total{result=\"ok\",side=\"server\"}").unwrap_or(0.0) >= 1.0
            && sample(&scrape, "etcd_squeeze_tls_reloads_total{result=\"error\",side=\"server\"}").unwrap_or(0.0) >= 1.0
    })
    .await;
}
