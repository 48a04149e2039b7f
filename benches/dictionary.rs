//! Trained dictionary vs plain zstd, by size class (< 20 KB, 20–200 KB, > 200 KB): stored bytes and
//! compress/decompress MB/s with a prepared dictionary, through the real codec (frames included).
//!
//! `cargo bench --bench dictionary` prints the markdown table of docs/benchmarks.md.
//! Under `cargo test --all-targets` it only runs a quick smoke pass.
//!
//! Training and measured objects never overlap: the dictionary (the default 64 KiB, from samples cut
//! to 64 KiB as the trainer does) is trained on generated objects of other seeds and on the odd-numbered
//! files of the real corpus (`../shared/corpus` or `ETCD_SQUEEZE_CORPUS`, when present); the table
//! measures the standard set, a small set of another seed, the update series and the even-numbered
//! real files.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_squeeze::codec::{PrefixRule, ValueCodec};
use etcd_squeeze::config::{DEFAULT_DICTIONARY_SIZE, DEFAULT_LEVEL, DEFAULT_SAMPLE_MAX_BYTES, FLYTEWORKFLOW_PREFIX};
use etcd_squeeze::corpus;
use etcd_squeeze::dictionary::{cache::DictionaryCache, store::set_zstd_dict_id};

const KEY: &[u8] = b"/registry/flyte.lyft.com/flyteworkflows/ns/wf";
const CLASSES: [&str; 3] = ["< 20 KB", "20–200 KB", "> 200 KB"];

fn class(len: usize) -> usize {
    match len {
        0..20_000 => 0,
        20_000..200_000 => 1,
        _ => 2,
    }
}

fn real_corpus() -> Vec<Vec<u8>> {
    let dir = std::env::var_os("ETCD_SQUEEZE_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus"));
    if !dir.is_dir() {
        return Vec::new();
    }
    etcd_squeeze::demo::json_files(&dir).unwrap_or_default().iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

fn small_shapes(n: u64, seed: u64) -> Vec<Vec<u8>> {
    corpus::training_set(n, seed).into_iter().map(|g| g.json).collect()
}

fn codec(cache: Option<Arc<DictionaryCache>>) -> ValueCodec {
    let rule = PrefixRule { prefix: Bytes::from_static(FLYTEWORKFLOW_PREFIX.as_bytes()), compress: true, level: DEFAULT_LEVEL, min_size: 256, delta: None };
    let c = ValueCodec::new(vec![rule], 64 << 20);
    match cache {
        Some(cache) => c.with_dictionaries(cache),
        None => c,
    }
}

/// MB/s of `f` over `bytes` input bytes, repeated for at least `min` (once in smoke mode).
fn mbps(bytes: usize, min: Duration, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut rounds = 0u32;
    loop {
        f();
        rounds += 1;
        if start.elapsed() >= min {
            break;
        }
    }
    (bytes as f64 * rounds as f64) / start.elapsed().as_secs_f64() / 1e6
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let real = if full { real_corpus() } else { Vec::new() };
    let (real_train, real_measure): (Vec<_>, Vec<_>) = real.into_iter().enumerate().partition(|(i, _)| i % 2 == 1);

    let mut training: Vec<Vec<u8>> = small_shapes(if full { 200 } else { 30 }, 1000);
    if full {
        for seed in 100..104 {
            training.extend(corpus::small_set(seed).into_iter().map(|g| g.json));
        }
    }
    training.extend(real_train.into_iter().map(|(_, v)| v));
    let max = DEFAULT_SAMPLE_MAX_BYTES as usize;
    let samples: Vec<Bytes> = training.iter().map(|v| Bytes::copy_from_slice(&v[..v.len().min(max)])).collect();
    let started = Instant::now();
    // BENCH_DICT_SIZE=bytes compares other dictionary sizes.
    let size = std::env::var("BENCH_DICT_SIZE").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_DICTIONARY_SIZE as usize);
    let mut raw = zstd::dict::from_samples(&samples, size).expect("training");
    let train_time = started.elapsed();
    set_zstd_dict_id(&mut raw, 1);
    let cache = Arc::new(DictionaryCache::new());
    cache.install_current(FLYTEWORKFLOW_PREFIX.as_bytes(), 1, &raw, DEFAULT_LEVEL, 0).unwrap();
    let (plain, dict) = (codec(None), codec(Some(cache)));

    let mut measured: Vec<Vec<u8>> = if full {
        let mut m: Vec<Vec<u8>> = corpus::standard_set(1).into_iter().map(|g| g.json).collect();
        m.extend(corpus::small_set(2).into_iter().map(|g| g.json));
        m.extend(corpus::standard_series(1).into_iter().map(|g| g.json));
        m.extend(small_shapes(60, 2000));
        m
    } else {
        small_shapes(6, 2000)
    };
    measured.extend(real_measure.into_iter().map(|(_, v)| v));

    // Per class: objects, JSON bytes, plain stored, dict stored, worst per-object ratio of dict/plain.
    let mut rows = [(0usize, 0usize, 0usize, 0usize, 0f64); 3];
    let mut values: [Vec<(Bytes, Bytes)>; 3] = Default::default();
    for v in &measured {
        let value = Bytes::from(v.clone());
        let (p, _) = plain.encode(KEY, &value).unwrap();
        let (d, _) = dict.encode(KEY, &value).unwrap();
        assert_eq!(dict.decode(KEY, &d).unwrap(), value, "round trip");
        let c = class(v.len());
        let r = &mut rows[c];
        r.0 += 1;
        r.1 += v.len();
        r.2 += p.len();
        r.3 += d.len();
        r.4 = r.4.max(d.len() as f64 / p.len() as f64);
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            eprintln!("{:>9} bytes: plain {:>8} dict {:>8} ({:.3})", v.len(), p.len(), d.len(), d.len() as f64 / p.len() as f64);
        }
        values[c].push((value, d));
    }
    let min = if full { Duration::from_millis(500) } else { Duration::ZERO };
    let sample_bytes: usize = samples.iter().map(|s| s.len()).sum();
    let mut md = format!(
        "Through the real codec (`ValueCodec::encode`/`decode`: 10-byte frame header and zstd checksum included), zstd level \
         {DEFAULT_LEVEL}, a {} KiB dictionary prepared once (`EncoderDictionary`/`DecoderDictionary`), values over 1 MiB without it \
         (`codec::DICTIONARY_MAX_VALUE_BYTES`). Trained on {} samples ({sample_bytes} bytes, each cut to 64 KiB as the trainer does; \
         {:.2} s): `corpus::training_set(200, 1000)`, `corpus::small_set` seeds 100–103 and the odd-numbered files of \
         `../shared/corpus`. Measured on other objects: `corpus::standard_set(1)`, `corpus::small_set(2)`, the 12-version update \
         series, `corpus::training_set(60, 2000)` and the even-numbered files of `../shared/corpus`. *worst object*: the largest \
         stored-size ratio dictionary / plain of one object in the class (below 1.00: every object is smaller). MB/s of JSON, one core.\n\n",
        raw.len() >> 10,
        samples.len(),
        train_time.as_secs_f64(),
    );
    md.push_str("| size class | objects | JSON bytes | stored, plain zstd | stored, dictionary | ratio plain | ratio dictionary | dictionary gain | worst object | compress MB/s plain / dict | decompress MB/s plain / dict |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let mut verdict = Vec::new();
    for (c, name) in CLASSES.iter().enumerate() {
        let (n, json, p, d, worst) = rows[c];
        if n == 0 {
            continue;
        }
        let vals = &values[c];
        let enc = |codec: &ValueCodec| mbps(json, min, || vals.iter().for_each(|(v, _)| drop(codec.encode(KEY, v).unwrap())));
        let stored_plain: Vec<Bytes> = vals.iter().map(|(v, _)| plain.encode(KEY, v).unwrap().0).collect();
        let dec_plain = mbps(json, min, || stored_plain.iter().for_each(|s| drop(plain.decode(KEY, s).unwrap())));
        let dec_dict = mbps(json, min, || vals.iter().for_each(|(_, s)| drop(dict.decode(KEY, s).unwrap())));
        let gain = p as f64 / d as f64;
        md.push_str(&format!(
            "| {name} | {n} | {json} | {p} | {d} | {:.1}x | {:.1}x | {gain:.2}x smaller | {worst:.2} | {:.0} / {:.0} | {dec_plain:.0} / {dec_dict:.0} |\n",
            json as f64 / p as f64,
            json as f64 / d as f64,
            enc(&plain),
            enc(&dict),
        ));
        if c == 0 {
            verdict.push(format!("objects under 20 KB are {gain:.2}x smaller than plain zstd (target: at least 1.8x)"));
        }
        if worst > 1.0 {
            verdict.push(format!("some {name} object is {:.1}% larger with the dictionary", (worst - 1.0) * 100.0));
        }
    }
    if verdict.len() == 1 {
        verdict.push("no object of any class is larger with the dictionary".into());
    }
    md.push_str(&format!("\n{}.\n", verdict.join("; ")));
    md.push_str(
        "\n- Values over 1 MiB skip the dictionary: with it the 1.7 MB and 3.9 MB objects came out ~1.5% larger (their own \
         history already holds every match), while between 200 KB and 1 MiB it still saves 6–8% (`BENCH_VERBOSE=1` prints \
         every object). `BENCH_DICT_SIZE=<bytes>` trains another size: on this corpus 32 KiB and 112 KiB (zstd's default) \
         store within 1% of 64 KiB.\n\
         - With a dictionary, each value gets a zstd context of its own that borrows the prepared tables (a thread-local \
         context cannot keep a borrow of a dictionary that may be replaced); zstd copies the tables into it for inputs past \
         a few KB. Hence the lower MB/s with a dictionary; a 20 KB value still decodes in ~30 µs.\n",
    );
    print!("{md}");
    let args: Vec<String> = std::env::args().collect();
    if let Some(path) = args.iter().position(|a| a == "--markdown").and_then(|i| args.get(i + 1)) {
        std::fs::write(path, &md).expect("write --markdown file");
    }
}
