//! Which road a KV or Watch call takes, decided once, at the edge, from the request bytes alone.
//!
//! A call that cannot read or write a key under a configured prefix (or under the proxy's own
//! `/etcd-squeeze/`) is [`Route::Forward`]: its request and response bytes go through untouched,
//! as Lease and Maintenance calls do. Any other call is [`Route::Rewrite`], with what the rewrite
//! needs to know ([`Needs`]). The decision reads only the wire bytes of the request (key,
//! range_end, the compares and operations of a Txn, nested Txns included); a request that cannot be
//! read is sent down the rewrite road, whose decoder answers as etcd would.
//!
//! Key ranges follow etcd: an empty `range_end` is the single key; `range_end = "\0"` is every key
//! ≥ `key`; otherwise `[key, range_end)`. A prefix `p` covers `[p, prefix_end(p))`, and `""` covers
//! every key.

use bytes::Bytes;

use crate::wire::{self, Value, WireError};

pub use crate::codec::RESERVED_PREFIX;

/// The key prefixes that make a call take the rewrite road.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Configured prefixes, each with whether it writes delta frames.
    prefixes: Vec<(Bytes, bool)>,
}

impl Scope {
    /// A scope of `(prefix, delta frames)` pairs; [`RESERVED_PREFIX`] is always in it.
    pub fn new(prefixes: impl IntoIterator<Item = (Bytes, bool)>) -> Self {
        Scope { prefixes: prefixes.into_iter().collect() }
    }

    /// True when `[key, range_end)` contains a key under a configured prefix or [`RESERVED_PREFIX`].
    pub fn overlaps(&self, key: &[u8], range_end: &[u8]) -> bool {
        overlaps(RESERVED_PREFIX, key, range_end) || self.prefixes.iter().any(|(p, _)| overlaps(p, key, range_end))
    }

    /// True when `[key, range_end)` contains a key under [`RESERVED_PREFIX`] (the proxy's own keys,
    /// hidden from clients).
    pub fn overlaps_reserved(&self, key: &[u8], range_end: &[u8]) -> bool {
        overlaps(RESERVED_PREFIX, key, range_end)
    }

    /// True when `[key, range_end)` contains a key under a configured prefix (values there may be frames).
    pub fn overlaps_values(&self, key: &[u8], range_end: &[u8]) -> bool {
        self.prefixes.iter().any(|(p, _)| overlaps(p, key, range_end) && !(range_end.is_empty() && key.starts_with(RESERVED_PREFIX)))
    }

    /// True when a write of the single key `key` falls under a prefix with delta frames (the most
    /// specific prefix decides, as the codec's rules do).
    pub fn is_delta_key(&self, key: &[u8]) -> bool {
        if key.starts_with(RESERVED_PREFIX) {
            return false;
        }
        self.prefixes.iter().filter(|(p, _)| key.starts_with(p)).max_by_key(|(p, _)| p.len()).is_some_and(|(_, delta)| *delta)
    }
}

/// `[p, prefix_end(p)) ∩ [key, range_end) ≠ ∅`, with etcd's meaning of `range_end`.
fn overlaps(p: &[u8], key: &[u8], range_end: &[u8]) -> bool {
    if range_end.is_empty() {
        return key.starts_with(p);
    }
    let starts_before_end = range_end == b"\0" || p < range_end;
    let ends_after_start = match crate::codec::prefix_end(p) {
        None => true,
        Some(end) => key < &end[..],
    };
    starts_before_end && ends_after_start
}

/// The KV and Watch calls that are classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `KV.Range` (`RangeRequest`).
    Range,
    /// `KV.RangeStream` (`RangeRequest`).
    RangeStream,
    /// `KV.Put` (`PutRequest`).
    Put,
    /// `KV.DeleteRange` (`DeleteRangeRequest`).
    DeleteRange,
    /// `KV.Txn` (`TxnRequest`).
    Txn,
    /// A `WatchCreateRequest` (field 1 of a `WatchRequest`, passed here unwrapped).
    WatchCreate,
}

/// What the rewrite road must do beyond encoding Put values and decoding KeyValue values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// A Compare on VALUE over a configured prefix (evaluated by the proxy on logical values).
    pub value_compare: bool,
    /// A write (Put, or single-key DeleteRange; any Put or DeleteRange inside a Txn) of a key
    /// under a prefix with delta frames: the request is rebuilt with base writes.
    pub delta: bool,
    /// A Range sorted by VALUE over a configured prefix (sorted by the proxy on logical values).
    pub sort_by_value: bool,
    /// The request could not be read: the rewrite road decodes it, and answers as etcd would.
    pub unreadable: bool,
    /// A key range (or key) of the request reaches into [`RESERVED_PREFIX`]: the proxy's own keys
    /// are hidden from it (`server::reserved`).
    pub reserved: bool,
}

impl Needs {
    /// True when the request is rebuilt rather than rewritten in place.
    pub fn rebuild(&self) -> bool {
        self.value_compare || self.delta || self.sort_by_value || self.unreadable || self.reserved
    }
}

/// The road one call takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// No key under a prefix or `/etcd-squeeze/` can be involved: forward bytes both ways.
    Forward,
    /// Some may be: encode and decode values, with these needs.
    Rewrite(Needs),
}

/// Classifies one request from its protobuf bytes. Never fails: unreadable bytes take the
/// rewrite road (`Needs::unreadable`).
pub fn classify(call: Call, request: &[u8], scope: &Scope) -> Route {
    let mut needs = Needs::default();
    match read(call, request, scope, &mut needs) {
        Ok(false) => Route::Forward,
        Ok(true) => Route::Rewrite(needs),
        Err(_) => Route::Rewrite(Needs { unreadable: true, ..needs }),
    }
}

/// Reads `msg` and returns whether it is involved; fills `needs`.
fn read(call: Call, msg: &[u8], scope: &Scope, needs: &mut Needs) -> Result<bool, WireError> {
    match call {
        Call::Range | Call::RangeStream => {
            let (key, end, v) = key_range(msg, 1, 2, [6, 9])?;
            let involved = scope.overlaps(key, end);
            needs.reserved |= scope.overlaps_reserved(key, end);
            // sort_target = 6 (VALUE = 4); count_only = 9.
            if involved && v[0] == 4 && (call == Call::RangeStream || v[1] == 0) && scope.overlaps_values(key, end) {
                needs.sort_by_value = true;
            }
            Ok(involved)
        }
        Call::Put => {
            // key = 1; lease = 3, ignore_value = 5, ignore_lease = 6.
            let (key, _, v) = key_range(msg, 1, 0, [3, 5])?;
            let ignore_lease = wire::varint_field(msg, 6)?;
            let involved = scope.overlaps(key, b"");
            needs.reserved |= scope.overlaps_reserved(key, b"");
            if involved && v[0] == 0 && v[1] == 0 && ignore_lease == 0 && scope.is_delta_key(key) {
                needs.delta = true;
            }
            Ok(involved)
        }
        Call::DeleteRange => {
            let (key, end, _) = key_range(msg, 1, 2, [0, 0])?;
            let involved = scope.overlaps(key, end);
            needs.reserved |= scope.overlaps_reserved(key, end);
            if involved && end.is_empty() && scope.is_delta_key(key) {
                needs.delta = true;
            }
            Ok(involved)
        }
        Call::WatchCreate => {
            let (key, end, _) = key_range(msg, 1, 2, [0, 0])?;
            needs.reserved |= scope.overlaps_reserved(key, end);
            Ok(scope.overlaps(key, end))
        }
        Call::Txn => txn(msg, scope, needs, 0),
    }
}

/// A request's key, range_end and two varint fields, as slices of its bytes.
type KeyRange<'a> = (&'a [u8], &'a [u8], [i64; 2]);

/// The key and range_end fields (last occurrence wins) and two varint fields (0 = none) of `msg`.
fn key_range(msg: &[u8], key_field: u32, end_field: u32, varint_fields: [u32; 2]) -> Result<KeyRange<'_>, WireError> {
    let (mut key, mut end, mut v): (&[u8], &[u8], [i64; 2]) = (b"", b"", [0, 0]);
    for f in wire::fields(msg) {
        let f = f?;
        match f.value {
            Value::Bytes(r) if f.number == key_field => key = &msg[r],
            Value::Bytes(r) if f.number == end_field && end_field != 0 => end = &msg[r],
            Value::Varint(x) => {
                for (i, n) in varint_fields.iter().enumerate() {
                    if *n != 0 && f.number == *n {
                        v[i] = x as i64;
                    }
                }
            }
            _ => {}
        }
    }
    Ok((key, end, v))
}

/// A Txn: involved when any compare or op (at any depth) is.
fn txn(msg: &[u8], scope: &Scope, needs: &mut Needs, depth: usize) -> Result<bool, WireError> {
    if depth >= wire::MAX_DEPTH {
        return Err(WireError::TooDeep);
    }
    let mut involved = false;
    for f in wire::fields(msg) {
        let f = f?;
        let Value::Bytes(r) = f.value else { continue };
        let inner = &msg[r];
        match f.number {
            // Compare: target = 2 (VALUE = 3), key = 3, range_end = 64.
            1 => {
                let (key, end, v) = key_range(inner, 3, 64, [2, 0])?;
                needs.reserved |= scope.overlaps_reserved(key, end);
                if scope.overlaps(key, end) {
                    involved = true;
                    if v[0] == 3 && scope.overlaps_values(key, end) {
                        needs.value_compare = true;
                    }
                }
            }
            2 | 3 => involved |= op(inner, scope, needs, depth)?,
            _ => {}
        }
    }
    Ok(involved)
}

/// A RequestOp: range = 1, put = 2, delete_range = 3, txn = 4.
fn op(msg: &[u8], scope: &Scope, needs: &mut Needs, depth: usize) -> Result<bool, WireError> {
    let mut involved = false;
    for f in wire::fields(msg) {
        let f = f?;
        let Value::Bytes(r) = f.value else { continue };
        let inner = &msg[r];
        match f.number {
            1 => {
                // sort_target = 6 (VALUE = 4); count_only = 9.
                let (key, end, v) = key_range(inner, 1, 2, [6, 9])?;
                needs.reserved |= scope.overlaps_reserved(key, end);
                if scope.overlaps(key, end) {
                    involved = true;
                    // Inside a Txn too, a Range sorted by VALUE is sorted by the proxy on logical values.
                    needs.sort_by_value |= v[0] == 4 && v[1] == 0 && scope.overlaps_values(key, end);
                }
            }
            2 | 3 => {
                let (key, end, _) = key_range(inner, 1, if f.number == 3 { 2 } else { 0 }, [0, 0])?;
                needs.reserved |= scope.overlaps_reserved(key, end);
                if scope.overlaps(key, end) {
                    involved = true;
                    // Inside a Txn, any Put or DeleteRange whose key has delta frames is rebuilt.
                    needs.delta |= scope.is_delta_key(key);
                }
            }
            4 => involved |= txn(inner, scope, needs, depth + 1)?,
            _ => {}
        }
    }
    Ok(involved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb::{
        compare, request_op, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest,
    };
    use prost::Message;

    const FLYTE: &str = "/registry/flyte.lyft.com/flyteworkflows/";

    fn scope(prefixes: &[(&str, bool)]) -> Scope {
        Scope::new(prefixes.iter().map(|(p, d)| (Bytes::copy_from_slice(p.as_bytes()), *d)))
    }

    fn range(key: &str, end: &[u8]) -> Vec<u8> {
        RangeRequest { key: key.as_bytes().to_vec().into(), range_end: end.to_vec().into(), ..Default::default() }.encode_to_vec()
    }

    const FWD: Route = Route::Forward;
    const RW: Route = Route::Rewrite(Needs { value_compare: false, delta: false, sort_by_value: false, unreadable: false, reserved: false });
    /// Reaches into the proxy's own keys (hidden from the client).
    const RES: Route = Route::Rewrite(Needs { value_compare: false, delta: false, sort_by_value: false, unreadable: false, reserved: true });

    #[test]
    fn ranges() {
        let s = scope(&[(FLYTE, false)]);
        let table: &[(&str, &[u8], Route)] = &[
            ("/registry/pods/default/p", b"", FWD),
            ("/registry/flyte.lyft.com/flyteworkflows/ns/wf", b"", RW),
            ("/registry/flyte.lyft.com/flyteworkflows/", b"", RW),
            ("/registry/flyte.lyft.com/flyteworkflows", b"", FWD), // the key without the slash
            ("/registry/pods/", b"/registry/pods0", FWD),
            ("/registry/", b"/registry0", RW),                          // a range containing the prefix
            ("/registry/flyte.lyft.com/flyteworkflows/a", b"/registry/flyte.lyft.com/flyteworkflows/b", RW),
            ("/registry/flyte.lyft.com/flyteworkflows0", b"\0", FWD),      // from just past the prefix to the end
            ("/registry/flyte.lyft.com/flyteworkflows/z", b"\0", RW),      // from inside the prefix to the end
            ("/a", b"\0", RES),                                            // "from key": covers the prefix and /etcd-squeeze/
            ("/registry/flyte.lyft.com/flyteworkflows0", b"/registry/z", FWD),
            ("/registry/a", b"/registry/flyte.lyft.com/flyteworkflows/", FWD), // range_end is exclusive
            ("/registry/a", b"/registry/flyte.lyft.com/flyteworkflows/\0", RW),
            ("/a", b"/f", RES),                                            // covers /etcd-squeeze/
            ("/etcd-squeeze/dictionaries/1", b"", RES),                    // the proxy's own keys
            ("/etcd-squeeze/", b"/etcd-squeeze0", RES),
            ("/", b"/etcd-squeeze/", FWD),                                 // ends where the proxy's keys begin
            ("\0", b"\0", RES),                                            // every key
        ];
        for (key, end, want) in table {
            assert_eq!(classify(Call::Range, &range(key, end), &s), *want, "{key:?}..{end:?}");
        }
    }

    #[test]
    fn empty_prefix_covers_every_key() {
        let s = scope(&[("", false)]);
        assert_eq!(classify(Call::Range, &range("/registry/pods/a", b""), &s), RW);
        assert_eq!(classify(Call::Range, &range("", b""), &s), RW);
    }

    #[test]
    fn no_prefix_still_covers_the_reserved_keys() {
        let s = scope(&[]);
        assert_eq!(classify(Call::Range, &range("/registry/pods/a", b""), &s), FWD);
        assert_eq!(classify(Call::Range, &range("/etcd-squeeze/bases/x", b""), &s), RES);
    }

    fn put(key: &str, lease: i64) -> PutRequest {
        PutRequest { key: key.as_bytes().to_vec().into(), value: "v".into(), lease, ..Default::default() }
    }

    #[test]
    fn puts_and_deletes_with_delta_frames() {
        let s = scope(&[(FLYTE, true), ("/registry/configmaps/", false)]);
        let wf = "/registry/flyte.lyft.com/flyteworkflows/ns/wf";
        let delta = Route::Rewrite(Needs { delta: true, ..Needs::default() });
        assert_eq!(classify(Call::Put, &put("/registry/pods/a", 0).encode_to_vec(), &s), FWD);
        assert_eq!(classify(Call::Put, &put(wf, 0).encode_to_vec(), &s), delta);
        assert_eq!(classify(Call::Put, &put(wf, 7).encode_to_vec(), &s), RW, "leased values are never delta frames");
        assert_eq!(classify(Call::Put, &PutRequest { ignore_value: true, ..put(wf, 0) }.encode_to_vec(), &s), RW);
        assert_eq!(classify(Call::Put, &put("/registry/configmaps/a", 0).encode_to_vec(), &s), RW);
        let del = |key: &str, end: &[u8]| DeleteRangeRequest { key: key.as_bytes().to_vec().into(), range_end: end.to_vec().into(), ..Default::default() }.encode_to_vec();
        assert_eq!(classify(Call::DeleteRange, &del(wf, b""), &s), delta);
        assert_eq!(classify(Call::DeleteRange, &del(FLYTE, b"/registry/flyte.lyft.com/flyteworkflows0"), &s), RW);
        assert_eq!(classify(Call::DeleteRange, &del("/registry/pods/a", b""), &s), FWD);
    }

    fn op(r: request_op::Request) -> RequestOp {
        RequestOp { request: Some(r) }
    }

    fn cmp(key: &str, target: compare::CompareTarget) -> Compare {
        Compare { key: key.as_bytes().to_vec().into(), target: target as i32, ..Default::default() }
    }

    #[test]
    fn txns_at_every_depth() {
        let s = scope(&[(FLYTE, false)]);
        let wf = "/registry/flyte.lyft.com/flyteworkflows/ns/wf";
        let pods = TxnRequest {
            compare: vec![cmp("/registry/pods/a", compare::CompareTarget::Mod)],
            success: vec![op(request_op::Request::RequestPut(put("/registry/pods/a", 0)))],
            failure: vec![op(request_op::Request::RequestRange(RangeRequest { key: "/registry/pods/a".into(), ..Default::default() }))],
        };
        assert_eq!(classify(Call::Txn, &pods.encode_to_vec(), &s), FWD);
        // The same Txn with a Put of a FlyteWorkflow three levels down, in a failure branch.
        let mut nested = pods.clone();
        nested.failure.push(op(request_op::Request::RequestTxn(TxnRequest {
            success: vec![op(request_op::Request::RequestTxn(TxnRequest {
                failure: vec![op(request_op::Request::RequestPut(put(wf, 0)))],
                ..Default::default()
            }))],
            ..Default::default()
        })));
        assert_eq!(classify(Call::Txn, &nested.encode_to_vec(), &s), RW);
        // A compare alone involves the Txn; on VALUE it needs evaluating on logical values.
        let mut c = pods.clone();
        c.compare.push(cmp(wf, compare::CompareTarget::Mod));
        assert_eq!(classify(Call::Txn, &c.encode_to_vec(), &s), RW);
        c.compare.push(cmp(wf, compare::CompareTarget::Value));
        assert_eq!(classify(Call::Txn, &c.encode_to_vec(), &s), Route::Rewrite(Needs { value_compare: true, ..Needs::default() }));
        // A VALUE compare on the proxy's own keys needs no evaluation (they are never frames).
        let own = TxnRequest { compare: vec![cmp("/etcd-squeeze/x", compare::CompareTarget::Value)], ..Default::default() };
        assert_eq!(classify(Call::Txn, &own.encode_to_vec(), &s), RES);
        // A range compare over the prefix.
        let ranged = TxnRequest {
            compare: vec![Compare { range_end: "\0".into(), ..cmp("/registry/", compare::CompareTarget::Version) }],
            ..Default::default()
        };
        assert_eq!(classify(Call::Txn, &ranged.encode_to_vec(), &s), RW);
        assert_eq!(classify(Call::Txn, &TxnRequest::default().encode_to_vec(), &s), FWD, "an empty Txn");
    }

    #[test]
    fn delta_writes_inside_txns() {
        let s = scope(&[(FLYTE, true)]);
        let wf = "/registry/flyte.lyft.com/flyteworkflows/ns/wf";
        let t = TxnRequest { success: vec![op(request_op::Request::RequestTxn(TxnRequest {
            success: vec![op(request_op::Request::RequestDeleteRange(DeleteRangeRequest { key: wf.into(), ..Default::default() }))],
            ..Default::default()
        }))], ..Default::default() };
        assert_eq!(classify(Call::Txn, &t.encode_to_vec(), &s), Route::Rewrite(Needs { delta: true, ..Needs::default() }));
    }

    #[test]
    fn sorted_by_value() {
        let s = scope(&[(FLYTE, false)]);
        let r = |key: &str, count_only| RangeRequest { key: key.as_bytes().to_vec().into(), range_end: "\0".into(), sort_target: 4, count_only, ..Default::default() }.encode_to_vec();
        let sorted = Route::Rewrite(Needs { sort_by_value: true, ..Needs::default() });
        assert_eq!(classify(Call::Range, &r("/registry/", false), &s), sorted);
        assert_eq!(classify(Call::Range, &r("/registry/", true), &s), RW, "count_only: nothing to sort");
        assert_eq!(classify(Call::RangeStream, &r("/registry/", true), &s), sorted);
        assert_eq!(classify(Call::Range, &r("/registry/pods0", false), &s), FWD, "past the prefix: etcd sorts plain values");
    }

    #[test]
    fn watches() {
        let s = scope(&[(FLYTE, false)]);
        let w = |key: &str, end: &str| WatchCreateRequest { key: key.as_bytes().to_vec().into(), range_end: end.as_bytes().to_vec().into(), ..Default::default() }.encode_to_vec();
        assert_eq!(classify(Call::WatchCreate, &w("/registry/pods/", "/registry/pods0"), &s), FWD);
        assert_eq!(classify(Call::WatchCreate, &w(FLYTE, "/registry/flyte.lyft.com/flyteworkflows0"), &s), RW);
        assert_eq!(classify(Call::WatchCreate, &w("/registry/leases/a", ""), &s), FWD);
    }

    #[test]
    fn unreadable_bytes_take_the_rewrite_road() {
        let s = scope(&[(FLYTE, false)]);
        let bad = Route::Rewrite(Needs { unreadable: true, ..Needs::default() });
        for call in [Call::Range, Call::Put, Call::DeleteRange, Call::Txn, Call::WatchCreate] {
            assert_eq!(classify(call, &[0x0a, 0x09, b'/'], &s), bad, "{call:?}");
            assert_eq!(classify(call, &[0xff; 11], &s), bad, "{call:?}");
        }
        assert_eq!(classify(Call::Range, &[], &s), FWD, "an empty message is the empty key");
    }
}
