//! etcdctl on delta keys: the same output as against etcd (the core suite's
//! `kv::*::etcdctl_round_trip` covers the other configurations).

use crate::harness::{all_bases, val, Env, FLYTE};

/// etcdctl put / get / del on delta keys: the same output as against etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_put_get_del() {
    let mut env = Env::with_delta(FLYTE).await;
    let value = String::from_utf8(val(7, 1500)).unwrap();
    let value = value.trim_end();
    let mut outs = Vec::new();
    for (side, endpoint) in [("direct", env.etcd.url.clone()), ("via", env.proxy.url.clone())] {
        let k = format!("{FLYTE}ctl-{side}/k");
        let mut out = Vec::new();
        out.push(crate::harness::etcdctl(&endpoint, &["put", &k, value], None));
        out.push(crate::harness::etcdctl(&endpoint, &["put", "--prev-kv", &k, &format!("{value} v2")], None).replace(side, "SIDE"));
        out.push(crate::harness::etcdctl(&endpoint, &["get", &k, "--print-value-only"], None));
        out.push(crate::harness::etcdctl(&endpoint, &["del", "--prev-kv", &k], None).replace(side, "SIDE"));
        out.push(crate::harness::etcdctl(&endpoint, &["get", &k], None));
        outs.push(out);
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(all_bases(&mut env.direct).await, 0, "etcdctl del took the bases");
}
