//! Compaction and the collection of delta bases: compaction keeps every readable revision
//! readable (through the writing proxy, a cold proxy and a watch with prev_kv), a Range at an old
//! revision inside a Txn after the key was deleted, range deletes and recreates collect the bases
//! they orphaned, and leased, ignore_value and recreated writes never lose a base still needed.
//!
//! Tests marked `FIXED:` failed on an earlier version of delta frames (the adversarial reviews of
//! issue 9); the comment says what etcd does and what the proxy did instead.

use std::time::Duration;

use etcd_client::{DeleteOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions};

use crate::harness::{all_bases, current_base_exists, drifting_series, get_value, read_then_update, status, steady_series, update, val, Env, Proxy, FLYTE};

/// A rebasing history, compacted at several points through the proxy: after each compaction,
/// every revision still readable reads back (writing proxy and cold proxy), a watch from the
/// compaction revision replays every event with prev_kv, and the current base exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_keeps_every_readable_revision_readable() {
    let mut env = Env::with_delta(FLYTE).await;
    let key = env.wf_key("compacted");
    let other = env.wf_key("other");
    let versions = drifting_series();
    let mut revs: Vec<i64> = Vec::new();
    let mut rev = 0;
    let mut compactions = Vec::new();
    for (i, v) in versions.iter().enumerate() {
        let r = update(&mut env.via, &key, rev, v).await;
        assert!(r.succeeded(), "version {i}");
        rev = r.header().unwrap().revision();
        revs.push(rev);
        // An unrelated write, so that compaction revisions fall between versions as well.
        env.via.put(other.as_str(), val(i, 400), None).await.unwrap();
        if i % 4 == 3 {
            let at = if i % 8 == 3 { rev } else { rev + 1 };
            env.via.compact(at, None).await.unwrap();
            compactions.push(at);
            let cold_proxy = Proxy::start_delta(&env.etcd.url).await;
            let mut cold = cold_proxy.client().await;
            for (j, r) in revs.iter().enumerate() {
                // The version current at the compaction revision and everything after.
                let readable = *r >= at || revs.get(j + 1).is_none_or(|n| *n > at);
                if !readable {
                    continue;
                }
                let at_rev = (*r).max(at);
                assert_eq!(get_value(&mut env.via, &key, at_rev).await.unwrap().unwrap(), versions[j], "rev {at_rev} after compaction at {at}");
                assert_eq!(get_value(&mut cold, &key, at_rev).await.unwrap().unwrap(), versions[j], "cold, rev {at_rev} after compaction at {at}");
            }
            current_base_exists(&mut env.direct, &key).await;
        }
    }
    // Watch from the last compaction revision with prev_kv, through a cold proxy.
    let at = *compactions.last().unwrap();
    let cold_proxy = Proxy::start_delta(&env.etcd.url).await;
    let mut cold = cold_proxy.client().await;
    let mut stream = cold.watch(key.as_str(), Some(WatchOptions::new().with_start_revision(at).with_prev_key())).await.unwrap();
    let expect: Vec<usize> = (0..revs.len()).filter(|j| revs[*j] >= at).collect();
    let mut got = 0;
    while got < expect.len() {
        let resp = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
        assert!(!resp.canceled(), "{}", resp.cancel_reason());
        for ev in resp.events() {
            let j = expect[got];
            assert_eq!(ev.kv().unwrap().value(), &versions[j][..], "event at {}", revs[j]);
            if let Some(p) = ev.prev_kv() {
                assert_eq!(p.value(), &versions[j - 1][..], "prev_kv at {}", revs[j]);
            } else {
                assert_eq!(revs[j], at, "only the event at the compaction revision lacks prev_kv");
            }
            got += 1;
        }
    }
}

/// FIXED: a Range with `revision` inside a Txn decodes with the Txn's revision, not the
/// Range's. K v1 (base A) written at r1; compaction at c > r1; K deleted at d > c (its bases
/// with it). A plain Range at revision c reads v1 (the proxy looks the base up at revision c);
/// the same Range inside a Txn is DATA_LOSS: src/server/kv.rs `txn()` passes
/// `before(&resp.header)` (d-ish) as the read revision for every value of the response, and
/// the base is neither current, nor at that revision, nor at v1's compacted mod_revision.
/// etcd answers the Txn with v1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_at_old_revision_inside_a_txn_after_delete() {
    let mut env = Env::with_delta(FLYTE).await;
    let key = env.wf_key("old-range");
    let v = steady_series(2);
    let r1 = update(&mut env.via, &key, 0, &v[0]).await.header().unwrap().revision();
    let c = env.via.put(env.wf_key("filler").as_str(), val(1, 400), None).await.unwrap().header().unwrap().revision();
    assert!(c > r1);
    env.via.compact(c, None).await.unwrap();
    env.via.delete(key.as_str(), None).await.unwrap();
    // One more write after the delete: the Txn's header revision - 1 is then past the delete.
    env.via.put(env.wf_key("filler").as_str(), val(2, 400), None).await.unwrap();
    let cold_proxy = Proxy::start_delta(&env.etcd.url).await;
    let mut cold = cold_proxy.client().await;
    // A plain Range at revision c: fine.
    assert_eq!(get_value(&mut cold, &key, c).await.unwrap().unwrap(), v[0]);
    // The same Range inside a Txn.
    let cold_proxy = Proxy::start_delta(&env.etcd.url).await;
    let mut cold = cold_proxy.client().await;
    let r = cold.txn(Txn::new().and_then([TxnOp::get(key.as_str(), Some(GetOptions::new().with_revision(c)))])).await.map_err(status);
    let r = r.expect("etcd answers a Txn reading K at a readable revision");
    let TxnOpResponse::Get(g) = &r.op_responses()[0] else { panic!() };
    assert_eq!(g.kvs()[0].value(), &v[0][..]);
}

/// A DeleteRange over the prefix: deleted count and prev_kvs as etcd's; the keys' bases stay
/// (documented) until the same key is created and deleted again, which takes them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_delete_over_the_prefix_then_recreate() {
    let mut env = Env::with_delta(FLYTE).await;
    let v = steady_series(4);
    let mut keys = Vec::new();
    for i in 0..5 {
        let k = format!("{FLYTE}rd/{i}");
        let r = update(&mut env.via, &k, 0, &v[0]).await;
        assert!(r.succeeded());
        assert!(update(&mut env.via, &k, r.header().unwrap().revision(), &v[1]).await.succeeded());
        keys.push(k);
    }
    let d = env.via.delete(format!("{FLYTE}rd/"), Some(DeleteOptions::new().with_prefix().with_prev_key())).await.unwrap();
    assert_eq!(d.deleted(), 5);
    assert!(d.prev_kvs().iter().all(|kv| kv.value() == &v[1][..]));
    let orphans = all_bases(&mut env.direct).await;
    assert!(orphans >= 5, "documented orphans: {orphans}");
    // Recreate: the proxy still "knows" the old versions; writes must not use the old base.
    for k in &keys {
        let r = update(&mut env.via, k, 0, &v[2]).await;
        assert!(r.succeeded());
        assert!(update(&mut env.via, k, r.header().unwrap().revision(), &v[3]).await.succeeded());
        current_base_exists(&mut env.direct, k).await;
    }
    let cold_proxy = Proxy::start_delta(&env.etcd.url).await;
    let mut cold = cold_proxy.client().await;
    for k in &keys {
        assert_eq!(get_value(&mut cold, k, 0).await.unwrap().unwrap(), v[3]);
        env.via.delete(k.as_str(), None).await.unwrap();
    }
    crate::harness::sweep_now(&env.etcd.url).await;
    assert_eq!(all_bases(&mut env.direct).await, 0, "the sweep takes a deleted key's bases, and the orphans");
}

/// Passes: leased Puts, ignore_value Puts and out-of-proxy deletes/recreates between delta
/// writes; a proxy restart in the middle (knowledge lost) and a compaction through the proxy.
/// The current value's base always exists and every readable revision decodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_ignore_value_and_recreates_never_lose_a_needed_base() {
    let mut env = Env::with_delta(FLYTE).await;
    let k = format!("{FLYTE}mix/k");
    let lease = env.direct.lease_grant(600, None).await.unwrap().id();
    let mut written: Vec<(i64, Option<Vec<u8>>)> = Vec::new();
    let mut proxy = Proxy::start_delta(&env.etcd.url).await;
    let mut c = proxy.client().await;
    let mut last_val = Vec::new();
    let mut compacted = 0;
    for round in 0..30usize {
        let v = val(round, 1500 + (round % 4) * 30);
        let rev = match round % 6 {
            0 | 3 => {
                let r = read_then_update(&mut c, &k, &v).await;
                r.header().unwrap().revision()
            }
            1 => c.put(k.as_str(), Vec::<u8>::new(), Some(PutOptions::new().with_ignore_value())).await.map(|r| r.header().unwrap().revision()).unwrap_or(0),
            2 => c.put(k.as_str(), v.clone(), Some(PutOptions::new().with_lease(lease))).await.unwrap().header().unwrap().revision(),
            4 => c.put(k.as_str(), v.clone(), None).await.unwrap().header().unwrap().revision(),
            _ => {
                // Deleted behind the proxy's back (a range delete leaves the bases), then recreated.
                let r = env.direct.delete(format!("{FLYTE}mix/"), Some(etcd_client::DeleteOptions::new().with_prefix())).await.unwrap();
                written.push((r.header().unwrap().revision(), None));
                c.put(k.as_str(), v.clone(), None).await.unwrap().header().unwrap().revision()
            }
        };
        if rev == 0 {
            continue;
        }
        let stored = if round % 6 == 1 { last_val.clone() } else { v.clone() };
        last_val = stored.clone();
        written.push((rev, Some(stored)));
        if round == 14 {
            drop(c);
            drop(proxy);
            proxy = Proxy::start_delta(&env.etcd.url).await;
            c = proxy.client().await;
        }
        if round % 7 == 6 {
            let at = written[written.len().saturating_sub(3)].0;
            c.compact(at, None).await.unwrap();
            compacted = at;
        }
        current_base_exists(&mut env.direct, &k).await;
    }
    let cold = Proxy::start_delta(&env.etcd.url).await;
    let mut cc = cold.client().await;
    for (rev, v) in written.iter().filter(|(r, _)| *r >= compacted && *r > 0) {
        let got = cc.get(k.as_str(), Some(GetOptions::new().with_revision(*rev))).await.unwrap();
        assert_eq!(got.kvs().first().map(|kv| kv.value().to_vec()), v.clone(), "revision {rev}");
    }
}

/// Issue 15: a watcher on one replica, held back (its client reads nothing) while the key is
/// rewritten and rebased through another replica and etcd is compacted twice, both replicas
/// sweeping and collecting superseded bases: once read, every event arrives with its value and
/// prev_kv (or etcd's own compaction cancel, after which a watch from the compaction revision
/// gets the rest), and every revision etcd still serves reads back through both replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_held_back_across_two_compactions_on_another_replica_never_misses_a_base() {
    let etcd = crate::harness::Etcd::start().await;
    let config = || {
        crate::harness::ProxyConfig::new(&etcd.url).prefix(FLYTE).delta(true).dictionaries(false).with(|c| c.sweep_interval = Duration::from_millis(300))
    };
    let a = config().start().await;
    let b = config().start().await;
    let (mut writer, mut reader) = (a.client().await, b.client().await);
    let key = format!("{FLYTE}held-back");
    // The drifting series three times over (48 versions, rebasing): more events than the
    // replica's buffers and the client's flow-control window hold, so some wait in etcd.
    let versions: Vec<Vec<u8>> = drifting_series().into_iter().cycle().take(48).collect();
    let mut revs = Vec::new();
    for v in &versions[..4] {
        revs.push(read_then_update(&mut writer, &key, v).await.header().unwrap().revision());
    }
    let mut watch = reader.watch(key.as_str(), Some(WatchOptions::new().with_start_revision(revs[3] + 1).with_prev_key())).await.unwrap();
    let mut compactions = Vec::new();
    for (i, v) in versions.iter().enumerate().skip(4) {
        revs.push(read_then_update(&mut writer, &key, v).await.header().unwrap().revision());
        if i == 20 || i == 36 {
            let at = *revs.last().unwrap();
            writer.compact(at, None).await.unwrap();
            compactions.push(at);
            // Announcements, sweeps and the next writes' collection run meanwhile.
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    }
    assert!(all_bases(&mut etcd.client().await).await >= 1);
    // Now the watcher reads.
    let mut i = 4;
    while i < versions.len() {
        let resp = tokio::time::timeout(Duration::from_secs(20), watch.message()).await.expect("events keep coming").unwrap().expect("the stream stays open");
        if resp.canceled() {
            // etcd compacted the slow watcher away: as it would without the proxy; resume.
            let from = resp.compact_revision();
            assert!(from > 0, "canceled without a compaction: {}", resp.cancel_reason());
            i = revs.iter().position(|r| *r >= from).unwrap();
            watch = reader.watch(key.as_str(), Some(WatchOptions::new().with_start_revision(from).with_prev_key())).await.unwrap();
            continue;
        }
        for ev in resp.events() {
            assert_eq!(ev.kv().unwrap().mod_revision(), revs[i]);
            let value = ev.kv().unwrap().value();
            assert!(value == &versions[i][..], "event at {}: {} bytes starting {:?}, not the version written", revs[i], value.len(), &value[..value.len().min(8)]);
            if let Some(prev) = ev.prev_kv() {
                assert!(prev.value() == &versions[i - 1][..], "prev_kv at {}: {} bytes, not the version before", revs[i], prev.value().len());
            }
            i += 1;
        }
    }
    let last = *compactions.last().unwrap();
    for (j, r) in revs.iter().enumerate().filter(|(_, r)| **r >= last) {
        for c in [&mut writer, &mut reader] {
            assert_eq!(get_value(c, &key, *r).await.unwrap().unwrap(), versions[j], "revision {r}");
        }
    }
    // Held back no more: once etcd compacts again, the superseded bases go (the newest stays).
    crate::harness::compact_until(&mut writer, Duration::from_secs(40), "the superseded bases to go", || async { all_bases(&mut etcd.client().await).await == 1 }).await;
    assert_eq!(get_value(&mut reader, &key, 0).await.unwrap().unwrap(), versions[47]);
}

/// The history the robustness suite caught (CI, compaction every 300 ms + a late watcher): a key
/// deleted through one replica while a watcher on another is held back, then etcd compacted past
/// the delete. The DELETE event's prev_kv needs the key's last base: the delete no longer takes
/// it, and the sweep waits for the held-back watch. Once read, every event decodes; once the
/// watch has caught up and etcd compacts again, the sweep takes every base of the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_read_by_a_held_back_watcher_after_compaction_keeps_its_prev_kv() {
    let etcd = crate::harness::Etcd::start().await;
    let config = || {
        crate::harness::ProxyConfig::new(&etcd.url).prefix(FLYTE).delta(true).dictionaries(false).with(|c| c.sweep_interval = Duration::from_millis(300))
    };
    let (a, b) = (config().start().await, config().start().await);
    let (mut writer, mut reader) = (a.client().await, b.client().await);
    let key = format!("{FLYTE}deleted-while-held-back");
    let versions: Vec<Vec<u8>> = drifting_series().into_iter().cycle().take(40).collect();
    let first = read_then_update(&mut writer, &key, &versions[0]).await.header().unwrap().revision();
    let mut watch = reader.watch(key.as_str(), Some(WatchOptions::new().with_start_revision(first + 1).with_prev_key())).await.unwrap();
    for v in &versions[1..] {
        read_then_update(&mut writer, &key, v).await;
    }
    let deleted = writer.delete(key.as_str(), None).await.unwrap().header().unwrap().revision();
    assert!(all_bases(&mut etcd.client().await).await >= 1, "the delete leaves the bases to the sweep");
    for _ in 0..2 {
        let rev = writer.put("/tick", "x", None).await.unwrap().header().unwrap().revision();
        writer.compact(rev, None).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let mut i = 1;
    loop {
        let resp = tokio::time::timeout(Duration::from_secs(20), watch.message()).await.expect("events keep coming").unwrap().expect("open");
        assert!(!resp.canceled() || resp.compact_revision() > 0, "canceled: {}", resp.cancel_reason());
        if resp.canceled() {
            break; // etcd compacted the slow watcher away, as it would without the proxy
        }
        for ev in resp.events() {
            let prev = ev.prev_kv().expect("prev_kv").value();
            assert!(prev == &versions[i - 1][..], "prev_kv of the event at {}: {} bytes, not the version before", ev.kv().unwrap().mod_revision(), prev.len());
            if ev.event_type() == etcd_client::EventType::Delete {
                assert_eq!(ev.kv().unwrap().mod_revision(), deleted);
                assert_eq!(i, versions.len());
            } else {
                assert!(ev.kv().unwrap().value() == &versions[i][..], "event {i}");
            }
            i += 1;
        }
        if i > versions.len() {
            break;
        }
    }
    // An idle watch holds its floor at its last event (until etcd's timed progress notification,
    // every 10 minutes by default): this one ends.
    drop(watch);
    drop(reader);
    crate::harness::compact_until(&mut writer, Duration::from_secs(40), "the bases of the deleted key to go", || async { all_bases(&mut etcd.client().await).await == 0 }).await;
}
