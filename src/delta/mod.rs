//! Delta frames at run time: which base each write uses, loading bases for reads, and the
//! bookkeeping that keeps bases alive exactly as long as some readable revision needs them.
//!
//! The pure parts (frame and base record formats, zstd calls) are in [`crate::codec::delta`];
//! this module decides and does I/O. The rules (docs/frame-format.md, "Delta frames"):
//!
//! - **Write.** A Put of key K under a prefix with `delta = true` is stored as a delta against
//!   K's current base only when the Txn's own compare `MOD(K) == m` proves that the version the
//!   proxy knows (K at mod_revision m, base B) is still K's current version: then B exists (bases
//!   of a current version are never deleted). Otherwise, or when the delta would be larger than
//!   `delta_rebase_fraction` of the value compressed alone, the proxy *rebases*: it adds a Put of
//!   a new base record to the same branch of the same Txn (one Txn is one revision, so no
//!   revision of its own) and stores K as a delta against it. Responses to the added operations
//!   are removed before the client sees the response.
//! - **Delete.** A DeleteRange leaves K's bases: events before it may still be on their way to a
//!   lagging watcher; the orphan sweep ([`sweep`]) deletes them once the horizon is past it.
//! - **History.** A base superseded at revision R (the next base's first revision) is deleted in
//!   a later write Txn of K once the compaction revision is past R: no readable revision of K
//!   needs it then. Until then every older revision of K still decodes.
//! - **Read.** Bases come from the byte-bounded [`cache::BaseCache`], else from etcd: at the
//!   current revision, else at the revision the value was read at (a base deleted since is still
//!   in etcd's history until compaction passes that revision).

pub mod cache;
pub mod sweep;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use crate::error::RequestError;

use crate::codec::delta::{self, Base, BaseRef};
use crate::codec::{prefix_end, EncodeError, EncodeOutcome, ValueCodec};
use crate::proto::etcdserverpb::kv_client::KvClient;
use crate::proto::etcdserverpb::{
    compare, request_op, response_op, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp,
    TxnRequest, TxnResponse,
};
use crate::rewrite::{EncodeStats, KeyValues};
use crate::upstream::Upstream;

/// What the proxy knows of one key's delta chain.
#[derive(Debug, Clone)]
struct Known {
    /// The newest mod_revision of the key this proxy has seen (written or read).
    mod_revision: i64,
    /// The base that version is a delta against.
    base: BaseRef,
    /// Older bases of the key and the revision from which they were no longer needed by new
    /// versions (an upper bound: the superseding base's first revision or later).
    superseded: Vec<(u64, i64)>,
}

/// Keys the knowledge map holds at most; beyond it is cleared (it only saves rebases and
/// collects superseded bases early; deleting a key still deletes all its bases).
const MAX_KNOWN_KEYS: usize = 1_000_000;
/// Bases one response loads from etcd at the same time.
const PARALLEL_BASE_LOADS: usize = 16;
/// How often the compaction revision is read back from etcd when no Compact call passed.
const COMPACTION_REFRESH: Duration = Duration::from_secs(60);

/// Whether a base record's content checksum was verified when the record came into memory.
#[derive(Debug, Clone, Copy)]
enum Verified {
    /// A record of the base cache: made by this process, or read from etcd and verified.
    Before,
    /// Read from etcd just now.
    Not,
}

/// Delta-frame state shared by every request of one proxy.
pub struct Deltas {
    codec: ValueCodec,
    /// The base cache `codec` reads as its base source; this fills it.
    bases: Arc<cache::BaseCache>,
    dictionaries: Arc<crate::dictionary::Dictionaries>,
    kv: KvClient<Upstream>,
    upstream: Upstream,
    members: Arc<crate::members::Members>,
    known: DashMap<Bytes, Known>,
    /// The newest compaction revision seen (Compact calls through the proxy, or read from etcd).
    compacted: Arc<AtomicI64>,
    compaction_read: Mutex<Option<Instant>>,
    enabled: bool,
}

impl std::fmt::Debug for Deltas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deltas")
            .field("enabled", &self.enabled)
            .field("known_keys", &self.known.len())
            .field("compacted", &self.compacted.load(Ordering::Relaxed))
            .finish()
    }
}

/// Where an added or rewritten operation sits in a Txn tree: for each nesting level, the
/// branch taken (`true` = success) and the index of the op in it.
type Path = Vec<(bool, usize)>;

/// What a rewritten write does to the proxy's knowledge, once etcd says its branch ran.
#[derive(Debug)]
enum Effect {
    /// `frame`: the delta frame the Put stores.
    Wrote { path: Path, key: Bytes, base: Arc<Base>, rebased: bool, collected: Vec<u64>, frame: Bytes },
    Deleted { path: Path, key: Bytes },
}

/// A Txn rewritten for delta frames: send `txn`, then hand the response to [`Deltas::finish`].
#[derive(Debug)]
pub struct Rewritten {
    /// The Txn to send to etcd.
    pub txn: TxnRequest,
    /// The client's Txn shape (ops per branch), to strip the responses of added operations.
    shape: TxnRequest,
    effects: Vec<Effect>,
    /// Bases this write created or used: decoding the response's prev_kvs may need them.
    pub pinned: Vec<Arc<Base>>,
}

impl Deltas {
    /// Delta state for `codec`'s prefix rules, filling `bases` (the cache `codec` reads) from
    /// `upstream`; `dictionaries` loads the dictionary a base record's frame names.
    pub fn new(
        codec: ValueCodec,
        bases: Arc<cache::BaseCache>,
        upstream: Upstream,
        dictionaries: Arc<crate::dictionary::Dictionaries>,
        members: Arc<crate::members::Members>,
    ) -> Arc<Self> {
        let enabled = codec.rules().iter().any(|r| r.delta.is_some());
        let kv = KvClient::new(upstream.clone()).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX);
        Arc::new(Deltas {
            dictionaries,
            codec,
            bases,
            kv,
            upstream,
            members,
            known: DashMap::new(),
            compacted: Arc::new(AtomicI64::new(0)),
            compaction_read: Mutex::new(None),
            enabled,
        })
    }

    /// True when some prefix writes delta frames.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// True when a Put of `key` is written as a delta frame now: its prefix has delta frames
    /// `true`, or `"auto"` while every announced replica reads them ([`crate::members`]).
    pub fn applies_to(&self, key: &[u8]) -> bool {
        self.enabled && self.codec.rule_for(key).and_then(|r| r.delta).is_some_and(|d| !d.auto || self.members.all_read("delta"))
    }

    /// True when `key` may have bases (its prefix has delta frames `true` or `"auto"`, whether
    /// or not they are written now): a single-key DeleteRange deletes them too, and values read
    /// back teach which base a version uses.
    pub fn has_bases(&self, key: &[u8]) -> bool {
        self.enabled && self.codec.rule_for(key).is_some_and(|r| r.delta.is_some())
    }

    /// The prefixes that may hold delta frames and bases (`delta` not `false`).
    pub fn base_prefixes(&self) -> Vec<Bytes> {
        self.codec.rules().iter().filter(|r| r.delta.is_some()).map(|r| r.prefix.clone()).collect()
    }

    /// The replica view deciding `"auto"` and the collection horizon.
    pub fn members(&self) -> &Arc<crate::members::Members> {
        &self.members
    }

    /// True when some op of the Txn tree writes or deletes a key with delta frames.
    pub fn touches(&self, txn: &TxnRequest) -> bool {
        self.enabled
            && txn.success.iter().chain(txn.failure.iter()).any(|op| match &op.request {
                Some(request_op::Request::RequestPut(p)) => self.applies_to(&p.key),
                Some(request_op::Request::RequestDeleteRange(d)) => self.has_bases(&d.key),
                Some(request_op::Request::RequestTxn(inner)) => self.touches(inner),
                _ => false,
            })
    }

    /// A compaction at `revision` passed through the proxy (etcd's `Compact` succeeded).
    pub fn observe_compaction(&self, revision: i64) {
        self.compacted.fetch_max(revision, Ordering::Relaxed);
        self.members.observe_compaction(revision);
    }

    /// The compare that makes a top-level Put of `key` a delta against its known base:
    /// `MOD(key) == m`, if the proxy knows a version of `key`.
    pub fn guard_for(&self, key: &[u8]) -> Option<Compare> {
        let known = self.known.get(key)?;
        Some(Compare::mod_equal(Bytes::copy_from_slice(key), known.mod_revision))
    }

    /// Rewrites a Txn: Puts under delta prefixes become delta frames (adding base Puts and the
    /// deletion of superseded bases to their branch), other Puts are encoded as usual, and
    /// single-key DeleteRanges of delta keys delete the key's bases too. `budget` is etcd's
    /// `--max-txn-ops` for this Txn (less when it is sent nested in another one). Loads the bases
    /// it needs first (from the cache, else etcd). Errors: an [`EncodeError`] as `encode_txn`'s,
    /// or etcd's status when a base cannot be read.
    pub async fn rewrite(&self, txn: TxnRequest, budget: usize, stats: &mut EncodeStats) -> Result<Rewritten, RequestError> {
        self.refresh_compaction_in_background();
        // Load the current bases the guarded Puts will be deltas against.
        let mut pinned = Vec::new();
        let mut wanted = Vec::new();
        self.guarded_puts(&txn, &[], &mut wanted);
        for (key, r) in wanted {
            if let Some(base) = self.base(&key, r, &[]).await? {
                pinned.push(base);
            }
        }
        // A key this Txn deletes (anywhere: etcd accepts a Put then a Delete of one key in sibling
        // nested Txns) gets no delta: the added delete of its bases could remove the new base.
        let mut deleted = Vec::new();
        single_key_deletes(&txn, &mut |key| {
            if self.has_bases(key) {
                deleted.push(Bytes::copy_from_slice(key));
            }
        });
        let shape = txn.clone();
        let mut txn = txn;
        // Superseded bases are collected below the horizon: compaction, and every replica's watches.
        let horizon = self.compacted.load(Ordering::Relaxed).min(self.members.horizon());
        let mut ctx = Ctx { pinned, effects: Vec::new(), path: Vec::new(), deleted, horizon, stats };
        self.rewrite_node(&mut txn, budget, &[], &mut ctx).map_err(RequestError::Refused)?;
        Ok(Rewritten { txn, shape, effects: ctx.effects, pinned: ctx.pinned })
    }

    /// Applies a response of a [`Rewritten`] Txn: strips the responses of added operations and
    /// records which bases the keys now use. After a rebase, the key's older bases are listed in
    /// the background (see [`Deltas::recover_superseded`]).
    pub fn finish(self: &Arc<Self>, rewritten: &Rewritten, resp: &mut TxnResponse) {
        strip(resp, &rewritten.shape);
        let revision = resp.header.as_ref().map_or(0, |h| h.revision);
        let metrics = crate::metrics::get();
        for effect in &rewritten.effects {
            match effect {
                Effect::Wrote { path, key, base, rebased, collected, .. } if ran(resp, path) => {
                    self.bases.insert(base.clone());
                    metrics.delta_writes.with_label_values(&[if *rebased { "rebase" } else { "delta" }]).inc();
                    metrics.bases_deleted.inc_by(collected.len() as u64);
                    self.advance(key, revision, BaseRef { id: base.id, checksum: base.checksum }, collected);
                    if *rebased {
                        let (deltas, key, id) = (self.clone(), key.clone(), base.id);
                        tokio::spawn(async move { deltas.recover_superseded(key, revision, id).await });
                    }
                }
                Effect::Deleted { path, key } if ran(resp, path) => {
                    self.known.remove(key);
                }
                // A Put that did not run (a GuaranteedUpdate that lost its compare): nobody will
                // read its frame.
                Effect::Wrote { key, frame, .. } => self.bases.forget(key, frame),
                _ => {}
            }
        }
    }

    /// Lists K's bases as of `revision` (the rebase that wrote base `current`) and records every
    /// other one as superseded: each at the next base's create_revision (from then on no new
    /// version of K can be a delta against it: its guard would fail), the newest at `revision`.
    /// So superseded bases are collected after compaction even when this proxy did not write
    /// them, or restarted since. Best effort: an error leaves them until K is deleted.
    async fn recover_superseded(&self, key: Bytes, revision: i64, current: u64) {
        let dir = delta::bases_dir(&key);
        let end = prefix_end(&dir).expect("a bases directory ends in '/'");
        let list = RangeRequest { key: Bytes::from(dir), range_end: Bytes::from(end), keys_only: true, revision, ..Default::default() };
        let Ok(resp) = self.kv.clone().range(list).await else { return };
        let mut bases: Vec<(i64, u64)> =
            resp.into_inner().kvs.iter().filter_map(|kv| Some((kv.create_revision, delta::id_of_base_key(&kv.key)?))).collect();
        bases.sort_unstable();
        let Some(mut k) = self.known.get_mut(&key[..]) else { return };
        for (i, &(_, id)) in bases.iter().enumerate() {
            if id == current || id == k.base.id {
                continue;
            }
            let at = bases.get(i + 1).map_or(revision, |(next, _)| *next).min(revision);
            supersede(&mut k.superseded, id, at);
        }
    }

    /// Learns from a value read back: K at `mod_revision` is a delta against `r`.
    fn learn(&self, key: &[u8], mod_revision: i64, r: BaseRef) {
        if self.has_bases(key) && mod_revision > 0 {
            self.advance(key, mod_revision, r, &[]);
        }
    }

    /// Records that K at `revision` is a delta against `r` (and that the `collected` bases are
    /// gone). Under the key's entry lock, and never backwards: responses of concurrent writes of
    /// one key may be handled out of order, and a current base must never be taken for superseded.
    fn advance(&self, key: &[u8], revision: i64, r: BaseRef, collected: &[u64]) {
        // The common case (a key already known) locks its entry without allocating a key.
        let mut entry = match self.known.get_mut(key) {
            Some(entry) => entry,
            None => {
                if self.known.len() >= MAX_KNOWN_KEYS {
                    self.known.clear();
                }
                self.known.entry(Bytes::copy_from_slice(key)).or_insert_with(|| Known { mod_revision: 0, base: r, superseded: Vec::new() })
            }
        };
        let k = entry.value_mut();
        if collected.is_empty() && k.mod_revision == revision && k.base.id == r.id {
            return; // already known: a read of the current version
        }
        k.superseded.retain(|(id, _)| !collected.contains(id));
        if k.mod_revision >= revision {
            // A newer version is already known: this one's base was superseded by it (at the latest).
            if k.base.id != r.id {
                supersede(&mut k.superseded, r.id, k.mod_revision);
            }
            return;
        }
        if k.mod_revision > 0 && k.base.id != r.id {
            let old = k.base.id;
            supersede(&mut k.superseded, old, revision);
        }
        k.mod_revision = revision;
        k.base = r;
    }

    /// The Puts under delta prefixes that a guard `MOD(K) == m` proves current, with the base
    /// the proxy knows for K at m (those bases are loaded before rewriting).
    fn guarded_puts(&self, txn: &TxnRequest, inherited: &[(Bytes, i64)], out: &mut Vec<(Bytes, BaseRef)>) {
        let guards = success_guards(txn, inherited);
        for (ops, guards) in [(&txn.success, &guards[..]), (&txn.failure, inherited)] {
            for op in ops {
                match &op.request {
                    Some(request_op::Request::RequestPut(p)) if !p.ignore_value && self.applies_to(&p.key) => {
                        if let Some(r) = self.known_base(&p.key, guards) {
                            out.push((p.key.clone(), r));
                        }
                    }
                    Some(request_op::Request::RequestTxn(inner)) => self.guarded_puts(inner, guards, out),
                    _ => {}
                }
            }
        }
    }

    /// K's known base, when one of `guards` is `MOD(K) == m` for the version the proxy knows.
    fn known_base(&self, key: &[u8], guards: &[(Bytes, i64)]) -> Option<BaseRef> {
        let known = self.known.get(key)?;
        guards.iter().any(|(k, m)| k == key && *m == known.mod_revision && *m > 0).then_some(known.base)
    }

    /// Rewrites one Txn of the tree. `budget` is etcd's limit for this Txn: `--max-txn-ops` at
    /// the top, and for a nested Txn the parent's limit minus the parent's operation count
    /// (`max(compares, success, failure)`), as etcd's `checkTxnRequest` computes it.
    fn rewrite_node(&self, txn: &mut TxnRequest, budget: usize, inherited: &[(Bytes, i64)], ctx: &mut Ctx<'_>) -> Result<(), EncodeError> {
        let guards = success_guards(txn, inherited);
        // Added operations only fill what etcd allows. A Txn with a nested Txn keeps its operation
        // count (so the nested one keeps the limit etcd gives it); the nested one gets the rest.
        let count = txn.compare.len().max(txn.success.len()).max(txn.failure.len());
        let nests = txn.success.iter().chain(txn.failure.iter()).any(|op| matches!(op.request, Some(request_op::Request::RequestTxn(_))));
        let limit = if nests { count.min(budget) } else { budget };
        let nested_budget = budget.saturating_sub(count);
        for success in [true, false] {
            let (ops, guards) = if success { (&mut txn.success, &guards[..]) } else { (&mut txn.failure, inherited) };
            let mut room = limit.saturating_sub(ops.len());
            let mut added: Vec<RequestOp> = Vec::new();
            for (i, op) in ops.iter_mut().enumerate() {
                ctx.path.push((success, i));
                match &mut op.request {
                    Some(request_op::Request::RequestPut(put)) => {
                        if let Some((base, rebased, collected, value)) = self.rewrite_put(put, guards, &mut room, &mut added, ctx)? {
                            // The write's watch events will decode without decompressing. Before
                            // etcd answers (the events may come first), and whether or not the
                            // Put runs: the frame decodes to the value either way. Copied: the
                            // value is a slice of the client's request.
                            self.bases.remember_copy(&put.key, &put.value, &value);
                            let path = ctx.path.clone();
                            ctx.effects.push(Effect::Wrote { path, key: put.key.clone(), base, rebased, collected, frame: put.value.clone() });
                        }
                    }
                    // The key's bases stay: a watch event before the delete (or the DELETE
                    // event's prev_kv) may still be on its way to a lagging watcher; the sweep
                    // deletes them once the horizon is past the delete ([`sweep`]).
                    Some(request_op::Request::RequestDeleteRange(d)) if d.range_end.is_empty() && self.has_bases(&d.key) => {
                        ctx.effects.push(Effect::Deleted { path: ctx.path.clone(), key: d.key.clone() });
                    }
                    Some(request_op::Request::RequestTxn(inner)) => self.rewrite_node(inner, nested_budget, guards, ctx)?,
                    _ => {}
                }
                ctx.path.pop();
            }
            ops.extend(added);
        }
        Ok(())
    }

    /// One Put: a delta against the proven base, else a rebase (when the branch has room), else
    /// the usual per-value frame. Returns, for a delta frame, the base used, whether it is new,
    /// the superseded bases whose deletion was added, and the client's value (the frame is now
    /// `put.value`).
    fn rewrite_put(
        &self,
        put: &mut PutRequest,
        guards: &[(Bytes, i64)],
        room: &mut usize,
        added: &mut Vec<RequestOp>,
        ctx: &mut Ctx<'_>,
    ) -> Result<Option<Wrote>, EncodeError> {
        let plain = |put: &mut PutRequest, stats: &mut EncodeStats| crate::rewrite::encode_put(&self.codec, put, stats).map(|()| None);
        // A key with a lease is deleted by etcd when the lease ends, without a DeleteRange the
        // proxy could extend to its bases: such values are stored per value, never as deltas. So
        // is a key the same Txn deletes.
        if put.ignore_value || put.lease != 0 || put.ignore_lease || !self.applies_to(&put.key) || ctx.deleted.contains(&put.key) {
            return plain(put, ctx.stats);
        }
        let Some(rule) = self.codec.delta_candidate(&put.key, &put.value) else { return plain(put, ctx.stats) };
        let fraction = rule.delta.expect("delta rule").rebase_fraction;
        let prefix = rule.prefix.clone();
        let known = self.known_base(&put.key, guards);
        let current = known.and_then(|r| ctx.pinned.iter().find(|b| b.id == r.id && b.checksum == r.checksum && b.key == put.key).cloned());
        let mut chosen = None;
        if let Some(base) = current {
            // A value twice as large or half as small as its base has drifted away from it: the
            // estimate below would then be off (small objects compress less), and a large base
            // would be kept alive by a small object.
            let (len, base_len) = (put.value.len(), base.content.len().max(1));
            if len <= 2 * base_len && 2 * len >= base_len {
                let frame = self.codec.encode_delta(&put.key, &put.value, &base)?.expect("a delta candidate");
                // The value compressed alone, estimated from the base's (no second compression).
                let alone = base.record_len as f64 * len as f64 / base_len as f64;
                if (frame.len() as f64) <= fraction * alone {
                    chosen = Some((frame, base, false));
                }
            }
        }
        if chosen.is_none() && *room > 0 {
            *room -= 1;
            let id = loop {
                let id: u64 = rand::random();
                if id != 0 {
                    break id;
                }
            };
            // The base is stored as the value would be on its own (the prefix's dictionary too).
            let (alone, _) = self.codec.encode(&put.key, &put.value)?;
            let (record, base) = delta::encode_base(&put.key, id, &put.value, &alone);
            let base = Arc::new(base);
            let frame = self.codec.encode_delta(&put.key, &put.value, &base)?.expect("a delta candidate");
            self.bases.insert_record(&put.key, id, &record);
            added.push(op_put(delta::base_key(&put.key, id), record));
            ctx.pinned.push(base.clone());
            chosen = Some((frame, base, true));
        }
        let Some((frame, base, rebased)) = chosen else { return plain(put, ctx.stats) };
        // Superseded bases that no readable revision needs any more (compaction is past them).
        let mut collected = Vec::new();
        if let Some(k) = self.known.get(&put.key) {
            for &(id, at) in &k.superseded {
                if *room == 0 || ctx.horizon <= at || id == base.id || id == k.base.id {
                    continue;
                }
                *room -= 1;
                let bk = delta::base_key(&put.key, id);
                added.push(op_delete(bk, Bytes::new()));
                collected.push(id);
            }
        }
        let stored = if rebased { frame.len() + base.record_len } else { frame.len() };
        ctx.stats.add(Some(&prefix), put.value.len(), stored, EncodeOutcome::Delta);
        let value = std::mem::replace(&mut put.value, frame);
        Ok(Some((base, rebased, collected, value)))
    }

    /// Loads every base `msg` needs (cache, else etcd) and returns them pinned for decoding.
    /// `read_revisions` are the revisions the message's values were read at, when older than the
    /// current one (a Range's `revision`, those of the Ranges inside a Txn), and the revision just
    /// before a write (its prev_kvs): a base deleted since is still there. Unreadable bases are
    /// left out: decoding then names key and base.
    pub async fn prefetch<T: KeyValues>(&self, msg: &mut T, read_revisions: &[i64]) -> Result<Vec<Arc<Base>>, RequestError> {
        let needs = self.needs(msg, read_revisions);
        self.load_bases(needs).await
    }

    /// The bases `msg`'s delta frames need, each with the revisions its value was read at
    /// (`read_revisions`, then its own mod_revision): what [`Deltas::load_bases`] takes.
    pub fn needs<T: KeyValues>(&self, msg: &mut T, read_revisions: &[i64]) -> Vec<(Bytes, BaseRef, Vec<i64>)> {
        let mut needs = Vec::new();
        let _ = msg.try_for_each_kv(&mut |kv| {
            if let Some(r) = self.codec.needed_base(&kv.key, &kv.value) {
                let mut revisions = read_revisions.to_vec();
                revisions.push(kv.mod_revision);
                needs.push((kv.key.clone(), r, revisions));
            }
            Ok::<(), ()>(())
        });
        needs
    }

    /// Loads the bases of `needs` — `(key, base, revisions the value was read at)`, from
    /// [`Deltas::needs`] — and returns them pinned for decoding (see [`Deltas::prefetch`]);
    /// deduplicated, at most [`PARALLEL_BASE_LOADS`] at a time: a cold proxy answering a LIST of
    /// thousands of delta-framed objects reads their bases concurrently.
    pub async fn load_bases(&self, mut needs: Vec<(Bytes, BaseRef, Vec<i64>)>) -> Result<Vec<Arc<Base>>, RequestError> {
        use futures::{StreamExt, TryStreamExt};
        if needs.is_empty() {
            return Ok(Vec::new()); // the common case: no delta frame in the response
        }
        let mut seen = std::collections::HashSet::new();
        needs.retain(|(key, r, _)| seen.insert((key.clone(), r.id)));
        futures::stream::iter(needs)
            .map(|(key, r, revisions)| async move { self.base(&key, r, &revisions).await })
            .buffer_unordered(PARALLEL_BASE_LOADS)
            .try_filter_map(|base| async move { Ok(base) })
            .try_collect()
            .await
    }

    /// Base `r` of `key`: cached, else read from etcd at the current revision, then at each of
    /// `revisions` (> 0) until found. `Ok(None)` when it is nowhere (decoding then says so);
    /// an error only when etcd cannot be asked.
    async fn base(&self, key: &Bytes, r: BaseRef, revisions: &[i64]) -> Result<Option<Arc<Base>>, RequestError> {
        let metrics = crate::metrics::get();
        if let Some(base) = self.bases.get(key, r.id) {
            metrics.base_cache_hits.inc();
            return Ok(Some(base));
        }
        metrics.base_cache_misses.inc();
        let base_key = delta::base_key(key, r.id);
        // The record, compressed, may still be cached: decompressed without asking etcd.
        if let Some(record) = self.bases.get_record(key, r.id) {
            if let Ok(base) = self.decode_record(key, r, &base_key, &record, Verified::Before).await? {
                metrics.base_cache_record_hits.inc();
                return Ok(Some(base));
            }
        }
        let mut tried = Vec::new();
        for &revision in std::iter::once(&0).chain(revisions.iter().filter(|&&rev| rev > 0)) {
            if tried.contains(&revision) {
                continue;
            }
            tried.push(revision);
            let read = RangeRequest { key: base_key.clone(), revision, ..Default::default() };
            let resp = match self.kv.clone().range(read).await {
                Ok(resp) => resp.into_inner(),
                // Compacted or future revision: try the next one.
                Err(status) if status.code() == tonic::Code::OutOfRange => continue,
                Err(status) => return Err(RequestError::Etcd(status)),
            };
            let Some(kv) = resp.kvs.first() else { continue };
            metrics.base_fetches.inc();
            metrics.base_fetched_bytes.inc_by(kv.value.len() as u64);
            let refused = |why: String| format!("the record at {} is refused: {why}", crate::codec::KeyDisplay(&base_key));
            match self.decode_record(key, r, &base_key, &kv.value, Verified::Not).await? {
                Ok(base) => {
                    self.bases.insert_record(key, r.id, &kv.value);
                    return Ok(Some(base));
                }
                Err(why) => self.bases.mark_unavailable(key, r.id, refused(why)),
            }
            tracing::error!(key = %crate::codec::KeyDisplay(key), base = %format_args!("{:016x}", r.id), "refused a stored base");
            return Ok(None);
        }
        let detail = format!("no key {} at the current revision{}", crate::codec::KeyDisplay(&base_key),
            if tried.len() > 1 { format!(" nor at revisions {:?} (deleted, or compacted away)", &tried[1..]) } else { String::new() });
        self.bases.mark_unavailable(key, r.id, detail);
        Ok(None)
    }

    /// Decodes base record `record` (stored at `base_key`) of base `r` of `key` (`verified`: a
    /// cached record, whose content checksum was verified when it was cached), loading the
    /// dictionary its frame names first, and caches the base: `Ok(Err(why))` when the record is
    /// refused (corrupt, or not the content the frame names); `Err` only when etcd cannot be asked.
    async fn decode_record(&self, key: &Bytes, r: BaseRef, base_key: &[u8], record: &[u8], verified: Verified) -> Result<Result<Arc<Base>, String>, RequestError> {
        if let Some(frame) = delta::record_frame(record) {
            self.dictionaries.ensure(key, frame).await?;
        }
        let read = match verified {
            Verified::Before => crate::codec::decode_verified_base,
            Verified::Not => crate::codec::decode_base,
        };
        Ok(match read(base_key, record, self.codec.max_value_bytes(), &**self.codec.dictionaries()) {
            Ok(base) if base.checksum == r.checksum => {
                let base = Arc::new(base);
                self.bases.insert(base.clone());
                Ok(base)
            }
            Ok(_) => Err("its content has another checksum than the frame names".into()),
            Err(e) => Err(e.to_string()),
        })
    }

    /// Takes out of `msg` the delta-framed values decoded (or written) lately, before anything is
    /// loaded for it: each such value is emptied (so nothing loads or decodes it) and its key's
    /// base learnt; [`Recalled::restore`] puts the decoded values back after the decode of the
    /// rest. At most `limits.max_response_bytes` decompressed bytes are recalled: the decode of
    /// the rest then has what is left of it (see `crate::rewrite::decode_with`).
    pub fn recall<T: KeyValues>(&self, msg: &mut T) -> Recalled {
        let budget = self.codec.max_response_bytes();
        let mut recalled = Recalled { slots: Vec::new(), bytes: 0 };
        let metrics = crate::metrics::get();
        let mut ordinal = 0;
        let _ = msg.try_for_each_kv(&mut |kv| {
            if let Some(r) = self.codec.needed_base(&kv.key, &kv.value) {
                let slot = match self.bases.recall(&kv.key, &kv.value) {
                    Some(value) if recalled.bytes + value.len() as u64 <= budget => {
                        metrics.decoded_recalls.inc();
                        self.learn(&kv.key, kv.mod_revision, r);
                        recalled.bytes += value.len() as u64;
                        kv.value = Bytes::new();
                        Slot::Recalled(value)
                    }
                    _ => Slot::Framed(kv.value.clone()),
                };
                recalled.slots.push((ordinal, slot));
            }
            ordinal += 1;
            Ok::<(), ()>(())
        });
        recalled
    }

    /// Learns which base each delta-framed value in `msg` uses (after a successful decode).
    pub fn learn_from<T: KeyValues>(&self, msg: &mut T) {
        if !self.enabled {
            return;
        }
        let _ = msg.try_for_each_kv(&mut |kv| {
            if let Some(r) = self.codec.needed_base(&kv.key, &kv.value) {
                self.learn(&kv.key, kv.mod_revision, r);
            }
            Ok::<(), ()>(())
        });
    }

    /// Reads etcd's compaction revision at most once per minute, in the background (a watch
    /// from revision 1 is refused with `compact_revision`, which etcd reports as it is).
    fn refresh_compaction_in_background(&self) {
        {
            let mut last = self.compaction_read.lock().expect("compaction lock");
            if last.is_some_and(|t| t.elapsed() < COMPACTION_REFRESH) {
                return;
            }
            *last = Some(Instant::now());
        }
        let (upstream, compacted, members) = (self.upstream.clone(), self.compacted.clone(), self.members.clone());
        tokio::spawn(async move {
            if let Some(revision) = crate::members::compaction_revision(upstream).await {
                compacted.fetch_max(revision, Ordering::Relaxed);
                members.observe_compaction(revision);
            }
        });
    }
}

/// The state of one Txn rewrite, shared by every level of the Txn tree.
struct Ctx<'a> {
    /// Bases loaded or created for this Txn.
    pinned: Vec<Arc<Base>>,
    effects: Vec<Effect>,
    /// Where the op being rewritten sits.
    path: Path,
    /// Delta keys a single-key DeleteRange of this Txn deletes: their Puts get no delta.
    deleted: Vec<Bytes>,
    /// Below this revision no read can need a base (compaction, and every replica's watch
    /// floor: [`crate::members::Members::horizon`]), when the rewrite began.
    horizon: i64,
    stats: &'a mut EncodeStats,
}

/// Calls `f` with the key of every single-key DeleteRange in a Txn tree (both branches, nested Txns).
fn single_key_deletes(txn: &TxnRequest, f: &mut impl FnMut(&[u8])) {
    for op in txn.success.iter().chain(txn.failure.iter()) {
        match &op.request {
            Some(request_op::Request::RequestDeleteRange(d)) if d.range_end.is_empty() => f(&d.key),
            Some(request_op::Request::RequestTxn(inner)) => single_key_deletes(inner, f),
            _ => {}
        }
    }
}

/// What [`Deltas::recall`] took out of a message: its delta frames, by ordinal of their
/// `KeyValue` in the message.
#[derive(Debug)]
pub struct Recalled {
    slots: Vec<(usize, Slot)>,
    /// Decompressed bytes recalled (charged to the response's budget).
    pub bytes: u64,
}

#[derive(Debug)]
enum Slot {
    /// A delta frame decoded lately: its value, put back by [`Recalled::restore`].
    Recalled(Bytes),
    /// A delta frame the decode has to decompress: remembered once it has.
    Framed(Bytes),
}

/// Responses with more delta frames to decompress than this (a LIST, a long page) leave the
/// values lately decoded as they are: remembering them would push out what pending watch events
/// of this replica's writes need, for values nobody reads again soon.
const REMEMBERED_PER_RESPONSE: usize = 8;

impl Recalled {
    /// After `msg` was decoded: puts the recalled values back, and remembers the delta frames
    /// decoded meanwhile (not a value passed on as stored; none from a response with more than
    /// [`REMEMBERED_PER_RESPONSE`] of them).
    pub fn restore<T: KeyValues>(self, deltas: &Deltas, msg: &mut T) {
        if self.slots.is_empty() {
            return;
        }
        let remember = self.slots.iter().filter(|(_, s)| matches!(s, Slot::Framed(_))).count() <= REMEMBERED_PER_RESPONSE;
        let mut slots = self.slots.into_iter().peekable();
        let mut ordinal = 0;
        let _ = msg.try_for_each_kv(&mut |kv| {
            if slots.peek().is_some_and(|(at, _)| *at == ordinal) {
                match slots.next().expect("peeked").1 {
                    Slot::Recalled(value) => kv.value = value,
                    // Decoded (a value passed on as stored is still the frame).
                    Slot::Framed(frame) if remember && kv.value != frame => deltas.bases.remember(&kv.key, &frame, kv.value.clone()),
                    Slot::Framed(_) => {}
                }
            }
            ordinal += 1;
            Ok::<(), ()>(())
        });
    }
}

/// A Put stored as a delta frame: its base, whether the base is new (a rebase), the IDs of the
/// superseded bases whose deletion was added to the Txn, and the client's value.
type Wrote = (Arc<Base>, bool, Vec<u64>, Bytes);

/// Most superseded bases remembered per key; beyond it the oldest is forgotten (left in etcd
/// until the key is deleted) so that a key rebased forever without compaction stays bounded.
const MAX_SUPERSEDED: usize = 64;

/// Records base `id` as superseded at `at` (once; bounded by [`MAX_SUPERSEDED`]).
fn supersede(list: &mut Vec<(u64, i64)>, id: u64, at: i64) {
    if list.iter().any(|(i, _)| *i == id) {
        return;
    }
    if list.len() >= MAX_SUPERSEDED {
        list.remove(0);
    }
    list.push((id, at));
}

/// The `MOD(K) == m` compares that hold in the success branch of `txn`, plus the inherited ones.
fn success_guards(txn: &TxnRequest, inherited: &[(Bytes, i64)]) -> Vec<(Bytes, i64)> {
    let mut guards = inherited.to_vec();
    for c in &txn.compare {
        if c.target == compare::CompareTarget::Mod as i32 && c.result == compare::CompareResult::Equal as i32 && c.range_end.is_empty() {
            if let Some(compare::TargetUnion::ModRevision(m)) = c.target_union {
                guards.push((c.key.clone(), m));
            }
        }
    }
    guards
}


fn op_put(key: Bytes, value: Bytes) -> RequestOp {
    RequestOp { request: Some(request_op::Request::RequestPut(PutRequest { key, value, ..Default::default() })) }
}

fn op_delete(key: Bytes, range_end: Bytes) -> RequestOp {
    RequestOp { request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest { key, range_end, ..Default::default() })) }
}

/// The `revision` of every Range in a Txn tree (both branches, nested Txns), without 0s.
pub fn range_revisions(txn: &TxnRequest, out: &mut Vec<i64>) {
    for op in txn.success.iter().chain(txn.failure.iter()) {
        match &op.request {
            Some(request_op::Request::RequestRange(r)) if r.revision > 0 && !out.contains(&r.revision) => out.push(r.revision),
            Some(request_op::Request::RequestTxn(inner)) => range_revisions(inner, out),
            _ => {}
        }
    }
}

/// Drops the responses of operations the proxy added: each executed branch keeps as many
/// responses as the client's Txn had operations in it, recursively.
fn strip(resp: &mut TxnResponse, shape: &TxnRequest) {
    let ops = if resp.succeeded { &shape.success } else { &shape.failure };
    resp.responses.truncate(ops.len());
    for (r, op) in resp.responses.iter_mut().zip(ops) {
        if let (Some(response_op::Response::ResponseTxn(inner)), Some(request_op::Request::RequestTxn(inner_shape))) = (&mut r.response, &op.request) {
            strip(inner, inner_shape);
        }
    }
}

/// True when every branch on `path` is the one etcd executed.
fn ran(resp: &TxnResponse, path: &Path) -> bool {
    let mut resp = resp;
    for (level, &(success, index)) in path.iter().enumerate() {
        if resp.succeeded != success {
            return false;
        }
        if level + 1 == path.len() {
            return true;
        }
        match resp.responses.get(index).and_then(|r| r.response.as_ref()) {
            Some(response_op::Response::ResponseTxn(inner)) => resp = inner,
            _ => return false,
        }
    }
    false
}
