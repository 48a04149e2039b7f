//! Value rewriting on etcd messages: compress values on the way up, decompress on the way down.
//!
//! Pure functions over decoded prost messages and a [`ValueCodec`]; no I/O, no gRPC. The
//! request path in `src/server/` calls them between the client and the upstream etcd.
//! Everything that is not a value (keys, revisions, headers, flags) is left exactly as it is.

use std::sync::Arc;

use bytes::Bytes;

use crate::codec::delta::Base;
use crate::codec::{DecodeError, EncodeError, EncodeOutcome, ValueCodec};
use crate::proto::etcdserverpb::{
    compare, request_op, response_op, Compare, DeleteRangeResponse, PutRequest, PutResponse, RangeResponse,
    RangeStreamResponse, TxnRequest, TxnResponse, WatchResponse,
};
use crate::proto::mvccpb::KeyValue;

/// Byte counts of one rewritten request, for logs and metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EncodeStats {
    /// Values under a configured prefix.
    pub values: u64,
    /// Their size before encoding, in bytes.
    pub bytes_in: u64,
    /// Their size as stored, in bytes.
    pub bytes_out: u64,
    /// Values stored in a raw frame.
    pub raw_frames: u64,
    /// `k8s:enc:` values and values under `compress = false` prefixes, stored as they are.
    pub stored_as_is: u64,
    /// The same counts per configured prefix (the metrics' `prefix` label), in first-seen order.
    pub by_prefix: Vec<PrefixStats>,
}

/// [`EncodeStats`] of the values under one configured prefix.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PrefixStats {
    /// The configured prefix (the rule that matched, not the key).
    pub prefix: Bytes,
    /// Values compressed with zstd.
    pub compressed: u64,
    /// Values stored in a raw frame.
    pub raw_frames: u64,
    /// Values stored as they are.
    pub stored_as_is: u64,
    /// Their size before encoding, in bytes.
    pub bytes_in: u64,
    /// Their size as stored, in bytes.
    pub bytes_out: u64,
}

impl EncodeStats {
    pub(crate) fn add(&mut self, prefix: Option<&Bytes>, before: usize, after: usize, outcome: EncodeOutcome) {
        let Some(prefix) = prefix.filter(|_| outcome != EncodeOutcome::Untouched) else {
            return;
        };
        let (before, after) = (before as u64, after as u64);
        self.values += 1;
        self.bytes_in += before;
        self.bytes_out += after;
        let i = match self.by_prefix.iter().position(|p| p.prefix == prefix) {
            Some(i) => i,
            None => {
                self.by_prefix.push(PrefixStats { prefix: prefix.clone(), ..Default::default() });
                self.by_prefix.len() - 1
            }
        };
        let p = &mut self.by_prefix[i];
        p.bytes_in += before;
        p.bytes_out += after;
        match outcome {
            EncodeOutcome::RawFrame => {
                self.raw_frames += 1;
                p.raw_frames += 1;
            }
            EncodeOutcome::StoredAsIs => {
                self.stored_as_is += 1;
                p.stored_as_is += 1;
            }
            _ => p.compressed += 1,
        }
    }
}

/// Encodes `PutRequest.value` (mirrors etcd's `Put`). `ignore_value` Puts carry no value and
/// pass untouched.
pub fn encode_put(codec: &ValueCodec, put: &mut PutRequest, stats: &mut EncodeStats) -> Result<(), EncodeError> {
    if put.ignore_value {
        return Ok(());
    }
    let (stored, outcome) = codec.encode(&put.key, &put.value)?;
    stats.add(codec.rule_for(&put.key).map(|r| &r.prefix), put.value.len(), stored.len(), outcome);
    put.value = stored;
    Ok(())
}

/// Encodes every Put in both branches of a Txn, recursing into nested Txns.
pub fn encode_txn(codec: &ValueCodec, txn: &mut TxnRequest, stats: &mut EncodeStats) -> Result<(), EncodeError> {
    for op in txn.success.iter_mut().chain(txn.failure.iter_mut()) {
        match &mut op.request {
            Some(request_op::Request::RequestPut(put)) => encode_put(codec, put, stats)?,
            Some(request_op::Request::RequestTxn(inner)) => encode_txn(codec, inner, stats)?,
            _ => {}
        }
    }
    Ok(())
}

/// Visits every Put of a Txn, both branches, recursing into nested Txns (e.g. to sample values).
pub fn for_each_put(txn: &TxnRequest, f: &mut impl FnMut(&PutRequest)) {
    for op in txn.success.iter().chain(txn.failure.iter()) {
        match &op.request {
            Some(request_op::Request::RequestPut(put)) => f(put),
            Some(request_op::Request::RequestTxn(inner)) => for_each_put(inner, f),
            _ => {}
        }
    }
}

/// A response message that carries stored values: every `mvccpb.KeyValue` in it, visited in order.
pub trait KeyValues {
    /// Applies `f` to each `KeyValue` of the message, stopping at the first error.
    fn try_for_each_kv<E>(&mut self, f: &mut impl FnMut(&mut KeyValue) -> Result<(), E>) -> Result<(), E>;
}

/// `RangeResponse.kvs` (empty for `count_only`/`keys_only`).
impl KeyValues for RangeResponse {
    fn try_for_each_kv<E>(&mut self, f: &mut impl FnMut(&mut KeyValue) -> Result<(), E>) -> Result<(), E> {
        self.kvs.iter_mut().try_for_each(f)
    }
}

/// `PutResponse.prev_kv`.
impl KeyValues for PutResponse {
    fn try_for_each_kv<E>(&mut self, f: &mut impl FnMut(&mut KeyValue) -> Result<(), E>) -> Result<(), E> {
        self.prev_kv.iter_mut().try_for_each(f)
    }
}

/// `DeleteRangeResponse.prev_kvs`.
impl KeyValues for DeleteRangeResponse {
    fn try_for_each_kv<E>(&mut self, f: &mut impl FnMut(&mut KeyValue) -> Result<(), E>) -> Result<(), E> {
        self.prev_kvs.iter_mut().try_for_each(f)
    }
}

/// Every value in a Txn response: Range results, Put and DeleteRange `prev_kv`s, recursing into
/// nested Txn responses.
impl KeyValues for TxnResponse {
    fn try_for_each_kv<E>(&mut self, f: &mut impl FnMut(&mut KeyValue) -> Result<(), E>) -> Result<(), E> {
        for op in self.responses.iter_mut() {
            match &mut op.response {
                Some(response_op::Response::ResponseRange(r)) => r.try_for_each_kv(f)?,
                Some(response_op::Response::ResponsePut(r)) => r.try_for_each_kv(f)?,
                Some(response_op::Response::ResponseDeleteRange(r)) => r.try_for_each_kv(f)?,
                Some(response_op::Response::ResponseTxn(r)) => r.try_for_each_kv(f)?,
                None => {}
            }
        }
        Ok(())
    }
}

/// `events[].kv` and `events[].prev_kv`. A `fragment`ed response carries whole events, so each
/// fragment is decoded on its own; the flag passes through.
impl KeyValues for WatchResponse {
    fn try_for_each_kv<E>(&mut self, f: &mut impl FnMut(&mut KeyValue) -> Result<(), E>) -> Result<(), E> {
        for ev in self.events.iter_mut() {
            ev.kv.iter_mut().chain(ev.prev_kv.iter_mut()).try_for_each(&mut *f)?;
        }
        Ok(())
    }
}

/// One chunk of etcd ≥ 3.7's streamed Range.
impl KeyValues for RangeStreamResponse {
    fn try_for_each_kv<E>(&mut self, f: &mut impl FnMut(&mut KeyValue) -> Result<(), E>) -> Result<(), E> {
        self.range_response.iter_mut().try_for_each(|r| r.try_for_each_kv(f))
    }
}

/// Decodes one `mvccpb.KeyValue.value` in place, charging `budget` (decompressed bytes left
/// for the whole response, see [`ValueCodec::decode_within`]).
pub fn decode_kv(codec: &ValueCodec, kv: &mut KeyValue, budget: &mut u64) -> Result<(), DecodeError> {
    decode_kv_with(codec, kv, budget, &[])
}

/// [`decode_kv`], with the bases loaded for this response (delta frames).
pub fn decode_kv_with(codec: &ValueCodec, kv: &mut KeyValue, budget: &mut u64, pinned: &[Arc<Base>]) -> Result<(), DecodeError> {
    if !kv.value.is_empty() {
        kv.value = codec.decode_with_bases(&kv.key, &kv.value, budget, pinned)?;
    }
    Ok(())
}

/// Decodes every value of a response in place, within one budget of `limits.max_response_bytes`
/// decompressed bytes for the whole message (a fragment of a watch response is a message of
/// its own). Strict: the first value that cannot be decoded fails the whole message, and the
/// caller drops it (see [`decode_with`] for the proxy's policy).
pub fn decode<T: KeyValues>(codec: &ValueCodec, msg: &mut T) -> Result<(), DecodeError> {
    decode_with(codec, msg, &[], 0, &mut Err)
}

/// [`decode`], where delta frames find their base in `pinned` (loaded for this message by
/// `crate::delta::Deltas::prefetch`) or in the base cache, `spent` of the budget is taken already
/// (values recalled by `crate::delta::Deltas::recall`), and a value that cannot be decoded is
/// handed to `undecodable`: `Ok(())` keeps the stored bytes as the value (etcd's answer, had the
/// proxy not been there) and goes on; `Err` fails the whole message.
pub fn decode_with<T: KeyValues>(
    codec: &ValueCodec,
    msg: &mut T,
    pinned: &[Arc<Base>],
    spent: u64,
    undecodable: &mut dyn FnMut(DecodeError) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    let mut budget = codec.max_response_bytes().saturating_sub(spent);
    msg.try_for_each_kv(&mut |kv| match decode_kv_with(codec, kv, &mut budget, pinned) {
        Ok(()) => Ok(()),
        Err(e) => undecodable(e),
    })
}

/// The dictionary IDs that decoding `msg` needs, in order of first use, each with how many of
/// its values need it.
pub fn needed_dictionaries<T: KeyValues>(codec: &ValueCodec, msg: &mut T) -> Vec<(u32, u64)> {
    let mut ids: Vec<(u32, u64)> = Vec::new();
    let _ = msg.try_for_each_kv(&mut |kv| {
        if let Some(id) = codec.needed_dictionary(&kv.key, &kv.value) {
            match ids.iter_mut().find(|(i, _)| *i == id) {
                Some((_, frames)) => *frames += 1,
                None => ids.push((id, 1)),
            }
        }
        Ok::<(), ()>(())
    });
    ids
}

/// True when the Txn (or a nested one) has a `Compare` on VALUE whose key range touches a
/// compressed prefix: etcd would compare stored frames, not the logical value, so the proxy
/// must evaluate it itself (see `server::kv`).
pub fn has_value_compare(codec: &ValueCodec, txn: &TxnRequest) -> bool {
    txn.compare.iter().any(|c| is_value_compare_on_prefix(codec, c))
        || nested(txn).any(|inner| has_value_compare(codec, inner))
}

/// Is this compare a VALUE compare over a compressed prefix?
pub fn is_value_compare_on_prefix(codec: &ValueCodec, c: &Compare) -> bool {
    c.target == compare::CompareTarget::Value as i32 && codec.range_touches_prefix(&c.key, &c.range_end)
}

fn nested(txn: &TxnRequest) -> impl Iterator<Item = &TxnRequest> {
    txn.success.iter().chain(txn.failure.iter()).filter_map(|op| match &op.request {
        Some(request_op::Request::RequestTxn(inner)) => Some(inner),
        _ => None,
    })
}

/// Every VALUE compare on a compressed prefix in the Txn tree, in a fixed (depth-first) order.
pub fn value_compares(codec: &ValueCodec, txn: &TxnRequest) -> Vec<Compare> {
    let mut out = Vec::new();
    collect(codec, txn, &mut out);
    fn collect(codec: &ValueCodec, txn: &TxnRequest, out: &mut Vec<Compare>) {
        out.extend(txn.compare.iter().filter(|c| is_value_compare_on_prefix(codec, c)).cloned());
        for op in txn.success.iter().chain(txn.failure.iter()) {
            if let Some(request_op::Request::RequestTxn(inner)) = &op.request {
                collect(codec, inner, out);
            }
        }
    }
    out
}

/// Replaces the VALUE compares found by [`value_compares`] (same order) with the given
/// replacements (compares whose outcome the proxy has fixed). Returns how many compares were
/// left without a replacement (0 when `replacements` came from [`value_compares`] of this Txn).
pub fn replace_value_compares(codec: &ValueCodec, txn: &mut TxnRequest, replacements: &mut impl Iterator<Item = Compare>) -> usize {
    let mut missing = 0;
    for c in txn.compare.iter_mut() {
        if is_value_compare_on_prefix(codec, c) {
            match replacements.next() {
                Some(r) => *c = r,
                None => missing += 1,
            }
        }
    }
    for op in txn.success.iter_mut().chain(txn.failure.iter_mut()) {
        if let Some(request_op::Request::RequestTxn(inner)) = &mut op.request {
            missing += replace_value_compares(codec, inner, replacements);
        }
    }
    missing
}

/// etcd's `compareKV` for target VALUE, applied to the logical values of the keys found in
/// the compare's range (etcd's `applyCompare`: no key → false; else every key must match).
pub fn evaluate_value_compare(c: &Compare, logical_values: &[Bytes]) -> bool {
    let Some(compare::TargetUnion::Value(want)) = &c.target_union else {
        // A VALUE compare without a value compares against the empty value.
        return evaluate_value_compare(&Compare { target_union: Some(compare::TargetUnion::Value(Bytes::new())), ..c.clone() }, logical_values);
    };
    if logical_values.is_empty() {
        return false;
    }
    logical_values.iter().all(|v| {
        let ord = v[..].cmp(&want[..]);
        match compare::CompareResult::try_from(c.result) {
            Ok(compare::CompareResult::Equal) => ord.is_eq(),
            Ok(compare::CompareResult::Greater) => ord.is_gt(),
            Ok(compare::CompareResult::Less) => ord.is_lt(),
            Ok(compare::CompareResult::NotEqual) => ord.is_ne(),
            Err(_) => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::PrefixRule;
    use crate::proto::etcdserverpb::{RequestOp, ResponseOp};
    use crate::proto::mvccpb::Event;

    fn codec() -> ValueCodec {
        ValueCodec::new(vec![PrefixRule { prefix: Bytes::from_static(b"/p/"), compress: true, level: 3, min_size: 0, delta: None }], 1 << 24)
    }

    fn big() -> Bytes {
        Bytes::from("{\"status\":\"running\"}".repeat(100))
    }

    fn put(key: &'static [u8], value: Bytes) -> PutRequest {
        PutRequest { key: Bytes::from_static(key), value, ..Default::default() }
    }

    #[test]
    fn txn_round_trip_through_nested_branches() {
        let c = codec();
        let mut txn = TxnRequest {
            success: vec![
                RequestOp { request: Some(request_op::Request::RequestPut(put(b"/p/a", big()))) },
                RequestOp { request: Some(request_op::Request::RequestPut(put(b"/q/a", big()))) },
            ],
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestTxn(TxnRequest {
                    success: vec![RequestOp { request: Some(request_op::Request::RequestPut(put(b"/p/b", big()))) }],
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        let mut stats = EncodeStats::default();
        encode_txn(&c, &mut txn, &mut stats).unwrap();
        assert_eq!(stats.values, 2);
        assert!(stats.bytes_out * 10 < stats.bytes_in);
        assert_eq!(stats.by_prefix.len(), 1, "both values are under /p/");
        assert_eq!((stats.by_prefix[0].compressed, stats.by_prefix[0].bytes_in), (2, stats.bytes_in));
        let Some(request_op::Request::RequestPut(p)) = &txn.success[1].request else { panic!() };
        assert_eq!(p.value, big(), "keys outside the prefix are untouched");

        // Feed the stored values back as responses.
        let stored = |op: &RequestOp| match &op.request {
            Some(request_op::Request::RequestPut(p)) => KeyValue { key: p.key.clone(), value: p.value.clone(), ..Default::default() },
            _ => unreachable!(),
        };
        let kv = stored(&txn.success[0]);
        let mut resp = TxnResponse {
            responses: vec![
                ResponseOp { response: Some(response_op::Response::ResponseRange(RangeResponse { kvs: vec![kv.clone()], ..Default::default() })) },
                ResponseOp {
                    response: Some(response_op::Response::ResponseTxn(TxnResponse {
                        responses: vec![ResponseOp {
                            response: Some(response_op::Response::ResponseDeleteRange(DeleteRangeResponse { prev_kvs: vec![kv.clone()], ..Default::default() })),
                        }],
                        ..Default::default()
                    })),
                },
            ],
            ..Default::default()
        };
        decode(&c, &mut resp).unwrap();
        let mut w = WatchResponse { events: vec![Event { kv: Some(kv.clone()), prev_kv: Some(kv), ..Default::default() }], ..Default::default() };
        decode(&c, &mut w).unwrap();
        assert_eq!(w.events[0].kv.as_ref().unwrap().value, big());
        assert_eq!(w.events[0].prev_kv.as_ref().unwrap().value, big());
    }

    #[test]
    fn ignore_value_put_is_untouched() {
        let mut p = PutRequest { key: Bytes::from_static(b"/p/a"), ignore_value: true, ..Default::default() };
        encode_put(&codec(), &mut p, &mut EncodeStats::default()).unwrap();
        assert!(p.value.is_empty());
    }

    #[test]
    fn value_compare_semantics() {
        use compare::CompareResult::*;
        let mk = |r: compare::CompareResult, v: &'static [u8]| Compare {
            result: r as i32,
            target: compare::CompareTarget::Value as i32,
            key: Bytes::from_static(b"/p/a"),
            target_union: Some(compare::TargetUnion::Value(Bytes::from_static(v))),
            ..Default::default()
        };
        let vals = [Bytes::from_static(b"b")];
        assert!(evaluate_value_compare(&mk(Equal, b"b"), &vals));
        assert!(!evaluate_value_compare(&mk(Equal, b"a"), &vals));
        assert!(evaluate_value_compare(&mk(Greater, b"a"), &vals));
        assert!(evaluate_value_compare(&mk(Less, b"c"), &vals));
        assert!(evaluate_value_compare(&mk(NotEqual, b"c"), &vals));
        assert!(!evaluate_value_compare(&mk(NotEqual, b"c"), &[]), "missing key: always false, as etcd");
        let txn = TxnRequest { compare: vec![mk(Equal, b"b"), Compare { key: Bytes::from_static(b"/q"), ..mk(Equal, b"b") }], ..Default::default() };
        assert_eq!(value_compares(&codec(), &txn).len(), 1);
    }
}
