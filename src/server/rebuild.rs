//! The rebuild road of `etcdserverpb.KV` (see [`super::kv`]): calls whose request the proxy must
//! change in shape, decoded with prost. Delta frames (a Put sent as a Txn that also writes a base,
//! a delete that also deletes the key's bases), VALUE compares on compressed keys (evaluated on
//! logical values under mod_revision guards), a Range sorted by VALUE, and requests the wire reader
//! could not read. Each method reads top to bottom: encode values in the request, forward with the
//! client's metadata, decode values in the response. Upstream statuses pass through untouched.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::metadata::{forward, with_metadata};
use super::reserved;
use super::shared::Shared;
use super::status::encode_status;
use crate::codec::delta::Base;
use crate::rewrite::KeyValues;
use crate::proto::etcdserverpb::kv_client::KvClient;
use crate::proto::etcdserverpb::kv_server::Kv;
use crate::proto::etcdserverpb::{
    compare, range_request, request_op, response_op, CompactionRequest, CompactionResponse, Compare, DeleteRangeRequest,
    DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, RangeStreamResponse, RequestOp,
    TxnRequest, TxnResponse,
};
use crate::rewrite::{self, EncodeStats};
use crate::upstream::Upstream;

/// The rebuild road: a [`KvClient`] toward etcd plus the shared codec.
#[derive(Clone)]
pub struct Rebuild {
    shared: Arc<Shared>,
    client: KvClient<Upstream>,
}

impl Rebuild {
    /// The rebuild road toward `upstream`; upstream messages may be of any size.
    pub fn new(shared: Arc<Shared>, upstream: Upstream) -> Self {
        let client = KvClient::new(upstream).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX);
        Rebuild { shared, client }
    }

    /// A Txn with VALUE compares on compressed keys. etcd would compare the stored frames, so
    /// the proxy evaluates those compares on the logical values it reads, then sends the Txn
    /// with each such compare replaced by one whose outcome is fixed, nested inside an outer
    /// Txn guarded by mod_revision compares on the keys it read. If a key changed in between,
    /// the guard fails and the proxy reads again (bounded by `limits.value_compare_attempts`).
    /// One Txn, one revision: atomic exactly as etcd's own compare (docs/frame-format.md).
    async fn txn_with_value_compares(&self, metadata: &tonic::metadata::MetadataMap, txn: TxnRequest) -> Result<Response<TxnResponse>, Status> {
        let attempts = self.shared.config.limits.value_compare_attempts;
        let compares = rewrite::value_compares(&self.shared.codec, &txn);
        self.shared.dictionaries.observe_txn(&txn);
        let limit = self.shared.config.limits.max_txn_ops as usize;
        // etcd gives the client's Txn, nested in the guard Txn, what the guards leave.
        let client_ops = txn.compare.len().max(txn.success.len()).max(txn.failure.len());
        // Values are encoded once per guard count (the operations delta frames may add must fit
        // in what the guards leave); each attempt only clones (reference counts) and replaces compares.
        let mut encoded: Option<(usize, TxnRequest, Option<crate::delta::Rewritten>, EncodeStats)> = None;
        for _ in 0..attempts {
            let mut guards: Vec<Compare> = Vec::new();
            let mut fixed: Vec<Compare> = Vec::new();
            for c in &compares {
                // Linearizable read of the compare's key range, at the current revision.
                let read = RangeRequest { key: c.key.clone(), range_end: c.range_end.clone(), ..Default::default() };
                let mut range = self.client.clone().range(with_metadata(metadata, read)).await?.into_inner();
                decode_values(&self.shared, &mut range, &[], &[], false).await?;
                let revision = range.header.as_ref().map_or(0, |h| h.revision);
                let values: Vec<_> = range.kvs.iter().map(|kv| kv.value.clone()).collect();
                let holds = rewrite::evaluate_value_compare(c, &values);
                let mod_compare = |result, key: &bytes::Bytes, range_end: &bytes::Bytes, rev| Compare::mod_revision(result, key.clone(), range_end.clone(), rev);
                if c.range_end.is_empty() {
                    // Single key: unchanged since the read (0 = still absent).
                    let m = range.kvs.first().map_or(0, |kv| kv.mod_revision);
                    guards.push(mod_compare(compare::CompareResult::Equal, &c.key, &c.range_end, m));
                } else {
                    // A range: no key modified or created after the read, none of those read deleted.
                    guards.push(mod_compare(compare::CompareResult::Less, &c.key, &c.range_end, revision + 1));
                    for kv in &range.kvs {
                        guards.push(mod_compare(compare::CompareResult::Equal, &kv.key, &bytes::Bytes::new(), kv.mod_revision));
                    }
                }
                // Under the guards every key in range has mod_revision <= revision, so
                // "mod < revision+1" is always true and "mod > revision" always false.
                fixed.push(if holds {
                    mod_compare(compare::CompareResult::Less, &c.key, &c.range_end, revision + 1)
                } else {
                    mod_compare(compare::CompareResult::Greater, &c.key, &c.range_end, revision)
                });
            }
            if guards.len() + client_ops > limit {
                return Err(Status::invalid_argument(format!(
                    "etcdserver: too many operations in txn request (etcd-squeeze: a VALUE compare over compressed keys is evaluated under {} guard compares in an enclosing Txn, where etcd's --max-txn-ops (limits.max_txn_ops = {limit}) leaves this Txn {} operations; it has {client_ops})",
                    guards.len(),
                    limit.saturating_sub(guards.len())
                )));
            }
            let budget = limit - guards.len();
            if encoded.as_ref().is_none_or(|(b, ..)| *b != budget) {
                let mut stats = EncodeStats::default();
                let (encoded_txn, rewritten) = self.encode(txn.clone(), budget, &mut stats).await?;
                encoded = Some((budget, encoded_txn, rewritten, stats));
            }
            let (_, encoded_txn, rewritten, stats) = encoded.as_ref().expect("encoded above");
            let mut inner = encoded_txn.clone();
            if rewrite::replace_value_compares(&self.shared.codec, &mut inner, &mut fixed.into_iter()) > 0 {
                return Err(Status::internal("etcd-squeeze: a VALUE compare was left without its evaluated replacement"));
            }
            let outer = TxnRequest {
                compare: guards,
                success: vec![RequestOp { request: Some(request_op::Request::RequestTxn(inner)) }],
                failure: vec![],
            };
            let (md, mut resp, ext) = self.client.clone().txn(with_metadata(metadata, outer)).await?.into_parts();
            if !resp.succeeded {
                continue;
            }
            crate::metrics::get().record_encode(stats);
            let Some(response_op::Response::ResponseTxn(mut inner_resp)) = resp.responses.pop().and_then(|r| r.response) else {
                return Err(Status::internal("etcd-squeeze: guarded Txn response carries no inner Txn response"));
            };
            inner_resp.header = resp.header;
            let pinned = self.finish(rewritten.as_ref(), &mut inner_resp);
            let mut read_revisions = vec![before(&inner_resp.header)];
            crate::delta::range_revisions(&txn, &mut read_revisions);
            let wrote = txn_wrote(&inner_resp);
            decode_values(&self.shared, &mut inner_resp, &read_revisions, pinned, wrote).await?;
            return Ok(Response::from_parts(md, inner_resp, ext));
        }
        Err(Status::aborted(format!(
            "etcd-squeeze: the keys of a VALUE compare kept changing; gave up after {attempts} attempts"
        )))
    }
}

impl Rebuild {
    /// Encodes the values of a Txn: through [`crate::delta::Deltas::rewrite`] when it writes or
    /// deletes a key with delta frames (the returned [`crate::delta::Rewritten`] must see the
    /// response; `budget` is etcd's `--max-txn-ops` for this Txn), else value by value.
    async fn encode(&self, mut txn: TxnRequest, budget: usize, stats: &mut EncodeStats) -> Result<(TxnRequest, Option<crate::delta::Rewritten>), Status> {
        if !self.shared.deltas.touches(&txn) {
            rewrite::encode_txn(&self.shared.codec, &mut txn, stats).map_err(encode_status)?;
            return Ok((txn, None));
        }
        let mut rewritten = self.shared.deltas.rewrite(txn, budget, stats).await?;
        Ok((std::mem::take(&mut rewritten.txn), Some(rewritten)))
    }

    /// etcd's `--max-txn-ops` (`limits.max_txn_ops`).
    fn max_txn_ops(&self) -> usize {
        self.shared.config.limits.max_txn_ops as usize
    }

    /// Hands a Txn response to the delta rewrite that produced its request (strips the added
    /// operations' responses) and returns the bases the write pinned.
    fn finish<'a>(&self, rewritten: Option<&'a crate::delta::Rewritten>, resp: &mut TxnResponse) -> &'a [Arc<Base>] {
        match rewritten {
            Some(r) => {
                self.shared.deltas.finish(r, resp);
                &r.pinned
            }
            None => &[],
        }
    }

    /// A top-level Put of a key with delta frames, sent as a Txn so its base can be written in the
    /// same revision: guarded by `MOD(K) == m` when the proxy knows K's version m (then a delta
    /// against its base), else, or when the guard fails, unguarded with a new base. The response
    /// is etcd's PutResponse shape: the Txn's header and the Put's prev_kv.
    async fn put_as_txn(&self, metadata: &tonic::metadata::MetadataMap, put: PutRequest) -> Result<Response<PutResponse>, Status> {
        self.shared.dictionaries.observe(&put);
        for guarded in [true, false] {
            let guard = if guarded { self.shared.deltas.guard_for(&put.key) } else { None };
            if guarded && guard.is_none() {
                continue;
            }
            let txn = TxnRequest {
                compare: guard.into_iter().collect(),
                success: vec![RequestOp { request: Some(request_op::Request::RequestPut(put.clone())) }],
                failure: vec![],
            };
            let mut stats = EncodeStats::default();
            let (txn, rewritten) = self.encode(txn, self.max_txn_ops(), &mut stats).await?;
            let (md, mut resp, ext) = match self.client.clone().txn(with_metadata(metadata, txn)).await {
                Ok(answer) => answer.into_parts(),
                // The Txn (value and base) is over etcd's gRPC receive limit, though the client's
                // Put may not be: etcd refused it unread. The value is written per object instead
                // (a Put the size of the client's), and etcd answers as it answers the client's
                // own request ("etcdserver: request is too large" when that is too large).
                Err(status) if per_object_instead(&status) => {
                    tracing::debug!(key = %crate::codec::KeyDisplay(&put.key), error = %status, "delta-frame Txn refused: written per object");
                    return self.put_per_object(with_metadata(metadata, put)).await;
                }
                Err(status) => return Err(status),
            };
            if !resp.succeeded {
                continue; // K changed since the proxy saw it: write a new base
            }
            crate::metrics::get().record_encode(&stats);
            let pinned = self.finish(rewritten.as_ref(), &mut resp);
            let prev_kv = match resp.responses.pop().and_then(|r| r.response) {
                Some(response_op::Response::ResponsePut(p)) => p.prev_kv,
                _ => return Err(Status::internal("etcd-squeeze: Txn response to a Put carries no Put response")),
            };
            let mut out = PutResponse { header: resp.header, prev_kv };
            let at = before(&out.header);
            decode_values(&self.shared, &mut out, &[at], pinned, true).await?;
            return Ok(Response::from_parts(md, out, ext));
        }
        // An unguarded Txn with no compare always succeeds; an etcd that says otherwise is answered
        // with an error, never a panic.
        Err(Status::internal("etcd-squeeze: etcd reported an unguarded Txn (no compare) as failed"))
    }

    /// A single-key DeleteRange of a key with delta frames, sent as a Txn that also deletes the
    /// key's bases; the response is etcd's DeleteRangeResponse shape.
    async fn delete_as_txn(&self, metadata: &tonic::metadata::MetadataMap, delete: DeleteRangeRequest) -> Result<Response<DeleteRangeResponse>, Status> {
        let txn = TxnRequest {
            success: vec![RequestOp { request: Some(request_op::Request::RequestDeleteRange(delete)) }],
            ..Default::default()
        };
        let mut stats = EncodeStats::default();
        let original = txn.clone();
        let (txn, rewritten) = self.encode(txn, self.max_txn_ops(), &mut stats).await?;
        let (md, mut resp, ext, rewritten) = match self.client.clone().txn(with_metadata(metadata, txn)).await {
            Ok(answer) => {
                let (md, resp, ext) = answer.into_parts();
                (md, resp, ext, rewritten)
            }
            // The bases cannot be deleted with the client's credentials: delete the key alone
            // (its bases are left to the orphan sweep), as etcd would.
            Err(status) if per_object_instead(&status) => {
                let (md, resp, ext) = self.client.clone().txn(with_metadata(metadata, original)).await?.into_parts();
                (md, resp, ext, None)
            }
            Err(status) => return Err(status),
        };
        let pinned = self.finish(rewritten.as_ref(), &mut resp);
        let (deleted, prev_kvs) = match resp.responses.pop().and_then(|r| r.response) {
            Some(response_op::Response::ResponseDeleteRange(d)) => (d.deleted, d.prev_kvs),
            _ => return Err(Status::internal("etcd-squeeze: Txn response to a DeleteRange carries no DeleteRange response")),
        };
        let mut out = DeleteRangeResponse { header: resp.header, deleted, prev_kvs };
        let at = before(&out.header);
        decode_values(&self.shared, &mut out, &[at], pinned, true).await?;
        Ok(Response::from_parts(md, out, ext))
    }
}

/// The answers to the parts of a Range or DeleteRange sent as one Txn ([`reserved::parts`]).
fn parts_answers<T>(resp: TxnResponse, what: &str, pick: impl Fn(response_op::Response) -> Option<T>) -> Result<Vec<T>, Status> {
    resp.responses
        .into_iter()
        .map(|op| op.response.and_then(&pick).ok_or_else(|| Status::internal(format!("etcd-squeeze: etcd answered a {what} part with another response"))))
        .collect()
}

/// etcd refused a Txn the proxy built with delta frames before applying anything, for what
/// delta frames added to the client's request: the write is then sent per object, and etcd
/// answers the client's own request. The refusals: grpc-go's receive limit (etcd's
/// `--max-request-bytes` plus 512 KiB), etcd's "request is too large" (the base added bytes),
/// and PERMISSION_DENIED (the client's etcd role cannot write `/etcd-squeeze/bases/`).
fn per_object_instead(status: &Status) -> bool {
    (status.code() == tonic::Code::ResourceExhausted && status.message().starts_with("grpc: received message larger than max"))
        || (status.code() == tonic::Code::InvalidArgument && status.message() == super::status::ETCD_REQUEST_TOO_LARGE)
        || status.code() == tonic::Code::PermissionDenied
}

/// The revision just before the one in `header`: where a write's prev_kvs were current.
fn before(header: &Option<crate::proto::etcdserverpb::ResponseHeader>) -> i64 {
    header.as_ref().map_or(0, |h| h.revision - 1)
}

impl Rebuild {
    /// A Range sorted by VALUE over compressed keys: etcd would sort by the stored frames. The
    /// proxy reads the whole range unsorted and unlimited, decodes, then sorts and limits the
    /// way etcd's `Range` does (sort before `keys_only`; NONE order means ASCEND for a non-KEY
    /// target; `more` set when the limit cut the result; `count` is etcd's). Sorting inside a
    /// Txn is not rewritten (one Txn cannot be split).
    async fn range_sorted_by_value(&self, request: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let (metadata, _, want) = request.into_parts();
        let read = RangeRequest {
            limit: 0,
            sort_order: range_request::SortOrder::None as i32,
            sort_target: range_request::SortTarget::Key as i32,
            keys_only: false,
            ..want.clone()
        };
        let (md, mut resp, ext) = self.client.clone().range(with_metadata(&metadata, read)).await?.into_parts();
        decode_values(&self.shared, &mut resp, &[want.revision], &[], false).await?;
        resp.kvs.sort_by(|a, b| a.value.cmp(&b.value));
        if want.sort_order == range_request::SortOrder::Descend as i32 {
            resp.kvs.reverse();
        }
        if want.limit > 0 && resp.kvs.len() > want.limit as usize {
            resp.kvs.truncate(want.limit as usize);
            resp.more = true;
        }
        if want.keys_only {
            resp.kvs.iter_mut().for_each(|kv| kv.value = bytes::Bytes::new());
        }
        Ok(Response::from_parts(md, resp, ext))
    }
}

/// True when a Txn's executed branch wrote (a Put or DeleteRange response at any depth): etcd
/// applied the Txn, so its answer must not become an error.
fn txn_wrote(resp: &TxnResponse) -> bool {
    resp.responses.iter().any(|op| match &op.response {
        Some(response_op::Response::ResponsePut(_) | response_op::Response::ResponseDeleteRange(_)) => true,
        Some(response_op::Response::ResponseTxn(inner)) => txn_wrote(inner),
        _ => false,
    })
}

type RangeStreamStream = Pin<Box<dyn Stream<Item = Result<RangeStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Kv for Rebuild {
    async fn range(&self, request: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let r = request.get_ref();
        if reserved::touches(&r.key, &r.range_end) {
            return self.range_without_reserved(request).await;
        }
        if r.sort_target == range_request::SortTarget::Value as i32 && !r.count_only && self.shared.codec.range_touches_prefix(&r.key, &r.range_end) {
            return self.range_sorted_by_value(request).await;
        }
        let read_revision = r.revision;
        let response = self.client.clone().range(forward(request)).await?;
        let (md, mut resp, ext) = response.into_parts();
        decode_values(&self.shared, &mut resp, &[read_revision], &[], false).await?;
        Ok(Response::from_parts(md, resp, ext))
    }

    type RangeStreamStream = RangeStreamStream;

    /// etcd ≥ 3.7's streamed Range. Each chunk's kvs are decoded; an older etcd answers
    /// UNIMPLEMENTED itself, which passes through (kube-apiserver then falls back to Range).
    async fn range_stream(&self, request: Request<RangeRequest>) -> Result<Response<Self::RangeStreamStream>, Status> {
        let r = request.get_ref();
        if r.sort_target == range_request::SortTarget::Value as i32 && self.shared.codec.range_touches_prefix(&r.key, &r.range_end) {
            // etcd would sort chunks by the stored frames: refuse rather than return a wrong order.
            return Err(Status::invalid_argument(
                "etcd-squeeze: RangeStream sorted by VALUE over compressed keys is not supported; use Range",
            ));
        }
        let read_revision = r.revision;
        let response = self.client.clone().range_stream(forward(request)).await?;
        let (md, upstream, ext) = response.into_parts();
        let chunks = decode_stream(self.shared.clone(), upstream, read_revision);
        Ok(Response::from_parts(md, Box::pin(chunks) as RangeStreamStream, ext))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let r = request.get_ref();
        if r.key.starts_with(crate::classify::RESERVED_PREFIX) {
            return Err(Status::invalid_argument(reserved::RESERVED_WRITE));
        }
        // Leased values are never delta frames (src/delta): those Puts stay Puts.
        if !r.ignore_value && r.lease == 0 && !r.ignore_lease && self.shared.deltas.applies_to(&r.key) {
            let (metadata, _, put) = request.into_parts();
            return self.put_as_txn(&metadata, put).await;
        }
        self.put_per_object(forward(request)).await
    }

    async fn delete_range(&self, request: Request<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
        let r = request.get_ref();
        if reserved::touches(&r.key, &r.range_end) {
            return self.delete_without_reserved(request).await;
        }
        if r.range_end.is_empty() && self.shared.deltas.has_bases(&r.key) {
            let (metadata, _, delete) = request.into_parts();
            return self.delete_as_txn(&metadata, delete).await;
        }
        let (md, mut resp, ext) = self.client.clone().delete_range(forward(request)).await?.into_parts();
        let at = before(&resp.header);
        decode_values(&self.shared, &mut resp, &[at], &[], true).await?;
        Ok(Response::from_parts(md, resp, ext))
    }

    /// The client's Txn with its key ranges cut around the proxy's own keys and its Ranges sorted
    /// by VALUE read unsorted ([`reserved::plan_txn`]); the answer is put back in its shape.
    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let (metadata, ext, mut txn) = request.into_parts();
        let plan = reserved::plan_txn(&mut txn)?;
        let (md, mut resp, ext) = self.txn_planned(Request::from_parts(metadata, ext, txn)).await?.into_parts();
        reserved::restore_txn(&plan, &mut resp)?;
        Ok(Response::from_parts(md, resp, ext))
    }

    async fn compact(&self, request: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        let revision = request.get_ref().revision;
        let response = self.client.clone().compact(forward(request)).await?;
        self.shared.deltas.observe_compaction(revision);
        Ok(response)
    }
}

impl Rebuild {
    /// A Put written as one frame (per object): values of keys without delta frames, leased
    /// values, and delta-frame writes too large for etcd with their base.
    async fn put_per_object(&self, mut request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        self.shared.dictionaries.observe(request.get_ref());
        let mut stats = EncodeStats::default();
        rewrite::encode_put(&self.shared.codec, request.get_mut(), &mut stats).map_err(encode_status)?;
        let (md, mut resp, ext) = self.client.clone().put(request).await?.into_parts();
        crate::metrics::get().record_encode(&stats);
        let at = before(&resp.header);
        decode_values(&self.shared, &mut resp, &[at], &[], true).await?;
        Ok(Response::from_parts(md, resp, ext))
    }

    /// A Range over a range that reaches into `/etcd-squeeze/`: its parts read in one Txn (one
    /// revision) and put back together as etcd answers the client's range without those keys.
    async fn range_without_reserved(&self, request: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let (metadata, ext, want) = request.into_parts();
        let success = reserved::range_parts(&want)
            .into_iter()
            .map(|r| RequestOp { request: Some(request_op::Request::RequestRange(r)) })
            .collect();
        let txn = TxnRequest { success, ..Default::default() };
        let (md, resp, ext) = self.txn(Request::from_parts(metadata, ext, txn)).await?.into_parts();
        let header = resp.header;
        let answers = parts_answers(resp, "Range", |r| match r {
            response_op::Response::ResponseRange(r) => Some(r),
            _ => None,
        })?;
        let mut merged = reserved::merge_ranges(&want, answers);
        merged.header = header;
        Ok(Response::from_parts(md, merged, ext))
    }

    /// A DeleteRange over a range that reaches into `/etcd-squeeze/`: its parts deleted in one Txn
    /// (one revision, etcd's count of what it deleted); the proxy's keys stay.
    async fn delete_without_reserved(&self, request: Request<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
        let (metadata, ext, want) = request.into_parts();
        let cut = reserved::parts(&want.key, &want.range_end);
        let n = cut.len();
        let success = cut
            .into_iter()
            .map(|(key, range_end)| RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest { key, range_end, ..want.clone() })),
            })
            .collect();
        let txn = TxnRequest { success, ..Default::default() };
        let (md, resp, ext) = self.txn(Request::from_parts(metadata, ext, txn)).await?.into_parts();
        let header = resp.header;
        let answers = parts_answers(resp, "DeleteRange", |r| match r {
            response_op::Response::ResponseDeleteRange(d) => Some(d),
            _ => None,
        })?;
        Ok(Response::from_parts(md, reserved::merge_deletes(header, n, answers), ext))
    }

    /// A Txn (already planned): VALUE compares, values and delta frames, decoded answer.
    async fn txn_planned(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        if rewrite::has_value_compare(&self.shared.codec, request.get_ref()) {
            let (metadata, _, txn) = request.into_parts();
            return self.txn_with_value_compares(&metadata, txn).await;
        }
        let mut request = forward(request);
        self.shared.dictionaries.observe_txn(request.get_ref());
        // The revisions the Txn's Ranges read at: a base deleted since is still there.
        let mut read_revisions = Vec::new();
        crate::delta::range_revisions(request.get_ref(), &mut read_revisions);
        let mut stats = EncodeStats::default();
        // Kept to be written per object if etcd refuses what delta frames add (see `per_object_instead`).
        let original = self.shared.deltas.touches(request.get_ref()).then(|| (request.metadata().clone(), request.get_ref().clone()));
        let (txn, rewritten) = self.encode(std::mem::take(request.get_mut()), self.max_txn_ops(), &mut stats).await?;
        *request.get_mut() = txn;
        let (md, mut resp, ext, rewritten) = match (self.client.clone().txn(request).await, original) {
            (Ok(answer), _) => {
                let (md, resp, ext) = answer.into_parts();
                (md, resp, ext, rewritten)
            }
            (Err(status), Some((metadata, mut txn))) if per_object_instead(&status) => {
                tracing::debug!(error = %status, "delta-frame Txn refused: written per object");
                stats = EncodeStats::default();
                rewrite::encode_txn(&self.shared.codec, &mut txn, &mut stats).map_err(encode_status)?;
                let (md, resp, ext) = self.client.clone().txn(with_metadata(&metadata, txn)).await?.into_parts();
                (md, resp, ext, None)
            }
            (Err(status), _) => return Err(status),
        };
        crate::metrics::get().record_encode(&stats);
        let pinned = self.finish(rewritten.as_ref(), &mut resp);
        read_revisions.push(before(&resp.header));
        let wrote = txn_wrote(&resp);
        decode_values(&self.shared, &mut resp, &read_revisions, pinned, wrote).await?;
        Ok(Response::from_parts(md, resp, ext))
    }
}

/// Decodes every value of a response ([`super::values::decode_in_place`]). `read_revisions`:
/// the revisions the values were read at when older than the current one (a Range's
/// `revision`; the revision before a write for its prev_kvs), where a base deleted since is
/// still found; `pinned` are bases the caller already holds; `applied`: a write etcd applied.
pub(crate) async fn decode_values<T: KeyValues>(
    shared: &Shared,
    msg: &mut T,
    read_revisions: &[i64],
    pinned: &[Arc<Base>],
    applied: bool,
) -> Result<(), Status> {
    super::values::decode_in_place(shared, msg, pinned, applied, |msg| shared.deltas.needs(msg, read_revisions)).await.map_err(Status::from)
}

/// Decodes each message of an upstream response stream with [`decode_values`]; the first decode
/// failure (a response over the budget) ends the stream with its status (no message is ever
/// passed on half-decoded).
fn decode_stream<T>(shared: Arc<Shared>, upstream: Streaming<T>, read_revision: i64) -> impl Stream<Item = Result<T, Status>> + Send
where
    T: KeyValues + Send + 'static,
{
    let decoded = futures::StreamExt::then(upstream, move |item| {
        let shared = shared.clone();
        async move {
            match item {
                Ok(mut msg) => match decode_values(&shared, &mut msg, &[read_revision], &[], false).await {
                    Ok(()) => (Ok(msg), false),
                    Err(status) => (Err(status), true),
                },
                Err(status) => (Err(status), false),
            }
        }
    });
    let mut failed = false;
    decoded.map_while(move |(item, decode_failed)| {
        if failed {
            return None;
        }
        failed = decode_failed;
        Some(item)
    })
}
