//! Fuzz targets as plain functions over arbitrary bytes, shared by the libFuzzer targets in
//! `fuzz/` (`cargo fuzz`, nightly) and by this module's seeded property tests (stable, in the
//! normal suite). Each target asserts: no panic, nothing decoded beyond the configured limits,
//! and decode(encode(x)) == x.

use bytes::Bytes;
use prost::Message;

use crate::codec::{PrefixRule, ValueCodec};
use crate::proto::etcdserverpb::{request_op, PutRequest, RangeResponse, TxnRequest, WatchResponse};
use crate::proto::mvccpb::KeyValue;
use crate::rewrite;

/// `limits.max_value_bytes` of the fuzzed codec: small, so that bombs are cheap to build.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// `limits.max_response_bytes` of the fuzzed codec.
pub const MAX_RESPONSE_BYTES: u64 = 4 << 20;

/// The codec under test: keys under `/p/` compressed (zstd 1, `min_size` 16), keys under `/r/`
/// stored as they are (`compress = false`), other keys untouched.
pub fn codec() -> ValueCodec {
    let rule = |prefix: &'static [u8], compress| PrefixRule { prefix: Bytes::from_static(prefix), compress, level: 1, min_size: 16, delta: None };
    ValueCodec::new(vec![rule(b"/p/", true), rule(b"/r/", false)], MAX_VALUE_BYTES).with_max_response_bytes(MAX_RESPONSE_BYTES)
}

/// The frame decoder on arbitrary stored bytes: an error or at most [`MAX_VALUE_BYTES`]; and
/// the same bytes written as a value read back unchanged.
pub fn frame_decoder(data: &[u8]) {
    let codec = codec();
    let value = Bytes::copy_from_slice(data);
    if let Ok(decoded) = codec.decode(b"/p/k", &value) {
        assert!(decoded.len() <= MAX_VALUE_BYTES.max(data.len()), "decoded {} bytes", decoded.len());
    }
    if let Ok(Some(decoded)) = crate::codec::decode_frame(data, MAX_VALUE_BYTES, &crate::codec::Empty, None) {
        assert!(decoded.len() <= MAX_VALUE_BYTES);
    }
    // The same bytes as a delta frame's payload against a fixed base, and as a base record.
    let base = fuzz_base();
    let mut framed = Vec::new();
    crate::codec::frame::write_header(&mut framed, crate::codec::frame::Codec::Delta, 0);
    framed.extend_from_slice(&base.id.to_le_bytes());
    framed.extend_from_slice(&base.checksum.to_le_bytes());
    framed.extend_from_slice(data);
    let dictionaries = crate::codec::Empty;
    if let Ok(Some(decoded)) = crate::codec::decode_frame(&framed, MAX_VALUE_BYTES, &dictionaries, Some(&base)) {
        assert!(decoded.len() <= MAX_VALUE_BYTES);
    }
    let key = crate::codec::delta::base_key(&base.key, base.id);
    if let Ok(decoded) = crate::codec::decode_base(&key, data, MAX_VALUE_BYTES, &dictionaries) {
        assert!(decoded.content.len() <= MAX_VALUE_BYTES && decoded.key == base.key);
    }
    round_trip_value(&codec, b"/p/k", &value);
}

/// The base delta frames are fuzzed against: a small JSON document of key `/p/k`.
fn fuzz_base() -> crate::codec::delta::Base {
    let content = br#"{"status":{"phase":1,"nodes":{"n0":{"phase":5},"n1":{"phase":3}}}}"#;
    let frame = codec().encode(b"/p/k", &Bytes::from_static(content)).expect("a small base encodes").0;
    crate::codec::delta::encode_base(b"/p/k", 7, content, &frame).1
}

/// decode(encode(value)) == value for `key`, unless the value is over the limit.
fn round_trip_value(codec: &ValueCodec, key: &[u8], value: &Bytes) {
    match codec.encode(key, value) {
        Ok((stored, _)) => assert_eq!(codec.decode(key, &stored).expect("what we write decodes"), value),
        Err(_) => assert!(value.len() > MAX_VALUE_BYTES, "encode refused a {}-byte value", value.len()),
    }
}

/// Every Put of a Txn, depth first, nested Txns included.
fn puts(txn: &TxnRequest, out: &mut Vec<PutRequest>) {
    for op in txn.success.iter().chain(&txn.failure) {
        match &op.request {
            Some(request_op::Request::RequestPut(p)) => out.push(p.clone()),
            Some(request_op::Request::RequestTxn(t)) => puts(t, out),
            _ => {}
        }
    }
}

/// The request rewriter on arbitrary `PutRequest` and `TxnRequest` bytes: no panic, and every
/// rewritten value decodes back to the original; keys and every other field unchanged.
pub fn request_rewriter(data: &[u8]) {
    let codec = codec();
    let check = |before: &PutRequest, after: &PutRequest| {
        assert_eq!((&before.key, before.lease, before.prev_kv, before.ignore_value), (&after.key, after.lease, after.prev_kv, after.ignore_value));
        assert_eq!(codec.decode(&after.key, &after.value).expect("a rewritten value decodes"), before.value);
    };
    if let Ok(mut put) = PutRequest::decode(data) {
        let before = put.clone();
        if rewrite::encode_put(&codec, &mut put, &mut Default::default()).is_ok() {
            check(&before, &put);
        }
    }
    if let Ok(mut txn) = TxnRequest::decode(data) {
        let before = txn.clone();
        if rewrite::encode_txn(&codec, &mut txn, &mut Default::default()).is_ok() {
            assert_eq!(txn.compare, before.compare);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            puts(&before, &mut a);
            puts(&txn, &mut b);
            assert_eq!(a.len(), b.len());
            a.iter().zip(&b).for_each(|(x, y)| check(x, y));
        }
    }
}

/// The response rewriter on arbitrary `RangeResponse` and `WatchResponse` bytes: no panic,
/// decoded values within the limits; and a response built from the decoded values, encoded as
/// the proxy stores them, decodes back to the same response.
pub fn response_rewriter(data: &[u8]) {
    let codec = codec();
    let bounded = |kvs: &[&KeyValue]| {
        let total: usize = kvs.iter().map(|kv| kv.value.len()).sum();
        assert!(total as u64 <= MAX_RESPONSE_BYTES + data.len() as u64, "decoded {total} bytes");
    };
    let store = |kv: &mut KeyValue| match codec.encode(&kv.key, &kv.value) {
        Ok((stored, _)) => kv.value = stored,
        Err(_) => kv.value = Bytes::new(),
    };
    if let Ok(mut resp) = RangeResponse::decode(data) {
        if rewrite::decode(&codec, &mut resp).is_ok() {
            bounded(&resp.kvs.iter().collect::<Vec<_>>());
            resp.kvs.iter_mut().for_each(&store);
            let mut logical = resp.clone();
            logical.kvs.iter_mut().for_each(|kv| kv.value = codec.decode(&kv.key, &kv.value).unwrap());
            let mut again = resp;
            if rewrite::decode(&codec, &mut again).is_ok() {
                assert_eq!(again, logical);
            }
        }
    }
    if let Ok(mut resp) = WatchResponse::decode(data) {
        if rewrite::decode(&codec, &mut resp).is_ok() {
            bounded(&resp.events.iter().flat_map(|e| e.kv.iter().chain(&e.prev_kv)).collect::<Vec<_>>());
            for e in resp.events.iter_mut() {
                e.kv.iter_mut().chain(e.prev_kv.iter_mut()).for_each(&store);
            }
            let mut logical = resp.clone();
            for e in logical.events.iter_mut() {
                e.kv.iter_mut().chain(e.prev_kv.iter_mut()).for_each(|kv| kv.value = codec.decode(&kv.key, &kv.value).unwrap());
            }
            let mut again = resp;
            if rewrite::decode(&codec, &mut again).is_ok() {
                assert_eq!(again, logical);
            }
        }
    }
}

/// The wire splicer ([`crate::wire`]) against prost's round trip, on arbitrary `RangeResponse`,
/// `TxnResponse` and `WatchResponse` bytes: whenever prost decodes the bytes, the splicer reads
/// them too, and replacing every value in the wire bytes gives the message prost would encode
/// with the same values replaced (same logical message; every other field kept). A splice that
/// replaces nothing returns nothing (the caller keeps the very same bytes).
pub fn wire_splice(data: &[u8]) {
    use crate::proto::etcdserverpb::{response_op, TxnResponse};
    use crate::wire::{self, KeyValueView, Shape, WireError};
    fn mark(v: &Bytes) -> Bytes {
        let mut out = v.to_vec();
        out.push(b'!');
        out.into()
    }
    fn mark_txn(t: &mut TxnResponse) {
        for op in t.responses.iter_mut() {
            match &mut op.response {
                Some(response_op::Response::ResponseRange(r)) => r.kvs.iter_mut().for_each(|kv| kv.value = mark(&kv.value)),
                Some(response_op::Response::ResponsePut(p)) => p.prev_kv.iter_mut().for_each(|kv| kv.value = mark(&kv.value)),
                Some(response_op::Response::ResponseDeleteRange(d)) => d.prev_kvs.iter_mut().for_each(|kv| kv.value = mark(&kv.value)),
                Some(response_op::Response::ResponseTxn(inner)) => mark_txn(inner),
                None => {}
            }
        }
    }
    let bytes = Bytes::copy_from_slice(data);
    let splice = |shape| {
        wire::splice(&bytes, shape, &[Shape::KeyValue], &mut |_, leaf, _| {
            let v = KeyValueView::read(leaf)?;
            wire::with_bytes_field(leaf, 5, &mark(&v.value)).map(Some)
        })
    };
    let untouched = |shape| wire::splice(&bytes, shape, &[Shape::KeyValue], &mut |_, _, _| Ok::<_, WireError>(None));
    if let Ok(mut want) = RangeResponse::decode(data) {
        let out = splice(Shape::RangeResponse).expect("prost reads it, so does the splicer").unwrap_or_else(|| bytes.clone());
        want.kvs.iter_mut().for_each(|kv| kv.value = mark(&kv.value));
        assert_eq!(RangeResponse::decode(&out[..]).expect("spliced bytes decode"), want);
        assert!(untouched(Shape::RangeResponse).unwrap().is_none());
    }
    if let Ok(mut want) = TxnResponse::decode(data) {
        let out = splice(Shape::TxnResponse).expect("prost reads it, so does the splicer").unwrap_or_else(|| bytes.clone());
        mark_txn(&mut want);
        assert_eq!(TxnResponse::decode(&out[..]).expect("spliced bytes decode"), want);
        assert!(untouched(Shape::TxnResponse).unwrap().is_none());
    }
    if let Ok(mut want) = WatchResponse::decode(data) {
        let out = splice(Shape::WatchResponse).expect("prost reads it, so does the splicer").unwrap_or_else(|| bytes.clone());
        for e in want.events.iter_mut() {
            e.kv.iter_mut().chain(e.prev_kv.iter_mut()).for_each(|kv| kv.value = mark(&kv.value));
        }
        assert_eq!(WatchResponse::decode(&out[..]).expect("spliced bytes decode"), want);
        assert!(untouched(Shape::WatchResponse).unwrap().is_none());
    }
}

#[cfg(test)]
mod tests {
    //! Seeded property tests: the fuzz targets on a few thousand generated inputs, half of
    //! them valid messages with stored frames then mutated (bytes flipped, cut, spliced).

    use rand::{Rng, RngCore, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::proto::etcdserverpb::RequestOp;
    use crate::proto::mvccpb::Event;

    const CASES: usize = 3000;

    fn value(rng: &mut ChaCha8Rng) -> Bytes {
        match rng.random_range(0..4) {
            0 => Bytes::new(),
            1 => {
                let mut v = vec![0u8; rng.random_range(0..300)];
                rng.fill_bytes(&mut v);
                v.into()
            }
            2 => {
                let mut v = crate::codec::frame::MAGIC.to_vec();
                v.extend((0..rng.random_range(0..40)).map(|_| rng.random::<u8>()));
                v.into()
            }
            _ => format!("{{\"spec\":\"{}\"}}", "node ".repeat(rng.random_range(0..400))).into(),
        }
    }

    fn key(rng: &mut ChaCha8Rng) -> Bytes {
        Bytes::from(format!("{}{}", ["/p/", "/r/", "/x/", ""][rng.random_range(0..4)], rng.random_range(0..10)))
    }

    fn kv(rng: &mut ChaCha8Rng) -> KeyValue {
        let codec = codec();
        let key = key(rng);
        let logical = value(rng);
        let stored = codec.encode(&key, &logical).map(|(s, _)| s).unwrap_or_default();
        KeyValue { key, value: stored, mod_revision: rng.random_range(1..100), ..Default::default() }
    }

    fn txn(rng: &mut ChaCha8Rng, depth: usize) -> TxnRequest {
        let op = |rng: &mut ChaCha8Rng| RequestOp {
            request: Some(if depth < 2 && rng.random_bool(0.2) {
                request_op::Request::RequestTxn(txn(rng, depth + 1))
            } else {
                request_op::Request::RequestPut(PutRequest { key: key(rng), value: value(rng), ..Default::default() })
            }),
        };
        let n = rng.random_range(0..4);
        TxnRequest { success: (0..n).map(|_| op(rng)).collect(), failure: (0..n).map(|_| op(rng)).collect(), ..Default::default() }
    }

    /// Flips, cuts or splices random bytes of `bytes` (or not).
    fn mutate(rng: &mut ChaCha8Rng, mut bytes: Vec<u8>) -> Vec<u8> {
        for _ in 0..rng.random_range(0..3) {
            if bytes.is_empty() {
                break;
            }
            let i = rng.random_range(0..bytes.len());
            match rng.random_range(0..3) {
                0 => bytes[i] ^= 1 << rng.random_range(0..8),
                1 => bytes.truncate(i),
                _ => bytes.insert(i, rng.random()),
            }
        }
        bytes
    }

    fn run(seed: u64, target: fn(&[u8]), valid: impl Fn(&mut ChaCha8Rng) -> Vec<u8>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for _ in 0..CASES {
            let input = if rng.random_bool(0.5) {
                let v = valid(&mut rng);
                mutate(&mut rng, v)
            } else {
                let mut v = vec![0u8; rng.random_range(0..256)];
                rng.fill_bytes(&mut v);
                v
            };
            target(&input);
        }
    }

    #[test]
    fn frame_decoder_properties() {
        run(1, frame_decoder, |rng| {
            let codec = codec();
            codec.encode(b"/p/k", &value(rng)).map(|(s, _)| s.to_vec()).unwrap_or_default()
        });
        // A bomb: 8 MiB of zeros declared in a small zstd frame.
        let mut bomb = crate::codec::frame::MAGIC.to_vec();
        bomb.extend_from_slice(&[1, 1, 0, 0, 0, 0]);
        bomb.extend(zstd::bulk::compress(&vec![0u8; 8 << 20], 1).unwrap());
        frame_decoder(&bomb);
    }

    #[test]
    fn mutated_delta_frames_are_errors_or_the_original() {
        let base = fuzz_base();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let dictionaries = crate::codec::Empty;
        for _ in 0..CASES {
            let original = value(&mut rng);
            let Ok(delta) = crate::codec::delta::encode_delta(&original, &base) else { continue };
            let mutated = mutate(&mut rng, delta.to_vec());
            match crate::codec::decode_frame(&mutated, MAX_VALUE_BYTES, &dictionaries, Some(&base)) {
                Ok(Some(decoded)) => assert_eq!(decoded, original, "a mutated delta frame decoded to other bytes"),
                Ok(None) => assert!(crate::codec::frame::parse(&mutated).is_ok_and(|f| f.codec == crate::codec::frame::Codec::Raw)),
                Err(_) => {}
            }
            // The payload (its own payload's prefix here) as a base record: refused or exact.
            frame_decoder(&mutated);
        }
    }

    #[test]
    fn request_rewriter_properties() {
        run(2, request_rewriter, |rng| {
            if rng.random_bool(0.5) {
                PutRequest { key: key(rng), value: value(rng), ..Default::default() }.encode_to_vec()
            } else {
                txn(rng, 0).encode_to_vec()
            }
        });
    }

    #[test]
    fn wire_splice_properties() {
        use crate::proto::etcdserverpb::{response_op, DeleteRangeResponse, PutResponse, ResponseOp, TxnResponse};
        fn txn_resp(rng: &mut ChaCha8Rng, depth: usize) -> TxnResponse {
            let op = |rng: &mut ChaCha8Rng| ResponseOp {
                response: Some(match rng.random_range(0..4) {
                    0 if depth < 3 => response_op::Response::ResponseTxn(txn_resp(rng, depth + 1)),
                    1 => response_op::Response::ResponsePut(PutResponse { prev_kv: rng.random_bool(0.5).then(|| kv(rng)), ..Default::default() }),
                    2 => response_op::Response::ResponseDeleteRange(DeleteRangeResponse { prev_kvs: (0..rng.random_range(0..3)).map(|_| kv(rng)).collect(), ..Default::default() }),
                    _ => response_op::Response::ResponseRange(RangeResponse { kvs: (0..rng.random_range(0..3)).map(|_| kv(rng)).collect(), ..Default::default() }),
                }),
            };
            TxnResponse { succeeded: rng.random_bool(0.5), responses: (0..rng.random_range(0..4)).map(|_| op(rng)).collect(), ..Default::default() }
        }
        run(4, wire_splice, |rng| {
            let mut bytes = match rng.random_range(0..3) {
                0 => RangeResponse { kvs: (0..rng.random_range(0..5)).map(|_| kv(rng)).collect(), ..Default::default() }.encode_to_vec(),
                1 => txn_resp(rng, 0).encode_to_vec(),
                _ => {
                    let events = (0..rng.random_range(0..5)).map(|_| Event { kv: Some(kv(rng)), prev_kv: rng.random_bool(0.5).then(|| kv(rng)), ..Default::default() });
                    WatchResponse { events: events.collect(), ..Default::default() }.encode_to_vec()
                }
            };
            // A newer etcd's unknown field at the top level.
            if rng.random_bool(0.3) {
                bytes.extend_from_slice(&[0xa2, 0x06, 0x03, b'n', b'e', b'w']);
            }
            bytes
        });
    }

    #[test]
    fn response_rewriter_properties() {
        run(3, response_rewriter, |rng| {
            if rng.random_bool(0.5) {
                RangeResponse { kvs: (0..rng.random_range(0..5)).map(|_| kv(rng)).collect(), ..Default::default() }.encode_to_vec()
            } else {
                let events = (0..rng.random_range(0..5)).map(|_| Event { kv: Some(kv(rng)), prev_kv: rng.random_bool(0.5).then(|| kv(rng)), ..Default::default() });
                WatchResponse { events: events.collect(), ..Default::default() }.encode_to_vec()
            }
        });
    }
}
