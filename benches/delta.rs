//! Delta frames (issue 9) against per-object zstd, on a real etcd with the proxy in-process.
//!
//! ```text
//! cargo bench --bench delta -- [--markdown FILE] [--rounds 3]
//! ```
//!
//! A. **History bytes.** Update series of 20 versions written with kube-apiserver's Txn shapes
//!    (create: `MOD(k) == 0` → Put; update: `MOD(k) == rev` → Put, else Range), each series on a
//!    fresh etcd per configuration: raw (etcd directly), per-object zstd (proxy, dictionaries
//!    off, delta off), delta frames (proxy, `delta = true`, dictionaries off). Stored bytes of
//!    the whole history = the stored value at each of the 20 revisions (read from etcd directly
//!    with `revision`) + the bases under `/etcd-squeeze/bases/` (delta). The zstd + dictionary
//!    column is computed at codec level (as benches/dictionary.rs does): a 64 KiB dictionary
//!    trained on `corpus::training_set`, each version through `ValueCodec::encode`.
//! B. **GuaranteedUpdate throughput** on ~1 MB and ~100 KB objects, delta frames vs per-object
//!    zstd: 4 client tasks, each owning one key and walking through a consecutive-writes series
//!    of its own seed (Range through the proxy, then Txn `MOD == rev` → Put, else Range).
//!    Fronts alternate, each run on a fresh etcd.
//!
//! Every value written is read back through the front, byte-identical, at its revision (A) or at
//! the end (B). Under `cargo test --all-targets` (no `--bench` argument) a seconds-long smoke run
//! with tiny objects checks exactly that, and that delta frames store less than per-object zstd
//! on a consecutive-writes series.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use etcd_client::{Client, Compare, CompareOp, GetOptions, KvClient, Txn, TxnOp};
use etcd_squeeze::codec::delta::BASES_PREFIX;
use etcd_squeeze::codec::{PrefixRule, ValueCodec};
use etcd_squeeze::config::{Config, PrefixConfig, DEFAULT_DICTIONARY_SIZE, DEFAULT_LEVEL, DEFAULT_SAMPLE_MAX_BYTES, FLYTEWORKFLOW_PREFIX};
use etcd_squeeze::corpus::{self, consecutive_writes, update_series, Scenario, Topology};
use etcd_squeeze::dictionary::{cache::DictionaryCache, store::set_zstd_dict_id};
use hdrhistogram::Histogram;
use tokio::sync::oneshot;

mod common;
use common::{ms, Etcd};

const PREFIX: &str = "/registry/flyte.lyft.com/flyteworkflows/bench/";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Front {
    /// etcd directly, no proxy.
    Raw,
    /// The proxy, per-object zstd (level 3), dictionaries off, delta off.
    Zstd,
    /// The proxy, `delta = true`, dictionaries off.
    Delta,
}

impl Front {
    fn name(self) -> &'static str {
        match self {
            Front::Raw => "raw",
            Front::Zstd => "per-object zstd",
            Front::Delta => "delta frames",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// etcd and the proxy


/// The proxy in-process (`server::start`, as integration-tests/harness.rs runs it); stops on drop.
struct Proxy {
    url: String,
    _stop: oneshot::Sender<()>,
}

impl Proxy {
    async fn start(front: Front, etcd: &str) -> Option<Proxy> {
        let delta = match front {
            Front::Raw => return None,
            Front::Zstd => false,
            Front::Delta => true,
        };
        let mut config = Config::default();
        config.server.listen = "127.0.0.1:0".parse().unwrap();
        config.metrics.listen = "127.0.0.1:0".parse().unwrap();
        config.upstream.endpoints = vec![etcd.to_string()];
        let mut rule = PrefixConfig::new(FLYTEWORKFLOW_PREFIX);
        rule.delta = Some(delta.into());
        config.prefixes = vec![rule];
        config.dictionaries.enabled = false;
        config.validate().unwrap();
        let running = etcd_squeeze::server::spawn(config).await.unwrap();
        Some(Proxy { url: format!("http://{}", running.addr), _stop: running.stop })
    }
}

/// A KV client without gRPC message size limits on our side (~1 MB values, whole histories).
fn kv(c: &Client) -> KvClient {
    c.kv_client().max_encoding_message_size(64 << 20).max_decoding_message_size(usize::MAX)
}

/// kube-apiserver's create (`MOD(k) == 0` → Put) or GuaranteedUpdate Txn (`MOD(k) == rev` →
/// Put, else Range); returns the new revision.
async fn put_guarded(kv: &mut KvClient, key: &str, rev: i64, value: &[u8]) -> i64 {
    let txn = Txn::new().when([Compare::mod_revision(key, CompareOp::Equal, rev)]).and_then([TxnOp::put(key, value.to_vec(), None)]);
    let txn = if rev == 0 { txn } else { txn.or_else([TxnOp::get(key, None)]) };
    let r = kv.txn(txn).await.unwrap_or_else(|e| panic!("write of {key} at {rev}: {e}"));
    assert!(r.succeeded(), "write of {key} at {rev} lost its compare");
    assert_eq!(r.op_responses().len(), 1, "the client sees exactly the ops it sent");
    r.header().unwrap().revision()
}

/// Bases stored now: count and bytes (values).
async fn bases(direct: &mut KvClient) -> (usize, u64) {
    let r = direct.get(BASES_PREFIX, Some(GetOptions::new().with_prefix())).await.unwrap();
    (r.kvs().len(), r.kvs().iter().map(|kv| kv.value().len() as u64).sum())
}

/// New bases written by the proxies of this process (the `rebase` delta writes).
fn rebases() -> u64 {
    etcd_squeeze::metrics::get().delta_writes.with_label_values(&["rebase"]).get()
}

// ---------------------------------------------------------------------------------------------
// A. History bytes

struct Series {
    name: String,
    versions: Vec<Vec<u8>>,
    /// A consecutive-writes series: delta frames should win over per-object zstd.
    consecutive: bool,
}

#[derive(Default, Clone)]
struct History {
    stored: u64,
    bases: usize,
    base_bytes: u64,
    bases_written: u64,
    db_size: i64,
}

/// Writes `versions` to one key of a fresh etcd through `front`, reads every revision back
/// through it (byte-identical), and measures what etcd holds.
async fn history(front: Front, versions: &[Vec<u8>]) -> History {
    let etcd = Etcd::start().await;
    let proxy = Proxy::start(front, &etcd.url).await;
    let mut direct = kv(&etcd.client().await);
    let mut via = kv(&Client::connect([proxy.as_ref().map_or(etcd.url.as_str(), |p| p.url.as_str())], None).await.unwrap());
    let key = format!("{PREFIX}history");
    let rebases_before = rebases();
    let mut revs = Vec::new();
    let mut rev = 0;
    for v in versions {
        rev = put_guarded(&mut via, &key, rev, v).await;
        revs.push(rev);
    }
    let bases_written = rebases() - rebases_before;
    let mut stored = 0;
    for (v, rev) in versions.iter().zip(&revs) {
        let got = via.get(key.as_str(), Some(GetOptions::new().with_revision(*rev))).await.unwrap();
        assert_eq!(got.kvs()[0].value(), &v[..], "{}: revision {rev} reads back byte-identical", front.name());
        let raw = direct.get(key.as_str(), Some(GetOptions::new().with_revision(*rev))).await.unwrap();
        stored += raw.kvs()[0].value().len() as u64;
    }
    let (n, bytes) = bases(&mut direct).await;
    let db_size = etcd.db_size().await;
    History { stored: stored + bytes, bases: n, base_bytes: bytes, bases_written, db_size }
}

/// A 64 KiB dictionary trained on `corpus::training_set` (samples cut to 64 KiB as the trainer
/// does) and a codec using it, as benches/dictionary.rs builds them.
fn dictionary_codec(training: u64) -> ValueCodec {
    let max = DEFAULT_SAMPLE_MAX_BYTES as usize;
    let samples: Vec<Bytes> = corpus::training_set(training, 1000).iter().map(|g| Bytes::copy_from_slice(&g.json[..g.json.len().min(max)])).collect();
    let mut raw = zstd::dict::from_samples(&samples, DEFAULT_DICTIONARY_SIZE as usize).expect("training");
    set_zstd_dict_id(&mut raw, 1);
    let cache = Arc::new(DictionaryCache::new());
    cache.install_current(FLYTEWORKFLOW_PREFIX.as_bytes(), 1, &raw, DEFAULT_LEVEL, 0).unwrap();
    let rule = PrefixRule { prefix: Bytes::from_static(FLYTEWORKFLOW_PREFIX.as_bytes()), compress: true, level: DEFAULT_LEVEL, min_size: 256, delta: None };
    ValueCodec::new(vec![rule], 64 << 20).with_dictionaries(cache)
}

fn dictionary_stored(codec: &ValueCodec, versions: &[Vec<u8>]) -> u64 {
    let key = format!("{PREFIX}history");
    versions
        .iter()
        .map(|v| {
            let value = Bytes::from(v.clone());
            let (stored, _) = codec.encode(key.as_bytes(), &value).unwrap();
            assert_eq!(codec.decode(key.as_bytes(), &stored).unwrap(), value, "dictionary round trip");
            stored.len() as u64
        })
        .sum()
}

struct HistoryRow {
    series: Series,
    raw: History,
    zstd: History,
    dict: u64,
    delta: History,
}

fn kb(n: usize) -> String {
    if n >= 1_000_000 {
        format!("{:.2} MB", n as f64 / 1e6)
    } else {
        format!("{:.0} KB", n as f64 / 1e3)
    }
}

fn mib(n: i64) -> String {
    format!("{:.2}", n as f64 / (1 << 20) as f64)
}

fn history_table(rows: &[HistoryRow]) -> String {
    let mut out = String::from(
        "| series | versions | object first → last (max) | raw JSON bytes | stored: per-object zstd | stored: zstd + dictionary | stored: delta (values + bases) | ratio zstd | ratio dictionary | ratio delta | delta vs zstd | bases written | etcd DB MiB raw / zstd / delta |\n\
         |---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let v = &r.series.versions;
        let raw: u64 = v.iter().map(|x| x.len() as u64).sum();
        let max = v.iter().map(Vec::len).max().unwrap_or(0);
        let ratio = |s: u64| format!("{:.1}x", raw as f64 / s as f64);
        out.push_str(&format!(
            "| {} | {} | {} → {} ({}) | {raw} | {} | {} | {} (bases {} B) | {} | {} | {} | {:.2}x smaller | {} | {} / {} / {} |\n",
            r.series.name,
            v.len(),
            kb(v[0].len()),
            kb(v[v.len() - 1].len()),
            kb(max),
            r.zstd.stored,
            r.dict,
            r.delta.stored,
            r.delta.base_bytes,
            ratio(r.zstd.stored),
            ratio(r.dict),
            ratio(r.delta.stored),
            r.zstd.stored as f64 / r.delta.stored as f64,
            r.delta.bases_written,
            mib(r.raw.db_size),
            mib(r.zstd.db_size),
            mib(r.delta.db_size),
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// B. GuaranteedUpdate throughput

struct Load {
    label: String,
    /// One series per client (its own key and seed): version 0 creates, the rest update.
    series: Vec<Arc<Vec<Vec<u8>>>>,
}

struct LoadRow {
    label: String,
    front: Front,
    round: usize,
    updates: u64,
    secs: f64,
    p50: f64,
    p99: f64,
    stored: u64,
    bases: usize,
    db_size: i64,
}

async fn throughput(load: &Load, front: Front, round: usize) -> LoadRow {
    let etcd = Etcd::start().await;
    let proxy = Proxy::start(front, &etcd.url).await.expect("a proxy front");
    let client = Client::connect([proxy.url.as_str()], None).await.unwrap();
    let keys: Vec<String> = (0..load.series.len()).map(|i| format!("{PREFIX}wf-{i}")).collect();
    // Creates (not timed).
    let mut c = kv(&client);
    for (key, s) in keys.iter().zip(&load.series) {
        put_guarded(&mut c, key, 0, &s[0]).await;
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (key, s) in keys.iter().cloned().zip(load.series.iter().cloned()) {
        let mut kv = kv(&client);
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).unwrap();
            for v in s.iter().skip(1) {
                let t = Instant::now();
                let r = kv.get(key.as_str(), None).await.unwrap();
                let rev = r.kvs()[0].mod_revision();
                put_guarded(&mut kv, &key, rev, v).await;
                h.record(t.elapsed().as_micros() as u64).unwrap();
            }
            h
        }));
    }
    let mut h = Histogram::<u64>::new(3).unwrap();
    for t in tasks {
        h.add(t.await.unwrap()).unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    // Every key reads back its last version, byte-identical.
    for (key, s) in keys.iter().zip(&load.series) {
        let r = c.get(key.as_str(), None).await.unwrap();
        assert_eq!(r.kvs()[0].value(), &s[s.len() - 1][..], "{}: {key} reads back its last version", front.name());
    }
    let mut direct = kv(&etcd.client().await);
    let values = direct.get(PREFIX, Some(GetOptions::new().with_prefix())).await.unwrap();
    let (n, base_bytes) = bases(&mut direct).await;
    let stored = values.kvs().iter().map(|kv| kv.value().len() as u64).sum::<u64>() + base_bytes;
    let db_size = etcd.db_size().await;
    LoadRow { label: load.label.clone(), front, round, updates: h.len(), secs, p50: ms(&h, 0.5), p99: ms(&h, 0.99), stored, bases: n, db_size }
}

fn load_table(rows: &[LoadRow]) -> String {
    let mut out = String::from(
        "| object | front | run | GuaranteedUpdates | updates/s | p50 ms | p99 ms | stored at the end (values + bases) | bases | etcd DB MiB |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {} | {} | {} |\n",
            r.label,
            r.front.name(),
            r.round,
            r.updates,
            r.updates as f64 / r.secs,
            r.p50,
            r.p99,
            r.stored,
            r.bases,
            mib(r.db_size),
        ));
    }
    out
}

/// Per object: delta's median updates/s and p50 over zstd's, across rounds.
fn load_summary(rows: &[LoadRow]) -> Vec<String> {
    let mut labels: Vec<&str> = rows.iter().map(|r| r.label.as_str()).collect();
    labels.dedup();
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if v.is_empty() {
            f64::NAN
        } else if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        }
    };
    labels
        .iter()
        .map(|label| {
            let of = |f: Front, m: fn(&LoadRow) -> f64| median(rows.iter().filter(|r| r.label == *label && r.front == f).map(m).collect());
            let ops = |r: &LoadRow| r.updates as f64 / r.secs;
            let (z, d) = (of(Front::Zstd, ops), of(Front::Delta, ops));
            let (zp, dp) = (of(Front::Zstd, |r| r.p50), of(Front::Delta, |r| r.p50));
            let (zs, ds) = (of(Front::Zstd, |r| r.stored as f64), of(Front::Delta, |r| r.stored as f64));
            let (zd, dd) = (of(Front::Zstd, |r| r.db_size as f64), of(Front::Delta, |r| r.db_size as f64));
            format!(
                "{label}: delta frames {d:.1} updates/s vs per-object zstd {z:.1} ({:.0} %), p50 {dp:.1} vs {zp:.1} ms; \
                 stored at the end (current values + bases) {ds:.0} vs {zs:.0} bytes; etcd DB (every revision) {:.2} vs {:.2} MiB, \
                 {:.1}x smaller with delta frames (medians over runs)",
                100.0 * d / z,
                dd / (1 << 20) as f64,
                zd / (1 << 20) as f64,
                zd / dd,
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------

fn jsons(g: Vec<corpus::Generated>) -> Vec<Vec<u8>> {
    g.into_iter().map(|g| g.json).collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    let value_of = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let markdown = value_of("--markdown").map(PathBuf::from).filter(|_| !smoke);
    let rounds: usize = value_of("--rounds").map_or(if smoke { 1 } else { 3 }, |r| r.parse().expect("--rounds N"));
    let seed = 7;
    let started = Instant::now();

    // A. History bytes.
    let dyn2k = || Topology::Dynamic { children: 2000 };
    let arr10k = || Topology::ArrayNode { items: 10000 };
    let series: Vec<Series> = if smoke {
        let s = Scenario::new(Topology::Dynamic { children: 200 }, 25, 40);
        vec![Series { name: "dynamic 200 children, consecutive writes".into(), versions: jsons(consecutive_writes(&s, 6, seed)), consecutive: true }]
    } else {
        vec![
            Series { name: "dynamic 2,000 children, creation → completion".into(), versions: jsons(update_series(&Scenario::new(dyn2k(), 100, 0), 20, seed)), consecutive: false },
            Series { name: "ArrayNode 10,000 items, creation → completion".into(), versions: jsons(update_series(&Scenario::new(arr10k(), 500, 0), 20, seed)), consecutive: false },
            Series { name: "dynamic 2,000 children, 20 consecutive writes from 40 %".into(), versions: jsons(consecutive_writes(&Scenario::new(dyn2k(), 100, 40), 20, seed)), consecutive: true },
            Series { name: "ArrayNode 10,000 items, 20 consecutive writes from 40 %".into(), versions: jsons(consecutive_writes(&Scenario::new(arr10k(), 500, 40), 20, seed)), consecutive: true },
            Series {
                name: "dynamic 20,000 children (~1 MB), 20 consecutive writes from 40 %".into(),
                versions: jsons(consecutive_writes(&Scenario::new(Topology::Dynamic { children: 20000 }, 500, 40), 20, seed)),
                consecutive: true,
            },
        ]
    };
    let dict = dictionary_codec(if smoke { 30 } else { 200 });
    let mut history_rows = Vec::new();
    for s in series {
        eprintln!("history: {} ({} versions, {} → {} bytes)...", s.name, s.versions.len(), s.versions[0].len(), s.versions[s.versions.len() - 1].len());
        let raw = history(Front::Raw, &s.versions).await;
        let zstd = history(Front::Zstd, &s.versions).await;
        let delta = history(Front::Delta, &s.versions).await;
        let dict = dictionary_stored(&dict, &s.versions);
        assert_eq!(raw.stored, s.versions.iter().map(|v| v.len() as u64).sum::<u64>(), "raw stores the JSON as is");
        history_rows.push(HistoryRow { series: s, raw, zstd, dict, delta });
    }

    // B. GuaranteedUpdate throughput, fronts alternating, a fresh etcd per run.
    let clients = 4;
    let loads: Vec<Load> = if smoke {
        let s = Scenario::new(Topology::Dynamic { children: 200 }, 25, 40);
        vec![Load { label: "~20 KB (dynamic 200 children)".into(), series: (0..2).map(|i| Arc::new(jsons(consecutive_writes(&s, 4, 100 + i)))).collect() }]
    } else {
        let one = |topology, p: usize, n: usize, label: &str| {
            let s = Scenario::new(topology, p, 40);
            Load { label: label.into(), series: (0..clients as u64).map(|i| Arc::new(jsons(consecutive_writes(&s, n + 1, 100 + i)))).collect() }
        };
        vec![
            one(Topology::Dynamic { children: 20000 }, 500, 20, "~1 MB (dynamic 20,000 children)"),
            one(dyn2k(), 100, 40, "~100 KB (dynamic 2,000 children)"),
        ]
    };
    let mut load_rows = Vec::new();
    for load in &loads {
        let sizes: Vec<usize> = load.series.iter().flat_map(|s| s.iter().map(Vec::len)).collect();
        eprintln!("throughput: {} ({} clients × {} updates, {}–{} bytes)...", load.label, load.series.len(), load.series[0].len() - 1, sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
        for round in 1..=rounds {
            let order = if round % 2 == 1 { [Front::Zstd, Front::Delta] } else { [Front::Delta, Front::Zstd] };
            for front in order {
                load_rows.push(throughput(load, front, round).await);
            }
        }
    }

    let summary = load_summary(&load_rows);
    let mut md = String::new();
    md.push_str(&format!(
        "Each series is one key written with kube-apiserver's Txns (create `MOD(k) == 0` → Put; update `MOD(k) == rev` → Put, \
         else Range), seed {seed}, on a fresh etcd per configuration. *stored*: the stored value at each of the versions' \
         revisions (read from etcd directly with `revision`, i.e. the whole history etcd keeps until compaction), plus for \
         delta frames the bases under `/etcd-squeeze/bases/` (none is collected: no compaction). *ratio*: raw JSON bytes / \
         stored. *raw*, *per-object zstd* (level 3) and *delta frames* (level 1 + long-distance matching against the key's \
         base, default `delta_rebase_fraction` 0.5) run through a real etcd with the proxy in-process, dictionaries off; \
         *zstd + dictionary* is computed at codec level as `cargo bench --bench dictionary` does (`ValueCodec::encode` with \
         a {} KiB dictionary trained on `corpus::training_set(200, 1000)`, values over 1 MiB without it), so it has no etcd DB \
         size. *bases written*: new bases the proxy wrote (`etcd_squeeze_delta_writes_total{{kind=\"rebase\"}}`). *etcd DB*: \
         Maintenance.Status db_size after the configuration's run (bbolt grows in steps: small differences mean nothing). \
         Every revision read back through the front byte-identical.\n\n",
        DEFAULT_DICTIONARY_SIZE >> 10
    ));
    md.push_str(&history_table(&history_rows));
    md.push_str(&format!(
        "\nGuaranteedUpdate throughput: {clients} client tasks, each owning one key and walking through a consecutive-writes \
         series (from 40 % done) of its own seed: Range through the proxy, then Txn `MOD(k) == rev` → Put, else Range; \
         latency of the pair. Proxy in-process (it shares the bench's 2 tokio worker threads with the clients), a fresh \
         etcd per run, fronts alternating between rounds. *stored at the end*: current values + bases. This machine is \
         shared and noisy: differences under ~20 % between runs of one front are noise.\n\n"
    ));
    md.push_str(&load_table(&load_rows));
    md.push('\n');
    for s in &summary {
        md.push_str(&format!("- {s}.\n"));
    }

    // Human summary.
    println!("{md}");
    println!("Summary:");
    for r in &history_rows {
        let raw: u64 = r.series.versions.iter().map(|v| v.len() as u64).sum();
        println!(
            "  {}: raw {raw} B; zstd {:.1}x, dictionary {:.1}x, delta {:.1}x ({} bases written) — delta {:.2}x smaller than zstd",
            r.series.name,
            raw as f64 / r.zstd.stored as f64,
            raw as f64 / r.dict as f64,
            raw as f64 / r.delta.stored as f64,
            r.delta.bases_written,
            r.zstd.stored as f64 / r.delta.stored as f64
        );
    }
    for s in &summary {
        println!("  {s}");
    }
    println!("  ({:.0} s)", started.elapsed().as_secs_f64());

    for r in &history_rows {
        assert_eq!(r.delta.bases as u64, r.delta.bases_written, "{}: no compaction, so every base written is still stored", r.series.name);
        if r.series.consecutive {
            assert!(r.delta.stored < r.zstd.stored, "{}: delta frames store less than per-object zstd on consecutive writes", r.series.name);
        }
    }
    if let Some(path) = markdown {
        std::fs::write(&path, md).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}
