//! etcd's authentication through the proxy. Clients' calls carry the client's own credentials
//! (metadata `token`); the proxy's own work (dictionaries, delta-frame bases, probes) uses
//! `upstream.user`. The whole core suite also runs with authentication on (`*::etcd_auth::*`,
//! clients as root, delta frames on); here: enabling auth through the proxy, a restarted proxy,
//! and a client whose role is limited to the FlyteWorkflow prefix — through the proxy it can do
//! exactly what it can do on etcd, no more and no less.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};

use crate::harness::{status, steady_series, Env, Proxy, AUTH_FLYTE, AUTH_ROOT, FLYTE};

/// Turning authentication on through the proxy: without a token etcd refuses, with one it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_token_is_forwarded() {
    let mut env = Env::with_delta(FLYTE).await;
    env.via.user_add("root", "pw", None).await.unwrap();
    env.via.user_grant_role("root", "root").await.unwrap();
    env.via.auth_enable().await.unwrap();
    let err = env.via.put(env.wf_key("a").as_str(), "{}", None).await.unwrap_err();
    assert!(err.to_string().contains("user name is empty") || err.to_string().contains("permission"), "{err}");
    let opts = etcd_client::ConnectOptions::new().with_user("root", "pw");
    let mut c = etcd_client::Client::connect([&env.proxy.url], Some(opts)).await.unwrap();
    let key = env.wf_key("authed");
    c.put(key.as_str(), "{\"ok\":true}", None).await.unwrap();
    assert_eq!(c.get(key.as_str(), None).await.unwrap().kvs()[0].value(), b"{\"ok\":true}");
    c.auth_disable().await.unwrap();
}

/// The same sequence as the FlyteWorkflow-only user, on etcd directly and through the proxy (delta
/// frames on): kube-apiserver's create, GuaranteedUpdate, list, watch with prev_kv, delete; then
/// what the role does not allow (another prefix, the proxy's own keys) is refused alike. A proxy
/// restarted with a cold cache reads everything back with the proxy's own user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_limited_to_the_flyte_prefix_can_do_through_the_proxy_what_it_can_on_etcd() {
    let mut env = Env::with_auth(AUTH_FLYTE).await;
    let login = Some(etcd_client::ConnectOptions::new().with_user(AUTH_FLYTE, format!("{AUTH_FLYTE}-pw")));
    let mut on_etcd = etcd_client::Client::connect([&env.etcd.url], login.clone()).await.unwrap();
    let series = steady_series(4);
    let mut outcomes = Vec::new();
    for (side, c) in [("direct", &mut on_etcd), ("via", &mut env.via)] {
        let key = format!("{FLYTE}ns/{side}-wf");
        let mut w = c.watch(format!("{FLYTE}ns/{side}-"), Some(WatchOptions::new().with_prefix().with_prev_key())).await.unwrap();
        let mut out = Vec::new();
        let create = Txn::new().when([Compare::mod_revision(key.as_str(), CompareOp::Equal, 0)]).and_then([TxnOp::put(key.as_str(), series[0].clone(), None)]);
        out.push(format!("{:?}", c.txn(create).await.map(|r| r.succeeded()).map_err(status)));
        for v in &series[1..] {
            let rev = c.get(key.as_str(), None).await.unwrap().kvs()[0].mod_revision();
            let update = Txn::new()
                .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)])
                .and_then([TxnOp::put(key.as_str(), v.clone(), Some(PutOptions::new().with_prev_key()))])
                .or_else([TxnOp::get(key.as_str(), None)]);
            out.push(format!("{:?}", c.txn(update).await.map(|r| r.succeeded()).map_err(status)));
            out.push(format!("{:?}", c.put(key.as_str(), v.clone(), Some(PutOptions::new().with_prev_key())).await.map(|r| r.prev_key().map(|kv| kv.value().to_vec())).map_err(status)));
        }
        let listed = c.get(format!("{FLYTE}ns/{side}-"), Some(GetOptions::new().with_prefix())).await.unwrap();
        assert_eq!(listed.kvs()[0].value(), &series[3][..], "{side}");
        let mut events = Vec::new();
        while events.len() < 1 + 2 * (series.len() - 1) {
            let r = tokio::time::timeout(Duration::from_secs(10), w.message()).await.expect("events").unwrap().unwrap();
            assert!(!r.canceled(), "{side}: {}", r.cancel_reason());
            events.extend(r.events().iter().map(|e| (e.kv().unwrap().value().to_vec(), e.prev_kv().map(|p| p.value().to_vec()))));
        }
        out.push(format!("{events:?}"));
        // Outside the role: another prefix, every key, the proxy's keys.
        out.push(format!("{:?}", c.put("/registry/pods/ns/p", "pod", None).await.map(|_| ()).map_err(status)));
        out.push(format!("{:?}", c.get("/registry/pods/", Some(GetOptions::new().with_prefix())).await.map(|r| r.count()).map_err(status)));
        out.push(format!("{:?}", c.get("/etcd-squeeze/", Some(GetOptions::new().with_prefix())).await.map(|r| r.count()).map_err(status)));
        out.push(format!("{:?}", c.delete(key.as_str(), Some(DeleteOptions::new().with_prev_key())).await.map(|r| r.deleted()).map_err(status)));
        outcomes.push(out.join("\n").replace(side, "SIDE"));
    }
    assert_eq!(outcomes[0], outcomes[1]);

    // A cold proxy (restarted) reads delta frames written by root with the proxy's own user.
    let mut root = env.direct.clone();
    let key = env.wf_key("cold");
    let mut root_via = etcd_client::Client::connect([&env.proxy.url], Some(etcd_client::ConnectOptions::new().with_user(AUTH_ROOT, format!("{AUTH_ROOT}-pw")))).await.unwrap();
    for v in &series {
        root_via.put(key.as_str(), v.clone(), None).await.unwrap();
    }
    assert!(crate::harness::all_bases(&mut root).await > 0, "root's writes are delta frames");
    let mut config = crate::harness::ProxyConfig::new(&env.etcd.url).prefix(FLYTE).delta(true).dictionaries(false).build();
    config.upstream = env.proxy_upstream.clone().unwrap();
    let cold = Proxy::start_config(config).await;
    let mut c = etcd_client::Client::connect([&cold.url], login).await.unwrap();
    assert_eq!(c.get(key.as_str(), None).await.unwrap().kvs()[0].value(), &series[3][..]);
    let mut w = c.watch(key.as_str(), Some(WatchOptions::new().with_start_revision(1).with_prev_key())).await.unwrap();
    let mut seen = 0;
    while seen < series.len() {
        let r = tokio::time::timeout(Duration::from_secs(10), w.message()).await.expect("events").unwrap().unwrap();
        assert!(!r.canceled(), "{}", r.cancel_reason());
        for e in r.events() {
            assert_eq!(e.kv().unwrap().value(), &series[seen][..]);
            seen += 1;
        }
    }
}
