//! The rewrite road in the wire bytes: encode `PutRequest.value`s on the way in, decode
//! `KeyValue.value`s on the way out, touching nothing else (unknown fields of a newer etcd stay).
//!
//! Responses go through one walk in four steps: **needs** (which values are frames, which
//! dictionaries and bases they name) → **load** (dictionaries and bases from the caches, else
//! etcd) → **decode** (synchronously, within one `limits.max_response_bytes` budget) → **learn**
//! (which base each delta-framed key uses now), then the decoded values are spliced into the
//! bytes etcd sent ([`crate::wire::splice`]). A response without a frame is passed on as the same
//! bytes.

use std::sync::Arc;

use bytes::Bytes;
use tonic::Status;

use super::shared::Shared;
use super::status::{encode_status, keep_stored};
use crate::codec::delta::{Base, BaseRef};
use crate::codec::frame;
use crate::proto::etcdserverpb::PutRequest;
use crate::proto::mvccpb::KeyValue;
use crate::rewrite::{EncodeStats, KeyValues};
use crate::error::RequestError;
use crate::wire::{self, KeyValueView, Shape, Spliced, WireError};

/// Why a response could not be passed on: the request path's error ([`RequestError`]): etcd's
/// status when a dictionary or base could not be asked for, `Stored` for a response that would
/// decompress beyond `limits.max_response_bytes` (a value that cannot be decoded is not a
/// failure: passed on as stored), `Internal` for response bytes of the wrong shape.
pub type Failure = RequestError;

/// The framed values of one response, as prost `KeyValue`s (key, value, revisions), in the order
/// of their sites; what the dictionary and base loaders and the codec take.
struct Framed(Vec<KeyValue>);

impl KeyValues for Framed {
    fn try_for_each_kv<E>(&mut self, f: &mut impl FnMut(&mut KeyValue) -> Result<(), E>) -> Result<(), E> {
        self.0.iter_mut().try_for_each(f)
    }
}

/// One value that may need decoding: where it sits, and the revisions it was read at (where a
/// base deleted since is still found).
struct Site {
    /// Ordinal of its `KeyValue` among those of the message (wire order), or for a watch
    /// response, `(event ordinal, field)` folded as `2 * event + (field == prev_kv)`.
    slot: usize,
    revisions: Vec<i64>,
}

/// True when `kv` may hold a frame the codec decodes (a key under a prefix, the frame magic).
fn is_candidate(shared: &Shared, key: &[u8], value: &[u8]) -> bool {
    frame::is_framed(value) && shared.codec.rule_for(key).is_some()
}

/// needs → load → decode → learn, for the collected framed values (see [`decode_in_place`]).
async fn decode_framed(shared: &Shared, framed: &mut Framed, sites: &[Site], applied: bool) -> Result<(), Failure> {
    decode_in_place(shared, framed, &[], applied, |framed| {
        framed
            .0
            .iter()
            .zip(sites)
            .filter_map(|(kv, site)| Some((kv.key.clone(), shared.codec.needed_base(&kv.key, &kv.value)?, site.revisions.clone())))
            .collect()
    })
    .await
}

/// Decodes every value of `msg` in place, in four steps: **recall** the delta frames decoded or
/// written lately (`crate::delta::Deltas::recall`: nothing loaded nor decompressed for them),
/// **load** the dictionaries and the bases (`needs(msg)`: key, base and the revisions the value
/// was read at) of the others from the caches or etcd, **learn** which base each key uses, and
/// **decode** within one `limits.max_response_bytes` budget; `pinned` are bases the caller
/// already holds. A value that cannot be decoded is passed on as stored ([`keep_stored`]).
/// etcd being unreachable while loading fails with etcd's status — except for a write etcd
/// already `applied`, whose values are then passed on as stored: a committed write is never
/// reported as failed.
pub(crate) async fn decode_in_place<T: KeyValues>(
    shared: &Shared,
    msg: &mut T,
    pinned: &[Arc<Base>],
    applied: bool,
    needs: impl FnOnce(&mut T) -> Vec<(Bytes, BaseRef, Vec<i64>)>,
) -> Result<(), Failure> {
    let recalled = shared.deltas.recall(msg);
    let needs = needs(msg);
    let loaded = async {
        shared.dictionaries.prefetch(msg).await?;
        shared.deltas.load_bases(needs).await
    };
    let mut bases = pinned.to_vec();
    match loaded.await {
        Ok(more) => bases.extend(more),
        Err(e) if applied => tracing::warn!(error = %e, "cannot load what a prev_kv needs: passed on as stored"),
        Err(e) => return Err(e),
    }
    shared.deltas.learn_from(msg);
    crate::rewrite::decode_with(&shared.codec, msg, &bases, recalled.bytes, &mut keep_stored(applied)).map_err(RequestError::Stored)?;
    recalled.restore(&shared.deltas, msg);
    Ok(())
}

fn view_kv(v: KeyValueView) -> KeyValue {
    KeyValue { key: v.key, create_revision: v.create_revision, mod_revision: v.mod_revision, version: v.version, value: v.value, lease: v.lease }
}

/// Decodes every `KeyValue.value` of a KV response (`shape`: Range, Put, DeleteRange, Txn or
/// RangeStream response) in its wire bytes. `read_revisions`: the revisions the values were read
/// at when older than the current one (a Range's `revision`, the revision before a write for its
/// prev_kvs). `applied`: the response of a write etcd applied, which never becomes an error.
/// Returns `bytes` itself when no value is a frame; else the message in pieces (the decoded
/// values are not copied until the encoder writes them out).
pub async fn decode_response(shared: &Shared, shape: Shape, bytes: Bytes, read_revisions: &[i64], applied: bool) -> Result<Spliced, Failure> {
    let mut framed = Framed(Vec::new());
    let mut sites = Vec::new();
    let mut ordinal = 0;
    wire::visit(&bytes, shape, &[Shape::KeyValue], &mut |_, leaf, _| {
        let view = KeyValueView::read(leaf)?;
        if is_candidate(shared, &view.key, &view.value) {
            let mut revisions = read_revisions.to_vec();
            revisions.push(view.mod_revision);
            sites.push(Site { slot: ordinal, revisions });
            framed.0.push(view_kv(view));
        }
        ordinal += 1;
        Ok::<_, Failure>(())
    })?;
    if framed.0.is_empty() {
        return Ok(Spliced::from(bytes));
    }
    decode_framed(shared, &mut framed, &sites, applied).await?;
    let mut ordinal = 0;
    let mut next = sites.iter().zip(framed.0.iter()).peekable();
    let out = wire::splice_chunks(&bytes, shape, &[Shape::KeyValue], &mut |_, leaf, _| {
        let this = ordinal;
        ordinal += 1;
        match next.peek() {
            Some((site, kv)) if site.slot == this => {
                let value = kv.value.clone();
                next.next();
                Ok::<_, WireError>(Some(wire::with_bytes_field_chunks(leaf, 5, &value)?))
            }
            _ => Ok(None),
        }
    })?;
    Ok(out.unwrap_or_else(|| Spliced::from(bytes)))
}

/// Decodes the events of a `WatchResponse` in its wire bytes: a PUT event's values were read at
/// the event's revision, a DELETE event's prev_kv just before it. Returns `bytes` itself when no
/// value is a frame (else the message in pieces, as [`decode_response`]).
pub async fn decode_watch_response(shared: &Shared, bytes: Bytes) -> Result<Spliced, Failure> {
    let mut framed = Framed(Vec::new());
    let mut sites = Vec::new();
    let mut event = 0;
    wire::visit(&bytes, Shape::WatchResponse, &[Shape::Event], &mut |_, ev, _| {
        // Event: type = 1 (DELETE = 1), kv = 2, prev_kv = 3.
        let deleted = wire::varint_field(ev, 1)? == 1;
        let kv = KeyValueView::read(&wire::bytes_field(ev, 2)?)?;
        let prev = KeyValueView::read(&wire::bytes_field(ev, 3)?)?;
        let at = if deleted { kv.mod_revision - 1 } else { kv.mod_revision };
        for (i, view) in [kv, prev].into_iter().enumerate() {
            if is_candidate(shared, &view.key, &view.value) {
                sites.push(Site { slot: 2 * event + i, revisions: vec![at, view.mod_revision] });
                framed.0.push(view_kv(view));
            }
        }
        event += 1;
        Ok::<_, Failure>(())
    })?;
    if framed.0.is_empty() {
        return Ok(Spliced::from(bytes));
    }
    decode_framed(shared, &mut framed, &sites, false).await?;
    let decoded: std::collections::HashMap<usize, Bytes> = sites.iter().map(|s| s.slot).zip(framed.0.into_iter().map(|kv| kv.value)).collect();
    let mut event = 0;
    let out = wire::splice_chunks(&bytes, Shape::WatchResponse, &[Shape::Event], &mut |_, ev, _| {
        let this = event;
        event += 1;
        if !decoded.contains_key(&(2 * this)) && !decoded.contains_key(&(2 * this + 1)) {
            return Ok::<_, WireError>(None);
        }
        wire::splice_chunks(ev, Shape::Event, &[Shape::KeyValue], &mut |_, leaf, path| {
            let slot = 2 * this + usize::from(path.last().is_some_and(|(_, field)| *field == 3));
            decoded.get(&slot).map(|value| wire::with_bytes_field_chunks(leaf, 5, value)).transpose()
        })
    })?;
    Ok(out.unwrap_or_else(|| Spliced::from(bytes)))
}

/// A watch response without the events of the proxy's own keys (`/etcd-squeeze/`, which do not
/// exist through the client API): `bytes` itself when it has none; `None` when every event was
/// one (etcd's response is then not passed on, as if those writes had not happened).
pub fn without_reserved_events(bytes: Bytes) -> Result<Option<Bytes>, Failure> {
    let mut any = false;
    wire::visit(&bytes, Shape::WatchResponse, &[Shape::Event], &mut |_, ev, _| {
        let kv = KeyValueView::read(&wire::bytes_field(ev, 2)?)?;
        any |= kv.key.starts_with(crate::classify::RESERVED_PREFIX);
        Ok::<_, WireError>(())
    })?;
    if !any {
        return Ok(Some(bytes));
    }
    use prost::Message;
    let mut response = crate::proto::etcdserverpb::WatchResponse::decode(bytes)
        .map_err(|e| RequestError::Internal(format!("etcd's watch response cannot be read: {e}")))?;
    response.events.retain(|e| !e.kv.as_ref().is_some_and(|kv| kv.key.starts_with(crate::classify::RESERVED_PREFIX)));
    if response.events.is_empty() {
        return Ok(None);
    }
    Ok(Some(Bytes::from(response.encode_to_vec())))
}

/// Encodes one `PutRequest` (its wire bytes) for the rewrite road: samples it for dictionary
/// training, frames its value when its key is under a prefix, and returns the new bytes (`None`
/// when the value is stored as it is), in pieces: the stored value is not copied until the gRPC
/// encoder writes the request out. Mirrors etcd's `Put`: `ignore_value` Puts carry no value.
pub fn encode_put(shared: &Shared, put: &Bytes, stats: &mut EncodeStats) -> Result<Option<Spliced>, Status> {
    // One pass over the fields: key = 1, value = 2, ignore_value = 5 (last occurrence wins).
    let (mut key, mut value, mut ignore_value) = (Bytes::new(), Bytes::new(), false);
    for f in wire::fields(put) {
        match f? {
            wire::Field { number: 1, value: wire::Value::Bytes(r), .. } => key = put.slice(r),
            wire::Field { number: 2, value: wire::Value::Bytes(r), .. } => value = put.slice(r),
            wire::Field { number: 5, value: wire::Value::Varint(v), .. } => ignore_value = v != 0,
            _ => {}
        }
    }
    let Some(rule) = shared.codec.rule_for(&key).filter(|_| !ignore_value) else { return Ok(None) };
    shared.dictionaries.observe(&PutRequest { key: key.clone(), value: value.clone(), ..Default::default() });
    let (stored, outcome) = shared.codec.encode(&key, &value).map_err(encode_status)?;
    stats.add(Some(&rule.prefix), value.len(), stored.len(), outcome);
    if stored.as_ptr() == value.as_ptr() && stored.len() == value.len() {
        return Ok(None);
    }
    Ok(Some(wire::with_bytes_field_chunks(put, 2, &stored)?))
}

/// Encodes every Put of a `TxnRequest` (both branches, nested Txns) in its wire bytes, and
/// collects the `revision` of every Range in it (where values it reads may need an older base).
pub fn encode_txn(shared: &Shared, txn: &Bytes, stats: &mut EncodeStats, read_revisions: &mut Vec<i64>) -> Result<Spliced, Status> {
    let out = wire::splice_chunks(txn, Shape::TxnRequest, &[Shape::PutRequest, Shape::RangeRequest], &mut |shape, leaf, _| {
        if shape == Shape::RangeRequest {
            let revision = wire::varint_field(leaf, 4)?;
            if revision > 0 && !read_revisions.contains(&revision) {
                read_revisions.push(revision);
            }
            return Ok(None);
        }
        encode_put(shared, leaf, stats)
    });
    Ok(out?.unwrap_or_else(|| Spliced::from(txn.clone())))
}

/// A request the proxy cannot read: grpc-go's status for a request it cannot unmarshal.
impl From<WireError> for Status {
    fn from(e: WireError) -> Self {
        Status::internal(format!("grpc: error unmarshalling request: {e}"))
    }
}

/// True when a Txn response's executed branch wrote (a Put or DeleteRange response at any depth):
/// then a value that cannot be decoded is reported with the revision the write was applied at.
pub fn txn_wrote(resp: &Bytes) -> bool {
    let mut wrote = false;
    let _ = wire::visit(resp, Shape::TxnResponse, &[Shape::PutResponse, Shape::DeleteRangeResponse], &mut |_, _, _| {
        wrote = true;
        Ok::<_, WireError>(())
    });
    wrote
}
