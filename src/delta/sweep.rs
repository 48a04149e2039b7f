//! The orphan sweep: deletes delta-frame bases that no value etcd can still serve needs.
//!
//! Bases are collected on the write path (a later write of the same key deletes the bases it
//! superseded, once the horizon is past them). What that leaves behind: the bases of a deleted
//! key (however it went: a DeleteRange through the proxy, of one key or a range, a lease that
//! ended, a delete directly in etcd; a delete Txn cannot take them, events before it may still
//! be on their way to a lagging watcher), and the superseded bases of a key never written again. One replica at a time (elected on
//! [`ELECTION_KEY`] as the dictionary trainer is) sweeps them every [`crate::config::Config`]
//! `sweep_interval`:
//!
//! 1. **Survey** ([`survey`]), one revision R pinned: list `/etcd-squeeze/bases/` (keys only) and
//!    the keys of every prefix with delta frames (keys only); each base directory is named by a
//!    hash of its key, so the listed keys name most directories. A directory no listed key names
//!    is read once (its newest base record names its key) and the key is looked up at R.
//! 2. **Superseded** (the key exists): every base but the newest. A base X is written in the
//!    same Txn as the first version that is a delta against it, and a version is a delta against
//!    X only while the guard `MOD(K) == m` proves that K's current version uses X: so no version
//!    written at or after the next base's revision S uses X. Only the versions before S, and the
//!    event at S (its prev_kv), need X. X goes once the horizon (compaction, and every
//!    replica's watch floor: [`crate::members::Members::horizon`]) is past S.
//! 3. **Key gone**: every base, but in two steps: the key was deleted at some revision D ≤ R the
//!    sweep cannot see, so the directory is remembered with R, and deleted at a later sweep once
//!    the horizon is past R (so past D).
//! 4. Each deletion is a Txn guarded by the sweeper's leadership and by `MOD(X) == m` for each
//!    base X it deletes (the mod_revision listed): a base written again since is kept.
//!
//! The newest base of a key that exists is kept even when its current value is stored per
//! object (written while `delta = "auto"` fell back, or by a replica with delta frames off): at
//! most one base per key, collected with the key. Each round deletes at most
//! [`MAX_DELETES_PER_ROUND`] bases and reads at most [`MAX_RECORD_READS_PER_ROUND`] records.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use crate::codec::delta::{bases_dir, record_key, BASES_PREFIX};
use crate::codec::prefix_end;
use crate::proto::etcdserverpb::kv_client::KvClient;
use crate::proto::etcdserverpb::{request_op, Compare, DeleteRangeRequest, RangeRequest, RequestOp, TxnRequest};
use crate::upstream::Upstream;

/// The sweeper election key (a lease-bound key, as the dictionary trainer's).
pub const ELECTION_KEY: &str = "/etcd-squeeze/sweeper";
/// The sweeper's lease TTL: a killed sweeper is replaced this long after.
pub const ELECTION_TTL: Duration = Duration::from_secs(10);
/// Keys per Range page of a survey.
const PAGE: i64 = 1000;
/// Bases deleted per Txn (etcd refuses more than `--max-txn-ops`, 128 by default, per Txn).
const DELETES_PER_TXN: usize = 64;
/// The most bases one round deletes.
pub const MAX_DELETES_PER_ROUND: usize = 10_000;
/// The most base records one round reads to learn the key of a directory no listed key names.
pub const MAX_RECORD_READS_PER_ROUND: usize = 1_000;
/// Directories of deleted keys remembered between rounds at most.
const MAX_PENDING: usize = 100_000;

/// One base key as listed: its etcd key and mod_revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedBase {
    /// `/etcd-squeeze/bases/<hash>/<id>`.
    pub key: Bytes,
    /// The base key's mod_revision at the survey's revision.
    pub mod_revision: i64,
}

/// A base that only revisions before `superseded_at` (and the event at it) need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superseded {
    /// The base.
    pub base: ListedBase,
    /// The revision of the next base of the same key.
    pub superseded_at: i64,
}

/// The bases of a key that did not exist at the survey's revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gone {
    /// The base directory (`/etcd-squeeze/bases/<hash>/`).
    pub dir: Bytes,
    /// The key its records name.
    pub key: Bytes,
    /// Its bases, oldest first.
    pub bases: Vec<ListedBase>,
}

/// What a survey found, at one revision.
#[derive(Debug, Clone, Default)]
pub struct Survey {
    /// The revision every read of the survey was pinned at.
    pub revision: i64,
    /// Base keys listed.
    pub bases: u64,
    /// Base directories (keys with bases).
    pub dirs: u64,
    /// Bases of existing keys that a newer base superseded.
    pub superseded: Vec<Superseded>,
    /// Directories of keys that did not exist.
    pub gone: Vec<Gone>,
    /// Directories left alone: their record could not be read or does not name a key hashing to
    /// the directory, or the per-round read budget was spent.
    pub unresolved: u64,
}

impl Survey {
    /// Bases of keys that did not exist at the survey's revision.
    pub fn gone_bases(&self) -> u64 {
        self.gone.iter().map(|g| g.bases.len() as u64).sum()
    }
}

/// A failed etcd call of the sweep (the round is abandoned; the next one starts afresh).
#[derive(Debug, thiserror::Error)]
#[error("{call}: {status}")]
pub struct SweepError {
    /// The call, e.g. "Range of /etcd-squeeze/bases/".
    pub call: String,
    /// etcd's answer.
    pub status: tonic::Status,
}

/// The directory part of a base key (`/etcd-squeeze/bases/<32 hex>/`), if it is one.
fn dir_of(base_key: &[u8]) -> Option<&[u8]> {
    let rest = base_key.strip_prefix(BASES_PREFIX)?;
    (rest.len() > 33 && rest[32] == b'/').then(|| &base_key[..BASES_PREFIX.len() + 33])
}

/// Every key of [key, range_end) at `revision` (0: now; the first page's header revision then
/// pins the rest), keys only, in pages: (key, mod_revision) pairs and the revision read at.
async fn list_keys(kv: &mut KvClient<Upstream>, key: &[u8], range_end: &[u8], revision: i64) -> Result<(Vec<(Bytes, i64)>, i64), SweepError> {
    let mut out = Vec::new();
    let mut pages = crate::pager::RangePager::new(key, range_end, revision, PAGE).keys_only();
    let call = || format!("Range of {} (keys only)", crate::codec::KeyDisplay(key));
    while let Some(page) = pages.next_page(kv).await.map_err(|status| SweepError { call: call(), status })? {
        out.extend(page.kvs.into_iter().map(|kv| (kv.key, kv.mod_revision)));
    }
    Ok((out, pages.revision()))
}

/// Surveys the bases under `/etcd-squeeze/bases/` against the keys of `prefixes` (the prefixes
/// that may hold delta frames), at one revision. Reads only; see the module documentation.
/// `remembered` names keys of directories already resolved (dir → key), and learns new ones.
pub async fn survey(kv: &mut KvClient<Upstream>, prefixes: &[Bytes], remembered: &mut HashMap<Bytes, Bytes>) -> Result<Survey, SweepError> {
    let end = prefix_end(BASES_PREFIX).expect("a prefix ending in '/'");
    let (listed, revision) = list_keys(kv, BASES_PREFIX, &end, 0).await?;
    let mut dirs: BTreeMap<Bytes, Vec<ListedBase>> = BTreeMap::new();
    for (key, mod_revision) in listed {
        let Some(dir) = dir_of(&key) else { continue };
        let dir = key.slice_ref(dir);
        dirs.entry(dir).or_default().push(ListedBase { key, mod_revision });
    }
    let mut survey = Survey { revision, bases: dirs.values().map(|b| b.len() as u64).sum(), dirs: dirs.len() as u64, ..Default::default() };
    if dirs.is_empty() {
        return Ok(survey);
    }
    // The keys that exist, by directory.
    let mut live: HashSet<Bytes> = HashSet::new();
    for prefix in prefixes {
        let end = prefix_end(prefix).unwrap_or_else(|| vec![0]);
        let (keys, _) = list_keys(kv, prefix, &end, revision).await?;
        for (key, _) in keys {
            let dir = Bytes::from(bases_dir(&key));
            if dirs.contains_key(&dir) {
                remembered.insert(dir.clone(), key);
                live.insert(dir);
            }
        }
    }
    let mut reads = 0;
    for (dir, mut bases) in dirs {
        bases.sort_by_key(|b| b.mod_revision);
        let exists = if live.contains(&dir) {
            true
        } else {
            // A key outside the listed prefixes, or gone: its record names it.
            let key = match remembered.get(&dir) {
                Some(key) => Some(key.clone()),
                None if reads < MAX_RECORD_READS_PER_ROUND => {
                    reads += 1;
                    let newest = bases.last().expect("a listed directory has a base");
                    record_key_of(kv, &newest.key, revision).await?.filter(|key| bases_dir(key) == dir[..])
                }
                None => None,
            };
            let Some(key) = key else {
                survey.unresolved += 1;
                continue;
            };
            remembered.insert(dir.clone(), key.clone());
            let request = RangeRequest { key: key.clone(), count_only: true, revision, ..Default::default() };
            let call = || format!("Range of {}", crate::codec::KeyDisplay(&key));
            let count = kv.range(request).await.map_err(|status| SweepError { call: call(), status })?.into_inner().count;
            if count == 0 {
                survey.gone.push(Gone { dir, key, bases });
                continue;
            }
            true
        };
        if exists {
            // Every base but the newest, superseded at the next base's revision.
            for pair in bases.windows(2) {
                if pair[0].mod_revision < pair[1].mod_revision {
                    survey.superseded.push(Superseded { base: pair[0].clone(), superseded_at: pair[1].mod_revision });
                }
            }
        }
    }
    Ok(survey)
}

/// The key a base record names (`None`: gone since, or not a base record).
async fn record_key_of(kv: &mut KvClient<Upstream>, base_key: &Bytes, revision: i64) -> Result<Option<Bytes>, SweepError> {
    let request = RangeRequest { key: base_key.clone(), revision, ..Default::default() };
    let call = || format!("Range of {}", crate::codec::KeyDisplay(base_key));
    let resp = kv.range(request).await.map_err(|status| SweepError { call: call(), status })?.into_inner();
    Ok(resp.kvs.first().and_then(|kv| record_key(&kv.value).map(Bytes::copy_from_slice)))
}

/// What one round deleted, by reason.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Superseded bases of existing keys.
    pub superseded: u64,
    /// Bases of deleted keys.
    pub key_gone: u64,
}

/// The sweeper's memory between rounds (lost when another replica takes over: it starts again).
#[derive(Debug, Default)]
pub struct Sweeper {
    /// Directory → the key its records name.
    keys: HashMap<Bytes, Bytes>,
    /// Directory of a key found gone → the first survey revision it was gone at.
    gone_since: HashMap<Bytes, i64>,
}

impl Sweeper {
    /// One round: survey, then delete what the horizon allows (`horizon`: no read etcd serves
    /// and no watch event in flight through any replica is below it). `guard`: the compare that
    /// holds while this replica leads.
    pub async fn round(&mut self, kv: &mut KvClient<Upstream>, prefixes: &[Bytes], horizon: i64, guard: &Compare) -> Result<Swept, SweepError> {
        let survey = survey(kv, prefixes, &mut self.keys).await?;
        let mut swept = Swept::default();
        let mut budget = MAX_DELETES_PER_ROUND;
        let superseded: Vec<ListedBase> = survey.superseded.iter().filter(|s| s.superseded_at < horizon).map(|s| s.base.clone()).collect();
        swept.superseded += delete_guarded(kv, &superseded, guard, &mut budget).await?;
        let mut gone_since = HashMap::new();
        for gone in &survey.gone {
            let since = self.gone_since.get(&gone.dir).copied().unwrap_or(survey.revision);
            if since < horizon {
                // Bases listed then, unchanged since (a base written later is a new incarnation's).
                let old: Vec<ListedBase> = gone.bases.iter().filter(|b| b.mod_revision <= since).cloned().collect();
                swept.key_gone += delete_guarded(kv, &old, guard, &mut budget).await?;
                if old.len() == gone.bases.len() {
                    self.keys.remove(&gone.dir);
                    continue;
                }
                // Bases of a later incarnation of the key, gone again by this survey: from now.
                if gone_since.len() < MAX_PENDING {
                    gone_since.insert(gone.dir.clone(), survey.revision);
                }
                continue;
            }
            if gone_since.len() < MAX_PENDING {
                gone_since.insert(gone.dir.clone(), since);
            }
        }
        self.gone_since = gone_since;
        // Directories no longer listed are forgotten.
        if self.keys.len() > survey.dirs as usize * 2 + 1024 {
            self.keys.clear();
        }
        Ok(swept)
    }
}

/// Deletes `bases` in Txns of [`DELETES_PER_TXN`], each guarded by `guard` and `MOD(X) == m` per
/// base; returns how many were deleted (a Txn whose guard failed deletes none: a base was written
/// or deleted since, or the leadership is lost; the next round sees it again).
async fn delete_guarded(kv: &mut KvClient<Upstream>, bases: &[ListedBase], guard: &Compare, budget: &mut usize) -> Result<u64, SweepError> {
    let mut deleted = 0;
    for chunk in bases.chunks(DELETES_PER_TXN) {
        if *budget < chunk.len() {
            break;
        }
        *budget -= chunk.len();
        let mut compares = vec![guard.clone()];
        compares.extend(chunk.iter().map(|b| Compare::mod_equal(b.key.clone(), b.mod_revision)));
        let success = chunk
            .iter()
            .map(|b| RequestOp { request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest { key: b.key.clone(), ..Default::default() })) })
            .collect();
        let txn = TxnRequest { compare: compares, success, failure: vec![] };
        let resp = kv.txn(txn).await.map_err(|status| SweepError { call: "Txn deleting bases".into(), status })?.into_inner();
        if resp.succeeded {
            deleted += chunk.len() as u64;
        }
    }
    Ok(deleted)
}

/// Campaigns for the sweeper role until `stopped`; while leading, runs a round every `interval`
/// with the horizon `members` gives (no round while the replica view is not known).
pub async fn run(
    upstream: Upstream,
    identity: String,
    prefixes: Vec<Bytes>,
    members: Arc<crate::members::Members>,
    interval: Duration,
    stopped: watch::Receiver<bool>,
) {
    let election = crate::dictionary::training::Election::new(upstream.clone(), ELECTION_KEY, ELECTION_TTL, identity.clone());
    let mut kv = KvClient::new(upstream).max_decoding_message_size(usize::MAX);
    let metrics = crate::metrics::get();
    let stop = |stopped: &watch::Receiver<bool>| {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    while !*stopped.borrow() {
        match election.try_acquire().await {
            Ok(Some(leadership)) => {
                tracing::info!(identity = %identity, "elected base sweeper");
                let mut sweeper = Sweeper::default();
                let guard = leadership.guard();
                loop {
                    if leadership.is_lost() {
                        tracing::info!(identity = %identity, "no longer the base sweeper");
                        break;
                    }
                    let horizon = members.compacted().min(members.horizon());
                    if horizon > 0 {
                        match sweeper.round(&mut kv, &prefixes, horizon, &guard).await {
                            Ok(swept) => {
                                metrics.bases_swept.with_label_values(&["superseded"]).inc_by(swept.superseded);
                                metrics.bases_swept.with_label_values(&["key_gone"]).inc_by(swept.key_gone);
                                if swept != Swept::default() {
                                    tracing::info!(superseded = swept.superseded, key_gone = swept.key_gone, horizon, "swept bases");
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "base sweep round failed"),
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(interval) => {}
                        _ = stop(&stopped) => {
                            let _ = leadership.resign().await;
                            return;
                        }
                    }
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "sweeper election failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(ELECTION_TTL / 2) => {}
            _ = stop(&stopped) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_of_base_keys_only() {
        let key = crate::codec::delta::base_key(b"/registry/x", 7);
        let dir = bases_dir(b"/registry/x");
        assert_eq!(dir_of(&key), Some(&dir[..]));
        assert_eq!(dir_of(&dir), None);
        assert_eq!(dir_of(b"/etcd-squeeze/bases/short/1"), None);
        assert_eq!(dir_of(b"/registry/x"), None);
    }
}
