//! `etcdserverpb.Watch`, served on bytes: one upstream watch stream per client stream (never
//! coalesced, so progress requests and watch IDs keep etcd's per-stream meaning).
//!
//! Client → etcd: WatchRequests (create, cancel, progress) pass through as the client sent them.
//! Each create request is classified ([`crate::classify`]) as it passes: etcd answers the creates
//! of a stream in order (one `created` response each, failed ones included), so the proxy knows
//! which watch IDs can carry values under a prefix.
//! etcd → client: every WatchResponse passes through in order, as etcd's bytes; only the events of
//! watches that can carry framed values are decoded, in the wire bytes. Created, canceled,
//! compaction and progress responses are not merged, split or dropped. When the upstream stream
//! ends or fails, the client stream ends with the same status (kube-apiserver then re-watches).
//!
//! A response whose values cannot be decoded cancels only its own watch: the client gets
//! `canceled = true` with a `cancel_reason` naming the key, the proxy cancels that watch
//! upstream and drops whatever etcd still sends for it. Other watches on the stream
//! (kube-apiserver multiplexes every watch of a client on one stream) keep going.

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use http::uri::PathAndQuery;
use prost::Message;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};

use super::raw::{self, RawCodec, SplicedCodec};
use super::values::{self, Failure};
use super::metadata::{forward, requests_until_dropped};
use super::shared::Shared;
use super::status::decode_status;
use crate::classify::{classify, Call, Route};
use crate::proto::etcdserverpb::{watch_request, ResponseHeader, WatchCancelRequest, WatchRequest, WatchResponse};
use crate::upstream::Upstream;
use crate::wire::{self, Spliced, Value};

const WATCH_PATH: &str = "/etcdserverpb.Watch/Watch";

/// The Watch service.
#[derive(Clone)]
pub struct WatchService {
    shared: Arc<Shared>,
    upstream: Upstream,
}

impl WatchService {
    /// A Watch service forwarding to `upstream`.
    pub fn new(shared: Arc<Shared>, upstream: Upstream) -> Self {
        WatchService { shared, upstream }
    }
}

impl NamedService for WatchService {
    const NAME: &'static str = "etcdserverpb.Watch";
}

impl tower::Service<http::Request<Body>> for WatchService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            if req.uri().path() != WATCH_PATH {
                return Ok(Status::unimplemented("").into_http());
            }
            let mut grpc = this.shared.grpc(SplicedCodec);
            Ok(grpc.streaming(this, req).await)
        })
    }
}

/// What one client stream knows of its watches.
struct StreamState {
    /// For each create request sent upstream and not yet answered: can its watch carry framed
    /// values, can it see the proxy's own keys, and its start_revision?
    /// Involved ones hold a provisional floor until answered (their start, or the compaction
    /// known when sent: etcd starts a watch from "now" no lower), so that no base their first
    /// events need is collected meanwhile.
    pending_creates: VecDeque<(bool, bool, i64, i64)>,
    /// For each watch whose events are decoded: the lowest revision an event of it can still
    /// have (after its last event, or its start). Their minimum is this stream's entry in the
    /// replica's watch floors ([`crate::members`]): bases such events need are not collected.
    floors: std::collections::HashMap<i64, i64>,
    floor: crate::members::FloorEntry,
    /// Watch IDs whose events are decoded.
    involved: HashSet<i64>,
    /// Watch IDs whose range reaches into `/etcd-squeeze/` (their events of those keys are dropped).
    sees_reserved: HashSet<i64>,
    /// Watches the proxy canceled (a value it could not decode): what etcd still sends is dropped.
    canceled_here: HashSet<i64>,
}

/// The top-level fields of a WatchResponse the proxy reads: watch_id = 2, created = 3,
/// canceled = 4, events = 11.
#[derive(Default)]
struct Top {
    watch_id: i64,
    created: bool,
    canceled: bool,
    events: u64,
}

fn read_top(msg: &[u8]) -> Result<Top, wire::WireError> {
    let mut top = Top::default();
    for f in wire::fields(msg) {
        let f = f?;
        match (f.number, f.value) {
            (2, Value::Varint(v)) => top.watch_id = v as i64,
            (3, Value::Varint(v)) => top.created = v != 0,
            (4, Value::Varint(v)) => top.canceled = v != 0,
            (11, Value::Bytes(_)) => top.events += 1,
            _ => {}
        }
    }
    Ok(top)
}

impl tonic::server::StreamingService<Bytes> for WatchService {
    type Response = Spliced;
    type ResponseStream = BoxStream<'static, Result<Spliced, Status>>;
    type Future = BoxFuture<'static, Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
        let this = self.clone();
        let state = Arc::new(Mutex::new(StreamState {
            pending_creates: VecDeque::new(),
            floors: Default::default(),
            floor: this.shared.deltas.members().floors.register(),
            involved: HashSet::new(),
            sees_reserved: HashSet::new(),
            canceled_here: HashSet::new(),
        }));
        let (metadata, _, inbound) = request.into_parts();
        // A client-side stream error (or half-close) ends what the client sends upstream; etcd
        // keeps the stream open for responses exactly as it does for a client that half-closes.
        // Each create is classified as it is sent; the proxy's own cancel requests are merged in.
        let (shared, creates) = (this.shared.clone(), state.clone());
        let classified = tokio_stream::StreamExt::map_while(inbound, |r| r.ok()).map(move |request: Bytes| {
            if let Some(create) = create_request(&request) {
                let route = classify(Call::WatchCreate, create, &shared.scope);
                let reserved = matches!(route, Route::Rewrite(needs) if needs.reserved);
                let start = varint_field(create, 3).unwrap_or(0) as i64;
                let provisional = if start > 0 { start } else { shared.deltas.members().compacted() };
                let mut st = lock(&creates);
                st.pending_creates.push_back((route != Route::Forward, reserved, start, provisional));
                st.republish();
            }
            request
        });
        let (cancel_tx, cancel_rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let merged = futures::stream::select(classified, tokio_stream::wrappers::UnboundedReceiverStream::new(cancel_rx));
        let (outbound, end_requests) = requests_until_dropped(merged);
        Box::pin(async move {
            let path = PathAndQuery::from_static(WATCH_PATH);
            let mut upstream = raw::client(this.upstream.clone()).await?;
            let request = forward(Request::from_parts(metadata, Default::default(), outbound));
            let (md, responses, ext) = upstream.streaming(request, path, RawCodec).await?.into_parts();
            let open = OpenStream::new();
            let shared = this.shared.clone();
            let (lapsed, ended) = announcement_lapsed(this.shared.deltas.members().lost_signal(), state.clone());
            let responses = responses
                .then(move |item| {
                    // Both live as long as the response stream, and are dropped with it.
                    let _guards = (&open, &end_requests);
                    respond(shared.clone(), state.clone(), cancel_tx.clone(), item)
                })
                .filter_map(std::future::ready);
            // Cut when the announcement lapses, then that status; else as etcd ends it.
            let responses = responses.take_until(lapsed).chain(futures::stream::once(async move { ended.lock().unwrap_or_else(|p| p.into_inner()).take().map(Err) }).filter_map(std::future::ready));
            Ok(Response::from_parts(md, responses.boxed(), ext))
        })
    }
}

/// Ends a stream whose watches decode delta frames with UNAVAILABLE when this replica's
/// announcement may have lapsed ([`crate::members::Members::lost_signal`]): other replicas may
/// then collect bases below its watch floor. The client re-watches (kube-apiserver does, from
/// its last resourceVersion), at a revision etcd still serves. Returns the future that resolves
/// then, and the status to end with once it did.
fn announcement_lapsed(mut lost: tokio::sync::watch::Receiver<u64>, state: Arc<Mutex<StreamState>>) -> (BoxFuture<'static, ()>, Arc<Mutex<Option<Status>>>) {
    let ended = Arc::new(Mutex::new(None));
    let status = ended.clone();
    let lapsed = async move {
        loop {
            if lost.changed().await.is_err() {
                return futures::future::pending().await;
            }
            if lock(&state).decodes() {
                let message = "etcd-squeeze: this replica's announcement to the other replicas lapsed; watches of delta-frame prefixes restart";
                *status.lock().unwrap_or_else(|p| p.into_inner()) = Some(Status::unavailable(message));
                return;
            }
        }
    };
    (Box::pin(lapsed), ended)
}

/// The `create_request` (field 1) of a WatchRequest, if it is one. A request that cannot be read
/// is forwarded as it is: etcd refuses it.
fn create_request(request: &[u8]) -> Option<&[u8]> {
    let mut create = None;
    for f in wire::fields(request) {
        match f {
            Ok(wire::Field { number: 1, value: Value::Bytes(r), .. }) => create = Some(r),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    create.map(|r| &request[r])
}

impl StreamState {
    /// Sets (or clears) a watch's floor and republishes the stream's lowest.
    fn set_floor(&mut self, watch_id: i64, floor: Option<i64>) {
        match floor {
            Some(f) => self.floors.insert(watch_id, f),
            None => self.floors.remove(&watch_id),
        };
        self.republish();
    }

    /// True when some watch of the stream decodes delta frames, or a create that may is unanswered.
    fn decodes(&self) -> bool {
        !self.floors.is_empty() || self.pending_creates.iter().any(|c| c.0)
    }

    /// Publishes the stream's lowest floor: its watches', and its unanswered creates'.
    fn republish(&mut self) {
        let pending = self.pending_creates.iter().filter(|c| c.0).map(|c| c.3);
        self.floor.set(self.floors.values().copied().chain(pending).min());
    }
}

/// The varint field `number` of a message, if present and readable.
fn varint_field(msg: &[u8], number: u32) -> Option<u64> {
    wire::fields(msg).filter_map(Result::ok).find_map(|f| match (f.number == number, f.value) {
        (true, Value::Varint(v)) => Some(v),
        _ => None,
    })
}

/// The sub-message field `number` of a message (the last one, as protobuf merges).
fn message_field(msg: &[u8], number: u32) -> Option<&[u8]> {
    let mut out = None;
    for f in wire::fields(msg) {
        if let Ok(wire::Field { number: n, value: Value::Bytes(r), .. }) = f {
            if n == number {
                out = Some(&msg[r]);
            }
        }
    }
    out
}

/// A WatchResponse's `header.revision` (field 1, then 3).
fn header_revision(msg: &[u8]) -> Option<i64> {
    message_field(msg, 1).and_then(|h| varint_field(h, 3)).map(|r| r as i64)
}

/// The `kv.mod_revision` of a WatchResponse's last event (events = 11, kv = 2, mod_revision = 3).
fn last_event_revision(msg: &[u8]) -> Option<i64> {
    message_field(msg, 11).and_then(|e| message_field(e, 2)).and_then(|kv| varint_field(kv, 3)).map(|r| r as i64)
}

fn lock(state: &Mutex<StreamState>) -> std::sync::MutexGuard<'_, StreamState> {
    // A std Mutex: nothing awaits while it is held. A poisoned one still holds consistent sets.
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One response from etcd: passed on as it is, decoded, dropped (a watch canceled here), or
/// replaced by a cancel of its watch.
async fn respond(
    shared: Arc<Shared>,
    state: Arc<Mutex<StreamState>>,
    cancel_tx: tokio::sync::mpsc::UnboundedSender<Bytes>,
    item: Result<Bytes, Status>,
) -> Option<Result<Spliced, Status>> {
    let bytes = match item {
        Ok(bytes) => bytes,
        Err(status) => return Some(Err(status)),
    };
    let top = match read_top(&bytes) {
        Ok(top) => top,
        Err(e) => return Some(Err(Status::from(Failure::from(e)))),
    };
    let (decode, reserved) = {
        let mut st = lock(&state);
        if top.created {
            // No pending create (not expected): decode and filter, to be safe.
            let (involved, reserved, start, _) = st.pending_creates.pop_front().unwrap_or((true, true, 0, 0));
            st.republish();
            if involved && !top.canceled {
                st.involved.insert(top.watch_id);
                // A watch from "now" starts after the revision its created response carries.
                let floor = if start > 0 { start } else { header_revision(&bytes).map_or(0, |r| r + 1) };
                st.set_floor(top.watch_id, Some(floor));
            }
            if reserved {
                st.sees_reserved.insert(top.watch_id);
            }
        }
        if st.canceled_here.contains(&top.watch_id) {
            // Already canceled towards the client: drop what etcd still sends, up to and
            // including its own cancel confirmation (after which the ID may be reused).
            if top.canceled {
                st.canceled_here.remove(&top.watch_id);
                st.involved.remove(&top.watch_id);
                st.sees_reserved.remove(&top.watch_id);
            }
            return None;
        }
        let decode = top.events > 0 && st.involved.contains(&top.watch_id);
        let reserved = decode && st.sees_reserved.contains(&top.watch_id);
        if top.canceled && !top.created {
            st.involved.remove(&top.watch_id);
            st.sees_reserved.remove(&top.watch_id);
            st.set_floor(top.watch_id, None);
        } else if decode {
            // The floor moves past these events once they are decoded (below).
        } else if top.events == 0 && !top.created && st.involved.contains(&top.watch_id) {
            // A timed progress notification of this watch: every event up to its revision was
            // sent. (Requested ones, watch ID -1, are not used: before etcd 3.4.25 and 3.5.8 they
            // could overtake events, etcd-io/etcd#15220.)
            if let Some(r) = header_revision(&bytes) {
                st.set_floor(top.watch_id, Some(r + 1));
            }
        }
        (decode, reserved)
    };
    crate::metrics::get().watch_events.inc_by(top.events);
    if !decode {
        return Some(Ok(Spliced::from(bytes)));
    }
    // The proxy's own keys do not exist through the client API: their events are dropped (only
    // watches whose range reaches them pay the extra walk).
    let bytes = if reserved {
        match values::without_reserved_events(bytes) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return None,
            Err(failure) => return Some(Err(Status::from(failure))),
        }
    } else {
        bytes
    };
    let last = last_event_revision(&bytes);
    match values::decode_watch_response(&shared, bytes.clone()).await {
        Ok(decoded) => {
            // Decoded: no event of this watch below `last + 1` needs a base any more.
            if let Some(last) = last {
                let mut st = lock(&state);
                if st.floors.contains_key(&top.watch_id) {
                    st.set_floor(top.watch_id, Some(last + 1));
                }
            }
            Some(Ok(decoded))
        }
        Err(Failure::Stored(e)) => {
            let reason = decode_status(e).message().to_string();
            let mut st = lock(&state);
            st.canceled_here.insert(top.watch_id);
            st.set_floor(top.watch_id, None);
            drop(st);
            let cancel = watch_request::RequestUnion::CancelRequest(WatchCancelRequest { watch_id: top.watch_id });
            let _ = cancel_tx.send(Bytes::from(WatchRequest { request_union: Some(cancel) }.encode_to_vec()));
            let header = wire::bytes_field(&bytes, 1).ok().and_then(|h| ResponseHeader::decode(h).ok());
            let canceled = WatchResponse { header, watch_id: top.watch_id, canceled: true, cancel_reason: reason, ..Default::default() };
            Some(Ok(Spliced::from(Bytes::from(canceled.encode_to_vec()))))
        }
        // etcd unreachable while loading a base: the stream ends with etcd's status, and the
        // client re-watches from its last revision (not a DATA_LOSS cancel of the watch).
        Err(failure) => {
            let status = Status::from(failure);
            static ENDED: crate::throttle::Throttle = crate::throttle::Throttle::new(std::time::Duration::from_secs(10));
            if let Some(left_out) = ENDED.allow() {
                tracing::warn!(error = %status, left_out, "cannot load a base for a watch response: ending the stream");
            }
            Some(Err(status))
        }
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
