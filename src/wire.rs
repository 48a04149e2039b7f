//! etcd's KV and Watch messages in their protobuf wire bytes: read a few fields, and replace
//! whole sub-messages (a `KeyValue`, a `PutRequest`) while every other byte — unknown fields of
//! a newer etcd included — stays as etcd or the client sent it.
//!
//! Decoding a whole message with prost and encoding it again costs a copy of everything and
//! drops the fields this build's protos do not know; the request path instead walks the wire
//! format along the shapes of etcd's messages ([`Shape`]) down to the messages it changes, and
//! splices their replacements in, fixing the length of every enclosing message. A message with
//! nothing to replace comes back as the very same [`Bytes`] (no copy).
//!
//! The varint and key primitives are prost's (`prost::encoding`, what its generated code uses);
//! the walker over etcd's message shapes is ours. Pure functions over bytes: no I/O, no crate
//! imports, fuzzed against prost's round trip (`crate::fuzzing`).

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{decode_key, decode_varint, encode_varint, WireType};

/// Deepest nesting of messages the walker follows: prost's own recursion limit, so a message
/// prost would refuse is refused here too (a Txn nested 100 levels deep).
pub const MAX_DEPTH: usize = 100;

/// Bytes that are not a well-formed protobuf message of the expected shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A field key or varint cannot be read (prost's message).
    #[error("malformed protobuf at byte {at}: {reason}")]
    Malformed {
        /// Offset in the message being read.
        at: usize,
        /// prost's description.
        reason: String,
    },
    /// A length-delimited or fixed-size field runs past the end of its message.
    #[error("field {field} at byte {at} needs {len} bytes, {left} are left")]
    Truncated {
        /// The field number.
        field: u32,
        /// Offset of the field's key.
        at: usize,
        /// Bytes the field declares.
        len: u64,
        /// Bytes left in the message.
        left: usize,
    },
    /// A group that does not end, or an end-group key without a start.
    #[error("unbalanced group at byte {at}")]
    Group {
        /// Offset of the key.
        at: usize,
    },
    /// Messages nested deeper than [`MAX_DEPTH`].
    #[error("messages nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// The payload of one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// Wire type 0.
    Varint(u64),
    /// Wire type 1 (8 bytes) or 5 (4 bytes), or a group (3): not read further.
    Fixed,
    /// Wire type 2: the offsets of the payload within the message.
    Bytes(Range<usize>),
}

/// One field of a message as it lies in the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// The field number.
    pub number: u32,
    /// Its payload.
    pub value: Value,
    /// From the first byte of its key to the end of its payload, within the message.
    pub span: Range<usize>,
}

/// The fields of one message, in wire order. Stops at the first malformed field.
pub struct Fields<'a> {
    msg: &'a [u8],
    pos: usize,
    failed: bool,
}

/// Iterates over the fields of `msg` (one level; nested messages are `Value::Bytes`).
pub fn fields(msg: &[u8]) -> Fields<'_> {
    Fields { msg, pos: 0, failed: false }
}

impl Fields<'_> {
    fn read(&mut self) -> Result<Field, WireError> {
        let start = self.pos;
        let mut rest = &self.msg[start..];
        let total = rest.len();
        let malformed = |e: prost::DecodeError| WireError::Malformed { at: start, reason: e.to_string() };
        let (number, wire_type) = decode_key(&mut rest).map_err(malformed)?;
        let value = match wire_type {
            WireType::Varint => Value::Varint(decode_varint(&mut rest).map_err(malformed)?),
            WireType::LengthDelimited => {
                let len = decode_varint(&mut rest).map_err(malformed)?;
                if len > rest.len() as u64 {
                    return Err(WireError::Truncated { field: number, at: start, len, left: rest.len() });
                }
                let from = start + (total - rest.len());
                rest = &rest[len as usize..];
                Value::Bytes(from..from + len as usize)
            }
            WireType::SixtyFourBit | WireType::ThirtyTwoBit => {
                let len = if wire_type == WireType::SixtyFourBit { 8 } else { 4 };
                if rest.len() < len {
                    return Err(WireError::Truncated { field: number, at: start, len: len as u64, left: rest.len() });
                }
                rest = &rest[len..];
                Value::Fixed
            }
            WireType::StartGroup => {
                skip_group(&mut rest, number, start, 0)?;
                Value::Fixed
            }
            WireType::EndGroup => return Err(WireError::Group { at: start }),
        };
        self.pos = start + (total - rest.len());
        Ok(Field { number, value, span: start..self.pos })
    }
}

impl Iterator for Fields<'_> {
    type Item = Result<Field, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.msg.len() {
            return None;
        }
        let field = self.read();
        self.failed = field.is_err();
        Some(field)
    }
}

/// Skips a (deprecated, but valid) group up to its matching end key.
fn skip_group(rest: &mut &[u8], number: u32, at: usize, depth: usize) -> Result<(), WireError> {
    if depth >= MAX_DEPTH {
        return Err(WireError::TooDeep);
    }
    let malformed = |e: prost::DecodeError| WireError::Malformed { at, reason: e.to_string() };
    loop {
        if rest.is_empty() {
            return Err(WireError::Group { at });
        }
        let (n, wire_type) = decode_key(rest).map_err(malformed)?;
        match wire_type {
            WireType::EndGroup if n == number => return Ok(()),
            WireType::EndGroup => return Err(WireError::Group { at }),
            WireType::Varint => {
                decode_varint(rest).map_err(malformed)?;
            }
            WireType::LengthDelimited => {
                let len = decode_varint(rest).map_err(malformed)?;
                if len > rest.len() as u64 {
                    return Err(WireError::Truncated { field: n, at, len, left: rest.len() });
                }
                *rest = &rest[len as usize..];
            }
            WireType::SixtyFourBit | WireType::ThirtyTwoBit => {
                let len = if wire_type == WireType::SixtyFourBit { 8 } else { 4 };
                if rest.len() < len {
                    return Err(WireError::Truncated { field: n, at, len: len as u64, left: rest.len() });
                }
                *rest = &rest[len..];
            }
            WireType::StartGroup => skip_group(rest, n, at, depth + 1)?,
        }
    }
}

/// The etcd messages the walker knows, and which of their fields hold which message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// `RangeResponse`: `kvs` = 2.
    RangeResponse,
    /// `PutResponse`: `prev_kv` = 2.
    PutResponse,
    /// `DeleteRangeResponse`: `prev_kvs` = 3.
    DeleteRangeResponse,
    /// `TxnResponse`: `responses` = 3.
    TxnResponse,
    /// `ResponseOp`: `response_range` = 1, `response_put` = 2, `response_delete_range` = 3, `response_txn` = 4.
    ResponseOp,
    /// etcd ≥ 3.7's `RangeStreamResponse`: `range_response` = 1.
    RangeStreamResponse,
    /// `WatchResponse`: `events` = 11.
    WatchResponse,
    /// `mvccpb.Event`: `kv` = 2, `prev_kv` = 3.
    Event,
    /// `mvccpb.KeyValue`: key = 1, create_revision = 2, mod_revision = 3, version = 4, value = 5, lease = 6.
    KeyValue,
    /// `TxnRequest`: `compare` = 1, `success` = 2, `failure` = 3.
    TxnRequest,
    /// `RequestOp`: `request_range` = 1, `request_put` = 2, `request_delete_range` = 3, `request_txn` = 4.
    RequestOp,
    /// `Compare`: key = 3, range_end = 64.
    Compare,
    /// `RangeRequest`: key = 1, range_end = 2.
    RangeRequest,
    /// `PutRequest`: key = 1, value = 2.
    PutRequest,
    /// `DeleteRangeRequest`: key = 1, range_end = 2.
    DeleteRangeRequest,
}

impl Shape {
    /// The message held by field `number` of this message, if it is one the walker follows.
    pub fn child(self, number: u32) -> Option<Shape> {
        use Shape::*;
        Some(match (self, number) {
            (RangeResponse, 2) | (PutResponse, 2) | (DeleteRangeResponse, 3) | (Event, 2) | (Event, 3) => KeyValue,
            (TxnResponse, 3) => ResponseOp,
            (ResponseOp, 1) | (RangeStreamResponse, 1) => RangeResponse,
            (ResponseOp, 2) => PutResponse,
            (ResponseOp, 3) => DeleteRangeResponse,
            (ResponseOp, 4) => TxnResponse,
            (WatchResponse, 11) => Event,
            (TxnRequest, 1) => Compare,
            (TxnRequest, 2) | (TxnRequest, 3) => RequestOp,
            (RequestOp, 1) => RangeRequest,
            (RequestOp, 2) => PutRequest,
            (RequestOp, 3) => DeleteRangeRequest,
            (RequestOp, 4) => TxnRequest,
            _ => return None,
        })
    }
}

/// Where a visited message sits: its enclosing messages from the root, each with the field
/// number that holds the next one.
pub type Path<'a> = &'a [(Shape, u32)];

/// Calls `f` on every message of a shape in `leaves` reachable from `msg` (of shape `shape`),
/// in wire order, with its path. Leaves are not walked into.
pub fn visit<E: From<WireError>>(
    msg: &Bytes,
    shape: Shape,
    leaves: &[Shape],
    f: &mut impl FnMut(Shape, &Bytes, Path<'_>) -> Result<(), E>,
) -> Result<(), E> {
    let mut path = Vec::new();
    walk(msg, shape, leaves, &mut path, &mut |s, leaf, p| f(s, leaf, p).map(|()| None)).map(|_| ())
}

/// Rebuilds `msg` (of shape `shape`) with some of its `leaves` replaced: `f` sees every leaf
/// message in wire order (as [`visit`]) and returns its replacement, or `None` to keep it.
/// Every other byte is kept, enclosing lengths are fixed. `Ok(None)` when nothing was replaced.
pub fn splice<E: From<WireError>>(
    msg: &Bytes,
    shape: Shape,
    leaves: &[Shape],
    f: &mut impl FnMut(Shape, &Bytes, Path<'_>) -> Result<Option<Bytes>, E>,
) -> Result<Option<Bytes>, E> {
    Ok(splice_chunks(msg, shape, leaves, &mut |s, leaf, p| f(s, leaf, p).map(|r| r.map(Spliced::from)))?.map(Spliced::concat))
}

/// [`splice`], returning the rebuilt message as pieces (slices of `msg` and the replacements,
/// never copied): the gRPC encoder writes them out in one copy.
pub fn splice_chunks<E: From<WireError>>(
    msg: &Bytes,
    shape: Shape,
    leaves: &[Shape],
    f: &mut impl FnMut(Shape, &Bytes, Path<'_>) -> Result<Option<Spliced>, E>,
) -> Result<Option<Spliced>, E> {
    let mut path = Vec::new();
    walk(msg, shape, leaves, &mut path, f)
}

/// A message in pieces: slices of the original bytes and replacements, in order.
#[derive(Debug, Default, Clone)]
pub struct Spliced {
    chunks: Vec<Bytes>,
    len: usize,
}

impl From<Bytes> for Spliced {
    fn from(b: Bytes) -> Self {
        let mut s = Spliced::default();
        s.push(b);
        s
    }
}

impl Spliced {
    fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.chunks.push(b);
        }
    }

    fn append(&mut self, other: Spliced) {
        self.len += other.len;
        self.chunks.extend(other.chunks);
    }

    /// Bytes in all pieces.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there is no byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces, in order.
    pub fn chunks(&self) -> &[Bytes] {
        &self.chunks
    }

    /// The message in one buffer (a copy unless it is one piece).
    pub fn concat(self) -> Bytes {
        if self.chunks.len() <= 1 {
            return self.chunks.into_iter().next().unwrap_or_default();
        }
        let mut out = BytesMut::with_capacity(self.len);
        for c in self.chunks {
            out.put(c);
        }
        out.freeze()
    }
}

fn walk<E: From<WireError>>(
    msg: &Bytes,
    shape: Shape,
    leaves: &[Shape],
    path: &mut Vec<(Shape, u32)>,
    f: &mut impl FnMut(Shape, &Bytes, Path<'_>) -> Result<Option<Spliced>, E>,
) -> Result<Option<Spliced>, E> {
    if path.len() >= MAX_DEPTH {
        return Err(WireError::TooDeep.into());
    }
    let mut rope: Option<Spliced> = None;
    let mut copied = 0;
    for field in fields(msg) {
        let field = field?;
        let Some(child) = shape.child(field.number) else { continue };
        let Value::Bytes(payload) = &field.value else { continue };
        let inner = msg.slice(payload.clone());
        path.push((shape, field.number));
        let replaced = if leaves.contains(&child) {
            f(child, &inner, path)?
        } else {
            walk(&inner, child, leaves, path, f)?
        };
        path.pop();
        if let Some(new) = replaced {
            let out = rope.get_or_insert_with(Spliced::default);
            out.push(msg.slice(copied..field.span.start));
            let mut key = BytesMut::with_capacity(15);
            encode_varint(u64::from(field.number << 3 | WireType::LengthDelimited as u32), &mut key);
            encode_varint(new.len as u64, &mut key);
            out.push(key.freeze());
            out.append(new);
            copied = field.span.end;
        }
    }
    if let Some(out) = rope.as_mut() {
        out.push(msg.slice(copied..));
    }
    Ok(rope)
}

/// `msg` with its length-delimited field `number` set to `value`: the last occurrence (the one a
/// protobuf reader keeps) is replaced in place, earlier ones dropped, and the field is added
/// after the other fields when absent. An empty `value` leaves the field out, as proto3 encoders do.
pub fn with_bytes_field(msg: &Bytes, number: u32, value: &Bytes) -> Result<Bytes, WireError> {
    Ok(with_bytes_field_chunks(msg, number, value)?.concat())
}

/// `msg` with its length-delimited field `number` set to `value`, as [`with_bytes_field`], in
/// pieces: the value is not copied (a decoded value of megabytes is written out once, by the encoder).
pub fn with_bytes_field_chunks(msg: &Bytes, number: u32, value: &Bytes) -> Result<Spliced, WireError> {
    let all: Vec<Field> = fields(msg).collect::<Result<_, _>>()?;
    let last = all.iter().rposition(|f| f.number == number && matches!(f.value, Value::Bytes(_)));
    let mut out = Spliced::default();
    let mut copied = 0;
    let header = |out: &mut Spliced| {
        if !value.is_empty() {
            let mut key = BytesMut::with_capacity(15);
            encode_varint(u64::from(number << 3 | WireType::LengthDelimited as u32), &mut key);
            encode_varint(value.len() as u64, &mut key);
            out.push(key.freeze());
            out.push(value.clone());
        }
    };
    for (i, f) in all.iter().enumerate() {
        if f.number == number && matches!(f.value, Value::Bytes(_)) {
            out.push(msg.slice(copied..f.span.start));
            copied = f.span.end;
            if Some(i) == last {
                header(&mut out);
            }
        }
    }
    out.push(msg.slice(copied..));
    if last.is_none() {
        header(&mut out);
    }
    Ok(out)
}

/// The fields of a `mvccpb.KeyValue` the proxy reads: key, revisions, value (slices of the message).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyValueView {
    /// `key` (1).
    pub key: Bytes,
    /// `create_revision` (2).
    pub create_revision: i64,
    /// `mod_revision` (3).
    pub mod_revision: i64,
    /// `version` (4).
    pub version: i64,
    /// `value` (5).
    pub value: Bytes,
    /// `lease` (6).
    pub lease: i64,
}

impl KeyValueView {
    /// Reads a `KeyValue` message (last occurrence of a field wins, as in protobuf).
    pub fn read(kv: &Bytes) -> Result<Self, WireError> {
        let mut out = KeyValueView::default();
        for f in fields(kv) {
            let f = f?;
            match (f.number, &f.value) {
                (1, Value::Bytes(r)) => out.key = kv.slice(r.clone()),
                (5, Value::Bytes(r)) => out.value = kv.slice(r.clone()),
                (2, Value::Varint(v)) => out.create_revision = *v as i64,
                (3, Value::Varint(v)) => out.mod_revision = *v as i64,
                (4, Value::Varint(v)) => out.version = *v as i64,
                (6, Value::Varint(v)) => out.lease = *v as i64,
                _ => {}
            }
        }
        Ok(out)
    }
}

/// The last length-delimited field `number` of `msg` (empty when absent, as proto3 reads it).
pub fn bytes_field(msg: &Bytes, number: u32) -> Result<Bytes, WireError> {
    let mut out = Bytes::new();
    for f in fields(msg) {
        let f = f?;
        if f.number == number {
            if let Value::Bytes(r) = f.value {
                out = msg.slice(r);
            }
        }
    }
    Ok(out)
}

/// The last varint field `number` of `msg` (0 when absent), as etcd's `int64`/`bool`/enum.
pub fn varint_field(msg: &[u8], number: u32) -> Result<i64, WireError> {
    let mut out = 0;
    for f in fields(msg) {
        let f = f?;
        if f.number == number {
            if let Value::Varint(v) = f.value {
                out = v as i64;
            }
        }
    }
    Ok(out)
}

/// `header.revision` of a response (`ResponseHeader` is field 1 of every KV and Watch
/// response; `revision` is its field 3). 0 when absent.
pub fn header_revision(msg: &Bytes) -> Result<i64, WireError> {
    let header = bytes_field(msg, 1)?;
    varint_field(&header, 3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb::{
        response_op, DeleteRangeResponse, PutResponse, RangeResponse, ResponseHeader, ResponseOp, TxnResponse, WatchResponse,
    };
    use crate::proto::mvccpb::{Event, KeyValue};
    use prost::Message;

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue { key: key.as_bytes().to_vec().into(), value: value.as_bytes().to_vec().into(), mod_revision: 7, create_revision: 3, version: 2, lease: 0 }
    }

    /// Replaces every value by its uppercase, through the wire, and checks against prost.
    fn upper(msg: &Bytes, shape: Shape) -> Option<Bytes> {
        splice(msg, shape, &[Shape::KeyValue], &mut |_, leaf, _| {
            let view = KeyValueView::read(leaf)?;
            if view.value.is_empty() {
                return Ok::<_, WireError>(None);
            }
            let new = Bytes::from(view.value.to_ascii_uppercase());
            with_bytes_field(leaf, 5, &new).map(Some)
        })
        .unwrap()
    }

    #[test]
    fn splices_values_at_every_depth_of_a_txn_response() {
        let inner = TxnResponse {
            succeeded: true,
            responses: vec![ResponseOp { response: Some(response_op::Response::ResponseDeleteRange(DeleteRangeResponse { deleted: 1, prev_kvs: vec![kv("/c", "gamma")], ..Default::default() })) }],
            ..Default::default()
        };
        let txn = TxnResponse {
            header: Some(ResponseHeader { revision: 42, ..Default::default() }),
            succeeded: true,
            responses: vec![
                ResponseOp { response: Some(response_op::Response::ResponseRange(RangeResponse { kvs: vec![kv("/a", "alpha"), kv("/b", "")], count: 2, ..Default::default() })) },
                ResponseOp { response: Some(response_op::Response::ResponsePut(PutResponse { prev_kv: Some(kv("/a", "beta")), ..Default::default() })) },
                ResponseOp { response: Some(response_op::Response::ResponseTxn(inner)) },
            ],
        };
        let bytes = Bytes::from(txn.encode_to_vec());
        assert_eq!(header_revision(&bytes).unwrap(), 42);
        let out = upper(&bytes, Shape::TxnResponse).expect("changed");
        let mut want = txn.clone();
        let Some(response_op::Response::ResponseRange(r)) = &mut want.responses[0].response else { panic!() };
        r.kvs[0].value = "ALPHA".into();
        let Some(response_op::Response::ResponsePut(p)) = &mut want.responses[1].response else { panic!() };
        p.prev_kv.as_mut().unwrap().value = "BETA".into();
        let Some(response_op::Response::ResponseTxn(t)) = &mut want.responses[2].response else { panic!() };
        let Some(response_op::Response::ResponseDeleteRange(d)) = &mut t.responses[0].response else { panic!() };
        d.prev_kvs[0].value = "GAMMA".into();
        assert_eq!(out, Bytes::from(want.encode_to_vec()), "byte-identical to prost's encoding of the same message");
    }

    #[test]
    fn unchanged_message_is_the_same_bytes() {
        let r = RangeResponse { kvs: vec![kv("/a", "")], ..Default::default() };
        let bytes = Bytes::from(r.encode_to_vec());
        assert!(upper(&bytes, Shape::RangeResponse).is_none());
    }

    #[test]
    fn unknown_fields_survive_at_every_level() {
        // A newer etcd's field 100 (a string) on the response, the KeyValue and the event.
        let unknown = |tag: u32| {
            let mut b = BytesMut::new();
            encode_varint(u64::from(tag << 3 | 2), &mut b);
            encode_varint(3, &mut b);
            b.put_slice(b"new");
            b.freeze()
        };
        let mut kv_bytes = BytesMut::from(&kv("/a", "alpha").encode_to_vec()[..]);
        kv_bytes.put(unknown(100));
        let mut event = BytesMut::new();
        encode_varint(u64::from(2u32 << 3 | 2), &mut event);
        encode_varint(kv_bytes.len() as u64, &mut event);
        event.put_slice(&kv_bytes);
        event.put(unknown(100));
        let mut watch = BytesMut::from(&WatchResponse { watch_id: 5, ..Default::default() }.encode_to_vec()[..]);
        encode_varint(u64::from(11u32 << 3 | 2), &mut watch);
        encode_varint(event.len() as u64, &mut watch);
        watch.put_slice(&event);
        watch.put(unknown(100));
        let watch = watch.freeze();
        let out = upper(&watch, Shape::WatchResponse).expect("changed");
        assert_eq!(out.len(), watch.len(), "same length: the value changed case only");
        assert_eq!(out.windows(5).filter(|w| w == b"ALPHA").count(), 1);
        assert_eq!(out.windows(3).filter(|w| w == b"new").count(), 3, "all three unknown fields kept");
        let decoded = WatchResponse::decode(&out[..]).unwrap();
        assert_eq!(decoded.events[0].kv.as_ref().unwrap().value, "ALPHA");
    }

    #[test]
    fn chunks_are_what_prost_would_encode() {
        for (stored, value) in [("alpha", "ALPHA!"), ("alpha", ""), ("", "x")] {
            let kv_bytes = Bytes::from(kv("/a", stored).encode_to_vec());
            let spliced = with_bytes_field_chunks(&kv_bytes, 5, &Bytes::from(value)).unwrap();
            assert_eq!(spliced.len(), spliced.chunks().iter().map(Bytes::len).sum::<usize>());
            assert_eq!(spliced.concat(), Bytes::from(kv("/a", value).encode_to_vec()), "{stored:?} -> {value:?}");
        }
    }

    #[test]
    fn with_bytes_field_replaces_the_last_and_adds_when_absent() {
        let put = crate::proto::etcdserverpb::PutRequest { key: "/k".into(), value: "v".into(), lease: 9, ..Default::default() };
        let bytes = Bytes::from(put.encode_to_vec());
        let out = with_bytes_field(&bytes, 2, &Bytes::from_static(b"framed")).unwrap();
        let back = crate::proto::etcdserverpb::PutRequest::decode(&out[..]).unwrap();
        assert_eq!((back.value.as_ref(), back.lease), (&b"framed"[..], 9));
        let empty = Bytes::from(crate::proto::etcdserverpb::PutRequest { key: "/k".into(), ..Default::default() }.encode_to_vec());
        let out = with_bytes_field(&empty, 2, &Bytes::from_static(b"x")).unwrap();
        assert_eq!(crate::proto::etcdserverpb::PutRequest::decode(&out[..]).unwrap().value, "x");
        let out = with_bytes_field(&bytes, 2, &Bytes::new()).unwrap();
        assert!(crate::proto::etcdserverpb::PutRequest::decode(&out[..]).unwrap().value.is_empty());
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        for bad in [&[0x0a, 0x05, b'a'][..], &[0xff; 11], &[0x0b], &[0x0c], &[0x09, 1, 2]] {
            let bytes = Bytes::copy_from_slice(bad);
            assert!(splice(&bytes, Shape::RangeResponse, &[Shape::KeyValue], &mut |_, _, _| Ok::<_, WireError>(None)).is_err(), "{bad:?}");
        }
        // A range response whose kvs field holds garbage: the KeyValue reader refuses it.
        let bytes = Bytes::from_static(&[0x12, 0x02, 0x0a, 0x05]);
        let r = splice(&bytes, Shape::RangeResponse, &[Shape::KeyValue], &mut |_, leaf, _| KeyValueView::read(leaf).map(|_| None));
        assert!(r.is_err());
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut txn = TxnResponse::default();
        for _ in 0..(MAX_DEPTH + 5) {
            txn = TxnResponse { responses: vec![ResponseOp { response: Some(response_op::Response::ResponseTxn(txn)) }], ..Default::default() };
        }
        // prost refuses to encode nothing: build it, then walk it.
        let bytes = Bytes::from(txn.encode_to_vec());
        let r = splice(&bytes, Shape::TxnResponse, &[Shape::KeyValue], &mut |_, _, _| Ok::<_, WireError>(None));
        assert_eq!(r.unwrap_err(), WireError::TooDeep);
    }

    #[test]
    fn events_and_paths() {
        let w = WatchResponse { events: vec![Event { kv: Some(kv("/a", "x")), prev_kv: Some(kv("/a", "y")), ..Default::default() }], ..Default::default() };
        let bytes = Bytes::from(w.encode_to_vec());
        let mut seen = Vec::new();
        visit(&bytes, Shape::WatchResponse, &[Shape::KeyValue], &mut |_, leaf, path| {
            seen.push((KeyValueView::read(leaf)?.value, path.to_vec()));
            Ok::<_, WireError>(())
        })
        .unwrap();
        assert_eq!(seen[0].0, "x");
        assert_eq!(seen[1].1, vec![(Shape::WatchResponse, 11), (Shape::Event, 3)]);
    }
}
