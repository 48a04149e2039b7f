//! The orphan sweep (src/delta/sweep.rs), on a real etcd: bases left behind by a DeleteRange
//! over a range, a lease that ended, a key deleted directly in etcd, and a proxy SIGKILLed
//! mid-write are all deleted once compaction passes them; superseded bases of a key never
//! written again go too; and a sweep racing writes, compactions and a lagging watcher never
//! deletes a base a value etcd still serves needs.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};

use crate::harness::{all_bases, drifting_series, get_value, http_get, read_then_update, sample, Etcd, Proxy, ProxyConfig, FLYTE};
use crate::ops::{Binary, BinaryConfig};

/// A proxy with delta frames on for the FlyteWorkflow prefix and a sweep every 300 ms.
async fn sweeping_proxy(etcd: &Etcd) -> Proxy {
    ProxyConfig::new(&etcd.url).prefix(FLYTE).delta(true).dictionaries(false).with(|c| c.sweep_interval = Duration::from_millis(300)).start().await
}

/// Writes the first `n` versions of the drifting series to `key` (each a GuaranteedUpdate):
/// the object grows and shrinks, so the proxy rebases and the key gets several bases.
async fn write_versions(c: &mut etcd_client::Client, key: &str, n: usize) -> Vec<u8> {
    let versions = drifting_series();
    for v in &versions[..n] {
        assert!(read_then_update(c, key, v).await.succeeded());
    }
    versions[n - 1].clone()
}

async fn swept(proxy: &Proxy, reason: &str) -> f64 {
    let scrape = http_get(&proxy.metrics_url, "/metrics").await.unwrap().1;
    sample(&scrape, &format!("etcd_squeeze_bases_swept_total{{reason=\"{reason}\"}}")).unwrap_or(0.0)
}

async fn no_bases_left(etcd: &Etcd) -> bool {
    let mut direct = etcd.client().await;
    all_bases(&mut direct).await == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bases_of_keys_deleted_by_a_range_a_lease_or_etcd_itself_are_swept() {
    let etcd = Etcd::start().await;
    let proxy = sweeping_proxy(&etcd).await;
    let mut via = proxy.client().await;
    let mut direct = etcd.client().await;
    // Three ways a key goes without the proxy deleting its bases in the same Txn.
    for name in ["range/a", "range/b", "direct", "leased"] {
        write_versions(&mut via, &format!("{FLYTE}{name}"), 6).await;
    }
    let written = all_bases(&mut direct).await;
    assert!(written >= 8, "the drifting series rebased ({written} bases for 4 keys)");
    via.delete(format!("{FLYTE}range/"), Some(DeleteOptions::new().with_prefix())).await.unwrap();
    direct.delete(format!("{FLYTE}direct"), None).await.unwrap();
    // A leased Put is stored per object; when the lease ends etcd deletes the key.
    let lease = via.lease_grant(60, None).await.unwrap().id();
    via.put(format!("{FLYTE}leased"), "{}", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    via.lease_revoke(lease).await.unwrap();
    assert_eq!(all_bases(&mut direct).await, written, "orphans: nothing deleted them in the same Txn");
    // analyze reports them (read-only).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_etcd-squeeze"))
        .args(["analyze", "--json", "--dictionary-samples", "0", "--endpoints", &etcd.url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let orphans = &report["orphans"];
    assert_eq!(orphans["key_gone"].as_u64(), Some(written as u64), "{orphans}");
    assert_eq!(orphans["bases"].as_u64(), Some(written as u64), "{orphans}");
    // A live key with a single base keeps it.
    let live = format!("{FLYTE}live");
    let value = write_versions(&mut via, &live, 1).await;
    crate::harness::compact_until(&mut via, Duration::from_secs(30), "the orphaned bases to be swept", || async { all_bases(&mut etcd.client().await).await == 1 }).await;
    assert!(swept(&proxy, "key_gone").await >= written as f64, "{}", swept(&proxy, "key_gone").await);
    assert_eq!(get_value(&mut via, &live, 0).await.unwrap().unwrap(), value);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn superseded_bases_of_a_key_never_written_again_are_swept_and_every_revision_still_reads() {
    let etcd = Etcd::start().await;
    let proxy = sweeping_proxy(&etcd).await;
    let mut via = proxy.client().await;
    let mut direct = etcd.client().await;
    let key = format!("{FLYTE}idle");
    let versions = drifting_series();
    let mut revs = Vec::new();
    for v in &versions[..8] {
        let r = read_then_update(&mut via, &key, v).await;
        revs.push(r.header().unwrap().revision());
    }
    let written = all_bases(&mut direct).await;
    assert!(written >= 2, "{written}");
    // Compaction at the revision before the last version: only the last two versions are
    // readable; bases only older versions needed go, the ones they need stay.
    via.compact(revs[6], None).await.unwrap();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (i, r) in revs.iter().enumerate().skip(6) {
            assert_eq!(get_value(&mut via, &key, *r).await.unwrap().unwrap(), versions[i], "revision {r}");
        }
    }
    crate::harness::compact_until(&mut via, Duration::from_secs(30), "every superseded base to be swept", || async { all_bases(&mut etcd.client().await).await == 1 }).await;
    assert!(swept(&proxy, "superseded").await >= (written - 1) as f64);
    assert_eq!(get_value(&mut via, &key, 0).await.unwrap().unwrap(), versions[7]);
}

/// A proxy SIGKILLed mid-stream (twice) leaves no base that a later sweep cannot delete, and no
/// value that cannot be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_killed_mid_write_leaves_nothing_for_ever() {
    let etcd = Etcd::start().await;
    let config = || BinaryConfig { listen_ip: "127.0.0.1", upstream: &etcd.url, server: "", more: "[[prefixes]]\nprefix = \"/registry/flyte.lyft.com/flyteworkflows/\"\ndelta = true\n" };
    for round in 0..2 {
        let mut binary = Binary::start(config()).await;
        let mut c = etcd_client::Client::connect([binary.url.as_str()], None).await.unwrap();
        let series = drifting_series();
        let writer = tokio::spawn(async move {
            // GuaranteedUpdates until the proxy dies under them.
            for i in 0.. {
                for k in 0..4 {
                    let key = format!("{FLYTE}killed/{k}");
                    let Ok(read) = c.get(key.as_str(), None).await else { return };
                    let m = read.kvs().first().map_or(0, |kv| kv.mod_revision());
                    let v = series[(i * 3 + k + round) % series.len()].clone();
                    let txn = Txn::new().when([Compare::mod_revision(key.as_str(), CompareOp::Equal, m)]).and_then([TxnOp::put(key.as_str(), v, None)]);
                    if c.txn(txn).await.is_err() {
                        return;
                    }
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(1500 + 500 * round as u64)).await;
        binary.child.kill().unwrap();
        let _ = binary.child.wait();
        writer.abort();
    }
    let proxy = sweeping_proxy(&etcd).await;
    let mut via = proxy.client().await;
    let mut direct = etcd.client().await;
    assert!(all_bases(&mut direct).await > 0);
    // Every key reads back through a fresh proxy.
    let listed = via.get(format!("{FLYTE}killed/"), Some(GetOptions::new().with_prefix())).await.unwrap();
    assert!(listed.count() > 0);
    for kv in listed.kvs() {
        assert!(kv.value().starts_with(b"{"), "{} reads back as JSON", kv.key_str().unwrap());
    }
    // Deleted directly: the sweep takes every base.
    direct.delete(format!("{FLYTE}killed/"), Some(DeleteOptions::new().with_prefix())).await.unwrap();
    crate::harness::compact_until(&mut via, Duration::from_secs(30), "every base to be swept", || no_bases_left(&etcd)).await;
}

/// The sweep races GuaranteedUpdates on keys that rebase, compaction every 300 ms, and a watcher
/// reading every event with prev_kv: no read and no event ever misses its base.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_racing_writes_compactions_and_a_watcher_never_takes_a_needed_base() {
    let etcd = Etcd::start().await;
    let proxy = sweeping_proxy(&etcd).await;
    let mut via = proxy.client().await;
    let versions = drifting_series();
    let mut events = via.watch(FLYTE, Some(WatchOptions::new().with_prefix().with_prev_key())).await.unwrap();
    let mut compactor = proxy.client().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let compacting = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let rev = compactor.put("/tick", "x", None).await.unwrap().header().unwrap().revision();
                compactor.compact(rev, None).await.unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let mut expected = std::collections::HashMap::new();
    for i in 0..40 {
        let key = format!("{FLYTE}race/{}", i % 3);
        let v = &versions[(i * 7) % versions.len()];
        assert!(read_then_update(&mut via, &key, v).await.succeeded());
        expected.insert(key.clone(), v.clone());
        if i % 10 == 9 {
            via.delete(format!("{FLYTE}race/{}", i % 3), None).await.unwrap();
            expected.remove(&key);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    compacting.await.unwrap();
    for (key, v) in &expected {
        assert_eq!(&get_value(&mut via, key, 0).await.unwrap().unwrap(), v, "{key}");
    }
    // Every event arrived decoded (a missing base would cancel the watch or count a decode error).
    let mut seen = 0;
    while seen < 40 {
        let resp = tokio::time::timeout(Duration::from_secs(10), events.message()).await.expect("events keep coming").unwrap().unwrap();
        assert!(!resp.canceled(), "{}", resp.cancel_reason());
        seen += resp.events().iter().filter(|e| e.event_type() == etcd_client::EventType::Put).count();
    }
}
