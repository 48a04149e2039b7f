//! `delta = "auto"` (the default for the FlyteWorkflow prefix) with two real proxy processes on
//! one etcd: delta frames while every announced replica reads them, per-object frames within one
//! lease TTL of a replica that cannot joining (`--announce-codecs raw,zstd` pretends to be an
//! older build), delta frames again once it leaves; `etcd-squeeze status` and the metrics say so;
//! a replica whose announcement lapses ends the watches that decode delta frames.

use std::time::Duration;

use etcd_squeeze::codec::frame::{self, Codec};
use etcd_squeeze::members::LEASE_TTL;

use crate::harness::{eventually, http_get, sample, Etcd, FLYTE};
use crate::ops::{Binary, BinaryConfig};

/// The stored codec of `key` after one more GuaranteedUpdate-shaped write through `via`.
async fn write_and_read_codec(via: &mut etcd_client::Client, direct: &mut etcd_client::Client, key: &str, n: usize) -> Codec {
    let value = crate::harness::drifting_series()[n % 8].clone();
    crate::harness::read_then_update(via, key, &value).await;
    let stored = direct.get(key, None).await.unwrap();
    frame::parse(stored.kvs()[0].value()).expect("a frame").codec
}

async fn delta_writing(proxy: &Binary) -> Option<f64> {
    let text = http_get(&proxy.metrics_url, "/metrics").await.ok()?.1;
    sample(&text, &format!("etcd_squeeze_delta_writing{{prefix=\"{FLYTE}\"}}"))
}

fn status(etcd: &Etcd) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_etcd-squeeze")).args(["status", "--endpoints", &etcd.url]).output().unwrap();
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_frames_only_while_every_replica_reads_them() {
    let etcd = Etcd::start().await;
    // No [[prefixes]]: the defaults (FlyteWorkflow prefix, delta = "auto").
    let config = || BinaryConfig { listen_ip: "127.0.0.1", upstream: &etcd.url, server: "", more: "" };
    let a = Binary::start(config()).await;
    let mut via = etcd_client::Client::connect([a.url.as_str()], None).await.unwrap();
    let mut direct = etcd.client().await;
    let key = format!("{FLYTE}ns/negotiated");
    eventually(Duration::from_secs(10), "the replica to announce itself and write delta frames", || async { delta_writing(&a).await == Some(1.0) }).await;
    let mut n = 0;
    let mut next = |via: &mut etcd_client::Client, direct: &mut etcd_client::Client| {
        n += 1;
        let key = key.clone();
        let (mut via, mut direct) = (via.clone(), direct.clone());
        async move { write_and_read_codec(&mut via, &mut direct, &key, n).await }
    };
    next(&mut via, &mut direct).await;
    assert_eq!(next(&mut via, &mut direct).await, Codec::Delta, "a fresh proxy with no config writes delta frames for FlyteWorkflows");
    let text = status(&etcd);
    assert!(text.contains("replicas announced under /etcd-squeeze/members/: 1"), "{text}");
    assert!(text.contains("writing delta frames (every announced replica reads them)"), "{text}");

    // A replica that cannot read delta frames joins: per-object frames within one lease TTL.
    let old = Binary::start_args(config(), &["--announce-codecs", "raw,zstd"]).await;
    let t = std::time::Instant::now();
    eventually(LEASE_TTL, "the first replica to see the old one and stop writing delta frames", || async { delta_writing(&a).await == Some(0.0) }).await;
    eprintln!("fell back to per-object frames {:?} after the old replica was ready", t.elapsed());
    assert_eq!(next(&mut via, &mut direct).await, Codec::Zstd, "per-object frames while an old replica is announced");
    let mut via_old = etcd_client::Client::connect([old.url.as_str()], None).await.unwrap();
    assert_eq!(next(&mut via_old, &mut direct).await, Codec::Zstd, "the old replica writes no delta frames either");
    // Every version written so far still reads back through the old replica... as values it
    // can decode: the latest is per-object.
    let got = via_old.get(key.as_str(), None).await.unwrap();
    assert!(!frame::is_framed(got.kvs()[0].value()), "the old replica decodes the current value");
    let text = status(&etcd);
    assert!(text.contains("replicas announced under /etcd-squeeze/members/: 2"), "{text}");
    assert!(text.contains("raw,zstd "), "the old replica's codecs are listed: {text}");
    assert!(text.contains("writing zstd frames (a replica reads no delta frames)"), "{text}");

    // It leaves (killed: its lease expires): delta frames again within one lease TTL.
    drop(old);
    let t = std::time::Instant::now();
    eventually(LEASE_TTL + Duration::from_secs(5), "delta frames again once the old replica is gone", || async { delta_writing(&a).await == Some(1.0) }).await;
    eprintln!("delta frames again {:?} after the old replica was killed", t.elapsed());
    next(&mut via, &mut direct).await;
    assert_eq!(next(&mut via, &mut direct).await, Codec::Delta);
}

/// A replica whose announcement lapses (here: its lease revoked behind its back) may be collected
/// past by the others: its watch streams on delta prefixes end with UNAVAILABLE (the client
/// re-watches, as after an etcd restart), streams that decode nothing keep going, and the
/// replica announces itself again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_announcement_ends_the_watches_that_decode_delta_frames() {
    use etcd_client::{GetOptions, WatchOptions};
    let etcd = Etcd::start().await;
    let proxy = crate::harness::Proxy::start_config(crate::harness::delta_config(&etcd.url, FLYTE)).await;
    let (mut via, mut direct) = (proxy.client().await, etcd.client().await);
    let mut decoding = via.watch(FLYTE, Some(WatchOptions::new().with_prefix())).await.unwrap();
    let mut plain = via.watch("/registry/pods/", Some(WatchOptions::new().with_prefix())).await.unwrap();
    let members = || async { etcd.client().await.get("/etcd-squeeze/members/", Some(GetOptions::new().with_prefix())).await.unwrap() };
    let announced = members().await;
    let (key, lease) = (announced.kvs()[0].key().to_vec(), announced.kvs()[0].lease());
    direct.lease_revoke(lease).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match decoding.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the decoding watch stream ends");
    let status = ended.expect_err("ended with a status");
    assert!(status.to_string().contains("announcement"), "{status}");
    // The other stream still delivers.
    direct.put("/registry/pods/p", "x", None).await.unwrap();
    let events = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let resp = plain.message().await.expect("the other stream goes on").expect("open");
            if !resp.events().is_empty() {
                return resp.events().len();
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(events, 1);
    // Announced again, on a new lease.
    eventually(Duration::from_secs(15), "the replica to announce itself again", || async {
        members().await.kvs().iter().any(|kv| kv.key() == &key[..] && kv.lease() != lease)
    })
    .await;
}
