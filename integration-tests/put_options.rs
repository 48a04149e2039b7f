//! Put options on delta keys (prev_kv, lease, ignore_value, ignore_lease), top-level and in a
//! Txn: the same prev_kv, response shape and errors as etcd's, and every revision written reads
//! back through a cold proxy.

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};

use crate::harness::{current_base_exists, get_value, shape, status, update, val, Env, Proxy, FLYTE};

/// Put with prev_kv and a lease, top-level and in a Txn: the same prev_kv (value, lease,
/// versions) and header shape as etcd's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prev_kv_and_lease_match_etcd() {
    let mut env = Env::with_delta(FLYTE).await;
    let lease = env.direct.lease_grant(600, None).await.unwrap().id();
    let mut seen = Vec::new();
    for side in ["direct", "via"] {
        let c = if side == "direct" { &mut env.direct } else { &mut env.via };
        let k = format!("{FLYTE}lease-{side}/k");
        let mut out = Vec::new();
        let r = c.put(k.as_str(), val(1, 900), Some(PutOptions::new().with_prev_key().with_lease(lease))).await.unwrap();
        out.push(format!("{:?}", r.prev_key().map(|kv| kv.value().to_vec())));
        let r = c.put(k.as_str(), val(2, 900), Some(PutOptions::new().with_prev_key().with_lease(lease))).await.unwrap();
        let p = r.prev_key().unwrap();
        out.push(format!("{:?} lease={} ver={} create={}", p.value() == &val(1, 900)[..], p.lease() == lease, p.version(), p.create_revision() > 0));
        let r = c.put(k.as_str(), val(3, 900), Some(PutOptions::new().with_prev_key())).await.unwrap();
        out.push(format!("{} {}", r.prev_key().unwrap().value() == &val(2, 900)[..], r.prev_key().unwrap().lease() == lease));
        let g = c.get(k.as_str(), None).await.unwrap();
        out.push(format!("lease now {} ver {}", g.kvs()[0].lease(), g.kvs()[0].version()));
        let rev = g.kvs()[0].mod_revision();
        let r = c
            .txn(Txn::new().when([Compare::mod_revision(k.as_str(), CompareOp::Equal, rev)]).and_then([TxnOp::put(k.as_str(), val(4, 900), Some(PutOptions::new().with_prev_key().with_lease(lease)))]))
            .await
            .unwrap();
        let TxnOpResponse::Put(p) = &r.op_responses()[0] else { panic!() };
        out.push(format!("{} {}", shape(&r), p.prev_key().unwrap().value() == &val(3, 900)[..]));
        // An unknown lease: etcd's own error, from the Put and from the Txn.
        out.push(format!("{:?}", c.put(k.as_str(), val(5, 900), Some(PutOptions::new().with_lease(12345))).await.map(|_| ()).map_err(status)));
        out.push(format!(
            "{:?}",
            c.txn(Txn::new().and_then([TxnOp::put(k.as_str(), val(5, 900), Some(PutOptions::new().with_lease(12345)))])).await.map(|_| ()).map_err(status)
        ));
        out.push(format!("{:?}", get_value(c, &k, 0).await.unwrap().map(|v| v == val(4, 900))));
        seen.push(out);
    }
    assert_eq!(seen[0], seen[1], "etcd vs proxy");
}

/// ignore_value / ignore_lease Puts on delta keys, top-level and in a Txn, and their errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_value_and_ignore_lease_match_etcd() {
    let mut env = Env::with_delta(FLYTE).await;
    let (l1, l2) = (env.direct.lease_grant(600, None).await.unwrap().id(), env.direct.lease_grant(600, None).await.unwrap().id());
    let mut seen = Vec::new();
    let mut via_revs = Vec::new();
    for side in ["direct", "via"] {
        let c = if side == "direct" { &mut env.direct } else { &mut env.via };
        let k = format!("{FLYTE}ignore-{side}/k");
        let mut out = Vec::new();
        c.put(k.as_str(), val(1, 1000), Some(PutOptions::new().with_lease(l1))).await.unwrap();
        // ignore_value: new lease, same value; prev_kv as etcd.
        let r = c.put(k.as_str(), Vec::<u8>::new(), Some(PutOptions::new().with_ignore_value().with_lease(l2).with_prev_key())).await.unwrap();
        out.push(format!("{:?}", r.prev_key().map(|kv| (kv.value() == &val(1, 1000)[..], kv.lease() == l1))));
        let g = c.get(k.as_str(), None).await.unwrap();
        out.push(format!("{} {}", g.kvs()[0].value() == &val(1, 1000)[..], g.kvs()[0].lease() == l2));
        let rev_a = g.kvs()[0].mod_revision();
        // ignore_lease: new value, lease kept.
        let r = c.put(k.as_str(), val(2, 1000), Some(PutOptions::new().with_ignore_lease().with_prev_key())).await.unwrap();
        out.push(format!("{:?}", r.prev_key().map(|kv| kv.value() == &val(1, 1000)[..])));
        let g = c.get(k.as_str(), None).await.unwrap();
        out.push(format!("{} {}", g.kvs()[0].value() == &val(2, 1000)[..], g.kvs()[0].lease() == l2));
        let rev_b = g.kvs()[0].mod_revision();
        // In a guarded Txn: ignore_value then ignore_lease (two Txns).
        let r = c.txn(Txn::new().when([Compare::mod_revision(k.as_str(), CompareOp::Equal, rev_b)]).and_then([TxnOp::put(k.as_str(), Vec::<u8>::new(), Some(PutOptions::new().with_ignore_value().with_lease(l1)))])).await.unwrap();
        out.push(shape(&r));
        let rev_c = r.header().unwrap().revision();
        let r = c.txn(Txn::new().when([Compare::mod_revision(k.as_str(), CompareOp::Equal, rev_c)]).and_then([TxnOp::put(k.as_str(), val(3, 1000), Some(PutOptions::new().with_ignore_lease()))])).await.unwrap();
        out.push(shape(&r));
        let rev_d = r.header().unwrap().revision();
        let g = c.get(k.as_str(), None).await.unwrap();
        out.push(format!("{} {}", g.kvs()[0].value() == &val(3, 1000)[..], g.kvs()[0].lease() == l1));
        // Errors: value with ignore_value; lease with ignore_lease; ignore_lease on a missing key.
        out.push(format!("{:?}", c.put(k.as_str(), val(4, 1000), Some(PutOptions::new().with_ignore_value())).await.map(|_| ()).map_err(status)));
        out.push(format!("{:?}", c.put(k.as_str(), val(4, 1000), Some(PutOptions::new().with_ignore_lease().with_lease(l1))).await.map(|_| ()).map_err(status)));
        out.push(format!("{:?}", c.put(format!("{k}-missing"), val(4, 1000), Some(PutOptions::new().with_ignore_lease())).await.map(|_| ()).map_err(status)));
        out.push(format!("{:?}", c.put(format!("{k}-missing"), Vec::<u8>::new(), Some(PutOptions::new().with_ignore_value())).await.map(|_| ()).map_err(status)));
        seen.push(out);
        if side == "via" {
            via_revs = vec![(rev_a, val(1, 1000)), (rev_b, val(2, 1000)), (rev_c, val(2, 1000)), (rev_d, val(3, 1000))];
        }
    }
    assert_eq!(seen[0], seen[1], "etcd vs proxy");
    let k = format!("{FLYTE}ignore-via/k");
    let cold_proxy = Proxy::start_delta(&env.etcd.url).await;
    let mut cold = cold_proxy.client().await;
    for (rev, want) in &via_revs {
        assert_eq!(get_value(&mut cold, &k, *rev).await.unwrap().unwrap(), *want, "rev {rev}");
    }
    // Next GuaranteedUpdate after an ignore_value write still reads back.
    let rev = env.via.get(k.as_str(), None).await.unwrap().kvs()[0].mod_revision();
    assert!(update(&mut env.via, &k, rev, &val(5, 1000)).await.succeeded());
    assert_eq!(get_value(&mut cold, &k, 0).await.unwrap().unwrap(), val(5, 1000));
    current_base_exists(&mut env.direct, &k).await;
}
