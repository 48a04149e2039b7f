//! Trained dictionaries on a real etcd: sharing between replicas, trainer failover, a deleted
//! dictionary, rotation.

use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_client::{GetOptions, WatchOptions};
use etcd_squeeze::codec::frame;
use etcd_squeeze::config::Config;
use etcd_squeeze::corpus;
use etcd_squeeze::dictionary::store::{DictionaryMeta, Store};
use etcd_squeeze::dictionary::training;

use crate::harness::{decode_errors, free_port, Etcd, Proxy, ProxyConfig, FLYTE};

const DICTS: &str = "/etcd-squeeze/dictionaries/";

/// A proxy config for tests: FlyteWorkflow prefix (delta frames off: every version is stored on
/// its own, with the dictionary), small dictionaries, fast election and retraining.
fn config(etcd: &Etcd, train: bool) -> Config {
    ProxyConfig::new(&etcd.url)
        .delta(false)
        .with(|c| {
            let d = &mut c.dictionaries;
            d.train = train;
            d.election_ttl = Duration::from_secs(1);
            d.retrain_interval = Duration::from_millis(300);
            d.samples = 64;
            d.size = bytesize::ByteSize::kib(16);
        })
        .build()
}

/// Small FlyteWorkflow objects of varied shapes: what a dictionary helps most.
fn population(n: u64, seed: u64) -> Vec<Vec<u8>> {
    corpus::training_set(n, seed).into_iter().map(|g| g.json).collect()
}

fn key(name: &str) -> String {
    format!("{FLYTE}dict-ns/{name}")
}

/// The dictionary ID in the frame etcd stores for `key` (0 = none).
async fn stored_dict_id(direct: &mut etcd_client::Client, key: &str) -> u32 {
    let resp = direct.get(key, None).await.unwrap();
    let value = resp.kvs()[0].value();
    assert!(frame::is_framed(value), "{key} is framed");
    frame::parse(value).unwrap().dictionary_id
}

/// Writes a probe through `via` until etcd stores it with dictionary `want` (any when None).
async fn wait_for_dictionary(via: &mut etcd_client::Client, direct: &mut etcd_client::Client, want: Option<u32>) -> u32 {
    let probe = population(1, 99).remove(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        via.put(key("probe"), probe.clone(), None).await.unwrap();
        let id = stored_dict_id(direct, &key("probe")).await;
        if id != 0 && want.is_none_or(|w| w == id) {
            return id;
        }
        assert!(Instant::now() < deadline, "no dictionary {want:?} in use after 30 s (last: {id})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn store(etcd: &Etcd) -> Store {
    let config = etcd_squeeze::config::UpstreamConfig { endpoints: vec![etcd.url.clone()], ..Default::default() };
    Store::new(etcd_squeeze::upstream::Upstream::new(&config).unwrap(), DICTS)
}

/// Every dictionary record in etcd, each verified (none may be partial or corrupt).
async fn all_dictionaries(etcd: &Etcd) -> Vec<DictionaryMeta> {
    let (records, _) = store(etcd).list().await.unwrap();
    records.into_iter().map(|r| r.expect("every visible dictionary is whole and verified").meta).collect()
}


/// etcd and a training replica that has published a dictionary from 40 small workflows it was sent
/// (`train-00`…, `population(40, seed)`), and uses it.
struct Trained {
    etcd: Etcd,
    proxy: Proxy,
    via: etcd_client::Client,
    direct: etcd_client::Client,
    id: u32,
}

impl Trained {
    async fn start(seed: u64) -> Trained {
        let etcd = Etcd::start().await;
        let proxy = Proxy::start_config(config(&etcd, true)).await;
        let (mut via, mut direct) = (proxy.client().await, etcd.client().await);
        for (i, v) in population(40, seed).into_iter().enumerate() {
            via.put(key(&format!("train-{i:02}")), v, None).await.unwrap();
        }
        let id = wait_for_dictionary(&mut via, &mut direct, None).await;
        Trained { etcd, proxy, via, direct, id }
    }
}

/// A replica trains from the Puts it sees and publishes; a second replica, started afterwards with
/// a cold cache, reads, lists and watches the same objects byte-identically.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_replica_reads_lists_and_watches_values_written_with_a_dictionary() {
    let Trained { etcd, proxy: _first, mut via, mut direct, id } = Trained::start(1).await;
    let metas = all_dictionaries(&etcd).await;
    assert_eq!(metas.len(), 1, "one dictionary published");
    assert_eq!((metas[0].id, metas[0].prefix.as_str()), (id, FLYTE));
    assert!(metas[0].heldout_after * 10 < metas[0].heldout_before * 8, "at least 20% smaller: {:?}", metas[0]);

    let objects: Vec<Vec<u8>> = population(12, 2).into_iter().chain(corpus::small_set(3).into_iter().map(|g| g.json)).collect();
    let start = direct.get("x", None).await.unwrap().header().unwrap().revision() + 1;
    for (i, v) in objects.iter().enumerate() {
        via.put(key(&format!("obj-{i:02}")), v.clone(), None).await.unwrap();
        assert_eq!(stored_dict_id(&mut direct, &key(&format!("obj-{i:02}"))).await, id);
    }

    let second = Proxy::start_config(config(&etcd, false)).await;
    let mut cold = second.client().await;
    for (i, v) in objects.iter().enumerate() {
        let got = cold.get(key(&format!("obj-{i:02}")), None).await.unwrap();
        assert_eq!(got.kvs()[0].value(), &v[..], "get obj-{i:02}");
    }
    let listed = cold.get(key("obj-"), Some(GetOptions::new().with_prefix())).await.unwrap();
    let values: Vec<&[u8]> = listed.kvs().iter().map(|kv| kv.value()).collect();
    assert_eq!(values, objects.iter().map(|v| &v[..]).collect::<Vec<_>>());
    let mut stream = cold.watch(key("obj-"), Some(WatchOptions::new().with_prefix().with_start_revision(start))).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < objects.len() {
        let r = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
        seen.extend(r.events().iter().map(|e| e.kv().unwrap().value().to_vec()));
    }
    assert_eq!(seen, objects);
}

/// The elected trainer is killed while it trains: no partial dictionary ever appears, and another
/// replica takes the election over once the lease expires and publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_trainer_is_replaced_and_leaves_no_partial_dictionary() {
    let etcd = Etcd::start().await;
    let mut direct = etcd.client().await;
    // Enough stored values that sampling and training take a while.
    let objects: Vec<Vec<u8>> = population(30, 3).into_iter().chain(corpus::small_set(4).into_iter().map(|g| g.json)).collect();
    // Written directly: values stored before the proxy was installed are samples too.
    for i in 0..120 {
        direct.put(key(&format!("pop-{i:03}")), objects[i % objects.len()].clone(), None).await.unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[upstream]\nendpoints = [\"{}\"]\n[[prefixes]]\nprefix = \"{FLYTE}\"\n\
         [dictionaries]\nelection_ttl = \"1s\"\nretrain_interval = \"1h\"\nsamples = 512\nsize = \"112KiB\"\n",
        etcd.url
    );
    std::fs::write(dir.path().join("a.toml"), toml).unwrap();
    let log_path = dir.path().join("a.log");
    let mut trainer = std::process::Command::new(env!("CARGO_BIN_EXE_etcd-squeeze"))
        .args(["serve", "--config"])
        .arg(dir.path().join("a.toml"))
        .env("RUST_LOG", "etcd_squeeze=info")
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log_path).unwrap().contains("training a dictionary") {
        assert!(Instant::now() < deadline, "replica A never started training: {}", std::fs::read_to_string(&log_path).unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    trainer.kill().unwrap();
    trainer.wait().unwrap();
    // A's election key outlives A by its lease TTL.
    let leader_a = String::from_utf8(trainer_key(&mut direct).await.expect("A leads until its lease expires")).unwrap();
    // Every visible dictionary is whole (verified); A published at most the one it was training.
    let by_a = all_dictionaries(&etcd).await.into_iter().filter(|m| m.trained_by == leader_a).count();
    assert!(by_a <= 1);
    if by_a == 1 {
        eprintln!("replica A finished publishing before the kill landed; the takeover is still checked");
    }

    let b = Proxy::start_config(config(&etcd, true)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let leader_b = loop {
        match trainer_key(&mut direct).await.map(|v| String::from_utf8(v).unwrap()) {
            Some(l) if l != leader_a => break l,
            _ => {}
        }
        assert!(Instant::now() < deadline, "replica B did not take the election over within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let expected = loop {
        let metas = all_dictionaries(&etcd).await;
        if let Some(m) = metas.iter().find(|m| m.trained_by == leader_b) {
            break m.id;
        }
        if by_a == 1 {
            // A's dictionary is as good as B's would be: B keeps it (min_gain) and uses it.
            break metas[0].id;
        }
        assert!(Instant::now() < deadline, "replica B did not publish within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (mut via, mut direct2) = (b.client().await, etcd.client().await);
    assert_eq!(wait_for_dictionary(&mut via, &mut direct2, Some(expected)).await, expected);
}

async fn trainer_key(direct: &mut etcd_client::Client) -> Option<Vec<u8>> {
    direct.get("/etcd-squeeze/trainer", None).await.unwrap().kvs().first().map(|kv| kv.value().to_vec())
}

/// A dictionary key deleted by hand: values that need it reach clients as etcd stores them
/// (counted as `unknown_dictionary`; on the replica that had it cached, and on a cold one);
/// everything else keeps working; a forged record put back is refused, never used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_dictionary_values_are_passed_on_as_stored() {
    let Trained { etcd, proxy, mut via, mut direct, id } = Trained::start(4).await;
    let value = population(1, 5).remove(0);
    let (needs, other) = (key("needs-dict"), "/registry/configmaps/default/other");
    via.put(needs.as_str(), value.clone(), None).await.unwrap();
    via.put(other, value.clone(), None).await.unwrap();
    assert_eq!(stored_dict_id(&mut direct, &needs).await, id);
    assert_eq!(via.get(needs.as_str(), None).await.unwrap().kvs()[0].value(), &value[..]);
    let stored = direct.get(needs.as_str(), None).await.unwrap().kvs()[0].value().to_vec();

    let record_bytes = direct.get(format!("{DICTS}{id:010}"), None).await.unwrap().kvs()[0].value().to_vec();
    let before = decode_errors(&proxy.metrics_url, "unknown_dictionary").await;
    direct.delete(format!("{DICTS}{id:010}"), None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = via.get(needs.as_str(), None).await.unwrap();
        if got.kvs()[0].value() == &stored[..] {
            break;
        }
        assert_eq!(got.kvs()[0].value(), &value[..]);
        assert!(Instant::now() < deadline, "the deletion was not noticed within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(decode_errors(&proxy.metrics_url, "unknown_dictionary").await > before);
    let cold = Proxy::start_config(config(&etcd, false)).await;
    let mut cold = cold.client().await;
    assert_eq!(cold.get(needs.as_str(), None).await.unwrap().kvs()[0].value(), &stored[..]);

    for c in [&mut via, &mut cold] {
        assert_eq!(c.get(other, None).await.unwrap().kvs()[0].value(), &value[..]);
        assert_eq!(c.get(key("train-00"), None).await.unwrap().kvs()[0].value(), &population(1, 4)[0][..]);
    }
    // New writes work and do not name the deleted dictionary.
    via.put(key("after"), value.clone(), None).await.unwrap();
    assert_ne!(stored_dict_id(&mut direct, &key("after")).await, id);
    assert_eq!(cold.get(key("after"), None).await.unwrap().kvs()[0].value(), &value[..]);

    // A record put back with altered dictionary bytes is refused (checksum), not used.
    let mut forged = record_bytes.to_vec();
    *forged.last_mut().unwrap() ^= 0x01;
    direct.put(format!("{DICTS}{id:010}"), forged, None).await.unwrap();
    let fresh = Proxy::start_config(config(&etcd, false)).await;
    assert_eq!(fresh.client().await.get(needs.as_str(), None).await.unwrap().kvs()[0].value(), &stored[..]);
}

/// Values written under dictionary 1, then 2, then 3 all read back byte-identical, on the writing
/// replica and on a cold one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_every_value_readable() {
    let etcd = Etcd::start().await;
    let proxy = Proxy::start_config(config(&etcd, false)).await;
    let (mut via, mut direct) = (proxy.client().await, etcd.client().await);
    let store = store(&etcd);
    let mut written = Vec::new();
    for round in 1..=3u64 {
        let samples: Vec<Bytes> = population(30, 10 + round).into_iter().map(Bytes::from).collect();
        let candidate = training::train(&samples, 8 << 10, 3, None).unwrap();
        let meta = candidate.meta(FLYTE, 3, &format!("rotation test round {round}"));
        let record = store.publish(meta, &candidate.raw, &[]).await.unwrap();
        assert_eq!(record.meta.id, round as u32, "IDs count up from 1");
        wait_for_dictionary(&mut via, &mut direct, Some(record.meta.id)).await;
        for (i, v) in population(4, 20 + round).into_iter().enumerate() {
            let k = key(&format!("rot-{round}-{i}"));
            via.put(k.as_str(), v.clone(), None).await.unwrap();
            assert_eq!(stored_dict_id(&mut direct, &k).await, record.meta.id);
            written.push((k, v));
        }
    }
    let cold = Proxy::start_config(config(&etcd, false)).await;
    let mut cold = cold.client().await;
    for c in [&mut via, &mut cold] {
        for (k, v) in &written {
            assert_eq!(c.get(k.as_str(), None).await.unwrap().kvs()[0].value(), &v[..], "{k}");
        }
    }
    assert_eq!(all_dictionaries(&etcd).await.iter().map(|m| m.id).collect::<Vec<_>>(), vec![3, 2, 1]);
}

fn dict_cli(etcd: &Etcd, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_etcd-squeeze"))
        .arg("dict")
        .args(args)
        .args(["--endpoints", &etcd.url])
        .output()
        .unwrap();
    assert!(out.status.success(), "dict {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The operator commands: train from etcd, list with usage counts, show, and gc that keeps every
/// dictionary a stored value (now or in the uncompacted history) refers to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dict_commands_train_list_show_and_gc() {
    let etcd = Etcd::start().await;
    let proxy = Proxy::start_config(config(&etcd, false)).await;
    let (mut via, mut direct) = (proxy.client().await, etcd.client().await);
    for (i, v) in population(40, 6).into_iter().enumerate() {
        via.put(key(&format!("train-{i:02}")), v, None).await.unwrap();
    }
    let out = dict_cli(&etcd, &["train", "--prefix", FLYTE]);
    assert!(out.starts_with("published dictionary 1 for"), "{out}");
    wait_for_dictionary(&mut via, &mut direct, Some(1)).await;
    let values = population(3, 7);
    for (i, v) in values.iter().enumerate() {
        via.put(key(&format!("v{i}")), v.clone(), None).await.unwrap();
    }
    let list = dict_cli(&etcd, &["list"]);
    let line = list.lines().find(|l| l.trim_start().starts_with("1 ")).unwrap_or_else(|| panic!("{list}"));
    assert!(line.contains(FLYTE) && line.trim_end().ends_with(" 4"), "3 values and the probe use it: {list}");
    let show = dict_cli(&etcd, &["show", "1"]);
    assert!(show.contains("\"id\": 1") && show.contains("checksum verified"), "{show}");

    // Dictionary 2 supersedes 1 (published two hours ago, past the gc grace period).
    let samples: Vec<Bytes> = population(30, 8).into_iter().map(Bytes::from).collect();
    let c = training::train(&samples, 8 << 10, 3, None).unwrap();
    let meta = DictionaryMeta { created_unix: etcd_squeeze::dictionary::unix_now() - 7200, ..c.meta(FLYTE, 3, "test") };
    assert_eq!(store(&etcd).publish(meta, &c.raw, &[]).await.unwrap().meta.id, 2);
    wait_for_dictionary(&mut via, &mut direct, Some(2)).await;
    let gc = dict_cli(&etcd, &["gc"]);
    assert!(gc.contains("keep        1") && gc.contains("stored values use it"), "{gc}");
    // Rewritten with dictionary 2: no current value uses 1, but etcd's history still does.
    for (i, v) in values.iter().enumerate() {
        via.put(key(&format!("v{i}")), v.clone(), None).await.unwrap();
    }
    let gc = dict_cli(&etcd, &["gc"]);
    assert!(gc.contains("keep        1") && gc.contains("stored values use it"), "history counts: {gc}");
    let rev = direct.get("x", None).await.unwrap().header().unwrap().revision();
    direct.compact(rev, None).await.unwrap();
    let gc = dict_cli(&etcd, &["gc"]);
    assert!(gc.contains("unused      1") && gc.contains("would delete") && gc.contains("keep        2"), "{gc}");
    assert_eq!(all_dictionaries(&etcd).await.len(), 2, "a dry run deletes nothing");
    let gc = dict_cli(&etcd, &["gc", "--yes"]);
    assert!(gc.contains("1 of 2 dictionaries deleted"), "{gc}");
    assert_eq!(all_dictionaries(&etcd).await.iter().map(|m| m.id).collect::<Vec<_>>(), vec![2]);
    for (i, v) in values.iter().enumerate() {
        assert_eq!(via.get(key(&format!("v{i}")), None).await.unwrap().kvs()[0].value(), &v[..]);
    }
    // The other operator commands read values written with a dictionary too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_etcd-squeeze"))
        .args(["get", &key("v0"), "--endpoints", &etcd.url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, values[0]);
}

/// The dictionary ID of the frame inside the base record of `key`'s stored delta frame.
async fn base_dict_id(direct: &mut etcd_client::Client, key: &str) -> u32 {
    let stored = direct.get(key, None).await.unwrap().kvs()[0].value().to_vec();
    let f = frame::parse(&stored).unwrap();
    assert_eq!(f.codec, frame::Codec::Delta, "{key} is a delta frame");
    let base_key = etcd_squeeze::codec::delta::base_key(key.as_bytes(), f.base.unwrap().id);
    let record = direct.get(base_key.to_vec(), None).await.unwrap().kvs()[0].value().to_vec();
    frame::parse(etcd_squeeze::codec::delta::record_frame(&record).unwrap()).unwrap().dictionary_id
}

/// With delta frames on, a new base is stored as its value would be on its own: with the prefix's
/// dictionary. A cold replica loads the dictionary a base record names before decoding it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_bases_use_the_dictionary_and_a_cold_replica_reads_them() {
    let Trained { etcd, proxy: _trainer, mut direct, id, .. } = Trained::start(3).await;
    let delta = |etcd: &Etcd| {
        let mut c = config(etcd, false);
        c.prefixes[0].delta = Some(true.into());
        c
    };
    let writer = Proxy::start_config(delta(&etcd)).await;
    let mut via = writer.client().await;
    let probe = population(1, 98).remove(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        via.delete(key("delta-probe"), None).await.unwrap();
        via.put(key("delta-probe"), probe.clone(), None).await.unwrap();
        if base_dict_id(&mut direct, &key("delta-probe")).await == id {
            break;
        }
        assert!(Instant::now() < deadline, "the delta proxy does not use dictionary {id} for bases after 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let objects = population(6, 5);
    for (i, v) in objects.iter().enumerate() {
        via.put(key(&format!("delta-{i}")), v.clone(), None).await.unwrap();
        assert_eq!(base_dict_id(&mut direct, &key(&format!("delta-{i}"))).await, id);
    }
    let cold = Proxy::start_config(delta(&etcd)).await;
    let mut c = cold.client().await;
    for (i, v) in objects.iter().enumerate() {
        assert_eq!(c.get(key(&format!("delta-{i}")), None).await.unwrap().kvs()[0].value(), &v[..], "delta-{i} through a cold replica");
    }
}

/// The trainer election's key: (who leads, the key's create_revision).
async fn trainer_entry(direct: &mut etcd_client::Client) -> Option<(String, i64)> {
    let got = direct.get("/etcd-squeeze/trainer", None).await.unwrap();
    got.kvs().first().map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.create_revision()))
}

/// The trainer keeps its election (the same key, one create_revision) for many lease TTLs while
/// a second replica campaigns beside it — never two leaders — and resigns when it stops: the
/// second replica leads within about one TTL, without waiting for the lease to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trainer_keeps_its_election_and_resigns_when_stopped() {
    let etcd = Etcd::start().await;
    let mut direct = etcd.client().await;
    let a = Proxy::start_config(config(&etcd, true)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = loop {
        if let Some(entry) = trainer_entry(&mut direct).await {
            break entry;
        }
        assert!(Instant::now() < deadline, "no replica leads the trainer election");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _b = Proxy::start_config(config(&etcd, true)).await;
    // election_ttl is 1 s: 4 TTLs on one key.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert_eq!(trainer_entry(&mut direct).await.as_ref(), Some(&first), "the trainer lost its election key");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(a);
    let stopped = Instant::now();
    loop {
        match trainer_entry(&mut direct).await {
            Some(entry) if entry.0 != first.0 => break,
            _ => {}
        }
        assert!(stopped.elapsed() < Duration::from_secs(3), "the second replica did not take over within 3 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("second replica leads {:?} after the first stopped", stopped.elapsed());
}

/// `dict train` samples what etcd stores. Under the default configuration (`delta = "auto"`)
/// every FlyteWorkflow is a delta frame: its base, a whole version of the same key, is the sample.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dict_train_samples_delta_frames_through_their_bases() {
    let etcd = Etcd::start().await;
    let proxy = Proxy::start_config(ProxyConfig::new(&etcd.url).with(|c| c.dictionaries.train = false).build()).await;
    let (mut via, mut direct) = (proxy.client().await, etcd.client().await);
    for (i, v) in population(40, 5).into_iter().enumerate() {
        via.put(key(&format!("train-{i:02}")), v, None).await.unwrap();
    }
    let stored = direct.get(key("train-00"), None).await.unwrap().kvs()[0].value().to_vec();
    assert_eq!(frame::parse(&stored).unwrap().codec, frame::Codec::Delta, "the default writes delta frames");
    let mut config = Config::default();
    config.upstream.endpoints = vec![etcd.url.clone()];
    let report = etcd_squeeze::ops::dict::train_report(&config, FLYTE).await.unwrap();
    assert!(report.candidate_samples >= 30, "{} samples of 40", report.candidate_samples);
    assert!(report.published.is_some(), "a dictionary is published");
}
