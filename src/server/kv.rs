//! `etcdserverpb.KV`: Range, RangeStream, Put, DeleteRange, Txn, Compact.
//!
//! Each method reads top to bottom: encode values in the request, forward with the client's
//! metadata, decode values in the response. Upstream statuses pass through untouched.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::{applied_decode_status, decode_status, encode_status, forward, with_metadata, Shared};
use crate::proto::etcdserverpb::kv_client::KvClient;
use crate::proto::etcdserverpb::kv_server::Kv;
use crate::proto::etcdserverpb::{
    compare, range_request, request_op, response_op, CompactionRequest, CompactionResponse, Compare, DeleteRangeRequest,
    DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, RangeStreamResponse, RequestOp,
    TxnRequest, TxnResponse,
};
use crate::rewrite::{self, EncodeStats};
use crate::upstream::Upstream;

/// The KV service: a [`KvClient`] toward etcd plus the shared codec.
#[derive(Clone)]
pub struct KvService {
    shared: Arc<Shared>,
    client: KvClient<Upstream>,
}

impl KvService {
    /// A KV service forwarding to `upstream`; upstream messages may be of any size.
    pub fn new(shared: Arc<Shared>, upstream: Upstream) -> Self {
        let client = KvClient::new(upstream).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX);
        KvService { shared, client }
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
        for _ in 0..attempts {
            let mut guards: Vec<Compare> = Vec::new();
            let mut fixed: Vec<Compare> = Vec::new();
            for c in &compares {
                // Linearizable read of the compare's key range, at the current revision.
                let read = RangeRequest { key: c.key.clone(), range_end: c.range_end.clone(), ..Default::default() };
                let mut range = self.client.clone().range(with_metadata(metadata, read)).await?.into_inner();
                rewrite::decode_range(&self.shared.codec, &mut range).map_err(decode_status)?;
                let revision = range.header.as_ref().map_or(0, |h| h.revision);
                let values: Vec<_> = range.kvs.iter().map(|kv| kv.value.clone()).collect();
                let holds = rewrite::evaluate_value_compare(c, &values);
                let mod_compare = |result: compare::CompareResult, key: &bytes::Bytes, range_end: &bytes::Bytes, rev: i64| Compare {
                    result: result as i32,
                    target: compare::CompareTarget::Mod as i32,
                    key: key.clone(),
                    range_end: range_end.clone(),
                    target_union: Some(compare::TargetUnion::ModRevision(rev)),
                };
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
            let limit = self.shared.config.limits.max_txn_ops as usize;
            if guards.len() > limit {
                return Err(Status::invalid_argument(format!(
                    "etcd-squeeze: VALUE compares over compressed keys read {} keys; guarding them needs one compare each, over etcd's --max-txn-ops (limits.max_txn_ops = {limit})",
                    guards.len()
                )));
            }
            let mut inner = txn.clone();
            rewrite::replace_value_compares(&self.shared.codec, &mut inner, &mut fixed.into_iter());
            let mut stats = EncodeStats::default();
            rewrite::encode_txn(&self.shared.codec, &mut inner, &mut stats).map_err(encode_status)?;
            let outer = TxnRequest {
                compare: guards,
                success: vec![RequestOp { request: Some(request_op::Request::RequestTxn(inner)) }],
                failure: vec![],
            };
            let (md, mut resp, ext) = self.client.clone().txn(with_metadata(metadata, outer)).await?.into_parts();
            if !resp.succeeded {
                continue;
            }
            crate::metrics::get().record_encode(&stats);
            let Some(response_op::Response::ResponseTxn(mut inner_resp)) = resp.responses.pop().and_then(|r| r.response) else {
                return Err(Status::internal("etcd-squeeze: guarded Txn response carries no inner Txn response"));
            };
            inner_resp.header = resp.header;
            rewrite::decode_txn(&self.shared.codec, &mut inner_resp).map_err(|e| txn_decode_status(e, &inner_resp))?;
            return Ok(Response::from_parts(md, inner_resp, ext));
        }
        Err(Status::aborted(format!(
            "etcd-squeeze: the keys of a VALUE compare kept changing; gave up after {attempts} attempts"
        )))
    }
}

impl KvService {
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
        rewrite::decode_range(&self.shared.codec, &mut resp).map_err(decode_status)?;
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

/// [`decode_status`] for a Txn response: says the write was applied when the executed branch wrote.
fn txn_decode_status(e: crate::codec::DecodeError, resp: &TxnResponse) -> Status {
    fn wrote(resp: &TxnResponse) -> bool {
        resp.responses.iter().any(|op| match &op.response {
            Some(response_op::Response::ResponsePut(_) | response_op::Response::ResponseDeleteRange(_)) => true,
            Some(response_op::Response::ResponseTxn(inner)) => wrote(inner),
            _ => false,
        })
    }
    if wrote(resp) {
        applied_decode_status(e, resp.header.as_ref())
    } else {
        decode_status(e)
    }
}

type RangeStreamStream = Pin<Box<dyn Stream<Item = Result<RangeStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, request: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let r = request.get_ref();
        if r.sort_target == range_request::SortTarget::Value as i32 && !r.count_only && self.shared.codec.range_touches_prefix(&r.key, &r.range_end) {
            return self.range_sorted_by_value(request).await;
        }
        let response = self.client.clone().range(forward(request)).await?;
        let (md, mut resp, ext) = response.into_parts();
        rewrite::decode_range(&self.shared.codec, &mut resp).map_err(decode_status)?;
        Ok(Response::from_parts(md, resp, ext))
    }

    type RangeStreamStream = RangeStreamStream;

    /// etcd ≥ 3.7's streamed Range. Each chunk's kvs are decoded; an older etcd answers
    /// UNIMPLEMENTED itself, which passes through (kube-apiserver then falls back to Range).
    async fn range_stream(&self, request: Request<RangeRequest>) -> Result<Response<Self::RangeStreamStream>, Status> {
        let response = self.client.clone().range_stream(forward(request)).await?;
        let (md, upstream, ext) = response.into_parts();
        let shared = self.shared.clone();
        let chunks = decode_stream(upstream, move |chunk: &mut RangeStreamResponse| match chunk.range_response.as_mut() {
            Some(r) => rewrite::decode_range(&shared.codec, r),
            None => Ok(()),
        });
        Ok(Response::from_parts(md, Box::pin(chunks) as RangeStreamStream, ext))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let mut request = forward(request);
        let mut stats = EncodeStats::default();
        rewrite::encode_put(&self.shared.codec, request.get_mut(), &mut stats).map_err(encode_status)?;
        let (md, mut resp, ext) = self.client.clone().put(request).await?.into_parts();
        crate::metrics::get().record_encode(&stats);
        rewrite::decode_put(&self.shared.codec, &mut resp).map_err(|e| applied_decode_status(e, resp.header.as_ref()))?;
        Ok(Response::from_parts(md, resp, ext))
    }

    async fn delete_range(&self, request: Request<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
        let (md, mut resp, ext) = self.client.clone().delete_range(forward(request)).await?.into_parts();
        rewrite::decode_delete(&self.shared.codec, &mut resp).map_err(|e| applied_decode_status(e, resp.header.as_ref()))?;
        Ok(Response::from_parts(md, resp, ext))
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        if rewrite::has_value_compare(&self.shared.codec, request.get_ref()) {
            let (metadata, _, txn) = request.into_parts();
            return self.txn_with_value_compares(&metadata, txn).await;
        }
        let mut request = forward(request);
        let mut stats = EncodeStats::default();
        rewrite::encode_txn(&self.shared.codec, request.get_mut(), &mut stats).map_err(encode_status)?;
        let (md, mut resp, ext) = self.client.clone().txn(request).await?.into_parts();
        crate::metrics::get().record_encode(&stats);
        rewrite::decode_txn(&self.shared.codec, &mut resp).map_err(|e| txn_decode_status(e, &resp))?;
        Ok(Response::from_parts(md, resp, ext))
    }

    async fn compact(&self, request: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        self.client.clone().compact(forward(request)).await
    }
}

/// Maps an upstream response stream through a decoder; the first decode error ends the
/// stream with DATA_LOSS naming the key (no message is ever passed on half-decoded).
pub(crate) fn decode_stream<T, F>(upstream: Streaming<T>, mut decode: F) -> impl Stream<Item = Result<T, Status>> + Send
where
    T: Send + 'static,
    F: FnMut(&mut T) -> Result<(), crate::codec::DecodeError> + Send + 'static,
{
    let mut failed = false;
    upstream.map_while(move |item| {
        if failed {
            return None;
        }
        Some(item.and_then(|mut msg| match decode(&mut msg) {
            Ok(()) => Ok(msg),
            Err(e) => {
                failed = true;
                Err(decode_status(e))
            }
        }))
    })
}
