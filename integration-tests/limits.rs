//! The proxy's limits: `limits.max_response_bytes` bounds what one response decompresses to,
//! `limits.max_value_bytes` refuses larger values with etcd's own error, with and without delta
//! frames.

use bytesize::ByteSize;
use etcd_client::{GetOptions, Txn, TxnOp};

use crate::harness::{get_value, status, val, Etcd, ProxyConfig, FLYTE};

/// Tiny frames cannot make one response decompress beyond `limits.max_response_bytes`, and a
/// value over `limits.max_value_bytes` is refused with etcd's own error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_budget_and_value_limit() {
    let etcd = Etcd::start().await;
    let proxy = ProxyConfig::new(&etcd.url).max_value_bytes(ByteSize::mib(3)).max_response_bytes(ByteSize::mib(5)).start().await;
    let mut via = proxy.client().await;
    let prefix = format!("{FLYTE}bomb/");
    let bomb = vec![b' '; 2 << 20];
    for i in 0..3 {
        via.put(format!("{prefix}{i}"), bomb.clone(), None).await.unwrap();
    }
    // Each alone is fine; all three in one response are over the 5 MiB budget.
    assert_eq!(via.get(format!("{prefix}1"), None).await.unwrap().kvs()[0].value().len(), 2 << 20);
    let err = via.get(prefix.as_str(), Some(GetOptions::new().with_prefix())).await.unwrap_err();
    let etcd_client::Error::GRpcStatus(s) = err else { panic!("{err}") };
    assert_eq!(s.code(), tonic::Code::ResourceExhausted);
    assert!(s.message().contains("limits.max_response_bytes"), "{}", s.message());
    let err = via.put(format!("{prefix}huge"), vec![b' '; 4 << 20], None).await.unwrap_err();
    let etcd_client::Error::GRpcStatus(s) = err else { panic!("{err}") };
    assert_eq!((s.code(), s.message()), (tonic::Code::InvalidArgument, "etcdserver: request is too large"));
}

/// A value exactly at limits.max_value_bytes (compressible: under etcd's request limit once
/// stored) and one byte over: the same answers as a proxy without delta frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_at_the_value_limit() {
    let etcd = Etcd::start().await;
    let config = |delta: bool| ProxyConfig::new(&etcd.url).prefix(FLYTE).delta(delta).dictionaries(false).max_value_bytes(ByteSize::b(2 << 20));
    let delta = config(true).start().await;
    let plain = config(false).start().await;
    let mut outs = Vec::new();
    for (side, p) in [("plain", &plain), ("delta", &delta)] {
        let mut c = p.client().await;
        let k = format!("{FLYTE}limit-{side}/k");
        let at = val(1, 2 << 20);
        let over = val(2, (2 << 20) + 1);
        let mut out = Vec::new();
        out.push(format!("{:?}", c.put(k.as_str(), at.clone(), None).await.map(|_| ()).map_err(status)));
        out.push(format!("{:?}", get_value(&mut c, &k, 0).await.map(|v| v == Some(at.clone()))));
        out.push(format!("{:?}", c.put(k.as_str(), over.clone(), None).await.map(|_| ()).map_err(status)));
        out.push(format!("{:?}", c.txn(Txn::new().and_then([TxnOp::put(k.as_str(), over.clone(), None)])).await.map(|_| ()).map_err(status)));
        out.push(format!("{:?}", get_value(&mut c, &k, 0).await.map(|v| v == Some(at.clone()))));
        outs.push(out);
    }
    assert_eq!(outs[0], outs[1], "without vs with delta frames");
}
