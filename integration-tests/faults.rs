//! Fault injection with real processes: etcd killed and restarted, the proxy killed and
//! restarted, a three-member cluster losing a member and then its leader, a stalled (SIGSTOP)
//! etcd. Graceful shutdown under load is `ops::sigterm_ends_streams_drains_unary_calls_and_exits_zero`.
//!
//! Every load test runs 8 GuaranteedUpdate writers (two per key, so that they conflict) and three
//! watchers through the proxy, then checks with [`crate::history`]: every acknowledged write is in
//! etcd's history with its value, and every watcher's record is gap-free, duplicate-free,
//! atomic, with correct `prev_kv`, and equal to a direct-etcd watch of the same history.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::GetOptions;
use etcd_squeeze::codec::ValueCodec;
use etcd_squeeze::config::{Config, PrefixConfig};
use etcd_squeeze::proto::etcdserverpb::kv_client::KvClient;
use etcd_squeeze::proto::etcdserverpb::RangeRequest;

use crate::harness::{eventually, free_port, rss_kib, Etcd, ProxyConfig, FLYTE};
use crate::history::{self, Ack};
use crate::ops::{Binary, BinaryConfig};

const WRITERS: usize = 8;
/// These tests compare with a direct watch of etcd decoded by [`flyte_codec`], which reads
/// per-object frames: delta frames off (`crate::robustness` runs the faults with them on).
const PER_OBJECT: &str = "[[prefixes]]\nprefix = \"/registry/flyte.lyft.com/flyteworkflows/\"\ndelta = false\n";
const WATCHERS: usize = 3;

/// The codec of a proxy compressing [`FLYTE`] with defaults (to decode what etcd stores).
fn flyte_codec() -> ValueCodec {
    ValueCodec::from_config(&Config { prefixes: vec![PrefixConfig::new(FLYTE)], ..Config::default() })
}

/// Writers and watchers running through the proxy at `url`.
struct Load {
    stop: Arc<AtomicBool>,
    until: Arc<AtomicI64>,
    writers: Vec<tokio::task::JoinHandle<(Vec<Ack>, usize)>>,
    watchers: Vec<(Arc<tokio::sync::Mutex<history::Record>>, tokio::task::JoinHandle<()>)>,
    prefix: String,
}

impl Load {
    /// Starts [`WRITERS`] writers over `WRITERS / 2` keys and [`WATCHERS`] watchers from revision 1.
    fn start(url: &str, test: &str) -> Load {
        let prefix = format!("{FLYTE}{test}/");
        let stop = Arc::new(AtomicBool::new(false));
        let until = Arc::new(AtomicI64::new(0));
        let deadline = Instant::now() + Duration::from_secs(60);
        let writers = (0..WRITERS)
            .map(|w| tokio::spawn(history::guaranteed_updates(url.to_string(), format!("{prefix}wf-{}", w / 2), w, stop.clone())))
            .collect();
        let watchers = (0..WATCHERS).map(|_| history::spawn_watcher(url.to_string(), prefix.clone(), 1, until.clone(), deadline)).collect();
        Load { stop, until, writers, watchers, prefix }
    }

    /// Stops the writers, lets the watchers catch up, checks everything against a direct watch of
    /// etcd at `direct_url`. Returns the acknowledged writes and the watchers' resumptions.
    async fn finish(self, direct_url: &str) -> (Vec<Ack>, usize) {
        self.stop.store(true, Ordering::SeqCst);
        let mut acks = Vec::new();
        let mut errors = 0;
        for w in self.writers {
            let (a, e) = w.await.unwrap();
            acks.extend(a);
            errors += e;
        }
        let mut direct = etcd_client::Client::connect([direct_url], None).await.unwrap();
        let last = direct.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix())).await.unwrap();
        let until = last.kvs().iter().map(|kv| kv.mod_revision()).max().unwrap();
        self.until.store(until, Ordering::SeqCst);
        let codec = flyte_codec();
        let reference = history::direct_history(direct_url, &self.prefix, until, &codec).await;
        history::check_acks(&acks, &reference);
        // The final value of each key is its last event in the history.
        for kv in last.kvs() {
            let e = reference.iter().rev().find(|e| e.key == kv.key()).unwrap();
            assert_eq!(&codec.decode(kv.key(), &bytes::Bytes::copy_from_slice(kv.value())).unwrap()[..], &e.value[..]);
        }
        let mut resumptions = 0;
        for (i, (record, task)) in self.watchers.into_iter().enumerate() {
            task.await.unwrap();
            let record = record.lock().await;
            history::check(&format!("watcher {i}"), &record, &reference);
            resumptions += record.resumptions;
        }
        eprintln!("{} acknowledged writes, {errors} write errors, {} events, {resumptions} watch resumptions", acks.len(), reference.len());
        (acks, resumptions)
    }
}

/// etcd SIGKILLed and restarted on the same data directory and ports under load: no
/// acknowledged write lost, every watcher gap-free (resuming after its error), writes resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_and_restarted_under_load() {
    let mut etcd = Etcd::start().await;
    let proxy = ProxyConfig::new(&etcd.url).prefix(FLYTE).delta(false).start().await;
    let load = Load::start(&proxy.url, "etcd-kill");
    tokio::time::sleep(Duration::from_secs(2)).await;
    etcd.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    etcd.restart().await;
    let mut direct = etcd.client().await;
    let restarted_at = direct.get("x", None).await.unwrap().header().unwrap().revision();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Either outcome is etcd's contract: a watcher sees a gap-free sequence, or an error after
    // which it resumes (the proxy ends the watch with UNAVAILABLE when etcd goes away).
    let (acks, _resumptions) = load.finish(&etcd.url).await;
    assert!(acks.iter().any(|a| a.revision > restarted_at), "writes resumed after the restart");
}

/// The proxy (the real binary) SIGKILLed and restarted on the same port under load: clients
/// reconnect, no acknowledged write lost, watchers resume without gaps, and every stored value
/// under the prefix is a whole frame that decodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_killed_and_restarted_under_load() {
    let etcd = Etcd::start().await;
    let config = || BinaryConfig { listen_ip: "127.0.0.1", upstream: &etcd.url, server: "", more: PER_OBJECT };
    let proxy = Binary::start(config()).await;
    let (port, metrics) = (proxy.port, proxy.metrics_url.rsplit(':').next().unwrap().parse().unwrap());
    let load = Load::start(&proxy.url, "proxy-kill");
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(proxy); // SIGKILL
    let mut direct = etcd.client().await;
    let killed_at = direct.get("x", None).await.unwrap().header().unwrap().revision();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _proxy = Binary::start_on(config(), port, metrics).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let prefix = load.prefix.clone();
    let (acks, resumptions) = load.finish(&etcd.url).await;
    assert!(acks.iter().any(|a| a.revision > killed_at), "clients reconnected and wrote again");
    assert!(resumptions >= WATCHERS, "every watcher lost its stream, then resumed");
    let codec = flyte_codec();
    let stored = direct.get(prefix.as_str(), Some(GetOptions::new().with_prefix())).await.unwrap();
    for kv in stored.kvs() {
        assert!(etcd_squeeze::codec::frame::is_framed(kv.value()));
        codec.decode(kv.key(), &bytes::Bytes::copy_from_slice(kv.value())).expect("every stored frame is whole");
    }
}

/// Timed watch progress notifications every 500 ms (bookmarks for [`crate::robustness`]).
pub(crate) const PROGRESS_NOTIFY: &str = "--experimental-watch-progress-notify-interval=500ms";

/// A member of a three-member loopback cluster.
pub(crate) struct Member {
    name: String,
    pub url: String,
    peer_url: String,
    cluster: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Member {
    pub fn spawn(&mut self, state: &str) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("etcd.log")).unwrap();
        let child = Command::new(std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into()))
            .args(["--name", &self.name, "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &self.url, "--advertise-client-urls", &self.url])
            .args(["--listen-peer-urls", &self.peer_url, "--initial-advertise-peer-urls", &self.peer_url])
            .args(["--initial-cluster", &self.cluster, "--initial-cluster-state", state, "--initial-cluster-token", "faults"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .arg(PROGRESS_NOTIFY)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd");
        self.child = Some(child);
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts three members on loopback and waits for a leader.
pub(crate) async fn cluster() -> Vec<Member> {
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let cluster = ports.iter().enumerate().map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
    let mut members: Vec<Member> = ports
        .iter()
        .enumerate()
        .map(|(i, (c, p))| Member {
            name: format!("m{i}"),
            url: format!("http://127.0.0.1:{c}"),
            peer_url: format!("http://127.0.0.1:{p}"),
            cluster: cluster.clone(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        })
        .collect();
    for m in &mut members {
        m.spawn("new");
    }
    let url = members[0].url.clone();
    eventually(Duration::from_secs(20), "the cluster to elect a leader", || async {
        match etcd_client::Client::connect([&url], None).await {
            Ok(mut c) => c.put("probe", "1", None).await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    members
}

/// The index of the leader.
pub(crate) async fn leader(members: &[Member]) -> usize {
    for m in members.iter().filter(|m| m.child.is_some()) {
        if let Ok(mut c) = etcd_client::Client::connect([&m.url], None).await {
            if let Ok(s) = c.status().await {
                let id = s.leader();
                for (i, n) in members.iter().enumerate() {
                    let Ok(mut c) = etcd_client::Client::connect([&n.url], None).await else { continue };
                    if c.status().await.is_ok_and(|s| s.header().unwrap().member_id() == id) {
                        return i;
                    }
                }
            }
        }
    }
    panic!("no leader");
}

/// `n` puts in a row through `via`, each retried for at most `within`; panics if one never
/// succeeds, or fails with another code than etcd's clients see when they lose a member
/// (UNAVAILABLE, DEADLINE_EXCEEDED) — never UNKNOWN.
async fn writes_succeed(via: &mut etcd_client::Client, what: &str, n: usize, within: Duration) {
    for i in 0..n {
        let deadline = Instant::now() + within;
        loop {
            let put = tokio::time::timeout(Duration::from_secs(2), via.put(format!("{FLYTE}cluster/{what}-{i}"), "{\"spec\":{}}".repeat(30), None)).await;
            if matches!(put, Ok(Ok(_))) {
                break;
            }
            if let Ok(Err(etcd_client::Error::GRpcStatus(status))) = &put {
                assert!(
                    matches!(status.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded),
                    "{what}: write {i} failed with {status:?}"
                );
            }
            assert!(Instant::now() < deadline, "{what}: write {i} still failing after {within:?}: {put:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A three-member cluster behind the proxy (`upstream.endpoints` = all three): a stopped
/// follower is skipped, a stopped leader costs only the election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_member_cluster_loses_a_follower_then_the_leader() {
    let mut members = cluster().await;
    let proxy = ProxyConfig::endpoints(members.iter().map(|m| &m.url))
        .connect_timeout(Duration::from_secs(1))
        .probe(Duration::from_millis(500), Duration::from_millis(500))
        .prefix(FLYTE)
        .start()
        .await;
    let mut via = proxy.client().await;
    writes_succeed(&mut via, "healthy", 10, Duration::from_secs(5)).await;

    let lead = leader(&members).await;
    let follower = (lead + 1) % 3;
    members[follower].kill();
    let t = Instant::now();
    writes_succeed(&mut via, "follower-down", 30, Duration::from_secs(3)).await;
    eprintln!("follower down: 30 writes in {:?}", t.elapsed());
    members[follower].spawn("existing");

    // Wait for the follower to be back in the quorum, then stop the leader.
    let url = members[follower].url.clone();
    eventually(Duration::from_secs(20), "the follower to rejoin", || async {
        match etcd_client::Client::connect([&url], None).await {
            Ok(mut c) => c.get("probe", None).await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    let lead = leader(&members).await;
    members[lead].kill();
    let t = Instant::now();
    writes_succeed(&mut via, "leader-down", 30, Duration::from_secs(15)).await;
    eprintln!("leader down: 30 writes in {:?}", t.elapsed());
    let new_leader = leader(&members).await;
    assert_ne!(new_leader, lead);
    let got = via.get(format!("{FLYTE}cluster/"), Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap();
    assert_eq!(got.count(), 70);
}

/// A stalled etcd (SIGSTOP): calls carrying a client deadline fail within it (DEADLINE_EXCEEDED), hundreds of stuck calls leave the proxy's memory bounded, and SIGCONT recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_etcd_times_out_within_the_deadline_and_recovers() {
    let etcd = Etcd::start().await;
    let proxy = Binary::start(BinaryConfig { listen_ip: "127.0.0.1", upstream: &etcd.url, server: "", more: "" }).await;
    let mut via = etcd_client::Client::connect([proxy.url.as_str()], None).await.unwrap();
    via.put(format!("{FLYTE}ns/stall"), "{\"a\":1}".repeat(100), None).await.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(proxy.url.clone()).unwrap().connect().await.unwrap();
    let range = |deadline: Duration| {
        let mut kv = KvClient::new(channel.clone());
        async move {
            let mut req = tonic::Request::new(RangeRequest { key: format!("{FLYTE}ns/stall").into_bytes().into(), ..Default::default() });
            req.set_timeout(deadline);
            let t = Instant::now();
            let r = tokio::time::timeout(deadline * 5, kv.range(req)).await;
            (r, t.elapsed())
        }
    };
    // Warm up, then measure the baseline.
    for _ in 0..50 {
        range(Duration::from_secs(2)).await.0.unwrap().unwrap();
    }
    let before = rss_kib(proxy.child.id());

    etcd.freeze(true);
    let deadline = Duration::from_millis(1000);
    let calls: Vec<_> = (0..500).map(|_| tokio::spawn(range(deadline))).collect();
    for c in calls {
        let (r, took) = c.await.unwrap();
        let status = r.expect("the proxy answers within 5x the deadline").expect_err("etcd is stalled");
        // The proxy answers DEADLINE_EXCEEDED just before the deadline (unit test in
        // src/server/deadline.rs); tonic's client enforces the same deadline itself and may
        // get there first, with its own CANCELLED "Timeout expired".
        let own_timer = status.code() == tonic::Code::Cancelled && status.message() == "Timeout expired";
        assert!(
            own_timer || matches!(status.code(), tonic::Code::DeadlineExceeded | tonic::Code::Unavailable),
            "etcd-like status, not {status:?}"
        );
        assert!(took < deadline + Duration::from_millis(1500), "answered after {took:?}");
    }
    let during = rss_kib(proxy.child.id());
    eprintln!("proxy RSS: {before} KiB before, {during} KiB after 500 stalled calls");
    assert!(during < before + 64 * 1024, "RSS grew from {before} KiB to {during} KiB");

    etcd.freeze(false);
    let t = Instant::now();
    eventually(Duration::from_secs(10), "the proxy to serve again", || async {
        matches!(range(Duration::from_secs(2)).await.0, Ok(Ok(_)))
    })
    .await;
    eprintln!("recovered {:?} after SIGCONT", t.elapsed());
}
