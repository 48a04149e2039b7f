//! Leases through the proxy: grant, keep-alive, time-to-live, revoke (in every suite), and keys
//! written with a lease under delta frames, which the lease's expiry deletes without leaving a
//! base behind.

use std::time::Duration;

use etcd_client::{GetOptions, PutOptions};
use etcd_squeeze::codec::frame::{self, Codec};

use crate::harness::{all_bases, get_value, val, Env, FLYTE};

crate::suite!(lease_with_keepalive);

async fn lease_with_keepalive(mut env: Env) {
    let lease = env.via.lease_grant(2, None).await.unwrap();
    let key = env.wf_key("leased");
    let obj = etcd_squeeze::corpus::small_set(5).remove(2);
    env.via.put(key.as_str(), obj.json.clone(), Some(PutOptions::new().with_lease(lease.id()))).await.unwrap();
    let (mut keeper, mut responses) = env.via.lease_keep_alive(lease.id()).await.unwrap();
    for _ in 0..3 {
        keeper.keep_alive().await.unwrap();
        let r = responses.message().await.unwrap().unwrap();
        assert_eq!(r.id(), lease.id());
        assert!(r.ttl() > 0);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let kv = env.via.get(key.as_str(), None).await.unwrap();
    assert_eq!(kv.kvs()[0].value(), &obj.json[..]);
    assert_eq!(kv.kvs()[0].lease(), lease.id());
    let ttl = env.via.lease_time_to_live(lease.id(), Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys())).await.unwrap();
    assert_eq!(ttl.keys(), &[key.as_bytes().to_vec()]);
    assert!(env.via.leases().await.unwrap().leases().iter().any(|l| l.id() == lease.id()));
    env.via.lease_revoke(lease.id()).await.unwrap();
    assert_eq!(env.via.get(key.as_str(), Some(GetOptions::new().with_count_only())).await.unwrap().count(), 0);
}

/// A key with a lease is deleted by the lease's expiry, without a DeleteRange the proxy could
/// extend to its bases: values written with a lease are stored per value (no base), so nothing is
/// left behind when the lease deletes the keys. (Found by this review: they used to leave one
/// orphaned base per key.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_keys_get_no_base() {
    let mut env = Env::with_delta(FLYTE).await;
    let lease = env.via.lease_grant(600, None).await.unwrap().id();
    for i in 0..10 {
        let k = format!("{FLYTE}leased/{i}");
        env.via.put(k.as_str(), val(i, 900), Some(PutOptions::new().with_lease(lease))).await.unwrap();
        let stored = env.direct.get(k.as_str(), None).await.unwrap().kvs()[0].value().to_vec();
        assert_eq!(frame::parse(&stored).unwrap().codec, Codec::Zstd, "a leased value is a per-value frame");
        assert_eq!(get_value(&mut env.via, &k, 0).await.unwrap().unwrap(), val(i, 900));
    }
    assert_eq!(all_bases(&mut env.direct).await, 0);
    env.via.lease_revoke(lease).await.unwrap();
    let left = env.direct.get(format!("{FLYTE}leased/"), Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap().count();
    assert_eq!(left, 0, "the lease deleted the keys");
    assert_eq!(all_bases(&mut env.direct).await, 0, "nothing left behind");
}
