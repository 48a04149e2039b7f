//! The Grafana dashboard, proven with real parts: Debian's `prometheus` scrapes a proxy under
//! traffic, and every PromQL expression of `deploy/grafana/etcd-squeeze.json` (and every
//! template variable query) is evaluated through Prometheus' HTTP API and must return data.
//! `promtool check metrics` must accept a scrape.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::WatchOptions;
use serde_json::Value;

use crate::harness::{eventually, free_port, http_get, url_encode, Env, FLYTE};

const DASHBOARD: &str = include_str!("../deploy/grafana/etcd-squeeze.json");

/// What Grafana substitutes before sending a query: the rate window (at least 4 scrape
/// intervals: 1 s here) and "All" for the multi-value variables.
const SUBSTITUTIONS: &[(&str, &str)] = &[("$__rate_interval", "15s"), ("$job", ".*"), ("$instance", ".*")];

/// A program from PATH, or from the environment variable `var`.
fn program(name: &str, var: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| PathBuf::from(d).join(name)).find(|p| p.is_file())
}

/// Every panel of the dashboard, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// `(panel title, PromQL)` of every target and every template variable query.
fn expressions(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dashboard) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((p["title"].as_str().unwrap().to_string(), t["expr"].as_str().expect("target expr").to_string()));
        }
    }
    for v in dashboard["templating"]["list"].as_array().unwrap().iter().filter(|v| v["type"] == "query") {
        out.push((format!("variable ${}", v["name"].as_str().unwrap()), v["definition"].as_str().unwrap().to_string()));
    }
    out
}

/// The dashboard is importable: one datasource variable that every panel and target uses, unique
/// panel ids, grid positions, and the panels the issue asks for.
#[test]
fn dashboard_is_importable() {
    let d: Value = serde_json::from_str(DASHBOARD).expect("valid JSON");
    assert_eq!(d["uid"], "etcd-squeeze");
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36);
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(vars.iter().any(|v| v["type"] == "datasource" && v["name"] == "datasource" && v["query"] == "prometheus"));
    let mut ids = std::collections::HashSet::new();
    for p in panels(&d) {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id {}", p["id"]);
        for k in ["h", "w", "x", "y"] {
            assert!(p["gridPos"][k].is_u64(), "panel {} has no gridPos.{k}", p["title"]);
        }
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {}", p["title"]);
            for t in p["targets"].as_array().unwrap() {
                assert_eq!(t["datasource"]["uid"], "${datasource}", "a target of {}", p["title"]);
            }
        }
    }
    let titles: Vec<&str> = panels(&d).iter().map(|p| p["title"].as_str().unwrap()).collect();
    for want in [
        "Compression ratio by prefix", "Bytes saved per second by prefix", "Request rate by method", "Errors by method and code",
        "Latency by method (p50, p99)", "Watch streams", "Dictionary cache", "Delta writes by kind", "Base cache", "etcd endpoints up", "Connections to etcd",
    ] {
        assert!(titles.contains(&want), "no panel {want:?}");
    }
    for (title, expr) in expressions(&d) {
        let mut e = expr.clone();
        for (var, value) in SUBSTITUTIONS {
            e = e.replace(var, value);
        }
        assert!(!e.contains('$'), "{title}: {expr} uses a variable the test does not know");
    }
}

/// Runs Prometheus on free loopback ports in a temporary directory; killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(bin: &PathBuf, target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: etcd-squeeze\n    \
                 static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let p = Prometheus { child, url: format!("http://127.0.0.1:{port}"), _dir: dir };
        eventually(Duration::from_secs(30), "Prometheus to be ready", || async {
            matches!(http_get(&p.url, "/-/ready").await, Ok((200, _)))
        })
        .await;
        p
    }

    /// An instant query: the `data` of a successful answer.
    async fn query(&self, promql: &str) -> Result<Value, String> {
        let (status, body) = http_get(&self.url, &format!("/api/v1/query?query={}", url_encode(promql))).await.map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("HTTP {status}: {e}: {body}"))?;
        if v["status"] != "success" {
            return Err(format!("HTTP {status}: {body}"));
        }
        Ok(v["data"].clone())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Traffic like kube-apiserver's, plus a value that cannot be decoded, until `stop` (at most 2 minutes).
async fn traffic(env: &Env, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    let mut client = env.proxy.client().await;
    let mut direct = env.etcd.client().await;
    let corrupt = env.wf_key("corrupt");
    direct.put(corrupt.as_str(), &b"\xFFSQZ\x01\x01\0\0\0\0not zstd"[..], None).await.unwrap();
    let prefix = env.wf_key("live/");
    let objects = etcd_squeeze::corpus::small_set(8);
    tokio::spawn(async move {
        let mut watch = client.watch(prefix.as_str(), Some(WatchOptions::new().with_prefix().with_prev_key())).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let obj = &objects[i % objects.len()];
            client.put(format!("{prefix}wf-{}", i % 5), obj.json.clone(), None).await.unwrap();
            client.put(format!("{prefix}tiny"), "{}", None).await.unwrap();
            client.get(format!("{prefix}wf-{}", i % 5), None).await.unwrap();
            // Passed on as stored (and counted in etcd_squeeze_decode_errors_total).
            let got = client.get(corrupt.as_str(), None).await.unwrap();
            assert!(etcd_squeeze::codec::frame::is_framed(got.kvs()[0].value()));
            while let Ok(Ok(Some(_))) = tokio::time::timeout(Duration::from_millis(1), watch.message()).await {}
            i += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_prometheus() {
    let (Some(prometheus), Some(promtool)) = (program("prometheus", "PROMETHEUS_BIN"), program("promtool", "PROMTOOL_BIN")) else {
        crate::harness::skip_unless_ci(
            "every_dashboard_query_returns_data_from_prometheus",
            "no `prometheus` and `promtool` (Debian package `prometheus`; scripts/test installs it)",
        );
        return;
    };
    let env = Env::new(FLYTE).await;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = traffic(&env, stop.clone()).await;
    let prom = Prometheus::start(&prometheus, env.proxy.metrics_url.trim_start_matches("http://")).await;

    // Enough samples for rate() over the substituted window.
    eventually(Duration::from_secs(60), "Prometheus to hold 5 scrapes", || async {
        prom.query("count_over_time(etcd_squeeze_build_info[1m])").await.is_ok_and(|d| {
            d["result"][0]["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()).is_some_and(|n| n >= 5.0)
        })
    })
    .await;

    let dashboard: Value = serde_json::from_str(DASHBOARD).unwrap();
    let exprs = expressions(&dashboard);
    let mut failures = Vec::new();
    for (title, expr) in &exprs {
        let (promql, label) = match expr.strip_prefix("label_values(").and_then(|r| r.strip_suffix(')')) {
            // label_values(selector, label): the selector must return series carrying the label.
            Some(args) => {
                let (selector, label) = args.rsplit_once(',').unwrap();
                (selector.trim().to_string(), Some(label.trim().to_string()))
            }
            None => (expr.clone(), None),
        };
        let promql = SUBSTITUTIONS.iter().fold(promql, |e, (var, value)| e.replace(var, value));
        let deadline = Instant::now() + Duration::from_secs(20);
        let outcome = loop {
            let outcome = match prom.query(&promql).await {
                Ok(data) => {
                    let result = data["result"].as_array().cloned().unwrap_or_default();
                    match &label {
                        _ if result.is_empty() => Err("no data".to_string()),
                        Some(l) if !result.iter().all(|s| s["metric"][l].is_string()) => Err(format!("series without label {l}")),
                        _ => Ok(result.len()),
                    }
                }
                Err(e) => Err(e),
            };
            if outcome.is_ok() || Instant::now() > deadline {
                break outcome;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        match outcome {
            Ok(n) => eprintln!("ok   {title}: {n} series: {promql}"),
            Err(e) => failures.push(format!("{title}: {promql}: {e}")),
        }
    }
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    assert!(failures.is_empty(), "dashboard queries without data:\n{}", failures.join("\n"));
    assert!(exprs.len() >= 30, "{} expressions", exprs.len());

    // promtool lints a real scrape (naming rules: _total counters, base units, help texts).
    let (_, scrape) = http_get(&env.proxy.metrics_url, "/metrics").await.unwrap();
    let mut check = Command::new(promtool).args(["check", "metrics"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(&mut check.stdin.take().unwrap(), scrape.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
