//! The dictionary store in etcd: one immutable key per dictionary ID under a reserved prefix.
//!
//! Key: `<key_prefix><id, 10 zero-padded decimal digits>` (e.g. `/etcd-squeeze/dictionaries/0000000007`),
//! so keys sort by ID. Value: a record, one JSON line of [`DictionaryMeta`] then the raw zstd
//! dictionary:
//!
//! ```text
//! {"format":1,"id":7,"prefix":"/registry/…/","created_unix":…,"samples":…,"size":…,"sha256":"…",…}\n
//! <size bytes of zstd dictionary>
//! ```
//!
//! A new ID is claimed with a Txn on `create_revision(key) == 0` (plus any guard, such as "I still
//! hold the trainer election"), so two replicas can never publish different dictionaries under one
//! ID, and the record appears whole or not at all. The store talks to etcd directly (never through
//! the proxy's codec): records are stored as they are.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use crate::upstream::Upstream;

use crate::proto::etcdserverpb::kv_client::KvClient;
use crate::proto::etcdserverpb::{
    compare, range_request, request_op, response_op, Compare, DeleteRangeRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest,
};

/// The record format this build writes and reads.
pub const RECORD_FORMAT: u32 = 1;
/// The first four bytes of a zstd dictionary (`ZSTD_MAGIC_DICTIONARY`, little-endian); the
/// dictionary's own ID follows in the next four.
pub const ZSTD_DICT_MAGIC: [u8; 4] = [0x37, 0xA4, 0x30, 0xEC];
/// How many IDs a publish tries before giving up (another publisher keeps taking the next one).
const PUBLISH_ATTEMPTS: u32 = 16;
/// Records fetched per page when listing: a record is about one dictionary (tens of KB).
const LIST_PAGE: i64 = 16;

/// What a dictionary record says about its dictionary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DictionaryMeta {
    /// Record format ([`RECORD_FORMAT`]).
    pub format: u32,
    /// The dictionary ID (the key's suffix, the frame header's dictionary ID, zstd's dictID).
    pub id: u32,
    /// The `[[prefixes]]` prefix the dictionary was trained for and serves.
    pub prefix: String,
    /// When it was trained, Unix seconds.
    pub created_unix: u64,
    /// Values it was trained on.
    pub samples: u64,
    /// Their total size in bytes.
    pub sample_bytes: u64,
    /// zstd level its held-out evaluation used (the prefix's level).
    pub level: i32,
    /// Dictionary size in bytes.
    pub size: u64,
    /// SHA-256 of the dictionary bytes, lowercase hex.
    pub sha256: String,
    /// Held-out bytes compressed without this dictionary (with the prefix's previous one, or none).
    pub heldout_before: u64,
    /// The same held-out bytes compressed with this dictionary.
    pub heldout_after: u64,
    /// Which replica or command trained it (`host/pid/listen`, or `etcd-squeeze dict train`).
    pub trained_by: String,
}

/// A dictionary as stored: metadata, the raw dictionary, and etcd's mod_revision of its key.
#[derive(Debug, Clone)]
pub struct Record {
    /// What the record says.
    pub meta: DictionaryMeta,
    /// The raw zstd dictionary.
    pub raw: Bytes,
    /// etcd's `mod_revision` of the key (guards deletion).
    pub mod_revision: i64,
}

/// A record that cannot be used: it is refused, never half-used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// No newline-terminated JSON header.
    #[error("record has no metadata line")]
    NoHeader,
    /// The header is not the JSON this build expects.
    #[error("record metadata: {0}")]
    Meta(String),
    /// A record format this build does not know.
    #[error("record format {0} is unknown (this build reads format {RECORD_FORMAT})")]
    Format(u32),
    /// The record's ID is not its key's.
    #[error("record says dictionary ID {inside}, its key says {key}")]
    IdMismatch {
        /// ID in the key.
        key: u32,
        /// ID in the metadata.
        inside: u32,
    },
    /// The dictionary bytes are not as long as the metadata says.
    #[error("dictionary is {actual} bytes, its metadata says {declared}")]
    Size {
        /// Declared size.
        declared: u64,
        /// Actual size.
        actual: usize,
    },
    /// SHA-256 mismatch: the dictionary bytes were altered.
    #[error("checksum mismatch: sha256 is {actual}, its metadata says {declared}")]
    Checksum {
        /// Declared checksum.
        declared: String,
        /// Checksum of the bytes found.
        actual: String,
    },
    /// zstd's own dictionary ID disagrees with the record's.
    #[error("the zstd dictionary carries dictID {inside}, the record says {id}")]
    ZstdId {
        /// The record's ID.
        id: u32,
        /// zstd's dictID.
        inside: u32,
    },
}

/// An etcd call of the store failed, or a stored record is refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// etcd answered with an error (or could not be reached).
    #[error("etcd: {0}")]
    Etcd(#[from] tonic::Status),
    /// The record of dictionary `id` is refused.
    #[error("dictionary {id}: {source}")]
    Record {
        /// The dictionary ID.
        id: u32,
        /// Why.
        source: RecordError,
    },
    /// A publish's guard failed (for a trainer: it no longer holds the election).
    #[error("publish guard failed (no longer the elected trainer)")]
    GuardFailed,
    /// Every ID tried was taken by another publisher meanwhile.
    #[error("could not claim a dictionary ID after {0} attempts")]
    NoFreeId(u32),
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Sets zstd's own dictionary ID inside a zstd-format dictionary (bytes 4..8 after the magic),
/// so zstd frames compressed with it carry the same ID as the frame header and zstd itself
/// refuses to decode them with any other dictionary. A raw-content dictionary is left as it is.
pub fn set_zstd_dict_id(raw: &mut [u8], id: u32) {
    if raw.len() >= 8 && raw[..4] == ZSTD_DICT_MAGIC {
        raw[4..8].copy_from_slice(&id.to_le_bytes());
    }
}

/// Serializes a record: the metadata line, then the dictionary.
pub fn encode_record(meta: &DictionaryMeta, raw: &[u8]) -> Vec<u8> {
    let mut out = serde_json::to_vec(meta).expect("metadata serializes");
    out.push(b'\n');
    out.extend_from_slice(raw);
    out
}

/// Parses and verifies the record stored under dictionary `id`'s key: format, ID (key, metadata
/// and zstd's dictID agree), size and SHA-256.
pub fn decode_record(id: u32, value: &Bytes) -> Result<(DictionaryMeta, Bytes), RecordError> {
    let newline = value.iter().position(|&b| b == b'\n').ok_or(RecordError::NoHeader)?;
    let meta: DictionaryMeta = serde_json::from_slice(&value[..newline]).map_err(|e| RecordError::Meta(e.to_string()))?;
    if meta.format != RECORD_FORMAT {
        return Err(RecordError::Format(meta.format));
    }
    if meta.id != id {
        return Err(RecordError::IdMismatch { key: id, inside: meta.id });
    }
    let raw = value.slice(newline + 1..);
    if raw.len() as u64 != meta.size {
        return Err(RecordError::Size { declared: meta.size, actual: raw.len() });
    }
    let actual = sha256_hex(&raw);
    if actual != meta.sha256 {
        return Err(RecordError::Checksum { declared: meta.sha256, actual });
    }
    if let Some(inside) = zstd::zstd_safe::get_dict_id_from_dict(&raw) {
        if inside.get() != id {
            return Err(RecordError::ZstdId { id, inside: inside.get() });
        }
    }
    Ok((meta, raw))
}

/// The dictionaries in etcd, under one key prefix.
#[derive(Debug, Clone)]
pub struct Store {
    kv: KvClient<Upstream>,
    prefix: String,
}

impl Store {
    /// A store under `prefix` (e.g. `/etcd-squeeze/dictionaries/`), talking to etcd over `channel`.
    pub fn new(channel: Upstream, prefix: impl Into<String>) -> Self {
        let kv = KvClient::new(channel).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX);
        Store { kv, prefix: prefix.into() }
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The key of dictionary `id`.
    pub fn key(&self, id: u32) -> Bytes {
        Bytes::from(format!("{}{id:010}", self.prefix))
    }

    /// The dictionary ID named by a key under the prefix, if it is one.
    pub fn id_of(&self, key: &[u8]) -> Option<u32> {
        let rest = key.strip_prefix(self.prefix.as_bytes())?;
        if rest.len() != 10 || !rest.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(rest).ok()?.parse().ok().filter(|&id| id != 0)
    }

    /// A KV client on the same channel (for the election and the operator commands).
    pub fn kv(&self) -> KvClient<Upstream> {
        self.kv.clone()
    }

    /// Parses the stored value of `key` as a record.
    pub fn parse(&self, key: &[u8], value: &Bytes, mod_revision: i64) -> Option<Result<Record, StoreError>> {
        let id = self.id_of(key)?;
        Some(
            decode_record(id, value)
                .map(|(meta, raw)| Record { meta, raw, mod_revision })
                .map_err(|source| StoreError::Record { id, source }),
        )
    }

    /// Dictionary `id`, verified; `Ok(None)` when no such key exists.
    pub async fn get(&self, id: u32) -> Result<Option<Record>, StoreError> {
        let key = self.key(id);
        let resp = self.kv.clone().range(RangeRequest { key: key.clone(), ..Default::default() }).await?.into_inner();
        let Some(kv) = resp.kvs.into_iter().next() else { return Ok(None) };
        self.parse(&kv.key, &kv.value, kv.mod_revision).transpose()
    }

    /// Visits the stored records newest (highest ID) first, a page at a time, until `visit` returns
    /// false. Records that fail verification are passed as errors. Returns the revision the
    /// listing was pinned at (to watch from).
    pub async fn scan_newest_first(
        &self,
        mut visit: impl FnMut(Result<Record, StoreError>) -> bool,
    ) -> Result<i64, StoreError> {
        let start = Bytes::from(self.prefix.clone());
        let mut end = Bytes::from(crate::codec::prefix_end(self.prefix.as_bytes()).unwrap_or_else(|| vec![0]));
        let mut revision = 0;
        loop {
            let req = RangeRequest {
                key: start.clone(),
                range_end: end.clone(),
                limit: LIST_PAGE,
                revision,
                sort_order: range_request::SortOrder::Descend as i32,
                sort_target: range_request::SortTarget::Key as i32,
                ..Default::default()
            };
            let resp = self.kv.clone().range(req).await?.into_inner();
            if revision == 0 {
                revision = resp.header.as_ref().map_or(0, |h| h.revision);
            }
            for kv in &resp.kvs {
                if let Some(record) = self.parse(&kv.key, &kv.value, kv.mod_revision) {
                    if !visit(record) {
                        return Ok(revision);
                    }
                }
            }
            match resp.kvs.last() {
                Some(last) if resp.more => end = last.key.clone(),
                _ => return Ok(revision),
            }
        }
    }

    /// Every record (newest first) and the revision of the listing.
    pub async fn list(&self) -> Result<(Vec<Result<Record, StoreError>>, i64), StoreError> {
        let mut all = Vec::new();
        let revision = self.scan_newest_first(|r| {
            all.push(r);
            true
        })
        .await?;
        Ok((all, revision))
    }

    /// The highest ID in use (0 when there is none).
    pub async fn latest_id(&self) -> Result<u32, StoreError> {
        let req = RangeRequest {
            key: Bytes::from(self.prefix.clone()),
            range_end: Bytes::from(crate::codec::prefix_end(self.prefix.as_bytes()).unwrap_or_else(|| vec![0])),
            limit: 1,
            keys_only: true,
            sort_order: range_request::SortOrder::Descend as i32,
            sort_target: range_request::SortTarget::Key as i32,
            ..Default::default()
        };
        let resp = self.kv.clone().range(req).await?.into_inner();
        Ok(resp.kvs.first().and_then(|kv| self.id_of(&kv.key)).unwrap_or(0))
    }

    /// Publishes a dictionary under the next free ID and returns its record.
    ///
    /// Each attempt writes zstd's dictID and the checksum for the candidate ID and sends one Txn:
    /// `create_revision(key) == 0` and every `guard` compare → Put the whole record. When the ID
    /// was taken meanwhile the next one is tried; when a guard fails, [`StoreError::GuardFailed`].
    pub async fn publish(&self, mut meta: DictionaryMeta, raw: &[u8], guard: &[Compare]) -> Result<Record, StoreError> {
        let mut id = self.latest_id().await?.checked_add(1).ok_or(StoreError::NoFreeId(0))?;
        let mut raw = raw.to_vec();
        for _ in 0..PUBLISH_ATTEMPTS {
            set_zstd_dict_id(&mut raw, id);
            meta.format = RECORD_FORMAT;
            meta.id = id;
            meta.size = raw.len() as u64;
            meta.sha256 = sha256_hex(&raw);
            let key = self.key(id);
            let value = Bytes::from(encode_record(&meta, &raw));
            let mut compares = vec![Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Create as i32,
                key: key.clone(),
                target_union: Some(compare::TargetUnion::CreateRevision(0)),
                ..Default::default()
            }];
            compares.extend_from_slice(guard);
            let put = PutRequest { key: key.clone(), value: value.clone(), ..Default::default() };
            let taken = RangeRequest { key: key.clone(), count_only: true, ..Default::default() };
            let txn = TxnRequest {
                compare: compares,
                success: vec![RequestOp { request: Some(request_op::Request::RequestPut(put)) }],
                failure: vec![RequestOp { request: Some(request_op::Request::RequestRange(taken)) }],
            };
            let resp = self.kv.clone().txn(txn).await?.into_inner();
            if resp.succeeded {
                let mod_revision = resp.header.map_or(0, |h| h.revision);
                return Ok(Record { meta, raw: Bytes::from(raw), mod_revision });
            }
            let id_taken = matches!(resp.responses.first().and_then(|r| r.response.as_ref()),
                Some(response_op::Response::ResponseRange(r)) if r.count > 0);
            if !id_taken {
                return Err(StoreError::GuardFailed);
            }
            id = self.latest_id().await?.max(id).checked_add(1).ok_or(StoreError::NoFreeId(0))?;
        }
        Err(StoreError::NoFreeId(PUBLISH_ATTEMPTS))
    }

    /// Deletes dictionary `id` if its key is still at `mod_revision`; true when deleted.
    pub async fn delete(&self, id: u32, mod_revision: i64) -> Result<bool, StoreError> {
        let key = self.key(id);
        let txn = TxnRequest {
            compare: vec![Compare::mod_equal(key.clone(), mod_revision)],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest { key, ..Default::default() })),
            }],
            failure: vec![],
        };
        Ok(self.kv.clone().txn(txn).await?.into_inner().succeeded)
    }
}

/// Seconds since the Unix epoch (a record's `created_unix`).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> DictionaryMeta {
        DictionaryMeta {
            format: RECORD_FORMAT,
            id: 7,
            prefix: "/registry/wf/".into(),
            created_unix: 1_700_000_000,
            samples: 3,
            sample_bytes: 300,
            level: 3,
            size: 0,
            sha256: String::new(),
            heldout_before: 10,
            heldout_after: 5,
            trained_by: "test".into(),
        }
    }

    fn record(id: u32, raw: &[u8]) -> Bytes {
        let mut raw = raw.to_vec();
        set_zstd_dict_id(&mut raw, id);
        let m = DictionaryMeta { id, size: raw.len() as u64, sha256: sha256_hex(&raw), ..meta() };
        Bytes::from(encode_record(&m, &raw))
    }

    #[test]
    fn record_round_trip_and_refusals() {
        let mut raw = ZSTD_DICT_MAGIC.to_vec();
        raw.extend_from_slice(&[1, 0, 0, 0]);
        raw.extend_from_slice(b"dictionary content");
        let good = record(7, &raw);
        let (m, r) = decode_record(7, &good).unwrap();
        assert_eq!((m.id, &r[4..8]), (7, &7u32.to_le_bytes()[..]));
        assert_eq!(decode_record(8, &good).unwrap_err(), RecordError::IdMismatch { key: 8, inside: 7 });
        let mut flipped = good.to_vec();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(decode_record(7, &Bytes::from(flipped)), Err(RecordError::Checksum { .. })));
        let mut cut = good.to_vec();
        cut.pop();
        assert!(matches!(decode_record(7, &Bytes::from(cut)), Err(RecordError::Size { .. })));
        assert_eq!(decode_record(7, &Bytes::from_static(b"no newline")), Err(RecordError::NoHeader));
        // zstd's dictID must agree with the record's ID even when the checksum was recomputed.
        let mut other = raw.clone();
        set_zstd_dict_id(&mut other, 9);
        let m = DictionaryMeta { size: other.len() as u64, sha256: sha256_hex(&other), ..meta() };
        let forged = Bytes::from(encode_record(&m, &other));
        assert_eq!(decode_record(7, &forged).unwrap_err(), RecordError::ZstdId { id: 7, inside: 9 });
    }

    #[tokio::test]
    async fn keys_sort_by_id() {
        let upstream = Upstream::new(&crate::config::UpstreamConfig::default()).unwrap();
        let s = Store::new(upstream, "/etcd-squeeze/dictionaries/");
        assert_eq!(&s.key(7)[..], b"/etcd-squeeze/dictionaries/0000000007");
        assert_eq!(s.id_of(&s.key(u32::MAX)), Some(u32::MAX));
        assert_eq!(s.id_of(b"/etcd-squeeze/dictionaries/7"), None);
        assert_eq!(s.id_of(&s.key(0)), None);
        assert!(s.key(9) < s.key(10));
    }
}
