//! KV: create, get, GuaranteedUpdate, list, count/keys only, delete, VALUE compares, limits, corruption.

use etcd_client::{SortOrder, SortTarget, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use etcd_squeeze::codec::frame;

use crate::harness::{Env, FLYTE};

crate::suite!(
    create_get_and_stored_compressed,
    guaranteed_update_and_conflict,
    paginated_list_at_fixed_revision,
    count_only_and_keys_only,
    txn_delete_with_prev_kv,
    put_and_delete_prev_kv,
    value_compare_on_logical_value,
    too_large_for_etcd_but_fits_compressed,
    incompressible_oversize_gets_etcds_own_error,
    user_bytes_with_the_magic,
    corrupt_frame_is_passed_on_as_stored_and_proxy_keeps_serving,
    keys_outside_prefix_are_byte_identical,
    concurrent_writers_lose_no_update,
    real_corpus_round_trips,
    compaction_errors_match_etcd,
    etcdctl_round_trip,
    sort_by_value_uses_logical_values,
    prev_kv_that_cannot_be_decoded_never_fails_the_write,
    value_compare_over_too_many_keys_is_refused_clearly,
);

fn objects() -> Vec<etcd_squeeze::corpus::Generated> {
    etcd_squeeze::corpus::small_set(7)
}

/// kube-apiserver's create: Txn(MOD(k) == 0) → Put, no failure ops.
async fn create(c: &mut etcd_client::Client, key: &str, value: &[u8]) -> i64 {
    let r = c
        .txn(Txn::new().when([Compare::mod_revision(key, CompareOp::Equal, 0)]).and_then([TxnOp::put(key, value, None)]))
        .await
        .unwrap();
    assert!(r.succeeded(), "create {key}");
    r.header().unwrap().revision()
}

/// kube-apiserver's GuaranteedUpdate: Txn(MOD(k) == rev) → Put, else Range(k).
async fn update(c: &mut etcd_client::Client, key: &str, rev: i64, value: &[u8]) -> Result<i64, Vec<u8>> {
    let r = c
        .txn(
            Txn::new()
                .when([Compare::mod_revision(key, CompareOp::Equal, rev)])
                .and_then([TxnOp::put(key, value, None)])
                .or_else([TxnOp::get(key, None)]),
        )
        .await
        .unwrap();
    if r.succeeded() {
        return Ok(r.header().unwrap().revision());
    }
    match &r.op_responses()[0] {
        TxnOpResponse::Get(g) => Err(g.kvs()[0].value().to_vec()),
        other => panic!("unexpected {other:?}"),
    }
}

async fn get(c: &mut etcd_client::Client, key: &str) -> Option<etcd_client::KeyValue> {
    c.get(key, None).await.unwrap().kvs().first().cloned()
}

async fn stored(env: &mut Env, key: &str) -> Vec<u8> {
    get(&mut env.direct, key).await.unwrap().value().to_vec()
}

async fn create_get_and_stored_compressed(mut env: Env) {
    for (i, obj) in objects().iter().enumerate() {
        let key = env.wf_key(&format!("wf-{i}"));
        create(&mut env.via, &key, &obj.json).await;
        let kv = get(&mut env.via, &key).await.unwrap();
        assert_eq!(kv.value(), &obj.json[..], "{}", obj.name);
        let raw = stored(&mut env, &key).await;
        assert!(frame::is_framed(&raw), "{} is framed in etcd", obj.name);
        if obj.json.len() > 100_000 {
            assert!(raw.len() * 8 < obj.json.len(), "{}: {} -> {}", obj.name, obj.json.len(), raw.len());
        }
        // Everything but the value is etcd's own.
        let direct = get(&mut env.direct, &key).await.unwrap();
        assert_eq!(
            (kv.create_revision(), kv.mod_revision(), kv.version(), kv.lease()),
            (direct.create_revision(), direct.mod_revision(), direct.version(), direct.lease())
        );
    }
    // A second create of the same key fails, as on etcd.
    let key = env.wf_key("wf-0");
    let r = env
        .via
        .txn(Txn::new().when([Compare::mod_revision(key.as_str(), CompareOp::Equal, 0)]).and_then([TxnOp::put(key.as_str(), "x", None)]))
        .await
        .unwrap();
    assert!(!r.succeeded());
}

async fn guaranteed_update_and_conflict(mut env: Env) {
    let objs = objects();
    let key = env.wf_key("gu");
    let mut rev = create(&mut env.via, &key, &objs[0].json).await;
    for obj in &objs[1..] {
        rev = update(&mut env.via, &key, rev, &obj.json).await.unwrap();
        assert_eq!(get(&mut env.via, &key).await.unwrap().mod_revision(), rev);
    }
    // A stale revision loses and gets the current, decompressed value in the else branch.
    let current = update(&mut env.via, &key, rev - 1, b"stale").await.unwrap_err();
    assert_eq!(current, objs.last().unwrap().json);
}

async fn paginated_list_at_fixed_revision(mut env: Env) {
    let objs = objects();
    let prefix = format!("{FLYTE}ns-list/");
    for i in 0..25 {
        let obj = &objs[i % objs.len()];
        create(&mut env.via, &format!("{prefix}wf-{i:03}"), &obj.json).await;
    }
    let first = env.via.get(prefix.as_str(), Some(GetOptions::new().with_prefix().with_limit(10))).await.unwrap();
    let rev = first.header().unwrap().revision();
    assert!(first.more());
    assert_eq!(first.count(), 25);
    // A write after the first page must not show in later pages pinned at `rev`.
    let k20 = format!("{prefix}wf-020");
    let rev20 = get(&mut env.via, &k20).await.unwrap().mod_revision();
    update(&mut env.via, &k20, rev20, b"{}\n").await.unwrap();
    let mut seen: Vec<etcd_client::KeyValue> = first.kvs().to_vec();
    let end = etcd_squeeze::codec::prefix_end(prefix.as_bytes()).unwrap();
    while seen.len() < 25 {
        let mut from = seen.last().unwrap().key().to_vec();
        from.push(0);
        let page = env
            .via
            .get(from, Some(GetOptions::new().with_range(end.clone()).with_limit(10).with_revision(rev)))
            .await
            .unwrap();
        assert!(page.header().unwrap().revision() >= rev);
        seen.extend(page.kvs().iter().cloned());
        if !page.more() {
            break;
        }
    }
    assert_eq!(seen.len(), 25);
    for (i, kv) in seen.iter().enumerate() {
        assert_eq!(kv.value(), &objs[i % objs.len()].json[..], "page value {i} at the pinned revision");
    }
}

async fn count_only_and_keys_only(mut env: Env) {
    let objs = objects();
    let prefix = format!("{FLYTE}ns-count/");
    for (i, obj) in objs.iter().take(5).enumerate() {
        create(&mut env.via, &format!("{prefix}{i}"), &obj.json).await;
    }
    let c = env.via.get(prefix.as_str(), Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap();
    assert_eq!((c.count(), c.kvs().len()), (5, 0));
    let k = env.via.get(prefix.as_str(), Some(GetOptions::new().with_prefix().with_keys_only())).await.unwrap();
    assert_eq!(k.kvs().len(), 5);
    assert!(k.kvs().iter().all(|kv| kv.value().is_empty()));
    let d = env.direct.get(prefix.as_str(), Some(GetOptions::new().with_prefix().with_keys_only())).await.unwrap();
    assert_eq!(format!("{:?}", k.kvs()), format!("{:?}", d.kvs()));
}

async fn txn_delete_with_prev_kv(mut env: Env) {
    let obj = &objects()[2];
    let key = env.wf_key("del");
    let rev = create(&mut env.via, &key, &obj.json).await;
    let r = env
        .via
        .txn(
            Txn::new()
                .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)])
                .and_then([TxnOp::delete(key.as_str(), Some(DeleteOptions::new().with_prev_key()))])
                .or_else([TxnOp::get(key.as_str(), None)]),
        )
        .await
        .unwrap();
    assert!(r.succeeded());
    match &r.op_responses()[0] {
        TxnOpResponse::Delete(d) => {
            assert_eq!(d.deleted(), 1);
            assert_eq!(d.prev_kvs()[0].value(), &obj.json[..]);
        }
        other => panic!("{other:?}"),
    }
    assert!(get(&mut env.via, &key).await.is_none());
}

async fn put_and_delete_prev_kv(mut env: Env) {
    let objs = objects();
    let key = env.wf_key("prev");
    env.via.put(key.as_str(), objs[0].json.clone(), None).await.unwrap();
    let p = env.via.put(key.as_str(), objs[1].json.clone(), Some(PutOptions::new().with_prev_key())).await.unwrap();
    assert_eq!(p.prev_key().unwrap().value(), &objs[0].json[..]);
    // ignore_value keeps the stored value.
    env.via.put(key.as_str(), "", Some(PutOptions::new().with_ignore_value())).await.unwrap();
    assert_eq!(get(&mut env.via, &key).await.unwrap().value(), &objs[1].json[..]);
    let d = env.via.delete(key.as_str(), Some(DeleteOptions::new().with_prev_key())).await.unwrap();
    assert_eq!(d.prev_kvs()[0].value(), &objs[1].json[..]);
}

async fn value_compare_on_logical_value(mut env: Env) {
    let key = env.wf_key("cmp");
    let value = objects()[1].json.clone();
    env.via.put(key.as_str(), value.clone(), None).await.unwrap();
    let other = env.wf_key("cmp-other");
    let txn = |op: CompareOp, v: Vec<u8>| {
        Txn::new()
            .when([Compare::value(key.as_str(), op, v)])
            .and_then([TxnOp::put(other.as_str(), "then", None), TxnOp::get(key.as_str(), None)])
            .or_else([TxnOp::put(other.as_str(), "else", None)])
    };
    let cases = [
        (CompareOp::Equal, value.clone(), true),
        (CompareOp::Equal, b"nope".to_vec(), false),
        (CompareOp::NotEqual, b"nope".to_vec(), true),
        (CompareOp::Greater, b"{".to_vec(), true),
        (CompareOp::Less, b"{".to_vec(), false),
    ];
    for (op, v, want) in cases {
        let r = env.via.txn(txn(op, v)).await.unwrap();
        assert_eq!(r.succeeded(), want, "{op:?}");
        if want {
            match &r.op_responses()[1] {
                TxnOpResponse::Get(g) => assert_eq!(g.kvs()[0].value(), &value[..]),
                other => panic!("{other:?}"),
            }
        }
        let expect: &[u8] = if want { b"then" } else { b"else" };
        assert_eq!(get(&mut env.via, &other).await.unwrap().value(), expect);
    }
    // A missing key never matches a VALUE compare (etcd's rule).
    let missing = env.wf_key("missing");
    let r = env.via.txn(Txn::new().when([Compare::value(missing.as_str(), CompareOp::NotEqual, "x")])).await.unwrap();
    assert!(!r.succeeded());
    // Ranged VALUE compare over the prefix ("cmp" and "cmp-other"): every key must match.
    let r = env
        .via
        .txn(Txn::new().when([Compare::value(env.wf_key("cmp"), CompareOp::Greater, "0").with_prefix()]))
        .await
        .unwrap();
    assert!(r.succeeded());
    let r = env
        .via
        .txn(Txn::new().when([Compare::value(env.wf_key("cmp"), CompareOp::Greater, "{").with_prefix()]))
        .await
        .unwrap();
    assert!(!r.succeeded(), "\"then\"/\"else\" are not greater than \"{{\"");
    // The response header is etcd's: same revision as a direct read right after.
    let h = r.header().unwrap().revision();
    assert_eq!(env.direct.get("x", None).await.unwrap().header().unwrap().revision(), h);
}

async fn too_large_for_etcd_but_fits_compressed(mut env: Env) {
    let big = etcd_squeeze::corpus::standard_set(3)
        .into_iter()
        .filter(|o| o.json.len() > 1_700_000)
        .min_by_key(|o| o.json.len())
        .expect("the standard set has an object over 1.7 MB");
    let key = env.wf_key("big");
    let err = env.direct.put(key.as_str(), big.json.clone(), None).await.unwrap_err();
    assert!(err.to_string().contains("request is too large") || err.to_string().contains("larger than max"), "{err}");
    let mut kv = env.via.kv_client().max_encoding_message_size(64 << 20).max_decoding_message_size(64 << 20);
    kv.put(key.as_str(), big.json.clone(), None).await.unwrap();
    let got = kv.get(key.as_str(), None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), &big.json[..]);
    assert!(stored(&mut env, &key).await.len() < 1_500_000);
}

async fn incompressible_oversize_gets_etcds_own_error(mut env: Env) {
    use rand::{RngCore, SeedableRng};
    let mut noise = vec![0u8; 1_800_000];
    rand_chacha::ChaCha8Rng::seed_from_u64(9).fill_bytes(&mut noise);
    let key = env.wf_key("noise");
    let direct = env.direct.put(key.as_str(), noise.clone(), None).await.unwrap_err();
    let via = env.via.put(key.as_str(), noise, None).await.unwrap_err();
    let (etcd_client::Error::GRpcStatus(d), etcd_client::Error::GRpcStatus(v)) = (direct, via) else { panic!("not statuses") };
    assert_eq!((v.code(), v.message()), (d.code(), d.message()));
    assert_eq!(v.message(), "etcdserver: request is too large");
}

async fn user_bytes_with_the_magic(mut env: Env) {
    let key = env.wf_key("magic");
    let mut v = frame::MAGIC.to_vec();
    v.extend_from_slice(b"\x01\x01\x00\x00\x00\x00not a zstd frame");
    env.via.put(key.as_str(), v.clone(), None).await.unwrap();
    assert_eq!(get(&mut env.via, &key).await.unwrap().value(), &v[..]);
    assert_ne!(stored(&mut env, &key).await, v, "wrapped in a raw frame");
}

async fn corrupt_frame_is_passed_on_as_stored_and_proxy_keeps_serving(mut env: Env) {
    let obj = &objects()[3];
    let key = env.wf_key("corrupt");
    env.via.put(key.as_str(), obj.json.clone(), None).await.unwrap();
    let mut raw = stored(&mut env, &key).await;
    let mid = raw.len() / 2;
    raw[mid] ^= 0xA5;
    env.direct.put(key.as_str(), raw.clone(), None).await.unwrap();
    let errors = crate::harness::decode_errors_total(&env.proxy.metrics_url).await;
    // What etcd holds, as etcd would answer: only this object is affected (its frame magic
    // parses as neither JSON nor protobuf, so kube-apiserver's decoder names it).
    assert_eq!(get(&mut env.via, &key).await.unwrap().value(), &raw[..]);
    assert!(crate::harness::decode_errors_total(&env.proxy.metrics_url).await > errors, "counted in etcd_squeeze_decode_errors_total");
    // The proxy keeps serving other keys.
    let ok = env.wf_key("fine");
    env.via.put(ok.as_str(), obj.json.clone(), None).await.unwrap();
    assert_eq!(get(&mut env.via, &ok).await.unwrap().value(), &obj.json[..]);
}

async fn keys_outside_prefix_are_byte_identical(mut env: Env) {
    if env.compresses_everything() {
        return;
    }
    let obj = &objects()[4];
    for key in ["/registry/configmaps/default/cm", "compact_rev_key", "/registry/flyte.lyft.com/flyteworkflowsX/a"] {
        env.via.put(key, obj.json.clone(), None).await.unwrap();
        assert_eq!(stored(&mut env, key).await, obj.json, "{key}");
    }
}

async fn concurrent_writers_lose_no_update(env: Env) {
    let key = env.wf_key("counter");
    let base = String::from_utf8(objects()[0].json.clone()).unwrap();
    let mut c = env.via.clone();
    create(&mut c, &key, format!("0|{base}").as_bytes()).await;
    const WRITERS: usize = 8;
    const EACH: usize = 10;
    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let mut c = env.via.clone();
        let key = key.clone();
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0;
            for _ in 0..EACH {
                loop {
                    let kv = get(&mut c, &key).await.unwrap();
                    let v = String::from_utf8(kv.value().to_vec()).unwrap();
                    let n: usize = v.split('|').next().unwrap().parse().unwrap();
                    match update(&mut c, &key, kv.mod_revision(), format!("{}|{base}", n + 1).as_bytes()).await {
                        Ok(_) => break,
                        Err(_) => conflicts += 1,
                    }
                }
            }
            conflicts
        }));
    }
    let mut conflicts = 0;
    for t in tasks {
        conflicts += t.await.unwrap();
    }
    let mut c = env.via.clone();
    let v = String::from_utf8(get(&mut c, &key).await.unwrap().value().to_vec()).unwrap();
    assert_eq!(v.split('|').next().unwrap(), (WRITERS * EACH).to_string(), "conflicts seen: {conflicts}");
}

async fn real_corpus_round_trips(mut env: Env) {
    let Some(dir) = crate::harness::shared_corpus() else {
        if std::env::var_os("ETCD_SQUEEZE_REQUIRE_CORPUS").is_some() {
            panic!("ETCD_SQUEEZE_REQUIRE_CORPUS is set but ../shared/corpus (or ETCD_SQUEEZE_CORPUS) is missing");
        }
        crate::harness::skip_unless_ci("real_corpus_round_trips", "../shared/corpus not found (set ETCD_SQUEEZE_CORPUS=DIR); real samples not round-tripped");
        return;
    };
    let files = etcd_squeeze::demo::json_files(&dir).unwrap();
    assert!(!files.is_empty(), "no .json under {}", dir.display());
    for (i, path) in files.iter().enumerate() {
        let bytes = std::fs::read(path).unwrap();
        let key = env.wf_key(&format!("real-{i}"));
        create(&mut env.via, &key, &bytes).await;
        assert_eq!(get(&mut env.via, &key).await.unwrap().value(), &bytes[..], "{}", path.display());
        assert!(frame::is_framed(&stored(&mut env, &key).await));
    }
}

async fn compaction_errors_match_etcd(mut env: Env) {
    let key = env.wf_key("compacted");
    let first = env.via.put(key.as_str(), objects()[0].json.clone(), None).await.unwrap().header().unwrap().revision();
    let last = env.via.put(key.as_str(), objects()[1].json.clone(), None).await.unwrap().header().unwrap().revision();
    env.via.compact(last, None).await.unwrap();
    for (what, opts) in [("compacted", GetOptions::new().with_revision(first)), ("future", GetOptions::new().with_revision(last + 100))] {
        let d = env.direct.get(key.as_str(), Some(opts.clone())).await.unwrap_err();
        let v = env.via.get(key.as_str(), Some(opts)).await.unwrap_err();
        let (etcd_client::Error::GRpcStatus(d), etcd_client::Error::GRpcStatus(v)) = (d, v) else { panic!("{what}") };
        assert_eq!((v.code(), v.message()), (d.code(), d.message()), "{what}");
    }
    assert_eq!(get(&mut env.via, &key).await.unwrap().value(), &objects()[1].json[..]);
}

async fn etcdctl_round_trip(mut env: Env) {
    let key = env.wf_key("ctl");
    let value = String::from_utf8(objects()[1].json.clone()).unwrap();
    let value = value.trim_end();
    env.etcdctl(&["put", &key, value], None);
    assert_eq!(env.etcdctl(&["get", &key, "--print-value-only"], None).trim_end(), value);
    assert!(frame::is_framed(&stored(&mut env, &key).await));
    let out = env.etcdctl(&["txn"], Some(&format!("mod(\"{key}\") > \"0\"\n\nget {key}\n\n\n")));
    assert!(out.starts_with("SUCCESS"), "{out}");
    assert!(out.contains(value));
    let status = env.etcdctl(&["endpoint", "status", "-w", "json"], None);
    let direct = crate::harness::etcdctl(&env.etcd.url, &["endpoint", "status", "-w", "json"], None);
    let version = |s: &str| s.split("\"version\":\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    assert_eq!(version(&status), version(&direct), "Maintenance.Status.version is etcd's own");
    env.etcdctl(&["del", &key], None);
    assert_eq!(env.etcdctl(&["get", &key], None), "");
}

async fn sort_by_value_uses_logical_values(mut env: Env) {
    let prefix = env.wf_key("sorted/");
    let values: [&[u8]; 4] = [b"z", &[b'a'; 400], b"m", b"{\"b\":1}"];
    for (i, v) in values.iter().enumerate() {
        env.via.put(format!("{prefix}{i}"), v.to_vec(), None).await.unwrap();
    }
    let mut logical: Vec<Vec<u8>> = values.iter().map(|v| v.to_vec()).collect();
    logical.sort();
    for (order, limit) in [(SortOrder::Ascend, 0), (SortOrder::Descend, 0), (SortOrder::Ascend, 2), (SortOrder::Descend, 1)] {
        let opts = GetOptions::new().with_prefix().with_sort(SortTarget::Value, order).with_limit(limit);
        let r = env.via.get(prefix.as_str(), Some(opts)).await.unwrap();
        let got: Vec<Vec<u8>> = r.kvs().iter().map(|kv| kv.value().to_vec()).collect();
        let mut want = logical.clone();
        if order == SortOrder::Descend {
            want.reverse();
        }
        if limit > 0 {
            want.truncate(limit as usize);
        }
        assert_eq!(got, want, "{order:?} limit {limit}");
        assert_eq!(r.count(), 4);
        assert_eq!(r.more(), limit > 0);
    }
}

async fn prev_kv_that_cannot_be_decoded_never_fails_the_write(mut env: Env) {
    let key = env.wf_key("applied");
    env.via.put(key.as_str(), objects()[3].json.clone(), None).await.unwrap();
    let mut raw = stored(&mut env, &key).await;
    let mid = raw.len() / 2;
    raw[mid] ^= 0x33;
    env.direct.put(key.as_str(), raw.clone(), None).await.unwrap();
    // A committed write is reported as committed; its prev_kv is what etcd holds.
    let put = env.via.put(key.as_str(), "{\"new\":1}", Some(PutOptions::new().with_prev_key())).await.unwrap();
    assert_eq!(put.prev_key().unwrap().value(), &raw[..]);
    assert_eq!(get(&mut env.via, &key).await.unwrap().value(), b"{\"new\":1}");
    // The same for a delete with prev_kv, and a Txn that writes.
    env.direct.put(key.as_str(), raw.clone(), None).await.unwrap();
    let deleted = env.via.delete(key.as_str(), Some(DeleteOptions::new().with_prev_key())).await.unwrap();
    assert_eq!((deleted.deleted(), deleted.prev_kvs()[0].value()), (1, &raw[..]));
    env.direct.put(key.as_str(), raw.clone(), None).await.unwrap();
    let txn = Txn::new().and_then([TxnOp::get(key.as_str(), None), TxnOp::put(key.as_str(), "{\"txn\":1}", Some(PutOptions::new().with_prev_key()))]);
    let r = env.via.txn(txn).await.unwrap();
    assert!(r.succeeded());
    let TxnOpResponse::Get(read) = &r.op_responses()[0] else { panic!("{:?}", r.op_responses()) };
    assert_eq!(read.kvs()[0].value(), &raw[..]);
    assert_eq!(get(&mut env.via, &key).await.unwrap().value(), b"{\"txn\":1}");
}

async fn value_compare_over_too_many_keys_is_refused_clearly(mut env: Env) {
    let prefix = env.wf_key("many/");
    let ops: Vec<TxnOp> = (0..100).map(|i| TxnOp::put(format!("{prefix}a{i:03}"), "{}", None)).collect();
    env.via.txn(Txn::new().and_then(ops)).await.unwrap();
    let ops: Vec<TxnOp> = (0..40).map(|i| TxnOp::put(format!("{prefix}b{i:03}"), "{}", None)).collect();
    env.via.txn(Txn::new().and_then(ops)).await.unwrap();
    let err = env.via.txn(Txn::new().when([Compare::value(prefix.as_str(), CompareOp::Equal, "{}").with_prefix()])).await.unwrap_err();
    let etcd_client::Error::GRpcStatus(s) = err else { panic!("{err}") };
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    assert!(s.message().contains("limits.max_txn_ops"), "{}", s.message());
}
