//! Odd values on a delta key: values that start with the frame magic, the base magic or
//! `k8s:enc:`, empty values, values at the edge of `min_size`.

use etcd_squeeze::codec::frame;

use crate::harness::{bases_of, current_base_exists, get_value, update, val, Env, Proxy, FLYTE};

/// Values that start with the frame magic, the base magic or `k8s:enc:`, empty values, values
/// just under / at min_size (256 B), alternating on one key through GuaranteedUpdates and
/// top-level Puts: every revision reads back byte-identical through a cold proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_values_on_one_key() {
    let mut env = Env::with_delta(FLYTE).await;
    let key = env.wf_key("odd");
    let big = val(1, 3000);
    let mut magic = frame::MAGIC.to_vec();
    magic.extend_from_slice(&big);
    let mut base_magic = etcd_squeeze::codec::delta::BASE_MAGIC.to_vec();
    base_magic.extend_from_slice(&big);
    let mut enc = b"k8s:enc:aescbc:v1:key1:".to_vec();
    enc.extend_from_slice(&big);
    let mut small_magic = frame::MAGIC.to_vec();
    small_magic.extend_from_slice(b"x");
    let values: Vec<Vec<u8>> = vec![
        big.clone(),
        magic.clone(),
        Vec::new(),
        val(2, 255),
        val(3, 256),
        enc.clone(),
        val(4, 3000),
        base_magic,
        small_magic,
        frame::MAGIC.to_vec(),
        val(5, 3010),
        magic,
        enc,
        val(6, 3000),
    ];
    let mut revs = Vec::new();
    let mut rev = 0;
    for (i, x) in values.iter().enumerate() {
        if i % 3 == 2 {
            rev = env.via.put(key.as_str(), x.clone(), None).await.unwrap().header().unwrap().revision();
        } else {
            let r = update(&mut env.via, &key, rev, x).await;
            assert!(r.succeeded(), "value {i}");
            rev = r.header().unwrap().revision();
        }
        revs.push(rev);
        assert_eq!(get_value(&mut env.via, &key, 0).await.unwrap().unwrap(), *x, "value {i}");
        current_base_exists(&mut env.direct, &key).await;
    }
    let cold_proxy = Proxy::start_delta(&env.etcd.url).await;
    let mut cold = cold_proxy.client().await;
    for (i, (x, r)) in values.iter().zip(&revs).enumerate() {
        assert_eq!(get_value(&mut cold, &key, *r).await.unwrap().unwrap(), *x, "value {i} at {r}");
    }
    env.via.delete(key.as_str(), None).await.unwrap();
    crate::harness::sweep_now(&env.etcd.url).await;
    assert!(bases_of(&mut env.direct, &key).await.is_empty());
}
