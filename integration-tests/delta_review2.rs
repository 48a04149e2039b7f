//! Second adversarial review of delta frames (GC safety of bases, --max-txn-ops budget).
//!
//! Tests marked `FIXED:` failed on the reviewed commit; the comment says what etcd does and what
//! the proxy did instead. The others are adversarial interleavings that pass (regression tests).

use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};

use crate::harness::{delta_config, Env, Proxy, FLYTE};

use crate::delta_attack::{bases_of, current_base_exists, status, val};

/// FIXED: the --max-txn-ops budget of a Txn with a VALUE compare on a compressed key.
///
/// etcd accepts `Txn(VALUE(K) == v) → n Puts` for any n ≤ 128. The proxy first rewrites the
/// Txn for delta frames with the full budget (src/server/kv.rs `txn_with_value_compares`,
/// `self.encode(txn, ..)` at line 53 → `Deltas::rewrite` → `rewrite_node(.., self.max_txn_ops, ..)`):
/// each Put of a new delta key gets a base Put while the branch has room, so n ≥ 64 Puts grow
/// to 128 operations. Then (line 93) it counts the *rewritten* Txn's operations as the client's
/// (`client_ops`, shadowed `txn`) and refuses: INVALID_ARGUMENT "guarding them needs one compare
/// each, and with the Txn's own 128 operations that is over etcd's --max-txn-ops". Even counted
/// right, the rewritten Txn is sent nested under `guards.len()` compares, where etcd's
/// `checkTxnRequest` allows it only `max_txn_ops − guards.len()` operations per branch.
/// Fix: rewrite with the budget etcd gives the nested Txn (`max_txn_ops − guards.len()`, known
/// after the reads; re-rewrite when it changes), and check the client's own count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn value_compare_txn_within_max_txn_ops_is_accepted() {
    let mut env = Env::with_delta(FLYTE).await;
    let guard = format!("{FLYTE}vc/guard");
    let mut out = Vec::new();
    for side in ["direct", "via"] {
        let c = if side == "direct" { &mut env.direct } else { &mut env.via };
        let g = format!("{guard}-{side}");
        c.put(g.as_str(), "x", None).await.unwrap();
        for n in [100usize, 127] {
            let puts: Vec<TxnOp> = (0..n).map(|i| TxnOp::put(format!("{FLYTE}vc-{side}-{n}/{i}"), val(i, 700), None)).collect();
            let r = c.txn(Txn::new().when([Compare::value(g.as_str(), CompareOp::Equal, "x")]).and_then(puts)).await;
            out.push(r.map(|r| (r.succeeded(), r.op_responses().len())).map_err(status));
        }
    }
    assert_eq!(out[0..2], out[2..4], "etcd (first two) vs the proxy (last two)");
}

/// FIXED: a Put of K and a single-key DeleteRange of K in two sibling nested Txns (etcd 3.4's
/// `checkIntervals` accepts Put-then-Delete in that order; the first review's
/// `put_and_delete_of_the_same_key_in_one_txn` checks the Txn response). The proxy adds the new
/// base's Put to the first nested Txn and a DeleteRange of K's whole base directory to the
/// second (src/delta/mod.rs `rewrite_node`), so the base the Put's delta frame names is created
/// and deleted in the same revision: it exists at no revision at all. etcd's watch emits the PUT
/// event (K's new value) then the DELETE event. A watcher through another proxy (or the same
/// proxy before `finish` cached the base) cannot load the base: current revision, the event's
/// revision and its mod_revision all lack it; the watch is canceled with DATA_LOSS, and every
/// re-watch from before that revision is canceled again until compaction passes it.
/// The same holds when the first Put is a guarded delta against K's current base A: the second
/// nested Txn deletes A in the same revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_then_delete_in_sibling_nested_txns_keeps_the_watch_decodable() {
    let mut env = Env::with_delta(FLYTE).await;
    let other = Proxy::start_config(delta_config(&env.etcd.url, FLYTE)).await;
    let mut watcher = other.client().await;
    let (mut outcomes, mut expected) = (Vec::new(), Vec::new());
    for (i, guarded) in [false, true].into_iter().enumerate() {
        let k = format!("{FLYTE}ptd-{i}/k");
        let r0 = env.via.put(k.as_str(), val(1, 3000), None).await.unwrap().header().unwrap().revision();
        let v2 = val(2, 3000);
        let put = if guarded {
            Txn::new().when([Compare::mod_revision(k.as_str(), CompareOp::Equal, r0)]).and_then([TxnOp::put(k.as_str(), v2.clone(), None)])
        } else {
            Txn::new().and_then([TxnOp::put(k.as_str(), v2.clone(), None)])
        };
        let r = env.via.txn(Txn::new().and_then([TxnOp::txn(put), TxnOp::txn(Txn::new().and_then([TxnOp::delete(k.as_str(), None)]))])).await.unwrap();
        assert!(r.succeeded());
        let rev = r.header().unwrap().revision();
        // What etcd's watch shows from the Txn's revision: PUT (v2) then DELETE.
        let mut stream = watcher.watch(k.as_str(), Some(WatchOptions::new().with_start_revision(rev).with_prev_key())).await.unwrap();
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let resp = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("watch response").unwrap().unwrap();
            if resp.canceled() {
                seen.push(("canceled".to_string(), resp.cancel_reason().as_bytes().to_vec()));
                break;
            }
            for ev in resp.events() {
                seen.push((format!("{:?}", ev.event_type()), ev.kv().map(|kv| kv.value().to_vec()).unwrap_or_default()));
            }
        }
        let show = |s: &[(String, Vec<u8>)]| s.iter().map(|(t, v)| format!("{t}:{}", String::from_utf8_lossy(&v[..v.len().min(200)]))).collect::<Vec<_>>();
        outcomes.push((guarded, show(&seen)));
        expected.push((guarded, show(&[("Put".to_string(), v2), ("Delete".to_string(), Vec::new())])));
        assert!(bases_of(&mut env.direct, &k).await.is_empty());
    }
    assert_eq!(outcomes, expected, "watch through another proxy vs etcd's events");
}

/// Passes: two proxies alternate unguarded and guarded writes of one key (every unguarded write
/// is a rebase; each proxy's knowledge lags the other's), recover_superseded lists bases the
/// other proxy wrote, compactions go straight to etcd (a proxy restart makes the new one read
/// the compaction revision back), and writes keep collecting. Afterwards every revision from
/// the compaction revision on reads back through a cold proxy as written, the
/// watch from the compaction revision with prev_kv replays, and the current base exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_rebasing_with_direct_compactions_keep_every_readable_revision() {
    let mut env = Env::with_delta(FLYTE).await;
    let p2 = Proxy::start_config(delta_config(&env.etcd.url, FLYTE)).await;
    let mut c2 = p2.client().await;
    let k = format!("{FLYTE}two/k");
    let mut written: Vec<(i64, Vec<u8>)> = Vec::new();
    let mut compacted = 0;
    for round in 0..24usize {
        let v = val(round, 2000 + (round % 3) * 40);
        let c = if round % 2 == 0 { &mut env.via } else { &mut c2 };
        let rev = if round % 3 == 0 {
            // An unguarded top-level Put (guarded by the proxy if it knows K, else a rebase).
            c.put(k.as_str(), v.clone(), None).await.unwrap().header().unwrap().revision()
        } else {
            // GuaranteedUpdate with the revision the *other* proxy last wrote (fresh read first).
            let m = c.get(k.as_str(), None).await.unwrap().kvs().first().map_or(0, |kv| kv.mod_revision());
            let r = c
                .txn(Txn::new().when([Compare::mod_revision(k.as_str(), CompareOp::Equal, m)]).and_then([TxnOp::put(k.as_str(), v.clone(), None)]))
                .await
                .unwrap();
            assert!(r.succeeded());
            r.header().unwrap().revision()
        };
        written.push((rev, v));
        if round % 5 == 4 {
            // Compaction straight on etcd at the revision before last write.
            compacted = written[written.len() - 2].0;
            env.direct.compact(compacted, None).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        current_base_exists(&mut env.direct, &k).await;
    }
    // Through a cold proxy (no cache, no knowledge): every revision since the compaction.
    let cold = Proxy::start_config(delta_config(&env.etcd.url, FLYTE)).await;
    let mut c = cold.client().await;
    let first = written.iter().rposition(|(r, _)| *r <= compacted).unwrap();
    for (rev, v) in &written[first..] {
        let got = c.get(k.as_str(), Some(GetOptions::new().with_revision((*rev).max(compacted)))).await.unwrap();
        assert_eq!(got.kvs()[0].value(), &v[..], "revision {rev}");
    }
    let mut stream = c.watch(k.as_str(), Some(WatchOptions::new().with_start_revision(compacted + 1).with_prev_key())).await.unwrap();
    let mut events = 0;
    let want = written.iter().filter(|(r, _)| *r > compacted).count();
    while events < want {
        let resp = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
        assert!(!resp.canceled(), "{}", resp.cancel_reason());
        for ev in resp.events() {
            let kv = ev.kv().unwrap();
            let i = written.iter().position(|(r, _)| *r == kv.mod_revision()).unwrap();
            assert_eq!(kv.value(), &written[i].1[..]);
            assert_eq!(ev.prev_kv().unwrap().value(), &written[i - 1].1[..]);
            events += 1;
        }
    }
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
    let mut proxy = Proxy::start_config(delta_config(&env.etcd.url, FLYTE)).await;
    let mut c = proxy.client().await;
    let mut last_val = Vec::new();
    let mut compacted = 0;
    for round in 0..30usize {
        let v = val(round, 1500 + (round % 4) * 30);
        let rev = match round % 6 {
            0 | 3 => {
                let m = c.get(k.as_str(), None).await.unwrap().kvs().first().map_or(0, |kv| kv.mod_revision());
                let r = c
                    .txn(Txn::new().when([Compare::mod_revision(k.as_str(), CompareOp::Equal, m)]).and_then([TxnOp::put(k.as_str(), v.clone(), None)]))
                    .await
                    .unwrap();
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
            proxy = Proxy::start_config(delta_config(&env.etcd.url, FLYTE)).await;
            c = proxy.client().await;
        }
        if round % 7 == 6 {
            let at = written[written.len().saturating_sub(3)].0;
            c.compact(at, None).await.unwrap();
            compacted = at;
        }
        current_base_exists(&mut env.direct, &k).await;
    }
    let cold = Proxy::start_config(delta_config(&env.etcd.url, FLYTE)).await;
    let mut cc = cold.client().await;
    for (rev, v) in written.iter().filter(|(r, _)| *r >= compacted && *r > 0) {
        let got = cc.get(k.as_str(), Some(GetOptions::new().with_revision(*rev))).await.unwrap();
        assert_eq!(got.kvs().first().map(|kv| kv.value().to_vec()), v.clone(), "revision {rev}");
    }
}
