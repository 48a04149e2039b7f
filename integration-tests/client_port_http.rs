//! etcd's HTTP/1.1 endpoints on the client port, through the proxy and directly: `curl` (as
//! operators, kubeadm's external-etcd preflight and Prometheus use them) gets etcd's own answers
//! from the proxy's gRPC port, in plain text and over mutual TLS; gRPC keeps working beside.

use std::path::Path;
use std::process::Command;

use crate::harness::{skip_unless_ci, Etcd, Proxy, ProxyConfig, FLYTE};
use crate::pki::{Ca, Files};

/// One HTTP/1.1 GET with curl: (status, body). `tls`: the client files for `https://`.
fn curl(url: &str, tls: Option<&Files>) -> Option<(u16, String)> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--http1.1", "--max-time", "10", "-w", "\n%{http_code}"]);
    if let Some(f) = tls {
        let arg = |p: &Path| p.display().to_string();
        cmd.args(["--cacert", &arg(&f.ca), "--cert", &arg(&f.cert), "--key", &arg(&f.key)]);
    }
    let out = match cmd.arg(url).output() {
        Ok(out) => out,
        Err(_) => {
            skip_unless_ci("client_port_http", "curl");
            return None;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Some((code.trim().parse().unwrap_or(0), body.to_string()))
}

/// `/version` and `/health` are etcd's, byte for byte; `/metrics` is etcd's (not the proxy's
/// own, which stay on `metrics.listen`); `/readyz` and `/livez` answer as etcd does; other paths
/// — etcd's JSON gateway included, which would bypass the codec — are `404 page not found` as
/// on etcd; gRPC is served on the same port; with etcd gone, `/health` is 503 in etcd's shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_http_endpoints_answer_as_etcd() {
    let mut etcd = Etcd::start().await;
    let proxy = Proxy::start(&etcd.url, &[FLYTE]).await;
    let Some(version) = curl(&format!("{}/version", proxy.url), None) else { return };
    assert_eq!(version, curl(&format!("{}/version", etcd.url), None).unwrap());
    assert_eq!(version.0, 200);
    assert!(version.1.contains("\"etcdserver\":\""), "{version:?}");
    for path in ["/health", "/readyz", "/livez", "/no-such-path", "/health?exclude=NOSPACE"] {
        assert_eq!(curl(&format!("{}{path}", proxy.url), None), curl(&format!("{}{path}", etcd.url), None), "{path}");
    }
    assert_eq!(curl(&format!("{}/health", proxy.url), None).unwrap().0, 200);
    let (code, metrics) = curl(&format!("{}/metrics", proxy.url), None).unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("etcd_server_has_leader 1"), "{metrics:.300}");
    assert!(!metrics.contains("etcd_squeeze_"), "the proxy's own metrics stay on metrics.listen");
    // etcd's JSON gateway would read and write stored frames: never forwarded.
    assert_eq!(curl(&format!("{}/v3/kv/range", proxy.url), None).unwrap(), (404, "404 page not found\n".into()));

    // gRPC on the same port, before and after HTTP/1.1.
    let mut via = proxy.client().await;
    via.put(format!("{FLYTE}ns/http"), "{\"a\":1}", None).await.unwrap();
    assert_eq!(via.get(format!("{FLYTE}ns/http"), None).await.unwrap().kvs()[0].value(), b"{\"a\":1}");

    etcd.kill();
    let (code, body) = curl(&format!("{}/health", proxy.url), None).unwrap();
    assert_eq!(code, 503, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["health"], "false", "{body}");
}

/// Under mutual TLS (etcd and the proxy both requiring client certificates), `curl --cert`
/// gets the same `/version` and `/health` from the proxy as from etcd (ALPN `http/1.1` on both hops).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_http_endpoints_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("etcd-ca");
    let (etcd_files, _) = ca.issue(dir.path(), "etcd-server", &["127.0.0.1", "localhost"]);
    let (proxy_files, _) = ca.issue(dir.path(), "etcd-squeeze", &["127.0.0.1", "localhost"]);
    let (client, _) = ca.issue(dir.path(), "apiserver-etcd-client", &[]);
    let etcd = Etcd::start_tls(&etcd_files).await;
    let proxy = Proxy::start_config(
        ProxyConfig::new(&etcd.url)
            .prefix(FLYTE)
            .with(|c| {
                c.server.tls_cert_file = Some(proxy_files.cert.clone());
                c.server.tls_key_file = Some(proxy_files.key.clone());
                c.server.tls_client_ca_file = Some(proxy_files.ca.clone());
                c.upstream.tls_ca_file = Some(client.ca.clone());
                c.upstream.tls_cert_file = Some(client.cert.clone());
                c.upstream.tls_key_file = Some(client.key.clone());
            })
            .build(),
    )
    .await;
    let proxy_url = proxy.url.replace("http://", "https://");
    for path in ["/version", "/health"] {
        let Some(through) = curl(&format!("{proxy_url}{path}"), Some(&client)) else { return };
        assert_eq!(through, curl(&format!("{}{path}", etcd.url), Some(&client)).unwrap(), "{path}");
        assert_eq!(through.0, 200, "{path}: {through:?}");
    }
    // A client that negotiates HTTP/2 (curl's default over TLS, Go's transport) is not gRPC either:
    // etcd routes by content type, and so does the proxy.
    let h2 = Command::new("curl")
        .args(["-sS", "--http2", "--max-time", "10", "-w", "\n%{http_version} %{http_code}", "--cacert"])
        .arg(&client.ca)
        .args(["--cert"])
        .arg(&client.cert)
        .args(["--key"])
        .arg(&client.key)
        .arg(format!("{proxy_url}/version"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&h2.stdout).to_string();
    let (body, status) = text.rsplit_once('\n').unwrap();
    assert_eq!(status, "2 200", "{text}");
    assert_eq!(body, curl(&format!("{}/version", etcd.url), Some(&client)).unwrap().1, "{text}");
    // Without a client certificate the TLS handshake is refused, as etcd refuses it.
    let refused = Command::new("curl").args(["-sS", "--max-time", "5", "--cacert"]).arg(&client.ca).arg(format!("{proxy_url}/version")).output().unwrap();
    assert!(!refused.status.success(), "served without a client certificate");
}
