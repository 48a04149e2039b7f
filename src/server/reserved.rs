//! The proxy's own keys (`/etcd-squeeze/`: dictionaries, delta-frame bases, the trainer election)
//! do not exist through the client API.
//!
//! A Range, DeleteRange, compare or Txn operation whose key range reaches into
//! [`RESERVED_PREFIX`] is sent to etcd with its range cut around it — at most two parts, the keys
//! before `/etcd-squeeze/` and those after — in **one Txn**, so both parts are read (or deleted)
//! at one revision, and the answers are put back together as etcd would have given them for the
//! client's range had those keys been absent: `count`, `more`, `limit`, sort orders, `keys_only`,
//! `count_only`, `deleted`, `prev_kvs`, one revision for a delete. A compare on a reserved key is
//! evaluated on a key that never exists (`/etcd-squeeze/` itself: the proxy never writes it).
//! A Put into `/etcd-squeeze/` is refused. Watch events of reserved keys are dropped (see
//! [`super::watch`]). The operator commands, snapshots and etcdctl against etcd itself still see
//! everything.

use bytes::Bytes;
use tonic::Status;

use crate::classify::RESERVED_PREFIX;
use crate::codec::prefix_end;
use crate::proto::etcdserverpb::{
    range_request, request_op, response_op, Compare, DeleteRangeRequest, DeleteRangeResponse, RangeRequest, RangeResponse,
    RequestOp, ResponseOp, TxnRequest, TxnResponse,
};
use crate::proto::mvccpb::KeyValue;

/// The message of a write into `/etcd-squeeze/` through the proxy (INVALID_ARGUMENT).
pub const RESERVED_WRITE: &str =
    "etcd-squeeze: keys under /etcd-squeeze/ belong to the proxy and cannot be written through it (use the operator commands against etcd)";

/// The message of a compare over a key range on both sides of `/etcd-squeeze/` (INVALID_ARGUMENT).
pub const RESERVED_RANGE_COMPARE: &str =
    "etcd-squeeze: a compare over a key range that spans /etcd-squeeze/ (the proxy's own keys) is not supported; compare a range that starts after /etcd-squeeze0 or ends at /etcd-squeeze/";

/// A key the proxy never writes, under the reserved prefix: where a compare or a read of a
/// reserved key is sent, so that it answers as for an absent key.
fn absent_key() -> Bytes {
    Bytes::from_static(RESERVED_PREFIX)
}

/// `[key, range_end)` minus the reserved range, as etcd ranges (`range_end` empty = one key,
/// `"\0"` = to the end of the keyspace): 0, 1 or 2 parts.
pub fn parts(key: &Bytes, range_end: &Bytes) -> Vec<(Bytes, Bytes)> {
    let reserved_end = Bytes::from(prefix_end(RESERVED_PREFIX).expect("the reserved prefix has an end"));
    if range_end.is_empty() {
        return if key.starts_with(RESERVED_PREFIX) { vec![] } else { vec![(key.clone(), range_end.clone())] };
    }
    let to_end = &range_end[..] == b"\0";
    let mut out = Vec::new();
    // Before the reserved range: [key, min(range_end, RESERVED_PREFIX)).
    if &key[..] < RESERVED_PREFIX {
        let end = if !to_end && &range_end[..] <= RESERVED_PREFIX { range_end.clone() } else { Bytes::from_static(RESERVED_PREFIX) };
        out.push((key.clone(), end));
    }
    // After it: [max(key, reserved_end), range_end).
    if to_end || range_end[..] > reserved_end[..] {
        let start = if key[..] > reserved_end[..] { key.clone() } else { reserved_end };
        out.push((start, range_end.clone()));
    }
    out
}

/// True when a Range sorts by VALUE (and returns values): sorted by the proxy on decoded values.
fn by_value(r: &RangeRequest) -> bool {
    r.sort_target == range_request::SortTarget::Value as i32 && !r.count_only
}

/// True when `[key, range_end)` reaches into the reserved prefix.
pub fn touches(key: &Bytes, range_end: &Bytes) -> bool {
    parts(key, range_end) != [(key.clone(), range_end.clone())]
}

/// How one operation of the client's Txn was rewritten, to put its answer back together.
#[derive(Debug, Clone)]
enum OpPlan {
    /// Sent as it is: one response.
    Same,
    /// A Range sent as `n` parts (0 parts: one read of the absent key).
    Range { request: RangeRequest, n: usize },
    /// A DeleteRange sent as `n` parts (0 parts: one delete of the absent key).
    Delete { n: usize },
    /// A nested Txn, rewritten with its own plan for each branch.
    Txn(Box<TxnPlan>),
}

/// How a Txn was rewritten: the plan of each operation of each branch.
#[derive(Debug, Clone, Default)]
pub struct TxnPlan {
    success: Vec<OpPlan>,
    failure: Vec<OpPlan>,
}

/// Rewrites `txn` (compares and operations at any depth) so that no key range reaches into the
/// reserved prefix, and so that a Range sorted by VALUE reads unsorted (etcd would sort the
/// stored frames; the answer is sorted on decoded values by [`restore_txn`]).
/// Errors: a Put into `/etcd-squeeze/` (INVALID_ARGUMENT [`RESERVED_WRITE`]).
pub fn plan_txn(txn: &mut TxnRequest) -> Result<TxnPlan, Status> {
    let mut compares = Vec::with_capacity(txn.compare.len());
    for c in txn.compare.drain(..) {
        if !touches(&c.key, &c.range_end) {
            compares.push(c);
            continue;
        }
        let cut = parts(&c.key, &c.range_end);
        match cut.len() {
            0 => compares.push(Compare { key: absent_key(), range_end: Bytes::new(), ..c }),
            1 => {
                let (key, range_end) = cut.into_iter().next().expect("one part");
                compares.push(Compare { key, range_end, ..c });
            }
            // etcd compares an empty range as one absent key: two parts, one of them empty,
            // would not answer as the whole range does. Refused rather than answered differently.
            _ => return Err(Status::invalid_argument(RESERVED_RANGE_COMPARE)),
        }
    }
    txn.compare = compares;
    let success = hide_in_ops(&mut txn.success)?;
    let failure = hide_in_ops(&mut txn.failure)?;
    Ok(TxnPlan { success, failure })
}

fn hide_in_ops(ops: &mut Vec<RequestOp>) -> Result<Vec<OpPlan>, Status> {
    let mut plans = Vec::with_capacity(ops.len());
    let mut out = Vec::with_capacity(ops.len());
    for op in ops.drain(..) {
        match op.request {
            Some(request_op::Request::RequestRange(r)) if touches(&r.key, &r.range_end) || by_value(&r) => {
                let sent = range_parts(&r);
                plans.push(OpPlan::Range { n: sent.len(), request: r });
                out.extend(sent.into_iter().map(|r| RequestOp { request: Some(request_op::Request::RequestRange(r)) }));
            }
            Some(request_op::Request::RequestDeleteRange(d)) if touches(&d.key, &d.range_end) => {
                let cut = parts(&d.key, &d.range_end);
                plans.push(OpPlan::Delete { n: cut.len() });
                if cut.is_empty() {
                    let absent = DeleteRangeRequest { key: absent_key(), range_end: Bytes::new(), ..d };
                    out.push(RequestOp { request: Some(request_op::Request::RequestDeleteRange(absent)) });
                }
                for (key, range_end) in cut {
                    let part = DeleteRangeRequest { key, range_end, ..d.clone() };
                    out.push(RequestOp { request: Some(request_op::Request::RequestDeleteRange(part)) });
                }
            }
            Some(request_op::Request::RequestPut(p)) if p.key.starts_with(RESERVED_PREFIX) => {
                return Err(Status::invalid_argument(RESERVED_WRITE));
            }
            Some(request_op::Request::RequestTxn(mut inner)) => {
                let plan = plan_txn(&mut inner)?;
                plans.push(OpPlan::Txn(Box::new(plan)));
                out.push(RequestOp { request: Some(request_op::Request::RequestTxn(inner)) });
            }
            request => {
                plans.push(OpPlan::Same);
                out.push(RequestOp { request });
            }
        }
    }
    *ops = out;
    Ok(plans)
}

/// The Range requests that read `r`'s range without the reserved keys: one per part, each with
/// the client's options (a VALUE sort is done after decoding: parts are read unsorted, unlimited);
/// no part: one read of the absent key.
pub fn range_parts(r: &RangeRequest) -> Vec<RangeRequest> {
    let cut = parts(&r.key, &r.range_end);
    if cut.is_empty() {
        return vec![RangeRequest { key: absent_key(), range_end: Bytes::new(), ..r.clone() }];
    }
    let by_value = r.sort_target == range_request::SortTarget::Value as i32;
    cut.into_iter()
        .map(|(key, range_end)| {
            let mut part = RangeRequest { key, range_end, ..r.clone() };
            if by_value {
                part.sort_order = range_request::SortOrder::None as i32;
                part.sort_target = range_request::SortTarget::Key as i32;
                part.limit = 0;
                part.keys_only = false;
            }
            part
        })
        .collect()
}

/// Puts the answers of `range_parts(want)` (their values already decoded) back together as etcd
/// answers `want`: kvs in etcd's order (sort target and order; NONE with a non-KEY target is
/// ascending), cut at `limit` (`more` when anything was cut or a part had more), `count` summed.
pub fn merge_ranges(want: &RangeRequest, answers: Vec<RangeResponse>) -> RangeResponse {
    use range_request::{SortOrder, SortTarget};
    let n_parts = parts(&want.key, &want.range_end).len();
    let mut out = RangeResponse { header: answers.first().and_then(|a| a.header), ..Default::default() };
    if n_parts == 0 {
        return out; // the absent key: nothing, count 0
    }
    let mut kvs: Vec<KeyValue> = Vec::new();
    for a in answers {
        out.count += a.count;
        out.more |= a.more;
        kvs.extend(a.kvs);
    }
    let target = SortTarget::try_from(want.sort_target).unwrap_or(SortTarget::Key);
    let order = SortOrder::try_from(want.sort_order).unwrap_or(SortOrder::None);
    let descending = order == SortOrder::Descend;
    let sorted = order != SortOrder::None || target != SortTarget::Key;
    if sorted {
        let key = |kv: &KeyValue| -> (i64, Bytes) {
            match target {
                SortTarget::Key => (0, kv.key.clone()),
                SortTarget::Version => (kv.version, Bytes::new()),
                SortTarget::Create => (kv.create_revision, Bytes::new()),
                SortTarget::Mod => (kv.mod_revision, Bytes::new()),
                SortTarget::Value => (0, kv.value.clone()),
            }
        };
        kvs.sort_by_key(key);
        if descending {
            kvs.reverse();
        }
    }
    if want.limit > 0 && kvs.len() > want.limit as usize {
        kvs.truncate(want.limit as usize);
        out.more = true;
    }
    if want.sort_target == SortTarget::Value as i32 && want.keys_only {
        for kv in &mut kvs {
            kv.value = Bytes::new();
        }
    }
    if want.count_only {
        kvs.clear();
    }
    out.kvs = kvs;
    out
}

/// Puts the answers of a DeleteRange's parts back together: `deleted` summed, `prev_kvs` in key order.
pub fn merge_deletes(header: Option<crate::proto::etcdserverpb::ResponseHeader>, n_parts: usize, answers: Vec<DeleteRangeResponse>) -> DeleteRangeResponse {
    let mut out = DeleteRangeResponse { header, ..Default::default() };
    if n_parts == 0 {
        return out;
    }
    for a in answers {
        out.deleted += a.deleted;
        out.prev_kvs.extend(a.prev_kvs);
    }
    out
}

/// Puts a Txn's answer back in the shape of the client's Txn (before [`plan_txn`]).
pub fn restore_txn(plan: &TxnPlan, resp: &mut TxnResponse) -> Result<(), Status> {
    let plans = if resp.succeeded { &plan.success } else { &plan.failure };
    let header = resp.header;
    resp.responses = restore_ops(plans, std::mem::take(&mut resp.responses), &header)?;
    Ok(())
}

fn restore_ops(plans: &[OpPlan], answers: Vec<ResponseOp>, header: &Option<crate::proto::etcdserverpb::ResponseHeader>) -> Result<Vec<ResponseOp>, Status> {
    let short = || Status::internal("etcd-squeeze: etcd answered a Txn with fewer responses than operations");
    let mut answers = answers.into_iter();
    let mut out = Vec::with_capacity(plans.len());
    for plan in plans {
        let response = match plan {
            OpPlan::Same => answers.next().ok_or_else(short)?.response,
            OpPlan::Range { request, n } => {
                let mut ranges = Vec::new();
                for _ in 0..(*n).max(1) {
                    match answers.next().ok_or_else(short)?.response {
                        Some(response_op::Response::ResponseRange(r)) => ranges.push(r),
                        _ => return Err(Status::internal("etcd-squeeze: etcd answered a Range part with another response")),
                    }
                }
                // Each part is etcd's own answer, with etcd's header for it.
                Some(response_op::Response::ResponseRange(merge_ranges(request, ranges)))
            }
            OpPlan::Delete { n } => {
                let mut deletes = Vec::new();
                for _ in 0..(*n).max(1) {
                    match answers.next().ok_or_else(short)?.response {
                        Some(response_op::Response::ResponseDeleteRange(d)) => deletes.push(d),
                        _ => return Err(Status::internal("etcd-squeeze: etcd answered a DeleteRange part with another response")),
                    }
                }
                let part_header = deletes.first().and_then(|d| d.header).or(*header);
                Some(response_op::Response::ResponseDeleteRange(merge_deletes(part_header, *n, deletes)))
            }
            OpPlan::Txn(inner) => match answers.next().ok_or_else(short)?.response {
                Some(response_op::Response::ResponseTxn(mut t)) => {
                    restore_txn(inner, &mut t)?;
                    Some(response_op::Response::ResponseTxn(t))
                }
                _ => return Err(Status::internal("etcd-squeeze: etcd answered a nested Txn with another response")),
            },
        };
        out.push(ResponseOp { response });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn ranges_are_cut_around_the_reserved_prefix() {
        let r = "/etcd-squeeze/";
        let after = "/etcd-squeeze0";
        // Every key.
        assert_eq!(parts(&b(""), &b("\0")), vec![(b(""), b(r)), (b(after), b("\0"))]);
        // "/" prefix.
        assert_eq!(parts(&b("/"), &b("0")), vec![(b("/"), b(r)), (b(after), b("0"))]);
        // Entirely inside.
        assert_eq!(parts(&b("/etcd-squeeze/bases/"), &b("/etcd-squeeze/bases0")), vec![]);
        assert_eq!(parts(&b("/etcd-squeeze/trainer"), &b("")), vec![]);
        // Starting inside, ending after.
        assert_eq!(parts(&b("/etcd-squeeze/x"), &b("/z")), vec![(b(after), b("/z"))]);
        // Starting before, ending inside.
        assert_eq!(parts(&b("/a"), &b("/etcd-squeeze/m")), vec![(b("/a"), b(r))]);
        // Untouched.
        assert_eq!(parts(&b("/registry/"), &b("/registry0")), vec![(b("/registry/"), b("/registry0"))]);
        assert_eq!(parts(&b("/a"), &b("/etcd-squeeze/")), vec![(b("/a"), b(r))]);
        assert!(!touches(&b("/a"), &b("/etcd-squeeze/")));
        assert!(!touches(&b("/etcd-squeeze0"), &b("\0")));
        assert!(touches(&b(""), &b("\0")));
    }

    fn kv(key: &str, create: i64) -> KeyValue {
        KeyValue { key: b(key), create_revision: create, mod_revision: create, version: 1, value: b(key), lease: 0 }
    }

    #[test]
    fn merged_ranges_follow_etcds_order_limit_and_count() {
        let part = |kvs: Vec<KeyValue>, count: i64, more: bool| RangeResponse { kvs, count, more, ..Default::default() };
        let want = RangeRequest { key: b(""), range_end: b("\0"), limit: 3, ..Default::default() };
        let m = merge_ranges(&want, vec![part(vec![kv("/a", 5), kv("/b", 2)], 2, false), part(vec![kv("/f", 1), kv("/g", 9)], 2, false)]);
        assert_eq!(m.kvs.iter().map(|k| k.key.clone()).collect::<Vec<_>>(), vec![b("/a"), b("/b"), b("/f")]);
        assert_eq!((m.count, m.more), (4, true));
        let want = RangeRequest {
            sort_target: range_request::SortTarget::Create as i32,
            sort_order: range_request::SortOrder::Descend as i32,
            ..want
        };
        let m = merge_ranges(&want, vec![part(vec![kv("/a", 5), kv("/b", 2)], 2, false), part(vec![kv("/f", 1), kv("/g", 9)], 2, false)]);
        assert_eq!(m.kvs.iter().map(|k| k.create_revision).collect::<Vec<_>>(), vec![9, 5, 2]);
        let want = RangeRequest { count_only: true, limit: 0, ..want };
        let m = merge_ranges(&want, vec![part(vec![], 2, false), part(vec![], 3, false)]);
        assert_eq!((m.kvs.len(), m.count, m.more), (0, 5, false));
    }

    #[test]
    fn a_txn_is_rewritten_and_its_answer_restored() {
        use request_op::Request;
        use response_op::Response;
        let mut txn = TxnRequest {
            compare: vec![Compare { key: b("/etcd-squeeze/trainer"), ..Default::default() }],
            success: vec![
                RequestOp { request: Some(Request::RequestRange(RangeRequest { key: b("/"), range_end: b("0"), ..Default::default() })) },
                RequestOp { request: Some(Request::RequestDeleteRange(DeleteRangeRequest { key: b("/x"), ..Default::default() })) },
            ],
            failure: vec![],
        };
        let plan = plan_txn(&mut txn).unwrap();
        assert_eq!(txn.compare[0].key, absent_key());
        assert_eq!(txn.success.len(), 3);
        let range = |keys: &[&str]| ResponseOp {
            response: Some(Response::ResponseRange(RangeResponse { kvs: keys.iter().map(|k| kv(k, 1)).collect(), count: keys.len() as i64, ..Default::default() })),
        };
        let mut resp = TxnResponse {
            succeeded: true,
            responses: vec![range(&["/a"]), range(&["/z"]), ResponseOp { response: Some(Response::ResponseDeleteRange(DeleteRangeResponse::default())) }],
            ..Default::default()
        };
        restore_txn(&plan, &mut resp).unwrap();
        assert_eq!(resp.responses.len(), 2);
        let Some(Response::ResponseRange(r)) = &resp.responses[0].response else { panic!() };
        assert_eq!((r.kvs.len(), r.count), (2, 2));
        // A Put into the reserved prefix is refused.
        let mut put = TxnRequest {
            success: vec![RequestOp { request: Some(Request::RequestPut(crate::proto::etcdserverpb::PutRequest { key: b("/etcd-squeeze/x"), ..Default::default() })) }],
            ..Default::default()
        };
        assert_eq!(plan_txn(&mut put).unwrap_err().code(), tonic::Code::InvalidArgument);
        // A range compare on both sides of the reserved keys is refused (etcd would compare the
        // whole range, not its parts); one inside or on one side is rewritten.
        let mut both = TxnRequest { compare: vec![Compare { key: b("/"), range_end: b("0"), ..Default::default() }], ..Default::default() };
        assert_eq!(plan_txn(&mut both).unwrap_err().message(), RESERVED_RANGE_COMPARE);
        let mut after = TxnRequest { compare: vec![Compare { key: b("/etcd-squeeze/x"), range_end: b("/z"), ..Default::default() }], ..Default::default() };
        plan_txn(&mut after).unwrap();
        assert_eq!(after.compare[0].key, b("/etcd-squeeze0"));
        // An answer shorter than the plan is an error, never a panic.
        let mut short = TxnResponse { succeeded: true, responses: vec![range(&["/a"])], ..Default::default() };
        assert!(restore_txn(&plan, &mut short).is_err());
    }
}
