//! Delta frames and bases: a new version of a key stored as a zstd frame compressed against an
//! earlier version of the same key (as `zstd --patch-from` does).
//!
//! Pure functions over bytes. A **base** is an immutable full copy of one version of key K, kept
//! in etcd under [`base_key`]`(K, id)` as a base record:
//!
//! ```text
//! offset  size  field
//! 0       4     magic            FF 53 51 42  ("\xFFSQB")
//! 4       1     format version   1
//! 5       1     reserved         0
//! 6       4     key length n     u32 little-endian
//! 10      n     key K            the key whose versions use this base
//! 10+n    8     base ID          u64 little-endian (also the last part of its etcd key)
//! 18+n    8     content checksum u64 little-endian: the first 8 bytes of SHA-256(content)
//! 26+n    ...   the base content as an etcd-squeeze frame (codec 0 or 1, with the prefix's
//!               dictionary when it has one), exactly as the value would be stored on its own
//! ```
//!
//! A **delta frame** (codec 2 of [`super::frame`]) names its base by ID and content checksum and
//! carries one zstd frame compressed with the base content as a raw-content prefix
//! (`ZSTD_CCtx_refPrefix`). Decoding needs exactly that content: a base whose checksum differs
//! is refused. See `docs/frame-format.md`.

use bytes::Bytes;
use sha2::{Digest, Sha256};
use zstd::zstd_safe::{self, CCtx, CParameter, DCtx, DParameter};

use super::frame::{self, Codec};
use super::key::KeyDisplay;
pub use super::frame::{BaseRef, DELTA_REF_LEN};

/// Where bases live: `/etcd-squeeze/bases/<32 hex digits of SHA-256(K)>/<16 hex digits of the base ID>`.
/// Under the reserved prefix, so never compressed or decoded by the proxy itself.
pub const BASES_PREFIX: &[u8] = b"/etcd-squeeze/bases/";
/// The four bytes a base record starts with.
pub const BASE_MAGIC: [u8; 4] = [0xFF, b'S', b'Q', b'B'];
/// Largest zstd window a delta frame may use (2^27 = 128 MiB, zstd's default decoder limit).
pub const MAX_WINDOW_LOG: u32 = 27;
/// zstd level of delta frames, whatever the prefix's level: level 1 with long-distance matching
/// finds the base's long matches best and fastest (measured on FlyteWorkflow series: better
/// ratio than level 3 with or without it, compression as fast as plain level 3, decompression
/// 2.5x faster; docs/benchmarks.md). Without long-distance matching level 1 misses most matches
/// in a ~1 MB base.
pub const DELTA_LEVEL: i32 = 1;

/// One base, decompressed and verified: what encoding and decoding a delta frame need.
#[derive(Clone, PartialEq, Eq)]
pub struct Base {
    /// The etcd key K whose versions are deltas against this base.
    pub key: Bytes,
    /// The base ID (random, unique per key).
    pub id: u64,
    /// First 8 bytes of SHA-256 of `content`, little-endian.
    pub checksum: u64,
    /// The full version of K this base holds.
    pub content: Bytes,
    /// Size of the base record as stored in etcd, in bytes (what the base costs).
    pub record_len: usize,
}

impl std::fmt::Debug for Base {
    // Never the content: no value bytes in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Base")
            .field("key", &KeyDisplay(&self.key).to_string())
            .field("id", &format_args!("{:016x}", self.id))
            .field("content_len", &self.content.len())
            .field("record_len", &self.record_len)
            .finish()
    }
}

/// Why a base record cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BaseError {
    /// Not a base record, or cut short.
    #[error("base record is malformed: {0}")]
    Malformed(&'static str),
    /// The record says it belongs to another key or ID than its etcd key says.
    #[error("base record belongs to another key or ID")]
    WrongKey,
    /// The content does not match its checksum.
    #[error("base content checksum mismatch")]
    Checksum,
    /// The zstd frame of the content is corrupt or over the size limit.
    #[error("base content: {0}")]
    Content(String),
}

/// First 8 bytes of SHA-256 of `content`, as a little-endian u64.
pub fn content_checksum(content: &[u8]) -> u64 {
    let digest = Sha256::digest(content);
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// The directory of K's bases: `/etcd-squeeze/bases/<32 hex digits of SHA-256(K)>/`. Every base of
/// K is a key under it, so one DeleteRange over it removes them all.
pub fn bases_dir(key: &[u8]) -> Vec<u8> {
    let digest = Sha256::digest(key);
    let mut dir = BASES_PREFIX.to_vec();
    for b in &digest[..16] {
        dir.extend_from_slice(format!("{b:02x}").as_bytes());
    }
    dir.push(b'/');
    dir
}

/// The etcd key of base `id` of key K.
pub fn base_key(key: &[u8], id: u64) -> Bytes {
    let mut k = bases_dir(key);
    k.extend_from_slice(format!("{id:016x}").as_bytes());
    Bytes::from(k)
}

/// The base ID at the end of a base key, if it is one.
pub fn id_of_base_key(base_key: &[u8]) -> Option<u64> {
    let rest = base_key.strip_prefix(BASES_PREFIX)?;
    let (dir, id) = rest.split_at_checked(33)?;
    if dir.last() != Some(&b'/') || id.len() != 16 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(id).ok()?, 16).ok()
}

/// Builds the base record of `content` as base `id` of `key`, around `frame`: the content
/// encoded as the value would be stored on its own (`ValueCodec::encode`: a zstd frame, with the
/// prefix's dictionary when it has one, or a raw frame). Returns the record (the value to Put at
/// [`base_key`]) and the decoded [`Base`], whose content is a copy: zstd ignores a prefix that
/// shares memory with the value it compresses, and the first delta against a new base is the
/// very value it was made from.
pub fn encode_base(key: &[u8], id: u64, content: &[u8], frame: &[u8]) -> (Bytes, Base) {
    let checksum = content_checksum(content);
    let mut out = Vec::with_capacity(26 + key.len() + frame.len());
    out.extend_from_slice(&BASE_MAGIC);
    out.push(1);
    out.push(0);
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&checksum.to_le_bytes());
    out.extend_from_slice(frame);
    let record = Bytes::from(out);
    let content = Bytes::copy_from_slice(content);
    let base = Base { key: Bytes::copy_from_slice(key), id, checksum, content, record_len: record.len() };
    (record, base)
}

/// The frame inside a base record (its content, encoded), without checking anything else: the
/// caller loads the dictionary it may name before `super::decode_base`.
pub fn record_frame(record: &[u8]) -> Option<&[u8]> {
    let key = record_key(record)?;
    record.get(26 + key.len()..)
}

/// The key K a base record names, read from its header without decompressing (`None` when
/// the bytes are not a base record).
pub fn record_key(record: &[u8]) -> Option<&[u8]> {
    if record.get(..4)? != BASE_MAGIC {
        return None;
    }
    let key_len = u32::from_le_bytes(record.get(6..10)?.try_into().ok()?) as usize;
    record.get(10..10 + key_len)
}

/// The zstd window log a delta of a `value_len`-byte value against a `base_len`-byte base uses:
/// large enough that the whole base stays in the window while the value is compressed.
pub fn window_log(base_len: usize, value_len: usize) -> u32 {
    let total = (base_len + value_len).max(1) as u64;
    (64 - (total - 1).leading_zeros()).clamp(10, MAX_WINDOW_LOG)
}

/// Encodes `value` as a delta frame against `base`: header (codec 2), base ID, base checksum,
/// then one zstd frame (content size + checksum; [`DELTA_LEVEL`], long-distance matching, a
/// window covering base and value) whose prefix is the base content. A context per call: it
/// borrows the base (measured: within 3% of a reused one).
pub fn encode_delta(value: &[u8], base: &Base) -> std::io::Result<Bytes> {
    let err = |code| std::io::Error::other(zstd_safe::get_error_name(code));
    let mut cctx = CCtx::try_create().ok_or_else(|| std::io::Error::other("cannot create a zstd context"))?;
    cctx.set_parameter(CParameter::CompressionLevel(DELTA_LEVEL)).map_err(err)?;
    cctx.set_parameter(CParameter::EnableLongDistanceMatching(true)).map_err(err)?;
    cctx.set_parameter(CParameter::ChecksumFlag(true)).map_err(err)?;
    cctx.set_parameter(CParameter::ContentSizeFlag(true)).map_err(err)?;
    cctx.set_parameter(CParameter::WindowLog(window_log(base.content.len(), value.len()))).map_err(err)?;
    cctx.ref_prefix(&base.content[..]).map_err(err)?;
    let mut out = Vec::with_capacity(frame::HEADER_LEN + DELTA_REF_LEN + zstd_safe::compress_bound(value.len()));
    frame::write_header(&mut out, Codec::Delta, 0);
    out.extend_from_slice(&base.id.to_le_bytes());
    out.extend_from_slice(&base.checksum.to_le_bytes());
    // zstd writes a Vec from its start: give it the bytes after the header.
    let start = out.len();
    out.resize(out.capacity(), 0);
    let written = cctx.compress2(&mut out[start..], value).map_err(err)?;
    out.truncate(start + written);
    out.shrink_to_fit();
    Ok(Bytes::from(out))
}

/// Decompresses the zstd frame of a delta frame (`payload`, declaring `size` bytes) with the base
/// content as its prefix. Errors are zstd's (corrupt data, checksum mismatch, wrong base).
///
/// One context per thread, reused (creating one costs about what decompressing a 100 KB delta
/// does): the base is given per call as a raw-content dictionary (`ZSTD_decompress_usingDict`),
/// which zstd loads exactly as the encoder's prefix — except for content that begins with zstd's
/// dictionary magic, which it would parse as a dictionary: that content gets a context of its
/// own with the base referenced as a prefix.
pub fn decode_delta(payload: &[u8], size: usize, base: &Base) -> Result<Vec<u8>, String> {
    let err = |code| zstd_safe::get_error_name(code).to_string();
    let mut out = Vec::with_capacity(size);
    if base.content.starts_with(&ZSTD_DICTIONARY_MAGIC) {
        let mut dctx = DCtx::try_create().ok_or("cannot create a zstd context")?;
        dctx.set_parameter(DParameter::WindowLogMax(MAX_WINDOW_LOG)).map_err(err)?;
        dctx.ref_prefix(&base.content[..]).map_err(err)?;
        dctx.decompress(&mut out, payload).map_err(err)?;
        return Ok(out);
    }
    DELTA_DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let mut dctx = DCtx::try_create().ok_or("cannot create a zstd context")?;
            dctx.set_parameter(DParameter::WindowLogMax(MAX_WINDOW_LOG)).map_err(err)?;
            *slot = Some(dctx);
        }
        let dctx = slot.as_mut().expect("set above");
        dctx.decompress_using_dict(&mut out, payload, &base.content[..]).map_err(err)
    })?;
    Ok(out)
}

/// The four bytes (little-endian 0xEC30A437) a zstd dictionary starts with.
const ZSTD_DICTIONARY_MAGIC: [u8; 4] = [0x37, 0xA4, 0x30, 0xEC];

thread_local! {
    /// The decompression context [`decode_delta`] reuses on this thread.
    static DELTA_DCTX: std::cell::RefCell<Option<DCtx<'static>>> = const { std::cell::RefCell::new(None) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_base, Empty};

    fn version(n: usize) -> Bytes {
        let mut s = String::from("{\"status\":{\"nodes\":{");
        for i in 0..n {
            s.push_str(&format!("\"n{i}\":{{\"phase\":{},\"message\":\"task n{i} finished\"}},", i % 5));
        }
        s.push_str("\"end\":{}}}}\n");
        Bytes::from(s)
    }

    fn zstd_frame(content: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        frame::write_header(&mut f, Codec::Zstd, 0);
        let mut c = zstd::bulk::Compressor::new(3).unwrap();
        c.include_checksum(true).unwrap();
        c.include_contentsize(true).unwrap();
        f.extend_from_slice(&c.compress(content).unwrap());
        f
    }

    fn base_of(key: &[u8], id: u64, content: &[u8]) -> (Bytes, Base) {
        encode_base(key, id, content, &zstd_frame(content))
    }

    #[test]
    fn base_record_round_trip_and_refusals() {
        let key = b"/registry/flyte.lyft.com/flyteworkflows/ns/wf";
        let content = version(500);
        let (record, base) = base_of(key, 0x1234, &content);
        let none = Empty;
        assert!(record.len() * 5 < content.len());
        let bk = base_key(key, 0x1234);
        assert!(bk.starts_with(&bases_dir(key)));
        assert_eq!(id_of_base_key(&bk), Some(0x1234));
        assert_eq!(decode_base(&bk, &record, 1 << 24, &none).unwrap(), base);
        assert_eq!(record_frame(&record), Some(&zstd_frame(&content)[..]));
        assert_eq!(record_key(&record), Some(&key[..]));
        assert_eq!(decode_base(&base_key(key, 0x1235), &record, 1 << 24, &none), Err(BaseError::WrongKey));
        assert_eq!(decode_base(&base_key(b"/other", 0x1234), &record, 1 << 24, &none), Err(BaseError::WrongKey));
        let mut flipped = record.to_vec();
        let n = flipped.len();
        flipped[n - 6] ^= 1;
        assert!(decode_base(&bk, &flipped, 1 << 24, &none).is_err());
        for cut in [0, 3, 9, 20, record.len() - 1] {
            assert!(decode_base(&bk, &record[..cut], 1 << 24, &none).is_err(), "cut at {cut}");
        }
        assert!(matches!(decode_base(&bk, &record, 100, &none), Err(BaseError::Content(_))));
        // A raw frame works too; a delta frame as a base does not.
        let mut raw = Vec::new();
        frame::write_header(&mut raw, Codec::Raw, 0);
        raw.extend_from_slice(&content);
        let (raw_record, raw_base) = encode_base(key, 9, &content, &raw);
        assert_eq!(decode_base(&base_key(key, 9), &raw_record, 1 << 24, &none).unwrap(), raw_base);
        let delta = encode_delta(&content, &base).unwrap();
        let (bad, _) = encode_base(key, 10, &content, &delta);
        assert!(decode_base(&base_key(key, 10), &bad, 1 << 24, &none).is_err());
    }

    #[test]
    fn delta_round_trip_is_small() {
        let key = b"/k";
        let (_, base) = base_of(key, 7, &version(2000));
        let next = version(2010);
        let delta = encode_delta(&next, &base).unwrap();
        let itself = encode_delta(&next, &base_of(key, 9, &next).1).unwrap();
        assert!(itself.len() < 100, "a version against itself: {} bytes", itself.len());
        let alone = zstd::bulk::compress(&next, 3).unwrap();
        assert!(delta.len() * 5 < alone.len(), "delta {} vs alone {}", delta.len(), alone.len());
        let f = frame::parse(&delta).unwrap();
        assert_eq!(f.codec, Codec::Delta);
        assert_eq!(f.base, Some(BaseRef { id: 7, checksum: base.checksum }));
        assert_eq!(decode_delta(f.payload, next.len(), &base).unwrap(), &next[..]);
        // Another base: zstd's checksum (or a corrupt match) catches it.
        let (_, other) = base_of(key, 8, &version(1990));
        assert!(decode_delta(f.payload, next.len(), &other).map(|v| v != next[..]).unwrap_or(true));
    }

    #[test]
    fn a_base_that_looks_like_a_zstd_dictionary_still_decodes() {
        let mut content = ZSTD_DICTIONARY_MAGIC.to_vec();
        content.extend_from_slice(&version(300));
        let (_, base) = base_of(b"/k", 3, &content);
        let mut next = content.clone();
        next.extend_from_slice(b"more");
        let delta = encode_delta(&next, &base).unwrap();
        let f = frame::parse(&delta).unwrap();
        assert_eq!(decode_delta(f.payload, next.len(), &base).unwrap(), next);
        // And the reused context serves the next plain base after it.
        let (_, plain) = base_of(b"/k", 4, &version(300));
        let d = encode_delta(&version(301), &plain).unwrap();
        assert_eq!(decode_delta(frame::parse(&d).unwrap().payload, version(301).len(), &plain).unwrap(), version(301));
    }

    #[test]
    fn window_covers_base_and_value() {
        assert_eq!(window_log(0, 0), 10);
        assert_eq!(window_log(1 << 20, 1 << 20), 21);
        assert_eq!(window_log((1 << 20) + 1, 1 << 20), 22);
        assert_eq!(window_log(1 << 30, 1 << 30), MAX_WINDOW_LOG);
    }
}
