//! When etcd fails, clients of the proxy get the codes clients of etcd get: every call that
//! cannot reach or hear from etcd ends with UNAVAILABLE (or DEADLINE_EXCEEDED, when the client's
//! deadline passes first), on unary calls and on streams — never UNKNOWN, which clientv3 does
//! not retry and kube-apiserver reports to users as an internal error. (A stalled etcd is
//! `faults::stalled_etcd_times_out_within_the_deadline_and_recovers`; a cluster losing its leader,
//! `faults::three_member_cluster_loses_a_follower_then_the_leader`.)

use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp, WatchOptions};

use crate::harness::{Etcd, Proxy, FLYTE};

/// The code of a failed call, asserting it is one etcd's clients see when etcd goes away.
fn etcd_like(what: &str, result: Result<impl std::fmt::Debug, etcd_client::Error>) {
    match result {
        Ok(r) => panic!("{what}: succeeded with etcd down: {r:?}"),
        Err(etcd_client::Error::GRpcStatus(status)) => assert!(
            matches!(status.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded),
            "{what}: {:?} {:?}, not UNAVAILABLE",
            status.code(),
            status.message()
        ),
        Err(other) => panic!("{what}: {other}"),
    }
}

/// etcd SIGKILLed under open watches (a pass-through key and a compressed prefix with prev_kv)
/// and a LeaseKeepAlive stream: each stream ends with UNAVAILABLE, and every unary call — on
/// both roads, every service — fails with UNAVAILABLE until etcd is back; then all work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_streams_and_calls_end_unavailable_then_recover() {
    let mut etcd = Etcd::start().await;
    let proxy = Proxy::start(&etcd.url, &[FLYTE]).await;
    let mut via = proxy.client().await;
    let wf = format!("{FLYTE}ns/wf");
    via.put(wf.as_str(), "{\"status\":1}", None).await.unwrap();
    via.put("/registry/pods/ns/p", "pod", None).await.unwrap();
    let lease = via.lease_grant(60, None).await.unwrap().id();

    let mut plain = via.watch("/registry/pods/", Some(WatchOptions::new().with_prefix())).await.unwrap();
    assert!(plain.message().await.unwrap().unwrap().created());
    let mut framed = via.watch(FLYTE, Some(WatchOptions::new().with_prefix().with_prev_key())).await.unwrap();
    assert!(framed.message().await.unwrap().unwrap().created());
    let (mut keeper, mut keepalives) = via.lease_keep_alive(lease).await.unwrap();
    keeper.keep_alive().await.unwrap();
    assert!(keepalives.message().await.unwrap().is_some());

    etcd.kill();
    let soon = Duration::from_secs(30);
    let ended = tokio::time::timeout(soon, plain.message()).await.expect("pass-through watch: no answer within 30 s");
    etcd_like("pass-through watch", ended);
    let ended = tokio::time::timeout(soon, framed.message()).await.expect("compressed watch: no answer within 30 s");
    etcd_like("compressed watch", ended);
    let _ = keeper.keep_alive().await;
    let ended = tokio::time::timeout(soon, keepalives.message()).await.expect("keepalive stream: no answer within 30 s");
    etcd_like("keepalive stream", ended);

    for _ in 0..3 {
        etcd_like("get pass-through", via.get("/registry/pods/ns/p", None).await);
        etcd_like("get compressed", via.get(wf.as_str(), None).await);
        etcd_like("list compressed", via.get(FLYTE, Some(GetOptions::new().with_prefix())).await);
        etcd_like("put pass-through", via.put("/registry/pods/ns/q", "pod", None).await);
        etcd_like("put compressed", via.put(wf.as_str(), "{\"status\":2}", None).await);
        let update = Txn::new()
            .when([Compare::mod_revision(wf.as_str(), CompareOp::Equal, 2)])
            .and_then([TxnOp::put(wf.as_str(), "{\"status\":3}", None)])
            .or_else([TxnOp::get(wf.as_str(), None)]);
        etcd_like("txn compressed", via.txn(update).await);
        etcd_like("delete pass-through", via.delete("/registry/pods/ns/p", None).await);
        etcd_like("lease grant", via.lease_grant(10, None).await);
        etcd_like("member list", via.member_list().await);
        etcd_like("status", via.status().await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    etcd.restart().await;
    crate::harness::eventually(Duration::from_secs(20), "calls through the proxy to succeed again", || {
        let mut via = via.clone();
        let wf = wf.clone();
        async move { via.get(wf.as_str(), None).await.is_ok() && via.get("/registry/pods/ns/p", None).await.is_ok() }
    })
    .await;
    assert_eq!(via.get(wf.as_str(), None).await.unwrap().kvs()[0].value(), b"{\"status\":1}");
}
