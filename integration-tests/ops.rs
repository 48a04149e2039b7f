//! Running it in production: metrics, /healthz and /readyz, the gRPC health service following
//! etcd, an unreachable endpoint skipped (and calls failing over to the endpoint that is up), JSON logs without values, and SIGTERM handling on the
//! real binary.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{GetOptions, WatchOptions};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::harness::{eventually, free_port, http_get, sample, signal, Env, Etcd, Proxy, ProxyConfig, FLYTE};

/// A value that cannot be decoded: the frame magic, version 1, codec zstd, no dictionary, and
/// a payload that is not a zstd frame.
const CORRUPT_FRAME: &[u8] = b"\xFFSQZ\x01\x01\0\0\0\0not zstd at all";

async fn scrape(proxy: &Proxy) -> String {
    let (status, body) = http_get(&proxy.metrics_url, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    body
}

async fn grpc_health(proxy: &Proxy) -> i32 {
    let channel = tonic::transport::Endpoint::from_shared(proxy.url.clone()).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap().into_inner().status
}

/// Every kind of event shows in /metrics: requests by method and code with latency, bytes
/// before and after compression per prefix, decode errors by kind, watch streams and events,
/// upstream connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happens() {
    let mut env = Env::new(FLYTE).await;
    assert_eq!(http_get(&env.proxy.metrics_url, "/healthz").await.unwrap(), (200, "ok\n".into()));
    assert_eq!(http_get(&env.proxy.metrics_url, "/readyz").await.unwrap(), (200, "ok\n".into()));
    assert_eq!(http_get(&env.proxy.metrics_url, "/nothing").await.unwrap().0, 404);

    let key = env.wf_key("w/metrics");
    let mut watch = env.via.watch(env.wf_key("w/").as_str(), Some(WatchOptions::new().with_prefix())).await.unwrap();
    let obj = etcd_squeeze::corpus::small_set(4).remove(3).json;
    env.via.put(key.as_str(), obj.clone(), None).await.unwrap();
    env.via.put(env.wf_key("w/tiny").as_str(), "{}", None).await.unwrap();
    assert_eq!(env.via.get(key.as_str(), None).await.unwrap().kvs()[0].value(), &obj[..]);
    let mut events = 0;
    while events < 2 {
        events += tokio::time::timeout(Duration::from_secs(10), watch.message()).await.unwrap().unwrap().unwrap().events().len();
    }
    env.direct.put(env.wf_key("corrupt").as_str(), CORRUPT_FRAME, None).await.unwrap();
    // Passed on as stored (as etcd would answer), and counted.
    assert_eq!(env.via.get(env.wf_key("corrupt").as_str(), None).await.unwrap().kvs()[0].value(), CORRUPT_FRAME);

    let text = scrape(&env.proxy).await;
    let at_least = |series: &str, min: f64| {
        let v = sample(&text, series).unwrap_or_else(|| panic!("no sample {series} in\n{text}"));
        assert!(v >= min, "{series} = {v}, expected at least {min}");
        v
    };
    at_least("etcd_squeeze_grpc_requests_total{code=\"OK\",method=\"/etcdserverpb.KV/Put\"}", 2.0);
    at_least("etcd_squeeze_grpc_request_duration_seconds_count{method=\"/etcdserverpb.KV/Range\"}", 2.0);
    at_least("etcd_squeeze_decode_errors_total{reason=\"zstd\"}", 1.0);
    let logical = at_least(&format!("etcd_squeeze_values_logical_bytes_total{{prefix=\"{FLYTE}\"}}"), obj.len() as f64);
    let stored = at_least(&format!("etcd_squeeze_values_stored_bytes_total{{prefix=\"{FLYTE}\"}}"), 1.0);
    assert!(logical > 3.0 * stored, "FlyteWorkflow objects compress: {logical} -> {stored}");
    at_least(&format!("etcd_squeeze_values_written_total{{outcome=\"compressed\",prefix=\"{FLYTE}\"}}"), 1.0);
    at_least(&format!("etcd_squeeze_values_written_total{{outcome=\"raw_frame\",prefix=\"{FLYTE}\"}}"), 1.0);
    at_least("etcd_squeeze_watch_streams_active", 1.0);
    at_least("etcd_squeeze_watch_events_total", 2.0);
    at_least("etcd_squeeze_grpc_inflight_requests", 1.0); // the watch
    at_least(&format!("etcd_squeeze_upstream_connections_open{{endpoint=\"{}\"}}", env.etcd.url), 1.0);
    at_least(&format!("etcd_squeeze_upstream_connects_total{{endpoint=\"{}\",result=\"ok\"}}", env.etcd.url), 1.0);
    at_least(&format!("etcd_squeeze_upstream_up{{endpoint=\"{}\"}}", env.etcd.url), 1.0);
    // The metrics are process-wide and every in-process proxy publishes its readiness to the same
    // gauge; one of a test that just ended publishes 0 until the live ones probe again: wait for that.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut ready = sample(&text, "etcd_squeeze_ready");
    while ready != Some(1.0) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        ready = sample(&scrape(&env.proxy).await, "etcd_squeeze_ready");
    }
    assert_eq!(ready, Some(1.0), "etcd_squeeze_ready");
    at_least("etcd_squeeze_dictionary_cache_hits_total", 0.0);
    at_least(&format!("etcd_squeeze_build_info{{version=\"{}\"}}", etcd_squeeze::VERSION), 1.0);
}

/// `/readyz`, `etcd_squeeze_ready` and the gRPC health service follow etcd: NOT_SERVING while
/// etcd does not answer, SERVING again when it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_etcd() {
    let etcd = Etcd::start().await;
    let proxy = ProxyConfig::new(&etcd.url).probe(Duration::from_millis(200), Duration::from_millis(300)).start().await;
    assert_eq!(grpc_health(&proxy).await, ServingStatus::Serving as i32);

    etcd.freeze(true);
    eventually(Duration::from_secs(10), "/readyz to fail", || async {
        let (status, body) = http_get(&proxy.metrics_url, "/readyz").await.unwrap();
        status == 503 && body.contains("not ready") && body.contains(&etcd.url)
    })
    .await;
    assert_eq!(grpc_health(&proxy).await, ServingStatus::NotServing as i32);
    assert_eq!(sample(&scrape(&proxy).await, &format!("etcd_squeeze_upstream_up{{endpoint=\"{}\"}}", etcd.url)), Some(0.0));
    assert_eq!(http_get(&proxy.metrics_url, "/healthz").await.unwrap().0, 200, "alive all the same");

    etcd.freeze(false);
    eventually(Duration::from_secs(10), "/readyz to succeed", || async { http_get(&proxy.metrics_url, "/readyz").await.unwrap().0 == 200 }).await;
    assert_eq!(grpc_health(&proxy).await, ServingStatus::Serving as i32);
}

/// With two endpoints, one of which refuses connections, every call is served by the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_is_skipped() {
    let etcd = Etcd::start().await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let proxy = ProxyConfig::endpoints([dead.clone(), etcd.url.clone()]).start().await;
    let mut via = proxy.client().await;
    for i in 0..20 {
        via.put(format!("{FLYTE}ns/{i}"), "{}", None).await.unwrap();
    }
    assert_eq!(via.get(FLYTE, Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap().count(), 20);
    let text = scrape(&proxy).await;
    assert_eq!(sample(&text, &format!("etcd_squeeze_upstream_up{{endpoint=\"{dead}\"}}")), Some(0.0));
    assert_eq!(sample(&text, &format!("etcd_squeeze_upstream_up{{endpoint=\"{}\"}}", etcd.url)), Some(1.0));
    assert_eq!(http_get(&proxy.metrics_url, "/readyz").await.unwrap().0, 200);
}

/// Several upstream endpoints: calls go to the ones that are up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failover_skips_a_dead_endpoint() {
    let etcd = Etcd::start().await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let proxy = ProxyConfig::endpoints([dead, etcd.url.clone()]).connect_timeout(Duration::from_millis(500)).start().await;
    let mut via = proxy.client().await;
    let key = format!("{FLYTE}ns/failover");
    for i in 0..20 {
        via.put(key.as_str(), format!("{{\"n\":{i}}}"), None).await.unwrap();
        assert_eq!(via.get(key.as_str(), None).await.unwrap().kvs()[0].value(), format!("{{\"n\":{i}}}").as_bytes());
    }
}

/// A config file for the real binary: `[server]` on `listen_ip` with `server` keys added, etcd at
/// `upstream`, metrics on loopback, then `more` (other sections).
pub(crate) struct BinaryConfig<'a> {
    pub listen_ip: &'a str,
    pub upstream: &'a str,
    pub server: &'a str,
    pub more: &'a str,
}

impl BinaryConfig<'_> {
    fn render(&self, port: u16, metrics: u16) -> String {
        let BinaryConfig { listen_ip, upstream, server, more } = self;
        format!(
            "[server]\nlisten = \"{listen_ip}:{port}\"\n{server}\n[upstream]\nendpoints = [\"{upstream}\"]\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n{more}\n"
        )
    }
}

/// The real binary, started with a config file on free ports, its stderr in `log`. Killed on
/// drop if still running.
pub(crate) struct Binary {
    pub child: std::process::Child,
    pub port: u16,
    pub url: String,
    pub metrics_url: String,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Binary {
    pub async fn start(config: BinaryConfig<'_>) -> Binary {
        Self::start_on(config, free_port(), free_port()).await
    }

    /// Starts the binary on the given ports (a restart after a kill reuses the old ones).
    pub async fn start_on(config: BinaryConfig<'_>, port: u16, metrics: u16) -> Binary {
        Self::start_with(config, port, metrics, &[]).await
    }

    /// Starts the binary with more `serve` arguments.
    pub async fn start_args(config: BinaryConfig<'_>, args: &[&str]) -> Binary {
        Self::start_with(config, free_port(), free_port(), args).await
    }

    async fn start_with(config: BinaryConfig<'_>, port: u16, metrics: u16, args: &[&str]) -> Binary {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etcd-squeeze.toml");
        std::fs::write(&path, config.render(port, metrics)).unwrap();
        let log = dir.path().join("proxy.log");
        let child = Command::new(env!("CARGO_BIN_EXE_etcd-squeeze"))
            .args(["serve", "--config"])
            .arg(&path)
            .args(args)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let b = Binary { child, port, url: format!("http://127.0.0.1:{port}"), metrics_url: format!("http://127.0.0.1:{metrics}"), log, _dir: dir };
        eventually(Duration::from_secs(20), "the proxy to be ready", || async {
            matches!(http_get(&b.metrics_url, "/readyz").await, Ok((200, _)))
        })
        .await;
        b
    }

    /// Waits for the process to exit (at most `timeout`); its status and its log.
    async fn exit(&mut self, timeout: Duration) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the proxy did not exit within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        (status, std::fs::read_to_string(&self.log).unwrap())
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_unavailable(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::Unavailable)
}

/// SIGTERM on the real binary: the listener closes, Watch and LeaseKeepAlive streams end with
/// UNAVAILABLE at once, a unary call in flight (etcd frozen under it) still completes, and the
/// process exits 0. Its JSON logs never contain a value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_streams_drains_unary_calls_and_exits_zero() {
    let etcd = Etcd::start().await;
    let mut proxy = Binary::start(BinaryConfig {
        listen_ip: "127.0.0.1",
        upstream: &etcd.url,
        server: "shutdown_grace = \"20s\"",
        more: "[log]\nlevel = \"etcd_squeeze=trace,info\"\nformat = \"json\"",
    })
    .await;
    let url = proxy.url.clone();

    // A value that must never appear in the logs, even at trace level.
    let secret = "value-bytes-never-logged-7f3a";
    let key = format!("{FLYTE}ns/drain");
    let value = format!("{{\"spec\":\"{secret}\",\"status\":\"{}\"}}", "running ".repeat(100));
    let mut streams = etcd_client::Client::connect([&url], None).await.unwrap();
    streams.put(key.as_str(), value.as_str(), None).await.unwrap();
    let mut watch = streams.watch(FLYTE, Some(WatchOptions::new().with_prefix())).await.unwrap();
    assert!(watch.message().await.unwrap().unwrap().created());
    let lease = streams.lease_grant(60, None).await.unwrap().id();
    let (mut keeper, mut keepalives) = streams.lease_keep_alive(lease).await.unwrap();
    keeper.keep_alive().await.unwrap();
    keepalives.message().await.unwrap().unwrap();

    // A unary call in flight: etcd is frozen under it.
    etcd.freeze(true);
    let mut unary = etcd_client::Client::connect([&url], None).await.unwrap();
    let key2 = key.clone();
    let in_flight = tokio::spawn(async move { unary.get(key2.as_str(), None).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!in_flight.is_finished());

    let sigterm = Instant::now();
    signal(proxy.child.id(), "TERM");
    let ended = tokio::time::timeout(Duration::from_secs(5), watch.message()).await.expect("the watch ends at once");
    assert!(ended.as_ref().is_err_and(is_unavailable), "the watch ends with UNAVAILABLE: {ended:?}");
    let ended = tokio::time::timeout(Duration::from_secs(5), keepalives.message()).await.expect("LeaseKeepAlive ends at once");
    assert!(ended.as_ref().is_err_and(is_unavailable), "LeaseKeepAlive ends with UNAVAILABLE: {ended:?}");
    eventually(Duration::from_secs(5), "the listener to close", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", proxy.port)).await.is_err()
    })
    .await;
    assert!(sigterm.elapsed() < Duration::from_secs(5));
    assert!(!in_flight.is_finished(), "the unary call waits for etcd");

    etcd.freeze(false);
    let got = tokio::time::timeout(Duration::from_secs(10), in_flight).await.unwrap().unwrap().expect("the in-flight Range completes");
    assert_eq!(got.kvs()[0].value(), value.as_bytes());
    let (status, log) = proxy.exit(Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status:?}; log:\n{log}");

    for line in log.lines() {
        let json: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(json.get("level").is_some(), "{line}");
    }
    assert!(log.contains("signal received") && log.contains("stopped"), "{log}");
    assert!(log.contains("\"level\":\"TRACE\"") || log.contains("\"level\":\"DEBUG\""), "logs at trace level: {log}");
    assert!(!log.contains(secret), "a value was logged:\n{log}");
}

/// Plain text beyond loopback: refused without `server.allow_non_loopback`, and with it the
/// proxy serves but logs a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_beyond_loopback_needs_the_flag_and_warns() {
    let etcd = Etcd::start().await;
    let config = |server| BinaryConfig { listen_ip: "0.0.0.0", upstream: &etcd.url, server, more: "" };
    let dir = tempfile::tempdir().unwrap();
    let refused_config = dir.path().join("refused.toml");
    std::fs::write(&refused_config, config("allow_non_loopback = false").render(free_port(), 0)).unwrap();
    let refused = Command::new(env!("CARGO_BIN_EXE_etcd-squeeze")).args(["serve", "--config"]).arg(&refused_config).output().unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("server.listen") && stderr.contains("allow_non_loopback"), "{stderr}");

    let mut proxy = Binary::start(config("allow_non_loopback = true")).await;
    let mut via = etcd_client::Client::connect([proxy.url.as_str()], None).await.unwrap();
    via.put(format!("{FLYTE}ns/x"), "{}", None).await.unwrap();
    signal(proxy.child.id(), "TERM");
    let (status, log) = proxy.exit(Duration::from_secs(15)).await;
    assert!(status.success());
    assert!(log.contains("WARN") && log.contains("plain text beyond loopback"), "{log}");
}

/// `server.shutdown_grace` bounds the drain: a call still waiting for etcd when it expires is
/// cut, and the process exits 0 all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_grace_bounds_the_drain() {
    let etcd = Etcd::start().await;
    let mut proxy = Binary::start(BinaryConfig { listen_ip: "127.0.0.1", upstream: &etcd.url, server: "shutdown_grace = \"1s\"", more: "" }).await;
    let mut client = etcd_client::Client::connect([proxy.url.as_str()], None).await.unwrap();
    client.put(format!("{FLYTE}ns/x"), "{}", None).await.unwrap();
    etcd.freeze(true);
    let in_flight = tokio::spawn(async move { client.get(format!("{FLYTE}ns/x"), None).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sigterm = Instant::now();
    signal(proxy.child.id(), "TERM");
    let (status, log) = proxy.exit(Duration::from_secs(10)).await;
    let took = sigterm.elapsed();
    etcd.freeze(false);
    assert!(status.success(), "{log}");
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(5), "exited after {took:?}");
    assert!(log.contains("shutdown_grace expired"), "{log}");
    assert!(tokio::time::timeout(Duration::from_secs(5), in_flight).await.unwrap().unwrap().is_err(), "the cut call fails");
}
