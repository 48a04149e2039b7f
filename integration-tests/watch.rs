//! Watch: history with prev_kv, compaction, progress, many watches on one stream, and large
//! catch-up responses that etcd splits into fragments.

use etcd_client::{EventType, WatchOptions};

use crate::harness::Env;

crate::suite!(watch_history_with_prev_kv, watch_from_compacted_revision, watch_progress_and_cancel, corrupt_value_is_delivered_as_stored_and_the_watch_goes_on);

async fn next(stream: &mut etcd_client::WatchStream) -> etcd_client::WatchResponse {
    tokio::time::timeout(std::time::Duration::from_secs(10), stream.message())
        .await
        .expect("watch response within 10s")
        .unwrap()
        .expect("stream open")
}

async fn watch_history_with_prev_kv(mut env: Env) {
    let objs = etcd_squeeze::corpus::small_set(11);
    let prefix = env.wf_key("watched/");
    let key = format!("{prefix}wf");
    let start = env.via.put(key.as_str(), objs[0].json.clone(), None).await.unwrap().header().unwrap().revision();
    for obj in &objs[1..4] {
        env.via.put(key.as_str(), obj.json.clone(), None).await.unwrap();
    }
    env.via.delete(key.as_str(), None).await.unwrap();

    // Watch from the first revision: replay create, 3 updates, delete, each with prev_kv.
    let mut stream = env
        .via
        .watch(prefix.as_str(), Some(WatchOptions::new().with_prefix().with_prev_key().with_start_revision(start)))
        .await
        .unwrap();
    let mut events = Vec::new();
    while events.len() < 5 {
        let r = next(&mut stream).await;
        events.extend(r.events().iter().cloned());
    }
    assert_eq!(events[0].event_type(), EventType::Put);
    assert_eq!(events[0].kv().unwrap().value(), &objs[0].json[..]);
    for i in 1..4 {
        assert_eq!(events[i].kv().unwrap().value(), &objs[i].json[..], "update {i}");
        assert_eq!(events[i].prev_kv().unwrap().value(), &objs[i - 1].json[..], "prev_kv of update {i}");
    }
    assert_eq!(events[4].event_type(), EventType::Delete);
    assert!(events[4].kv().unwrap().value().is_empty());
    assert_eq!(events[4].prev_kv().unwrap().value(), &objs[3].json[..]);
    // Revisions are etcd's, strictly increasing.
    let revs: Vec<i64> = events.iter().map(|e| e.kv().unwrap().mod_revision()).collect();
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "{revs:?}");

    // Live events arrive too.
    env.via.put(key.as_str(), objs[4].json.clone(), None).await.unwrap();
    let r = next(&mut stream).await;
    assert_eq!(r.events()[0].kv().unwrap().value(), &objs[4].json[..]);
    assert!(r.events()[0].prev_kv().is_none(), "created again: no prev_kv");
}

async fn watch_from_compacted_revision(mut env: Env) {
    let key = env.wf_key("wc");
    let first = env.via.put(key.as_str(), "{\"a\":1}", None).await.unwrap().header().unwrap().revision();
    let last = env.via.put(key.as_str(), "{\"a\":2}", None).await.unwrap().header().unwrap().revision();
    env.via.compact(last, None).await.unwrap();
    let opts = WatchOptions::new().with_prev_key().with_start_revision(first);
    let mut d = env.direct.watch(key.as_str(), Some(opts.clone())).await.unwrap();
    let mut v = env.via.watch(key.as_str(), Some(opts)).await.unwrap();
    async fn until_canceled(s: &mut etcd_client::WatchStream) -> etcd_client::WatchResponse {
        loop {
            let r = next(s).await;
            if r.canceled() {
                return r;
            }
            assert!(r.created() && r.events().is_empty(), "{r:?}");
        }
    }
    let (d, v) = (until_canceled(&mut d).await, until_canceled(&mut v).await);
    assert_eq!(v.compact_revision(), d.compact_revision());
    assert_eq!(v.compact_revision(), last);
    assert_eq!(v.cancel_reason(), d.cancel_reason());
}

async fn watch_progress_and_cancel(mut env: Env) {
    let key = env.wf_key("wp");
    let mut stream = env.via.watch(key.as_str(), Some(WatchOptions::new().with_progress_notify())).await.unwrap();
    let created = next(&mut stream).await;
    assert!(created.created());
    let id = created.watch_id();
    // A second watch on the same stream (kube-apiserver multiplexes watches).
    stream.watch(env.wf_key("wp2"), None).await.unwrap();
    let second = next(&mut stream).await;
    assert!(second.created());
    assert_ne!(second.watch_id(), id);
    let rev = env.via.put(key.as_str(), "{}", None).await.unwrap().header().unwrap().revision();
    let ev = next(&mut stream).await;
    assert_eq!(ev.watch_id(), id);
    stream.request_progress().await.unwrap();
    let progress = next(&mut stream).await;
    assert!(progress.events().is_empty() && !progress.created() && !progress.canceled());
    assert!(progress.header().unwrap().revision() >= rev);
    stream.cancel(id).await.unwrap();
    let canceled = next(&mut stream).await;
    assert!(canceled.canceled());
    assert_eq!(canceled.watch_id(), id);
}

async fn corrupt_value_is_delivered_as_stored_and_the_watch_goes_on(mut env: Env) {
    let bad = env.wf_key("wbad");
    let good = env.wf_key("wgood");
    let obj = etcd_squeeze::corpus::small_set(2).remove(3);
    env.via.put(bad.as_str(), obj.json.clone(), None).await.unwrap();
    let mut raw = env.direct.get(bad.as_str(), None).await.unwrap().kvs()[0].value().to_vec();
    let mid = raw.len() / 2;
    raw[mid] ^= 0x5A;
    let mut stream = env.via.watch(bad.as_str(), Some(WatchOptions::new().with_prev_key())).await.unwrap();
    let bad_id = next(&mut stream).await.watch_id();
    stream.watch(good.as_str(), None).await.unwrap();
    let good_id = next(&mut stream).await.watch_id();
    let corrupted_at = env.direct.put(bad.as_str(), raw.clone(), None).await.unwrap().header().unwrap().revision();
    // The event carries what etcd holds (as a watch on etcd would); the watch is not canceled.
    let event = next(&mut stream).await;
    assert!(!event.canceled());
    assert_eq!(event.watch_id(), bad_id);
    assert_eq!(event.events()[0].kv().unwrap().value(), &raw[..]);
    assert_eq!(event.events()[0].prev_kv().unwrap().value(), &obj.json[..]);
    // Both watches on the stream keep receiving events, the corrupt value as prev_kv too.
    env.via.put(good.as_str(), obj.json.clone(), None).await.unwrap();
    env.via.put(bad.as_str(), "{}", None).await.unwrap();
    env.via.put(good.as_str(), "{\"again\":1}", None).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let r = next(&mut stream).await;
        assert!(!r.canceled());
        for e in r.events() {
            seen.push((r.watch_id(), e.kv().unwrap().value().to_vec(), e.prev_kv().map(|p| p.value().to_vec())));
        }
    }
    assert!(seen.contains(&(good_id, obj.json.clone(), None)), "{seen:?}");
    assert!(seen.contains(&(bad_id, b"{}".to_vec(), Some(raw.clone()))), "{seen:?}");
    assert!(seen.contains(&(good_id, b"{\"again\":1}".to_vec(), None)), "{seen:?}");
    // A re-watch from before the corruption makes progress (kube-apiserver re-watches from its revision).
    let mut again = env.via.watch(bad.as_str(), Some(WatchOptions::new().with_start_revision(corrupted_at))).await.unwrap();
    let mut values = Vec::new();
    while values.len() < 2 {
        let r = next(&mut again).await;
        assert!(!r.canceled(), "{}", r.cancel_reason());
        values.extend(r.events().iter().map(|e| e.kv().unwrap().value().to_vec()));
    }
    assert_eq!(values, vec![raw.clone(), b"{}".to_vec()]);
}

/// etcd splits a large watch response into `fragment`ed responses when the client asks; each
/// fragment carries whole events, decoded on their own, and the flag passes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_watch_responses_are_decoded() {
    use etcd_squeeze::proto::etcdserverpb::{watch_client::WatchClient, watch_request, WatchCreateRequest, WatchRequest};
    use futures::StreamExt;
    use rand::{Rng, SeedableRng};
    use crate::harness::{Etcd, ProxyConfig, FLYTE};

    // A small --max-request-bytes makes the fragment threshold (limit + 512 KiB) small too.
    let etcd = Etcd::start_with(&["--max-request-bytes", "65536"]).await;
    let proxy = ProxyConfig::new(&etcd.url).prefix(FLYTE).delta(false).start().await;
    let mut via = proxy.client().await;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let prefix = format!("{FLYTE}frag/");
    let mut values = Vec::new();
    let mut first = 0;
    for i in 0..24 {
        // Random alphanumerics: zstd shrinks them only ~1.3x, so etcd holds ~36 KB per value.
        let body: String = (0..48_000).map(|_| rng.sample(rand::distr::Alphanumeric) as char).collect();
        let value = format!("{{\"blob\":\"{body}\"}}\n").into_bytes();
        let rev = via.put(format!("{prefix}{i:02}"), value.clone(), None).await.unwrap().header().unwrap().revision();
        if i == 0 {
            first = rev;
        }
        values.push(value);
    }
    let channel = tonic::transport::Endpoint::from_shared(proxy.url.clone()).unwrap().connect().await.unwrap();
    let mut watch = WatchClient::new(channel).max_decoding_message_size(usize::MAX);
    let create = WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
            key: prefix.clone().into(),
            range_end: etcd_squeeze::codec::prefix_end(prefix.as_bytes()).unwrap().into(),
            start_revision: first,
            prev_kv: true,
            fragment: true,
            ..Default::default()
        })),
    };
    let requests = tokio_stream::iter([create]).chain(futures::stream::pending());
    let mut responses = watch.watch(requests).await.unwrap().into_inner();
    let (mut events, mut fragments) = (Vec::new(), 0);
    while events.len() < values.len() {
        let r = tokio::time::timeout(std::time::Duration::from_secs(10), responses.next()).await.unwrap().unwrap().unwrap();
        fragments += r.fragment as usize;
        events.extend(r.events);
    }
    assert!(fragments > 0, "etcd fragmented the catch-up response");
    for (ev, want) in events.iter().zip(&values) {
        assert_eq!(&ev.kv.as_ref().unwrap().value[..], &want[..]);
    }
}
