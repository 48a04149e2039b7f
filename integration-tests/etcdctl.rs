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
    crate::harness::sweep_now(&env.etcd.url).await;
    assert_eq!(all_bases(&mut env.direct).await, 0, "the sweep took the deleted keys' bases");
}

/// etcdctl 3.4's `endpoint status` and `endpoint hashkv` with an `http://` endpoint (they send
/// `:authority: http://host:port`, which etcd accepts): through the proxy they work and report
/// what they report against etcd (patches/README.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_status_and_hashkv_through_the_proxy() {
    let mut env = Env::new(FLYTE).await;
    env.via.put(format!("{FLYTE}ns/ctl"), "{\"a\":1}", None).await.unwrap();
    let run = |endpoint: &str, args: &[&str]| {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .args(args)
            .args(["-w", "json"])
            .output()
            .expect("etcdctl (Debian's etcd-client) is needed");
        assert!(out.status.success(), "etcdctl --endpoints={endpoint} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json[0].clone()
    };
    let (direct, via) = (run(&env.etcd.url, &["endpoint", "status"]), run(&env.proxy.url, &["endpoint", "status"]));
    assert_eq!(via["Status"]["version"], direct["Status"]["version"], "{via}");
    assert_eq!(via["Status"]["header"]["revision"], direct["Status"]["header"]["revision"], "{via}");
    let (direct, via) = (run(&env.etcd.url, &["endpoint", "hashkv"]), run(&env.proxy.url, &["endpoint", "hashkv"]));
    assert_eq!(via["HashKV"]["hash"], direct["HashKV"]["hash"], "{via}");
    assert_eq!(via["HashKV"]["header"]["revision"], direct["HashKV"]["header"]["revision"], "{via}");
}
