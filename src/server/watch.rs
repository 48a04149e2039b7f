//! `etcdserverpb.Watch`: one upstream watch stream per client stream (never coalesced, so
//! progress requests and watch IDs keep etcd's per-stream meaning).
//!
//! Client → etcd: WatchRequests (create, cancel, progress) pass through as they are.
//! etcd → client: every WatchResponse passes through in order, with `events[].kv` and
//! `events[].prev_kv` decoded; created/canceled/compaction/progress responses are not merged,
//! split or dropped. When the upstream stream ends or fails, the client stream ends with the
//! same status (kube-apiserver then re-watches from its last revision).

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::{requests_until_dropped, with_metadata, Shared};
use super::kv::decode_stream;
use crate::proto::etcdserverpb::watch_client::WatchClient;
use crate::proto::etcdserverpb::watch_server::Watch;
use crate::proto::etcdserverpb::{WatchRequest, WatchResponse};
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
        // A client-side stream error (or half-close) ends what we send upstream; etcd keeps the
        // stream open for responses exactly as it does for a client that half-closes.
        let (outbound, end_requests) = requests_until_dropped(inbound.map_while(|r| r.ok()));
        let (md, upstream, ext) = self.client.clone().watch(with_metadata(&metadata, outbound)).await?.into_parts();
        let shared = self.shared.clone();
        let open = OpenStream::new();
        let responses = decode_stream(upstream, move |resp: &mut WatchResponse| {
            // Both live as long as the response stream, and are dropped with it.
            let _guards = (&open, &end_requests);
            crate::metrics::get().watch_events.inc_by(resp.events.len() as u64);
            rewrite::decode_watch(&shared.codec, resp)
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
