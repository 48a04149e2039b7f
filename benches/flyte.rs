//! A Flyte-shaped write stream (issue 15), side by side in one run, on a real etcd per front.
//!
//! ```text
//! cargo bench --bench flyte -- [--workflows 200] [--versions 12] [--life] [--compact-every 10] [--clients 8]
//!                              [--memory-keys 1000 (0: part A only)] [--markdown FILE]
//!                              [--rounds 1] [--fronts direct,default,per-object[,baseline]] [--baseline-bin PATH]
//! ```
//!
//! A. **Workflows in flight.** `--workflows` FlyteWorkflows progress concurrently (propeller
//!    round-robins over them), each through `--versions` consecutive status changes from a point
//!    of its life between 0 and 90 % done (`--life`: versions spread over the whole life instead),
//!    the same work on every front: each status change is kube-apiserver's GuaranteedUpdate of the
//!    whole object (Txn `MOD(K) == rev` → Put, else Range), the versions from the realistic
//!    generator (`src/corpus`, dynamic fan-outs of 300 to 10,000 children: ~20 KB to ~250 KB). Two watchers follow the prefix with prev_kv (the apiserver's watch cache and one
//!    more); etcd is compacted every `--compact-every` seconds (kube-apiserver: every 5 minutes;
//!    scaled to the run). Fronts: etcd directly; etcd-squeeze with its default configuration
//!    (FlyteWorkflow prefix, `delta = "auto"`, dictionaries); etcd-squeeze per-object zstd
//!    (`delta = false`). Reported: etcd's DB size at the end (and in use), bytes etcd received
//!    from its clients (its `etcd_network_client_grpc_received_bytes_total`), updates/s, p50/p99,
//!    the proxy's CPU seconds and peak RSS (/proc).
//! B. **The base cache at scale.** `--memory-keys` keys of ~180 KB–900 KB (running dynamic fan-outs,
//!    consecutive propeller rounds) updated in turn, twice
//!    (a create, then an update of each), through the default configuration: the proxy's peak RSS
//!    against its budgets, and what base cache misses cost etcd per update (base records read and
//!    their bytes, `etcd_squeeze_base_fetch*`).
//!
//! `--rounds N` runs every front N times, interleaved (direct, default, per-object, direct, …), and
//! reports for each front its median run and its updates/s as a share of direct etcd's in the same
//! round (median over the rounds): throughput on a shared 2-core machine moves by ~20 % from one
//! minute to the next, so only ratios taken side by side mean anything. `--baseline-bin PATH`: an
//! etcd-squeeze built from another commit, measured with the default configuration as one more
//! front (`git worktree add /tmp/base REV && (cd /tmp/base && cargo build --release --bin etcd-squeeze)`).
//!
//! Under `cargo test --all-targets` (no `--bench` argument) a seconds-long smoke run with a few
//! small workflows checks that every front runs and every value reads back.

use std::path::Path;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, WatchOptions};
use etcd_squeeze::corpus::{consecutive_writes, update_series, Scenario, Topology};
use hdrhistogram::Histogram;

mod common;
use common::{ms, Etcd};

const PREFIX: &str = "/registry/flyte.lyft.com/flyteworkflows/bench/";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Front {
    Direct,
    Default,
    PerObject,
    /// The default configuration, on the binary of `--baseline-bin`.
    Baseline,
}

impl Front {
    fn name(self) -> &'static str {
        match self {
            Front::Direct => "etcd directly",
            Front::Default => "etcd-squeeze, default (delta \"auto\")",
            Front::PerObject => "etcd-squeeze, per-object zstd (delta = false)",
            Front::Baseline => "etcd-squeeze baseline build, default",
        }
    }
}

struct Args {
    workflows: usize,
    versions: usize,
    compact_every: u64,
    clients: usize,
    memory_keys: usize,
    /// `--life`: versions spread over each workflow's whole life instead of consecutive status changes.
    life: bool,
    markdown: Option<String>,
    smoke: bool,
    rounds: usize,
    fronts: Vec<Front>,
    baseline: Option<std::path::PathBuf>,
}

fn parse_args() -> Args {
    let argv: Vec<String> = std::env::args().collect();
    let smoke = !argv.iter().any(|a| a == "--bench");
    let value = |name: &str| argv.iter().position(|a| a == name).and_then(|i| argv.get(i + 1)).cloned();
    let num = |name: &str, full: u64, quick: u64| value(name).and_then(|v| v.parse().ok()).unwrap_or(if smoke { quick } else { full });
    Args {
        workflows: num("--workflows", 200, 6) as usize,
        versions: num("--versions", 12, 4) as usize,
        compact_every: num("--compact-every", 10, 1),
        clients: num("--clients", 8, 2) as usize,
        memory_keys: num("--memory-keys", 1000, 6) as usize,
        life: argv.iter().any(|a| a == "--life"),
        markdown: value("--markdown"),
        smoke,
        rounds: num("--rounds", 1, 1).max(1) as usize,
        fronts: value("--fronts").map_or_else(
            || {
                let mut f = vec![Front::Direct, Front::Default, Front::PerObject];
                f.extend(value("--baseline-bin").map(|_| Front::Baseline));
                f
            },
            |list| {
                list.split(',')
                    .map(|name| match name {
                        "direct" => Front::Direct,
                        "default" => Front::Default,
                        "per-object" => Front::PerObject,
                        "baseline" => Front::Baseline,
                        other => panic!("unknown front {other:?} (direct, default, per-object, baseline)"),
                    })
                    .collect()
            },
        ),
        baseline: value("--baseline-bin").map(std::path::PathBuf::from),
    }
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The proxy for `front` on `etcd` (None: etcd directly): its process, client URL and metrics URL.
async fn start_front(front: Front, etcd: &str, dir: &Path, args: &Args) -> Option<(Proc, String, String)> {
    let (port, metrics) = (common::free_port(), common::free_port());
    let prefixes = match front {
        Front::Direct => return None,
        Front::Default | Front::Baseline => "",
        Front::PerObject => "[[prefixes]]\nprefix = \"/registry/flyte.lyft.com/flyteworkflows/\"\ndelta = false\n",
    };
    let config = dir.join("squeeze.toml");
    std::fs::write(
        &config,
        format!("[server]\nlisten = \"127.0.0.1:{port}\"\n[upstream]\nendpoints = [\"{etcd}\"]\n{prefixes}[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n[log]\nlevel = \"warn\"\n"),
    )
    .unwrap();
    let bin = match front {
        Front::Baseline => args.baseline.clone().expect("--baseline-bin PATH"),
        _ => std::path::PathBuf::from(env!("CARGO_BIN_EXE_etcd-squeeze")),
    };
    let child = common::squeeze(&bin, &config);
    let url = format!("http://127.0.0.1:{port}");
    common::connect(&url, Duration::from_secs(30)).await;
    Some((Proc(child), url, format!("http://127.0.0.1:{metrics}/metrics")))
}

/// CPU seconds (user + system) and peak RSS in bytes of a process, from /proc.
fn cpu_and_rss(pid: u32) -> (f64, u64) {
    let (user, system) = common::cpu_ticks(pid);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()).unwrap_or(0) * 1024;
    ((user + system) as f64 / 100.0, rss)
}

/// A Prometheus text exposition's sum of the samples of `name` (every label set).
async fn scrape(url: &str, name: &str) -> f64 {
    let Ok(resp) = reqwest_like_get(url).await else { return 0.0 };
    // `name` alone sums every label set; `name{label="v"` (no closing brace) picks one.
    resp.lines()
        .filter(|l| l.starts_with(name) && (name.contains('{') || l[name.len()..].starts_with([' ', '{'])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// GET `url` (plain HTTP/1.1 on loopback) and return the body.
async fn reqwest_like_get(url: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut s = tokio::net::TcpStream::connect(host).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes()).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).into_owned();
    Ok(text.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string()))
}

/// Version sequences of the realistic generator: `n` workflows of `versions` versions each,
/// dynamic fan-outs with `children` cycling through the given sizes. `life`: spread evenly from
/// creation to completion (`corpus::update_series`: far apart); else consecutive status changes
/// (propeller rounds, `corpus::consecutive_writes`) from a point of each workflow's life between
/// 0 and 90 % done.
fn pool(n: usize, versions: usize, children: &[usize], life: bool) -> Vec<Vec<Vec<u8>>> {
    (0..n)
        .map(|i| {
            let topology = Topology::Dynamic { children: children[i % children.len()] };
            let seed = 1000 + i as u64;
            let versions = if life {
                update_series(&Scenario::new(topology, 100, 0), versions, seed)
            } else {
                consecutive_writes(&Scenario::new(topology, 100, ((i * 37) % 91) as u8), versions, seed)
            };
            versions.into_iter().map(|g| g.json).collect()
        })
        .collect()
}

/// kube-apiserver's GuaranteedUpdate: `MOD(K) == rev` → Put, else Range (the current version).
/// Returns the new mod_revision (or the current one after a conflict) and whether it applied.
async fn guaranteed_update(c: &mut Client, key: &str, rev: i64, value: &[u8]) -> (i64, bool) {
    let txn = Txn::new().when([Compare::mod_revision(key, CompareOp::Equal, rev)]).and_then([TxnOp::put(key, value.to_vec(), None)]).or_else([TxnOp::get(key, None)]);
    let resp = c.txn(txn).await.unwrap();
    if resp.succeeded() {
        return (resp.header().unwrap().revision(), true);
    }
    let current = match resp.op_responses().into_iter().next() {
        Some(etcd_client::TxnOpResponse::Get(g)) => g.kvs().first().map_or(0, |kv| kv.mod_revision()),
        _ => 0,
    };
    (current, false)
}

#[derive(Default, Clone)]
struct Row {
    front: String,
    updates: u64,
    seconds: f64,
    p50: f64,
    p99: f64,
    db_size: i64,
    db_in_use: i64,
    received: f64,
    cpu: f64,
    rss: u64,
    watch_events: u64,
    compactions: u64,
    /// Writes stored as delta frames, and of those, rebases (a new base in the same Txn).
    deltas: f64,
    rebases: f64,
    /// Bases not in memory decompressed (`etcd_squeeze_base_cache_misses_total`), and delta
    /// frames not decompressed because decoded or written lately (`etcd_squeeze_decoded_recalls_total`).
    base_misses: f64,
    recalls: f64,
}

async fn run_front(front: Front, series: &[Vec<Vec<u8>>], args: &Args) -> Row {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_front(front, &etcd.url, dir.path(), args).await;
    let url = proxy.as_ref().map_or(etcd.url.clone(), |(_, u, _)| u.clone());
    let etcd_metrics = format!("{}/metrics", etcd.url);
    let received_before = scrape(&etcd_metrics, "etcd_network_client_grpc_received_bytes_total").await;
    let cpu_before = proxy.as_ref().map_or(0.0, |(p, _, _)| cpu_and_rss(p.0.id()).0);
    let stop = Arc::new(AtomicBool::new(false));
    // Watchers on the prefix with prev_kv.
    let events = Arc::new(AtomicU64::new(0));
    let mut watchers = Vec::new();
    for _ in 0..2 {
        let mut c = common::connect(&url, Duration::from_secs(10)).await;
        let (events, stop) = (events.clone(), stop.clone());
        watchers.push(tokio::spawn(async move {
            let mut stream = c.watch(PREFIX, Some(WatchOptions::new().with_prefix().with_prev_key())).await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_millis(200), stream.message()).await {
                    Ok(Ok(Some(r))) => {
                        events.fetch_add(r.events().len() as u64, Ordering::Relaxed);
                    }
                    Ok(_) => break,
                    Err(_) => {}
                }
            }
        }));
    }
    // The compactor.
    let compactions = Arc::new(AtomicU64::new(0));
    let compactor = {
        let (mut c, stop, n, every) = (common::connect(&url, Duration::from_secs(10)).await, stop.clone(), compactions.clone(), args.compact_every);
        tokio::spawn(async move {
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(every)).await;
                let rev = c.get("/compaction-tick", None).await.unwrap().header().unwrap().revision();
                if rev > last && c.compact(rev, None).await.is_ok() {
                    last = rev;
                    n.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    // Clients, each round-robin over its share of the workflows.
    let started = Instant::now();
    let rounds = args.versions;
    let mut tasks = Vec::new();
    for t in 0..args.clients {
        let mut c = common::connect(&url, Duration::from_secs(10)).await;
        let mine: Vec<usize> = (0..args.workflows).filter(|w| w % args.clients == t).collect();
        let series: Vec<Vec<Vec<u8>>> = mine.iter().map(|w| series[w % series.len()].clone()).collect();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).unwrap();
            let mut state: Vec<(i64, usize)> = vec![(0, 0); mine.len()];
            let mut updates = 0u64;
            for _ in 0..rounds {
                for (j, w) in mine.iter().enumerate() {
                    let key = format!("{PREFIX}wf-{w:04}");
                    let (rev, next) = state[j];
                    let versions = &series[j];
                    let t0 = Instant::now();
                    let (rev, applied) = guaranteed_update(&mut c, &key, rev, &versions[next % versions.len()]).await;
                    hist.record(t0.elapsed().as_micros() as u64).unwrap();
                    assert!(applied, "{key}: nobody else writes it");
                    state[j] = (rev, next + 1);
                    updates += 1;
                }
            }
            // Every workflow reads back as its last version.
            for (j, w) in mine.iter().enumerate() {
                let (_, next) = state[j];
                if next == 0 {
                    continue;
                }
                let key = format!("{PREFIX}wf-{w:04}");
                let got = c.get(key.as_str(), None).await.unwrap();
                let versions = &series[j];
                assert!(got.kvs()[0].value() == &versions[(next - 1) % versions.len()][..], "{key} reads back as written");
            }
            (hist, updates)
        }));
    }
    let mut hist = Histogram::<u64>::new(3).unwrap();
    let mut updates = 0;
    for t in tasks {
        let (h, n) = t.await.unwrap();
        hist.add(h).unwrap();
        updates += n;
    }
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = compactor.await;
    for w in watchers {
        let _ = w.await;
    }
    let (cpu, rss) = proxy.as_ref().map_or((0.0, 0), |(p, _, _)| cpu_and_rss(p.0.id()));
    let (mut deltas, mut rebases, mut base_misses, mut recalls) = (0.0, 0.0, 0.0, 0.0);
    if let Some((_, _, metrics)) = &proxy {
        deltas = scrape(metrics, "etcd_squeeze_delta_writes_total").await;
        rebases = scrape(metrics, "etcd_squeeze_delta_writes_total{kind=\"rebase\"").await;
        base_misses = scrape(metrics, "etcd_squeeze_base_cache_misses_total").await;
        recalls = scrape(metrics, "etcd_squeeze_decoded_recalls_total").await;
    }
    let received = scrape(&etcd_metrics, "etcd_network_client_grpc_received_bytes_total").await - received_before;
    let db_size = etcd.db_size().await;
    let db_in_use = etcd.client().await.status().await.unwrap().raft_used_db_size();
    Row {
        front: front.name().to_string(),
        updates,
        seconds,
        p50: ms(&hist, 0.5),
        p99: ms(&hist, 0.99),
        db_size,
        db_in_use,
        received,
        cpu: cpu - cpu_before,
        rss,
        watch_events: events.load(Ordering::Relaxed),
        compactions: compactions.load(Ordering::Relaxed),
        deltas,
        rebases,
        base_misses,
        recalls,
    }
}

/// "12.3x smaller", or "-" without a direct etcd row to compare with.
fn times(ratio: Option<f64>) -> String {
    ratio.map_or_else(|| "-".to_string(), |r| format!("{r:.1}x smaller"))
}

fn mib(b: f64) -> String {
    format!("{:.1} MiB", b / (1u64 << 20) as f64)
}

/// One row per front: its median run by updates/s, and (more than one round) its updates/s as a
/// share of direct etcd's in the same round, the median over the rounds.
fn table(runs: &[Vec<Row>], args: &Args) -> String {
    let rounds = runs.first().map_or(0, Vec::len);
    let direct_runs = args.fronts.iter().position(|f| *f == Front::Direct).map(|i| &runs[i]);
    let rate = |r: &Row| r.updates as f64 / r.seconds;
    let mut rows = Vec::new();
    let mut shares = Vec::new();
    for front_runs in runs {
        let mut sorted: Vec<&Row> = front_runs.iter().collect();
        sorted.sort_by(|a, b| rate(a).total_cmp(&rate(b)));
        rows.push(sorted[sorted.len() / 2].clone());
        let mut share: Vec<f64> = match direct_runs {
            Some(direct) => front_runs.iter().zip(direct).map(|(r, d)| 100.0 * rate(r) / rate(d)).collect(),
            None => Vec::new(),
        };
        share.sort_by(f64::total_cmp);
        shares.push(match share.len() {
            0 => "-".to_string(),
            1 => format!("{:.0} %", share[0]),
            n => format!("{:.0} % ({:.0}–{:.0})", share[n / 2], share[0], share[n - 1]),
        });
    }
    let mut out = format!(
        "{} workflows of {} versions each ({}), {} clients, compaction every {} s, 2 watchers with prev_kv{}:\n\n\
         | front | updates | updates/s | of direct's | p50 ms | p99 ms | etcd DB (in use) | DB vs direct | received by etcd | vs direct | proxy CPU s | proxy peak RSS | delta frames (rebases) | per update: bases decompressed, values recalled | watch events | compactions |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        args.workflows,
        args.versions,
        if args.life { "spread over each workflow's life" } else { "consecutive status changes" },
        args.clients,
        args.compact_every,
        if rounds > 1 { format!("; {rounds} rounds, interleaved: each front's median run, and its updates/s as a share of direct etcd's in the same round (median, range)") } else { String::new() }
    );
    let direct_row = args.fronts.iter().position(|f| *f == Front::Direct).map(|i| &rows[i]);
    let (direct, direct_db) = direct_row.map_or((1.0, 1.0), |r| (r.received, r.db_size as f64));
    for (r, share) in rows.iter().zip(&shares) {
        out.push_str(&format!(
            "| {} | {} | {:.1} | {} | {:.1} | {:.1} | {} ({}) | {} | {} | {} | {:.1} | {} | {} | {} | {} | {} |\n",
            r.front,
            r.updates,
            r.updates as f64 / r.seconds,
            share,
            r.p50,
            r.p99,
            mib(r.db_size as f64),
            mib(r.db_in_use as f64),
            times(direct_row.map(|_| direct_db / (r.db_size as f64).max(1.0))),
            mib(r.received),
            times(direct_row.map(|_| direct / r.received.max(1.0))),
            r.cpu,
            if r.rss > 0 { mib(r.rss as f64) } else { "-".into() },
            if r.deltas > 0.0 { format!("{} ({})", r.deltas, r.rebases) } else { "-".into() },
            if r.deltas > 0.0 { format!("{:.2}, {:.2}", r.base_misses / r.updates as f64, r.recalls / r.updates as f64) } else { "-".into() },
            r.watch_events,
            r.compactions,
        ));
    }
    out
}

/// B: `--memory-keys` large keys updated in turn, twice, through the default configuration.
async fn memory(args: &Args) -> String {
    // Consecutive propeller rounds of running fan-outs (~180 KB to ~900 KB of JSON).
    let children: &[usize] = if args.smoke { &[200, 400] } else { &[4000, 8000, 12000, 16000, 20000] };
    let series: Vec<Vec<Vec<u8>>> = (0..10)
        .map(|i| {
            let scenario = Scenario::new(Topology::Dynamic { children: children[i % children.len()] }, 500, 40);
            consecutive_writes(&scenario, 2, 2000 + i as u64).into_iter().map(|g| g.json).collect()
        })
        .collect();
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (proxy, url, metrics) = start_front(Front::Default, &etcd.url, dir.path(), args).await.unwrap();
    let clients = 4;
    let keys = args.memory_keys;
    let mut tasks = Vec::new();
    let started = Instant::now();
    for t in 0..clients {
        let mut c = common::connect(&url, Duration::from_secs(10)).await;
        let series = series.clone();
        tasks.push(tokio::spawn(async move {
            let mut revs = vec![0i64; keys];
            let (mut bytes, mut n) = (0u64, 0u64);
            for round in 0..2 {
                for k in (t..keys).step_by(clients) {
                    let key = format!("{PREFIX}mem-{k:04}");
                    let v = series[k % series.len()].get(round).expect("2 versions");
                    let (rev, applied) = guaranteed_update(&mut c, &key, revs[k], v).await;
                    assert!(applied, "{key}");
                    revs[k] = rev;
                    bytes += v.len() as u64;
                    n += 1;
                }
            }
            let check = format!("{PREFIX}mem-{t:04}");
            let got = c.get(check.as_str(), Some(GetOptions::new())).await.unwrap();
            assert!(got.kvs()[0].value() == &series[t % series.len()][1][..]);
            (bytes, n)
        }));
    }
    let (mut bytes, mut updates) = (0, 0);
    for t in tasks {
        let (b, n) = t.await.unwrap();
        bytes += b;
        updates += n;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (_, rss) = cpu_and_rss(proxy.0.id());
    let (misses, hits) = (scrape(&metrics, "etcd_squeeze_base_cache_misses_total").await, scrape(&metrics, "etcd_squeeze_base_cache_hits_total").await);
    let (fetches, fetched) = (scrape(&metrics, "etcd_squeeze_base_fetches_total").await, scrape(&metrics, "etcd_squeeze_base_fetched_bytes_total").await);
    let cache = scrape(&metrics, "etcd_squeeze_base_cache_bytes").await;
    let record_hits = scrape(&metrics, "etcd_squeeze_base_cache_record_hits_total").await;
    let updates_only = (updates / 2).max(1) as f64;
    format!(
        "{keys} keys, {} average JSON per version, each created then updated once, in turn ({clients} clients, {seconds:.0} s, \
         {:.1} updates/s): proxy peak RSS {}, base cache {} at the end (default budget 64 MiB); decompressed bases: hits {hits}, misses {misses}, of which served from a cached base record {record_hits}; \
         base records read from etcd {fetches} ({} in all): {:.2} reads and {:.0} KB per update\n",
        mib((bytes / updates.max(1)) as f64),
        updates as f64 / seconds,
        mib(rss as f64),
        mib(cache),
        mib(fetched),
        fetches / updates_only,
        fetched / updates_only / 1000.0,
    )
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let children: &[usize] = if args.smoke { &[50, 100] } else { &[300, 1000, 3000, 10000] };
    let series = pool(if args.smoke { 2 } else { 50 }, args.versions, children, args.life);
    let mut runs: Vec<Vec<Row>> = vec![Vec::new(); args.fronts.len()];
    for round in 0..args.rounds {
        for (i, &front) in args.fronts.iter().enumerate() {
            eprintln!("round {}/{}: running {} ...", round + 1, args.rounds, front.name());
            runs[i].push(run_front(front, &series, &args).await);
        }
    }
    let mut out = table(&runs, &args);
    if args.memory_keys > 0 {
        out.push('\n');
        eprintln!("running the base cache at scale ...");
        out.push_str(&memory(&args).await);
    }
    print!("{out}");
    if let Some(path) = &args.markdown {
        std::fs::write(path, &out).unwrap();
    }
}
