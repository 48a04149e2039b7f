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

/// Near etcd's limits a delta-frame Put (sent as a Txn carrying the value's base) can be over
/// etcd's gRPC receive limit (`--max-request-bytes` + 512 KiB) or its request limit where the
/// client's own Put is not: the proxy then writes the value per object, and the client gets what
/// etcd answers for its own request. Incompressible values just under 1.5 MiB (etcd accepts) and
/// just under 2 MiB (etcd: "request is too large"), directly and through the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_frame_writes_near_etcds_limits_answer_as_etcd() {
    let etcd = Etcd::start().await;
    let proxy = ProxyConfig::new(&etcd.url).prefix(FLYTE).delta(true).dictionaries(false).start().await;
    let (mut via, mut direct) = (proxy.client().await, etcd.client().await);
    let incompressible = |n: usize| {
        use rand::{RngCore, SeedableRng};
        let mut v = vec![0u8; n];
        rand_chacha::ChaCha8Rng::seed_from_u64(n as u64).fill_bytes(&mut v);
        v
    };
    for n in [(3 << 19) - 4096, (2 << 20) - 4096] {
        let value = incompressible(n);
        let key = |side: &str| format!("{FLYTE}ns/near-limit-{side}-{n}");
        let on_etcd = direct.put(key("direct"), value.clone(), None).await.map(|_| ()).map_err(status);
        let through = via.put(key("via"), value.clone(), None).await.map(|_| ()).map_err(status);
        assert_eq!(through, on_etcd, "{n} bytes");
        if through.is_ok() {
            assert_eq!(get_value(&mut via, &key("via"), 0).await.unwrap().unwrap(), value);
        }
    }
}
