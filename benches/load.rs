//! End-to-end load benchmark: kube-apiserver-shaped traffic against etcd directly, etcd's own
//! `etcd grpc-proxy`, and etcd-squeeze (compression off, zstd, zstd + trained dictionary), side by side in one run on the
//! same machine. Each configuration gets a fresh etcd.
//!
//! ```text
//! cargo bench --bench load -- [--clients 4] [--scale 1.0] [--sizes 1k,10k,100k,1m,4m]
//!                             [--fronts direct,grpc-proxy,squeeze-off,squeeze-zstd,squeeze-dict,squeeze-delta]
//!                             [--markdown FILE] [--chart FILE.png]
//! ```
//!
//! Per size class and front: GuaranteedUpdate (Range, then Txn on mod_revision with a Range in
//! the else branch) throughput and latency, get throughput and latency, paginated lists, two
//! watchers that must receive every update, bytes etcd stores, etcd's DB size (Maintenance
//! Status), and the front process's CPU seconds and peak RSS. Writes etcd refuses (4 MB
//! objects without compression) are counted, not retried.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, WatchOptions};
use hdrhistogram::Histogram;

mod common;
use common::{connect, free_port, ms, Etcd};

const PREFIX: &str = "/registry/flyte.lyft.com/flyteworkflows/bench/";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Front {
    Direct,
    GrpcProxy,
    SqueezeOff,
    SqueezeZstd,
    SqueezeDict,
    SqueezeDelta,
}

impl Front {
    fn name(self) -> &'static str {
        match self {
            Front::Direct => "direct",
            Front::GrpcProxy => "grpc-proxy",
            Front::SqueezeOff => "squeeze-off",
            Front::SqueezeZstd => "squeeze-zstd",
            Front::SqueezeDict => "squeeze-dict",
            Front::SqueezeDelta => "squeeze-delta",
        }
    }
    fn parse(s: &str) -> Front {
        match s {
            "direct" => Front::Direct,
            "grpc-proxy" => Front::GrpcProxy,
            "squeeze-off" => Front::SqueezeOff,
            "squeeze-zstd" => Front::SqueezeZstd,
            "squeeze-dict" => Front::SqueezeDict,
            "squeeze-delta" => Front::SqueezeDelta,
            other => panic!("unknown front {other:?}"),
        }
    }
}

struct Args {
    clients: usize,
    scale: f64,
    sizes: Vec<String>,
    fronts: Vec<Front>,
    markdown: Option<PathBuf>,
    chart: Option<PathBuf>,
}

fn parse_args() -> Args {
    let mut a = Args {
        clients: 4,
        scale: 1.0,
        sizes: ["1k", "10k", "100k", "1m", "4m"].map(String::from).to_vec(),
        fronts: vec![Front::Direct, Front::GrpcProxy, Front::SqueezeOff, Front::SqueezeZstd, Front::SqueezeDict, Front::SqueezeDelta],
        markdown: None,
        chart: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--clients" => a.clients = val().parse().unwrap(),
            "--scale" => a.scale = val().parse().unwrap(),
            "--sizes" => a.sizes = val().split(',').map(String::from).collect(),
            "--fronts" => a.fronts = val().split(',').map(Front::parse).collect(),
            "--markdown" => a.markdown = Some(PathBuf::from(val())),
            "--chart" => a.chart = Some(PathBuf::from(val())),
            "--bench" => {}
            other => panic!("unknown argument {other:?}"),
        }
    }
    a
}

/// Versions of a realistic object of about `size` bytes: the nearest generated FlyteWorkflow
/// (or a 1 KB JSON object), each version with its own metadata.generation as the apiserver writes it.
fn versions(size: &str, n: usize) -> Vec<Vec<u8>> {
    let target = match size {
        "1k" => 1_000,
        "10k" => 10_000,
        "100k" => 100_000,
        "1m" => 1_000_000,
        "4m" => 4_000_000,
        other => panic!("unknown size {other:?}"),
    };
    let base: Vec<u8> = if target <= 1_000 {
        let mut s = String::from("{\"apiVersion\":\"v1\",\"data\":{");
        while s.len() < 950 {
            s.push_str(&format!("\"key-{}\":\"value-{}\",", s.len(), s.len() * 7));
        }
        s.push_str("\"generation\":1},\"kind\":\"ConfigMap\"}\n");
        s.into_bytes()
    } else {
        let mut set = etcd_squeeze::corpus::standard_set(1);
        set.sort_by_key(|o| (o.json.len() as i64 - target as i64).abs());
        set.remove(0).json
    };
    let text = String::from_utf8(base).unwrap();
    // "generation":57 becomes "generation":100057, 100157, ...: a new value per write.
    (0..n).map(|i| text.replacen("\"generation\":", &format!("\"generation\":{}", 1000 + i), 1).into_bytes()).collect()
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_front(front: Front, etcd: &str, dir: &Path) -> Option<(Proc, String)> {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let child = match front {
        Front::Direct => return None,
        Front::GrpcProxy => common::grpc_proxy(etcd, port),
        Front::SqueezeOff | Front::SqueezeZstd | Front::SqueezeDict | Front::SqueezeDelta => {
            let config = dir.join("squeeze.toml");
            let compress = front != Front::SqueezeOff;
            // squeeze-delta: delta frames, dictionaries off (the history cost of plain updates).
            let delta = if front == Front::SqueezeDelta { "delta = true\ndictionary = false\n" } else { "" };
            std::fs::write(&config, format!("[server]\nlisten = \"127.0.0.1:{port}\"\n[upstream]\nendpoints = [\"{etcd}\"]\n[[prefixes]]\nprefix = \"/registry/flyte.lyft.com/flyteworkflows/\"\ncompress = {compress}\n{delta}[metrics]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"warn\"\n")).unwrap();
            common::squeeze(Path::new(env!("CARGO_BIN_EXE_etcd-squeeze")), &config)
        }
    };
    Some((Proc(child), url))
}


/// CPU seconds (user + system) and peak RSS in bytes of a process, from /proc.
fn cpu_and_rss(pid: u32) -> (f64, u64) {
    let (user, system) = common::cpu_ticks(pid);
    let cpu = (user + system) as f64 / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024;
    (cpu, rss)
}

#[derive(Default)]
struct Row {
    size: String,
    front: &'static str,
    update_ops: f64,
    update_p50: f64,
    update_p99: f64,
    update_p999: f64,
    get_ops: f64,
    get_p50: f64,
    get_p99: f64,
    list_ops: f64,
    refused: u64,
    watch_ok: bool,
    stored_bytes: u64,
    written_bytes: u64,
    db_size: i64,
    cpu_s: f64,
    rss: u64,
}

async fn run_one(size: &str, front: Front, args: &Args) -> Row {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start().await;
    let etcd_url = etcd.url.clone();
    let mut direct = etcd.client().await;
    let front_proc = start_front(front, &etcd_url, dir.path());
    let url = front_proc.as_ref().map_or(etcd_url.clone(), |(_, u)| u.clone());
    let client = connect(&url, Duration::from_secs(10)).await;
    if front == Front::SqueezeDict {
        // A dictionary trained on 96 other workflows (what the trainer would learn from live
        // traffic), then the training objects removed and etcd compacted and defragmented so
        // the DB size compares fairly with the other fronts.
        let (id, _) = etcd_squeeze::demo::train_dictionary(&url, &etcd_url, &etcd_squeeze::demo::training_population(None, 1)).await.expect("train a dictionary");
        eprintln!("  using trained dictionary {id}");
        let training = "/registry/flyte.lyft.com/flyteworkflows/demo-training/";
        let rev = direct.delete(training, Some(etcd_client::DeleteOptions::new().with_prefix())).await.unwrap().header().unwrap().revision();
        direct.compact(rev, None).await.unwrap();
        direct.defragment().await.unwrap();
    }
    let scale = |n: f64| ((n * args.scale).ceil() as usize).max(2);
    let (updates_each, gets_each) = match size {
        "1k" => (scale(200.0), scale(400.0)),
        "10k" => (scale(100.0), scale(200.0)),
        "100k" => (scale(40.0), scale(100.0)),
        "1m" => (scale(10.0), scale(30.0)),
        _ => (scale(4.0), scale(10.0)),
    };
    let versions = Arc::new(versions(size, updates_each + 1));
    let keys: Vec<String> = (0..args.clients).map(|i| format!("{PREFIX}wf-{i}")).collect();
    let big = |c: &Client| c.kv_client().max_encoding_message_size(64 << 20).max_decoding_message_size(usize::MAX);

    // Create every key (kube-apiserver's create: Txn on mod_revision == 0).
    let mut refused = 0;
    for key in &keys {
        let r = big(&client).txn(Txn::new().when([Compare::mod_revision(key.as_str(), CompareOp::Equal, 0)]).and_then([TxnOp::put(key.as_str(), versions[0].clone(), None)])).await;
        if r.is_err() {
            refused += 1;
        }
    }

    // Two watchers on the prefix, each must see every successful update.
    let events = Arc::new(AtomicU64::new(0));
    let mut watchers = Vec::new();
    for _ in 0..2 {
        let mut w = client.watch_client().max_decoding_message_size(usize::MAX);
        let events = events.clone();
        let mut stream = w.watch(PREFIX, Some(WatchOptions::new().with_prefix().with_prev_key())).await.unwrap();
        watchers.push(tokio::spawn(async move {
            while let Ok(Some(r)) = stream.message().await {
                events.fetch_add(r.events().len() as u64, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // GuaranteedUpdate loops, one client each.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for key in keys.clone() {
        let mut kv = big(&client);
        let versions = versions.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).unwrap();
            let (mut ok, mut refused) = (0u64, 0u64);
            for v in versions.iter().skip(1) {
                let t = Instant::now();
                let rev = match kv.get(key.as_str(), None).await {
                    Ok(r) => r.kvs().first().map_or(0, |kv| kv.mod_revision()),
                    Err(_) => 0,
                };
                let txn = Txn::new()
                    .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)])
                    .and_then([TxnOp::put(key.as_str(), v.clone(), None)])
                    .or_else([TxnOp::get(key.as_str(), None)]);
                match kv.txn(txn).await {
                    Ok(r) if r.succeeded() => ok += 1,
                    _ => refused += 1,
                }
                h.record(t.elapsed().as_micros() as u64).unwrap();
            }
            (h, ok, refused)
        }));
    }
    let mut uh = Histogram::<u64>::new(3).unwrap();
    let mut updates = 0;
    for t in tasks {
        let (h, ok, r) = t.await.unwrap();
        uh.add(h).unwrap();
        updates += ok;
        refused += r;
    }
    let update_secs = started.elapsed().as_secs_f64();

    // Gets.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for key in keys.clone() {
        let mut kv = big(&client);
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).unwrap();
            for _ in 0..gets_each {
                let t = Instant::now();
                let _ = kv.get(key.as_str(), None).await;
                h.record(t.elapsed().as_micros() as u64).unwrap();
            }
            h
        }));
    }
    let mut gh = Histogram::<u64>::new(3).unwrap();
    for t in tasks {
        gh.add(t.await.unwrap()).unwrap();
    }
    let get_secs = started.elapsed().as_secs_f64();
    let gets = gh.len();

    // Paginated lists (limit 2, pinned revision), as the apiserver pages a LIST.
    let started = Instant::now();
    let lists = scale(20.0);
    let mut kv = big(&client);
    for _ in 0..lists {
        let first = kv.get(PREFIX, Some(GetOptions::new().with_prefix().with_limit(2))).await.unwrap();
        let rev = first.header().unwrap().revision();
        let mut last = first.kvs().last().map(|kv| kv.key().to_vec());
        let mut more = first.more();
        while more {
            let mut from = last.take().unwrap();
            from.push(0);
            let end = etcd_squeeze::codec::prefix_end(PREFIX.as_bytes()).unwrap();
            let page = kv.get(from, Some(GetOptions::new().with_range(end).with_limit(2).with_revision(rev))).await.unwrap();
            last = page.kvs().last().map(|kv| kv.key().to_vec());
            more = page.more();
        }
    }
    let list_secs = started.elapsed().as_secs_f64();

    // Watchers: every successful update (and create) must have arrived at both.
    let expected = 2 * updates; // the watchers start after the creates
    let deadline = Instant::now() + Duration::from_secs(10);
    while events.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let watch_ok = events.load(Ordering::Relaxed) == expected;
    for w in watchers {
        w.abort();
    }

    let stored = direct.get(PREFIX, Some(GetOptions::new().with_prefix())).await.unwrap();
    let values_bytes: u64 = stored.kvs().iter().map(|kv| kv.value().len() as u64).sum();
    let per_key = values_bytes / stored.kvs().len().max(1) as u64;
    // Delta frames' bases (written once per key here: the updates only change a number).
    let bases = direct.get("/etcd-squeeze/bases/", Some(GetOptions::new().with_prefix())).await.unwrap();
    let base_bytes: u64 = bases.kvs().iter().map(|kv| kv.value().len() as u64).sum();
    let stored_bytes = values_bytes + base_bytes;
    let db_size = direct.status().await.unwrap().db_size();
    let (cpu_s, rss) = front_proc.as_ref().map_or((0.0, 0), |(p, _)| cpu_and_rss(p.0.id()));
    Row {
        size: size.to_string(),
        front: front.name(),
        update_ops: updates as f64 / update_secs,
        update_p50: ms(&uh, 0.5),
        update_p99: ms(&uh, 0.99),
        update_p999: ms(&uh, 0.999),
        get_ops: gets as f64 / get_secs,
        get_p50: ms(&gh, 0.5),
        get_p99: ms(&gh, 0.99),
        list_ops: lists as f64 / list_secs,
        refused,
        watch_ok,
        stored_bytes,
        written_bytes: per_key * (updates + keys.len() as u64) + base_bytes,
        db_size,
        cpu_s,
        rss,
    }
}

fn table(rows: &[Row]) -> String {
    let mut out = String::from("| size | front | GuaranteedUpdate/s | p50 ms | p99 ms | p999 ms | gets/s | get p50 ms | get p99 ms | lists/s | refused | watchers | stored bytes | ≈bytes written | etcd DB | front CPU s | front peak RSS |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.1} | {} | {} | {} | {} | {:.1} MiB | {:.2} | {} |\n",
            r.size, r.front, r.update_ops, r.update_p50, r.update_p99, r.update_p999, r.get_ops, r.get_p50, r.get_p99, r.list_ops,
            r.refused, if r.watch_ok { "all events" } else { "MISSED" }, r.stored_bytes, r.written_bytes,
            r.db_size as f64 / (1 << 20) as f64, r.cpu_s, if r.rss == 0 { "-".into() } else { format!("{:.0} MiB", r.rss as f64 / (1 << 20) as f64) }
        ));
    }
    out
}

fn ratios(rows: &[Row]) -> String {
    let mut out = String::from("| size | front | GuaranteedUpdate/s vs direct | gets/s vs direct | stored vs direct | etcd DB vs direct |\n|---|---|---|---|---|---|\n");
    for r in rows {
        let Some(d) = rows.iter().find(|d| d.size == r.size && d.front == "direct") else { continue };
        if r.front == "direct" {
            continue;
        }
        let vs = |x: f64, base: f64, unit: &str| {
            if base <= 0.0 || x <= 0.0 {
                if base <= 0.0 && x > 0.0 { "direct refused every write".to_string() } else { "-".to_string() }
            } else {
                if unit == " %" { format!("{:.0}{unit}", 100.0 * x / base) } else { format!("{:.1}{unit}", base / x) }
            }
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.size,
            r.front,
            vs(r.update_ops, d.update_ops, " %"),
            vs(r.get_ops, d.get_ops, " %"),
            vs(r.stored_bytes as f64, d.stored_bytes as f64, "x smaller"),
            vs(r.db_size as f64, d.db_size as f64, "x smaller"),
        ));
    }
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = parse_args();
    let smoke = !std::env::args().any(|a| a == "--bench");
    if smoke {
        // `cargo test --all-targets` runs benches without `--bench`: a seconds-long smoke run
        // that proves the harness works (every watcher event arrives, compression stores less).
        args.sizes = vec!["10k".into()];
        args.fronts = vec![Front::Direct, Front::SqueezeZstd];
        args.scale = 0.05;
        args.markdown = None;
        args.chart = None;
    }
    let mut rows = Vec::new();
    for size in &args.sizes {
        for &front in &args.fronts {
            eprintln!("running {size} against {}...", front.name());
            rows.push(run_one(size, front, &args).await);
        }
    }
    let report = format!("{}\n{}", table(&rows), ratios(&rows));
    println!("{report}");
    if smoke {
        assert!(rows.iter().all(|r| r.watch_ok && r.refused == 0), "smoke run: watchers missed events or writes failed");
        assert!(rows[1].stored_bytes * 3 < rows[0].stored_bytes, "smoke run: zstd stores less than direct");
    }
    if let Some(path) = &args.markdown {
        std::fs::write(path, report).unwrap();
    }
    if let Some(path) = &args.chart {
        chart(&rows, &args, path).unwrap();
    }
}

/// Two grouped bar charts side by side: GuaranteedUpdate/s and bytes etcd stores, per size class
/// and front. Needs a TrueType font (Debian's fonts-dejavu-core).
fn chart(rows: &[Row], args: &Args, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into_boxed_slice()))
        .map_err(|_| "cannot load DejaVuSans.ttf")?;
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(700);
    let colors = [RGBColor(90, 90, 90), RGBColor(230, 150, 40), RGBColor(110, 160, 220), RGBColor(40, 150, 80), RGBColor(150, 60, 160), RGBColor(200, 60, 60)];
    let sizes = &args.sizes;
    let fronts = &args.fronts;
    let width = fronts.len() as f64 + 1.0;
    type Metric = fn(&Row) -> f64;
    let panels: [(&str, Metric, bool); 2] = [
        ("GuaranteedUpdate/s (higher is better)", |r| r.update_ops, false),
        ("bytes etcd stores, log scale (lower is better)", |r| r.stored_bytes as f64, true),
    ];
    for (area, (title, metric, log)) in [left, right].into_iter().zip(panels) {
        let max = rows.iter().map(metric).fold(1.0, f64::max) * if log { 4.0 } else { 1.2 };
        let x_range = 0.0..sizes.len() as f64 * width;
        let mut builder = ChartBuilder::on(&area);
        builder.caption(title, ("sans-serif", 22)).margin(12).x_label_area_size(40).y_label_area_size(70);
        // Size classes are written above their group of bars; the x axis itself has no ticks.
        let x_label = |_: &f64| String::new();
        let group_label = |si: usize, y: f64| {
            Text::new(format!("{} objects", sizes[si]), (si as f64 * width + width / 2.0 - 0.9, y), ("sans-serif", 16))
        };
        let mut data = Vec::new();
        for (si, size) in sizes.iter().enumerate() {
            for (fi, front) in fronts.iter().enumerate() {
                if let Some(r) = rows.iter().find(|r| &r.size == size && r.front == front.name()) {
                    data.push((si, fi, metric(r)));
                }
            }
        }
        if log {
            let mut chart = builder.build_cartesian_2d(x_range, (1.0..max).log_scale())?;
            chart.configure_mesh().disable_x_mesh().x_labels(0).x_label_formatter(&x_label).draw()?;
            chart.draw_series((0..sizes.len()).map(|si| group_label(si, max / 1.6)))?;
            for (si, fi, v) in data {
                let x0 = si as f64 * width + fi as f64 + 0.5;
                chart.draw_series([Rectangle::new([(x0, 1.0), (x0 + 0.9, v.max(1.0))], colors[fi % 6].filled())])?;
            }
        } else {
            let mut chart = builder.build_cartesian_2d(x_range, 0.0..max)?;
            chart.configure_mesh().disable_x_mesh().x_labels(0).x_label_formatter(&x_label).draw()?;
            chart.draw_series((0..sizes.len()).map(|si| group_label(si, max * 0.97)))?;
            for (si, fi, v) in data {
                let x0 = si as f64 * width + fi as f64 + 0.5;
                let series = chart.draw_series([Rectangle::new([(x0, 0.0), (x0 + 0.9, v)], colors[fi % 6].filled())])?;
                if si == 0 {
                    series.label(fronts[fi].name()).legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], colors[fi % 6].filled()));
                }
            }
            chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw()?;
        }
    }
    root.present()?;
    Ok(())
}
