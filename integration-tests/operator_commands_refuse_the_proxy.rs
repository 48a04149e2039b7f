//! The operator commands read and write what etcd stores; pointed at the proxy they would see
//! every value as raw (`migrate compress` would wrap every value twice). The proxy identifies
//! itself (a gRPC method only it answers), and every command refuses to run against it, naming
//! what to point it at instead — and changes nothing.

use std::process::Command;

use etcd_client::GetOptions;

use crate::harness::{Env, FLYTE};

/// Every key and value in etcd, as stored.
async fn dump(c: &mut etcd_client::Client) -> Vec<(Vec<u8>, Vec<u8>, i64)> {
    let all = c.get("\0", Some(GetOptions::new().with_from_key())).await.unwrap();
    all.kvs().iter().map(|kv| (kv.key().to_vec(), kv.value().to_vec(), kv.mod_revision())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operator_command_refuses_to_run_against_the_proxy() {
    let mut env = Env::per_object(FLYTE).await;
    for (i, obj) in etcd_squeeze::corpus::small_set(3).iter().enumerate() {
        env.via.put(env.wf_key(&format!("wf-{i}")), obj.json.clone(), None).await.unwrap();
    }
    let key = env.wf_key("wf-0");
    let before = dump(&mut env.direct).await;
    let commands: Vec<Vec<&str>> = vec![
        vec!["analyze"],
        vec!["migrate", "compress", "--yes"],
        vec!["migrate", "decompress", "--yes"],
        vec!["get", &key],
        vec!["dict", "list"],
    ];
    for args in &commands {
        let out = Command::new(env!("CARGO_BIN_EXE_etcd-squeeze")).args(args).args(["--endpoints", &env.proxy.url]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("is etcd-squeeze") && stderr.contains("not etcd"), "{args:?}: {stderr}");
        assert!(stderr.contains(&env.etcd.url), "{args:?} names where to point it: {stderr}");
        // Against etcd itself the same command runs.
        let ok = Command::new(env!("CARGO_BIN_EXE_etcd-squeeze")).args(args).args(["--endpoints", &env.etcd.url]).output().unwrap();
        assert!(ok.status.success(), "{args:?} against etcd: {}", String::from_utf8_lossy(&ok.stderr));
        if args[0] == "migrate" {
            continue; // it did change what etcd stores, as asked
        }
    }
    // Nothing was written through the proxy by the refused commands (the ones against etcd ran in
    // pairs: compress then decompress leave every value as the proxy wrote it, at new revisions).
    let after = dump(&mut env.direct).await;
    assert_eq!(before.len(), after.len());
    for ((k1, v1, _), (k2, v2, _)) in before.iter().zip(&after) {
        assert_eq!(k1, k2);
        if !k1.starts_with(FLYTE.as_bytes()) {
            assert_eq!(v1, v2);
        }
    }
    // The proxy still serves the original objects.
    assert_eq!(env.via.get(key.as_str(), None).await.unwrap().kvs()[0].value(), &etcd_squeeze::corpus::small_set(3)[0].json[..]);
}
