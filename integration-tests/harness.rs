//! Test harness: a real etcd (Debian's `etcd-server`) and the proxy, on free loopback ports.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_squeeze::config::{Config, PrefixConfig};
use tokio::sync::oneshot;

/// The FlyteWorkflow key prefix.
pub const FLYTE: &str = "/registry/flyte.lyft.com/flyteworkflows/";

/// A free loopback port (bound then released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running single-member etcd in a temporary data directory; killed on drop.
pub struct Etcd {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// Its data directory (holds `etcd.log`).
    pub dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> Etcd {
        Self::start_with(&[]).await
    }

    /// Starts etcd with extra flags.
    pub async fn start_with(extra: &[&str]) -> Etcd {
        Self::start_in(tempfile::tempdir().unwrap(), free_port(), extra).await
    }

    /// Restores an etcd snapshot (`etcdctl snapshot restore`) into a new data directory and
    /// starts a new etcd on it.
    pub async fn restore(snapshot: &std::path::Path) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let peer = free_port();
        let peer_url = format!("http://127.0.0.1:{peer}");
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["snapshot", "restore"])
            .arg(snapshot)
            .args(["--name", "test", "--initial-cluster", &format!("test={peer_url}"), "--initial-advertise-peer-urls", &peer_url])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .expect("etcdctl (Debian's etcd-client) is needed");
        assert!(out.status.success(), "etcdctl snapshot restore: {}", String::from_utf8_lossy(&out.stderr));
        Self::start_in(dir, peer, &[]).await
    }

    /// Starts etcd (member `test`, peer port `peer`) on `dir/data`, which may hold a restored snapshot.
    async fn start_in(dir: tempfile::TempDir, peer: u16, extra: &[&str]) -> Etcd {
        let bin = std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let client = free_port();
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let child = Command::new(&bin)
            .args(["--name", "test", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin} (install Debian's etcd-server, or set ETCD_BIN): {e}"));
        let etcd = Etcd { child, url, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = etcd_client::Client::connect([&etcd.url], None).await {
                if c.get("health-probe", None).await.is_ok() {
                    return etcd;
                }
            }
            assert!(Instant::now() < deadline, "etcd did not start; see {}", etcd.dir.path().join("etcd.log").display());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A client talking to etcd directly (bypassing the proxy).
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([&self.url], None).await.unwrap()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The proxy, in-process, on a free loopback port; stops on drop.
pub struct Proxy {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
}

impl Proxy {
    /// Starts a proxy in front of `upstream` compressing `prefixes`.
    pub async fn start(upstream: &str, prefixes: &[&str]) -> Proxy {
        let mut config = Config::default();
        config.server.listen = "127.0.0.1:0".parse().unwrap();
        config.upstream.endpoints = vec![upstream.to_string()];
        config.prefixes = prefixes.iter().map(|p| PrefixConfig::new(*p)).collect();
        Self::start_config(config).await
    }

    /// Starts a proxy with a full config (`server.listen` should be port 0).
    pub async fn start_config(config: Config) -> Proxy {
        config.validate().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let (addr, serve) = etcd_squeeze::server::bind(config, async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
        tokio::spawn(serve);
        Proxy { url: format!("http://{addr}"), stop: Some(stop) }
    }

    /// An etcd-client talking to the proxy.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([&self.url], None).await.unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// One test environment: etcd, a proxy in front of it, and clients to both.
pub struct Env {
    /// The proxy's clients see the logical values.
    pub proxy: Proxy,
    /// The real etcd.
    pub etcd: Etcd,
    /// Client → proxy.
    pub via: etcd_client::Client,
    /// Client → etcd directly, to see what is stored.
    pub direct: etcd_client::Client,
    /// The compressed prefix under test.
    pub prefix: &'static str,
}

impl Env {
    /// etcd + proxy compressing `prefix`.
    pub async fn new(prefix: &'static str) -> Env {
        let etcd = Etcd::start().await;
        let proxy = Proxy::start(&etcd.url, &[prefix]).await;
        let via = proxy.client().await;
        let direct = etcd.client().await;
        Env { proxy, etcd, via, direct, prefix }
    }

    /// A FlyteWorkflow key (compressed in both suites).
    pub fn wf_key(&self, name: &str) -> String {
        format!("{FLYTE}flytesnacks-development/{name}")
    }

    /// True when keys outside the FlyteWorkflow prefix are compressed too (prefix "").
    pub fn compresses_everything(&self) -> bool {
        self.prefix.is_empty()
    }

    /// Runs `etcdctl` (API v3) against the proxy; returns stdout.
    pub fn etcdctl(&self, args: &[&str], stdin: Option<&str>) -> String {
        etcdctl(&self.proxy.url, args, stdin)
    }
}

/// Runs `etcdctl` (API v3) against `endpoint`; panics with stderr on failure.
///
/// The endpoint is given as `host:port`: etcdctl 3.4's per-endpoint commands (`endpoint status`)
/// send an `http://…` endpoint verbatim as the HTTP/2 `:authority`, which is malformed; etcd's
/// grpc-go server tolerates it, hyper's h2 (the proxy's) resets the stream.
pub fn etcdctl(endpoint: &str, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let endpoint = endpoint.trim_start_matches("http://");
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("etcdctl (Debian's etcd-client) is needed");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The shared FlyteWorkflow corpus (`../shared/corpus`, or `ETCD_SQUEEZE_CORPUS`), if present.
pub fn shared_corpus() -> Option<PathBuf> {
    let dir = std::env::var_os("ETCD_SQUEEZE_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus"));
    dir.is_dir().then_some(dir)
}

