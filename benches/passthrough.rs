//! Pass-through cost: what one hop costs for calls the proxy does not compress (pods, leases,
//! events: keys outside every compressed prefix). One run measures, side by side, 1 KB gets and
//! 1 KB puts of `/registry/pods/default/p-N` (1,000 keys) from 8 concurrent clients for a fixed
//! duration against four fronts, each on a fresh etcd:
//!
//! - `direct`: etcd itself;
//! - `grpc-proxy`: etcd's own `etcd grpc-proxy start`;
//! - `haproxy`: Debian's haproxy in `mode tcp` (an L4 forwarder: the floor of any hop);
//! - `squeeze`: etcd-squeeze as its own process (`serve`, prefix = the FlyteWorkflow one, so
//!   every key here is pass-through).
//!
//! Per front and call: ops/s, ops/s as % of direct, p50/p99 latency, CPU microseconds per call of
//! the front process and of etcd (user + system from /proc/PID/stat, read before and after the
//! measured phase, divided by the calls made in it). The bench process itself is never counted.
//!
//! With `--instructions`, also a figure that does not move with the machine's load: instructions
//! per call of the etcd-squeeze process under `valgrind --tool=callgrind`, for a pass-through 1 KB
//! get and a compressed ~100 KB GuaranteedUpdate (Range, then Txn on mod_revision) under the
//! FlyteWorkflow prefix. Each count is two valgrind runs of the proxy doing the same startup and
//! warm-up and then N1 and N2 calls (one client, one call at a time): (Ir(N2) - Ir(N1)) / (N2 - N1),
//! so startup, warm-up and shutdown cancel out.
//!
//! ```text
//! cargo bench --bench passthrough -- [--clients 8] [--seconds 5] [--warmup 1]
//!     [--fronts direct,grpc-proxy,haproxy,squeeze] [--connections shared|per-client]
//!     [--instructions] [--gets 500,1000] [--updates 50,100] [--callgrind-dir DIR] [--markdown FILE]
//!     [--baseline-bin PATH]
//! ```
//!
//! `--baseline-bin PATH`: an etcd-squeeze binary built from another commit (e.g. `git worktree add
//! /tmp/base REV && cargo build --release --bin etcd-squeeze` there) is measured as one more front,
//! and under callgrind, in the same run: a before/after pair from one run on one machine.
//!
//! `--connections shared` (the default): all clients are tasks sharing one `etcd_client::Client`,
//! i.e. one HTTP/2 connection, as kube-apiserver multiplexes its calls on one connection;
//! `per-client`: one `Client` (one connection) per task.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, KvClient, Txn, TxnOp};
use hdrhistogram::Histogram;

mod common;
use common::{connect, cpu_ticks, free_port, ms, Etcd};

/// Pass-through keys: outside every compressed prefix.
const PASS_PREFIX: &str = "/registry/pods/default/p-";
/// The compressed prefix the proxy is configured with.
const FLYTE_PREFIX: &str = "/registry/flyte.lyft.com/flyteworkflows/";
const KEYS: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Front {
    Direct,
    GrpcProxy,
    Haproxy,
    Squeeze,
    /// etcd-squeeze built from another commit (`--baseline-bin PATH`), measured in the same run.
    Baseline,
}

impl Front {
    fn name(self) -> &'static str {
        match self {
            Front::Direct => "direct",
            Front::GrpcProxy => "grpc-proxy",
            Front::Haproxy => "haproxy",
            Front::Squeeze => "etcd-squeeze",
            Front::Baseline => "etcd-squeeze (baseline)",
        }
    }
    fn parse(s: &str) -> Front {
        match s {
            "direct" => Front::Direct,
            "grpc-proxy" => Front::GrpcProxy,
            "haproxy" => Front::Haproxy,
            "squeeze" | "etcd-squeeze" => Front::Squeeze,
            "baseline" => Front::Baseline,
            other => panic!("unknown front {other:?} (direct, grpc-proxy, haproxy, squeeze, baseline)"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Get,
    Put,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Get => "get 1 KB",
            Op::Put => "put 1 KB",
        }
    }
}

struct Args {
    clients: usize,
    seconds: f64,
    warmup: f64,
    fronts: Vec<Front>,
    per_client_connections: bool,
    instructions: bool,
    gets: (u64, u64),
    updates: (u64, u64),
    callgrind_dir: Option<PathBuf>,
    markdown: Option<PathBuf>,
    /// An etcd-squeeze binary of another commit, measured beside this build (front and instructions).
    baseline: Option<PathBuf>,
}

fn parse_args() -> Args {
    let mut a = Args {
        clients: 8,
        seconds: 5.0,
        warmup: 1.0,
        fronts: vec![Front::Direct, Front::GrpcProxy, Front::Haproxy, Front::Squeeze],
        per_client_connections: false,
        instructions: false,
        gets: (500, 1000),
        updates: (50, 100),
        callgrind_dir: None,
        markdown: None,
        baseline: None,
    };
    let pair = |s: String| -> (u64, u64) {
        let (x, y) = s.split_once(',').unwrap_or_else(|| panic!("{s:?}: expected N1,N2"));
        let (x, y) = (x.parse().unwrap(), y.parse().unwrap());
        assert!(y > x, "N2 must be larger than N1");
        (x, y)
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--clients" => a.clients = val().parse().unwrap(),
            "--seconds" => a.seconds = val().parse().unwrap(),
            "--warmup" => a.warmup = val().parse().unwrap(),
            "--fronts" => a.fronts = val().split(',').map(Front::parse).collect(),
            "--connections" => {
                a.per_client_connections = match val().as_str() {
                    "shared" => false,
                    "per-client" => true,
                    other => panic!("--connections {other:?}: shared or per-client"),
                }
            }
            "--instructions" => a.instructions = true,
            "--gets" => a.gets = pair(val()),
            "--updates" => a.updates = pair(val()),
            "--callgrind-dir" => a.callgrind_dir = Some(PathBuf::from(val())),
            "--markdown" => a.markdown = Some(PathBuf::from(val())),
            "--baseline-bin" => a.baseline = Some(PathBuf::from(val())),
            "--bench" => {}
            other => panic!("unknown argument {other:?}"),
        }
    }
    if a.baseline.is_some() && !a.fronts.contains(&Front::Baseline) {
        a.fronts.push(Front::Baseline);
    }
    a
}

/// The etcd-squeeze binaries measured: this build's, and the baseline's when given.
fn squeeze_bins(args: &Args) -> Vec<(Front, PathBuf)> {
    let mut bins = vec![(Front::Squeeze, PathBuf::from(env!("CARGO_BIN_EXE_etcd-squeeze")))];
    bins.extend(args.baseline.clone().map(|b| (Front::Baseline, b)));
    bins
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The proxy's config. `valgrind`: no timer-driven work that would scale with the (slow) wall
/// time of a valgrind run: no health probes or HTTP/2 pings during the run, generous timeouts.
/// Dictionaries off in both (no trainer election in the background; pass-through keys never use one).
fn squeeze_config(port: u16, etcd: &str, valgrind: bool) -> String {
    let mut s = format!("[server]\nlisten = \"127.0.0.1:{port}\"\n[upstream]\nendpoints = [\"{etcd}\"]\n");
    if valgrind {
        s.push_str("connect_timeout = \"120s\"\nkeepalive_interval = \"1h\"\nkeepalive_timeout = \"120s\"\n");
    }
    s.push_str(&format!("[[prefixes]]\nprefix = \"{FLYTE_PREFIX}\"\n[dictionaries]\nenabled = false\n[metrics]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"warn\"\n"));
    if valgrind {
        s.push_str("[health]\nprobe_interval = \"1h\"\nprobe_timeout = \"120s\"\n");
    }
    s
}

fn start_front(front: Front, etcd: &str, dir: &Path, args: &Args) -> Option<(Proc, String)> {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let etcd_addr = etcd.trim_start_matches("http://");
    let child = match front {
        Front::Direct => return None,
        Front::GrpcProxy => common::grpc_proxy(etcd, port),
        Front::Haproxy => {
            let config = dir.join("haproxy.cfg");
            std::fs::write(
                &config,
                format!(
                    "global\n    maxconn 1000\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\nlisten etcd\n    bind 127.0.0.1:{port}\n    server etcd {etcd_addr}\n"
                ),
            )
            .unwrap();
            // -db: foreground, one process (no master/worker): its /proc/PID/stat is all of it.
            common::spawn_quiet(Command::new("haproxy").args(["-db", "-f"]).arg(&config), "haproxy (scripts/lib.sh ensure_haproxy)")
        }
        Front::Squeeze | Front::Baseline => {
            let config = dir.join("squeeze.toml");
            std::fs::write(&config, squeeze_config(port, etcd, false)).unwrap();
            let bin = squeeze_bins(args).into_iter().find(|(f, _)| *f == front).map(|(_, b)| b).expect("--baseline-bin PATH");
            common::squeeze(&bin, &config)
        }
    };
    Some((Proc(child), url))
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

fn value_1k() -> Arc<Vec<u8>> {
    let mut s = String::from("{\"apiVersion\":\"v1\",\"kind\":\"Pod\",\"metadata\":{\"name\":\"p\",\"namespace\":\"default\",\"labels\":{");
    while s.len() < 990 {
        s.push_str(&format!("\"label-{}\":\"value-{}\",", s.len(), s.len() * 7));
    }
    s.push_str("\"x\":\"y\"}}}\n");
    s.truncate(1024);
    Arc::new(s.into_bytes())
}

/// Puts every key once (8 tasks).
async fn populate(kvs: &[KvClient], value: &Arc<Vec<u8>>) {
    let n = kvs.len();
    let tasks: Vec<_> = kvs
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, mut kv)| {
            let value = value.clone();
            tokio::spawn(async move {
                for k in (i..KEYS).step_by(n) {
                    kv.put(format!("{PASS_PREFIX}{k}"), value.as_slice(), None).await.expect("populate");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// Every client calls `op` in a loop until `dur` has passed. Returns the merged latency
/// histogram (µs), the calls made and how many failed (a get that finds no key counts as failed).
async fn drive(kvs: &[KvClient], op: Op, dur: Duration, value: &Arc<Vec<u8>>) -> (Histogram<u64>, u64, u64) {
    let deadline = Instant::now() + dur;
    let n = kvs.len();
    let tasks: Vec<_> = kvs
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, mut kv)| {
            let value = value.clone();
            tokio::spawn(async move {
                let mut h = Histogram::<u64>::new(3).unwrap();
                let (mut calls, mut errors) = (0u64, 0u64);
                let mut k = i;
                while Instant::now() < deadline {
                    let key = format!("{PASS_PREFIX}{}", k % KEYS);
                    k += n;
                    let t = Instant::now();
                    let ok = match op {
                        Op::Get => kv.get(key, None).await.map(|r| r.kvs().len() == 1).unwrap_or(false),
                        Op::Put => kv.put(key, value.as_slice(), None).await.is_ok(),
                    };
                    h.record(t.elapsed().as_micros() as u64).unwrap();
                    calls += 1;
                    errors += u64::from(!ok);
                }
                (h, calls, errors)
            })
        })
        .collect();
    let mut h = Histogram::<u64>::new(3).unwrap();
    let (mut calls, mut errors) = (0, 0);
    for t in tasks {
        let (th, c, e) = t.await.unwrap();
        h.add(th).unwrap();
        calls += c;
        errors += e;
    }
    (h, calls, errors)
}

struct Row {
    front: Front,
    op: Op,
    calls: u64,
    errors: u64,
    ops: f64,
    p50: f64,
    p99: f64,
    /// (user, system) CPU µs per call.
    front_cpu_us: Option<(f64, f64)>,
    etcd_cpu_us: (f64, f64),
}

async fn run_front(front: Front, args: &Args, tck: f64) -> Vec<Row> {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start().await;
    let front_proc = start_front(front, &etcd.url, dir.path(), args);
    let url = front_proc.as_ref().map_or(etcd.url.clone(), |(_, u)| u.clone());
    let kvs: Vec<KvClient> = if args.per_client_connections {
        let mut v = Vec::new();
        for _ in 0..args.clients {
            v.push(connect(&url, Duration::from_secs(20)).await.kv_client());
        }
        v
    } else {
        let c = connect(&url, Duration::from_secs(20)).await;
        (0..args.clients).map(|_| c.kv_client()).collect()
    };
    let value = value_1k();
    populate(&kvs, &value).await;
    let front_pid = front_proc.as_ref().map(|(p, _)| p.0.id());
    let mut rows = Vec::new();
    for op in [Op::Get, Op::Put] {
        let (_, _, warm_errors) = drive(&kvs, op, Duration::from_secs_f64(args.warmup), &value).await;
        assert_eq!(warm_errors, 0, "{} {}: warm-up calls failed", front.name(), op.name());
        let front_before = front_pid.map(cpu_ticks);
        let etcd_before = cpu_ticks(etcd.pid());
        let started = Instant::now();
        let (h, calls, errors) = drive(&kvs, op, Duration::from_secs_f64(args.seconds), &value).await;
        let secs = started.elapsed().as_secs_f64();
        let front_after = front_pid.map(cpu_ticks);
        let etcd_after = cpu_ticks(etcd.pid());
        let per_call = |before: (u64, u64), after: (u64, u64)| {
            let us = |b: u64, a: u64| (a - b) as f64 / tck * 1e6 / calls.max(1) as f64;
            (us(before.0, after.0), us(before.1, after.1))
        };
        rows.push(Row {
            front,
            op,
            calls,
            errors,
            ops: calls as f64 / secs,
            p50: ms(&h, 0.5),
            p99: ms(&h, 0.99),
            front_cpu_us: front_before.zip(front_after).map(|(b, a)| per_call(b, a)),
            etcd_cpu_us: per_call(etcd_before, etcd_after),
        });
    }
    rows
}

/// "96 (60 + 36)": total, user + system µs per call.
fn cpu((user, sys): (f64, f64)) -> String {
    format!("{:.0} ({:.0} + {:.0})", user + sys, user, sys)
}

fn table(rows: &[Row], args: &Args) -> String {
    let mut out = format!(
        "{} clients ({}), {} s per call type after {} s of warm-up, fresh etcd per front.\n\n| front | call | calls | errors | ops/s | % of direct | p50 ms | p99 ms | front CPU µs/call (user + sys) | etcd CPU µs/call (user + sys) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        args.clients,
        if args.per_client_connections { "one connection each" } else { "one shared HTTP/2 connection" },
        args.seconds,
        args.warmup
    );
    for r in rows {
        let direct = rows.iter().find(|d| d.front == Front::Direct && d.op == r.op).map(|d| d.ops);
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} | {} | {:.2} | {:.2} | {} | {} |\n",
            r.front.name(),
            r.op.name(),
            r.calls,
            r.errors,
            r.ops,
            direct.map_or("-".into(), |d| format!("{:.0} %", 100.0 * r.ops / d)),
            r.p50,
            r.p99,
            r.front_cpu_us.map_or("-".into(), cpu),
            cpu(r.etcd_cpu_us),
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Instructions per call under callgrind.

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    PassGet,
    CompressedUpdate,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::PassGet => "get",
            Kind::CompressedUpdate => "update",
        }
    }
}

/// Calls made before the measured ones in every run (identical in the N1 and N2 runs).
const WARMUP_GETS: u64 = 20;
const WARMUP_UPDATES: u64 = 5;

/// Versions of the generated FlyteWorkflow nearest to 100 KB, each with its own
/// metadata.generation (a new value per write), as benches/load.rs writes them.
fn versions_100k(n: usize) -> Vec<Vec<u8>> {
    let mut set = etcd_squeeze::corpus::standard_set(1);
    set.sort_by_key(|o| (o.json.len() as i64 - 100_000).abs());
    let text = String::from_utf8(set.remove(0).json).unwrap();
    assert!(text.contains("\"generation\":"));
    (0..n).map(|i| text.replacen("\"generation\":", &format!("\"generation\":{}", 1000 + i), 1).into_bytes()).collect()
}

async fn guaranteed_update(kv: &mut KvClient, key: &str, value: &[u8]) {
    let r = kv.get(key, None).await.expect("range");
    let rev = r.kvs().first().map_or(0, |kv| kv.mod_revision());
    let txn = Txn::new()
        .when([Compare::mod_revision(key, CompareOp::Equal, rev)])
        .and_then([TxnOp::put(key, value, None)])
        .or_else([TxnOp::get(key, None)]);
    assert!(kv.txn(txn).await.expect("txn").succeeded(), "GuaranteedUpdate conflicted (one client only)");
}

/// One valgrind run of the proxy: start, warm up, `n` calls, SIGTERM; total Ir of the process.
async fn callgrind_run(kind: Kind, n: u64, dir: &Path, versions: &[Vec<u8>], (front, bin): &(Front, PathBuf)) -> u64 {
    let etcd = Etcd::start().await;
    let port = free_port();
    let tag = if *front == Front::Baseline { "baseline." } else { "" };
    let config = dir.join(format!("{tag}squeeze-{}-{n}.toml", kind.name()));
    std::fs::write(&config, squeeze_config(port, &etcd.url, true)).unwrap();
    let out = dir.join(format!("{tag}callgrind.{}.{n}.out", kind.name()));
    let log = dir.join(format!("{tag}valgrind.{}.{n}.log", kind.name()));
    let child = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(bin)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("valgrind (scripts/lib.sh ensure_valgrind)");
    let mut proc = Proc(child);
    let url = format!("http://127.0.0.1:{port}");
    {
        let client = connect(&url, Duration::from_secs(300)).await;
        let mut kv = client.kv_client().max_encoding_message_size(64 << 20).max_decoding_message_size(64 << 20);
        match kind {
            Kind::PassGet => {
                let key = format!("{PASS_PREFIX}0");
                kv.put(key.as_str(), value_1k().as_slice(), None).await.unwrap();
                for i in 0..WARMUP_GETS + n {
                    let r = kv.get(key.as_str(), None).await.unwrap();
                    assert_eq!(r.kvs().len(), 1, "get {i}");
                }
            }
            Kind::CompressedUpdate => {
                let key = format!("{FLYTE_PREFIX}bench/wf-0");
                let create = Txn::new()
                    .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.as_str(), versions[0].clone(), None)]);
                assert!(kv.txn(create).await.unwrap().succeeded());
                for i in 0..(WARMUP_UPDATES + n) as usize {
                    guaranteed_update(&mut kv, &key, &versions[1 + i]).await;
                }
            }
        }
    } // the client's connection closes here
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = proc.0.id();
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(status) = proc.0.try_wait().unwrap() {
            assert!(status.success(), "the proxy under valgrind exited with {status}; see {}", log.display());
            break;
        }
        assert!(Instant::now() < deadline, "the proxy under valgrind did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(proc);
    let text = std::fs::read_to_string(&out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    text.lines()
        .find_map(|l| l.strip_prefix("summary:").or_else(|| l.strip_prefix("totals:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no summary/totals line in {}", out.display()))
}

async fn instructions(args: &Args) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let dir = args.callgrind_dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).unwrap();
    let versions = versions_100k((1 + WARMUP_UPDATES + args.updates.1) as usize);
    let mut out = format!(
        "Instructions (Ir) of the etcd-squeeze process under `valgrind --tool=callgrind` (release build), one client making one call at a time; per call = (Ir(N2) - Ir(N1)) / (N2 - N1) over two runs that differ only in the number of measured calls (each run: start, {WARMUP_GETS} gets or {WARMUP_UPDATES} GuaranteedUpdates of warm-up, N calls, SIGTERM). The ~100 KB object is `corpus::standard_set(1)`'s nearest to 100 KB ({} bytes of JSON), zstd level 3, no dictionary.\n\n| build | call | N1 | Ir(N1) | N2 | Ir(N2) | instructions per call |\n|---|---|---:|---:|---:|---:|---:|\n",
        versions[0].len()
    );
    for (kind, label, (n1, n2)) in [
        (Kind::PassGet, "pass-through 1 KB get (Range)", args.gets),
        (Kind::CompressedUpdate, "compressed ~100 KB GuaranteedUpdate (Range + Txn)", args.updates),
    ] {
        for build in squeeze_bins(args) {
            let name = build.0.name();
            eprintln!("callgrind: {name}: {label}, {n1} calls...");
            let ir1 = callgrind_run(kind, n1, &dir, &versions, &build).await;
            eprintln!("callgrind: {name}: {label}, {n2} calls...");
            let ir2 = callgrind_run(kind, n2, &dir, &versions, &build).await;
            let per_call = (ir2 as f64 - ir1 as f64) / (n2 - n1) as f64;
            out.push_str(&format!("| {name} | {label} | {n1} | {ir1} | {n2} | {ir2} | {per_call:.0} |\n"));
        }
    }
    if let Some(d) = &args.callgrind_dir {
        out.push_str(&format!("\nCallgrind out files kept in `{}` (`callgrind_annotate --inclusive=yes FILE`).\n", d.display()));
    }
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = parse_args();
    let smoke = !std::env::args().any(|a| a == "--bench");
    if smoke {
        // `cargo test --all-targets` runs benches without `--bench`: a seconds-long smoke run.
        args.fronts = vec![Front::Direct, Front::Squeeze];
        args.seconds = 0.5;
        args.warmup = 0.2;
        args.instructions = false;
        args.markdown = None;
    }
    let tck = clock_ticks_per_second();
    let mut rows = Vec::new();
    for &front in &args.fronts {
        eprintln!("pass-through: {}...", front.name());
        rows.extend(run_front(front, &args, tck).await);
    }
    let mut report = table(&rows, &args);
    if args.instructions {
        report.push('\n');
        report.push_str(&instructions(&args).await);
    }
    println!("{report}");
    if smoke {
        assert!(rows.iter().all(|r| r.errors == 0 && r.calls > 0), "smoke run: calls failed");
    }
    if let Some(path) = &args.markdown {
        std::fs::write(path, report).unwrap();
    }
}
