//! One corrupt stored value takes down no more than it would on etcd itself. kube-apiserver's
//! sequence around a corrupt object (KEP-3926: it names the object and deletes it "unsafely",
//! without decoding it) runs through the proxy against one etcd, and directly against another
//! etcd holding the same bytes at the same revisions; every answer is compared.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, Txn, TxnOp, TxnOpResponse, WatchOptions};

use crate::harness::{decode_errors_total, Etcd, ProxyConfig, FLYTE};

/// (key, value, create_revision, mod_revision, version) of every KeyValue.
type Kvs = Vec<(String, Vec<u8>, i64, i64, i64)>;

fn kvs(list: &[etcd_client::KeyValue]) -> Kvs {
    list.iter().map(|kv| (kv.key_str().unwrap().to_string(), kv.value().to_vec(), kv.create_revision(), kv.mod_revision(), kv.version())).collect()
}

/// (event type, key, value, mod_revision, prev_kv value) of every event until `n` were seen.
async fn events(stream: &mut etcd_client::WatchStream, n: usize) -> Vec<(i32, String, Vec<u8>, i64, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    while out.len() < n {
        let r = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("events within 10 s").unwrap().expect("open");
        assert!(!r.canceled(), "watch canceled: {}", r.cancel_reason());
        for e in r.events() {
            let kv = e.kv().unwrap();
            out.push((e.event_type() as i32, kv.key_str().unwrap().to_string(), kv.value().to_vec(), kv.mod_revision(), e.prev_kv().map(|p| p.value().to_vec())));
        }
    }
    out
}

/// The apiserver-shaped sequence over a corrupt object: list, watch with prev_kv, updates of the
/// other objects, unsafe delete of the corrupt one (Txn on its mod_revision, with prev_kv),
/// re-list, re-watch from before. Through the proxy every answer equals etcd's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_sequence_over_a_corrupt_object_matches_etcd() {
    let (etcd_a, etcd_b) = (Etcd::start().await, Etcd::start().await);
    // No dictionary trainer: the proxy writes nothing of its own, so revisions match etcd B's.
    let proxy = ProxyConfig::new(&etcd_a.url).prefix(FLYTE).dictionaries(false).announce(false).start().await;
    let (mut via, mut direct_a, mut direct_b) = (proxy.client().await, etcd_a.client().await, etcd_b.client().await);
    let prefix = format!("{FLYTE}ns/");
    let objects = etcd_squeeze::corpus::small_set(3);
    let names = ["wf-a", "wf-b", "wf-c"];
    for (name, obj) in names.iter().zip(&objects) {
        via.put(format!("{prefix}{name}"), obj.json.clone(), None).await.unwrap();
        direct_b.put(format!("{prefix}{name}"), obj.json.clone(), None).await.unwrap();
    }
    // wf-b's stored frame is damaged; etcd B holds the same damaged bytes.
    let bad = format!("{prefix}wf-b");
    let mut damaged = direct_a.get(bad.as_str(), None).await.unwrap().kvs()[0].value().to_vec();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0x5A;
    let at = direct_a.put(bad.as_str(), damaged.clone(), None).await.unwrap().header().unwrap().revision();
    assert_eq!(direct_b.put(bad.as_str(), damaged.clone(), None).await.unwrap().header().unwrap().revision(), at);
    let errors = decode_errors_total(&proxy.metrics_url).await;

    // The list answers every object: the corrupt one as stored, as etcd answers it.
    let list = |c: &mut etcd_client::Client| {
        let mut c = c.clone();
        let prefix = prefix.clone();
        async move { c.get(prefix.as_str(), Some(GetOptions::new().with_prefix())).await.unwrap() }
    };
    let (through, on_etcd) = (list(&mut via).await, list(&mut direct_b).await);
    assert_eq!(kvs(through.kvs()), kvs(on_etcd.kvs()));
    assert_eq!((through.count(), through.more()), (on_etcd.count(), on_etcd.more()));
    assert!(decode_errors_total(&proxy.metrics_url).await > errors, "the corrupt value is counted");

    // A watch with prev_kv over the prefix, then updates of the others and the unsafe delete.
    let watch = WatchOptions::new().with_prefix().with_prev_key().with_start_revision(at + 1);
    let mut w_through = via.watch(prefix.as_str(), Some(watch.clone())).await.unwrap();
    let mut w_etcd = direct_b.watch(prefix.as_str(), Some(watch.clone())).await.unwrap();
    for name in ["wf-a", "wf-c"] {
        for c in [&mut via, &mut direct_b] {
            c.put(format!("{prefix}{name}"), format!("{{\"updated\":\"{name}\"}}"), None).await.unwrap();
        }
    }
    let unsafe_delete = |m: i64| {
        Txn::new()
            .when([Compare::mod_revision(bad.as_str(), CompareOp::Equal, m)])
            .and_then([TxnOp::delete(bad.as_str(), Some(DeleteOptions::new().with_prev_key()))])
    };
    let (d_through, d_etcd) = (via.txn(unsafe_delete(at)).await.unwrap(), direct_b.txn(unsafe_delete(at)).await.unwrap());
    assert!(d_through.succeeded() && d_etcd.succeeded());
    assert_eq!(d_through.header().unwrap().revision(), d_etcd.header().unwrap().revision());
    let deleted = |r: &etcd_client::TxnResponse| match &r.op_responses()[0] {
        TxnOpResponse::Delete(d) => (d.deleted(), kvs(d.prev_kvs())),
        other => panic!("{other:?}"),
    };
    assert_eq!(deleted(&d_through), deleted(&d_etcd));
    assert_eq!(deleted(&d_through).1[0].1, damaged);

    let (e_through, e_etcd) = (events(&mut w_through, 3).await, events(&mut w_etcd, 3).await);
    assert_eq!(e_through, e_etcd);

    // The re-list no longer has it; a re-watch from before the updates makes the same progress.
    let (through, on_etcd) = (list(&mut via).await, list(&mut direct_b).await);
    assert_eq!(kvs(through.kvs()), kvs(on_etcd.kvs()));
    assert_eq!(through.kvs().len(), 2);
    let mut again = via.watch(prefix.as_str(), Some(watch.clone().with_start_revision(at))).await.unwrap();
    let mut again_etcd = direct_b.watch(prefix.as_str(), Some(watch.with_start_revision(at))).await.unwrap();
    assert_eq!(events(&mut again, 4).await, events(&mut again_etcd, 4).await);
}
