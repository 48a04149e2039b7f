//! `etcdserverpb.Watch`: one upstream watch stream per client stream (never coalesced, so
//! progress requests and watch IDs keep etcd's per-stream meaning).
//!
//! Client → etcd: WatchRequests (create, cancel, progress) pass through as they are.
//! etcd → client: every WatchResponse passes through in order, with `events[].kv` and
//! `events[].prev_kv` decoded; created/canceled/compaction/progress responses are not merged,
//! split or dropped. When the upstream stream ends or fails, the client stream ends with the
//! same status (kube-apiserver then re-watches from its last revision).
//!
//! A response whose values cannot be decoded cancels only its own watch: the client gets
//! `canceled = true` with a `cancel_reason` naming the key, the proxy cancels that watch
//! upstream and drops whatever etcd still sends for it. Other watches on the stream (kube-apiserver
//! multiplexes every watch of a client on one stream) keep going.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::{decode_status, requests_until_dropped, with_metadata, Shared};
use crate::proto::etcdserverpb::watch_client::WatchClient;
use crate::proto::etcdserverpb::watch_server::Watch;
use crate::proto::etcdserverpb::{watch_request, WatchCancelRequest, WatchRequest, WatchResponse};
use crate::rewrite;
use crate::upstream::Upstream;

/// The Watch service.
#[derive(Clone)]
pub struct WatchService {
    shared: Arc<Shared>,
    client: WatchClient<Upstream>,
}

impl WatchService {
    /// A Watch service forwarding to `upstream`.
    pub fn new(shared: Arc<Shared>, upstream: Upstream) -> Self {
        let client = WatchClient::new(upstream).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX);
        WatchService { shared, client }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<Streaming<WatchRequest>>) -> Result<Response<Self::WatchStream>, Status> {
        let (metadata, _, inbound) = request.into_parts();
        // A client-side stream error (or half-close) ends what the client sends upstream; etcd
        // keeps the stream open for responses exactly as it does for a client that half-closes.
        // The proxy's own cancel requests (for watches it had to cancel) are merged in.
        let (cancel_tx, cancel_rx) = tokio::sync::mpsc::unbounded_channel::<WatchRequest>();
        let merged = futures::stream::select(
            inbound.map_while(|r| r.ok()),
            tokio_stream::wrappers::UnboundedReceiverStream::new(cancel_rx),
        );
        let (outbound, end_requests) = requests_until_dropped(merged);
        let (md, upstream, ext) = self.client.clone().watch(with_metadata(&metadata, outbound)).await?.into_parts();
        // First load the dictionaries a response's frames name (async, once per ID); one that
        // cannot be loaded shows up below as a decode error that cancels only its own watch.
        let loader = self.shared.clone();
        let loaded = futures::StreamExt::then(upstream, move |item| {
            let shared = loader.clone();
            async move {
                let mut resp = item?;
                if let Err(status) = shared.dictionaries.prefetch(&mut resp).await {
                    tracing::warn!(error = %status, "cannot load a dictionary for a watch response");
                }
                // etcd unreachable while loading a base: the stream ends with etcd's status, and the
                // client re-watches from its last revision (not a DATA_LOSS cancel of the watch).
                let pinned = shared.deltas.prefetch_watch(&resp).await.inspect_err(|status| {
                    tracing::warn!(error = %status, "cannot load a base for a watch response: ending the stream");
                })?;
                Ok((resp, pinned))
            }
        });
        let shared = self.shared.clone();
        let open = OpenStream::new();
        let mut canceled_here = std::collections::HashSet::<i64>::new();
        let responses = loaded.filter_map(move |item: Result<(WatchResponse, Vec<_>), Status>| {
            // Both live as long as the response stream, and are dropped with it.
            let _guards = (&open, &end_requests);
            let (mut resp, pinned) = match item {
                Ok(loaded) => loaded,
                Err(status) => return Some(Err(status)),
            };
            if canceled_here.contains(&resp.watch_id) {
                // Already canceled towards the client: drop what etcd still sends, up to and
                // including its own cancel confirmation (after which the ID may be reused).
                if resp.canceled {
                    canceled_here.remove(&resp.watch_id);
                }
                return None;
            }
            crate::metrics::get().watch_events.inc_by(resp.events.len() as u64);
            shared.deltas.learn_from(&mut resp);
            match rewrite::decode_with(&shared.codec, &mut resp, &pinned) {
                Ok(()) => Some(Ok(resp)),
                Err(e) => {
                    let reason = decode_status(e).message().to_string();
                    canceled_here.insert(resp.watch_id);
                    let cancel = watch_request::RequestUnion::CancelRequest(WatchCancelRequest { watch_id: resp.watch_id });
                    let _ = cancel_tx.send(WatchRequest { request_union: Some(cancel) });
                    Some(Ok(WatchResponse {
                        header: resp.header,
                        watch_id: resp.watch_id,
                        canceled: true,
                        cancel_reason: reason,
                        ..Default::default()
                    }))
                }
            }
        });
        Ok(Response::from_parts(md, Box::pin(responses) as WatchStream, ext))
    }
}

/// Counts a client Watch stream in `etcd_squeeze_watch_streams_active` while it is open.
struct OpenStream;

impl OpenStream {
    fn new() -> Self {
        crate::metrics::get().watch_streams_active.inc();
        OpenStream
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        crate::metrics::get().watch_streams_active.dec();
    }
}
