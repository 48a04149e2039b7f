//! Delta frames (issue 9), on a real etcd: every revision of an update series reads back
//! byte-identical, watches replay it with the right prev_kv, rebases and compaction interleave
//! with a lagging watcher, deletes take the bases with them, two proxies race on one key, a
//! snapshot restore keeps everything readable, and `migrate decompress` leaves no frame and no base.

use etcd_client::{Compare, CompareOp, EventType, GetOptions, Txn, TxnOp, TxnOpResponse, WatchOptions};
use etcd_squeeze::codec::delta::BASES_PREFIX;
use etcd_squeeze::codec::frame::{self, Codec};
use etcd_squeeze::corpus::{consecutive_writes, update_series, Scenario, Topology};

use std::time::Duration;

use crate::harness::{decode_errors, eventually, http_get, sample, Env, Etcd, Proxy, FLYTE};
use crate::ops::{Binary, BinaryConfig};

/// 20 consecutive propeller writes of a dynamic fan-out with 1,000 children (~60 KB: a watch
/// replaying all 20 with prev_kv stays under etcd-client's 4 MiB message limit).
fn series() -> Vec<Vec<u8>> {
    consecutive_writes(&Scenario::new(Topology::Dynamic { children: 1000 }, 100, 40), 20, 11).into_iter().map(|g| g.json).collect()
}

/// 20 versions from creation to completion: the object grows and shrinks, forcing rebases.
fn drifting_series() -> Vec<Vec<u8>> {
    update_series(&Scenario::new(Topology::Dynamic { children: 2000 }, 100, 0), 20, 12).into_iter().map(|g| g.json).collect()
}

/// kube-apiserver's create and GuaranteedUpdate Txns; returns the revision of each version.
async fn write_series(c: &mut etcd_client::Client, key: &str, versions: &[Vec<u8>]) -> Vec<i64> {
    let mut revs = Vec::new();
    let mut rev = 0;
    for v in versions {
        let txn = Txn::new().when([Compare::mod_revision(key, CompareOp::Equal, rev)]).and_then([TxnOp::put(key, v.clone(), None)]);
        let txn = if rev == 0 { txn } else { txn.or_else([TxnOp::get(key, None)]) };
        let r = c.txn(txn).await.unwrap();
        assert!(r.succeeded(), "write of {key} at {rev}");
        assert!(r.op_responses().len() == 1, "the client sees exactly the ops it sent");
        rev = r.header().unwrap().revision();
        revs.push(rev);
    }
    revs
}

async fn bases(direct: &mut etcd_client::Client) -> Vec<(Vec<u8>, usize)> {
    let r = direct.get(BASES_PREFIX, Some(GetOptions::new().with_prefix())).await.unwrap();
    r.kvs().iter().map(|kv| (kv.key().to_vec(), kv.value().len())).collect()
}

fn codec_of(stored: &[u8]) -> Option<Codec> {
    frame::parse(stored).ok().map(|f| f.codec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_reads_back_at_every_revision_and_replays_in_a_watch() {
    let mut env = Env::with_delta(FLYTE).await;
    let key = env.wf_key("series");
    let versions = series();
    let revs = write_series(&mut env.via, &key, &versions).await;
    for (v, rev) in versions.iter().zip(&revs) {
        let r = env.via.get(key.as_str(), Some(GetOptions::new().with_revision(*rev))).await.unwrap();
        assert_eq!(r.kvs()[0].value(), &v[..], "revision {rev}");
        assert_eq!(r.kvs()[0].mod_revision(), *rev);
        let stored = env.direct.get(key.as_str(), Some(GetOptions::new().with_revision(*rev))).await.unwrap();
        assert_eq!(codec_of(stored.kvs()[0].value()), Some(Codec::Delta), "revision {rev} is a delta frame");
    }
    // What etcd holds for the whole history: the versions' frames plus the bases.
    let mut stored_total = 0;
    for rev in &revs {
        stored_total += env.direct.get(key.as_str(), Some(GetOptions::new().with_revision(*rev))).await.unwrap().kvs()[0].value().len();
    }
    let b = bases(&mut env.direct).await;
    assert!(!b.is_empty(), "the first write created a base");
    stored_total += b.iter().map(|(_, n)| n).sum::<usize>();
    let raw: usize = versions.iter().map(Vec::len).sum();
    assert!(raw > 30 * stored_total, "history {raw} bytes stored in {stored_total}");

    // A fresh proxy (cold base cache) reads the same and replays the history in a watch.
    let cold = Proxy::start_delta(&env.etcd.url).await;
    let mut c = cold.client().await;
    let mut stream = c.watch(key.as_str(), Some(WatchOptions::new().with_start_revision(revs[0]).with_prev_key())).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < versions.len() {
        let resp = stream.message().await.unwrap().unwrap();
        assert!(!resp.canceled(), "{}", resp.cancel_reason());
        for ev in resp.events() {
            let kv = ev.kv().unwrap();
            let i = seen.len();
            assert_eq!(kv.value(), &versions[i][..], "event {i}");
            match (i, ev.prev_kv()) {
                (0, p) => assert!(p.is_none(), "a create has no prev_kv"),
                (_, Some(p)) => assert_eq!(p.value(), &versions[i - 1][..], "prev_kv of event {i}"),
                (_, None) => panic!("event {i} has no prev_kv"),
            }
            seen.push(kv.mod_revision());
        }
    }
    assert_eq!(seen, revs);
}

/// Two watchers with prev_kv (kube-apiserver's watch cache, and one more) get every write of a
/// series right, and the proxy decompresses nothing for them: each event's value and prev_kv
/// were written lately, and are recalled instead. The real binary with no config (delta frames
/// by default), so its metrics count this test alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_get_values_written_lately_without_decompressing_them() {
    let etcd = Etcd::start().await;
    let proxy = Binary::start(BinaryConfig { listen_ip: "127.0.0.1", upstream: &etcd.url, server: "", more: "" }).await;
    let metric = |name: &'static str| {
        let url = proxy.metrics_url.clone();
        async move { sample(&http_get(&url, "/metrics").await.unwrap().1, name).unwrap_or(0.0) }
    };
    eventually(Duration::from_secs(10), "the replica to write delta frames", || async {
        sample(&http_get(&proxy.metrics_url, "/metrics").await.unwrap().1, &format!("etcd_squeeze_delta_writing{{prefix=\"{FLYTE}\"}}")) == Some(1.0)
    })
    .await;
    let mut via = etcd_client::Client::connect([proxy.url.as_str()], None).await.unwrap();
    let key = format!("{FLYTE}ns/recalled");
    let versions = series();
    let mut streams = Vec::new();
    for _ in 0..2 {
        streams.push(via.watch(key.as_str(), Some(WatchOptions::new().with_prev_key())).await.unwrap());
    }
    let revs = write_series(&mut via, &key, &versions).await;
    let mut direct = etcd.client().await;
    let stored = direct.get(key.as_str(), None).await.unwrap();
    assert_eq!(codec_of(stored.kvs()[0].value()), Some(Codec::Delta));
    for stream in &mut streams {
        let mut seen = 0;
        while seen < versions.len() {
            let resp = stream.message().await.unwrap().unwrap();
            for ev in resp.events() {
                assert_eq!(ev.kv().unwrap().value(), &versions[seen][..], "event {seen}");
                assert_eq!(ev.kv().unwrap().mod_revision(), revs[seen]);
                if seen > 0 {
                    assert_eq!(ev.prev_kv().unwrap().value(), &versions[seen - 1][..], "prev_kv of event {seen}");
                }
                seen += 1;
            }
        }
    }
    // 2 watchers × (20 values + 19 prev_kvs), every one recalled; no base was decompressed.
    assert_eq!(metric("etcd_squeeze_decoded_recalls_total").await, 78.0);
    assert_eq!(metric("etcd_squeeze_base_cache_misses_total").await, 0.0);
    // A read of an older revision is recalled too.
    let r = via.get(key.as_str(), Some(GetOptions::new().with_revision(revs[3]))).await.unwrap();
    assert_eq!(r.kvs()[0].value(), &versions[3][..]);
    assert_eq!(metric("etcd_squeeze_decoded_recalls_total").await, 79.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebase_and_compaction_with_a_lagging_watcher() {
    let mut env = Env::with_delta(FLYTE).await;
    let key = env.wf_key("drift");
    let versions = drifting_series();
    let first = write_series(&mut env.via, &key, &versions[..10]).await;
    let bases_before = bases(&mut env.direct).await.len();
    assert!(bases_before >= 2, "the drifting series rebased ({bases_before} bases)");
    // Compact through the proxy in the middle of the history, then keep writing.
    let compact_at = first[6];
    env.via.compact(compact_at, None).await.unwrap();
    // Collection waits for a listing of the replicas read after the compaction (every 2 s).
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let mut rev = *first.last().unwrap();
    let mut revs = first.clone();
    for v in &versions[10..] {
        let r = env.via.txn(Txn::new().when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)]).and_then([TxnOp::put(key.as_str(), v.clone(), None)])).await.unwrap();
        assert!(r.succeeded());
        rev = r.header().unwrap().revision();
        revs.push(rev);
    }
    // A watcher that lagged behind (starts at the compaction revision) replays everything since.
    // (Its first event is the one after the compaction revision: etcd has no prev_kv for the
    // event at the compaction revision itself.)
    let mut stream = env.via.watch(key.as_str(), Some(WatchOptions::new().with_start_revision(compact_at + 1).with_prev_key())).await.unwrap();
    let from = revs.iter().position(|r| *r == compact_at).unwrap();
    let mut i = from + 1;
    while i < versions.len() {
        let resp = stream.message().await.unwrap().unwrap();
        assert!(!resp.canceled(), "{}", resp.cancel_reason());
        for ev in resp.events() {
            assert_eq!(ev.kv().unwrap().value(), &versions[i][..], "event at {}", revs[i]);
            assert_eq!(ev.prev_kv().unwrap().value(), &versions[i - 1][..], "prev_kv at {}", revs[i]);
            i += 1;
        }
    }
    // Every revision since the compaction still reads back; older ones are etcd's compacted error.
    for (j, r) in revs.iter().enumerate().skip(from) {
        let got = env.via.get(key.as_str(), Some(GetOptions::new().with_revision(*r))).await.unwrap();
        assert_eq!(got.kvs()[0].value(), &versions[j][..], "revision {r}");
    }
    let err = env.via.get(key.as_str(), Some(GetOptions::new().with_revision(first[1]))).await.unwrap_err().to_string();
    assert!(err.contains("required revision has been compacted"), "{err}");
    // Bases superseded before the compaction revision were collected by the later writes.
    let scrape = crate::harness::http_get(&env.proxy.metrics_url, "/metrics").await.unwrap().1;
    let deleted = crate::harness::sample(&scrape, "etcd_squeeze_bases_deleted_total").unwrap();
    assert!(deleted >= 1.0, "superseded bases collected: {deleted}\n{:?}", bases(&mut env.direct).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_carries_prev_kv_and_the_sweep_takes_the_bases() {
    let mut env = Env::with_delta(FLYTE).await;
    let (a, b) = (env.wf_key("del-a"), env.wf_key("del-b"));
    let versions = series();
    let revs = write_series(&mut env.via, &a, &versions[..5]).await;
    let revs_b = write_series(&mut env.via, &b, &versions[..3]).await;
    let mut stream = env.via.watch(FLYTE, Some(WatchOptions::new().with_prefix().with_prev_key().with_start_revision(revs_b[2] + 1))).await.unwrap();
    // kube-apiserver's delete: Txn(MOD(k) == rev) → DeleteRange(k), else Range(k).
    let r = env
        .via
        .txn(Txn::new().when([Compare::mod_revision(a.as_str(), CompareOp::Equal, revs[4])]).and_then([TxnOp::delete(a.as_str(), None)]).or_else([TxnOp::get(a.as_str(), None)]))
        .await
        .unwrap();
    assert!(r.succeeded());
    assert_eq!(r.op_responses().len(), 1, "the bases' delete is not shown");
    // A top-level delete (etcdctl del) with prev_kv.
    let d = env.via.delete(b.as_str(), Some(etcd_client::DeleteOptions::new().with_prev_key())).await.unwrap();
    assert_eq!(d.deleted(), 1);
    assert_eq!(d.prev_kvs()[0].value(), &versions[2][..]);
    let mut deletes = Vec::new();
    while deletes.len() < 2 {
        let resp = stream.message().await.unwrap().unwrap();
        assert!(!resp.canceled(), "{}", resp.cancel_reason());
        for ev in resp.events() {
            assert_eq!(ev.event_type(), EventType::Delete);
            deletes.push(ev.prev_kv().unwrap().value().to_vec());
        }
    }
    assert_eq!(deletes, vec![versions[4].clone(), versions[2].clone()]);
    crate::harness::sweep_now(&env.etcd.url).await;
    assert!(bases(&mut env.direct).await.is_empty(), "no base remains once its key is deleted");
    // A cold proxy decodes the DELETE event's prev_kv from the base's history.
    let cold = Proxy::start_delta(&env.etcd.url).await;
    let mut c = cold.client().await;
    let mut stream = c.watch(a.as_str(), Some(WatchOptions::new().with_prev_key().with_start_revision(r.header().unwrap().revision()))).await.unwrap();
    let resp = loop {
        let resp = stream.message().await.unwrap().unwrap();
        assert!(!resp.canceled(), "{}", resp.cancel_reason());
        if !resp.events().is_empty() {
            break resp;
        }
    };
    assert_eq!(resp.events()[0].prev_kv().unwrap().value(), &versions[4][..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_update_one_key_concurrently() {
    let etcd = Etcd::start().await;
    let (p1, p2) = (Proxy::start_delta(&etcd.url).await, Proxy::start_delta(&etcd.url).await);
    let key = format!("{FLYTE}ns/raced");
    let versions = drifting_series();
    let mut c1 = p1.client().await;
    write_series(&mut c1, &key, &versions[..1]).await;
    let mut tasks = Vec::new();
    for (w, proxy) in [&p1, &p2].into_iter().enumerate() {
        let (mut c, key, versions) = (proxy.client().await, key.clone(), versions.clone());
        tasks.push(tokio::spawn(async move {
            let (mut won, mut lost) = (0, 0);
            for i in 0..12 {
                let v = &versions[(i * 2 + w) % versions.len()];
                let rev = c.get(key.as_str(), None).await.unwrap().kvs()[0].mod_revision();
                let r = c
                    .txn(Txn::new().when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)]).and_then([TxnOp::put(key.as_str(), v.clone(), None)]).or_else([TxnOp::get(key.as_str(), None)]))
                    .await
                    .unwrap();
                if r.succeeded() {
                    won += 1;
                } else {
                    let TxnOpResponse::Get(g) = &r.op_responses()[0] else { panic!("else branch") };
                    assert!(versions.iter().any(|x| x[..] == *g.kvs()[0].value()), "the else branch reads a whole version");
                    lost += 1;
                }
            }
            (won, lost)
        }));
    }
    let mut won = 0;
    for t in tasks {
        won += t.await.unwrap().0;
    }
    assert!(won >= 2);
    // Both proxies read the same, byte-identical value.
    let mut c2 = p2.client().await;
    let v1 = c1.get(key.as_str(), None).await.unwrap().kvs()[0].value().to_vec();
    let v2 = c2.get(key.as_str(), None).await.unwrap().kvs()[0].value().to_vec();
    assert_eq!(v1, v2);
    assert!(versions.contains(&v1));
    // No orphan: once the key is deleted, the sweep leaves no base behind.
    let mut direct = etcd.client().await;
    assert!(!bases(&mut direct).await.is_empty());
    c2.delete(key.as_str(), None).await.unwrap();
    crate::harness::sweep_now(&etcd.url).await;
    assert!(bases(&mut direct).await.is_empty(), "no base left once the key is deleted and swept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restore_keeps_every_object_readable() {
    let mut env = Env::with_delta(FLYTE).await;
    let versions = drifting_series();
    let keys: Vec<String> = (0..3).map(|i| env.wf_key(&format!("snap-{i}"))).collect();
    for (i, k) in keys.iter().enumerate() {
        write_series(&mut env.via, k, &versions[i..i + 8]).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("snap.db");
    crate::harness::etcdctl(&env.etcd.url, &["snapshot", "save", snapshot.to_str().unwrap()], None);
    let restored = Etcd::restore(&snapshot).await;
    let proxy = Proxy::start_delta(&restored.url).await;
    let mut c = proxy.client().await;
    for (i, k) in keys.iter().enumerate() {
        let got = c.get(k.as_str(), None).await.unwrap();
        assert_eq!(got.kvs()[0].value(), &versions[i + 7][..], "{k} after restore");
    }
    // And writes go on from there.
    let rev = c.get(keys[0].as_str(), None).await.unwrap().kvs()[0].mod_revision();
    let r = c.txn(Txn::new().when([Compare::mod_revision(keys[0].as_str(), CompareOp::Equal, rev)]).and_then([TxnOp::put(keys[0].as_str(), versions[9].clone(), None)])).await.unwrap();
    assert!(r.succeeded());
    assert_eq!(c.get(keys[0].as_str(), None).await.unwrap().kvs()[0].value(), &versions[9][..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_decompress_leaves_no_frame_and_no_base() {
    use etcd_squeeze::ops::migrate::{self, Direction, MigrateArgs};
    let mut env = Env::with_delta(FLYTE).await;
    let versions = drifting_series();
    let keys: Vec<String> = (0..4).map(|i| env.wf_key(&format!("mig-{i}"))).collect();
    for (i, k) in keys.iter().enumerate() {
        write_series(&mut env.via, k, &versions[i..i + 6]).await;
    }
    assert!(!bases(&mut env.direct).await.is_empty());
    let args = <MigrateArgs as clap::FromArgMatches>::from_arg_matches(
        &<MigrateArgs as clap::Args>::augment_args(clap::Command::new("m")).get_matches_from(["m", "--yes"]),
    )
    .unwrap();
    let target = etcd_squeeze::ops::EtcdArgs { endpoints: vec![env.etcd.url.clone()], ..Default::default() }
        .connect(&etcd_squeeze::ops::PrefixArgs { prefixes: vec![FLYTE.to_string()] })
        .await
        .unwrap();
    // A dry run says the bases would go too.
    let dry = binary(&["migrate", "decompress", "--prefix", FLYTE], &env.etcd.url);
    assert!(dry.status.success(), "{}", String::from_utf8_lossy(&dry.stderr));
    assert!(String::from_utf8_lossy(&dry.stdout).contains("would then delete the"), "{}", String::from_utf8_lossy(&dry.stdout));
    let mut out = Vec::new();
    let summary = migrate::run(&target, Direction::Decompress, &args, &mut out, Box::pin(std::future::pending())).await.unwrap();
    assert!(summary.complete(), "{}", String::from_utf8_lossy(&out));
    let out = summary.render();
    let v = summary.verify.unwrap();
    assert_eq!((v.frames, v.bases_left), (0, 0));
    assert!(v.bases_deleted >= 4, "{out}");
    for (i, k) in keys.iter().enumerate() {
        let direct = env.direct.get(k.as_str(), None).await.unwrap();
        assert_eq!(direct.kvs()[0].value(), &versions[i + 5][..], "{k} is plain JSON in etcd");
    }
    assert!(bases(&mut env.direct).await.is_empty(), "no base remains");
}

/// The binary against etcd at `url`.
fn binary(args: &[&str], url: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_etcd-squeeze")).args(args).args(["--endpoints", url]).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_read_delta_frames_and_a_missing_base_is_passed_on_as_stored() {
    let mut env = Env::with_delta(FLYTE).await;
    let key = env.wf_key("tools");
    let other = env.wf_key("tools-other");
    let versions = series();
    write_series(&mut env.via, &key, &versions[..3]).await;
    write_series(&mut env.via, &other, &versions[..2]).await;
    let url = env.etcd.url.clone();

    // get decodes a delta frame; --meta names its base.
    let out = binary(&["get", &key], &url);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, versions[2]);
    let meta = String::from_utf8(binary(&["get", "--meta", &key], &url).stdout).unwrap();
    assert!(meta.contains("codec delta") && meta.contains("base /etcd-squeeze/bases/"), "{meta}");
    // analyze counts delta frames and their bases.
    let out = binary(&["analyze", "--json", "--dictionary-samples", "0"], &url);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = &report["prefixes"][0];
    assert_eq!(p["delta_frames"], 2, "{p}");
    assert!(p["bases"].as_u64().unwrap() >= 2 && p["base_bytes"].as_u64().unwrap() > 0, "{p}");
    assert_eq!(p["original_bytes"].as_u64().unwrap(), (versions[2].len() + versions[1].len()) as u64);
    // The text report counts the bases in what etcd holds now.
    let text = String::from_utf8(binary(&["analyze", "--dictionary-samples", "0"], &url).stdout).unwrap();
    assert!(text.contains(" + delta bases "), "{text}");
    // get --meta recognises a base record.
    let stored = env.direct.get(key.as_str(), None).await.unwrap().kvs()[0].value().to_vec();
    let bk = etcd_squeeze::codec::delta::base_key(key.as_bytes(), frame::parse(&stored).unwrap().base.unwrap().id);
    let meta = String::from_utf8(binary(&["get", "--meta", std::str::from_utf8(&bk).unwrap()], &url).stdout).unwrap();
    assert!(meta.contains(&format!("delta-frame base record of {key}")), "{meta}");

    // A base deleted behind the proxy's back: a cold proxy passes the stored frame on (counted as
    // `base`); the other key still reads; the operator command names key and base.
    let stored = env.direct.get(key.as_str(), None).await.unwrap().kvs()[0].value().to_vec();
    let id = frame::parse(&stored).unwrap().base.unwrap().id;
    let base_key = etcd_squeeze::codec::delta::base_key(key.as_bytes(), id);
    // (Deleted and compacted away: while it is in etcd's history the proxy still finds it there.)
    let deleted = env.direct.delete(base_key.to_vec(), None).await.unwrap();
    env.direct.compact(deleted.header().unwrap().revision(), None).await.unwrap();
    let cold = Proxy::start_delta(&env.etcd.url).await;
    let mut c = cold.client().await;
    let before = decode_errors(&cold.metrics_url, "base").await;
    assert_eq!(c.get(key.as_str(), None).await.unwrap().kvs()[0].value(), &stored[..]);
    assert!(decode_errors(&cold.metrics_url, "base").await > before);
    assert_eq!(c.get(other.as_str(), None).await.unwrap().kvs()[0].value(), &versions[1][..]);
    let out = binary(&["get", &key], &url);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("flytesnacks-development/tools") && stderr.contains(&format!("base {id:016x}")), "{stderr}");

    // A corrupt base record is refused (never garbage), and so is a base of another key.
    let stored_other = env.direct.get(other.as_str(), None).await.unwrap().kvs()[0].value().to_vec();
    let other_id = frame::parse(&stored_other).unwrap().base.unwrap().id;
    let other_base = etcd_squeeze::codec::delta::base_key(other.as_bytes(), other_id);
    let record = env.direct.get(other_base.to_vec(), None).await.unwrap().kvs()[0].value().to_vec();
    let mut corrupt = record.clone();
    let n = corrupt.len();
    corrupt[n - 8] ^= 0x40;
    env.direct.put(other_base.to_vec(), corrupt, None).await.unwrap();
    let cold = Proxy::start_delta(&env.etcd.url).await;
    assert_eq!(cold.client().await.get(other.as_str(), None).await.unwrap().kvs()[0].value(), &stored_other[..]);
    let out = binary(&["get", &other], &url);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("base"), "{}", String::from_utf8_lossy(&out.stderr));
    env.direct.put(base_key.to_vec(), record, None).await.unwrap();
    let cold = Proxy::start_delta(&env.etcd.url).await;
    assert_eq!(cold.client().await.get(key.as_str(), None).await.unwrap().kvs()[0].value(), &stored[..]);
    let out = binary(&["get", &key], &url);
    assert!(String::from_utf8_lossy(&out.stderr).contains("another key"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A proxy learns etcd's compaction revision from etcd itself (for compactions that did not pass
/// through it): a watch from revision 1 is refused with `compact_revision`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_revision_is_read_back_from_etcd() {
    let mut env = Env::with_delta(FLYTE).await;
    let upstream = || {
        let config = etcd_squeeze::config::UpstreamConfig { endpoints: vec![env.etcd.url.clone()], ..Default::default() };
        etcd_squeeze::upstream::Upstream::new(&config).unwrap()
    };
    assert_eq!(etcd_squeeze::members::compaction_revision(upstream()).await, None, "nothing compacted yet");
    let mut rev = 0;
    for i in 0..5 {
        rev = env.direct.put(format!("/other/{i}"), "x", None).await.unwrap().header().unwrap().revision();
    }
    env.direct.compact(rev - 1, None).await.unwrap();
    assert_eq!(etcd_squeeze::members::compaction_revision(upstream()).await, Some(rev - 1));
}

/// A proxy that did not write a key's older bases (another replica did, or it restarted) still
/// collects them: after its own rebase it lists the key's bases and marks the older ones
/// superseded; once compaction passes them, its next write deletes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_proxy_collects_bases_it_did_not_write() {
    let mut env = Env::with_delta(FLYTE).await;
    let key = env.wf_key("restart");
    let versions = drifting_series();
    let revs = write_series(&mut env.via, &key, &versions[..10]).await;
    let before = bases(&mut env.direct).await.len();
    assert!(before >= 3, "the drifting series rebased: {before} bases");
    // A new proxy (no knowledge of this key): its first write rebases.
    let fresh = Proxy::start_delta(&env.etcd.url).await;
    let mut c = fresh.client().await;
    let mut rev = *revs.last().unwrap();
    let put = |v: &Vec<u8>, rev: i64| Txn::new().when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)]).and_then([TxnOp::put(key.as_str(), v.clone(), None)]);
    for v in &versions[10..12] {
        let r = c.txn(put(v, rev)).await.unwrap();
        assert!(r.succeeded());
        rev = r.header().unwrap().revision();
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await; // the background listing
    c.compact(rev, None).await.unwrap();
    // Collection waits until every replica announced a watch floor past the bases (the other
    // replica learns of the compaction within members' refresh): write until it happened.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut after;
    loop {
        for v in &versions[12..14] {
            let r = c.txn(put(v, rev)).await.unwrap();
            assert!(r.succeeded());
            rev = r.header().unwrap().revision();
        }
        after = bases(&mut env.direct).await.len();
        if after <= 2 || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(after <= 2, "older bases collected: {before} before, {after} after");
    // Everything readable still reads, through a cold proxy too.
    let cold = Proxy::start_delta(&env.etcd.url).await;
    assert_eq!(cold.client().await.get(key.as_str(), None).await.unwrap().kvs()[0].value(), &versions[13][..]);
    let at = c.get(key.as_str(), Some(GetOptions::new().with_revision(rev - 1))).await.unwrap();
    assert_eq!(at.kvs()[0].value(), &versions[12][..]);
}
