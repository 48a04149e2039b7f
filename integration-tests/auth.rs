//! etcd's authentication through the proxy: the client's token (metadata `token`) is forwarded.

use crate::harness::Env;

crate::suite!(auth_token_is_forwarded);

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
