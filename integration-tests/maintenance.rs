//! Everything besides KV, Watch and Lease that clients call: Maintenance (status, alarms, hash,
//! defragment, snapshot), Cluster, Lock and Election, the gRPC health service, and methods the
//! proxy does not know (UNIMPLEMENTED).

use crate::harness::Env;

crate::suite!(maintenance_cluster_and_snapshot, lock_and_election, health_service_serves, unknown_method_is_unimplemented);

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

async fn lock_and_election(mut env: Env) {
    let lock = env.via.lock("my-lock", None).await.unwrap();
    assert!(lock.key().starts_with(b"my-lock"));
    env.via.unlock(lock.key()).await.unwrap();
    let lease = env.via.lease_grant(10, None).await.unwrap().id();
    env.via.campaign("my-election", "leader-1", lease).await.unwrap();
    let leader = env.via.leader("my-election").await.unwrap();
    assert_eq!(leader.kv().unwrap().value(), b"leader-1");
}

async fn health_service_serves(env: Env) {
    let channel = tonic::transport::Endpoint::from_shared(env.proxy.url.clone()).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(r.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
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
