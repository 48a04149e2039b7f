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
        // Values are encoded once; each attempt only clones (reference counts) and replaces compares.
        let mut txn = txn;
        self.shared.dictionaries.observe_txn(&txn);
        let mut stats = EncodeStats::default();
        rewrite::encode_txn(&self.shared.codec, &mut txn, &mut stats).map_err(encode_status)?;
        for _ in 0..attempts {
            let mut guards: Vec<Compare> = Vec::new();
            let mut fixed: Vec<Compare> = Vec::new();
            for c in &compares {
                // Linearizable read of the compare's key range, at the current revision.
                let read = RangeRequest { key: c.key.clone(), range_end: c.range_end.clone(), ..Default::default() };
                let mut range = self.client.clone().range(with_metadata(metadata, read)).await?.into_inner();
                decode_values(&self.shared, &mut range, plain_decode_status).await?;
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
            decode_values(&self.shared, &mut inner_resp, txn_decode_status).await?;
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
        decode_values(&self.shared, &mut resp, plain_decode_status).await?;
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

/// [`decode_status`], for [`decode_values`] when no write was applied.
fn plain_decode_status<T>(e: crate::codec::DecodeError, _: &T) -> Status {
    decode_status(e)
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
        decode_values(&self.shared, &mut resp, plain_decode_status).await?;
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
        let response = self.client.clone().range_stream(forward(request)).await?;
        let (md, upstream, ext) = response.into_parts();
        let chunks = decode_stream(self.shared.clone(), upstream);
        Ok(Response::from_parts(md, Box::pin(chunks) as RangeStreamStream, ext))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let mut request = forward(request);
        self.shared.dictionaries.observe(request.get_ref());
        let mut stats = EncodeStats::default();
        rewrite::encode_put(&self.shared.codec, request.get_mut(), &mut stats).map_err(encode_status)?;
        let (md, mut resp, ext) = self.client.clone().put(request).await?.into_parts();
        crate::metrics::get().record_encode(&stats);
        decode_values(&self.shared, &mut resp, |e, r: &PutResponse| applied_decode_status(e, r.header.as_ref())).await?;
        Ok(Response::from_parts(md, resp, ext))
    }

    async fn delete_range(&self, request: Request<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
        let (md, mut resp, ext) = self.client.clone().delete_range(forward(request)).await?.into_parts();
        decode_values(&self.shared, &mut resp, |e, r: &DeleteRangeResponse| applied_decode_status(e, r.header.as_ref())).await?;
        Ok(Response::from_parts(md, resp, ext))
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        if rewrite::has_value_compare(&self.shared.codec, request.get_ref()) {
            let (metadata, _, txn) = request.into_parts();
            return self.txn_with_value_compares(&metadata, txn).await;
        }
        let mut request = forward(request);
        self.shared.dictionaries.observe_txn(request.get_ref());
        let mut stats = EncodeStats::default();
        rewrite::encode_txn(&self.shared.codec, request.get_mut(), &mut stats).map_err(encode_status)?;
        let (md, mut resp, ext) = self.client.clone().txn(request).await?.into_parts();
        crate::metrics::get().record_encode(&stats);
        decode_values(&self.shared, &mut resp, txn_decode_status).await?;
        Ok(Response::from_parts(md, resp, ext))
    }

    async fn compact(&self, request: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        self.client.clone().compact(forward(request)).await
    }
}

/// Decodes every value of a response: first loads the dictionaries its frames name (async,
/// once per ID), then decodes synchronously. A value that cannot be decoded becomes the status
/// `status` makes of it (DATA_LOSS naming the key, and the dictionary ID when that is what is
/// missing); etcd being unreachable while loading a dictionary is etcd's own status.
pub(crate) async fn decode_values<T: KeyValues>(
    shared: &Shared,
    msg: &mut T,
    status: impl FnOnce(crate::codec::DecodeError, &T) -> Status,
) -> Result<(), Status> {
    shared.dictionaries.prefetch(msg).await?;
    rewrite::decode(&shared.codec, msg).map_err(|e| status(e, msg))
}

/// Decodes each message of an upstream response stream with [`decode_values`]; the first decode
/// error ends the stream with DATA_LOSS naming the key (no message is ever passed on half-decoded).
fn decode_stream<T>(shared: Arc<Shared>, upstream: Streaming<T>) -> impl Stream<Item = Result<T, Status>> + Send
where
    T: KeyValues + Send + 'static,
{
    let decoded = futures::StreamExt::then(upstream, move |item| {
        let shared = shared.clone();
        async move {
            match item {
                Ok(mut msg) => match decode_values(&shared, &mut msg, plain_decode_status).await {
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
