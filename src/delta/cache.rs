//! The base cache: bases in memory, bounded by bytes, one budget per prefix, in two tiers: a
//! quarter of the budget holds decompressed bases (what the codec reads while decoding), the
//! rest their base records as etcd stores them (compressed, about a tenth of the JSON). A
//! decompressed miss that finds the record decompresses it instead of reading etcd: with
//! Flyte's propeller updating every running workflow in turn, the records of ~10x more
//! workflows fit than decompressed bases would.
//!
//! Bases are immutable (a new base gets a new ID), so an entry is never stale and replicas need
//! no coordination. Synchronous and short-locked: the codec reads it while decoding.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::codec::delta::Base;
use crate::codec::{BaseSource, PrefixRule};

/// Entries by base ID within a byte budget. Evicts the least recently used one, or (`scan`) a
/// pseudo-random one: propeller updates every running workflow in turn, and under such a cyclic
/// scan over more keys than fit, LRU evicts each entry just before it is needed again (no hit at
/// all) while a random victim keeps about budget / working set of them.
#[derive(Debug)]
struct Lru<V> {
    scan: bool,
    capacity: u64,
    bytes: u64,
    tick: u64,
    /// By base ID (random, so practically unique across keys); the key is compared on lookup,
    /// so a lookup allocates nothing.
    entries: HashMap<u64, (Bytes, V, u64, u64)>,
}

impl<V: Clone> Lru<V> {
    fn new(capacity: u64, scan: bool) -> Self {
        Lru { scan, capacity, bytes: 0, tick: 0, entries: HashMap::new() }
    }

    fn get(&mut self, key: &[u8], id: u64) -> Option<V> {
        self.tick += 1;
        let tick = self.tick;
        let entry = self.entries.get_mut(&id).filter(|(k, ..)| k == key)?;
        entry.3 = tick;
        Some(entry.1.clone())
    }

    fn insert(&mut self, key: Bytes, id: u64, value: V, size: u64) {
        self.tick += 1;
        if size > self.capacity {
            return; // larger than the whole budget
        }
        if let Some((_, _, old, _)) = self.entries.insert(id, (key, value, size, self.tick)) {
            self.bytes -= old;
        }
        self.bytes += size;
        while self.bytes > self.capacity {
            let victim = if self.scan {
                // splitmix64 of the tick: a different victim each time, never the entry just added.
                let mut z = self.tick.wrapping_add(0x9E37_79B9_7F4A_7C15);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                let others = self.entries.len().saturating_sub(1).max(1);
                self.entries.iter().filter(|(k, _)| **k != id).nth((z ^ (z >> 31)) as usize % others).map(|(k, _)| *k)
            } else {
                self.entries.iter().min_by_key(|(_, e)| e.3).map(|(k, _)| *k)
            };
            let Some(victim) = victim else { break };
            if let Some((_, _, gone, _)) = self.entries.remove(&victim) {
                self.bytes -= gone;
            }
        }
    }
}

/// The bases of one prefix: decompressed, and as stored.
#[derive(Debug)]
struct Shelf {
    bases: Lru<Arc<Base>>,
    records: Lru<Bytes>,
}

impl Shelf {
    /// A shelf of `capacity` bytes: a quarter for decompressed bases, the rest for records.
    fn new(capacity: u64) -> Self {
        Shelf { bases: Lru::new(capacity / 4, false), records: Lru::new(capacity - capacity / 4, true) }
    }

    fn bytes(&self) -> u64 {
        self.bases.bytes + self.records.bytes
    }
}

/// Bases by (key, base ID), one byte budget per prefix with delta frames
/// (`prefixes[].delta_base_cache`: a quarter decompressed, the rest base records). Prefixes without delta frames get a small budget too, so
/// delta frames written before `delta` was turned off stay cheap to read. The codec reads it as
/// its [`BaseSource`].
#[derive(Debug, Default)]
pub struct BaseCache {
    /// Longest prefix first, as the codec's rules.
    shelves: Vec<(Bytes, Mutex<Shelf>)>,
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
        BaseCache { shelves, unavailable: Mutex::default() }
    }

    fn shelf(&self, key: &[u8]) -> Option<&Mutex<Shelf>> {
        self.shelves.iter().find(|(p, _)| key.starts_with(p)).map(|(_, s)| s)
    }

    /// Base `id` of `key`, decompressed, if cached.
    pub fn get(&self, key: &[u8], id: u64) -> Option<Arc<Base>> {
        self.shelf(key)?.lock().expect("base cache lock").bases.get(key, id)
    }

    /// Caches a verified base (evicting the least recently used of its prefix when over budget).
    pub fn insert(&self, base: Arc<Base>) {
        if let Some(shelf) = self.shelf(&base.key) {
            let size = base.content.len() as u64;
            shelf.lock().expect("base cache lock").bases.insert(base.key.clone(), base.id, base, size);
            crate::metrics::get().base_cache_bytes.set(self.bytes() as i64);
        }
    }

    /// The base record (as etcd stores it at the base's key) of base `id` of `key`, if cached.
    pub fn get_record(&self, key: &[u8], id: u64) -> Option<Bytes> {
        self.shelf(key)?.lock().expect("base cache lock").records.get(key, id)
    }

    /// Caches the base record of base `id` of `key` (written, or read from etcd). Both are
    /// copied: as slices they would keep alive the whole message they came in (a Txn with a
    /// 1 MB value, a Range response), which the budget does not count.
    pub fn insert_record(&self, key: &[u8], id: u64, record: &[u8]) {
        if let Some(shelf) = self.shelf(key) {
            let size = record.len() as u64;
            shelf.lock().expect("base cache lock").records.insert(Bytes::copy_from_slice(key), id, Bytes::copy_from_slice(record), size);
            crate::metrics::get().base_cache_bytes.set(self.bytes() as i64);
        }
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
        self.shelves.iter().map(|(_, s)| s.lock().expect("base cache lock").bytes()).sum()
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

    #[test]
    fn evicts_least_recently_used_within_the_budget() {
        let rule = PrefixRule {
            prefix: Bytes::from_static(b"/p/"),
            compress: true,
            level: 3,
            min_size: 0,
            delta: Some(DeltaRule { rebase_fraction: 0.5, base_cache_bytes: 1200, auto: false }),
        };
        let c = BaseCache::for_rules(&[rule]);
        c.insert(base(b"/p/a", 1, 100));
        c.insert(base(b"/p/b", 2, 100));
        c.insert(base(b"/p/c", 3, 100));
        assert!(c.get(b"/p/a", 1).is_some(), "touch a");
        assert!(c.get(b"/p/b", 1).is_none(), "the ID of another key's base");
        c.insert(base(b"/p/d", 4, 100));
        assert!(c.get(b"/p/b", 2).is_none(), "b was the least recently used");
        assert!(c.get(b"/p/a", 1).is_some() && c.get(b"/p/d", 4).is_some());
        assert_eq!(c.bytes(), 300);
        c.insert(base(b"/p/e", 5, 1000));
        assert!(c.get(b"/p/e", 5).is_none(), "over the whole budget: not cached");
        c.insert(base(b"/q/a", 6, 10));
        assert!(c.get(b"/q/a", 6).is_none(), "no rule: no shelf");
        // Records: three quarters of the budget (900 bytes).
        for id in 10..19 {
            c.insert_record(b"/p/r", id, &[b'r'; 100]);
        }
        assert!(c.get_record(b"/p/r", 10).is_some() && c.get_record(b"/p/x", 10).is_none());
        c.insert_record(b"/p/r", 19, &[b'r'; 100]);
        assert!(c.get_record(b"/p/r", 19).is_some(), "the record just added stays");
        assert_eq!((10..19).filter(|&id| c.get_record(b"/p/r", id).is_some()).count(), 8, "one other record went");
        assert_eq!(c.bytes(), 300 + 900);
    }
}
