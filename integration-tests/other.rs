//! Lease, Maintenance, Auth, health, unknown methods, metadata: everything the etcd-client crate can call.

use std::time::Duration;

use etcd_client::{GetOptions, PutOptions};

use crate::harness::Env;

crate::suite!(lease_with_keepalive, maintenance_cluster_and_snapshot, auth_token_is_forwarded, unknown_method_is_unimplemented, health_service_serves, lock_and_election);

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

async fn maintenance_cluster_and_snapshot(mut env: Env) {
    let via = env.via.status().await.unwrap();
    let direct = env.direct.status().await.unwrap();
    assert_eq!(via.version(), direct.version(), "Maintenance.Status.version is etcd's own");
    assert_eq!(via.header().unwrap().cluster_id(), direct.header().unwrap().cluster_id());
    let members = env.via.member_list().await.unwrap();
    assert_eq!(members.members().len(), 1);
    env.via.alarm(etcd_client::AlarmAction::Get, etcd_client::AlarmType::None, None).await.unwrap();
    env.via.hash_kv(0).await.unwrap();
    env.via.defragment().await.unwrap();
    let mut snap = env.via.snapshot().await.unwrap();
    let mut bytes = 0;
    while let Some(chunk) = snap.message().await.unwrap() {
        bytes += chunk.blob().len();
    }
    assert!(bytes > 0);
}

async fn auth_token_is_forwarded(mut env: Env) {
    env.via.user_add("root", "pw", None).await.unwrap();
    env.via.user_grant_role("root", "root").await.unwrap();
    env.via.auth_enable().await.unwrap();
    // Without a token, etcd refuses; with one (metadata `token`), it serves through the proxy.
    let err = env.via.put(env.wf_key("a").as_str(), "{}", None).await.unwrap_err();
    assert!(err.to_string().contains("user name is empty") || err.to_string().contains("permission"), "{err}");
    let opts = etcd_client::ConnectOptions::new().with_user("root", "pw");
    let mut c = etcd_client::Client::connect([&env.proxy.url], Some(opts)).await.unwrap();
    let key = env.wf_key("authed");
    c.put(key.as_str(), "{\"ok\":true}", None).await.unwrap();
    assert_eq!(c.get(key.as_str(), None).await.unwrap().kvs()[0].value(), b"{\"ok\":true}");
    c.auth_disable().await.unwrap();
}

async fn unknown_method_is_unimplemented(env: Env) {
    let channel = tonic::transport::Endpoint::from_shared(env.proxy.url.clone()).unwrap().connect().await.unwrap();
    for path in ["/etcdserverpb.KV/RangeStreamV2", "/etcdserverpb.Lease/LeaseSomething", "/etcdserverpb.Nope/X", "/etcdserverpb.KV/RangeStream"] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let res = grpc
            .unary::<_, bytes::Bytes, _>(tonic::Request::new(bytes::Bytes::new()), path.parse().unwrap(), etcd_squeeze::server::raw::RawCodec)
            .await;
        // RangeStream is known to the proxy; etcd 3.4 answers UNIMPLEMENTED itself.
        assert_eq!(res.unwrap_err().code(), tonic::Code::Unimplemented, "{path}");
    }
}

async fn health_service_serves(env: Env) {
    let channel = tonic::transport::Endpoint::from_shared(env.proxy.url.clone()).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(r.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
}

async fn lock_and_election(mut env: Env) {
    let lock = env.via.lock("my-lock", None).await.unwrap();
    assert!(lock.key().starts_with(b"my-lock"));
    env.via.unlock(lock.key()).await.unwrap();
    let lease = env.via.lease_grant(10, None).await.unwrap().id();
    env.via.campaign("my-election", "leader-1", lease).await.unwrap();
    let leader = env.via.leader("my-election").await.unwrap();
    assert_eq!(leader.kv().unwrap().value(), b"leader-1");
}

/// etcd splits a large watch response into `fragment`ed responses when the client asks; each
/// fragment carries whole events, decoded on their own, and the flag passes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_watch_responses_are_decoded() {
    use etcd_squeeze::proto::etcdserverpb::{watch_client::WatchClient, watch_request, WatchCreateRequest, WatchRequest};
    use futures::StreamExt;
    use rand::{Rng, SeedableRng};
    use crate::harness::{Etcd, Proxy, FLYTE};

    // A small --max-request-bytes makes the fragment threshold (limit + 512 KiB) small too.
    let etcd = Etcd::start_with(&["--max-request-bytes", "65536"]).await;
    let proxy = Proxy::start(&etcd.url, &[FLYTE]).await;
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

/// An invalid config file fails at start with an error naming the key.
#[test]
fn invalid_config_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[[prefixes]]\nprefix = \"/registry/x/\"\nlevel = 99\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_etcd-squeeze"))
        .args(["serve", "--check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("prefixes[0].level"), "{err}");
    let ok = std::process::Command::new(env!("CARGO_BIN_EXE_etcd-squeeze"))
        .args(["serve", "--check-config", "--config", concat!(env!("CARGO_MANIFEST_DIR"), "/config/etcd-squeeze.toml")])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
}

/// Several upstream endpoints: calls go to the ones that are up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failover_skips_a_dead_endpoint() {
    use crate::harness::{free_port, Etcd, Proxy, FLYTE};
    let etcd = Etcd::start().await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut config = etcd_squeeze::config::Config::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.upstream.endpoints = vec![dead, etcd.url.clone()];
    config.upstream.connect_timeout = Duration::from_millis(500);
    let proxy = Proxy::start_config(config).await;
    let mut via = proxy.client().await;
    let key = format!("{FLYTE}ns/failover");
    for i in 0..20 {
        via.put(key.as_str(), format!("{{\"n\":{i}}}"), None).await.unwrap();
        assert_eq!(via.get(key.as_str(), None).await.unwrap().kvs()[0].value(), format!("{{\"n\":{i}}}").as_bytes());
    }
}

/// Tiny frames cannot make one response decompress beyond `limits.max_response_bytes`, and a
/// value over `limits.max_value_bytes` is refused with etcd's own error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_budget_and_value_limit() {
    use crate::harness::{Etcd, Proxy, FLYTE};
    let etcd = Etcd::start().await;
    let mut config = etcd_squeeze::config::Config::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.upstream.endpoints = vec![etcd.url.clone()];
    config.limits.max_value_bytes = bytesize::ByteSize::mib(3);
    config.limits.max_response_bytes = bytesize::ByteSize::mib(5);
    let proxy = Proxy::start_config(config).await;
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
