//! Test harness: a real etcd (Debian's `etcd-server`) and the proxy, on free loopback ports.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};
use etcd_squeeze::codec::delta::{base_key, bases_dir, BASES_PREFIX};
use etcd_squeeze::codec::frame::{self, Codec};
use etcd_squeeze::config::{Config, PrefixConfig};
use etcd_squeeze::corpus::{consecutive_writes, update_series, Scenario, Topology};
use tokio::sync::oneshot;

/// The FlyteWorkflow key prefix.
pub const FLYTE: &str = "/registry/flyte.lyft.com/flyteworkflows/";

/// A free loopback port (bound then released; good enough for tests).
pub fn free_port() -> u16 {
    // The kernel may hand a port it just gave back out again: never give one twice in this
    // process (a 3-member cluster once got two members on one port).
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> = std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if GIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
}

/// A running single-member etcd in a temporary data directory; killed on drop.
pub struct Etcd {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// The peer URL, kept for [`Etcd::restart`].
    peer_url: String,
    /// Its data directory (holds `etcd.log`).
    pub dir: tempfile::TempDir,
    /// Extra flags, kept for [`Etcd::restart`].
    extra: Vec<String>,
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> Etcd {
        Self::start_with(&[]).await
    }

    /// Starts etcd with extra flags.
    ///
    /// Free ports are found by binding and releasing them, so another process can take one
    /// first: an etcd that exits at start (address in use) is started again on new ports.
    pub async fn start_with(extra: &[&str]) -> Etcd {
        for _ in 0..3 {
            let mut etcd = Self::spawn(tempfile::tempdir().unwrap(), free_port(), "http", extra);
            if etcd.ready_unless_exited().await {
                return etcd;
            }
        }
        panic!("etcd exited at start three times (ports taken?)");
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
        Self::wait_ready(Self::spawn(dir, peer, "http", &[])).await
    }

    /// Waits until a plain-text etcd answers a Range.
    async fn wait_ready(mut etcd: Etcd) -> Etcd {
        etcd.until_ready().await;
        etcd
    }

    /// Polls until a plain-text etcd answers a Range (at most 20 s).
    async fn until_ready(&mut self) {
        assert!(self.ready_unless_exited().await, "etcd exited at start; see {}", self.dir.path().join("etcd.log").display());
    }

    /// Polls until a plain-text etcd answers a Range (true), or its process exits (false); panics
    /// after 20 s.
    async fn ready_unless_exited(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok(mut c) = etcd_client::Client::connect([&self.url], None).await {
                if c.get("health-probe", None).await.is_ok() {
                    return true;
                }
            }
            assert!(Instant::now() < deadline, "etcd did not start; see {}", self.dir.path().join("etcd.log").display());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts etcd serving TLS on its client URL (`https://`) and requiring client certificates
    /// signed by `tls.ca` (`--client-cert-auth`), as kubeadm runs it.
    pub async fn start_tls(tls: &crate::pki::Files) -> Etcd {
        let arg = |flag: &str, path: &std::path::Path| format!("--{flag}={}", path.display());
        let flags = [arg("cert-file", &tls.cert), arg("key-file", &tls.key), arg("trusted-ca-file", &tls.ca), "--client-cert-auth".into()];
        let etcd = Self::spawn(tempfile::tempdir().unwrap(), free_port(), "https", &flags.iter().map(String::as_str).collect::<Vec<_>>());
        let deadline = Instant::now() + Duration::from_secs(20);
        while !tls.etcdctl(&etcd.url, &["endpoint", "health"], None).status.success() {
            assert!(Instant::now() < deadline, "etcd did not start; see {}", etcd.dir.path().join("etcd.log").display());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        etcd
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) etcd: a frozen etcd accepts connections and answers
    /// nothing, like an etcd that lost its quorum.
    pub fn freeze(&self, frozen: bool) {
        signal(self.child.id(), if frozen { "STOP" } else { "CONT" });
    }

    /// Spawns etcd (member `test`, peer port `peer`) on `dir/data`, which may hold a restored snapshot.
    fn spawn(dir: tempfile::TempDir, peer: u16, scheme: &str, extra: &[&str]) -> Etcd {
        let url = format!("{scheme}://127.0.0.1:{}", free_port());
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Self::command(dir.path(), &url, &peer_url, extra);
        Etcd { child, url, peer_url, dir, extra: extra.iter().map(|s| s.to_string()).collect() }
    }

    /// Runs etcd (member `test`) on `dir/data`, logging to `dir/etcd.log` (appended to).
    fn command(dir: &std::path::Path, url: &str, peer_url: &str, extra: &[&str]) -> Child {
        let bin = std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("etcd.log")).unwrap();
        Command::new(&bin)
            .args(["--name", "test", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", url, "--advertise-client-urls", url])
            .args(["--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin} (install Debian's etcd-server, or set ETCD_BIN): {e}"))
    }

    /// Kills etcd with SIGKILL (no chance to flush or say goodbye) and waits for it to exit.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts etcd again on the same data directory and ports (after [`Etcd::kill`]) and waits
    /// until it answers. Plain-text etcd only.
    pub async fn restart(&mut self) {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        self.child = Self::command(self.dir.path(), &self.url, &self.peer_url, &extra);
        self.until_ready().await;
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
    /// `http://127.0.0.1:PORT` of `/metrics`, `/healthz`, `/readyz`.
    pub metrics_url: String,
    stop: Option<oneshot::Sender<()>>,
}

impl Proxy {
    /// Starts a proxy in front of `upstream` compressing `prefixes`.
    pub async fn start(upstream: &str, prefixes: &[&str]) -> Proxy {
        Self::start_config(ProxyConfig::new(upstream).prefixes(prefixes).build()).await
    }

    /// Starts a proxy with delta frames on for [`FLYTE`] in front of `upstream` ([`delta_config`]);
    /// a new one has no base cache and knows nothing of what others wrote (a "cold" proxy).
    pub async fn start_delta(upstream: &str) -> Proxy {
        Self::start_config(delta_config(upstream, FLYTE)).await
    }

    /// Starts a proxy with a full config (`server.listen` should be port 0). A default
    /// `metrics.listen` is moved to a free port, so that tests can run side by side.
    pub async fn start_config(mut config: Config) -> Proxy {
        if config.metrics.listen == Config::default().metrics.listen {
            config.metrics.listen = "127.0.0.1:0".parse().unwrap();
        }
        config.validate().unwrap();
        let auto = config.announce && config.prefixes.iter().any(|p| p.delta_mode() == etcd_squeeze::config::DeltaMode::Auto);
        let running = etcd_squeeze::server::spawn(config).await.unwrap();
        if auto {
            // delta = "auto" writes delta frames once the replica has announced itself and seen
            // every other replica: tests of the default configuration start from there.
            let members = running.members.clone();
            eventually(Duration::from_secs(10), "the proxy to announce itself (delta = \"auto\")", || {
                let members = members.clone();
                async move { members.all_read("delta") }
            })
            .await;
        }
        Proxy { url: format!("http://{}", running.addr), metrics_url: format!("http://{}", running.metrics_addr), stop: Some(running.stop) }
    }

    /// An etcd-client talking to the proxy.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([&self.url], None).await.unwrap()
    }
}

/// A proxy config for `upstream` with delta frames on for `prefix` (dictionaries off, so the
/// stored bytes depend on the deltas alone).
pub fn delta_config(upstream: &str, prefix: &str) -> Config {
    ProxyConfig::new(upstream).prefix(prefix).delta(true).dictionaries(false).build()
}

/// A proxy configuration for a test, built from [`Config::default`]: listening on a free loopback
/// port, forwarding to the given etcd, compressing the default prefixes (FlyteWorkflow) unless
/// [`ProxyConfig::prefix`] or [`ProxyConfig::prefixes`] says otherwise.
///
/// `ProxyConfig::new(&etcd.url).prefix(FLYTE).delta(true).dictionaries(false).max_value_bytes(ByteSize::mib(2)).build()`;
/// settings without a method of their own go through [`ProxyConfig::with`].
#[must_use]
pub struct ProxyConfig {
    config: Config,
}

impl ProxyConfig {
    /// The defaults, in front of `upstream` (an `http://` or `https://` URL), on `127.0.0.1:0`.
    pub fn new(upstream: &str) -> Self {
        Self::endpoints([upstream])
    }

    /// The defaults, in front of several etcd endpoints, on `127.0.0.1:0`.
    pub fn endpoints<S: ToString>(upstreams: impl IntoIterator<Item = S>) -> Self {
        let mut config = Config::default();
        config.server.listen = "127.0.0.1:0".parse().unwrap();
        config.upstream.endpoints = upstreams.into_iter().map(|u| u.to_string()).collect();
        ProxyConfig { config }
    }

    /// Compresses `prefix` alone (with every default of a prefix rule).
    pub fn prefix(self, prefix: &str) -> Self {
        self.prefixes(&[prefix])
    }

    /// Compresses these prefixes (each with every default of a prefix rule).
    pub fn prefixes(mut self, prefixes: &[&str]) -> Self {
        self.config.prefixes = prefixes.iter().map(|p| PrefixConfig::new(*p)).collect();
        self
    }

    /// Delta frames on or off for every prefix set so far.
    pub fn delta(mut self, on: bool) -> Self {
        for rule in &mut self.config.prefixes {
            rule.delta = Some(on.into());
        }
        self
    }

    /// Trained dictionaries on or off (`dictionaries.enabled`).
    pub fn dictionaries(mut self, enabled: bool) -> Self {
        self.config.dictionaries.enabled = enabled;
        self
    }

    /// `limits.max_value_bytes`.
    pub fn max_value_bytes(mut self, limit: bytesize::ByteSize) -> Self {
        self.config.limits.max_value_bytes = limit;
        self
    }

    /// `limits.max_response_bytes`.
    pub fn max_response_bytes(mut self, limit: bytesize::ByteSize) -> Self {
        self.config.limits.max_response_bytes = limit;
        self
    }

    /// `upstream.connect_timeout`.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.upstream.connect_timeout = timeout;
        self
    }

    /// `health.probe_interval` and `health.probe_timeout`.
    pub fn probe(mut self, interval: Duration, timeout: Duration) -> Self {
        self.config.health.probe_interval = interval;
        self.config.health.probe_timeout = timeout;
        self
    }

    /// Announce the replica under `/etcd-squeeze/members/` (default on; off for tests comparing
    /// revisions with a second etcd: the announcement is a write).
    pub fn announce(mut self, on: bool) -> Self {
        self.config.announce = on;
        self
    }

    /// Any other setting.
    pub fn with(mut self, change: impl FnOnce(&mut Config)) -> Self {
        change(&mut self.config);
        self
    }

    /// The configuration.
    pub fn build(self) -> Config {
        self.config
    }

    /// Starts a proxy with this configuration ([`Proxy::start_config`]).
    pub async fn start(self) -> Proxy {
        Proxy::start_config(self.config).await
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
    /// With [`Env::with_auth`]: the proxy's `[upstream]` (its own user), for more proxies.
    pub proxy_upstream: Option<etcd_squeeze::config::UpstreamConfig>,
    /// Files that live as long as the environment (the proxy's etcd password).
    _files: Option<tempfile::TempDir>,
}

/// etcd users of [`Env::with_auth`]: `root`, the proxy's own user, and a user whose role is
/// limited to the FlyteWorkflow prefix. Password = name + "-pw".
pub const AUTH_ROOT: &str = "root";
/// The proxy's own etcd user: readwrite on `/etcd-squeeze/`.
pub const AUTH_PROXY: &str = "etcd-squeeze";
/// A user with readwrite on [`FLYTE`] only.
pub const AUTH_FLYTE: &str = "flyte";

impl Env {
    /// etcd + proxy compressing `prefix`.
    pub async fn new(prefix: &'static str) -> Env {
        let etcd = Etcd::start().await;
        let proxy = Proxy::start(&etcd.url, &[prefix]).await;
        let via = proxy.client().await;
        let direct = etcd.client().await;
        Env { proxy, etcd, via, direct, prefix, proxy_upstream: None, _files: None }
    }

    /// etcd with authentication on ([`AUTH_ROOT`], [`AUTH_PROXY`], [`AUTH_FLYTE`]); a proxy with
    /// delta frames on for [`FLYTE`] and `upstream.user` = [`AUTH_PROXY`]. `via` authenticates as
    /// `user`, `direct` as root.
    pub async fn with_auth(user: &str) -> Env {
        use etcd_client::{Permission, ConnectOptions};
        let etcd = Etcd::start().await;
        let mut admin = etcd.client().await;
        for name in [AUTH_ROOT, AUTH_PROXY, AUTH_FLYTE] {
            admin.user_add(name, format!("{name}-pw"), None).await.unwrap();
        }
        admin.user_grant_role(AUTH_ROOT, "root").await.unwrap();
        admin.role_add("etcd-squeeze").await.unwrap();
        admin.role_grant_permission("etcd-squeeze", Permission::read_write("/etcd-squeeze/").with_prefix()).await.unwrap();
        admin.user_grant_role(AUTH_PROXY, "etcd-squeeze").await.unwrap();
        admin.role_add("flyte").await.unwrap();
        admin.role_grant_permission("flyte", Permission::read_write(FLYTE).with_prefix()).await.unwrap();
        admin.user_grant_role(AUTH_FLYTE, "flyte").await.unwrap();
        admin.auth_enable().await.unwrap();
        let files = tempfile::tempdir().unwrap();
        let password = files.path().join("etcd-password");
        std::fs::write(&password, format!("{AUTH_PROXY}-pw\n")).unwrap();
        let config = ProxyConfig::new(&etcd.url)
            .prefix(FLYTE)
            .delta(true)
            .dictionaries(false)
            .with(|c| {
                c.upstream.user = Some(AUTH_PROXY.into());
                c.upstream.password_file = Some(password.clone());
            })
            .build();
        let proxy_upstream = Some(config.upstream.clone());
        let proxy = Proxy::start_config(config).await;
        let login = |name: &str| Some(ConnectOptions::new().with_user(name, format!("{name}-pw")));
        let via = etcd_client::Client::connect([&proxy.url], login(user)).await.unwrap();
        let direct = etcd_client::Client::connect([&etcd.url], login(AUTH_ROOT)).await.unwrap();
        Env { proxy, etcd, via, direct, prefix: FLYTE, proxy_upstream, _files: Some(files) }
    }

    /// etcd + proxy compressing `prefix` with delta frames off (every version on its own).
    pub async fn per_object(prefix: &'static str) -> Env {
        let etcd = Etcd::start().await;
        let proxy = ProxyConfig::new(&etcd.url).prefix(prefix).delta(false).start().await;
        let via = proxy.client().await;
        let direct = etcd.client().await;
        Env { proxy, etcd, via, direct, prefix, proxy_upstream: None, _files: None }
    }

    /// etcd and a proxy with delta frames on (`true`) for `prefix`, dictionaries off ([`delta_config`]).
    pub async fn with_delta(prefix: &'static str) -> Env {
        let etcd = Etcd::start().await;
        let proxy = Proxy::start_config(delta_config(&etcd.url, prefix)).await;
        let via = proxy.client().await;
        let direct = etcd.client().await;
        Env { proxy, etcd, via, direct, prefix, proxy_upstream: None, _files: None }
    }

    /// A FlyteWorkflow key (compressed in every suite).
    pub fn wf_key(&self, name: &str) -> String {
        format!("{FLYTE}flytesnacks-development/{name}")
    }

    /// True when keys outside the FlyteWorkflow prefix are compressed too (prefix "").
    pub fn compresses_everything(&self) -> bool {
        self.prefix.is_empty()
    }

    /// Runs `etcdctl` (API v3) against the proxy (as root when etcd's authentication is on); returns stdout.
    pub fn etcdctl(&self, args: &[&str], stdin: Option<&str>) -> String {
        let user = format!("--user={AUTH_ROOT}:{AUTH_ROOT}-pw");
        let args: Vec<&str> = self.proxy_upstream.iter().map(|_| user.as_str()).chain(args.iter().copied()).collect();
        etcdctl(&self.proxy.url, &args, stdin)
    }
}

/// Runs `etcdctl` (API v3) against `endpoint`; panics with stderr on failure.
///
/// The endpoint is given as `host:port` (etcdctl's own form); `etcdctl::endpoint_status_and_hashkv_through_the_proxy`
/// covers the `http://…` form, whose `:authority` the proxy's patched h2 accepts (patches/README.md).
pub fn etcdctl(endpoint: &str, args: &[&str], stdin: Option<&str>) -> String {
    let out = etcdctl_output(endpoint, args, stdin);
    assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `etcdctl` (API v3) against `endpoint` (`http://`, `https://` or `host:port`), whatever
/// its outcome.
pub fn etcdctl_output(endpoint: &str, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    use std::io::Write;
    let endpoint = endpoint.trim_start_matches("http://").trim_start_matches("https://");
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
    child.wait_with_output().unwrap()
}

/// Sends a signal (`TERM`, `STOP`, `CONT`) to a process we started.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status().unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

/// A plain HTTP/1.0 GET (the metrics listener, Prometheus' API): status code and body.
/// HTTP/1.0, so that the body is never chunked.
pub async fn http_get(base: &str, path_and_query: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = base.trim_start_matches("http://");
    let mut conn = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(host)).await??;
    conn.write_all(format!("GET {path_and_query} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, body.to_string()))
}

/// Percent-encodes a query parameter value.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of one sample in a Prometheus text scrape: `name{labels}` exactly as exposed
/// (labels sorted by name), or `name` alone for a metric without labels.
pub fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The resident set size (`VmRSS`) of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap()
}

/// Polls `check` every 100 ms until it is true; panics with `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// True under CI: the `CI` environment variable is set (CI services set `CI=true`), and neither
/// empty, `false` nor `0`.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "false" | "0"))
}

/// A test that cannot run here because `missing` is absent (a tool, a data set): under CI
/// ([`under_ci`]) the test fails, so that a CI machine lacking it is noticed; elsewhere it prints
/// a loud SKIPPED line and returns, and the caller returns too (the test passes).
pub fn skip_unless_ci(test: &str, missing: &str) {
    assert!(!under_ci(), "{test}: {missing}; CI is set, so this fails instead of being skipped");
    eprintln!("\n\n!!!!!!!!!! SKIPPED {test}: {missing} !!!!!!!!!!\n\n");
}

/// The shared FlyteWorkflow corpus (`../shared/corpus`, or `ETCD_SQUEEZE_CORPUS`), if present.
pub fn shared_corpus() -> Option<PathBuf> {
    let dir = std::env::var_os("ETCD_SQUEEZE_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus"));
    dir.is_dir().then_some(dir)
}


// ---------------------------------------------------------------------------------------------
// Values, Txns and bases: shared by the tests that compare the proxy with etcd
// ---------------------------------------------------------------------------------------------

/// A compressible JSON-ish value of about `n` bytes, different for each `tag`.
pub fn val(tag: usize, n: usize) -> Vec<u8> {
    let mut s = format!("{{\"tag\":{tag},\"items\":[");
    let mut i = 0;
    while s.len() < n.saturating_sub(3) {
        s.push_str(&format!("{{\"n\":\"item-{i}\",\"p\":{}}},", (i * 7 + tag) % 5));
        i += 1;
    }
    s.truncate(n.saturating_sub(3));
    s.push_str("]}\n");
    s.into_bytes()
}

/// 16 versions from creation to completion: the object grows and shrinks, forcing rebases.
pub fn drifting_series() -> Vec<Vec<u8>> {
    update_series(&Scenario::new(Topology::Dynamic { children: 1000 }, 100, 0), 16, 12).into_iter().map(|g| g.json).collect()
}

/// `n` consecutive propeller writes of one object: small changes, deltas against one base.
pub fn steady_series(n: usize) -> Vec<Vec<u8>> {
    consecutive_writes(&Scenario::new(Topology::Dynamic { children: 300 }, 100, 40), n, 5).into_iter().map(|g| g.json).collect()
}

/// (gRPC code, message) of a client error.
pub fn status(e: etcd_client::Error) -> (i32, String) {
    match e {
        etcd_client::Error::GRpcStatus(s) => (s.code() as i32, s.message().to_string()),
        other => (-1, other.to_string()),
    }
}

/// Shape of a Txn response: succeeded and, recursively, the kind of each op response.
pub fn shape(r: &etcd_client::TxnResponse) -> String {
    let mut out = format!("{}[", r.succeeded());
    for op in r.op_responses() {
        match op {
            TxnOpResponse::Put(p) => out.push_str(&format!("put(prev={}),", p.prev_key().is_some())),
            TxnOpResponse::Get(g) => out.push_str(&format!("get({}),", g.kvs().len())),
            TxnOpResponse::Delete(d) => out.push_str(&format!("del({},{}),", d.deleted(), d.prev_kvs().len())),
            TxnOpResponse::Txn(t) => out.push_str(&format!("txn({}),", shape(&t))),
        }
    }
    out.push(']');
    out
}

/// Every base key in etcd under `key`'s directory.
pub async fn bases_of(direct: &mut etcd_client::Client, key: &str) -> Vec<String> {
    let dir = bases_dir(key.as_bytes());
    let r = direct.get(dir, Some(GetOptions::new().with_prefix().with_keys_only())).await.unwrap();
    r.kvs().iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).collect()
}

/// How many base records etcd holds, of every key.
pub async fn all_bases(direct: &mut etcd_client::Client) -> usize {
    direct.get(BASES_PREFIX, Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap().count() as usize
}

/// The stored value of `key` (as etcd holds it) is either not a delta frame, or a delta frame
/// whose base exists in etcd now. Returns the codec.
pub async fn current_base_exists(direct: &mut etcd_client::Client, key: &str) -> Option<Codec> {
    let r = direct.get(key, None).await.unwrap();
    let kv = r.kvs().first()?;
    let f = frame::parse(kv.value()).ok()?;
    if let Some(b) = f.base {
        let bk = base_key(key.as_bytes(), b.id);
        let got = direct.get(bk.to_vec(), Some(GetOptions::new().with_count_only())).await.unwrap();
        assert_eq!(got.count(), 1, "the current value of {key} (rev {}) names base {:016x}, which is not in etcd", kv.mod_revision(), b.id);
    }
    Some(f.codec)
}

/// kube-apiserver's GuaranteedUpdate: `MOD(K) == rev → Put`, else `Get`.
pub async fn update(c: &mut etcd_client::Client, key: &str, rev: i64, v: &[u8]) -> etcd_client::TxnResponse {
    let txn = Txn::new().when([Compare::mod_revision(key, CompareOp::Equal, rev)]).and_then([TxnOp::put(key, v.to_vec(), None)]).or_else([TxnOp::get(key, None)]);
    c.txn(txn).await.unwrap()
}

/// A GuaranteedUpdate from a fresh read: reads `key`'s mod_revision (0 when absent), then
/// `MOD(K) == that → Put` (no failure branch).
pub async fn read_then_update(c: &mut etcd_client::Client, key: &str, v: &[u8]) -> etcd_client::TxnResponse {
    let m = c.get(key, None).await.unwrap().kvs().first().map_or(0, |kv| kv.mod_revision());
    c.txn(Txn::new().when([Compare::mod_revision(key, CompareOp::Equal, m)]).and_then([TxnOp::put(key, v.to_vec(), None)])).await.unwrap()
}

/// The value of `key` at revision `rev` (the current one when `rev` is 0), or the error.
pub async fn get_value(c: &mut etcd_client::Client, key: &str, rev: i64) -> Result<Option<Vec<u8>>, (i32, String)> {
    let opts = if rev > 0 { Some(GetOptions::new().with_revision(rev)) } else { None };
    c.get(key, opts).await.map(|r| r.kvs().first().map(|kv| kv.value().to_vec())).map_err(status)
}

/// `etcd_squeeze_decode_errors_total{reason}` of the proxy (in-process proxies share one
/// registry, so compare a before and an after: it only grows).
pub async fn decode_errors(metrics_url: &str, reason: &str) -> f64 {
    let (_, scrape) = http_get(metrics_url, "/metrics").await.unwrap();
    sample(&scrape, &format!("etcd_squeeze_decode_errors_total{{reason=\"{reason}\"}}")).unwrap_or(0.0)
}

/// `etcd_squeeze_decode_errors_total` summed over every reason.
pub async fn decode_errors_total(metrics_url: &str) -> f64 {
    let (_, scrape) = http_get(metrics_url, "/metrics").await.unwrap();
    scrape.lines().filter(|l| l.starts_with("etcd_squeeze_decode_errors_total{")).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// Runs one round of the orphan sweep (src/delta/sweep.rs) on the etcd at `url` as if compaction
/// and every replica's watches were past everything: the bases of deleted keys, and superseded
/// ones, go. A deleted key's bases are left to the sweep (a lagging watch may still need them).
pub async fn sweep_now(url: &str) {
    use etcd_squeeze::proto::etcdserverpb::{compare, Compare};
    let config = etcd_squeeze::config::UpstreamConfig { endpoints: vec![url.to_string()], ..Default::default() };
    let mut kv = etcd_squeeze::proto::etcdserverpb::kv_client::KvClient::new(etcd_squeeze::upstream::Upstream::new(&config).unwrap());
    // Holds always: no leadership to lose here.
    let guard = Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key: bytes::Bytes::from_static(b"/etcd-squeeze/no-such-key"),
        target_union: Some(compare::TargetUnion::CreateRevision(0)),
        ..Default::default()
    };
    let mut sweeper = etcd_squeeze::delta::sweep::Sweeper::default();
    sweeper.round(&mut kv, &[bytes::Bytes::new()], i64::MAX, &guard).await.unwrap();
}

/// Compacts at the current revision (a write first, so the revision moves) every 300 ms, as
/// kube-apiserver does every 5 minutes, until `done` holds (at most `timeout`).
pub async fn compact_until<F, Fut>(via: &mut etcd_client::Client, timeout: Duration, what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let rev = via.put("/tick", "x", None).await.unwrap().header().unwrap().revision();
        via.compact(rev, None).await.unwrap();
        if done().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
