//! The shared cache of prepared dictionaries: what the codec reads on every request.
//!
//! Synchronous and lock-light (a `DashMap` read per compressed value), so the codec stays a pure
//! function over bytes. Loading from etcd, single-flight and the watch live in
//! [`super::Dictionaries`]; they fill this cache.
//!
//! Memory: a decoder is prepared for each dictionary some read needed (about the dictionary's
//! size); an encoder (larger: zstd's match tables at the prefix's level) only for the current
//! dictionary of each prefix that uses dictionaries.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use zstd::dict::{DecoderDictionary, EncoderDictionary};

pub use crate::codec::source::{CurrentEncoder, PreparedDecoder};
use crate::codec::DictionarySource;

/// How long a dictionary that could not be loaded is not fetched again (the store's watch
/// still installs it at once if it appears).
pub const UNAVAILABLE_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Dictionary ID → prepared decoder, and prefix → current encoder. The codec reads it as its
/// [`DictionarySource`].
#[derive(Default)]
pub struct DictionaryCache {
    decoders: DashMap<u32, Arc<PreparedDecoder>>,
    /// Keyed by the `[[prefixes]]` prefix (not by key): one entry per prefix using dictionaries.
    current: DashMap<Bytes, Arc<CurrentEncoder>>,
    /// Why a dictionary could not be loaded (for the decode error of values that need it: logged and counted),
    /// and when: a fetch is not retried within [`UNAVAILABLE_RETRY`], so frames naming a missing
    /// dictionary do not cost an etcd Range each.
    unavailable: DashMap<u32, (String, std::time::Instant)>,
}

impl fmt::Debug for DictionaryCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<u32> = self.decoders.iter().map(|e| *e.key()).collect();
        ids.sort_unstable();
        let current: Vec<(String, u32)> =
            self.current.iter().map(|e| (e.key().escape_ascii().to_string(), e.value().id)).collect();
        f.debug_struct("DictionaryCache").field("decoders", &ids).field("current", &current).finish()
    }
}

/// zstd refused a dictionary's bytes.
#[derive(Debug, thiserror::Error)]
#[error("zstd cannot load dictionary {id}: {source}")]
pub struct PrepareError {
    /// The dictionary ID.
    pub id: u32,
    /// zstd's error.
    pub source: std::io::Error,
}

impl DictionaryCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The prepared decoder of dictionary `id`, if loaded.
    pub fn decoder(&self, id: u32) -> Option<Arc<PreparedDecoder>> {
        self.decoders.get(&id).map(|e| e.value().clone())
    }

    /// True when dictionary `id` is ready for decoding.
    pub fn has_decoder(&self, id: u32) -> bool {
        self.decoders.contains_key(&id)
    }

    /// The current encoder for the `[[prefixes]]` prefix `prefix`, if it has one.
    pub fn encoder(&self, prefix: &[u8]) -> Option<Arc<CurrentEncoder>> {
        self.current.get(prefix).map(|e| e.value().clone())
    }

    /// The current dictionary ID of each prefix that has one.
    pub fn current_ids(&self) -> Vec<(Bytes, u32)> {
        self.current.iter().map(|e| (e.key().clone(), e.value().id)).collect()
    }

    /// Prepares and caches the decoder of dictionary `id` from its raw bytes (zstd copies them).
    pub fn insert_decoder(&self, id: u32, raw: &[u8]) -> Result<Arc<PreparedDecoder>, PrepareError> {
        if let Some(d) = self.decoder(id) {
            return Ok(d);
        }
        let dictionary = DecoderDictionary::try_copy(raw).map_err(|source| PrepareError { id, source })?;
        let prepared = Arc::new(PreparedDecoder { id, dictionary });
        self.unavailable.remove(&id);
        Ok(self.decoders.entry(id).or_insert(prepared).value().clone())
    }

    /// Makes dictionary `id` the current one of `prefix` (prepared at `level`) unless the prefix
    /// already uses a newer one. Also prepares its decoder. Returns true when it became current.
    pub fn install_current(&self, prefix: &[u8], id: u32, raw: &[u8], level: i32, created_unix: u64) -> Result<bool, PrepareError> {
        self.insert_decoder(id, raw)?;
        if self.encoder(prefix).is_some_and(|c| c.id >= id) {
            return Ok(false);
        }
        let dictionary = EncoderDictionary::try_copy(raw, level).map_err(|source| PrepareError { id, source })?;
        let candidate = Arc::new(CurrentEncoder { id, dictionary, created_unix });
        let mut entry = self.current.entry(Bytes::copy_from_slice(prefix)).or_insert_with(|| candidate.clone());
        if entry.id < id {
            *entry = candidate;
        }
        Ok(entry.id == id)
    }

    /// Forgets dictionary `id` (its key was deleted): values that need it now fail to decode
    /// until it is found again. Prefixes whose current dictionary it was are returned; they
    /// compress without a dictionary until a rescan finds their newest remaining one.
    pub fn remove(&self, id: u32) -> Vec<Bytes> {
        self.decoders.remove(&id);
        let prefixes: Vec<Bytes> = self.current.iter().filter(|e| e.id == id).map(|e| e.key().clone()).collect();
        for p in &prefixes {
            self.current.remove_if(p, |_, c| c.id == id);
        }
        prefixes
    }

    /// Records why dictionary `id` could not be loaded (shown in the decode error logged for each value).
    pub fn mark_unavailable(&self, id: u32, why: String) {
        self.unavailable.insert(id, (why, std::time::Instant::now()));
    }

    /// True when loading dictionary `id` failed less than [`UNAVAILABLE_RETRY`] ago.
    pub fn recently_unavailable(&self, id: u32) -> bool {
        self.unavailable.get(&id).is_some_and(|e| e.value().1.elapsed() < UNAVAILABLE_RETRY)
    }

    /// Why dictionary `id` is not loaded, as recorded by the last failed load.
    pub fn unavailable_reason(&self, id: u32) -> Option<String> {
        self.unavailable.get(&id).map(|e| e.value().0.clone())
    }
}

impl DictionarySource for DictionaryCache {
    fn decoder(&self, id: u32) -> Option<Arc<PreparedDecoder>> {
        DictionaryCache::decoder(self, id)
    }
    fn encoder(&self, prefix: &[u8]) -> Option<Arc<CurrentEncoder>> {
        DictionaryCache::encoder(self, prefix)
    }
    fn unavailable_reason(&self, id: u32) -> Option<String> {
        DictionaryCache::unavailable_reason(self, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::frame;
    use crate::codec::{DecodeReason, EncodeOutcome, PrefixRule, ValueCodec};
    use crate::dictionary::store::set_zstd_dict_id;

    const KEY: &[u8] = b"/registry/wf/ns/a";

    fn codec() -> ValueCodec {
        ValueCodec::new(
            vec![PrefixRule { prefix: Bytes::from_static(b"/registry/wf/"), compress: true, level: 3, min_size: 64, delta: None }],
            1 << 20,
        )
    }

    fn json(n: usize) -> Bytes {
        Bytes::from(format!("{{\"items\":[{}{{}}]}}\n", (0..n).map(|i| format!("{{\"name\":\"item-{i}\",\"phase\":5}},")).collect::<String>()))
    }

    #[test]
    fn dictionary_frames_name_their_dictionary() {
        let samples: Vec<Bytes> = (0..40).map(|i| json(10 + i)).collect();
        let mut raw = zstd::dict::from_samples(&samples, 4096).unwrap();
        set_zstd_dict_id(&mut raw, 5);
        let cache = Arc::new(DictionaryCache::new());
        assert!(cache.install_current(b"/registry/wf/", 5, &raw, 3, 0).unwrap());
        let with = codec().with_dictionaries(cache.clone());
        let v = json(25);
        let (stored, outcome) = with.encode(KEY, &v).unwrap();
        assert_eq!(outcome, EncodeOutcome::Compressed);
        assert_eq!(frame::parse(&stored).unwrap().dictionary_id, 5);
        assert_eq!(zstd::zstd_safe::get_dict_id_from_frame(&stored[frame::HEADER_LEN..]).map(|i| i.get()), Some(5));
        assert_eq!(with.needed_dictionary(KEY, &stored), Some(5));
        assert_eq!(with.decode(KEY, &stored).unwrap(), v);
        let (plain, _) = codec().encode(KEY, &v).unwrap();
        assert!(stored.len() * 2 < plain.len(), "{} vs {}", stored.len(), plain.len());
        assert_eq!(with.needed_dictionary(KEY, &plain), None);
        // Without the dictionary: an error naming the key and the ID, never garbage.
        cache.remove(5);
        cache.mark_unavailable(5, "its key was deleted".into());
        let err = with.decode(KEY, &stored).unwrap_err().to_string();
        assert!(err.contains("/registry/wf/ns/a") && err.contains("dictionary ID 5") && err.contains("deleted"), "{err}");
        // A frame relabelled with another dictionary's ID is refused by zstd itself.
        let mut other = raw.clone();
        set_zstd_dict_id(&mut other, 6);
        cache.insert_decoder(6, &other).unwrap();
        let mut relabelled = stored.to_vec();
        relabelled[6] = 6;
        assert!(matches!(with.decode(KEY, &Bytes::from(relabelled)).unwrap_err().reason, DecodeReason::Zstd(_)));
    }
}
