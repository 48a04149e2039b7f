//! The proxy's own keys (`/etcd-squeeze/`: delta-frame bases here) do not exist through the client
//! API. The same client sequence runs through a proxy with delta frames on one etcd, and directly
//! on another etcd: lists of every key, counts, limits, sort orders, watches and a DeleteRange
//! over everything answer the same (the proxy writes its bases in the clients' own Txns, so the
//! revisions match); the bases survive the delete, so older revisions still read.

use std::time::Duration;

use etcd_client::{DeleteOptions, GetOptions, SortOrder, SortTarget, Txn, TxnOp, WatchOptions};

use crate::harness::{all_bases, steady_series, Etcd, ProxyConfig, FLYTE};

/// (key, value, create_revision, mod_revision, version) of every KeyValue.
fn kvs(list: &[etcd_client::KeyValue]) -> Vec<(String, Vec<u8>, i64, i64, i64)> {
    list.iter().map(|kv| (kv.key_str().unwrap().to_string(), kv.value().to_vec(), kv.create_revision(), kv.mod_revision(), kv.version())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_keys_are_invisible_and_safe() {
    let (etcd_a, etcd_b) = (Etcd::start().await, Etcd::start().await);
    // Delta frames write bases under /etcd-squeeze/bases/ (in the clients' Txns); no trainer.
    let proxy = ProxyConfig::new(&etcd_a.url).prefix(FLYTE).delta(true).dictionaries(false).announce(false).start().await;
    let (mut via, mut direct_a, mut b) = (proxy.client().await, etcd_a.client().await, etcd_b.client().await);
    let series = steady_series(3);
    let mut first_rev = 0;
    for c in [&mut via, &mut b] {
        let mut revs = Vec::new();
        for (i, v) in series.iter().enumerate() {
            revs.push(c.put(format!("{FLYTE}ns/wf-{}", i % 2), v.clone(), None).await.unwrap().header().unwrap().revision());
        }
        c.put("/registry/pods/ns/p", "pod", None).await.unwrap();
        c.put("/zzz", "after the proxy's keys", None).await.unwrap();
        c.put("/a", "before them", None).await.unwrap();
        first_rev = revs[0];
    }
    assert!(all_bases(&mut direct_a).await > 0, "delta frames wrote bases");

    // Lists of every key: the same keys, values, revisions, count and more.
    let every = || GetOptions::new().with_from_key();
    let cases: Vec<(&str, GetOptions)> = vec![
        ("every key", every()),
        ("prefix /", GetOptions::new().with_prefix()),
        ("count only", every().with_count_only()),
        ("keys only", every().with_keys_only()),
        ("limit 2", every().with_limit(2)),
        ("limit 3 by key, descending", every().with_limit(3).with_sort(SortTarget::Key, SortOrder::Descend)),
        ("limit 3 by create revision", every().with_limit(3).with_sort(SortTarget::Create, SortOrder::Ascend)),
        ("by mod revision, descending", every().with_sort(SortTarget::Mod, SortOrder::Descend)),
        ("by value", every().with_sort(SortTarget::Value, SortOrder::Ascend)),
    ];
    for (name, options) in cases {
        let key = if name == "prefix /" { "/" } else { "\0" };
        let (through, on_b) = (via.get(key, Some(options.clone())).await.unwrap(), b.get(key, Some(options)).await.unwrap());
        assert_eq!(kvs(through.kvs()), kvs(on_b.kvs()), "{name}");
        assert_eq!((through.count(), through.more()), (on_b.count(), on_b.more()), "{name}");
        assert_eq!(through.header().unwrap().revision(), on_b.header().unwrap().revision(), "{name}");
    }
    // A read of a reserved key itself, and of the reserved range: nothing.
    let own = via.get("/etcd-squeeze/", Some(GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!((own.kvs().len(), own.count()), (0, 0));
    // The same inside a Txn (range op, nested).
    let txn = Txn::new().and_then([TxnOp::get("\0", Some(every())), TxnOp::txn(Txn::new().and_then([TxnOp::get("/", Some(GetOptions::new().with_prefix().with_count_only()))]))]);
    let (t_through, t_b) = (via.txn(txn.clone()).await.unwrap(), b.txn(txn).await.unwrap());
    assert_eq!(format!("{:?}", t_through.op_responses().len()), format!("{:?}", t_b.op_responses().len()));
    let ranges = |r: &etcd_client::TxnResponse| -> Vec<(usize, i64)> {
        let mut out = Vec::new();
        for op in r.op_responses() {
            match op {
                etcd_client::TxnOpResponse::Get(g) => out.push((g.kvs().len(), g.count())),
                etcd_client::TxnOpResponse::Txn(t) => {
                    for op in t.op_responses() {
                        if let etcd_client::TxnOpResponse::Get(g) = op {
                            out.push((g.kvs().len(), g.count()));
                        }
                    }
                }
                _ => {}
            }
        }
        out
    };
    assert_eq!(ranges(&t_through), ranges(&t_b));

    // A watch over every key from the first write: the same events, none of the proxy's.
    let watch = WatchOptions::new().with_from_key().with_start_revision(first_rev);
    let mut w_through = via.watch("\0", Some(watch.clone())).await.unwrap();
    let mut w_b = b.watch("\0", Some(watch)).await.unwrap();
    let n = series.len() + 3;
    let (e_through, e_b) = (events(&mut w_through, n).await, events(&mut w_b, n).await);
    assert_eq!(e_through, e_b);

    // A direct write into /etcd-squeeze/ through the proxy is refused, alone or in a Txn.
    let refused = via.put("/etcd-squeeze/bases/forged", "x", None).await.unwrap_err();
    assert!(refused.to_string().contains("belong to the proxy"), "{refused}");
    let refused = via.txn(Txn::new().and_then([TxnOp::put("/etcd-squeeze/x", "x", None)])).await.unwrap_err();
    assert!(refused.to_string().contains("belong to the proxy"), "{refused}");

    // DeleteRange over everything: the clients' keys only, in one revision, etcd's count.
    let bases_before = all_bases(&mut direct_a).await;
    let options = DeleteOptions::new().with_from_key().with_prev_key();
    let (d_through, d_b) = (via.delete("\0", Some(options.clone())).await.unwrap(), b.delete("\0", Some(options)).await.unwrap());
    assert_eq!(d_through.deleted(), d_b.deleted());
    assert_eq!(kvs(d_through.prev_kvs()), kvs(d_b.prev_kvs()));
    assert_eq!(d_through.header().unwrap().revision(), d_b.header().unwrap().revision());
    assert_eq!(via.get("\0", Some(GetOptions::new().with_from_key().with_count_only())).await.unwrap().count(), 0);
    assert_eq!(all_bases(&mut direct_a).await, bases_before, "the proxy's keys survive");
    // Older revisions of the surviving history still read (their bases are there).
    for rev in [first_rev, first_rev + 1] {
        let opts = || Some(GetOptions::new().with_prefix().with_revision(rev));
        assert_eq!(kvs(via.get(FLYTE, opts()).await.unwrap().kvs()), kvs(b.get(FLYTE, opts()).await.unwrap().kvs()), "at {rev}");
    }
}

/// (key, value, mod_revision) of every event until `n` were seen.
async fn events(stream: &mut etcd_client::WatchStream, n: usize) -> Vec<(String, Vec<u8>, i64)> {
    let mut out = Vec::new();
    while out.len() < n {
        let r = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("events").unwrap().unwrap();
        for e in r.events() {
            let kv = e.kv().unwrap();
            out.push((kv.key_str().unwrap().to_string(), kv.value().to_vec(), kv.mod_revision()));
        }
    }
    out
}
