//! The value codec: which keys are compressed, and how a value becomes a frame and back.
//!
//! [`ValueCodec::encode`] and [`ValueCodec::decode`] are pure functions over `(key, value)`
//! bytes; they know nothing of gRPC. `src/rewrite.rs` applies them to etcd messages.
//! The codec is a leaf: it is handed prepared dictionaries and bases through the traits of
//! [`source`], whose caches live with whoever loads them (`src/dictionary/`, `src/delta/`):
//! loading from etcd happens before decoding, never inside it. It reads no config type and
//! updates no metric.

pub mod delta;
pub mod frame;
mod key;
pub mod source;

use std::cell::RefCell;
use std::sync::Arc;

use bytes::Bytes;

use delta::{Base, BaseError};
use frame::{Codec, HeaderError};
pub use key::{prefix_end, KeyDisplay};
pub use source::{BaseSource, DictionarySource, Empty};

/// Values that begin with this are encrypted by kube-apiserver (encryption at rest): they do
/// not compress, so they are stored as they are.
pub const K8S_ENCRYPTED_PREFIX: &[u8] = b"k8s:enc:";

/// Values larger than this are compressed without a dictionary: beyond ~1 MiB the value's own
/// history gives zstd every match a dictionary would, and the dictionary's tables cost ~1.5% on the
/// 1.7 MB and 3.9 MB objects of the corpus (docs/benchmarks.md).
pub const DICTIONARY_MAX_VALUE_BYTES: usize = 1 << 20;

/// etcd-squeeze's own keys (dictionaries, trainer election). Never compressed or decoded, even
/// under a prefix rule of `""`: a dictionary record must be readable without a dictionary.
pub const RESERVED_PREFIX: &[u8] = b"/etcd-squeeze/";

/// The compression rule for one key prefix (from a `[[prefixes]]` table of the config).
#[derive(Debug, Clone)]
pub struct PrefixRule {
    /// Keys that start with these bytes use this rule ("" = every key).
    pub prefix: Bytes,
    /// false: new values are stored unframed (existing frames are still decoded).
    pub compress: bool,
    /// zstd level (1..=22).
    pub level: i32,
    /// Values shorter than this many bytes are stored in a raw frame.
    pub min_size: usize,
    /// Delta frames for this prefix (`prefixes[].delta`); `None` = every version on its own.
    pub delta: Option<DeltaRule>,
}

/// How a prefix with `delta = true` stores new versions (see [`delta`] and `crate::delta`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeltaRule {
    /// Rebase when the delta is larger than this fraction of the value compressed alone
    /// (`prefixes[].delta_rebase_fraction`).
    pub rebase_fraction: f64,
    /// Bytes the prefix's base cache holds: decompressed bases, values lately decoded and base
    /// records (`prefixes[].delta_base_cache`).
    pub base_cache_bytes: u64,
    /// `delta = "auto"`: written only while every replica reads delta frames (the caller
    /// decides; the codec reads and writes them either way).
    pub auto: bool,
}

/// What happened to one value on the way in; used for counters and the demo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeOutcome {
    /// Not under a configured prefix: stored byte-identical.
    Untouched,
    /// Under a prefix whose `compress = false`, or a `k8s:enc:` value: stored as it is.
    StoredAsIs,
    /// Stored in a raw frame (too small, did not shrink, or began with the magic).
    RawFrame,
    /// Stored as a zstd frame.
    Compressed,
    /// Stored as a delta frame against a base.
    Delta,
}

/// A stored value under a compressed prefix that cannot be turned back into the original bytes.
/// The proxy passes such a value on as stored (`server::keep_stored`); the operator commands report it
/// naming the key; [`DecodeReason::ResponseTooLarge`] is `RESOURCE_EXHAUSTED` for a read.
#[derive(Debug, thiserror::Error)]
#[error("etcd-squeeze: cannot decode the value of key {}: {reason}", KeyDisplay(key))]
pub struct DecodeError {
    /// The etcd key whose value failed.
    pub key: Bytes,
    /// What is wrong with the stored bytes.
    pub reason: DecodeReason,
}

/// Why a frame failed to decode.
#[derive(Debug, thiserror::Error)]
pub enum DecodeReason {
    /// The header is malformed.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// The frame names a dictionary that is not loaded (missing from etcd, or refused).
    #[error("dictionary ID {id} is not available: {detail}")]
    UnknownDictionary {
        /// The frame's dictionary ID.
        id: u32,
        /// Why it is not loaded (from the last attempt to load it).
        detail: String,
    },
    /// A raw frame names a dictionary (etcd-squeeze never writes one).
    #[error("raw frame names dictionary ID {0}")]
    RawWithDictionary(u32),
    /// The zstd frame does not declare its decompressed size.
    #[error("zstd frame does not declare its content size")]
    NoContentSize,
    /// A delta frame's base cannot be used: missing from etcd (and its history), or its record
    /// is refused (corrupt, another key's, another checksum).
    #[error("base {id:016x} cannot be used: {detail}")]
    Base {
        /// The base ID the frame names.
        id: u64,
        /// Why (from the attempt to load it).
        detail: String,
    },
    /// Declared or actual decompressed size over `limits.max_value_bytes`.
    #[error("decompressed size {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Declared decompressed size in bytes.
        size: u64,
        /// The configured limit in bytes.
        limit: usize,
    },
    /// Bytes after the zstd frame, or a frame that is cut short.
    #[error("zstd payload is {actual} bytes, the frame inside it is {frame}")]
    FrameLength {
        /// Payload length in bytes.
        actual: usize,
        /// Length of the zstd frame found at its start, in bytes.
        frame: usize,
    },
    /// zstd refused the payload (corrupt data or checksum mismatch).
    #[error("zstd: {0}")]
    Zstd(String),
    /// Decoding this value would take the response over `limits.max_response_bytes` of
    /// decompressed values. Not data loss: the client should page (`limit`) its request.
    #[error("decompressing {size} more bytes would take the response over limits.max_response_bytes ({limit} bytes); page the request with a smaller limit")]
    ResponseTooLarge {
        /// Declared decompressed size of this value in bytes.
        size: u64,
        /// The configured per-response limit in bytes.
        limit: u64,
    },
}

impl DecodeReason {
    /// A stable name for the kind of failure (the `reason` label of
    /// `etcd_squeeze_decode_errors_total`; see `metrics::DECODE_ERROR_KINDS`).
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeReason::Header(_) => "header",
            DecodeReason::UnknownDictionary { .. } => "unknown_dictionary",
            DecodeReason::RawWithDictionary(_) => "raw_with_dictionary",
            DecodeReason::Base { .. } => "base",
            DecodeReason::NoContentSize => "no_content_size",
            DecodeReason::TooLarge { .. } => "too_large",
            DecodeReason::FrameLength { .. } => "frame_length",
            DecodeReason::Zstd(_) => "zstd",
            DecodeReason::ResponseTooLarge { .. } => "response_too_large",
        }
    }
}

/// Why a value could not be encoded.
#[derive(Debug, thiserror::Error)]
#[error("etcd-squeeze: cannot store the value of key {}: {reason}", KeyDisplay(key))]
pub struct EncodeError {
    /// The etcd key.
    pub key: Bytes,
    /// What went wrong.
    pub reason: EncodeReason,
}

/// Why a value could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeReason {
    /// The value is larger than `limits.max_value_bytes`: it could never be read back. Answered
    /// with etcd's own `etcdserver: request is too large`, so kube-apiserver reacts as it does to etcd.
    #[error("value is {size} bytes, over limits.max_value_bytes ({limit} bytes)")]
    TooLarge {
        /// The value's size in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },
    /// zstd failed (not expected).
    #[error("zstd: {0}")]
    Zstd(#[from] std::io::Error),
}

/// The prefix rules, limits, and the dictionaries and bases it is handed; shared by every
/// request (cheap to clone: clones share the sources).
#[derive(Debug, Clone)]
pub struct ValueCodec {
    /// Sorted longest prefix first, so the first match is the most specific.
    rules: Vec<PrefixRule>,
    max_value_bytes: usize,
    max_response_bytes: u64,
    dictionaries: Arc<dyn DictionarySource>,
    bases: Arc<dyn BaseSource>,
}

thread_local! {
    // One zstd context per worker thread: contexts are expensive to create (allocation of the
    // match window), cheap to reuse; a thread-local needs no lock.
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    static DICT_DCTX: RefCell<Option<zstd::zstd_safe::DCtx<'static>>> = const { RefCell::new(None) };
}

impl ValueCodec {
    /// Builds the codec from prefix rules; `max_value_bytes` bounds every decompressed value.
    /// No dictionary is used until [`ValueCodec::with_dictionaries`] hands it a source, and no
    /// base but the pinned ones until [`ValueCodec::with_bases`] does.
    pub fn new(mut rules: Vec<PrefixRule>, max_value_bytes: usize) -> Self {
        rules.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        ValueCodec { rules, max_value_bytes, max_response_bytes: u64::MAX, dictionaries: Arc::new(Empty), bases: Arc::new(Empty) }
    }

    /// Uses the dictionaries of `source`: each prefix's current encoder for new values, and any
    /// loaded decoder for frames that name one.
    pub fn with_dictionaries(mut self, source: Arc<dyn DictionarySource>) -> Self {
        self.dictionaries = source;
        self
    }

    /// The dictionaries this codec reads.
    pub fn dictionaries(&self) -> &Arc<dyn DictionarySource> {
        &self.dictionaries
    }

    /// Bounds the decompressed bytes one response may carry (see [`ValueCodec::decode_within`]).
    pub fn with_max_response_bytes(mut self, max_response_bytes: u64) -> Self {
        self.max_response_bytes = max_response_bytes;
        self
    }

    /// The per-response budget of decompressed bytes (`limits.max_response_bytes`).
    pub fn max_response_bytes(&self) -> u64 {
        self.max_response_bytes
    }

    /// The most specific rule whose prefix `key` starts with, if any. Keys under
    /// [`RESERVED_PREFIX`] have none, whatever the rules.
    pub fn rule_for(&self, key: &[u8]) -> Option<&PrefixRule> {
        if key.starts_with(RESERVED_PREFIX) {
            return None;
        }
        self.rules.iter().find(|r| key.starts_with(&r.prefix))
    }

    /// The configured rules, longest prefix first.
    pub fn rules(&self) -> &[PrefixRule] {
        &self.rules
    }

    /// True when the key range `[key, range_end)` (etcd's convention: empty `range_end` =
    /// the single key, `"\0"` = every key ≥ `key`) contains a key under a configured prefix.
    pub fn range_touches_prefix(&self, key: &[u8], range_end: &[u8]) -> bool {
        if range_end.is_empty() {
            return self.rule_for(key).is_some();
        }
        self.rules.iter().any(|r| {
            let p = &r.prefix[..];
            // [p, prefix_end(p)) ∩ [key, range_end) ≠ ∅
            let starts_before_end = range_end == b"\0" || p < range_end;
            let ends_after_start = match prefix_end(p) {
                None => true,
                Some(pe) => key < &pe[..],
            };
            starts_before_end && ends_after_start
        })
    }

    /// Encodes a value about to be written to `key` (a `PutRequest.value`).
    ///
    /// Outside every prefix the value is returned unchanged. Under a prefix it becomes a frame
    /// (see [`frame`]) unless it is a `k8s:enc:` value or the prefix has `compress = false`
    /// (then it is stored as it is, except that a value beginning with the magic is always
    /// wrapped in a raw frame so it is never mistaken for one).
    pub fn encode(&self, key: &[u8], value: &Bytes) -> Result<(Bytes, EncodeOutcome), EncodeError> {
        let Some(rule) = self.rule_for(key) else {
            return Ok((value.clone(), EncodeOutcome::Untouched));
        };
        if value.len() > self.max_value_bytes {
            let reason = EncodeReason::TooLarge { size: value.len(), limit: self.max_value_bytes };
            return Err(EncodeError { key: Bytes::copy_from_slice(key), reason });
        }
        let must_frame = frame::is_framed(value);
        if !must_frame && (!rule.compress || value.starts_with(K8S_ENCRYPTED_PREFIX)) {
            return Ok((value.clone(), EncodeOutcome::StoredAsIs));
        }
        if !rule.compress || value.len() < rule.min_size || value.starts_with(K8S_ENCRYPTED_PREFIX) {
            return Ok((raw_frame(value), EncodeOutcome::RawFrame));
        }
        let mut out = Vec::with_capacity(frame::HEADER_LEN + zstd::zstd_safe::compress_bound(value.len()));
        let dictionary = if value.len() <= DICTIONARY_MAX_VALUE_BYTES { self.dictionaries.encoder(&rule.prefix) } else { None };
        frame::write_header(&mut out, Codec::Zstd, dictionary.as_ref().map_or(0, |d| d.id));
        // zstd writes into a slice from its start: give it the bytes after the header.
        out.resize(out.capacity(), 0);
        let written = match &dictionary {
            // A context per call borrowing the prepared dictionary: its tables are referenced, not
            // rebuilt; a thread-local context cannot hold a borrow of a dictionary that may be replaced.
            Some(d) => zstd::bulk::Compressor::with_prepared_dictionary(&d.dictionary).and_then(|mut c| {
                c.include_checksum(true)?;
                c.include_contentsize(true)?;
                c.compress_to_buffer(&value[..], &mut out[frame::HEADER_LEN..])
            }),
            None => COMPRESSOR.with(|cell| {
                let mut slot = cell.borrow_mut();
                if slot.is_none() {
                    let mut c = zstd::bulk::Compressor::new(rule.level)?;
                    c.include_checksum(true)?;
                    c.include_contentsize(true)?;
                    *slot = Some(c);
                }
                let c = slot.as_mut().expect("set above");
                c.set_compression_level(rule.level)?;
                c.compress_to_buffer(&value[..], &mut out[frame::HEADER_LEN..])
            }),
        }
        .map_err(|e| EncodeError { key: Bytes::copy_from_slice(key), reason: e.into() })?;
        out.truncate(frame::HEADER_LEN + written);
        if out.len() >= frame::HEADER_LEN + value.len() {
            return Ok((raw_frame(value), EncodeOutcome::RawFrame));
        }
        // The buffer was sized for the worst case: do not keep a value-sized allocation alive.
        out.shrink_to_fit();
        Ok((Bytes::from(out), EncodeOutcome::Compressed))
    }

    /// Decodes a value read from `key` (a `KeyValue.value`).
    ///
    /// Outside every prefix, and for values without the magic (written before the proxy was
    /// installed, or stored as they are), the value is returned unchanged. A frame that cannot
    /// be decoded is a [`DecodeError`] naming the key; never garbage.
    pub fn decode(&self, key: &[u8], value: &Bytes) -> Result<Bytes, DecodeError> {
        let mut unbounded = u64::MAX;
        self.decode_within(key, value, &mut unbounded)
    }

    /// [`ValueCodec::decode`], charging the decompressed size against `budget` (bytes left for
    /// the whole response; start from [`ValueCodec::max_response_bytes`]). A value that would
    /// overdraw it fails with [`DecodeReason::ResponseTooLarge`] before anything is decompressed,
    /// so small stored values cannot make one response take gigabytes of memory.
    pub fn decode_within(&self, key: &[u8], value: &Bytes, budget: &mut u64) -> Result<Bytes, DecodeError> {
        self.decode_with_bases(key, value, budget, &[])
    }

    /// [`ValueCodec::decode_within`], where a delta frame's base is looked up first in `pinned`
    /// (the bases loaded for this response, see `crate::delta::Deltas::prefetch`), then in the
    /// base cache. A missing base is [`DecodeReason::Base`].
    pub fn decode_with_bases(&self, key: &[u8], value: &Bytes, budget: &mut u64, pinned: &[Arc<Base>]) -> Result<Bytes, DecodeError> {
        if !frame::is_framed(value) || self.rule_for(key).is_none() {
            return Ok(value.clone());
        }
        let error = |reason| DecodeError { key: Bytes::copy_from_slice(key), reason };
        if let Some(size) = declared_size(value) {
            if size > *budget {
                return Err(error(DecodeReason::ResponseTooLarge { size, limit: self.max_response_bytes }));
            }
        }
        let base = match frame::parse(value) {
            Ok(frame::Frame { base: Some(r), .. }) => {
                let found = pinned.iter().find(|b| b.id == r.id && b.key == key).cloned().or_else(|| self.bases.get(key, r.id));
                if found.is_none() {
                    let detail = self.bases.unavailable_reason(key, r.id).unwrap_or_else(|| "not loaded".into());
                    return Err(error(DecodeReason::Base { id: r.id, detail }));
                }
                found
            }
            _ => None,
        };
        let decoded = decode_frame(value, self.max_value_bytes, &*self.dictionaries, base.as_deref())
            .map_err(error)?;
        Ok(match decoded {
            Some(bytes) => {
                *budget = budget.saturating_sub(bytes.len() as u64);
                bytes
            }
            None => value.slice(frame::HEADER_LEN..),
        })
    }

    /// The dictionary ID that decoding this stored value needs, if any: the server makes sure it
    /// is loaded before decoding. `None` for values decode returns as stored, raw frames, frames
    /// without a dictionary, and malformed headers (decode reports those).
    pub fn needed_dictionary(&self, key: &[u8], value: &[u8]) -> Option<u32> {
        if !frame::is_framed(value) || self.rule_for(key).is_none() {
            return None;
        }
        frame::parse(value).ok().filter(|f| f.codec == Codec::Zstd && f.dictionary_id != 0).map(|f| f.dictionary_id)
    }

    /// The base that decoding this stored value needs, if it is a delta frame under a prefix
    /// (the server loads it before decoding, as it does dictionaries).
    pub fn needed_base(&self, key: &[u8], value: &[u8]) -> Option<delta::BaseRef> {
        if !frame::is_framed(value) || self.rule_for(key).is_none() {
            return None;
        }
        frame::parse(value).ok().and_then(|f| f.base)
    }

    /// Uses `source` for the bases of delta frames that are not pinned.
    pub fn with_bases(mut self, source: Arc<dyn BaseSource>) -> Self {
        self.bases = source;
        self
    }

    /// Encodes `value` for `key` as a delta frame against `base`, or returns `None` when the value
    /// is not one the prefix compresses (no delta rule, `compress = false`, below `min_size`,
    /// `k8s:enc:`): the caller then uses [`ValueCodec::encode`], which also enforces
    /// `limits.max_value_bytes`. `base.key` must be `key`.
    pub fn encode_delta(&self, key: &[u8], value: &Bytes, base: &Base) -> Result<Option<Bytes>, EncodeError> {
        if self.delta_candidate(key, value).is_none() {
            return Ok(None);
        }
        debug_assert_eq!(&base.key[..], key);
        delta::encode_delta(value, base)
            .map(Some)
            .map_err(|e| EncodeError { key: Bytes::copy_from_slice(key), reason: e.into() })
    }

    /// The prefix rule when `value` may be stored as a delta frame under `key`.
    pub fn delta_candidate(&self, key: &[u8], value: &Bytes) -> Option<&PrefixRule> {
        let rule = self.rule_for(key)?;
        let ok = rule.delta.is_some()
            && rule.compress
            && value.len() >= rule.min_size.max(1)
            && value.len() <= self.max_value_bytes
            && !value.starts_with(K8S_ENCRYPTED_PREFIX);
        ok.then_some(rule)
    }

    /// Largest value this codec accepts and decodes (`limits.max_value_bytes`), in bytes.
    pub fn max_value_bytes(&self) -> usize {
        self.max_value_bytes
    }
}

/// The decompressed size a zstd frame declares, if `value` is one with a readable header.
fn declared_size(value: &[u8]) -> Option<u64> {
    let f = frame::parse(value).ok()?;
    (f.codec != Codec::Raw).then(|| zstd::zstd_safe::get_frame_content_size(f.payload).ok().flatten()).flatten()
}

/// Decodes a framed value. `Ok(None)` means a raw frame: the original bytes are the payload.
/// A frame naming a dictionary is decoded with that dictionary from `dictionaries`.
///
/// Errors name what is wrong: header, dictionary not loaded, missing or oversized content size,
/// trailing bytes, or a zstd error (corrupt data, checksum mismatch, wrong dictionary).
pub fn decode_frame(value: &[u8], max_value_bytes: usize, dictionaries: &dyn DictionarySource, base: Option<&Base>) -> Result<Option<Bytes>, DecodeReason> {
    let f = frame::parse(value)?;
    match f.codec {
        Codec::Raw if f.dictionary_id != 0 => Err(DecodeReason::RawWithDictionary(f.dictionary_id)),
        Codec::Raw => Ok(None),
        Codec::Delta => {
            let r = f.base.expect("parse sets the base of a delta frame");
            let base_error = |detail: &str| DecodeReason::Base { id: r.id, detail: detail.into() };
            if f.dictionary_id != 0 {
                return Err(base_error("a delta frame names no dictionary"));
            }
            let Some(base) = base else { return Err(base_error("not loaded")) };
            if base.id != r.id || base.checksum != r.checksum {
                return Err(base_error("the stored base has another ID or checksum"));
            }
            let size = checked_frame_size(f.payload, max_value_bytes)?;
            let out = delta::decode_delta(f.payload, size as usize, base).map_err(DecodeReason::Zstd)?;
            if out.len() as u64 != size {
                return Err(DecodeReason::Zstd(format!("decompressed {} bytes, frame declares {size}", out.len())));
            }
            Ok(Some(Bytes::from(out)))
        }
        Codec::Zstd => {
            let size = checked_frame_size(f.payload, max_value_bytes)?;
            let out = if f.dictionary_id == 0 {
                DECOMPRESSOR.with(|cell| {
                    let mut slot = cell.borrow_mut();
                    if slot.is_none() {
                        *slot = Some(zstd::bulk::Decompressor::new()?);
                    }
                    slot.as_mut().expect("set above").decompress(f.payload, size as usize)
                })
            } else {
                let id = f.dictionary_id;
                let Some(d) = dictionaries.decoder(id) else {
                    let detail = dictionaries.unavailable_reason(id).unwrap_or_else(|| "not loaded".into());
                    return Err(DecodeReason::UnknownDictionary { id, detail });
                };
                // A thread-local context, given the prepared dictionary per call
                // (ZSTD_decompress_usingDDict): no context is created per value, and the
                // context keeps no borrow of a dictionary that may be replaced.
                DICT_DCTX.with(|cell| {
                    let mut slot = cell.borrow_mut();
                    if slot.is_none() {
                        *slot = Some(zstd::zstd_safe::DCtx::try_create().ok_or_else(|| std::io::Error::other("cannot create a zstd context"))?);
                    }
                    let mut out = Vec::with_capacity(size as usize);
                    slot.as_mut()
                        .expect("set above")
                        .decompress_using_ddict(&mut out, f.payload, d.dictionary.as_ddict())
                        .map_err(|code| std::io::Error::other(zstd::zstd_safe::get_error_name(code)))?;
                    Ok(out)
                })
            }
            .map_err(|e| DecodeReason::Zstd(e.to_string()))?;
            if out.len() as u64 != size {
                return Err(DecodeReason::Zstd(format!("decompressed {} bytes, frame declares {size}", out.len())));
            }
            Ok(Some(Bytes::from(out)))
        }
    }
}

/// Reads the base record stored at `base_key`: checks that it names the same key (by its
/// directory hash) and ID, decodes the content's frame (at most `max_value_bytes`; a dictionary it
/// names must be in `dictionaries`) and verifies its checksum. Errors: [`BaseError`]; never a panic.
pub fn decode_base(base_key_bytes: &[u8], record: &[u8], max_value_bytes: usize, dictionaries: &dyn DictionarySource) -> Result<Base, BaseError> {
    read_base(base_key_bytes, record, max_value_bytes, dictionaries, true)
}

/// [`decode_base`] for a record this process verified before (it made the record, or
/// [`decode_base`] accepted it) and kept in memory since: everything is checked but the content's
/// SHA-256, which costs as much as decompressing it (a zstd frame's own content checksum still
/// guards the decompression; a raw frame is the bytes this process held).
pub fn decode_verified_base(base_key_bytes: &[u8], record: &[u8], max_value_bytes: usize, dictionaries: &dyn DictionarySource) -> Result<Base, BaseError> {
    read_base(base_key_bytes, record, max_value_bytes, dictionaries, false)
}

fn read_base(base_key_bytes: &[u8], record: &[u8], max_value_bytes: usize, dictionaries: &dyn DictionarySource, verify: bool) -> Result<Base, BaseError> {
    let take = |at: usize, n: usize| record.get(at..at + n).ok_or(BaseError::Malformed("truncated"));
    if take(0, 4)? != delta::BASE_MAGIC {
        return Err(BaseError::Malformed("no base magic"));
    }
    if take(4, 1)?[0] != 1 {
        return Err(BaseError::Malformed("unknown base format version"));
    }
    let key_len = u32::from_le_bytes(take(6, 4)?.try_into().expect("4 bytes")) as usize;
    let key = take(10, key_len)?;
    let id = u64::from_le_bytes(take(10 + key_len, 8)?.try_into().expect("8 bytes"));
    let checksum = u64::from_le_bytes(take(18 + key_len, 8)?.try_into().expect("8 bytes"));
    if delta::base_key(key, id) != base_key_bytes {
        return Err(BaseError::WrongKey);
    }
    let payload = &record[26 + key_len..];
    if !frame::is_framed(payload) {
        return Err(BaseError::Malformed("the content is not a frame"));
    }
    if frame::parse(payload).is_ok_and(|f| f.codec == Codec::Delta) {
        return Err(BaseError::Malformed("a base cannot be a delta frame"));
    }
    let content = match decode_frame(payload, max_value_bytes, dictionaries, None) {
        Ok(Some(content)) => content,
        Ok(None) => Bytes::copy_from_slice(&payload[frame::HEADER_LEN..]),
        Err(e) => return Err(BaseError::Content(e.to_string())),
    };
    if content.len() > max_value_bytes {
        return Err(BaseError::Content(format!("{} bytes, over limits.max_value_bytes ({max_value_bytes})", content.len())));
    }
    if verify && delta::content_checksum(&content) != checksum {
        return Err(BaseError::Checksum);
    }
    Ok(Base { key: Bytes::copy_from_slice(key), id, checksum, content, record_len: record.len() })
}

/// The content size `payload` (one whole zstd frame) declares, checked against `max_value_bytes`,
/// with nothing after the frame.
fn checked_frame_size(payload: &[u8], max_value_bytes: usize) -> Result<u64, DecodeReason> {
    let size = match zstd::zstd_safe::get_frame_content_size(payload) {
        Ok(Some(size)) => size,
        Ok(None) => return Err(DecodeReason::NoContentSize),
        Err(_) => return Err(DecodeReason::Zstd("not a zstd frame".into())),
    };
    if size > max_value_bytes as u64 {
        return Err(DecodeReason::TooLarge { size, limit: max_value_bytes });
    }
    let frame_len = zstd::zstd_safe::find_frame_compressed_size(payload)
        .map_err(|code| DecodeReason::Zstd(zstd::zstd_safe::get_error_name(code).to_string()))?;
    if frame_len != payload.len() {
        return Err(DecodeReason::FrameLength { actual: payload.len(), frame: frame_len });
    }
    Ok(size)
}

fn raw_frame(value: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(frame::HEADER_LEN + value.len());
    frame::write_header(&mut out, Codec::Raw, 0);
    out.extend_from_slice(value);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec() -> ValueCodec {
        ValueCodec::new(
            vec![PrefixRule { prefix: Bytes::from_static(b"/registry/wf/"), compress: true, level: 3, min_size: 64, delta: None }],
            1 << 20,
        )
    }

    const KEY: &[u8] = b"/registry/wf/ns/a";

    fn json(n: usize) -> Bytes {
        let mut s = String::from("{\"items\":[");
        for i in 0..n {
            s.push_str(&format!("{{\"name\":\"item-{i}\",\"phase\":5}},"));
        }
        s.push_str("{}]}\n");
        Bytes::from(s)
    }

    #[test]
    fn table() {
        let c = codec();
        let big = json(500);
        let framed_user = {
            let mut v = frame::MAGIC.to_vec();
            v.extend_from_slice(b"user bytes");
            Bytes::from(v)
        };
        let cases: Vec<(&[u8], Bytes, EncodeOutcome)> = vec![
            (b"/other/key", big.clone(), EncodeOutcome::Untouched),
            (KEY, big.clone(), EncodeOutcome::Compressed),
            (KEY, Bytes::from_static(b"{}"), EncodeOutcome::RawFrame),
            (KEY, Bytes::new(), EncodeOutcome::RawFrame),
            (KEY, framed_user.clone(), EncodeOutcome::RawFrame),
            (b"/other/key", framed_user, EncodeOutcome::Untouched),
            (KEY, Bytes::from(format!("k8s:enc:aescbc:v1:key1:{}", "x".repeat(200))), EncodeOutcome::StoredAsIs),
        ];
        for (key, value, want) in cases {
            let (stored, outcome) = c.encode(key, &value).unwrap();
            assert_eq!(outcome, want, "{}", KeyDisplay(key));
            match want {
                EncodeOutcome::Untouched | EncodeOutcome::StoredAsIs => assert_eq!(stored, value),
                _ => assert!(frame::is_framed(&stored), "{}", KeyDisplay(key)),
            }
            if want == EncodeOutcome::Compressed {
                assert!(stored.len() * 5 < value.len());
                assert_eq!(frame::parse(&stored).unwrap().codec, Codec::Zstd);
            }
            assert_eq!(c.decode(key, &stored).unwrap(), value);
        }
    }

    #[test]
    fn incompressible_is_stored_raw() {
        use rand::{RngCore, SeedableRng};
        let mut v = vec![0u8; 4096];
        rand_chacha::ChaCha8Rng::seed_from_u64(1).fill_bytes(&mut v);
        let v = Bytes::from(v);
        let (stored, outcome) = codec().encode(KEY, &v).unwrap();
        assert_eq!(outcome, EncodeOutcome::RawFrame);
        assert_eq!(stored.len(), v.len() + frame::HEADER_LEN);
    }

    #[test]
    fn corrupt_frames_are_errors_naming_the_key() {
        let c = codec();
        let (stored, _) = c.encode(KEY, &json(500)).unwrap();
        let mut flipped = stored.to_vec();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x55;
        let mut truncated = stored.to_vec();
        truncated.truncate(stored.len() - 3);
        let mut trailing = stored.to_vec();
        trailing.push(0);
        let mut dict = stored.to_vec();
        dict[6] = 7;
        for bad in [flipped, truncated, trailing, dict, frame::MAGIC.to_vec()] {
            let err = c.decode(KEY, &Bytes::from(bad)).unwrap_err();
            assert!(err.to_string().contains("/registry/wf/ns/a"), "{err}");
        }
    }

    #[test]
    fn decompression_bomb_is_refused() {
        let big = ValueCodec::new(codec().rules, 1 << 30);
        let zeros = Bytes::from(vec![b' '; 2 << 20]);
        let (stored, _) = big.encode(KEY, &zeros).unwrap();
        assert!(stored.len() < 1024);
        let err = codec().decode(KEY, &stored).unwrap_err();
        assert!(matches!(err.reason, DecodeReason::TooLarge { .. }), "{err}");
    }

    #[test]
    fn reserved_prefix_is_never_compressed() {
        let every = ValueCodec::new(vec![PrefixRule { prefix: Bytes::new(), compress: true, level: 3, min_size: 0, delta: None }], 1 << 20);
        let key = b"/etcd-squeeze/dictionaries/0000000001";
        let v = json(500);
        assert_eq!(every.encode(key, &v).unwrap(), (v.clone(), EncodeOutcome::Untouched));
        let (framed, _) = every.encode(KEY, &v).unwrap();
        assert_eq!(every.decode(key, &framed).unwrap(), framed, "returned as stored");
        assert_eq!(every.needed_dictionary(key, &framed), None);
    }

    #[test]
    fn response_budget_and_value_limit() {
        let c = codec();
        let (stored, _) = c.encode(KEY, &json(500)).unwrap();
        let size = json(500).len() as u64;
        let mut budget = size * 2 + 10;
        c.decode_within(KEY, &stored, &mut budget).unwrap();
        c.decode_within(KEY, &stored, &mut budget).unwrap();
        let err = c.decode_within(KEY, &stored, &mut budget).unwrap_err();
        assert!(matches!(err.reason, DecodeReason::ResponseTooLarge { .. }), "{err}");
        let too_big = Bytes::from(vec![b' '; (1 << 20) + 1]);
        let err = c.encode(KEY, &too_big).unwrap_err();
        assert!(matches!(err.reason, EncodeReason::TooLarge { .. }), "{err}");
        assert!(c.encode(b"/elsewhere", &too_big).is_ok(), "outside the prefixes etcd decides");
    }

    #[test]
    fn ranges_and_prefixes() {
        let c = codec();
        assert!(c.range_touches_prefix(b"/registry/wf/ns/a", b""));
        assert!(!c.range_touches_prefix(b"/registry/x", b""));
        assert!(c.range_touches_prefix(b"/registry/", b"/registry0"));
        assert!(c.range_touches_prefix(b"/", b"\0"));
        assert!(!c.range_touches_prefix(b"/registry/x", b"/registry/y"));
        assert!(!c.range_touches_prefix(b"/a", b"/b"));
        assert_eq!(prefix_end(b"/a"), Some(b"/b".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b""), None);
    }
}
