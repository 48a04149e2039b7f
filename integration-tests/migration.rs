//! Operator commands against a real etcd: analyze, migrate compress/decompress (round trip,
//! concurrent writer, kill and resume), get, and snapshot save/restore through the proxy.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use etcd_client::{GetOptions, PutOptions, WatchOptions};
use etcd_squeeze::codec::{frame, ValueCodec};
use etcd_squeeze::ops::analyze::{self, AnalyzeArgs};
use etcd_squeeze::ops::get::{self, GetArgs};
use etcd_squeeze::ops::migrate::{self, Direction, MigrateArgs, Summary};
use etcd_squeeze::ops::{Etcd as Target, EtcdArgs};

use crate::harness::{Env, Etcd, ProxyConfig, FLYTE};

/// Parses command-line arguments into one of the commands' argument structs.
fn parse<T: clap::Args>(args: &[&str]) -> T {
    #[derive(clap::Parser)]
    struct Cli<T: clap::Args> {
        #[command(flatten)]
        inner: T,
    }
    <Cli<T> as clap::Parser>::try_parse_from(std::iter::once("etcd-squeeze").chain(args.iter().copied())).unwrap().inner
}

/// A connection to `url` for the FlyteWorkflow prefix with default settings.
fn target(url: &str) -> Target {
    let etcd = EtcdArgs { endpoints: vec![url.to_string()], ..Default::default() };
    Target::connect(etcd.config(&[FLYTE.to_string()]).unwrap()).unwrap()
}

/// The binary, talking to etcd at `url`; returns its output.
fn binary(args: &[&str], url: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_etcd-squeeze")).args(args).args(["--endpoints", url]).output().unwrap()
}

async fn migrate(url: &str, direction: Direction, args: &[&str]) -> Summary {
    let args: MigrateArgs = parse(args);
    let mut out = Vec::new();
    migrate::run(&target(url), direction, &args, &mut out, Box::pin(std::future::pending())).await.unwrap()
}

/// One key's value and revisions, comparable.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Kv {
    value: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
    lease: i64,
}

/// Every key-value under `prefix` (every key for ""), read through the client `c`.
async fn dump(c: &mut etcd_client::Client, prefix: &str) -> BTreeMap<Vec<u8>, Kv> {
    let key = if prefix.is_empty() { "\0" } else { prefix };
    let opts = if prefix.is_empty() { GetOptions::new().with_from_key() } else { GetOptions::new().with_prefix() };
    let kv = |kv: &etcd_client::KeyValue| Kv {
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    };
    c.get(key, Some(opts)).await.unwrap().kvs().iter().map(|x| (x.key().to_vec(), kv(x))).collect()
}

fn wf(i: usize) -> String {
    format!("{FLYTE}ns-{}/wf-{i:03}", i % 3)
}

/// A compressible JSON value that differs per key and per `version`.
fn json(i: usize, version: usize, size: usize) -> Vec<u8> {
    let status: String = (0..size / 40).map(|n| format!("{{\"n{n}\":{{\"phase\":{}}}}},", (n + i + version) % 7)).collect();
    format!("{{\"i\":{i},\"v\":{version},\"status\":[{status}{{}}]}}\n").into_bytes()
}

/// raw JSON, frames written by the proxy (zstd and raw), a `k8s:enc:` value, a corrupt frame and
/// keys outside the prefix: every count and size of the report is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyze_counts_raw_framed_and_foreign_keys() {
    let mut env = Env::per_object(FLYTE).await;
    let objects = etcd_squeeze::corpus::small_set(7);
    let mut originals: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
    for (i, obj) in objects.iter().enumerate() {
        // Half written before the proxy (raw), half through it (zstd frames).
        let c = if i % 2 == 0 { &mut env.direct } else { &mut env.via };
        c.put(wf(i), obj.json.clone(), None).await.unwrap();
        originals.insert(wf(i).into_bytes(), Some(obj.json.clone()));
    }
    env.via.put(wf(100), "{}", None).await.unwrap(); // raw frame (below min_size)
    originals.insert(wf(100).into_bytes(), Some(b"{}".to_vec()));
    let encrypted = format!("k8s:enc:aescbc:v1:key1:{}", "x".repeat(900)).into_bytes();
    env.direct.put(wf(101), encrypted.clone(), None).await.unwrap();
    originals.insert(wf(101).into_bytes(), Some(encrypted));
    let mut corrupt = frame::MAGIC.to_vec();
    corrupt.extend_from_slice(&[1, 1, 0, 0, 0, 0, 1, 2, 3]);
    env.direct.put(wf(102), corrupt, None).await.unwrap();
    originals.insert(wf(102).into_bytes(), None);
    for foreign in ["/registry/pods/default/p", "/registry/flyte.lyft.com/flyteworkflowsX", "compact_rev_key"] {
        env.direct.put(foreign, objects[3].json.clone(), None).await.unwrap();
    }

    // The expected report, computed key by key from what etcd holds.
    let limit = 100_000u64;
    let stored = dump(&mut env.direct, FLYTE).await;
    let codec = ValueCodec::from_config(&target(&env.etcd.url).config);
    let (mut stored_bytes, mut original_bytes, mut projected_bytes) = (0, 0, 0);
    let (mut over_before, mut over_after, mut largest, mut compressible) = (0, 0, 0, 0);
    for (key, kv) in &stored {
        let (original, projected) = match &originals[key] {
            Some(o) => {
                let (encoded, outcome) = codec.encode(key, &o.clone().into()).unwrap();
                compressible += (outcome == etcd_squeeze::codec::EncodeOutcome::Compressed) as u64;
                (o.len() as u64, encoded.len() as u64)
            }
            None => (kv.value.len() as u64, kv.value.len() as u64),
        };
        stored_bytes += kv.value.len() as u64;
        largest = largest.max(kv.value.len() as u64);
        original_bytes += original;
        projected_bytes += projected;
        over_before += (original > limit) as u64;
        over_after += (projected > limit) as u64;
    }

    let args: AnalyzeArgs = parse(&["--max-request-bytes", "100000", "--dictionary-size", "8KiB", "--page-size", "3"]);
    let report = analyze::run(&target(&env.etcd.url), &args).await.unwrap();
    let p = &report.prefixes[0];
    assert_eq!(report.prefixes.len(), 1);
    assert_eq!(p.prefix, FLYTE);
    assert_eq!(p.keys, objects.len() as u64 + 3);
    assert_eq!(p.framed, 5 + 1 + 1, "5 through the proxy, the raw frame, the corrupt frame");
    assert_eq!(p.stored_as_is, 1);
    assert_eq!(p.undecodable, 1);
    assert!(p.first_undecodable.as_ref().unwrap().contains("wf-102"), "{:?}", p.first_undecodable);
    assert_eq!(p.stored_bytes, stored_bytes);
    assert_eq!(p.original_bytes, original_bytes);
    assert_eq!(p.projected_bytes, projected_bytes);
    assert_eq!(p.projected_savings_bytes, stored_bytes as i64 - projected_bytes as i64);
    assert_eq!(p.largest.as_ref().unwrap().bytes, largest);
    assert_eq!((p.over_limit_before, p.over_limit_after), (over_before, over_after));
    assert!(over_before > 0 && over_after < over_before, "{over_before} {over_after}");
    assert_eq!(p.largest_before.len(), 5);
    assert!(p.largest_before.windows(2).all(|w| w[0].original >= w[1].original));
    assert!(p.largest_after.windows(2).all(|w| w[0].projected >= w[1].projected));
    let dict = p.dictionary.as_ref().unwrap();
    assert_eq!(dict.samples, compressible, "every compressible value is sampled");
    assert!(dict.projected_bytes.is_some() && dict.dictionary_bytes == 8192, "{dict:?}");
    let text = report.render();
    assert!(text.contains("already framed 7, stored as is 1, undecodable 1"), "{text}");

    // The binary's --json report says the same, and nothing was written.
    let revision = env.direct.get("x", None).await.unwrap().header().unwrap().revision();
    let out = binary(&["analyze", "--prefix", FLYTE, "--max-request-bytes", "100000", "--json"], &env.etcd.url);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["revision"], revision);
    assert_eq!(json["prefixes"][0]["keys"], p.keys);
    assert_eq!(json["prefixes"][0]["projected_bytes"], p.projected_bytes);
    assert_eq!(env.direct.get("x", None).await.unwrap().header().unwrap().revision(), revision, "analyze is read-only");
}

/// compress then decompress: every value is byte-identical to the start, leases kept, keys
/// outside the prefix never written; a dry run writes nothing; a second run has nothing to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_compress_then_decompress_round_trip() {
    let mut env = Env::per_object(FLYTE).await;
    let url = env.etcd.url.clone();
    let lease = env.direct.lease_grant(600, None).await.unwrap().id();
    for (i, obj) in etcd_squeeze::corpus::small_set(11).iter().enumerate() {
        let opts = (i == 2).then(|| PutOptions::new().with_lease(lease));
        env.direct.put(wf(i), obj.json.clone(), opts).await.unwrap();
    }
    env.direct.put(wf(50), "{}", None).await.unwrap();
    env.direct.put(wf(51), format!("k8s:enc:aescbc:v1:key1:{}", "y".repeat(2000)), None).await.unwrap();
    env.via.put(wf(52), json(52, 0, 4000), None).await.unwrap(); // already a frame
    env.direct.put("/registry/pods/default/p", json(1, 0, 4000), None).await.unwrap();
    env.direct.put("/registry/flyte.lyft.com/flyteworkflowsX", json(2, 0, 4000), None).await.unwrap();
    let before = dump(&mut env.direct, "").await;
    let logical = dump(&mut env.via, "").await;

    // Dry run (the binary's default): prints the plan, writes nothing.
    let out = binary(&["migrate", "compress", "--prefix", FLYTE], &url);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("dry run") && stdout.contains(&format!("would compress {}", wf(0))), "{stdout}");
    assert_eq!(dump(&mut env.direct, "").await, before);
    let s = migrate(&url, Direction::Compress, &["--yes", "--dry-run"]).await;
    assert!(s.dry_run && s.counters.rewritten == 10, "--dry-run wins over --yes: {s:?}");
    assert_eq!(dump(&mut env.direct, "").await, before);

    let s = migrate(&url, Direction::Compress, &["--yes", "--max-writes-per-sec", "0", "--batch-size", "4"]).await;
    assert!(s.complete() && !s.dry_run, "{s:?}");
    let c = &s.counters;
    assert_eq!((c.scanned, c.rewritten, c.already_done, c.left_as_is, c.conflicts), (13, 10, 1, 2, 0), "{c:?}");
    assert!(c.bytes_after * 5 < c.bytes_before, "{c:?}");
    let compressed = dump(&mut env.direct, "").await;
    for (key, kv) in &compressed {
        let was = &before[key];
        let rewritten = key.starts_with(FLYTE.as_bytes()) && !frame::is_framed(&was.value) && kv.mod_revision != was.mod_revision;
        if rewritten {
            assert!(frame::is_framed(&kv.value));
            assert_eq!((kv.create_revision, kv.version, kv.lease), (was.create_revision, was.version + 1, was.lease));
        } else {
            assert_eq!(kv, was, "{}", String::from_utf8_lossy(key));
        }
    }
    assert_eq!(compressed.iter().filter(|(k, kv)| kv.mod_revision != before[*k].mod_revision).count(), 10);
    assert_eq!(dump(&mut env.via, "").await.into_iter().map(|(k, kv)| (k, kv.value)).collect::<Vec<_>>(),
        logical.iter().map(|(k, kv)| (k.clone(), kv.value.clone())).collect::<Vec<_>>(), "the proxy serves the same bytes");

    let again = migrate(&url, Direction::Compress, &["--yes"]).await;
    assert_eq!((again.counters.rewritten, again.counters.already_done), (0, 11));

    let s = migrate(&url, Direction::Decompress, &["--yes", "--max-writes-per-sec", "0"]).await;
    assert!(s.complete(), "{}", s.render());
    assert_eq!((s.counters.rewritten, s.counters.already_done), (11, 2), "{:?}", s.counters);
    assert_eq!(s.verify.as_ref().unwrap().frames, 0);
    let after = dump(&mut env.direct, "").await;
    assert_eq!(after.len(), before.len());
    for (key, kv) in &after {
        if key.starts_with(b"/etcd-squeeze/") {
            // The proxy's own keys (the trainer election): not visible through it, never migrated.
            assert!(!logical.contains_key(key));
            continue;
        }
        assert_eq!(kv.value, logical[key].value, "{}", String::from_utf8_lossy(key));
        assert_eq!(kv.lease, before[key].lease);
        if !key.starts_with(FLYTE.as_bytes()) {
            assert_eq!(kv, &before[key], "outside the prefix: never written");
        }
    }

    // A value that itself begins with the frame magic can only be stored framed: decompress
    // reports it, and the final scan does not pass.
    let mut magic = frame::MAGIC.to_vec();
    magic.extend_from_slice(b"user bytes");
    env.via.put(wf(60), magic, None).await.unwrap();
    let s = migrate(&url, Direction::Decompress, &["--yes"]).await;
    assert_eq!((s.counters.failed, s.verify.as_ref().unwrap().frames), (1, 1));
    assert!(!s.complete() && s.render().contains("NOT verified"), "{}", s.render());
}

/// etcd and a proxy, with `n` compressible raw values (`wf(i)` = `json(i, 0, 3000)`) written
/// directly to etcd, as before adoption.
async fn with_raw_keys(n: usize) -> Env {
    let mut env = Env::per_object(FLYTE).await;
    for i in 0..n {
        env.direct.put(wf(i), json(i, 0, 3000), None).await.unwrap();
    }
    env
}

/// A writer that updates every key while the migration is under way always wins: the migration
/// counts conflicts and never writes over the newer values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writer_is_never_overwritten() {
    const KEYS: usize = 30;
    let mut env = with_raw_keys(KEYS).await;
    let mut events = env.direct.watch(FLYTE, Some(WatchOptions::new().with_prefix())).await.unwrap();
    // One page holds every key: all mod_revisions are read before the first rewrite.
    let url = env.etcd.url.clone();
    let migration = tokio::spawn(async move {
        migrate(&url, Direction::Compress, &["--yes", "--max-writes-per-sec", "20", "--batch-size", "100"]).await
    });
    // As soon as the migration's first rewrite shows up, rewrite every key through the proxy.
    loop {
        let r = tokio::time::timeout(Duration::from_secs(10), events.message()).await.unwrap().unwrap().unwrap();
        if let Some(ev) = r.events().first() {
            assert!(frame::is_framed(ev.kv().unwrap().value()));
            break;
        }
    }
    for i in 0..KEYS {
        env.via.put(wf(i), json(i, 1, 3000), None).await.unwrap();
    }
    let s = migration.await.unwrap();
    let c = &s.counters;
    assert_eq!(c.rewritten + c.conflicts, KEYS as u64, "{c:?}");
    assert!(c.conflicts >= KEYS as u64 - 5, "at 20 writes/s the writer is far ahead: {c:?}");
    for i in 0..KEYS {
        let kv = env.via.get(wf(i), None).await.unwrap().kvs()[0].clone();
        assert_eq!(kv.value(), &json(i, 1, 3000)[..], "the writer's value of {} survives", wf(i));
    }
}

/// A migration killed mid-way (SIGKILL) resumes from its state file and finishes: every key
/// rewritten exactly once, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_migration_resumes_from_the_state_file() {
    const KEYS: usize = 40;
    let mut env = with_raw_keys(KEYS).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let state_arg = state.to_str().unwrap();
    let common = ["migrate", "compress", "--yes", "--prefix", FLYTE, "--batch-size", "7", "--state-file", state_arg, "--json"];
    let mut child = Command::new(env!("CARGO_BIN_EXE_etcd-squeeze"))
        .args(common)
        .args(["--max-writes-per-sec", "10", "--endpoints", &env.etcd.url])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if rewritten_so_far(&state) >= 8 {
            break;
        }
        assert!(Instant::now() < deadline, "the migration made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let framed = dump(&mut env.direct, FLYTE).await.values().filter(|kv| frame::is_framed(&kv.value)).count();
    assert!((8..KEYS).contains(&framed), "killed mid-way: {framed} of {KEYS} rewritten");

    let out = binary(&[&common[..], &["--max-writes-per-sec", "0"]].concat(), &env.etcd.url);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(s["resumed_after"].is_string(), "{s}");
    let c = &s["counters"];
    assert_eq!(c["scanned"], KEYS, "each key read once over both runs: {s}");
    let (rewritten, already) = (c["rewritten"].as_u64().unwrap(), c["already_done"].as_u64().unwrap());
    assert!(rewritten + already == KEYS as u64 && already <= 1, "at most the key written just before the kill: {s}");
    assert!(!state.exists(), "the state file is removed when the run completes");
    for i in 0..KEYS {
        let stored = env.direct.get(wf(i), None).await.unwrap().kvs()[0].value().to_vec();
        assert!(frame::is_framed(&stored));
        assert_eq!(env.via.get(wf(i), None).await.unwrap().kvs()[0].value(), &json(i, 0, 3000)[..]);
    }
}

fn rewritten_so_far(state: &Path) -> u64 {
    let Ok(bytes) = std::fs::read(state) else { return 0 };
    serde_json::from_slice::<serde_json::Value>(&bytes).ok().and_then(|s| s["counters"]["rewritten"].as_u64()).unwrap_or(0)
}

/// `get`: the decoded value, `--meta`, `--prefix`, a missing key, an undecodable frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_prints_values_and_frame_metadata() {
    let mut env = Env::per_object(FLYTE).await;
    let url = env.etcd.url.clone();
    let value = json(1, 0, 20_000);
    env.via.put(wf(1), value.clone(), None).await.unwrap();
    env.direct.put(wf(2), "{\"raw\":true}", None).await.unwrap();
    let stored = env.direct.get(wf(1), None).await.unwrap().kvs()[0].value().len();

    let out = binary(&["get", &wf(1)], &url);
    assert!(out.status.success());
    assert_eq!(out.stdout, value, "the original bytes, exactly");
    let out = binary(&["get", "--meta", &wf(1)], &url);
    let meta = String::from_utf8(out.stdout).unwrap();
    assert!(meta.contains("frame version 1, codec zstd, dictionary 0"), "{meta}");
    assert!(meta.contains(&format!("stored {}", etcd_squeeze::ops::human(stored as u64))) && meta.contains(&format!("({} B)", value.len())), "{meta}");

    let args: GetArgs = parse(&["--prefix", FLYTE, "--meta"]);
    let mut out = Vec::new();
    assert!(get::run(&target(&url), &args, &mut out).await.unwrap());
    let lines = String::from_utf8(out).unwrap();
    assert_eq!(lines.lines().count(), 2);
    assert!(lines.lines().nth(1).unwrap().contains("not framed (stored as it is), stored 12 B, original 12 B, mod_revision"), "{lines}");
    let out = binary(&["get", "--prefix", FLYTE], &url);
    let mut want = format!("{}\n", wf(1)).into_bytes();
    want.extend_from_slice(&value);
    want.extend_from_slice(format!("\n{}\n{{\"raw\":true}}\n", wf(2)).as_bytes());
    assert_eq!(out.stdout, want);

    let out = binary(&["get", &wf(9)], &url);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no such key"));
    let mut bad = env.direct.get(wf(1), None).await.unwrap().kvs()[0].value().to_vec();
    bad[6] = 9; // a dictionary this build does not know
    env.direct.put(wf(3), bad, None).await.unwrap();
    let out = binary(&["get", "--meta", &wf(3)], &url);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("dictionary 9") && String::from_utf8_lossy(&out.stdout).contains("CANNOT DECODE: dictionary ID 9 is not available: no such key /etcd-squeeze/dictionaries/0000000009"));
}

/// A snapshot taken through the proxy (`etcdctl snapshot save`, Maintenance.Snapshot) restores
/// to a new etcd that, behind a proxy, serves the original bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_through_the_proxy_restores_behind_a_proxy() {
    let mut env = Env::per_object(FLYTE).await;
    for (i, obj) in etcd_squeeze::corpus::small_set(3).iter().enumerate() {
        env.via.put(wf(i), obj.json.clone(), None).await.unwrap();
    }
    env.via.put("/registry/pods/default/p", json(1, 0, 1000), None).await.unwrap();
    let logical = dump(&mut env.via, "").await;
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("snapshot.db");
    env.etcdctl(&["snapshot", "save", snapshot.to_str().unwrap()], None);

    let restored = Etcd::restore(&snapshot).await;
    let proxy = ProxyConfig::new(&restored.url).prefix(FLYTE).delta(false).start().await;
    let mut via = proxy.client().await;
    let served = dump(&mut via, "").await;
    assert_eq!(served.len(), logical.len());
    for (key, kv) in &logical {
        assert_eq!(served[key].value, kv.value, "{}", String::from_utf8_lossy(key));
        assert_eq!(served[key].mod_revision, kv.mod_revision);
    }
    let stored = dump(&mut restored.client().await, FLYTE).await;
    assert!(stored.values().all(|kv| frame::is_framed(&kv.value)), "the restored etcd holds the frames");
}

/// Against an etcd that requires client certificates: the TLS settings of the proxy's config
/// file, or etcdctl-like flags; without a client certificate etcd refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_speak_tls_to_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::pki::Ca::new("etcd-ca");
    let (etcd_files, _) = ca.issue(dir.path(), "etcd-server", &["127.0.0.1", "localhost"]);
    let (client, _) = ca.issue(dir.path(), "apiserver-etcd-client", &[]);
    let etcd = Etcd::start_tls(&etcd_files).await;
    let value = String::from_utf8(json(1, 0, 5000)).unwrap();
    let put = client.etcdctl(&etcd.url, &["put", &wf(1)], Some(value.trim_end()));
    assert!(put.status.success(), "{}", String::from_utf8_lossy(&put.stderr));

    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_etcd-squeeze")).args(args).output().unwrap();
    let (ca_file, cert, key) = (client.ca.to_str().unwrap(), client.cert.to_str().unwrap(), client.key.to_str().unwrap());
    let out = run(&["migrate", "compress", "--yes", "--prefix", FLYTE, "--endpoints", &etcd.url, "--cacert", ca_file, "--cert", cert, "--key", key]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("rewritten              1"), "{}", String::from_utf8_lossy(&out.stdout));

    let config = dir.path().join("etcd-squeeze.toml");
    let toml = format!(
        "[upstream]\nendpoints = [{:?}]\ntls_ca_file = {ca_file:?}\ntls_cert_file = {cert:?}\ntls_key_file = {key:?}\n",
        etcd.url
    );
    std::fs::write(&config, toml).unwrap();
    let out = run(&["get", "--meta", &wf(1), "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("codec zstd"), "{}", String::from_utf8_lossy(&out.stdout));
    let out = run(&["get", &wf(1), "--config", config.to_str().unwrap()]);
    assert_eq!(String::from_utf8(out.stdout).unwrap(), value.trim_end());

    let out = run(&["get", &wf(1), "--endpoints", &etcd.url, "--cacert", ca_file]);
    assert!(!out.status.success(), "etcd requires a client certificate");
}

/// A generated cluster of `n` FlyteWorkflow objects, most of them small: just created, failed,
/// small fan-outs; some dynamic and map-task fan-outs of hundreds to thousands of nodes, and one
/// in 500 a fan-out of over 20,000 nodes, close to etcd's limit.
pub fn generated_cluster(n: usize, seed: u64) -> Vec<etcd_squeeze::corpus::Generated> {
    use etcd_squeeze::corpus::{generate, Scenario, Topology::*};
    (0..n as u64)
        .map(|i| {
            let s = seed.wrapping_mul(1_000_003).wrapping_add(i);
            let pick = |lo: u64, hi: u64| (lo + s.wrapping_mul(0x9E37_79B9) % (hi - lo + 1)) as usize;
            let done = (s * 37 % 101) as u8;
            let scenario = match i % 100 {
                // Four near etcd's 1.5 MiB limit (0.8 to 1.4 MB): huge dynamic fan-outs.
                _ if i % 500 == 499 => Scenario::new(Dynamic { children: pick(20000, 25000) }, 100, 60 + (s % 31) as u8),
                0..=34 => Scenario::new(Created { tasks: pick(2, 8) }, 25, 0),
                35..=59 => Scenario::new(Failed { tasks: pick(2, 6) }, 25, 100),
                60..=79 => Scenario::new(StaticFanout { nodes: pick(5, 60) }, 25, done),
                80..=91 => Scenario::new(Dynamic { children: pick(20, 400) }, 50, done),
                92..=96 => Scenario::new(ArrayNode { items: pick(100, 3000) }, 100, done),
                97 => Scenario::new(Dynamic { children: pick(1000, 3000) }, 100, done).closure_offloaded(),
                98 => Scenario::new(NestedSubworkflow { depth: 2, children: pick(100, 800) }, 50, done),
                _ => Scenario::new(Dynamic { children: pick(2000, 8000) }, 100, done).inputs_offloaded(),
            };
            generate(&scenario, s)
        })
        .collect()
}

/// Loads 2,000 generated objects (raw, as before adoption) into a scratch etcd and prints
/// `analyze`, `migrate compress`, `analyze` and `migrate decompress` on them: the example of
/// docs/migration.md (`scripts/analyze-example`).
/// `cargo test --test integration -- --ignored --nocapture analyze_example`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "an example for the docs (~30 s), not a check"]
async fn analyze_example_on_a_generated_cluster() {
    let started = Instant::now();
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let objects = generated_cluster(2000, 1);
    eprintln!("generated {} objects in {:.1}s", objects.len(), started.elapsed().as_secs_f64());
    let mut keys = std::collections::BTreeSet::new();
    for obj in &objects {
        let key = etcd_squeeze::corpus::etcd_key(&obj.json).unwrap();
        c.put(key.as_str(), obj.json.clone(), None).await.unwrap();
        keys.insert(key);
    }
    assert_eq!(keys.len(), 2000, "every object has its own key");
    eprintln!("loaded into etcd in {:.1}s", started.elapsed().as_secs_f64());
    let largest = objects.iter().max_by_key(|o| o.json.len()).and_then(|o| etcd_squeeze::corpus::etcd_key(&o.json)).unwrap();
    // Adoption, then removal, with the commands' own output.
    for args in [
        &["analyze"][..],
        &["migrate", "compress"],
        &["migrate", "compress", "--yes", "--max-writes-per-sec", "0", "--max-bytes-per-sec", "0"],
        &["get", "--meta", &largest],
        &["analyze", "--top", "1", "--dictionary-samples", "0"],
        &["migrate", "decompress", "--yes", "--max-writes-per-sec", "0", "--max-bytes-per-sec", "0"],
    ] {
        let out = binary(args, &etcd.url);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let mut stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = stdout.lines().collect();
        if lines.len() > 40 {
            // The dry run's 2,000 "would compress" lines: the first three and the summary.
            stdout = [&lines[..3], &["..."], &lines[lines.len() - 9..]].concat().join("\n") + "\n";
        }
        println!("$ etcd-squeeze {} --endpoints {}\n{stdout}", args.join(" "), etcd.url);
    }
    for key in &keys {
        assert_eq!(c.get(key.as_str(), None).await.unwrap().kvs()[0].version(), 3, "{key}: written, compressed, decompressed");
    }
}

/// `migrate compress --train` on a prefix that has no dictionary yet: trains one on the stored
/// values, publishes it, and writes every value with it (completed workflows are never written
/// again, so this is their only chance of the dictionary's gain); a second prefix's run reuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_compress_writes_with_the_prefixs_dictionary_training_one_first() {
    let etcd = crate::harness::Etcd::start().await;
    let mut direct = etcd.client().await;
    let objects = etcd_squeeze::corpus::training_set(80, 7);
    for (i, g) in objects.iter().enumerate() {
        direct.put(wf(i), g.json.clone(), None).await.unwrap();
    }
    let out = binary(&["migrate", "compress", "--yes", "--train", "--prefix", FLYTE], &etcd.url);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("values written with dictionary"), "{stdout}");
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..objects.len() {
        let stored = direct.get(wf(i), None).await.unwrap().kvs()[0].value().to_vec();
        ids.insert(frame::parse(&stored).unwrap().dictionary_id);
    }
    assert_eq!(ids.len(), 1, "one dictionary for every value: {ids:?}");
    assert_ne!(ids.first(), Some(&0), "written with the trained dictionary");
    // Without --train, a later run uses the published dictionary too.
    direct.put(wf(500), objects[0].json.clone(), None).await.unwrap();
    let out = binary(&["migrate", "compress", "--yes", "--prefix", FLYTE], &etcd.url);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stored = direct.get(wf(500), None).await.unwrap().kvs()[0].value().to_vec();
    assert_eq!(Some(&frame::parse(&stored).unwrap().dictionary_id), ids.first());
}

/// A TLS file given by a flag is named by that flag in the error, not by the config key it replaces.
#[test]
fn a_tls_file_given_by_flag_is_named_by_its_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_etcd-squeeze"))
        .args(["get", "/x", "--endpoints", "https://127.0.0.1:1", "--cacert", "/nonexistent/ca.crt"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--cacert") && stderr.contains("/nonexistent/ca.crt") && !stderr.contains("upstream.tls_ca_file"), "{stderr}");
}
