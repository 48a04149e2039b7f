//! Linearizable under faults, checked the way etcd checks itself (its robustness suite).
//!
//! A recorder runs [`CLIENTS`] kube-apiserver-shaped clients through **two etcd-squeeze replicas**
//! on one etcd, with delta frames on for the FlyteWorkflow prefix: create Txns on
//! `create_revision == 0`, GuaranteedUpdates (Range, then a Txn on `mod_revision` whose else
//! branch reads the key, retried once from that read), Gets, lists paginated at a pinned revision,
//! delete Txns on `mod_revision` (with prev_kv), Txns comparing VALUE, top-level Puts (some with
//! prev_kv), Puts on leases and LeaseRevokes. FlyteWorkflow keys get realistic objects from the
//! generator; other keys get small values; every written value is unique. Every call is
//! recorded with its send and answer times and its full answer; a timeout or an error that
//! does not prove the call was refused is an *unknown outcome*, as porcupine records it.
//! Watchers (one per replica, asking for progress notifications; a slow one in the compaction
//! run) record every response.
//!
//! Then [`crate::linearizability::check`] proves the history linearizable on etcd's model (or
//! names the first call no order explains), every watcher is checked against the linearization
//! for etcd's watch guarantees ([`crate::history::check_with_model`]), and every value a client
//! was shown must be one some client wrote.
//!
//! Each fault runs here in a short form (a few seconds of traffic each); `scripts/robustness`
//! runs them longer (`SQUEEZE_ROBUSTNESS_SECONDS`). Each run appends its row to
//! `target/tmp/robustness.md`, which `scripts/test` and `scripts/robustness` print.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Compare as EtcdCompare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use etcd_squeeze::config::Config;
use etcd_squeeze::corpus::{consecutive_writes, Scenario, Topology};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::faults::{cluster, leader, PROGRESS_NOTIFY};
use crate::harness::{Etcd, Proxy, ProxyConfig, FLYTE};
use crate::history::{self, Record, WatchMode};
use crate::linearizability::{self as lin, hash, Call, Cmp, Compare, Entry, Kv, Operation, Outcome, Request, Response, Target};
use crate::ops::{Binary, BinaryConfig};

/// Clients per run (split over the two replicas).
const CLIENTS: usize = 6;
/// A call's deadline: longer than a healthy call takes on a loaded machine, shorter than the
/// stall fault.
const DEADLINE: Duration = Duration::from_secs(2);

/// Seconds of traffic per fault: `SQUEEZE_ROBUSTNESS_SECONDS`, or 8 in the default suite.
fn seconds() -> u64 {
    std::env::var("SQUEEZE_ROBUSTNESS_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(8)
}

/// The proxy configuration under test: delta frames on for the FlyteWorkflow prefix, every
/// other setting its default (trained dictionaries on: their publication is a writer the
/// clients cannot see). `SQUEEZE_ROBUSTNESS_CONFIG=default` runs the defaults instead (the
/// FlyteWorkflow prefix with `delta = "auto"`: delta frames once both replicas announced).
fn proxy_config(endpoints: &[String]) -> Config {
    let base = ProxyConfig::endpoints(endpoints).connect_timeout(Duration::from_secs(1)).probe(Duration::from_millis(500), Duration::from_millis(500));
    match std::env::var("SQUEEZE_ROBUSTNESS_CONFIG").as_deref() {
        Ok("default") => base.build(),
        _ => base.prefix(FLYTE).delta(true).build(),
    }
}

/// The same as a config file section for the real binary.
const BINARY_PREFIXES: &str = "[[prefixes]]\nprefix = \"/registry/flyte.lyft.com/flyteworkflows/\"\ndelta = true\n";

fn config_name() -> &'static str {
    match std::env::var("SQUEEZE_ROBUSTNESS_CONFIG").as_deref() {
        Ok("default") => "default (delta \"auto\")",
        _ => "delta frames on",
    }
}

/// A tiny deterministic generator (splitmix64): the workload needs no statistics.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The end of the range of every key starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    end
}

/// The keys and values of one run.
struct Keys {
    flyte_prefix: String,
    small_prefix: String,
    flyte: Vec<String>,
    small: Vec<String>,
    /// Successive versions of a realistic FlyteWorkflow; each write takes the next and makes it
    /// unique.
    objects: Vec<Vec<u8>>,
}

impl Keys {
    fn new(test: &str) -> Keys {
        let flyte_prefix = format!("{FLYTE}{test}/");
        let small_prefix = format!("/registry/robustness/{test}/");
        let objects = consecutive_writes(&Scenario::new(Topology::Dynamic { children: 300 }, 50, 40), 40, 5).into_iter().map(|g| g.json).collect();
        Keys {
            flyte: (0..3).map(|i| format!("{flyte_prefix}wf-{i}")).collect(),
            small: (0..3).map(|i| format!("{small_prefix}k-{i}")).collect(),
            flyte_prefix,
            small_prefix,
            objects,
        }
    }

    /// A unique value for `key`: a FlyteWorkflow object with a marker field, or a small string.
    fn value(&self, key: &str, client: usize, n: usize) -> Vec<u8> {
        if key.starts_with(FLYTE) {
            let object = &self.objects[n % self.objects.len()];
            let mut v = format!("{{\"robustness\":\"c{client}-{n}\",").into_bytes();
            v.extend_from_slice(&object[1..]);
            v
        } else {
            format!("small-c{client}-{n}").into_bytes()
        }
    }
}

/// Every call of every client, with times relative to `start`.
struct Recorder {
    start: Instant,
    ops: Mutex<Vec<Operation>>,
}

fn entry(kv: &etcd_client::KeyValue) -> Entry {
    (kv.key().to_vec(), Kv { value: hash(kv.value()), create_revision: kv.create_revision(), mod_revision: kv.mod_revision(), version: kv.version(), lease: kv.lease() })
}

fn range_response(g: &etcd_client::GetResponse) -> Response {
    Response::Range { kvs: g.kvs().iter().map(entry).collect(), count: g.count(), more: g.more() }
}

fn revision_of(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.map_or(0, |h| h.revision())
}

/// What an error says about a call: refused (nothing happened) or unknown (it may have been
/// applied). Reads are never unknown: they change nothing either way.
fn outcome_of_error(e: &etcd_client::Error, writes: bool) -> Outcome {
    use tonic::Code;
    let refused = matches!(e, etcd_client::Error::GRpcStatus(s) if matches!(
        s.code(),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange | Code::NotFound | Code::PermissionDenied | Code::AlreadyExists | Code::ResourceExhausted
    ));
    if refused || !writes {
        Outcome::Failed
    } else {
        Outcome::Unknown
    }
}

/// One client's connection and recorder.
struct Session {
    id: usize,
    client: etcd_client::Client,
    rec: Arc<Recorder>,
}

/// A Txn op built for both sides: the model's request and etcd-client's op.
type Both = (Request, TxnOp);

fn get_op(key: &str) -> Both {
    (Request::Range { key: key.into(), range_end: Vec::new(), revision: 0, limit: 0 }, TxnOp::get(key, None))
}

fn put_op(key: &str, value: &[u8]) -> Both {
    (Request::Put { key: key.into(), value: hash(value), lease: 0, prev_kv: false }, TxnOp::put(key, value.to_vec(), None))
}

fn delete_op(key: &str) -> Both {
    (Request::Delete { key: key.into(), range_end: Vec::new(), prev_kv: true }, TxnOp::delete(key, Some(DeleteOptions::new().with_prev_key())))
}

impl Session {
    fn record(&self, invoke: u64, call: Call, outcome: Outcome) {
        let ret = if matches!(outcome, Outcome::Unknown) { u64::MAX } else { self.rec.start.elapsed().as_nanos() as u64 };
        self.rec.ops.lock().unwrap().push(Operation { client: self.id, invoke, ret, call, outcome });
    }

    fn now(&self) -> u64 {
        self.rec.start.elapsed().as_nanos() as u64
    }

    /// A Txn, recorded; etcd's answer when there is one.
    async fn txn(&mut self, compare: Vec<(Compare, EtcdCompare)>, success: Vec<Both>, failure: Vec<Both>) -> Option<etcd_client::TxnResponse> {
        let (mc, ec): (Vec<_>, Vec<_>) = compare.into_iter().unzip();
        let (ms, es): (Vec<_>, Vec<_>) = success.into_iter().unzip();
        let (mf, ef): (Vec<_>, Vec<_>) = failure.into_iter().unzip();
        let call = Call::Txn { compare: mc, success: ms, failure: mf };
        let invoke = self.now();
        let answer = tokio::time::timeout(DEADLINE, self.client.txn(Txn::new().when(ec).and_then(es).or_else(ef))).await;
        match answer {
            Ok(Ok(resp)) => {
                let responses = resp
                    .op_responses()
                    .iter()
                    .map(|r| match r {
                        TxnOpResponse::Put(p) => Response::Put { prev: p.prev_key().map(|kv| entry(kv).1) },
                        TxnOpResponse::Get(g) => range_response(g),
                        TxnOpResponse::Delete(d) => Response::Delete { deleted: d.deleted(), prev: d.prev_kvs().iter().map(entry).collect() },
                        TxnOpResponse::Txn(_) => unreachable!("the workload nests no Txn"),
                    })
                    .collect();
                self.record(invoke, call, Outcome::Ok { revision: revision_of(resp.header()), succeeded: resp.succeeded(), responses });
                Some(resp)
            }
            Ok(Err(e)) => {
                self.record(invoke, call, outcome_of_error(&e, true));
                None
            }
            Err(_) => {
                self.record(invoke, call, Outcome::Unknown);
                None
            }
        }
    }

    /// A Range, recorded; etcd's answer when there is one.
    async fn range(&mut self, key: &str, range_end: Vec<u8>, revision: i64, limit: i64) -> Option<etcd_client::GetResponse> {
        let call = Call::Txn { compare: Vec::new(), success: vec![Request::Range { key: key.into(), range_end: range_end.clone(), revision, limit }], failure: Vec::new() };
        let mut opts = GetOptions::new().with_revision(revision).with_limit(limit);
        if !range_end.is_empty() {
            opts = opts.with_range(range_end);
        }
        let invoke = self.now();
        match tokio::time::timeout(DEADLINE, self.client.get(key, Some(opts))).await {
            Ok(Ok(resp)) => {
                self.record(invoke, call, Outcome::Ok { revision: revision_of(resp.header()), succeeded: true, responses: vec![range_response(&resp)] });
                Some(resp)
            }
            _ => {
                self.record(invoke, call, Outcome::Failed);
                None
            }
        }
    }

    /// A top-level Put, recorded.
    async fn put(&mut self, key: &str, value: Vec<u8>, lease: i64, prev_kv: bool) -> bool {
        let call = Call::Txn { compare: Vec::new(), success: vec![Request::Put { key: key.into(), value: hash(&value), lease, prev_kv }], failure: Vec::new() };
        let mut opts = PutOptions::new().with_lease(lease);
        if prev_kv {
            opts = opts.with_prev_key();
        }
        let invoke = self.now();
        let outcome = match tokio::time::timeout(DEADLINE, self.client.put(key, value, Some(opts))).await {
            Ok(Ok(resp)) => Outcome::Ok { revision: revision_of(resp.header()), succeeded: true, responses: vec![Response::Put { prev: resp.prev_key().map(|kv| entry(kv).1) }] },
            Ok(Err(e)) => outcome_of_error(&e, true),
            Err(_) => Outcome::Unknown,
        };
        let ok = matches!(outcome, Outcome::Ok { .. });
        self.record(invoke, call, outcome);
        ok
    }

    /// A LeaseRevoke, recorded.
    async fn revoke(&mut self, id: i64) {
        let invoke = self.now();
        let outcome = match tokio::time::timeout(DEADLINE, self.client.lease_revoke(id)).await {
            Ok(Ok(resp)) => Outcome::Ok { revision: revision_of(resp.header()), succeeded: true, responses: Vec::new() },
            Ok(Err(e)) => outcome_of_error(&e, true),
            Err(_) => Outcome::Unknown,
        };
        self.record(invoke, Call::LeaseRevoke(id), outcome);
    }

    /// kube-apiserver's GuaranteedUpdate: read, then a Txn on mod_revision whose else branch
    /// reads; one retry from that read.
    async fn guaranteed_update(&mut self, key: &str, value: &[u8]) {
        let Some(got) = self.range(key, Vec::new(), 0, 0).await else { return };
        let mut m = got.kvs().first().map_or(0, |kv| kv.mod_revision());
        for _ in 0..2 {
            let guard = (Compare { key: key.into(), cmp: Cmp::Equal, target: Target::Mod(m) }, EtcdCompare::mod_revision(key, CompareOp::Equal, m));
            let Some(resp) = self.txn(vec![guard], vec![put_op(key, value)], vec![get_op(key)]).await else { return };
            if resp.succeeded() {
                return;
            }
            m = match resp.op_responses().first() {
                Some(TxnOpResponse::Get(g)) => g.kvs().first().map_or(0, |kv| kv.mod_revision()),
                _ => return,
            };
        }
    }

    /// kube-apiserver's create: a Txn on `create_revision == 0`, reading the key otherwise.
    async fn create(&mut self, key: &str, value: &[u8]) {
        let guard = (Compare { key: key.into(), cmp: Cmp::Equal, target: Target::Create(0) }, EtcdCompare::create_revision(key, CompareOp::Equal, 0));
        self.txn(vec![guard], vec![put_op(key, value)], vec![get_op(key)]).await;
    }

    /// kube-apiserver's delete: read, then a Txn on mod_revision deleting with prev_kv.
    async fn delete(&mut self, key: &str) {
        let Some(got) = self.range(key, Vec::new(), 0, 0).await else { return };
        let Some(m) = got.kvs().first().map(|kv| kv.mod_revision()) else { return };
        let guard = (Compare { key: key.into(), cmp: Cmp::Equal, target: Target::Mod(m) }, EtcdCompare::mod_revision(key, CompareOp::Equal, m));
        self.txn(vec![guard], vec![delete_op(key)], vec![get_op(key)]).await;
    }

    /// A Txn comparing the key's VALUE with what a read returned (the proxy guards it).
    async fn value_swap(&mut self, key: &str, value: &[u8]) {
        let Some(got) = self.range(key, Vec::new(), 0, 0).await else { return };
        let Some(old) = got.kvs().first().map(|kv| kv.value().to_vec()) else { return };
        let guard = (Compare { key: key.into(), cmp: Cmp::Equal, target: Target::Value(hash(&old)) }, EtcdCompare::value(key, CompareOp::Equal, old));
        self.txn(vec![guard], vec![put_op(key, value)], vec![get_op(key)]).await;
    }

    /// A list of `prefix` two keys a page, every page after the first at the first's revision.
    async fn list(&mut self, prefix: &str) {
        let end = prefix_end(prefix);
        let Some(first) = self.range(prefix, end.clone(), 0, 2).await else { return };
        let pinned = revision_of(first.header());
        let (mut more, mut last) = (first.more(), first.kvs().last().map(|kv| kv.key().to_vec()));
        while more {
            let Some(from) = last.take() else { return };
            let mut key = from;
            key.push(0);
            let Ok(key) = String::from_utf8(key) else { return };
            let Some(page) = self.range(&key, end.clone(), pinned, 2).await else { return };
            more = page.more();
            last = page.kvs().last().map(|kv| kv.key().to_vec());
        }
    }
}

/// One client: a random mix of kube-apiserver's calls until `stop`.
async fn client_loop(id: usize, url: String, keys: Arc<Keys>, rec: Arc<Recorder>, stop: Arc<AtomicBool>) {
    let client = loop {
        match etcd_client::Client::connect([&url], None).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let mut s = Session { id, client, rec };
    let mut rng = Rng(0x5eed + id as u64);
    let mut leases: Vec<i64> = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let before = s.rec.ops.lock().unwrap().len();
        let flyte = rng.below(2) == 0;
        let key = if flyte { &keys.flyte[rng.below(keys.flyte.len())] } else { &keys.small[rng.below(keys.small.len())] };
        let key = key.clone();
        let value = keys.value(&key, id, n);
        match rng.below(100) {
            0..=29 => s.guaranteed_update(&key, &value).await,
            30..=39 => s.create(&key, &value).await,
            40..=51 => {
                s.range(&key, Vec::new(), 0, 0).await;
            }
            52..=61 => s.list(if flyte { &keys.flyte_prefix } else { &keys.small_prefix }).await,
            62..=69 => s.delete(&key).await,
            70..=76 => s.value_swap(&key, &value).await,
            77..=86 => {
                s.put(&key, value, 0, rng.below(2) == 0).await;
            }
            87..=95 => {
                let small = &keys.small[rng.below(keys.small.len())];
                let value = keys.value(small, id, n);
                if let Ok(Ok(lease)) = tokio::time::timeout(DEADLINE, s.client.lease_grant(300, None)).await {
                    leases.push(lease.id());
                    s.put(small, value, lease.id(), false).await;
                }
            }
            _ => {
                if !leases.is_empty() {
                    let id = leases.swap_remove(rng.below(leases.len()));
                    s.revoke(id).await;
                }
            }
        }
        // Back off while calls fail (the fault), so a dead etcd is not spun on.
        let failed = s.rec.ops.lock().unwrap()[before..].iter().any(|o| !matches!(o.outcome, Outcome::Ok { .. }));
        if failed {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A loopback TCP relay the test can blackhole: while paused, bytes already read are held and
/// nothing more is delivered either way (as a network dropping packets, which TCP retransmits
/// once it heals); connections stay open.
pub struct Relay {
    /// `http://127.0.0.1:PORT`, to give the proxy as its upstream.
    pub url: String,
    paused: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    /// A relay to `target` (`host:port`).
    pub async fn start(target: String) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (paused, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(&target).await else { continue };
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::spawn(Self::pipe(ri, wo, rx.clone()));
                tokio::spawn(Self::pipe(ro, wi, rx.clone()));
            }
        });
        Relay { url, paused }
    }

    async fn pipe(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, mut paused: tokio::sync::watch::Receiver<bool>) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => n,
            };
            while *paused.borrow_and_update() {
                if paused.changed().await.is_err() {
                    return;
                }
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    /// Blackholes (true) or heals (false) the network.
    pub fn blackhole(&self, on: bool) {
        self.paused.send_replace(on);
    }
}

/// One row of the robustness table.
#[derive(Debug)]
pub struct Row {
    pub fault: String,
    pub operations: usize,
    pub unknown: usize,
    pub watch_events: usize,
    pub linearizable: Result<String, String>,
    pub watch: Vec<String>,
    pub altered: usize,
}

impl Row {
    fn markdown(&self) -> String {
        let lin = match &self.linearizable {
            Ok(s) => format!("yes ({s})"),
            Err(e) => format!("**NO**: {e}"),
        };
        let watch = if self.watch.is_empty() { "all 6 hold".to_string() } else { format!("**{} violations**: {}", self.watch.len(), self.watch[0]) };
        format!("| {} | {} | {} | {} | {} | {} | {} | {} |", self.fault, config_name(), self.operations, self.unknown, self.watch_events, lin, watch, self.altered)
    }

    /// Prints the row, appends it to `target/tmp/robustness.md`, and fails the test on any
    /// violation.
    fn report(&self) {
        let line = self.markdown();
        eprintln!("{line}");
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("robustness.md");
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            use std::io::Write;
            let _ = writeln!(f, "{line}");
        }
        assert!(self.linearizable.is_ok() && self.watch.is_empty() && self.altered == 0, "{line}");
        assert!(self.operations > 50, "too few operations recorded: {line}");
    }
}

/// Runs the workload through `replicas` for [`seconds`], with `fault` started a third of the way
/// in (it returns once it is healed; what it returns is kept alive to the end), then checks
/// everything. `direct` reaches etcd without the proxy (start revision, compaction).
async fn run<F, T>(name: &str, replicas: [String; 2], direct: Vec<String>, lagging: bool, fault: F) -> Row
where
    F: Future<Output = T>,
{
    let total = Duration::from_secs(seconds());
    let test = name.replace(' ', "-");
    let keys = Arc::new(Keys::new(&test));
    let mut d = etcd_client::Client::connect(&direct, None).await.unwrap();
    let start = revision_of(d.get("x", None).await.unwrap().header());
    let rec = Arc::new(Recorder { start: Instant::now(), ops: Mutex::new(Vec::new()) });
    let stop = Arc::new(AtomicBool::new(false));
    let until = Arc::new(AtomicI64::new(0));
    let deadline = Instant::now() + total + Duration::from_secs(60);
    let mut watchers: Vec<(String, Arc<tokio::sync::Mutex<Record>>, tokio::task::JoinHandle<()>)> = Vec::new();
    for (i, url) in replicas.iter().enumerate() {
        let (r, t) = history::spawn_watcher_with(url.clone(), "/registry/".into(), start + 1, until.clone(), deadline, WatchMode { progress: true, ..WatchMode::default() });
        watchers.push((format!("watcher via replica {i}"), r, t));
    }
    if lagging {
        let slow = WatchMode { lag: Duration::from_millis(40), ..WatchMode::default() };
        let (r, t) = history::spawn_watcher_with(replicas[0].clone(), "/registry/".into(), start + 1, until.clone(), deadline, slow);
        watchers.push(("slow watcher".into(), r, t));
        // Opens halfway through the compactions, from the first revision: behind every one.
        let late = WatchMode { delay: total / 2, ..WatchMode::default() };
        let (r, t) = history::spawn_watcher_with(replicas[1].clone(), "/registry/".into(), start + 1, until.clone(), deadline, late);
        watchers.push(("late watcher".into(), r, t));
    }
    let clients: Vec<_> = (0..CLIENTS).map(|i| tokio::spawn(client_loop(i, replicas[i % 2].clone(), keys.clone(), rec.clone(), stop.clone()))).collect();
    tokio::time::sleep(total / 3).await;
    let kept = fault.await;
    let left = (total * 2 / 3).saturating_sub(rec.start.elapsed().saturating_sub(total / 3));
    tokio::time::sleep(left.max(Duration::from_secs(2))).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    // A last acknowledged write through the first replica: every watcher must reach it.
    let end_key = format!("{}end", keys.small_prefix);
    let mut last = Session { id: CLIENTS, client: etcd_client::Client::connect([&replicas[0]], None).await.unwrap(), rec: rec.clone() };
    let end_rev = loop {
        if last.put(&end_key, b"end".to_vec(), 0, false).await {
            let ops = rec.ops.lock().unwrap();
            match ops.last().map(|o| &o.outcome) {
                Some(Outcome::Ok { revision, .. }) => break *revision,
                _ => unreachable!(),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // A quiet second and a half: etcd sends its timed progress notifications to idle watchers.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    until.store(end_rev, Ordering::SeqCst);
    let compacted = compacted_revision(&mut d).await;
    let mut records = Vec::new();
    for (name, r, t) in watchers {
        let _ = tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), t).await;
        let mut r = r.lock().await.clone();
        r.compacted = compacted;
        eprintln!("{name}: {} responses, {} resumptions, {} bookmarks, compactions {:?}, etcd compacted at {compacted}", r.responses.len(), r.resumptions, r.bookmarks.len(), r.compactions);
        records.push((name, r));
    }
    drop(kept);

    let ops = std::mem::take(&mut *rec.ops.lock().unwrap());
    let unknown = ops.iter().filter(|o| matches!(o.outcome, Outcome::Unknown)).count();
    let seen: Vec<Kv> = records.iter().flat_map(|(_, r)| history::seen_states(r)).collect();
    let altered = lin::altered_values(&ops, &seen);
    let watched: Vec<lin::Watched> = records.iter().flat_map(|(_, r)| history::watched_changes(r)).collect();
    let checked = lin::check(&ops, start, &seen, &watched);
    let mut watch = Vec::new();
    let mut watch_events = 0;
    let linearizable = match &checked {
        Ok(l) => {
            for (name, r) in &records {
                let (v, n) = history::check_with_model(name, r, |k| k.starts_with(b"/registry/"), &l.changes, end_rev);
                watch.extend(v);
                watch_events += n;
            }
            Ok(format!("{} revisions, {} unknown applied, {} by the proxy", l.writes, l.unknown_applied, l.invisible))
        }
        Err(e) => {
            watch.push("not checked: the history is not linearizable".into());
            Err(e.0.clone())
        }
    };
    for v in &watch {
        eprintln!("watch violation: {v}");
    }
    Row { fault: name.into(), operations: ops.len(), unknown, watch_events, linearizable, watch, altered }
}

/// etcd's compaction revision (0: none): a watch from revision 1 is canceled with it.
async fn compacted_revision(direct: &mut etcd_client::Client) -> i64 {
    // A watch from revision 1 is canceled with the compaction revision. Retried: on a loaded
    // machine a lost answer would otherwise read as "never compacted", and etcd's own gaps at
    // compaction (a prev_kv left out) as the proxy's violations.
    for _ in 0..5 {
        // Every key from revision 1: compacted, a cancel naming the revision; else events.
        let opts = etcd_client::WatchOptions::new().with_start_revision(1).with_all_keys();
        let Ok(Ok(mut stream)) = tokio::time::timeout(Duration::from_secs(10), direct.watch("\0", Some(opts))).await else { continue };
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Ok(Ok(Some(resp))) = tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), stream.message()).await {
            if resp.compact_revision() > 0 {
                return resp.compact_revision();
            }
            if resp.canceled() || !resp.events().is_empty() {
                return 0; // not compacted: history from revision 1 on
            }
        }
    }
    panic!("etcd's compaction revision could not be read");
}

/// Two in-process replicas in front of `endpoints`.
async fn replicas(endpoints: &[String]) -> (Proxy, Proxy) {
    (Proxy::start_config(proxy_config(endpoints)).await, Proxy::start_config(proxy_config(endpoints)).await)
}

/// No fault: the baseline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fault() {
    let etcd = Etcd::start_with(&[PROGRESS_NOTIFY]).await;
    let (a, b) = replicas(std::slice::from_ref(&etcd.url)).await;
    run("no fault", [a.url.clone(), b.url.clone()], vec![etcd.url.clone()], false, async {}).await.report();
}

/// etcd SIGKILLed and restarted on its data under traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_and_restarted() {
    let mut etcd = Etcd::start_with(&[PROGRESS_NOTIFY]).await;
    let (a, b) = replicas(std::slice::from_ref(&etcd.url)).await;
    let (urls, direct) = ([a.url.clone(), b.url.clone()], vec![etcd.url.clone()]);
    run("etcd SIGKILL + restart", urls, direct, false, async {
        etcd.kill();
        tokio::time::sleep(Duration::from_millis(500)).await;
        etcd.restart().await;
    })
    .await
    .report();
}

/// etcd stopped (SIGSTOP) for longer than the clients' deadline, then continued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_stalled_past_the_deadline() {
    let etcd = Etcd::start_with(&[PROGRESS_NOTIFY]).await;
    let (a, b) = replicas(std::slice::from_ref(&etcd.url)).await;
    run("etcd SIGSTOP 3 s (deadline 2 s)", [a.url.clone(), b.url.clone()], vec![etcd.url.clone()], false, async {
        etcd.freeze(true);
        tokio::time::sleep(Duration::from_secs(3)).await;
        etcd.freeze(false);
    })
    .await
    .report();
}

/// One replica (the real binary) SIGKILLed three times mid-traffic and restarted on its port: a
/// kill can land between reading a base and writing the delta Txn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_replica_killed_mid_traffic() {
    let etcd = Etcd::start_with(&[PROGRESS_NOTIFY]).await;
    let a = Proxy::start_config(proxy_config(std::slice::from_ref(&etcd.url))).await;
    let more = if config_name() != "delta frames on" { "" } else { BINARY_PREFIXES };
    let config = || BinaryConfig { listen_ip: "127.0.0.1", upstream: &etcd.url, server: "", more };
    let b = Binary::start(config()).await;
    let (port, metrics) = (b.port, b.metrics_url.rsplit(':').next().unwrap().parse::<u16>().unwrap());
    let urls = [a.url.clone(), b.url.clone()];
    run("proxy replica SIGKILL ×3", urls, vec![etcd.url.clone()], false, async {
        let mut b = b;
        for _ in 0..3 {
            drop(b); // SIGKILL
            tokio::time::sleep(Duration::from_millis(300)).await;
            b = Binary::start_on(config(), port, metrics).await;
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        b
    })
    .await
    .report();
}

/// A three-member cluster loses its leader (SIGKILL) and gets it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_member_cluster_loses_its_leader() {
    let mut members = cluster().await;
    let endpoints: Vec<String> = members.iter().map(|m| m.url.clone()).collect();
    let (a, b) = replicas(&endpoints).await;
    run("3-member cluster, leader SIGKILL", [a.url.clone(), b.url.clone()], endpoints, false, async {
        let lead = leader(&members).await;
        members[lead].kill();
        tokio::time::sleep(Duration::from_secs(2)).await;
        members[lead].spawn("existing");
    })
    .await
    .report();
}

/// The network between one replica and etcd blackholed for 3 s, then healed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_to_etcd_blackholed_then_healed() {
    let etcd = Etcd::start_with(&[PROGRESS_NOTIFY]).await;
    let relay = Relay::start(etcd.url.trim_start_matches("http://").to_string()).await;
    let a = Proxy::start_config(proxy_config(std::slice::from_ref(&relay.url))).await;
    let b = Proxy::start_config(proxy_config(std::slice::from_ref(&etcd.url))).await;
    run("network proxy↔etcd blackholed 3 s", [a.url.clone(), b.url.clone()], vec![etcd.url.clone()], false, async {
        relay.blackhole(true);
        tokio::time::sleep(Duration::from_secs(3)).await;
        relay.blackhole(false);
    })
    .await
    .report();
}

/// Compaction every 300 ms racing the writes, with a slow watcher lagging behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_racing_writes_and_a_lagging_watcher() {
    let etcd = Etcd::start_with(&[PROGRESS_NOTIFY]).await;
    let (a, b) = replicas(std::slice::from_ref(&etcd.url)).await;
    let mut direct = etcd.client().await;
    let period = Duration::from_secs(seconds()) / 3;
    run("compaction every 300 ms + lagging watcher", [a.url.clone(), b.url.clone()], vec![etcd.url.clone()], true, async {
        let until = Instant::now() + period;
        while Instant::now() < until {
            if let Ok(r) = direct.get("x", None).await {
                let _ = direct.compact(revision_of(r.header()) - 10, None).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await
    .report();
}
