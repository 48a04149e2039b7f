//! Soak: apiserver-shaped mixed load through the real binary for `ETCD_SQUEEZE_SOAK_MINUTES`
//! (default 10), printing per minute the operations, errors, p99 latency and the proxy's RSS.
//! Pass: zero errors and a flat RSS (the last minute within 20% + 16 MiB of the first).
//! Run by `scripts/soak`; not in CI (`#[ignore]`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp, WatchOptions};

use crate::harness::{rss_kib, Etcd, FLYTE};
use crate::ops::{Binary, BinaryConfig};

/// Counters shared by the workers for the current minute.
#[derive(Default)]
struct Minute {
    ops: AtomicU64,
    errors: AtomicU64,
    latency: Mutex<Option<hdrhistogram::Histogram<u64>>>,
}

impl Minute {
    fn record(&self, took: Duration, ok: bool) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let mut h = self.latency.lock().unwrap();
        h.get_or_insert_with(|| hdrhistogram::Histogram::new(3).unwrap()).record(took.as_micros() as u64).unwrap();
    }

    /// (ops, errors, p99 µs), and resets.
    fn take(&self) -> (u64, u64, u64) {
        let p99 = self.latency.lock().unwrap().take().map_or(0, |h| h.value_at_quantile(0.99));
        (self.ops.swap(0, Ordering::Relaxed), self.errors.swap(0, Ordering::Relaxed), p99)
    }
}

/// One worker: kube-apiserver's mix on `objects` keys: Get 55%, GuaranteedUpdate 20%, paginated
/// List (limit 50) 10%, create-or-replace 10%, delete 5%.
async fn worker(url: String, w: u64, objects: Arc<Vec<Vec<u8>>>, minute: Arc<Minute>, stop: Arc<AtomicBool>) {
    let mut c = etcd_client::Client::connect([url.as_str()], None).await.unwrap();
    let mut n = w.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    while !stop.load(Ordering::Relaxed) {
        n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let i = (n >> 33) as usize;
        let key = format!("{FLYTE}soak/wf-{}", i % 400);
        let value = objects[i % objects.len()].clone();
        let t = Instant::now();
        let ok = match (n >> 20) % 100 {
            0..=54 => c.get(key.as_str(), None).await.is_ok(),
            55..=74 => match c.get(key.as_str(), None).await {
                Ok(r) => {
                    let rev = r.kvs().first().map_or(0, |kv| kv.mod_revision());
                    let txn = Txn::new()
                        .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)])
                        .and_then([TxnOp::put(key.as_str(), value, None)])
                        .or_else([TxnOp::get(key.as_str(), None)]);
                    c.txn(txn).await.is_ok()
                }
                Err(_) => false,
            },
            75..=84 => c.get(format!("{FLYTE}soak/"), Some(GetOptions::new().with_prefix().with_limit(50))).await.is_ok(),
            85..=94 => c.put(key.as_str(), value, None).await.is_ok(),
            _ => c.delete(key.as_str(), None).await.is_ok(),
        };
        minute.record(t.elapsed(), ok);
    }
}

/// `scripts/soak` (`ETCD_SQUEEZE_SOAK_MINUTES`, default 10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak of minutes (scripts/soak), not part of the suite"]
async fn soak() {
    let minutes: u64 = std::env::var("ETCD_SQUEEZE_SOAK_MINUTES").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let etcd = Etcd::start_with(&["--quota-backend-bytes", "8589934592", "--auto-compaction-mode", "revision", "--auto-compaction-retention", "1000"]).await;
    // ETCD_SQUEEZE_SOAK_DELTA=1: delta frames on for the FlyteWorkflow prefix (etcd's auto-compaction
    // then also exercises the collection of superseded bases).
    let delta = std::env::var("ETCD_SQUEEZE_SOAK_DELTA").is_ok_and(|v| v == "1");
    let cache = std::env::var("ETCD_SQUEEZE_SOAK_BASE_CACHE").unwrap_or_else(|_| "64MiB".into());
    let more = if delta { format!("[[prefixes]]\nprefix = \"{FLYTE}\"\ndelta = true\ndelta_base_cache = \"{cache}\"\n") } else { String::new() };
    eprintln!("soak: delta frames {}", if delta { "on" } else { "off" });
    let proxy = Binary::start(BinaryConfig { listen_ip: "127.0.0.1", upstream: &etcd.url, server: "", more: &more }).await;
    let objects: Arc<Vec<Vec<u8>>> = Arc::new(etcd_squeeze::corpus::small_set(7).into_iter().map(|g| g.json).collect());
    let minute = Arc::new(Minute::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks: Vec<_> = (0..16).map(|w| tokio::spawn(worker(proxy.url.clone(), w, objects.clone(), minute.clone(), stop.clone()))).collect();
    // Four watchers follow the prefix, as informers do; a watch error counts as an error.
    for _ in 0..4 {
        let (url, minute, stop) = (proxy.url.clone(), minute.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = etcd_client::Client::connect([url.as_str()], None).await.unwrap();
            let mut w = c.watch(format!("{FLYTE}soak/"), Some(WatchOptions::new().with_prefix())).await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(m) = tokio::time::timeout(Duration::from_secs(1), w.message()).await {
                    if !matches!(m, Ok(Some(ref r)) if !r.canceled()) {
                        minute.record(Duration::ZERO, false);
                        return;
                    }
                }
            }
        }));
    }
    println!("minute        ops   errors   p99(ms)   proxy RSS (MiB)");
    let (mut total_errors, mut rss) = (0, Vec::new());
    for m in 1..=minutes {
        tokio::time::sleep(Duration::from_secs(60)).await;
        let (ops, errors, p99) = minute.take();
        let r = rss_kib(proxy.child.id());
        total_errors += errors;
        rss.push(r);
        println!("{m:>6} {ops:>10} {errors:>8} {:>9.1} {:>17.1}", p99 as f64 / 1000.0, r as f64 / 1024.0);
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let (first, last) = (rss[0], *rss.last().unwrap());
    let flat = last <= first + first / 5 + 16 * 1024;
    println!("errors: {total_errors}; RSS first {first} KiB, last {last} KiB: {}", if flat { "flat" } else { "GROWING" });
    assert_eq!(total_errors, 0);
    assert!(flat, "RSS grew from {first} KiB to {last} KiB");
}
