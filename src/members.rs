//! Replica announcements: which etcd-squeeze replicas share this etcd, which frame codecs each
//! one reads, and how far back each one's watches may still need a delta base.
//!
//! Every replica puts `/etcd-squeeze/members/<identity>` on a lease of [`LEASE_TTL`] it keeps
//! alive, with an [`Announcement`] (JSON): its build, the frame codecs it can read (`raw`,
//! `zstd`, `delta`: the frame header's codec byte 0, 1, 2) and its *watch floor*. It follows the
//! whole prefix with a watch, so it knows every replica that is alive. A replica that stops
//! revokes its lease (its key goes at once); a killed one's key goes when the lease expires.
//!
//! What the view decides:
//! - **Codec negotiation.** A prefix with `delta = "auto"` writes delta frames only while
//!   [`Members::all_read`]`("delta")`: every announced replica, this one included, reads them. A
//!   replica that cannot joins → its key appears → the others stop writing delta frames at once
//!   (within one lease TTL at worst, if their watch was broken and re-lists). While the view is
//!   not known (etcd unreachable, not yet listed) nothing is assumed readable.
//! - **Base collection horizon.** A superseded base is needed by revisions before the one that
//!   superseded it. etcd serves no read below its compaction revision, but a watch event etcd
//!   read from its history *before* a compaction can still be on its way (buffered in etcd for a
//!   slow watcher, or in a stream the proxy has not read yet) and needs its base when it reaches
//!   a proxy. Each replica therefore announces `watch_floor` = the lowest revision an event of
//!   its open watches on delta prefixes can still have (the next revision after the last event
//!   it decoded, or the watch's start), capped by the compaction revision it knows: a watch
//!   opened later starts at or above the compaction (etcd refuses lower), so the floor stays a
//!   lower bound until the next announcement. [`Members::horizon`] is the lowest floor of all
//!   replicas; a base superseded at revision R is collected only when the horizon is past R. No
//!   read etcd can still serve, and no event in flight through any replica, can then need it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::DeltaMode;
use crate::proto::etcdserverpb::kv_client::KvClient;
use crate::proto::etcdserverpb::lease_client::LeaseClient;
use crate::proto::etcdserverpb::watch_client::WatchClient;
use crate::proto::etcdserverpb::{
    watch_request, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, PutRequest, RangeRequest, WatchCreateRequest, WatchRequest,
};
use crate::upstream::Upstream;

/// Where replicas announce themselves: `/etcd-squeeze/members/<identity>`.
pub const MEMBERS_PREFIX: &str = "/etcd-squeeze/members/";
/// The announcement lease's TTL: a killed replica disappears from the view this long after.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// How often the announcement is checked: re-announced at once when the compaction revision
/// known changed (that is when collection becomes possible), else when the watch floor changed
/// and [`FLOOR_REFRESH`] passed (each announcement is a write to etcd).
const REFRESH: Duration = Duration::from_secs(2);
/// The error of a round whose lease was lost (the only one that ends decoding watch streams).
const LEASE_LOST: &str = "the announcement lease was lost";
/// The longest an announcement or a listing may take (the loop does not see a lost lease meanwhile).
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// The least time between two announcements for a watch floor change alone.
const FLOOR_REFRESH: Duration = Duration::from_secs(30);
/// How often the compaction revision is read from etcd (a watch create and cancel): a replica
/// that has not seen a compaction blocks the collection of bases it passed.
const COMPACTION_REFRESH: Duration = Duration::from_secs(5);
/// The frame codecs this build reads (the frame header's codec byte 0, 1, 2).
pub const CODECS: [&str; 3] = ["raw", "zstd", "delta"];

/// One replica's announcement, the JSON value of its key under [`MEMBERS_PREFIX`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// The replica's identity (`host/pid/random`), also its key's suffix.
    pub id: String,
    /// Its build (`etcd-squeeze --version`'s version).
    pub version: String,
    /// The frame codecs it reads: `raw`, `zstd`, `delta`.
    pub codecs: Vec<String>,
    /// The lowest revision a watch event it may still decode can have; 0 while unknown (blocks
    /// base collection).
    pub watch_floor: i64,
}

impl Announcement {
    /// True when the replica reads frames of `codec`.
    pub fn reads(&self, codec: &str) -> bool {
        self.codecs.iter().any(|c| c == codec)
    }
}

/// The open watches of this replica that may decode delta frames, per client stream: the lowest
/// revision an event of theirs can still have.
#[derive(Debug, Default)]
pub struct WatchFloors {
    next: AtomicU64,
    floors: Mutex<HashMap<u64, i64>>,
}

/// One client stream's entry in [`WatchFloors`]; removed on drop.
#[derive(Debug)]
pub struct FloorEntry {
    floors: Arc<WatchFloors>,
    id: u64,
}

impl WatchFloors {
    /// An entry for a new stream (no floor until [`FloorEntry::set`]).
    pub fn register(self: &Arc<Self>) -> FloorEntry {
        FloorEntry { floors: self.clone(), id: self.next.fetch_add(1, Ordering::Relaxed) }
    }

    /// The lowest floor of every stream, if any stream has one.
    pub fn min(&self) -> Option<i64> {
        self.floors.lock().unwrap_or_else(|p| p.into_inner()).values().copied().min()
    }
}

impl FloorEntry {
    /// Sets this stream's floor (`None`: no open watch that decodes).
    pub fn set(&self, floor: Option<i64>) {
        let mut floors = self.floors.floors.lock().unwrap_or_else(|p| p.into_inner());
        match floor {
            Some(f) => floors.insert(self.id, f),
            None => floors.remove(&self.id),
        };
    }
}

impl Drop for FloorEntry {
    fn drop(&mut self) {
        self.set(None);
    }
}

/// This replica's view of the replicas sharing its etcd.
#[derive(Debug)]
pub struct Members {
    id: String,
    codecs: Vec<String>,
    /// The configured prefixes and their `delta` setting (for `etcd_squeeze_delta_writing`).
    prefixes: Vec<(String, DeltaMode)>,
    view: RwLock<BTreeMap<String, Announcement>>,
    /// The view follows etcd (listed, watch open, own key announced).
    fresh: AtomicBool,
    /// The newest compaction revision known.
    compacted: AtomicI64,
    /// The collection bound the last listing of [`MEMBERS_PREFIX`] proved: the compaction
    /// revision known before the listing, lowered by every other listed replica's floor (0: none
    /// yet). A replica that announced at or before that compaction is in the listing; one that
    /// announced later opened its watches later, at or above it (see [`Members::horizon`]).
    listed_floor: AtomicI64,
    /// Incremented when an announcement this replica made may be gone (its round failed after
    /// announcing): watch streams that decode delta frames end then ([`Members::lost_signal`]).
    lost: watch::Sender<u64>,
    /// The lease of the announcement, to revoke at stop (0: none).
    lease: AtomicI64,
    /// Watches of this replica that decode delta frames.
    pub floors: Arc<WatchFloors>,
}

impl Members {
    /// A view for the replica `id` announcing `codecs` (normally [`CODECS`]; fewer to pretend
    /// to be an older build, `serve --announce-codecs`).
    /// `prefixes` are the configured prefixes with their `delta` setting (for metrics).
    pub fn new(id: String, codecs: Vec<String>, prefixes: Vec<(String, DeltaMode)>) -> Arc<Self> {
        Arc::new(Members {
            id,
            codecs,
            prefixes,
            view: RwLock::new(BTreeMap::new()),
            fresh: AtomicBool::new(false),
            compacted: AtomicI64::new(0),
            listed_floor: AtomicI64::new(0),
            lost: watch::channel(0).0,
            lease: AtomicI64::new(0),
            floors: Arc::new(WatchFloors::default()),
        })
    }

    /// This replica's identity.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// True when every announced replica, this one included, reads frames of `codec`, as far
    /// as a fresh view knows. False while the view is not known.
    pub fn all_read(&self, codec: &str) -> bool {
        if !self.fresh.load(Ordering::Acquire) {
            return false;
        }
        let view = self.view.read().unwrap_or_else(|p| p.into_inner());
        view.contains_key(&self.id) && view.values().all(|a| a.reads(codec))
    }

    /// The revision below which no replica can still need a base (see the module doc); 0 while
    /// the view is not known.
    pub fn horizon(&self) -> i64 {
        if !self.fresh.load(Ordering::Acquire) {
            return 0;
        }
        let view = self.view.read().unwrap_or_else(|p| p.into_inner());
        let others = view.iter().filter(|(id, _)| **id != self.id).map(|(_, a)| a.watch_floor).min().unwrap_or(i64::MAX);
        self.listed_floor.load(Ordering::Acquire).min(others).min(self.own_floor())
    }

    /// Replaces the view with a listing of [`MEMBERS_PREFIX`] read after the compaction
    /// revision `compacted_before` was known, and records the collection bound it proves.
    fn install_listing(&self, listed: impl IntoIterator<Item = (String, Announcement)>, compacted_before: i64) {
        let mut view = self.view.write().unwrap_or_else(|p| p.into_inner());
        view.clear();
        view.extend(listed);
        let others = view.iter().filter(|(id, _)| **id != self.id).map(|(_, a)| a.watch_floor).min().unwrap_or(i64::MAX);
        self.listed_floor.store(compacted_before.min(others), Ordering::Release);
    }

    /// Changes each time an announcement of this replica may have expired (its round failed
    /// after announcing): another replica may then collect bases below this one's watch floor,
    /// so the watch streams that decode delta frames end (UNAVAILABLE) and their clients
    /// re-watch, from a revision etcd still serves.
    pub fn lost_signal(&self) -> watch::Receiver<u64> {
        self.lost.subscribe()
    }

    /// Waits until this replica is announced and follows the others (at most `timeout`);
    /// false on timeout.
    pub async fn wait_announced(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.fresh.load(Ordering::Acquire) {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// A compaction at `revision` (seen through the proxy, or read from etcd).
    pub fn observe_compaction(&self, revision: i64) {
        self.compacted.fetch_max(revision, Ordering::Relaxed);
    }

    /// The newest compaction revision known.
    pub fn compacted(&self) -> i64 {
        self.compacted.load(Ordering::Relaxed)
    }

    /// The announced replicas, by identity (empty while the view is not known).
    pub fn snapshot(&self) -> Vec<Announcement> {
        if !self.fresh.load(Ordering::Acquire) {
            return Vec::new();
        }
        self.view.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// This replica's floor now: its watches' lowest, capped by the compaction it knows.
    fn own_floor(&self) -> i64 {
        let c = self.compacted();
        self.floors.min().map_or(c, |f| f.min(c))
    }

    fn announcement(&self) -> Announcement {
        Announcement { id: self.id.clone(), version: crate::VERSION.to_string(), codecs: self.codecs.clone(), watch_floor: self.own_floor() }
    }

    /// Announces and follows in the background until `stop` turns true; then revokes the lease
    /// (the key goes at once).
    pub fn spawn(self: &Arc<Self>, upstream: Upstream, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let run = async {
                let mut attempt = 0;
                loop {
                    let started = Instant::now();
                    let result = this.round(&upstream).await;
                    // Another error leaves the key to the next round, which puts it again (on a
                    // new lease) before the old one can expire; a lost lease may already have.
                    if this.lease.swap(0, Ordering::Relaxed) != 0 && result.as_ref().is_err_and(|e| e.message() == LEASE_LOST) {
                        this.lost.send_modify(|g| *g += 1);
                    }
                    if let Err(e) = result {
                        static WARN: crate::throttle::Throttle = crate::throttle::Throttle::new(Duration::from_secs(60));
                        if let Some(left_out) = WARN.allow() {
                            tracing::warn!(error = %e, left_out, "replica announcement: cannot follow /etcd-squeeze/members/ (delta = \"auto\" writes per-object frames meanwhile)");
                        }
                    }
                    this.fresh.store(false, Ordering::Release);
                    this.update_metrics();
                    attempt = if started.elapsed() > Duration::from_secs(60) { 0 } else { attempt + 1 };
                    tokio::time::sleep(crate::throttle::backoff(attempt, Duration::from_secs(1), Duration::from_secs(30))).await;
                }
            };
            tokio::select! {
                _ = run => {}
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {}
            }
            this.fresh.store(false, Ordering::Release);
            let lease = this.lease.swap(0, Ordering::Relaxed);
            if lease != 0 {
                let mut client = LeaseClient::new(upstream.clone());
                let _ = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(LeaseRevokeRequest { id: lease })).await;
            }
        })
    }

    /// One announcement: lease, put, list, watch; returns when anything fails.
    async fn round(self: &Arc<Self>, upstream: &Upstream) -> Result<(), tonic::Status> {
        let mut kv = KvClient::new(upstream.clone());
        let mut leases = LeaseClient::new(upstream.clone());
        let lease = leases.lease_grant(LeaseGrantRequest { ttl: LEASE_TTL.as_secs() as i64, id: 0 }).await?.into_inner().id;
        let (lost_tx, mut lost) = watch::channel(false);
        let _keepalive = AbortOnDrop(tokio::spawn(keep_alive(leases, lease, LEASE_TTL, lost_tx, "replica announcement")));
        let key = Bytes::from(format!("{MEMBERS_PREFIX}{}", self.id));
        let mut announced = self.announcement();
        let (mut announced_at, mut announced_compaction) = (Instant::now(), self.compacted());
        let put = |a: &Announcement| PutRequest { key: key.clone(), value: Bytes::from(serde_json::to_vec(a).expect("JSON")), lease, ..Default::default() };
        kv.put(put(&announced)).await?;
        self.lease.store(lease, Ordering::Relaxed);
        // List, then watch from the listed revision on.
        let mut view_revision = self.list(&mut kv).await?;
        let end = Bytes::from(crate::codec::prefix_end(MEMBERS_PREFIX.as_bytes()).expect("a prefix"));
        let create = WatchCreateRequest { key: Bytes::from_static(MEMBERS_PREFIX.as_bytes()), range_end: end, start_revision: view_revision + 1, ..Default::default() };
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let _ = tx.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) }).await;
        let mut events = WatchClient::new(upstream.clone()).watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
        self.fresh.store(true, Ordering::Release);
        self.update_metrics();
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The compaction revision is read in the background (a probe may wait two seconds), at
        // once and then every COMPACTION_REFRESH.
        let mut compaction_read: Option<Instant> = None;
        let mut probe: Option<AbortOnDrop> = None;
        loop {
            tokio::select! {
                _ = lost.changed() => return Err(tonic::Status::unavailable(LEASE_LOST)),
                message = events.message() => {
                    let Some(resp) = message? else { return Err(tonic::Status::unavailable("the members watch ended")) };
                    if resp.canceled {
                        return Err(tonic::Status::unavailable(format!("the members watch was canceled: {}", resp.cancel_reason)));
                    }
                    let mut view = self.view.write().unwrap_or_else(|p| p.into_inner());
                    for ev in resp.events {
                        let Some(kv) = ev.kv else { continue };
                        // A relisting already holds what happened up to its revision.
                        if kv.mod_revision <= view_revision {
                            continue;
                        }
                        let id = String::from_utf8_lossy(&kv.key[MEMBERS_PREFIX.len().min(kv.key.len())..]).into_owned();
                        if ev.r#type == 1 {
                            view.remove(&id);
                        } else if let Some((id, a)) = parse(&kv.key, &kv.value) {
                            view.insert(id, a);
                        }
                    }
                    drop(view);
                    self.update_metrics();
                }
                _ = tick.tick() => {
                    if compaction_read.is_none_or(|t| t.elapsed() > COMPACTION_REFRESH) && probe.as_ref().is_none_or(|p| p.0.is_finished()) {
                        compaction_read = Some(Instant::now());
                        let (this, upstream) = (self.clone(), upstream.clone());
                        probe = Some(AbortOnDrop(tokio::spawn(async move {
                            if let Some(c) = compaction_revision(upstream).await {
                                this.observe_compaction(c);
                            }
                        })));
                    }
                    let now = self.announcement();
                    let compaction_moved = self.compacted() != announced_compaction;
                    if now != announced && (compaction_moved || announced_at.elapsed() >= FLOOR_REFRESH) {
                        tokio::time::timeout(CALL_TIMEOUT, kv.put(put(&now))).await.map_err(|_| tonic::Status::deadline_exceeded("announcement put"))??;
                        (announced, announced_at, announced_compaction) = (now, Instant::now(), self.compacted());
                    }
                    // Relisted on every tick: the collection bound needs a listing read after
                    // the compaction it is capped by (watch events can lag behind).
                    let listed = tokio::time::timeout(CALL_TIMEOUT, self.list(&mut kv)).await.map_err(|_| tonic::Status::deadline_exceeded("members listing"))??;
                    view_revision = view_revision.max(listed);
                    self.update_metrics();
                }
            }
        }
    }

    /// Lists [`MEMBERS_PREFIX`] into the view ([`Members::install_listing`]); returns the
    /// listing's revision.
    async fn list(&self, kv: &mut KvClient<Upstream>) -> Result<i64, tonic::Status> {
        let compacted_before = self.compacted();
        let end = Bytes::from(crate::codec::prefix_end(MEMBERS_PREFIX.as_bytes()).expect("a prefix"));
        let listed = kv.range(RangeRequest { key: Bytes::from_static(MEMBERS_PREFIX.as_bytes()), range_end: end, ..Default::default() }).await?.into_inner();
        self.install_listing(listed.kvs.iter().filter_map(|kv| parse(&kv.key, &kv.value)), compacted_before);
        Ok(listed.header.map_or(0, |h| h.revision))
    }

    /// True when a prefix with this `delta` setting writes delta frames now.
    pub fn writes_delta(&self, mode: DeltaMode) -> bool {
        match mode {
            DeltaMode::Off => false,
            DeltaMode::On => true,
            DeltaMode::Auto => self.all_read("delta"),
        }
    }

    /// `etcd_squeeze_replicas_announced`, `etcd_squeeze_replicas_reading{codec}` and
    /// `etcd_squeeze_delta_writing{prefix}`.
    pub fn update_metrics(&self) {
        let metrics = crate::metrics::get();
        let view = self.snapshot();
        metrics.replicas_announced.set(view.len() as i64);
        for codec in CODECS {
            metrics.replicas_reading.with_label_values(&[codec]).set(view.iter().filter(|a| a.reads(codec)).count() as i64);
        }
        for (prefix, mode) in &self.prefixes {
            metrics.delta_writing.with_label_values(&[prefix]).set(self.writes_delta(*mode) as i64);
        }
    }
}

/// An announcement from a key and value under [`MEMBERS_PREFIX`]; `None` when the value is not
/// one (a newer format we cannot read counts as a replica that reads nothing: safe).
fn parse(key: &[u8], value: &[u8]) -> Option<(String, Announcement)> {
    let id = String::from_utf8_lossy(key.get(MEMBERS_PREFIX.len()..)?).into_owned();
    let a = serde_json::from_slice::<Announcement>(value).unwrap_or(Announcement { id: id.clone(), version: "unknown".into(), codecs: Vec::new(), watch_floor: 0 });
    Some((id, a))
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps lease `id` alive: a keepalive every third of `ttl`; on any failure, or an expired
/// lease, sets `lost` and returns. `what` names the lease in the warning.
pub async fn keep_alive(mut client: LeaseClient<Upstream>, id: i64, ttl: Duration, lost: watch::Sender<bool>, what: &'static str) {
    use futures::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    // The first request goes out with the call: etcd (grpc-go) sends the stream's response
    // headers with its first response, so the call only returns once a request was answered.
    if tx.send(LeaseKeepAliveRequest { id }).await.is_err() {
        return;
    }
    let mut responses = match client.lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(_) => {
            let _ = lost.send(true);
            return;
        }
    };
    loop {
        // An answer within half the TTL, or the lease counts as lost: declared at most five
        // sixths of the TTL after the last answer, before etcd can expire it (the announcement's
        // watch streams end first, src/server/watch.rs).
        match tokio::time::timeout(ttl / 2, responses.next()).await {
            Ok(Some(Ok(r))) if r.ttl > 0 => {}
            _ => break,
        }
        tokio::time::sleep(ttl / 3).await;
        if tx.send(LeaseKeepAliveRequest { id }).await.is_err() {
            break;
        }
    }
    tracing::warn!(lease = id, what, "lease lost");
    let _ = lost.send(true);
}

/// etcd's compaction revision, read from etcd itself: a watch on a key that never exists from
/// revision 1, which etcd cancels with `compact_revision` when revision 1 is compacted away. How
/// a proxy learns of compactions that did not pass through it (another apiserver's proxy,
/// etcdctl, a restart). `None` when etcd says nothing within two seconds (nothing compacted, or
/// unreachable).
pub async fn compaction_revision(upstream: Upstream) -> Option<i64> {
    let mut watch = WatchClient::new(upstream);
    let create = WatchCreateRequest { key: Bytes::from_static(b"/etcd-squeeze/compaction-probe"), start_revision: 1, ..Default::default() };
    let request = WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(request).await.ok()?;
    let probe = async move {
        let mut stream = watch.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.ok()?.into_inner();
        while let Some(resp) = stream.message().await.ok()? {
            if resp.compact_revision > 0 {
                return Some(resp.compact_revision);
            }
        }
        None
    };
    let found = tokio::time::timeout(Duration::from_secs(2), probe).await.ok().flatten();
    drop(tx);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(id: &str, codecs: &[&str], floor: i64) -> Announcement {
        Announcement { id: id.into(), version: "test".into(), codecs: codecs.iter().map(|c| c.to_string()).collect(), watch_floor: floor }
    }

    fn members(view: &[Announcement]) -> Arc<Members> {
        let m = Members::new("me".into(), CODECS.iter().map(|c| c.to_string()).collect(), Vec::new());
        m.install_listing(view.iter().map(|a| (a.id.clone(), a.clone())), i64::MAX);
        m.fresh.store(true, Ordering::Release);
        m
    }

    #[test]
    fn every_replica_must_read_a_codec() {
        let me = a("me", &CODECS, 0);
        assert!(members(&[me.clone(), a("b", &CODECS, 0)]).all_read("delta"));
        assert!(!members(&[me.clone(), a("old", &["raw", "zstd"], 0)]).all_read("delta"));
        // An unreadable announcement reads nothing; not yet announced ourselves: unknown.
        assert!(!members(&[me.clone(), parse(b"/etcd-squeeze/members/x", b"{not json").unwrap().1]).all_read("delta"));
        assert!(!members(&[a("b", &CODECS, 0)]).all_read("delta"));
        let stale = members(&[me]);
        stale.fresh.store(false, Ordering::Release);
        assert!(!stale.all_read("delta"));
    }

    #[test]
    fn horizon_is_the_lowest_floor_capped_by_compaction() {
        let m = members(&[a("me", &CODECS, 0), a("b", &CODECS, 120)]);
        assert_eq!(m.horizon(), 0, "nothing compacted: nothing collectable");
        m.observe_compaction(200);
        assert_eq!(m.horizon(), 120, "another replica's watch is at 120");
        let entry = m.floors.register();
        entry.set(Some(90));
        assert_eq!(m.horizon(), 90, "this replica's own watch is at 90");
        drop(entry);
        assert_eq!(m.horizon(), 120);
        let m = members(&[a("me", &CODECS, 0), a("b", &CODECS, 0)]);
        m.observe_compaction(200);
        assert_eq!(m.horizon(), 0, "a replica that knows no compaction yet blocks collection");
    }

    #[test]
    fn the_horizon_waits_for_a_listing_read_after_the_compaction() {
        // Listed before compaction 200 was known: a replica announced since (not in the view,
        // its watch opened before the compaction) may need anything; the bound stays at the
        // compaction known then (none).
        let m = Members::new("me".into(), CODECS.iter().map(|c| c.to_string()).collect(), Vec::new());
        m.install_listing([("me".to_string(), a("me", &CODECS, 0))], 0);
        m.fresh.store(true, Ordering::Release);
        m.observe_compaction(200);
        assert_eq!(m.horizon(), 0);
        // Relisted after it: the bound is the compaction, lowered by the listed replicas.
        m.install_listing([("me".to_string(), a("me", &CODECS, 0)), ("b".to_string(), a("b", &CODECS, 150))], m.compacted());
        assert_eq!(m.horizon(), 150);
        // A floor lowered by a watch event since lowers the horizon at once.
        m.view.write().unwrap().insert("c".into(), a("c", &CODECS, 120));
        assert_eq!(m.horizon(), 120);
    }
}
