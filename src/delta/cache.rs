//! The base cache: decompressed bases in memory, bounded by bytes, one budget per prefix.
//!
//! Bases are immutable (a new base gets a new ID), so an entry is never stale and replicas need
//! no coordination. Synchronous and short-locked: the codec reads it while decoding.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::codec::delta::Base;
use crate::codec::{BaseSource, PrefixRule};

/// The bases of one prefix, least recently used evicted first once over the budget.
#[derive(Debug, Default)]
struct Shelf {
    capacity: u64,
    bytes: u64,
    tick: u64,
    /// By base ID (random, so practically unique across keys); the key is compared on lookup,
    /// so a lookup allocates nothing.
    entries: HashMap<u64, (Arc<Base>, u64)>,
}

impl Shelf {
    fn get(&mut self, key: &[u8], id: u64) -> Option<Arc<Base>> {
        self.tick += 1;
        let tick = self.tick;
        let entry = self.entries.get_mut(&id).filter(|(b, _)| b.key == key)?;
        entry.1 = tick;
        Some(entry.0.clone())
    }

    fn insert(&mut self, base: Arc<Base>) {
        self.tick += 1;
        let size = base.content.len() as u64;
        if size > self.capacity {
            return; // larger than the whole budget: decoded from the pinned copy only
        }
        if let Some((old, _)) = self.entries.insert(base.id, (base, self.tick)) {
            self.bytes -= old.content.len() as u64;
        }
        self.bytes += size;
        while self.bytes > self.capacity {
            let Some(oldest) = self.entries.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k) else { break };
            if let Some((gone, _)) = self.entries.remove(&oldest) {
                self.bytes -= gone.content.len() as u64;
            }
        }
    }
}

/// Decompressed bases by (key, base ID), one byte budget per prefix with `delta = true`
/// (`prefixes[].delta_base_cache`). Prefixes without delta frames get a small budget too, so
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
                (r.prefix.clone(), Mutex::new(Shelf { capacity, ..Default::default() }))
            })
            .collect();
        BaseCache { shelves, unavailable: Mutex::default() }
    }

    fn shelf(&self, key: &[u8]) -> Option<&Mutex<Shelf>> {
        self.shelves.iter().find(|(p, _)| key.starts_with(p)).map(|(_, s)| s)
    }

    /// Base `id` of `key`, if cached.
    pub fn get(&self, key: &[u8], id: u64) -> Option<Arc<Base>> {
        self.shelf(key)?.lock().expect("base cache lock").get(key, id)
    }

    /// Caches a verified base (evicting the least recently used of its prefix when over budget).
    pub fn insert(&self, base: Arc<Base>) {
        if let Some(shelf) = self.shelf(&base.key) {
            shelf.lock().expect("base cache lock").insert(base);
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

    /// Decompressed bytes cached, summed over the prefixes.
    pub fn bytes(&self) -> u64 {
        self.shelves.iter().map(|(_, s)| s.lock().expect("base cache lock").bytes).sum()
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
            delta: Some(DeltaRule { rebase_fraction: 0.5, base_cache_bytes: 300, auto: false }),
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
    }
}
