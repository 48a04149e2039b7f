//! Shared trained zstd dictionaries: stored in etcd, cached in every replica, trained from traffic.
//!
//! - [`store`]: the immutable dictionary records under `dictionaries.key_prefix` in etcd.
//! - [`cache`]: prepared encoder/decoder dictionaries, read synchronously by the codec.
//! - [`training`]: the sample reservoir, zstd's trainer with a held-out check, the trainer election.
//!
//! [`Dictionaries`] ties them together for the server: before a response is decoded, the IDs its
//! frames name are loaded (once per ID however many requests wait for it, checksum verified);
//! a background task follows the store (so a new dictionary is used by every replica within
//! seconds of its publication), and another campaigns for the trainer role and trains.

pub mod cache;
pub mod store;
pub mod training;

pub use store::unix_now;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;
use futures::future::{BoxFuture, FutureExt, Shared};
use crate::upstream::Upstream;
use tonic::Status;

use crate::error::RequestError;

use crate::codec::{frame, ValueCodec, K8S_ENCRYPTED_PREFIX};
use crate::config::{Config, DictionariesConfig};
use crate::proto::etcdserverpb::watch_client::WatchClient;
use crate::proto::mvccpb::event::EventType;
use crate::proto::etcdserverpb::{watch_request, Compare, PutRequest, RangeRequest, WatchCreateRequest, WatchRequest};
use crate::rewrite::{self, KeyValues};
use cache::DictionaryCache;
use store::{DictionaryMeta, Record, Store, StoreError};
use training::{Election, Leadership, Reservoir, TrainError};

/// After a failed dictionary watch, wait this long before listing and watching again.
const WATCH_RETRY: Duration = Duration::from_secs(1);
/// The longest pause between two attempts while the store watch keeps failing.
const WATCH_RETRY_MAX: Duration = Duration::from_secs(30);
/// Values read per page when sampling from etcd: bounded memory even for 4 MB objects.
const SAMPLE_PAGE: i64 = 16;
/// At most this many keys are read per sample wanted, when sampling from etcd.
const SCAN_KEYS_PER_SAMPLE: usize = 4;

/// A `[[prefixes]]` prefix that uses dictionaries.
#[derive(Debug, Clone)]
pub struct DictionaryPrefix {
    /// The prefix, as configured.
    pub prefix: Bytes,
    /// Its zstd level (encoders are prepared at it; candidates are judged at it).
    pub level: i32,
    /// Its `min_size`: smaller values are not sampled (they are stored raw).
    pub min_size: usize,
}

impl DictionaryPrefix {
    /// The prefixes of `config` that use dictionaries ([`crate::config::PrefixConfig::uses_dictionary`]).
    pub fn from_config(config: &Config) -> Vec<DictionaryPrefix> {
        config
            .prefixes
            .iter()
            .filter(|p| p.uses_dictionary(&config.dictionaries))
            .map(|p| DictionaryPrefix { prefix: Bytes::from(p.prefix.clone()), level: p.level, min_size: p.min_size.as_u64() as usize })
            .collect()
    }

    fn name(&self) -> String {
        String::from_utf8_lossy(&self.prefix).into_owned()
    }
}

/// Why a dictionary could not be loaded.
#[derive(Debug, Clone)]
enum LoadFailure {
    /// Missing or refused: values that need it are passed on as stored (logged naming key and ID).
    Unavailable,
    /// etcd could not be asked: the request fails with etcd's status, it may be retried.
    Etcd(Status),
}

/// One dictionary fetch, awaited by every request that needs that dictionary meanwhile.
type Fetch = Shared<BoxFuture<'static, Result<(), LoadFailure>>>;

/// What one training round did.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// The prefix trained.
    pub prefix: String,
    /// The candidate's statistics.
    pub candidate_samples: u64,
    /// Held-out bytes with the current dictionary (or none) → with the candidate.
    pub heldout: (u64, u64),
    /// The published dictionary, when the candidate gained at least `min_gain`.
    pub published: Option<DictionaryMeta>,
}

impl TrainReport {
    /// Fraction of held-out bytes the candidate saves.
    pub fn gain(&self) -> f64 {
        1.0 - self.heldout.1 as f64 / self.heldout.0.max(1) as f64
    }
}

/// Dictionary errors a training round or an operator command can meet.
#[derive(Debug, thiserror::Error)]
pub enum DictionaryError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// etcd refused a call.
    #[error("etcd: {0}")]
    Etcd(#[from] Status),
    /// Loading what stored values need failed.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// Training produced no candidate.
    #[error("prefix {prefix:?}: {source}")]
    Train {
        /// The prefix.
        prefix: String,
        /// Why.
        source: TrainError,
    },
    /// The prefix does not use dictionaries in this configuration.
    #[error("prefix {0:?} is not a [[prefixes]] prefix that uses dictionaries (see prefixes[].dictionary)")]
    NotADictionaryPrefix(String),
}

/// The dictionaries of one replica: the cache the codec reads, the store, the single-flight
/// loader, the Put sampler and the background tasks.
pub struct Dictionaries {
    codec: ValueCodec,
    /// The cache `codec` reads as its dictionary source; this fills it.
    cache: Arc<DictionaryCache>,
    store: Store,
    channel: Upstream,
    config: DictionariesConfig,
    prefixes: Vec<DictionaryPrefix>,
    reservoirs: HashMap<Bytes, Mutex<Reservoir>>,
    inflight: Mutex<HashMap<u32, Fetch>>,
    identity: String,
}

impl std::fmt::Debug for Dictionaries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dictionaries").field("cache", &self.cache).field("identity", &self.identity).finish()
    }
}

/// Background tasks, aborted when dropped (the server holds them while it serves);
/// [`Background::stop`] lets a leading trainer resign first.
#[derive(Debug)]
pub struct Background {
    follower: tokio::task::JoinHandle<()>,
    trainer: Option<tokio::task::JoinHandle<()>>,
    stop: watch::Sender<bool>,
}

/// Resolves once `stopped` turns true (or its sender is gone).
async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

/// How long a stopping trainer may take to resign (revoke its election lease) before it is cut.
const RESIGN_TIMEOUT: Duration = Duration::from_secs(2);

impl Background {
    /// Stops the tasks; a replica that leads the trainer election resigns (its election key
    /// goes at once, so another replica can take over without waiting for the lease TTL).
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(trainer) = self.trainer.take() {
            let abort = trainer.abort_handle();
            if tokio::time::timeout(RESIGN_TIMEOUT, trainer).await.is_err() {
                abort.abort();
            }
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.follower.abort();
        if let Some(trainer) = &self.trainer {
            trainer.abort();
        }
    }
}

impl Dictionaries {
    /// The dictionaries for `config`, filling `cache` (the one `codec` reads), talking to etcd over `channel`.
    pub fn new(config: &Config, codec: ValueCodec, cache: Arc<DictionaryCache>, channel: Upstream) -> Arc<Self> {
        let d = &config.dictionaries;
        let prefixes = DictionaryPrefix::from_config(config);
        let max_bytes = d.sample_max_bytes.as_u64() as usize;
        let reservoirs = prefixes.iter().map(|p| (p.prefix.clone(), Mutex::new(Reservoir::new(d.samples, max_bytes)))).collect();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "unknown".into());
        let identity = format!("{host}/{}/{:08x}", std::process::id(), rand::random::<u32>());
        Arc::new(Dictionaries {
            store: Store::new(channel.clone(), d.key_prefix.clone()),
            codec,
            cache,
            channel,
            config: d.clone(),
            prefixes,
            reservoirs,
            inflight: Mutex::default(),
            identity,
        })
    }

    /// The cache the codec reads.
    pub fn cache(&self) -> &Arc<DictionaryCache> {
        &self.cache
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// This replica's name in the election and in `trained_by`.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The prefixes that use dictionaries.
    pub fn prefixes(&self) -> &[DictionaryPrefix] {
        &self.prefixes
    }

    /// Makes sure every dictionary the values of `msg` need is loaded, so that decoding it
    /// (synchronous) finds them. A dictionary that is missing or refused is not an error here:
    /// decoding then fails (the value is passed on as stored, logged naming the key and the ID). Only when etcd cannot be
    /// reached is the etcd status returned.
    pub async fn prefetch<T: KeyValues>(&self, msg: &mut T) -> Result<(), RequestError> {
        let metrics = crate::metrics::get();
        for (id, frames) in rewrite::needed_dictionaries(&self.codec, msg) {
            if self.cache().has_decoder(id) {
                metrics.dictionary_cache_hits.inc_by(frames);
                continue;
            }
            metrics.dictionary_cache_misses.inc_by(frames);
            if self.cache().recently_unavailable(id) {
                continue; // decoding names the ID and the reason (logged)
            }
            if let Err(LoadFailure::Etcd(status)) = self.load(id).await {
                return Err(RequestError::Etcd(status));
            }
        }
        Ok(())
    }

    /// Loads the dictionary that the stored `value` of `key` names, if any (as [`Dictionaries::prefetch`]
    /// does for a response): for frames read outside a response, such as a delta frame's base record.
    pub async fn ensure(&self, key: &Bytes, value: &[u8]) -> Result<(), RequestError> {
        let kv = crate::proto::mvccpb::KeyValue { key: key.clone(), value: Bytes::copy_from_slice(&value[..value.len().min(frame::HEADER_LEN)]), ..Default::default() };
        self.prefetch(&mut crate::proto::etcdserverpb::RangeResponse { kvs: vec![kv], ..Default::default() }).await
    }

    /// Loads dictionary `id` into the cache unless it is there. Concurrent callers for one ID wait
    /// for a single fetch (single-flight).
    async fn load(&self, id: u32) -> Result<(), LoadFailure> {
        if self.cache().has_decoder(id) {
            return Ok(());
        }
        let fetch = {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            inflight
                .entry(id)
                .or_insert_with(|| fetch_decoder(self.store.clone(), self.cache().clone(), id).boxed().shared())
                .clone()
        };
        let result = fetch.clone().await;
        let mut inflight = self.inflight.lock().expect("inflight lock");
        if inflight.get(&id).is_some_and(|f| f.ptr_eq(&fetch)) {
            inflight.remove(&id);
        }
        result
    }

    /// Offers the value of a Put to its prefix's reservoir (a sample for the next training).
    pub fn observe(&self, put: &PutRequest) {
        if put.ignore_value || self.reservoirs.is_empty() {
            return;
        }
        let Some(rule) = self.codec.rule_for(&put.key) else { return };
        let Some(reservoir) = self.reservoirs.get(&rule.prefix) else { return };
        let v = &put.value;
        if v.len() < rule.min_size.max(1) || frame::is_framed(v) || v.starts_with(K8S_ENCRYPTED_PREFIX) {
            return;
        }
        // A std Mutex: held for one random draw and at most one copy, never across an await.
        reservoir.lock().expect("reservoir lock").offer(v, &mut rand::rng());
    }

    /// Offers every Put of a Txn (both branches, nested Txns).
    pub fn observe_txn(&self, txn: &crate::proto::etcdserverpb::TxnRequest) {
        if !self.reservoirs.is_empty() {
            rewrite::for_each_put(txn, &mut |p| self.observe(p));
        }
    }

    /// Starts the store follower, and the trainer when this replica may train.
    pub fn spawn(self: &Arc<Self>) -> Background {
        let (stop, stopped) = watch::channel(false);
        let follower = tokio::spawn(self.clone().follow());
        let trainer = (self.config.enabled && self.config.train && !self.prefixes.is_empty()).then(|| tokio::spawn(self.clone().campaign(stopped)));
        Background { follower, trainer, stop }
    }

    /// Lists the store and installs the newest dictionary of each prefix that uses dictionaries;
    /// returns the revision of the listing.
    pub async fn sync(&self) -> Result<i64, StoreError> {
        let mut missing: HashSet<&Bytes> = self.prefixes.iter().map(|p| &p.prefix).collect();
        let revision = self
            .store
            .scan_newest_first(|record| {
                match record {
                    Ok(r) => {
                        if missing.remove(&Bytes::from(r.meta.prefix.clone())) {
                            self.install(&r);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "dictionary refused"),
                }
                !missing.is_empty()
            })
            .await?;
        Ok(revision)
    }

    /// Installs a verified record: current for its prefix if it uses dictionaries (and it is the
    /// newest), otherwise nothing (its decoder is loaded when a read needs it).
    fn install(&self, r: &Record) {
        let Some(p) = self.prefixes.iter().find(|p| p.prefix[..] == *r.meta.prefix.as_bytes()) else { return };
        match self.cache().install_current(&p.prefix, r.meta.id, &r.raw, p.level, r.meta.created_unix) {
            Ok(true) => tracing::info!(dict_id = r.meta.id, prefix = %r.meta.prefix, "dictionary is now current"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(dict_id = r.meta.id, error = %e, "dictionary refused");
                self.cache().mark_unavailable(r.meta.id, e.to_string());
            }
        }
    }

    /// Follows the store forever: list, then watch from the listing's revision; on any failure,
    /// start again. New dictionaries become current; deleted ones are forgotten.
    async fn follow(self: Arc<Self>) {
        let mut failures = 0u32;
        loop {
            let started = Instant::now();
            match self.follow_once().await {
                Ok(()) => failures = 0,
                Err(e) => {
                    // A watch that ran a while before failing starts the backoff again.
                    if started.elapsed() > WATCH_RETRY_MAX {
                        failures = 0;
                    }
                    let wait = crate::throttle::backoff(failures, WATCH_RETRY, WATCH_RETRY_MAX);
                    if failures == 0 || wait == WATCH_RETRY_MAX && failures % 10 == 0 {
                        tracing::warn!(error = %e, retry_in = ?wait, failures = failures + 1, "dictionary store watch failed; listing again");
                    } else {
                        tracing::debug!(error = %e, retry_in = ?wait, "dictionary store watch failed again");
                    }
                    failures = failures.saturating_add(1);
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
            tokio::time::sleep(WATCH_RETRY).await;
        }
    }

    async fn follow_once(&self) -> Result<(), DictionaryError> {
        let revision = self.sync().await?;
        let prefix = Bytes::from(self.store.prefix().to_string());
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
                range_end: crate::codec::prefix_end(&prefix).map(Bytes::from).unwrap_or_default(),
                key: prefix,
                start_revision: revision + 1,
                ..Default::default()
            })),
        };
        let requests = futures::StreamExt::chain(futures::stream::iter([create]), futures::stream::pending());
        let mut client = WatchClient::new(self.channel.clone()).max_decoding_message_size(usize::MAX);
        let mut events = client.watch(requests).await?.into_inner();
        while let Some(resp) = events.message().await? {
            if resp.canceled {
                return Err(Status::aborted(format!("dictionary watch canceled: {}", resp.cancel_reason)).into());
            }
            for ev in resp.events {
                let Some(kv) = ev.kv else { continue };
                if ev.r#type == EventType::Delete as i32 {
                    let Some(id) = self.store.id_of(&kv.key) else { continue };
                    tracing::warn!(dict_id = id, "dictionary deleted from etcd; values that need it can no longer be read");
                    self.cache().mark_unavailable(id, format!("its key {} was deleted", String::from_utf8_lossy(&kv.key)));
                    if !self.cache().remove(id).is_empty() {
                        self.sync().await?;
                    }
                    continue;
                }
                match self.store.parse(&kv.key, &kv.value, kv.mod_revision) {
                    Some(Ok(record)) => self.install(&record),
                    Some(Err(e)) => tracing::error!(error = %e, "dictionary refused"),
                    None => {}
                }
            }
        }
        Ok(())
    }

    /// Campaigns for the trainer role forever; while leading, trains each prefix every
    /// `retrain_interval`.
    async fn campaign(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        let election = Election::new(self.channel.clone(), self.config.election_key.clone(), self.config.election_ttl, self.identity.clone());
        while !*stopped.borrow() {
            match election.try_acquire().await {
                Ok(Some(leadership)) => {
                    tracing::info!(identity = %self.identity, "elected dictionary trainer");
                    let lease = leadership.lease;
                    tokio::select! {
                        _ = self.lead(&leadership) => {
                            tracing::info!(identity = %self.identity, "no longer the dictionary trainer");
                        }
                        _ = until_stopped(&mut stopped) => {
                            match leadership.resign().await {
                                Ok(()) => tracing::info!(identity = %self.identity, lease, "resigned as dictionary trainer"),
                                Err(e) => tracing::warn!(identity = %self.identity, lease, error = %e, "cannot resign as dictionary trainer: the election key goes when its lease expires"),
                            }
                            return;
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "trainer election failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.election_ttl / 2) => {}
                _ = until_stopped(&mut stopped) => return,
            }
        }
    }

    async fn lead(&self, leadership: &Leadership) {
        let mut lost = leadership.lost_signal();
        let now = Instant::now();
        let mut due: Vec<Instant> = self.prefixes.iter().map(|p| self.first_due(p, now)).collect();
        loop {
            for (p, due) in self.prefixes.iter().zip(due.iter_mut()) {
                if leadership.is_lost() {
                    return;
                }
                if *due > Instant::now() {
                    continue;
                }
                match self.train_prefix(p, &[leadership.guard()]).await {
                    Ok(report) => log_report(&report),
                    Err(DictionaryError::Store(StoreError::GuardFailed)) => return,
                    Err(e) => tracing::info!(prefix = %p.name(), error = %e, "no dictionary trained"),
                }
                *due = Instant::now() + self.config.retrain_interval;
            }
            let next = due.iter().min().copied().unwrap_or_else(|| Instant::now() + self.config.retrain_interval);
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = lost.wait_for(|l| *l) => return,
            }
        }
    }

    /// When a new leader first trains `p`: a retrain interval after its current dictionary was
    /// created, or now when it has none.
    fn first_due(&self, p: &DictionaryPrefix, now: Instant) -> Instant {
        match self.cache().encoder(&p.prefix) {
            Some(current) => {
                let age = Duration::from_secs(unix_now().saturating_sub(current.created_unix));
                now + self.config.retrain_interval.saturating_sub(age)
            }
            None => now,
        }
    }

    /// The prefix of `config` named `prefix` that uses dictionaries.
    pub fn prefix(&self, prefix: &str) -> Result<&DictionaryPrefix, DictionaryError> {
        self.prefixes.iter().find(|p| p.prefix[..] == *prefix.as_bytes()).ok_or_else(|| DictionaryError::NotADictionaryPrefix(prefix.into()))
    }

    /// One training round for `p`: samples from the reservoir (and from etcd when the reservoir
    /// holds fewer than half of `dictionaries.samples`), trains off the async runtime, and
    /// publishes under `guard` if the candidate beats the current dictionary by `min_gain`.
    pub async fn train_prefix(&self, p: &DictionaryPrefix, guard: &[Compare]) -> Result<TrainReport, DictionaryError> {
        let mut samples = self.reservoirs.get(&p.prefix).map(|r| r.lock().expect("reservoir lock").samples()).unwrap_or_default();
        if samples.len() < self.config.samples / 2 {
            samples.extend(self.sample_from_etcd(p, self.config.samples - samples.len()).await?);
        }
        let current = match self.cache().encoder(&p.prefix) {
            Some(c) => self.store.get(c.id).await?.map(|r| r.raw),
            None => None,
        };
        tracing::info!(prefix = %p.name(), samples = samples.len(), "training a dictionary");
        let (size, level) = (self.config.size.as_u64() as usize, p.level);
        let candidate = tokio::task::spawn_blocking(move || training::train(&samples, size, level, current.as_deref()))
            .await
            .map_err(|e| Status::internal(format!("training task: {e}")))?
            .map_err(|source| DictionaryError::Train { prefix: p.name(), source })?;
        let mut report =
            TrainReport { prefix: p.name(), candidate_samples: candidate.samples, heldout: (candidate.heldout_before, candidate.heldout_after), published: None };
        if candidate.gain() < self.config.min_gain {
            return Ok(report);
        }
        let meta = candidate.meta(&p.name(), level, &self.identity);
        let record = self.store.publish(meta, &candidate.raw, guard).await?;
        self.install(&record);
        report.published = Some(record.meta);
        Ok(report)
    }

    /// Up to `wanted` samples of the logical values stored under `p` (a uniform sample of at most
    /// `wanted × 4` keys, read a page at a time at one revision). Keys that belong to a longer
    /// prefix, and values that cannot be decoded, are skipped.
    pub async fn sample_from_etcd(&self, p: &DictionaryPrefix, wanted: usize) -> Result<Vec<Bytes>, DictionaryError> {
        let mut reservoir = Reservoir::new(wanted, self.config.sample_max_bytes.as_u64() as usize);
        let mut kv = self.store.kv();
        let end = crate::codec::prefix_end(&p.prefix).unwrap_or_else(|| vec![0]);
        let mut pages = crate::pager::RangePager::new(&p.prefix, &end, 0, SAMPLE_PAGE);
        let mut scanned = 0;
        while scanned < wanted * SCAN_KEYS_PER_SAMPLE {
            let Some(mut page) = pages.next_page(&mut kv).await? else { break };
            let revision = pages.revision();
            self.prefetch(&mut page).await?;
            for item in &page.kvs {
                scanned += 1;
                if self.codec.rule_for(&item.key).is_none_or(|r| r.prefix != p.prefix) {
                    continue;
                }
                let v = match self.codec.decode(&item.key, &item.value) {
                    Ok(v) => v,
                    // A delta frame (the FlyteWorkflow default): its base is a whole version of
                    // the same key, as good a sample.
                    Err(_) => match self.base_content(&item.key, &item.value, revision).await {
                        Some(v) => v,
                        None => continue,
                    },
                };
                if v.len() >= p.min_size.max(1) && !v.starts_with(K8S_ENCRYPTED_PREFIX) {
                    reservoir.offer(&v, &mut rand::rng());
                }
            }
        }
        Ok(reservoir.samples())
    }
}

impl Dictionaries {
    /// The content of the base a delta frame `value` of `key` names, read at `revision`;
    /// `None` when it is not a delta frame or its base cannot be read.
    async fn base_content(&self, key: &Bytes, value: &[u8], revision: i64) -> Option<Bytes> {
        let base = frame::parse(value).ok()?.base?;
        let base_key = crate::codec::delta::base_key(key, base.id);
        let read = RangeRequest { key: base_key.clone(), revision, ..Default::default() };
        let resp = self.store.kv().range(read).await.ok()?.into_inner();
        let record = &resp.kvs.first()?.value;
        self.ensure(key, crate::codec::delta::record_frame(record)?).await.ok()?;
        let decoded = crate::codec::decode_base(&base_key, record, self.codec.max_value_bytes(), &**self.codec.dictionaries()).ok()?;
        Some(decoded.content)
    }
}

/// Loads dictionary `id` from the store into `cache` (the single-flight body).
async fn fetch_decoder(store: Store, cache: Arc<DictionaryCache>, id: u32) -> Result<(), LoadFailure> {
    crate::metrics::get().dictionary_cache_fetches.inc();
    let why = match store.get(id).await {
        Ok(Some(record)) => match cache.insert_decoder(id, &record.raw) {
            Ok(_) => {
                tracing::info!(dict_id = id, prefix = %record.meta.prefix, "dictionary loaded");
                return Ok(());
            }
            Err(e) => e.to_string(),
        },
        Ok(None) => format!("no such key {} in etcd", String::from_utf8_lossy(&store.key(id))),
        Err(StoreError::Etcd(status)) => {
            tracing::warn!(dict_id = id, error = %status, "cannot read dictionary from etcd");
            return Err(LoadFailure::Etcd(status));
        }
        Err(e) => e.to_string(),
    };
    tracing::error!(dict_id = id, reason = %why, "dictionary unavailable");
    cache.mark_unavailable(id, why);
    Err(LoadFailure::Unavailable)
}

fn log_report(r: &TrainReport) {
    match &r.published {
        Some(m) => tracing::info!(prefix = %r.prefix, dict_id = m.id, gain = %format!("{:.1}%", r.gain() * 100.0), size = m.size, "dictionary published"),
        None => tracing::info!(prefix = %r.prefix, gain = %format!("{:.1}%", r.gain() * 100.0), "trained dictionary not published: gain below dictionaries.min_gain"),
    }
}
