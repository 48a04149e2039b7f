//! The base cache: bases in memory, bounded by bytes, one budget per prefix, shared by three
//! tiers:
//!
//! - **decompressed bases**, what encoding and decoding a delta frame read;
//! - **values lately decoded** (and written): a write's watch events, every watcher's same
//!   event, decode without decompressing anything;
//! - **base records** as etcd stores them (compressed, about a tenth of the JSON): a
//!   decompressed miss that finds the record decompresses it instead of reading etcd.
//!
//! Each tier is guaranteed a share of the budget (an eighth, a sixteenth, thirteen sixteenths) and
//! may borrow what the others leave unused: when the budget is full, the tier furthest over its
//! share gives an entry up. So 200 workflows of ~150 KB keep all their bases decompressed (their
//! records take a tenth of that), while 1,000 workflows of ~600 KB keep ~700 of their records
//! (Flyte's propeller updates every running workflow in turn).
//!
//! Bases are immutable (a new base gets a new ID), so an entry is never stale and replicas need
//! no coordination. Synchronous and short-locked: the codec reads it while decoding.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::codec::delta::Base;
use crate::codec::{BaseSource, PrefixRule};

/// Entries by base ID, giving up a pseudo-random one when asked: propeller updates every
/// running workflow in turn, and under such a cyclic scan over more keys than fit, LRU evicts
/// each entry just before it is needed again (no hit at all: measured, 0 of 1,004 in the flyte
/// bench's part B) while a random victim keeps some. The entry added last is not the victim
/// while there are others (a write's base is read again by the write's next update or its
/// watch events). Picking a victim is O(1): the IDs are also kept in a vector.
#[derive(Debug)]
struct Tier<V> {
    bytes: u64,
    /// Insertions and evictions so far: the seed of the next victim.
    tick: u64,
    newest: u64,
    /// By base ID (random, so practically unique across keys): key, value, size, index in
    /// `ids`. The key is compared on lookup, so a lookup allocates nothing.
    entries: HashMap<u64, (Bytes, V, u64, usize)>,
    ids: Vec<u64>,
}

impl<V> Default for Tier<V> {
    fn default() -> Self {
        Tier { bytes: 0, tick: 0, newest: 0, entries: HashMap::new(), ids: Vec::new() }
    }
}

impl<V: Clone> Tier<V> {
    fn get(&self, key: &[u8], id: u64) -> Option<V> {
        self.entries.get(&id).filter(|(k, ..)| k == key).map(|e| e.1.clone())
    }

    fn insert(&mut self, key: Bytes, id: u64, value: V, size: u64) {
        self.tick += 1;
        self.newest = id;
        let index = match self.entries.get(&id) {
            Some(&(.., old, index)) => {
                self.bytes -= old;
                index
            }
            None => {
                self.ids.push(id);
                self.ids.len() - 1
            }
        };
        self.entries.insert(id, (key, value, size, index));
        self.bytes += size;
    }

    /// Gives up one entry, the newest only when it is the last; false when empty.
    fn evict(&mut self) -> bool {
        if self.ids.is_empty() {
            return false;
        }
        // splitmix64 of the tick: a different victim each time.
        self.tick += 1;
        let mut z = self.tick.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let mut at = (z ^ (z >> 31)) as usize % self.ids.len();
        if self.ids[at] == self.newest && self.ids.len() > 1 {
            at = (at + 1) % self.ids.len();
        }
        let victim = self.ids.swap_remove(at);
        if let Some(&moved) = self.ids.get(at) {
            self.entries.get_mut(&moved).expect("every id has an entry").3 = at;
        }
        let (_, _, gone, _) = self.entries.remove(&victim).expect("every id has an entry");
        self.bytes -= gone;
        true
    }
}

/// Delta frames decoded lately, with what they decode to, given up oldest first. A watch event
/// carries the value a write just stored (its writer remembered it) and, with prev_kv, the
/// value before it; every watcher on the prefix (kube-apiserver's watch cache, and any other)
/// gets the same two: without this tier each of them decompressed both.
///
/// Sound whatever revisions do (a snapshot restore, another etcd behind the proxy): an entry is
/// found by the key and the frame's bytes, compared whole, and a delta frame names its base by ID
/// and content checksum, so equal frames of one key decode to equal values.
#[derive(Debug, Default)]
struct Recent {
    /// Keys, frames and values (what the budget counts).
    bytes: u64,
    /// Keys of [`Recent::slot`]'s hash, random per process.
    hasher: std::collections::hash_map::RandomState,
    /// By [`Recent::slot`] of (key, frame); one entry per slot (a collision replaces).
    entries: HashMap<u64, RecentEntry>,
    /// Slots in insertion order, oldest first, with the entry's serial (a slot replaced since is
    /// skipped when it comes up).
    order: VecDeque<(u64, u64)>,
    inserted: u64,
}

#[derive(Debug)]
struct RecentEntry {
    key: Bytes,
    frame: Bytes,
    value: Bytes,
    /// Its number in insertion order (matches `order`).
    serial: u64,
}

impl RecentEntry {
    fn size(&self) -> u64 {
        (self.key.len() + self.frame.len() + self.value.len()) as u64
    }
}

impl Recent {
    /// Where (key, frame) sits: a hash of the key, the frame's length and its last 16 bytes (the
    /// zstd frame's content checksum among them), so a lookup does not read a whole frame.
    fn slot(&self, key: &[u8], frame: &[u8]) -> u64 {
        use std::hash::{BuildHasher, Hash, Hasher};
        let mut h = self.hasher.build_hasher();
        key.hash(&mut h);
        frame.len().hash(&mut h);
        frame[frame.len().saturating_sub(16)..].hash(&mut h);
        h.finish()
    }

    fn get(&self, key: &[u8], frame: &[u8]) -> Option<Bytes> {
        let e = self.entries.get(&self.slot(key, frame))?;
        (e.key == key && e.frame == frame).then(|| e.value.clone())
    }

    fn insert(&mut self, key: &[u8], frame: &[u8], value: Bytes) {
        let slot = self.slot(key, frame);
        self.inserted += 1;
        let entry = RecentEntry { key: Bytes::copy_from_slice(key), frame: Bytes::copy_from_slice(frame), value, serial: self.inserted };
        self.bytes += entry.size();
        if let Some(old) = self.entries.insert(slot, entry) {
            self.bytes -= old.size();
        }
        self.order.push_back((slot, self.inserted));
        // Slots replaced since they were queued: keep the queue from growing without bound.
        if self.order.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.order.retain(|(slot, serial)| entries.get(slot).is_some_and(|e| e.serial == *serial));
        }
    }

    /// Forgets (key, frame), if it is here.
    fn remove(&mut self, key: &[u8], frame: &[u8]) {
        let slot = self.slot(key, frame);
        if self.entries.get(&slot).is_some_and(|e| e.key == key && e.frame == frame) {
            let gone = self.entries.remove(&slot).expect("just found");
            self.bytes -= gone.size();
        }
    }

    /// Gives up the oldest entry; false when empty.
    fn evict(&mut self) -> bool {
        while let Some(&(slot, serial)) = self.order.front() {
            self.order.pop_front();
            if self.entries.get(&slot).is_some_and(|e| e.serial == serial) {
                let gone = self.entries.remove(&slot).expect("just found");
                self.bytes -= gone.size();
                return true;
            }
        }
        false
    }
}

/// The three tiers of one prefix within one budget.
#[derive(Debug)]
struct Shelf {
    capacity: u64,
    bases: Tier<Arc<Base>>,
    recent: Recent,
    records: Tier<Bytes>,
}

/// What each tier is guaranteed of the budget, in sixteenths: decompressed bases, values lately
/// decoded, base records. An entry larger than its tier's share is not cached.
const SHARES: [u64; 3] = [2, 1, 13];

impl Shelf {
    fn new(capacity: u64) -> Self {
        Shelf { capacity, bases: Tier::default(), recent: Recent::default(), records: Tier::default() }
    }

    /// Tier `t`'s share of the budget, in bytes.
    fn share(&self, t: usize) -> u64 {
        self.capacity / 16 * SHARES[t]
    }

    fn bytes(&self) -> u64 {
        self.bases.bytes + self.recent.bytes + self.records.bytes
    }

    /// Gives entries up until the shelf is within its budget, each from the tier furthest over
    /// its share (when the budget is full, some tier is over its share).
    fn fit(&mut self) {
        while self.bytes() > self.capacity {
            let used = [self.bases.bytes, self.recent.bytes, self.records.bytes];
            let mut order = [0usize, 1, 2];
            order.sort_by_key(|&t| std::cmp::Reverse(used[t] as i128 - self.share(t) as i128));
            let evicted = order.iter().any(|&t| match t {
                0 => self.bases.evict(),
                1 => self.recent.evict(),
                _ => self.records.evict(),
            });
            if !evicted {
                break; // empty
            }
        }
    }
}

/// Bases by (key, base ID), one byte budget per prefix with delta frames
/// (`prefixes[].delta_base_cache`, shared by the three tiers of the module doc). Prefixes
/// without delta frames get a small budget too, so
/// delta frames written before `delta` was turned off stay cheap to read. The codec reads it as
/// its [`BaseSource`].
#[derive(Debug, Default)]
pub struct BaseCache {
    /// Longest prefix first, as the codec's rules.
    shelves: Vec<(Bytes, Mutex<Shelf>)>,
    /// Bytes held over all shelves, kept as each shelf changes: the gauge is set without taking
    /// every shelf's lock on each insert.
    total: std::sync::atomic::AtomicU64,
    /// Why a base could not be loaded, for the decode error logged (bounded: cleared when full).
    unavailable: Mutex<HashMap<(Bytes, u64), String>>,
}

/// Budget of a prefix whose rule has no delta frames (values written while it had some).
const FALLBACK_BYTES: u64 = 16 << 20;

impl BaseCache {
    /// One shelf per rule (rules sorted longest prefix first).
    pub fn for_rules(rules: &[PrefixRule]) -> Self {
        let shelves = rules
            .iter()
            .map(|r| {
                let capacity = r.delta.map_or(FALLBACK_BYTES, |d| d.base_cache_bytes);
                (r.prefix.clone(), Mutex::new(Shelf::new(capacity)))
            })
            .collect();
        BaseCache { shelves, total: Default::default(), unavailable: Mutex::default() }
    }

    fn shelf(&self, key: &[u8]) -> Option<&Mutex<Shelf>> {
        self.shelves.iter().find(|(p, _)| key.starts_with(p)).map(|(_, s)| s)
    }

    /// Base `id` of `key`, decompressed, if cached.
    pub fn get(&self, key: &[u8], id: u64) -> Option<Arc<Base>> {
        self.shelf(key)?.lock().expect("base cache lock").bases.get(key, id)
    }

    /// Changes the shelf of `key` (if any) under its lock, fits it to its budget, and keeps the
    /// total and its gauge up to date.
    fn change(&self, key: &[u8], f: impl FnOnce(&mut Shelf)) {
        let Some(shelf) = self.shelf(key) else { return };
        let mut shelf = shelf.lock().expect("base cache lock");
        let before = shelf.bytes();
        f(&mut shelf);
        shelf.fit();
        let after = shelf.bytes();
        drop(shelf);
        use std::sync::atomic::Ordering::Relaxed;
        let total = if after >= before { self.total.fetch_add(after - before, Relaxed) + (after - before) } else { self.total.fetch_sub(before - after, Relaxed) - (before - after) };
        crate::metrics::get().base_cache_bytes.set(total as i64);
    }

    /// Caches a verified base (giving other entries of its prefix up when over budget; a base
    /// over the tier's share is not cached).
    pub fn insert(&self, base: Arc<Base>) {
        let size = base.content.len() as u64;
        self.change(&base.key.clone(), |shelf| {
            if size <= shelf.share(0) {
                shelf.bases.insert(base.key.clone(), base.id, base, size);
            }
        });
    }

    /// The base record (as etcd stores it at the base's key) of base `id` of `key`, if cached.
    pub fn get_record(&self, key: &[u8], id: u64) -> Option<Bytes> {
        self.shelf(key)?.lock().expect("base cache lock").records.get(key, id)
    }

    /// Caches the base record of base `id` of `key`: one this process made, or read from etcd
    /// and verified (its content checksum is not checked again when it is decompressed). Both are
    /// copied: as slices they would keep alive the whole message they came in (a Txn with a
    /// 1 MB value, a Range response), which the budget does not count.
    pub fn insert_record(&self, key: &[u8], id: u64, record: &[u8]) {
        let size = record.len() as u64;
        self.change(key, |shelf| {
            if size <= shelf.share(2) {
                shelf.records.insert(Bytes::copy_from_slice(key), id, Bytes::copy_from_slice(record), size);
            }
        });
    }

    /// The value delta frame `frame` of `key` decodes to, when it was decoded (or written) lately.
    pub fn recall(&self, key: &[u8], frame: &[u8]) -> Option<Bytes> {
        self.shelf(key)?.lock().expect("base cache lock").recent.get(key, frame)
    }

    /// Remembers that delta frame `frame` of `key` decodes to `value` (which must be exactly that:
    /// a value decoded from it, or the value a write stored as it). Key and frame are copied
    /// (slices of a larger message); `value` is kept as it is: pass a buffer of its own (a
    /// decoded value is one; a write's value is a slice of the request: see
    /// [`BaseCache::remember_copy`]). Nothing is kept over the tier's share.
    pub fn remember(&self, key: &[u8], frame: &[u8], value: Bytes) {
        self.remember_with(key, frame, value.len(), || value);
    }

    /// [`BaseCache::remember`] of a value that is a slice of a larger message: copied, when kept.
    pub fn remember_copy(&self, key: &[u8], frame: &[u8], value: &[u8]) {
        self.remember_with(key, frame, value.len(), || Bytes::copy_from_slice(value));
    }

    fn remember_with(&self, key: &[u8], frame: &[u8], len: usize, value: impl FnOnce() -> Bytes) {
        self.change(key, |shelf| {
            if ((key.len() + frame.len() + len) as u64) <= shelf.share(1) {
                shelf.recent.insert(key, frame, value());
            }
        });
    }

    /// Forgets what [`BaseCache::remember`] was told of `frame` of `key` (a write that did not run).
    pub fn forget(&self, key: &[u8], frame: &[u8]) {
        self.change(key, |shelf| shelf.recent.remove(key, frame));
    }

    /// Records why base `id` of `key` cannot be loaded (named by the decode error).
    pub fn mark_unavailable(&self, key: &[u8], id: u64, why: String) {
        let mut map = self.unavailable.lock().expect("base cache lock");
        if map.len() >= 1024 {
            map.clear();
        }
        map.insert((Bytes::copy_from_slice(key), id), why);
    }

    /// Why base `id` of `key` could not be loaded, if a load failed.
    pub fn unavailable_reason(&self, key: &[u8], id: u64) -> Option<String> {
        self.unavailable.lock().expect("base cache lock").get(&(Bytes::copy_from_slice(key), id)).cloned()
    }

    /// Bytes cached (decompressed bases and records), summed over the prefixes.
    pub fn bytes(&self) -> u64 {
        self.total.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl BaseSource for BaseCache {
    fn get(&self, key: &[u8], id: u64) -> Option<Arc<Base>> {
        BaseCache::get(self, key, id)
    }
    fn unavailable_reason(&self, key: &[u8], id: u64) -> Option<String> {
        BaseCache::unavailable_reason(self, key, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::DeltaRule;

    fn base(key: &'static [u8], id: u64, len: usize) -> Arc<Base> {
        Arc::new(Base { key: Bytes::from_static(key), id, checksum: 0, content: Bytes::from(vec![b'x'; len]), record_len: 0 })
    }

    fn shelf_of(budget: u64) -> BaseCache {
        let rule = PrefixRule {
            prefix: Bytes::from_static(b"/p/"),
            compress: true,
            level: 3,
            min_size: 0,
            delta: Some(DeltaRule { rebase_fraction: 0.5, base_cache_bytes: budget, auto: false }),
        };
        BaseCache::for_rules(&[rule])
    }

    fn bases_in(c: &BaseCache, ids: std::ops::Range<u64>) -> usize {
        ids.filter(|&id| c.get(b"/p/a", id).is_some()).count()
    }

    fn records_in(c: &BaseCache, ids: std::ops::Range<u64>) -> usize {
        ids.filter(|&id| c.get_record(b"/p/r", id).is_some()).count()
    }

    #[test]
    fn tiers_borrow_what_the_others_leave_and_give_it_back() {
        // 1,600 bytes: bases are guaranteed 200, values lately decoded 100, records 1,300.
        let c = shelf_of(1600);
        for id in 0..10 {
            c.insert(base(b"/p/a", id, 100));
        }
        assert_eq!(bases_in(&c, 0..10), 10, "bases borrow what records do not use");
        assert!(c.get(b"/p/b", 1).is_none(), "the ID of another key's base");
        for id in 100..110 {
            c.insert_record(b"/p/r", id, &[b'r'; 100]);
        }
        assert_eq!(c.bytes(), 1600);
        assert_eq!((bases_in(&c, 0..10), records_in(&c, 100..110)), (6, 10), "bases, over their share, gave up");
        for id in 110..117 {
            c.insert_record(b"/p/r", id, &[b'r'; 100]);
        }
        assert_eq!(bases_in(&c, 0..10), 2, "down to their share");
        assert_eq!(records_in(&c, 100..117), 14, "records over theirs give up their own");
        assert!(c.get_record(b"/p/r", 116).is_some(), "the record just added stays");
        c.insert(base(b"/p/a", 50, 100));
        assert!(c.get(b"/p/a", 50).is_some(), "the base just added stays");
        assert_eq!(bases_in(&c, 0..10), 1);
        c.insert(base(b"/p/a", 51, 801));
        assert!(c.get(b"/p/a", 51).is_none(), "over half the budget: not cached");
        c.insert(base(b"/q/a", 6, 10));
        assert!(c.get(b"/q/a", 6).is_none(), "no rule: no shelf");
    }

    #[test]
    fn values_lately_decoded_are_found_by_key_and_whole_frame_oldest_out_first() {
        // 1,600 bytes: values lately decoded are guaranteed 100.
        let c = shelf_of(1600);
        c.remember_copy(b"/p/a", b"frame-a", &[b'a'; 40]);
        assert_eq!(c.recall(b"/p/a", b"frame-a").as_deref(), Some(&[b'a'; 40][..]));
        assert!(c.recall(b"/p/a", b"frame-b").is_none() && c.recall(b"/p/b", b"frame-a").is_none());
        assert!(c.recall(b"/p/a", b"frame-A").is_none(), "another frame of the key");
        c.forget(b"/p/a", b"frame-a");
        assert!(c.recall(b"/p/a", b"frame-a").is_none() && c.bytes() == 0, "forgotten");
        c.remember_copy(b"/p/d", b"frame-d", &[0; 90]);
        assert!(c.recall(b"/p/d", b"frame-d").is_none(), "over the tier's share: not kept");
        // The other tiers at their shares (200 + 1,300): the values get their 100 bytes.
        c.insert(base(b"/p/x", 1, 100));
        c.insert(base(b"/p/x", 2, 100));
        for id in 10..23 {
            c.insert_record(b"/p/r", id, &[b'r'; 100]);
        }
        c.remember_copy(b"/p/a", b"frame-a", &[b'a'; 40]);
        c.remember(b"/p/b", b"frame-b", Bytes::from_static(&[b'b'; 40]));
        assert!(c.recall(b"/p/a", b"frame-a").is_none(), "the oldest went");
        assert!(c.recall(b"/p/b", b"frame-b").is_some());
        assert_eq!(c.bytes(), 200 + 1300 + (4 + 7 + 40));
        assert_eq!(records_in(&c, 10..23), 13, "records within their share lose nothing");
        for i in 0..1000u32 {
            c.remember_copy(b"/p/e", &i.to_le_bytes(), b"v");
        }
        assert!(c.bytes() <= 1600);
        assert!(c.recall(b"/p/e", &999u32.to_le_bytes()).is_some());
    }
}
