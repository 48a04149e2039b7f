//! What the codec is handed: prepared dictionaries and decompressed bases.
//!
//! The codec owns no cache. Whoever loads dictionaries and bases (`src/dictionary/`, `src/delta/`)
//! keeps them in a cache of its own and lends it to the codec through these traits; lookups are
//! synchronous, because loading happens before decoding, never inside it.

use std::fmt;
use std::sync::Arc;

use zstd::dict::{DecoderDictionary, EncoderDictionary};

use super::delta::Base;

/// A dictionary prepared for decompression, once.
pub struct PreparedDecoder {
    /// The dictionary ID.
    pub id: u32,
    /// zstd's digested dictionary, shared by every decompression.
    pub dictionary: DecoderDictionary<'static>,
}

/// The dictionary new values of one prefix are compressed with, prepared once at the prefix's level.
pub struct CurrentEncoder {
    /// The dictionary ID written in frame headers.
    pub id: u32,
    /// zstd's digested dictionary at the prefix's level.
    pub dictionary: EncoderDictionary<'static>,
    /// When it was trained (Unix seconds): the next training of the prefix is due a retrain
    /// interval later.
    pub created_unix: u64,
}

/// Prepared dictionaries by ID (decoding) and by `[[prefixes]]` prefix (encoding).
pub trait DictionarySource: fmt::Debug + Send + Sync {
    /// The prepared decoder of dictionary `id`, if loaded.
    fn decoder(&self, id: u32) -> Option<Arc<PreparedDecoder>>;
    /// The current encoder of the `[[prefixes]]` prefix `prefix`, if it has one.
    fn encoder(&self, prefix: &[u8]) -> Option<Arc<CurrentEncoder>>;
    /// Why dictionary `id` is not loaded, as recorded by the last failed load.
    fn unavailable_reason(&self, id: u32) -> Option<String>;
}

/// Decompressed, verified bases by (key, base ID).
pub trait BaseSource: fmt::Debug + Send + Sync {
    /// Base `id` of `key`, if at hand.
    fn get(&self, key: &[u8], id: u64) -> Option<Arc<Base>>;
    /// Why base `id` of `key` could not be loaded, if a load failed.
    fn unavailable_reason(&self, key: &[u8], id: u64) -> Option<String>;
}

/// No dictionary and no base: what a codec uses until it is handed a source.
#[derive(Debug, Default, Clone, Copy)]
pub struct Empty;

impl DictionarySource for Empty {
    fn decoder(&self, _: u32) -> Option<Arc<PreparedDecoder>> {
        None
    }
    fn encoder(&self, _: &[u8]) -> Option<Arc<CurrentEncoder>> {
        None
    }
    fn unavailable_reason(&self, _: u32) -> Option<String> {
        None
    }
}

impl BaseSource for Empty {
    fn get(&self, _: &[u8], _: u64) -> Option<Arc<Base>> {
        None
    }
    fn unavailable_reason(&self, _: &[u8], _: u64) -> Option<String> {
        None
    }
}
