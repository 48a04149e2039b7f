//! The HTTP/2 relay: one client connection carried to etcd on one connection of its own, frame
//! by frame, in one task.
//!
//! kube-apiserver multiplexes every call on a few HTTP/2 connections. Terminating each call
//! with a full HTTP/2 server and opening it again with a full HTTP/2 client (two state machines,
//! three tasks and their wake-ups per call) cost more CPU than etcd spends serving a 1 KB get.
//! The relay does what a call that touches no compressed key needs, and no more:
//!
//! - **frames are read and written in batches**, one read and one write per side for as many
//!   frames as arrived together; a DATA frame of a relayed stream is copied from one buffer to
//!   the other with its stream identifier changed;
//! - **header blocks are decoded** (HPACK, both directions, with each peer's own context) to
//!   route each new stream, and **re-encoded** for the other side without the dynamic table, so
//!   that either side's context never depends on the other's and streams the proxy answers
//!   itself, or an etcd connection made again, never desynchronise a decoder;
//! - **each new stream takes one road**, decided once, from its path and (for unary KV calls)
//!   its one request message ([`crate::classify`]):
//!   - *relayed*: Lease, Cluster, Maintenance, Auth, Lock, Election, and KV calls that no
//!     compressed key or `/etcd-squeeze/` key can be involved in: sent to etcd on the relay's
//!     etcd connection, and etcd's answer comes back as etcd sent it (messages, statuses,
//!     unknown fields: every byte but the frame and header encoding);
//!   - *terminated*: everything else (KV calls that touch compressed keys, Watch, Compact,
//!     health, unknown methods, HTTP that is not gRPC) is served by the proxy's services on a
//!     task of its own ([`terminated`]), exactly as before the relay.
//!
//! The relay is an HTTP/2 endpoint on both sides: its own SETTINGS, PINGs answered by itself,
//! flow control per connection and per stream on each side (windows as the proxy's channel had:
//! 4 MiB per stream, 16 MiB per connection), stream identifiers of its own toward etcd. For
//! relayed calls it keeps what the gRPC layers did: `etcd_squeeze_grpc_*` metrics, the client's
//! deadline answered as etcd does when etcd stalls (`DEADLINE_EXCEEDED`, "context deadline
//! exceeded"), `UNAVAILABLE` when etcd cannot be reached or is lost, long-lived streams ended
//! with `UNAVAILABLE` at shutdown, and PINGs toward etcd (`upstream.keepalive_interval`,
//! `upstream.keepalive_timeout`) while calls are open.
//!
//! Nothing a peer sends makes it panic: a malformed frame or header block ends that connection
//! with GOAWAY (PROTOCOL_ERROR, COMPRESSION_ERROR, FRAME_SIZE_ERROR, FLOW_CONTROL_ERROR) as
//! RFC 9113 asks, a malformed request ends its stream.

pub mod frame;
pub mod hpack;
pub(crate) mod terminated;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures::future::BoxFuture;
use tokio::io::AsyncWrite;
use tokio::sync::mpsc;

use self::frame::{code, flag, kind, Head, PeerSettings};
use self::terminated::{Event, Handle, Services};
use super::front::{road, Road as PathRoad};
use super::observe::RelayedCall;
use super::shared::Shared;
use crate::classify::{classify, Route};
use crate::upstream::{ByteStream, Upstream};

/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 64 << 10;
/// The flow-control window of each stream the relay receives on (either side): 4 MiB.
const STREAM_WINDOW: u32 = 4 << 20;
/// The flow-control window of each connection the relay receives on: 16 MiB.
const CONNECTION_WINDOW: u32 = 16 << 20;
/// Released bytes are returned to a peer in WINDOW_UPDATEs of at least this much (1 MiB), so
/// small calls cost no WINDOW_UPDATE at all.
const WINDOW_UPDATE_AT: u32 = 1 << 20;
/// A unary KV request is classified when its message is complete within this many bytes
/// (64 KiB); a larger one is served by the KV service, which reads and classifies it itself.
const CLASSIFY_BYTES: usize = 64 << 10;
/// A DATA payload this large (4 KiB) is written as a segment of its own instead of being copied
/// into the write buffer; smaller writes are gathered there.
const SEGMENT_BYTES: usize = 4 << 10;
/// Bytes waiting to be written to a peer above which the relay stops reading from the side
/// that makes them (1 MiB): a peer that does not read cannot make the proxy buffer without bound.
const OUTPUT_BACKLOG: usize = 1 << 20;
/// Streams a client may reset per second before its connection is ended with ENHANCE_YOUR_CALM
/// (the HTTP/2 "rapid reset" attack, CVE-2023-44487).
const RESETS_PER_SECOND: u32 = 1000;
/// The largest header block accepted (1 MiB); a larger one ends the connection.
const MAX_HEADER_BLOCK: usize = 1 << 20;
/// A `grpc-timeout` is answered this much after it passes when etcd has not answered: the
/// client's own timer fires first, and etcd's answer (it enforces the deadline too) wins races.
const DEADLINE_SLACK: Duration = Duration::from_millis(20);

/// What every relay of one server shares.
pub(crate) struct RelayContext {
    /// The configuration (prefixes, limits, server settings) and the classification scope.
    pub shared: Arc<Shared>,
    /// Where relayed calls go.
    pub upstream: Upstream,
    /// Who answers terminated streams.
    pub services: Services,
    /// True once the server shuts down.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

/// Carries one HTTP/2 client connection until either side ends it (the connection preface
/// still to be read from `io`).
pub(crate) async fn serve(io: Box<dyn ByteStream>, ctx: Arc<RelayContext>) {
    Relay::new(io, ctx).await
}

/// One side's connection: its bytes in and out, its decoding context, its settings and the
/// connection-level windows.
struct Wire {
    io: Io,
    /// Bytes read, not yet parsed.
    rbuf: BytesMut,
    /// Bytes to write after `out`: frame headers and small frames are made here.
    wbuf: BytesMut,
    /// Segments to write first, in order: large DATA payloads go out as the `Bytes` they came in
    /// (a vectored write), never copied into `wbuf`.
    out: VecDeque<Bytes>,
    /// Bytes in `out`.
    out_len: usize,
    /// The peer's header blocks.
    decoder: hpack::Decoder,
    /// A header block whose CONTINUATION frames are awaited: stream, flags of its HEADERS, bytes.
    block: Option<(u32, u8, BytesMut)>,
    /// The peer's settings: how the relay writes to it.
    settings: PeerSettings,
    /// Bytes of DATA the relay may still send on this connection.
    send_window: i64,
    /// Bytes of DATA the peer may still send.
    recv_window: i64,
    /// Bytes received and released, not yet returned to the peer.
    unacked: u32,
    /// Written bytes may still sit in the stream's own buffer (TLS): flush until it says done.
    needs_flush: bool,
}

enum Io {
    Connecting(BoxFuture<'static, io::Result<Box<dyn ByteStream>>>),
    Open(Box<dyn ByteStream>),
}

/// A connection-level failure: the GOAWAY code and why.
#[derive(Debug)]
struct ConnError(u32, String);

impl Wire {
    fn new(io: Io, read: Bytes) -> Wire {
        let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
        rbuf.extend_from_slice(&read);
        // SETTINGS_HEADER_TABLE_SIZE is left at its default, 4,096 bytes.
        let decoder = hpack::Decoder::new(4096);
        Wire {
            io,
            rbuf,
            wbuf: BytesMut::with_capacity(READ_CHUNK),
            out: VecDeque::new(),
            out_len: 0,
            decoder,
            block: None,
            settings: PeerSettings::default(),
            send_window: frame::DEFAULT_WINDOW,
            recv_window: frame::DEFAULT_WINDOW,
            unacked: 0,
            needs_flush: false,
        }
    }

    /// Our SETTINGS and the connection window, as the first frames to a peer.
    fn greet(&mut self, max_streams: Option<u32>) {
        let mut values = vec![(frame::setting::INITIAL_WINDOW_SIZE, STREAM_WINDOW), (frame::setting::MAX_HEADER_LIST_SIZE, MAX_HEADER_BLOCK as u32)];
        match max_streams {
            Some(n) => values.push((frame::setting::MAX_CONCURRENT_STREAMS, n)),
            None => values.push((frame::setting::ENABLE_PUSH, 0)),
        }
        frame::put_settings(&mut self.wbuf, &values);
        frame::put_window_update(&mut self.wbuf, 0, CONNECTION_WINDOW - frame::DEFAULT_WINDOW as u32);
        self.recv_window = CONNECTION_WINDOW as i64;
    }

    /// Reads what the socket has into `rbuf` (straight into its spare room): `Ready(Ok(0))` at
    /// the end of the stream.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Io::Open(io) = &mut self.io else { return Poll::Pending };
        self.rbuf.reserve(READ_CHUNK);
        tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut self.rbuf)
    }

    /// The next complete frame in `rbuf`.
    fn next_frame(&mut self) -> Result<Option<(Head, Bytes)>, ConnError> {
        let Some(head) = Head::parse(&self.rbuf) else { return Ok(None) };
        if head.len > frame::DEFAULT_MAX_FRAME as usize {
            return Err(ConnError(code::FRAME_SIZE_ERROR, format!("a frame of {} bytes", head.len)));
        }
        if self.rbuf.len() < 9 + head.len {
            return Ok(None);
        }
        let mut bytes = self.rbuf.split_to(9 + head.len);
        bytes.advance(9);
        Ok(Some((head, bytes.freeze())))
    }

    /// Writes `out`, then `wbuf`, and flushes; `Ready(Ok)` once all is done.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Io::Open(io) = &mut self.io else { return Poll::Pending };
        loop {
            if !self.wbuf.is_empty() && (self.out.is_empty() || self.wbuf.len() >= SEGMENT_BYTES) {
                let tail = self.wbuf.split().freeze();
                self.out_len += tail.len();
                self.out.push_back(tail);
            }
            if self.out.is_empty() {
                if self.wbuf.is_empty() {
                    break;
                }
                continue;
            }
            let slices: Vec<io::IoSlice<'_>> = self.out.iter().take(64).map(|b| io::IoSlice::new(b)).collect();
            let mut n = std::task::ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.needs_flush = true;
            self.out_len -= n;
            while n > 0 {
                let Some(front) = self.out.front_mut() else { break };
                if n >= front.len() {
                    n -= front.len();
                    self.out.pop_front();
                } else {
                    front.advance(n);
                    n = 0;
                }
            }
        }
        if self.needs_flush {
            std::task::ready!(Pin::new(io).poll_flush(cx))?;
            self.needs_flush = false;
        }
        Poll::Ready(Ok(()))
    }

    /// True while something is left to write or flush.
    fn pending_output(&self) -> bool {
        !self.wbuf.is_empty() || !self.out.is_empty() || self.needs_flush
    }

    /// Bytes waiting to be written.
    fn backlog(&self) -> usize {
        self.wbuf.len() + self.out_len
    }

    /// Appends a DATA frame: a large payload as a segment of its own (not copied).
    fn put_data(&mut self, stream: u32, data: Bytes, end: bool) {
        if data.len() < SEGMENT_BYTES {
            frame::put_data(&mut self.wbuf, stream, &data, end);
            return;
        }
        frame::put_head(&mut self.wbuf, data.len(), kind::DATA, if end { flag::END_STREAM } else { 0 }, stream);
        let head = self.wbuf.split().freeze();
        self.out_len += head.len() + data.len();
        self.out.push_back(head);
        self.out.push_back(data);
    }

    /// Appends a header block for `stream`, split to the peer's frame size; preceded by a dynamic
    /// table size update to 0 when the peer's table is smaller than HPACK's default (RFC 7541
    /// §4.2: the peer then expects one; the relay's blocks never index anything).
    fn put_headers(&mut self, stream: u32, block: &[u8], end: bool) {
        if self.settings.header_table_size < 4096 {
            let mut with_update = Vec::with_capacity(block.len() + 1);
            with_update.push(0x20);
            with_update.extend_from_slice(block);
            frame::put_headers(&mut self.wbuf, stream, &with_update, end, self.settings.max_frame);
        } else {
            frame::put_headers(&mut self.wbuf, stream, block, end, self.settings.max_frame);
        }
    }

    /// Takes the peer's SETTINGS frame: acknowledged, and applied. Returns the change of the
    /// initial stream window to apply to the open streams (`None` for an acknowledgement).
    fn settings(&mut self, head: &Head, payload: &[u8]) -> Result<Option<i64>, ConnError> {
        if head.has(flag::ACK) {
            return Ok(None);
        }
        let delta = self.settings.apply(payload).map_err(|c| ConnError(c, "SETTINGS".into()))?;
        frame::put_settings_ack(&mut self.wbuf);
        Ok(Some(delta))
    }

    /// Takes the peer's connection-level WINDOW_UPDATE.
    fn grow_send_window(&mut self, increment: i64) -> Result<(), ConnError> {
        self.send_window += increment;
        if self.send_window > frame::MAX_WINDOW {
            return Err(ConnError(code::FLOW_CONTROL_ERROR, "connection window over 2^31-1".into()));
        }
        Ok(())
    }

    /// Takes the peer's PING: answered with the same payload. Returns true for an acknowledgement.
    fn ping(&mut self, head: &Head, payload: &[u8]) -> Result<bool, ConnError> {
        let Ok(p) = <[u8; 8]>::try_from(payload) else { return Err(ConnError(code::FRAME_SIZE_ERROR, "PING".into())) };
        if head.has(flag::ACK) {
            return Ok(true);
        }
        frame::put_ping(&mut self.wbuf, p, true);
        Ok(false)
    }

    /// Counts `n` received bytes as consumed: returned to the peer once enough accumulated.
    fn release(&mut self, n: usize) {
        self.unacked = self.unacked.saturating_add(n as u32);
        if self.unacked >= WINDOW_UPDATE_AT {
            frame::put_window_update(&mut self.wbuf, 0, self.unacked);
            self.recv_window += self.unacked as i64;
            self.unacked = 0;
        }
    }

    /// Accounts a received DATA frame of `len` bytes against the connection window.
    fn receive(&mut self, len: usize) -> Result<(), ConnError> {
        self.recv_window -= len as i64;
        if self.recv_window < 0 {
            return Err(ConnError(code::FLOW_CONTROL_ERROR, "DATA beyond the connection window".into()));
        }
        Ok(())
    }

    /// Decodes a complete header block into fields.
    fn decode(&mut self, block: &[u8]) -> Result<Fields, ConnError> {
        let mut fields = Fields::default();
        self.decoder.decode(block, MAX_HEADER_BLOCK, |name, value| fields.push(name, value)).map_err(|e| ConnError(code::COMPRESSION_ERROR, format!("header block: {e}")))?;
        Ok(fields)
    }

    /// Takes a HEADERS or CONTINUATION frame: the whole block (with the HEADERS frame's flags)
    /// once its last frame came.
    fn header_frame(&mut self, head: Head, payload: Bytes) -> Result<Option<(u32, u8, Bytes)>, ConnError> {
        let proto = |what: &str| Err(ConnError(code::PROTOCOL_ERROR, what.to_string()));
        match (head.kind, self.block.as_mut()) {
            (kind::HEADERS, None) => {
                if head.stream == 0 {
                    return proto("HEADERS on stream 0");
                }
                let Some(fragment) = frame::unpadded(&head, payload) else { return proto("HEADERS padding") };
                if head.has(flag::END_HEADERS) {
                    return Ok(Some((head.stream, head.flags, fragment)));
                }
                self.block = Some((head.stream, head.flags, BytesMut::from(&fragment[..])));
                Ok(None)
            }
            (kind::CONTINUATION, Some((stream, _, block))) if *stream == head.stream => {
                block.extend_from_slice(&payload);
                if block.len() > MAX_HEADER_BLOCK {
                    return Err(ConnError(code::PROTOCOL_ERROR, format!("a header block over {MAX_HEADER_BLOCK} bytes")));
                }
                if !head.has(flag::END_HEADERS) {
                    return Ok(None);
                }
                let (stream, flags, block) = self.block.take().unwrap_or_default();
                Ok(Some((stream, flags, block.freeze())))
            }
            _ => proto("a frame inside a header block, or CONTINUATION without HEADERS"),
        }
    }
}

/// Decoded header fields, names and values in one buffer.
#[derive(Default, Clone)]
struct Fields {
    bytes: BytesMut,
    spans: Vec<(usize, usize, usize)>,
}

impl Fields {
    fn push(&mut self, name: &[u8], value: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(name);
        self.bytes.extend_from_slice(value);
        self.spans.push((start, start + name.len(), self.bytes.len()));
    }

    fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.spans.iter().map(|&(a, b, c)| (&self.bytes[a..b], &self.bytes[b..c]))
    }

    fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

/// Headers that belong to one connection and are never carried to the other (RFC 9113 §8.2.2).
fn connection_specific(name: &[u8]) -> bool {
    matches!(name, b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding" | b"upgrade" | b"host")
}

/// Something waiting to be written to the client on one stream, in order.
enum Out {
    /// A header block (response headers or trailers); `true`: it ends the stream.
    Head(Bytes, bool),
    /// DATA; `true`: it ends the stream. `credit`: bytes of a terminated stream's credit to
    /// give back once all of it is written.
    Data(Bytes, bool, u32),
}

/// Something waiting to be written to etcd on one relayed stream, in order.
enum UpOut {
    Data(Bytes, bool),
    Trailers(Bytes),
}

enum Road {
    /// A unary KV call whose request message is being read.
    /// `body`: the DATA read so far, as it came (`len` bytes).
    Classifying { call: crate::classify::Call, fields: Fields, body: Vec<Bytes>, len: usize },
    /// Carried to etcd.
    Relayed(Box<Relayed>),
    /// Served by the proxy's services.
    Terminated(Handle),
}

struct Relayed {
    /// The etcd connection ([`Up::generation`]).
    up: u64,
    /// The stream identifier there (0 until opened).
    up_id: u32,
    /// The request's header block for etcd, until the stream is opened there.
    head: Option<(Bytes, bool)>,
    /// What waits for etcd's windows (or for the stream to open).
    queue: VecDeque<UpOut>,
    /// Bytes etcd lets the relay send on this stream.
    send_window: i64,
    /// Bytes etcd may still send on it, and what was released of them.
    recv_window: i64,
    unacked: u32,
    /// Bytes etcd sent on it not yet written to the client: released on etcd's connection
    /// when they are discarded.
    held: usize,
    /// etcd ended its side.
    ended: bool,
    /// Metrics.
    call: RelayedCall,
    /// Ended with UNAVAILABLE at shutdown.
    long_lived: bool,
}

struct Stream {
    road: Road,
    /// The client ended its side (END_STREAM).
    client_ended: bool,
    /// Bytes the relay may send the client on this stream.
    send_window: i64,
    /// What waits for the client's windows.
    queue: VecDeque<Out>,
    /// The response's header block was written (or queued).
    head_sent: bool,
    /// The response's end was queued.
    done: bool,
    /// The front DATA of `queue` was partly written (a gRPC message cut in two so far).
    partial: bool,
    /// Bytes the client may still send on it, and what was released of them.
    recv_window: i64,
    unacked: u32,
    /// Bytes received from the client on it and not yet released (forwarded to etcd, or read
    /// by the task): released on the connection when the stream is dropped.
    held: usize,
    /// The client's deadline, when it sent `grpc-timeout` (relayed streams).
    deadline: Option<Instant>,
}

/// One connection to etcd.
struct Up {
    generation: u64,
    wire: Wire,
    url: String,
    authority: String,
    scheme: &'static str,
    next_id: u32,
    /// etcd's stream identifier → the client's.
    by_id: HashMap<u32, u32>,
    /// Client streams waiting for etcd's SETTINGS_MAX_CONCURRENT_STREAMS.
    waiting: VecDeque<u32>,
    /// No new streams (etcd's GOAWAY, identifiers used up).
    draining: bool,
    /// When etcd was last heard from, and when an unanswered PING was sent.
    heard: Instant,
    pinged: Option<Instant>,
}

struct Relay {
    ctx: Arc<RelayContext>,
    client: Wire,
    ups: Vec<Up>,
    generations: u64,
    streams: HashMap<u32, Stream>,
    /// The highest stream identifier the client opened.
    last_id: u32,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    deadlines: BTreeSet<(Instant, u32)>,
    sleep: Pin<Box<tokio::time::Sleep>>,
    stop: Option<BoxFuture<'static, ()>>,
    /// GOAWAY sent or received: no new streams; the relay ends once the streams have.
    going_away: bool,
    /// The client connection is gone (or failed): end now.
    closed: bool,
    /// The client's connection preface was read.
    preface_read: bool,
    /// Streams the client reset: since when, how many.
    resets: (Instant, u32),
}

impl Relay {
    fn new(io: Box<dyn ByteStream>, ctx: Arc<RelayContext>) -> Relay {
        let mut client = Wire::new(Io::Open(io), Bytes::new());
        client.greet(Some(ctx.shared.config.server.max_concurrent_streams));
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let mut stop_rx = ctx.stop.clone();
        let stop: BoxFuture<'static, ()> = Box::pin(async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        });
        Relay {
            ctx,
            client,
            ups: Vec::new(),
            generations: 0,
            streams: HashMap::new(),
            last_id: 0,
            events_tx,
            events_rx,
            deadlines: BTreeSet::new(),
            sleep: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
            stop: Some(stop),
            going_away: false,
            closed: false,
            preface_read: false,
            resets: (Instant::now(), 0),
        }
    }

    // ---- the client side ----

    fn client_frames(&mut self) -> Result<(), ConnError> {
        if !self.preface_read {
            if self.client.rbuf.len() < frame::PREFACE.len() {
                return Ok(());
            }
            if !self.client.rbuf.starts_with(frame::PREFACE) {
                return Err(ConnError(code::PROTOCOL_ERROR, "no HTTP/2 connection preface".into()));
            }
            self.client.rbuf.advance(frame::PREFACE.len());
            self.preface_read = true;
        }
        while let Some((head, payload)) = self.client.next_frame()? {
            self.client_frame(head, payload)?;
        }
        Ok(())
    }

    fn client_frame(&mut self, head: Head, payload: Bytes) -> Result<(), ConnError> {
        if self.client.block.is_some() || matches!(head.kind, kind::HEADERS | kind::CONTINUATION) {
            if let Some((id, flags, block)) = self.client.header_frame(head, payload)? {
                let fields = self.client.decode(&block)?;
                self.client_headers(id, flags & flag::END_STREAM != 0, fields)?;
            }
            return Ok(());
        }
        match head.kind {
            kind::DATA => self.client_data(head, payload),
            kind::RST_STREAM => {
                let now = Instant::now();
                if now.duration_since(self.resets.0) >= Duration::from_secs(1) {
                    self.resets = (now, 0);
                }
                self.resets.1 += 1;
                if self.resets.1 > RESETS_PER_SECOND {
                    return Err(ConnError(code::ENHANCE_YOUR_CALM, format!("over {RESETS_PER_SECOND} streams reset in a second")));
                }
                if let Some(stream) = self.streams.remove(&head.stream) {
                    self.drop_stream(head.stream, stream);
                }
                Ok(())
            }
            kind::SETTINGS => {
                let Some(delta) = self.client.settings(&head, &payload)? else { return Ok(()) };
                if delta != 0 {
                    let ids: Vec<u32> = self.streams.keys().copied().collect();
                    for id in ids {
                        if let Some(s) = self.streams.get_mut(&id) {
                            s.send_window += delta;
                        }
                        self.flush_to_client(id);
                    }
                }
                Ok(())
            }
            kind::PING => self.client.ping(&head, &payload).map(|_| ()),
            kind::GOAWAY => {
                self.going_away = true;
                Ok(())
            }
            kind::WINDOW_UPDATE => {
                let increment = window_increment(&payload)?;
                if head.stream == 0 {
                    self.client.grow_send_window(increment)?;
                    let ids: Vec<u32> = self.streams.iter().filter(|(_, s)| !s.queue.is_empty()).map(|(id, _)| *id).collect();
                    for id in ids {
                        self.flush_to_client(id);
                    }
                } else if let Some(s) = self.streams.get_mut(&head.stream) {
                    s.send_window += increment;
                    if s.send_window > frame::MAX_WINDOW {
                        frame::put_rst(&mut self.client.wbuf, head.stream, code::FLOW_CONTROL_ERROR);
                        if let Some(s) = self.streams.remove(&head.stream) {
                            self.drop_stream(head.stream, s);
                        }
                        return Ok(());
                    }
                    self.flush_to_client(head.stream);
                }
                Ok(())
            }
            kind::PUSH_PROMISE => Err(ConnError(code::PROTOCOL_ERROR, "PUSH_PROMISE from a client".into())),
            _ => Ok(()), // PRIORITY and unknown types are ignored
        }
    }

    fn client_data(&mut self, head: Head, payload: Bytes) -> Result<(), ConnError> {
        let len = payload.len();
        self.client.receive(len)?;
        let end = head.has(flag::END_STREAM);
        let Some(data) = frame::unpadded(&head, payload) else {
            return Err(ConnError(code::PROTOCOL_ERROR, "DATA padding".into()));
        };
        let padding = len - data.len();
        let Some(stream) = self.streams.get_mut(&head.stream) else {
            if head.stream > self.last_id || head.stream == 0 {
                return Err(ConnError(code::PROTOCOL_ERROR, "DATA on an idle stream".into()));
            }
            self.client.release(len); // a stream already ended (or reset): dropped
            return Ok(());
        };
        if stream.client_ended {
            self.client.release(len);
            frame::put_rst(&mut self.client.wbuf, head.stream, code::STREAM_CLOSED);
            if let Some(s) = self.streams.remove(&head.stream) {
                self.drop_stream(head.stream, s);
            }
            return Ok(());
        }
        stream.recv_window -= len as i64;
        if stream.recv_window < 0 {
            self.client.release(len);
            frame::put_rst(&mut self.client.wbuf, head.stream, code::FLOW_CONTROL_ERROR);
            if let Some(s) = self.streams.remove(&head.stream) {
                self.drop_stream(head.stream, s);
            }
            return Ok(());
        }
        stream.client_ended = end;
        stream.held += data.len();
        if padding > 0 {
            self.client.release(padding);
            self.release_client_stream(head.stream, padding);
        }
        let Some(stream) = self.streams.get_mut(&head.stream) else { return Ok(()) };
        match &mut stream.road {
            Road::Classifying { body, len, .. } => {
                *len += data.len();
                if !data.is_empty() {
                    body.push(data);
                }
                // A unary request is whole at END_STREAM (gRPC clients half-close at once).
                if end || *len > CLASSIFY_BYTES {
                    self.classified(head.stream);
                }
            }
            Road::Relayed(r) => {
                r.call.count_request_bytes(data.len());
                r.queue.push_back(UpOut::Data(data, end));
                self.flush_to_up(head.stream);
            }
            Road::Terminated(h) => {
                if let Some(tx) = &h.body {
                    if !data.is_empty() && tx.send(Ok(http_body::Frame::data(data))).is_err() {
                        // The task no longer reads its body: what it would have consumed is released.
                    }
                }
                if end {
                    h.body = None;
                }
            }
        }
        Ok(())
    }

    fn client_headers(&mut self, id: u32, end: bool, fields: Fields) -> Result<(), ConnError> {
        if let Some(stream) = self.streams.get_mut(&id) {
            // Trailers of a request.
            if stream.client_ended || !end {
                frame::put_rst(&mut self.client.wbuf, id, code::PROTOCOL_ERROR);
                if let Some(s) = self.streams.remove(&id) {
                    self.drop_stream(id, s);
                }
                return Ok(());
            }
            stream.client_ended = true;
            match &mut stream.road {
                Road::Classifying { .. } => self.classified(id),
                Road::Relayed(r) => {
                    let block = encode(&fields, None);
                    r.queue.push_back(UpOut::Trailers(block));
                    self.flush_to_up(id);
                }
                Road::Terminated(h) => h.body = None,
            }
            return Ok(());
        }
        if id % 2 == 0 {
            return Err(ConnError(code::PROTOCOL_ERROR, format!("HEADERS opening stream {id}")));
        }
        if id <= self.last_id {
            return Ok(()); // a stream that ended or was reset: its block is decoded, and ignored
        }
        self.last_id = id;
        if self.going_away {
            frame::put_rst(&mut self.client.wbuf, id, code::REFUSED_STREAM);
            return Ok(());
        }
        let open = self.streams.len() as u32;
        if open >= self.ctx.shared.config.server.max_concurrent_streams {
            frame::put_rst(&mut self.client.wbuf, id, code::REFUSED_STREAM);
            return Ok(());
        }
        let path = fields.get(b":path").unwrap_or_default();
        let grpc = fields.get(b"content-type").is_some_and(|v| v.starts_with(b"application/grpc"));
        let path_road = match std::str::from_utf8(path) {
            Ok(p) if grpc => road(p),
            _ => PathRoad::Services,
        };
        let stream = Stream {
            road: Road::Classifying { call: crate::classify::Call::Range, fields: Fields::default(), body: Vec::new(), len: 0 },
            client_ended: end,
            send_window: self.client.settings.initial_window,
            queue: VecDeque::new(),
            head_sent: false,
            done: false,
            partial: false,
            recv_window: STREAM_WINDOW as i64,
            unacked: 0,
            held: 0,
            deadline: None,
        };
        self.streams.insert(id, stream);
        match path_road {
            PathRoad::Whole(_) => {
                let long_lived = std::str::from_utf8(path).ok().and_then(super::methods::method_info).is_some_and(|m| m.long_lived);
                self.relay(id, fields, Vec::new(), long_lived)
            }
            PathRoad::Kv(call) => {
                if let Some(s) = self.streams.get_mut(&id) {
                    s.road = Road::Classifying { call, fields, body: Vec::new(), len: 0 };
                }
                if end {
                    self.classified(id);
                }
            }
            PathRoad::Services | PathRoad::Identify => self.terminate(id, fields, Vec::new(), None, grpc),
        }
        Ok(())
    }

    /// A unary KV request read (whole, or as much as the relay reads): relayed when no
    /// compressed key can be involved, else served by the KV service.
    fn classified(&mut self, id: u32) {
        let Some(stream) = self.streams.get_mut(&id) else { return };
        let Road::Classifying { call, fields, body, len } = &mut stream.road else { return };
        let (call, fields, mut body, len) = (*call, std::mem::take(fields), std::mem::take(body), *len);
        let limit = self.ctx.shared.config.limits.max_request_bytes.as_u64();
        // A whole request within the size the relay reads, in one buffer (joined when it came
        // in several DATA frames; one frame, the usual case, is not copied).
        if stream.client_ended && (5..=CLASSIFY_BYTES).contains(&len) && body.len() > 1 {
            let mut joined = BytesMut::with_capacity(len);
            for chunk in &body {
                joined.extend_from_slice(chunk);
            }
            body = vec![joined.freeze()];
        }
        let whole = match &body[..] {
            [one] if stream.client_ended && len <= CLASSIFY_BYTES => Some(one),
            _ => None,
        };
        let one_message = whole.is_some_and(|b| b.len() >= 5 && b[0] == 0 && declared(b) == b.len() - 5 && declared(b) as u64 <= limit);
        let route = match whole {
            Some(b) if one_message => classify(call, &b[5..], &self.ctx.shared.scope),
            _ => Route::Rewrite(Default::default()),
        };
        match route {
            Route::Forward if one_message => self.relay(id, fields, body, false),
            // Not one small uncompressed message, or compressed keys may be involved: the KV
            // service reads it as gRPC does (and does not classify it again).
            route => {
                let route = one_message.then_some(route);
                self.terminate(id, fields, body, route, true)
            }
        }
    }

    /// Sends stream `id` to etcd (with the request `body` read so far, if any).
    fn relay(&mut self, id: u32, fields: Fields, body: Vec<Bytes>, long_lived: bool) {
        let now = Instant::now();
        let path = fields.get(b":path").and_then(|p| std::str::from_utf8(p).ok()).unwrap_or("");
        let call = RelayedCall::start(path, now);
        let deadline = fields
            .get(b"grpc-timeout")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(super::etcd_status::parse_grpc_timeout)
            .map(|t| now + t + DEADLINE_SLACK);
        let up = self.current_up();
        let (authority, scheme) = {
            let u = &self.ups[up];
            (u.authority.clone(), u.scheme)
        };
        let generation = self.ups[up].generation;
        let Some(stream) = self.streams.get_mut(&id) else { return };
        let end_with_head = stream.client_ended && body.is_empty();
        let block = encode(&fields, Some((authority.as_bytes(), scheme.as_bytes())));
        let mut relayed = Relayed {
            up: generation,
            up_id: 0,
            head: Some((block, end_with_head)),
            queue: VecDeque::new(),
            send_window: 0,
            recv_window: STREAM_WINDOW as i64,
            unacked: 0,
            held: 0,
            ended: false,
            call,
            long_lived,
        };
        let chunks = body.len();
        for (i, chunk) in body.into_iter().enumerate() {
            relayed.call.count_request_bytes(chunk.len());
            relayed.queue.push_back(UpOut::Data(chunk, stream.client_ended && i + 1 == chunks));
        }
        stream.road = Road::Relayed(Box::new(relayed));
        stream.deadline = deadline;
        if let Some(d) = deadline {
            self.deadlines.insert((d, id));
        }
        self.open_on_up(id);
    }

    /// Serves stream `id` with the proxy's services.
    fn terminate(&mut self, id: u32, fields: Fields, body: Vec<Bytes>, route: Option<Route>, grpc: bool) {
        let Some(stream) = self.streams.get_mut(&id) else { return };
        let mut builder = http::Request::builder().version(http::Version::HTTP_2);
        let (mut scheme, mut authority, mut path, mut method) = ("http", None, "/", "POST");
        for (name, value) in fields.iter() {
            let value_str = std::str::from_utf8(value).ok();
            match name {
                b":scheme" => scheme = value_str.unwrap_or("http"),
                b":authority" => authority = value_str,
                b":path" => path = value_str.unwrap_or("/"),
                b":method" => method = value_str.unwrap_or("POST"),
                _ if name.starts_with(b":") || connection_specific(name) => {}
                _ => builder = builder.header(name, value),
            }
        }
        // An authority that is no URI authority (etcdctl 3.4 sends `http://host:port`; etcd
        // accepts anything) is left out: the services route by the path.
        let uri = authority.map(|a| format!("{scheme}://{a}{path}")).and_then(|u| u.parse::<http::Uri>().ok());
        let uri = uri.map_or_else(|| path.parse::<http::Uri>(), Ok);
        let request = uri.map_err(http::Error::from).and_then(|uri| builder.method(method).uri(uri).body(()));
        let Ok(request) = request else {
            frame::put_rst(&mut self.client.wbuf, id, code::PROTOCOL_ERROR);
            if let Some(s) = self.streams.remove(&id) {
                self.drop_stream(id, s);
            }
            return;
        };
        let (mut parts, ()) = request.into_parts();
        if let Some(route) = route {
            parts.extensions.insert(route);
        }
        let mut handle = terminated::spawn(id, parts, grpc, &self.ctx.services, self.events_tx.clone());
        if let Some(tx) = &handle.body {
            for chunk in body {
                let _ = tx.send(Ok(http_body::Frame::data(chunk)));
            }
        }
        if stream.client_ended {
            handle.body = None;
        }
        stream.road = Road::Terminated(handle);
    }

    // ---- etcd's side ----

    /// The etcd connection new streams go to (made when there is none).
    fn current_up(&mut self) -> usize {
        if let Some(i) = self.ups.iter().rposition(|u| !u.draining) {
            return i;
        }
        let dial = self.ctx.upstream.dial();
        let mut wire = Wire::new(Io::Connecting(dial.connect), Bytes::new());
        wire.wbuf.extend_from_slice(frame::PREFACE);
        wire.greet(None);
        self.generations += 1;
        self.ups.push(Up {
            generation: self.generations,
            wire,
            url: dial.url,
            authority: dial.authority,
            scheme: dial.scheme,
            next_id: 1,
            by_id: HashMap::new(),
            waiting: VecDeque::new(),
            draining: false,
            heard: Instant::now(),
            pinged: None,
        });
        self.ups.len() - 1
    }

    fn up_index(&self, generation: u64) -> Option<usize> {
        self.ups.iter().position(|u| u.generation == generation)
    }

    /// Opens relayed stream `id` on its etcd connection, or queues it behind etcd's limit.
    fn open_on_up(&mut self, id: u32) {
        let Some(Stream { road: Road::Relayed(r), .. }) = self.streams.get_mut(&id) else { return };
        let Some(ui) = self.ups.iter().position(|u| u.generation == r.up) else { return };
        let up = &mut self.ups[ui];
        if up.by_id.len() as u32 >= up.wire.settings.max_streams {
            up.waiting.push_back(id);
            return;
        }
        let Some((block, end)) = r.head.take() else { return };
        r.up_id = up.next_id;
        up.next_id += 2;
        if up.next_id >= 1 << 30 {
            up.draining = true;
        }
        r.send_window = up.wire.settings.initial_window;
        up.wire.put_headers(r.up_id, &block, end);
        if up.by_id.is_empty() {
            up.heard = Instant::now();
        }
        up.by_id.insert(r.up_id, id);
        self.flush_to_up(id);
    }

    /// Writes what relayed stream `id` has for etcd, as far as etcd's windows allow.
    fn flush_to_up(&mut self, id: u32) {
        let Some(stream) = self.streams.get_mut(&id) else { return };
        let Road::Relayed(r) = &mut stream.road else { return };
        if r.up_id == 0 {
            return;
        }
        let Some(up) = self.ups.iter_mut().find(|u| u.generation == r.up) else { return };
        let mut released = 0usize;
        while let Some(item) = r.queue.front_mut() {
            match item {
                UpOut::Trailers(block) => {
                    up.wire.put_headers(r.up_id, block, true);
                    r.queue.pop_front();
                }
                UpOut::Data(data, end) => {
                    let room = up.wire.send_window.min(r.send_window).min(up.wire.settings.max_frame as i64).max(0) as usize;
                    if room == 0 && !data.is_empty() {
                        break;
                    }
                    let n = room.min(data.len());
                    let last = n == data.len();
                    let chunk = data.split_to(n);
                    up.wire.put_data(r.up_id, chunk, last && *end);
                    up.wire.send_window -= n as i64;
                    r.send_window -= n as i64;
                    released += n;
                    if last {
                        r.queue.pop_front();
                    }
                }
            }
        }
        if released > 0 {
            stream.held = stream.held.saturating_sub(released);
            self.client.release(released);
            self.release_client_stream(id, released);
        }
    }

    /// Counts `n` bytes of client stream `id` as consumed: returned once enough accumulated.
    fn release_client_stream(&mut self, id: u32, n: usize) {
        let Some(stream) = self.streams.get_mut(&id) else { return };
        stream.unacked = stream.unacked.saturating_add(n as u32);
        if stream.unacked >= WINDOW_UPDATE_AT && !stream.client_ended {
            frame::put_window_update(&mut self.client.wbuf, id, stream.unacked);
            stream.recv_window += stream.unacked as i64;
            stream.unacked = 0;
        }
    }

    fn up_frames(&mut self, ui: usize) -> Result<(), ConnError> {
        while let Some((head, payload)) = self.ups[ui].wire.next_frame()? {
            self.ups[ui].heard = Instant::now();
            self.up_frame(ui, head, payload)?;
        }
        Ok(())
    }

    fn up_frame(&mut self, ui: usize, head: Head, payload: Bytes) -> Result<(), ConnError> {
        let up = &mut self.ups[ui];
        if up.wire.block.is_some() || matches!(head.kind, kind::HEADERS | kind::CONTINUATION) {
            if let Some((up_id, flags, block)) = up.wire.header_frame(head, payload)? {
                let fields = up.wire.decode(&block)?;
                if let Some(&id) = up.by_id.get(&up_id) {
                    let end = flags & flag::END_STREAM != 0;
                    self.up_headers(id, end, fields);
                    if end {
                        self.closed_at_etcd(ui, up_id, id);
                    }
                }
            }
            return Ok(());
        }
        match head.kind {
            kind::DATA => {
                let len = payload.len();
                up.wire.receive(len)?;
                let Some(&id) = up.by_id.get(&head.stream) else {
                    up.wire.release(len);
                    return Ok(());
                };
                let end = head.has(flag::END_STREAM);
                let Some(data) = frame::unpadded(&head, payload) else {
                    return Err(ConnError(code::PROTOCOL_ERROR, "DATA padding".into()));
                };
                let padding = len - data.len();
                if padding > 0 {
                    up.wire.release(padding);
                }
                let Some(stream) = self.streams.get_mut(&id) else { return Ok(()) };
                let Road::Relayed(r) = &mut stream.road else { return Ok(()) };
                r.recv_window -= len as i64;
                if r.recv_window < 0 {
                    up.wire.release(len - padding);
                    up.by_id.remove(&head.stream);
                    r.up_id = 0;
                    frame::put_rst(&mut up.wire.wbuf, head.stream, code::FLOW_CONTROL_ERROR);
                    self.open_waiting(ui);
                    self.fail(id, tonic::Code::Internal, "etcd sent more than the stream's window");
                    return Ok(());
                }
                r.unacked = r.unacked.saturating_add(padding as u32);
                r.held += data.len();
                if end {
                    r.ended = true;
                    stream.done = true;
                }
                stream.queue.push_back(Out::Data(data, end, 0));
                self.flush_to_client(id);
                if end {
                    self.closed_at_etcd(ui, head.stream, id);
                }
                Ok(())
            }
            kind::RST_STREAM => {
                let Some(id) = up.by_id.remove(&head.stream) else { return Ok(()) };
                let reason = if payload.len() == 4 { u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) } else { code::INTERNAL_ERROR };
                self.open_waiting(ui);
                // After its END_STREAM, etcd's reset (grpc-go's NO_ERROR while the request is
                // still open) only closes its side: the answer queued for the client goes on.
                if let Some(Stream { road: Road::Relayed(r), .. }) = self.streams.get_mut(&id) {
                    if r.ended {
                        r.up_id = 0;
                        return Ok(());
                    }
                }
                if let Some(mut stream) = self.streams.remove(&id) {
                    if let Road::Relayed(r) = &mut stream.road {
                        r.up_id = 0; // already closed at etcd
                    }
                    frame::put_rst(&mut self.client.wbuf, id, reason);
                    self.drop_stream(id, stream);
                }
                Ok(())
            }
            kind::SETTINGS => {
                let Some(delta) = up.wire.settings(&head, &payload)? else { return Ok(()) };
                let generation = up.generation;
                let ids: Vec<u32> = up.by_id.values().copied().collect();
                for id in ids {
                    if let Some(Stream { road: Road::Relayed(r), .. }) = self.streams.get_mut(&id) {
                        if r.up == generation {
                            r.send_window += delta;
                        }
                    }
                    self.flush_to_up(id);
                }
                self.open_waiting(ui);
                Ok(())
            }
            kind::PING => {
                if up.wire.ping(&head, &payload)? {
                    up.pinged = None;
                }
                Ok(())
            }
            kind::GOAWAY => {
                if payload.len() < 8 {
                    return Err(ConnError(code::FRAME_SIZE_ERROR, "GOAWAY".into()));
                }
                let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff;
                up.draining = true;
                let url = up.url.clone();
                let refused: Vec<(u32, u32)> = up.by_id.iter().filter(|(&u, _)| u > last).map(|(&u, &c)| (u, c)).collect();
                for (up_id, id) in refused {
                    self.ups[ui].by_id.remove(&up_id);
                    let Some(stream) = self.streams.get_mut(&id) else { continue };
                    if let Road::Relayed(r) = &mut stream.road {
                        r.up_id = 0;
                    }
                    if stream.head_sent {
                        self.fail(id, tonic::Code::Unavailable, &format!("connection error: etcd-squeeze cannot reach etcd at {url}: etcd sent GOAWAY"));
                    } else if let Some(stream) = self.streams.remove(&id) {
                        // Never processed by etcd: REFUSED_STREAM, which gRPC clients retry.
                        frame::put_rst(&mut self.client.wbuf, id, code::REFUSED_STREAM);
                        self.drop_stream(id, stream);
                    }
                }
                // Streams that waited for a slot were never sent: they go to a new connection.
                let waiting: Vec<u32> = self.ups[ui].waiting.drain(..).collect();
                if !waiting.is_empty() {
                    let fresh = self.current_up();
                    let generation = self.ups[fresh].generation;
                    for id in waiting {
                        if let Some(Stream { road: Road::Relayed(r), .. }) = self.streams.get_mut(&id) {
                            r.up = generation;
                        }
                        self.open_on_up(id);
                    }
                }
                Ok(())
            }
            kind::WINDOW_UPDATE => {
                let increment = window_increment(&payload)?;
                if head.stream == 0 {
                    up.wire.grow_send_window(increment)?;
                    let ids: Vec<u32> = up.by_id.values().copied().collect();
                    for id in ids {
                        self.flush_to_up(id);
                    }
                } else if let Some(&id) = up.by_id.get(&head.stream) {
                    if let Some(Stream { road: Road::Relayed(r), .. }) = self.streams.get_mut(&id) {
                        r.send_window += increment;
                        if r.send_window > frame::MAX_WINDOW {
                            return Err(ConnError(code::FLOW_CONTROL_ERROR, "stream window over 2^31-1".into()));
                        }
                    }
                    self.flush_to_up(id);
                }
                Ok(())
            }
            kind::PUSH_PROMISE => Err(ConnError(code::PROTOCOL_ERROR, "PUSH_PROMISE with push disabled".into())),
            _ => Ok(()),
        }
    }

    /// etcd's response headers or trailers for client stream `id`.
    fn up_headers(&mut self, id: u32, end: bool, fields: Fields) {
        let Some(stream) = self.streams.get_mut(&id) else { return };
        let Road::Relayed(r) = &mut stream.road else { return };
        if let Some(code) = fields.get(b"grpc-status").and_then(|v| std::str::from_utf8(v).ok()).and_then(|v| v.parse::<i32>().ok()) {
            r.call.set_code(tonic::Code::from_i32(code));
        }
        if end {
            r.ended = true;
            stream.done = true;
        }
        stream.head_sent = true;
        let block = encode(&fields, None);
        stream.queue.push_back(Out::Head(block, end));
        self.flush_to_client(id);
    }

    /// etcd ended stream `up_id` (client stream `id`): once the client's side went out too, the
    /// stream is closed at etcd, and its slot is free for a waiting stream even while the
    /// answer still waits for the client's windows.
    fn closed_at_etcd(&mut self, ui: usize, up_id: u32, id: u32) {
        let Some(Stream { road: Road::Relayed(r), client_ended: true, .. }) = self.streams.get_mut(&id) else { return };
        if !r.queue.is_empty() || r.up_id != up_id {
            return;
        }
        r.up_id = 0;
        if let Some(up) = self.ups.get_mut(ui) {
            up.by_id.remove(&up_id);
        }
        self.open_waiting(ui);
    }

    /// Opens the streams waiting for etcd's concurrency limit on connection `ui`.
    fn open_waiting(&mut self, ui: usize) {
        while let Some(up) = self.ups.get_mut(ui) {
            if up.by_id.len() as u32 >= up.wire.settings.max_streams {
                return;
            }
            let Some(id) = up.waiting.pop_front() else { return };
            self.open_on_up(id);
        }
    }

    // ---- writing to the client ----

    /// Writes what stream `id` has for the client, as far as the client's windows allow; a
    /// stream whose response ended is closed.
    fn flush_to_client(&mut self, id: u32) {
        let Some(stream) = self.streams.get_mut(&id) else { return };
        let max_frame = self.client.settings.max_frame;
        let mut wrote_end = false;
        let mut up_released = 0usize;
        while let Some(item) = stream.queue.front_mut() {
            match item {
                Out::Head(block, end) => {
                    self.client.put_headers(id, block, *end);
                    wrote_end = *end;
                    stream.queue.pop_front();
                }
                Out::Data(data, end, credit) => {
                    let room = self.client.send_window.min(stream.send_window).min(max_frame as i64).max(0) as usize;
                    if room == 0 && !data.is_empty() {
                        break;
                    }
                    let n = room.min(data.len());
                    let last = n == data.len();
                    let chunk = data.split_to(n);
                    self.client.put_data(id, chunk, last && *end);
                    self.client.send_window -= n as i64;
                    stream.send_window -= n as i64;
                    stream.partial = !last;
                    up_released += n;
                    if last {
                        wrote_end = *end;
                        if *credit > 0 {
                            if let Road::Terminated(h) = &stream.road {
                                h.credit.add_permits(*credit as usize);
                            }
                        }
                        stream.queue.pop_front();
                    }
                }
            }
            if wrote_end {
                break;
            }
        }
        // What etcd sent is released as it reaches the client.
        if up_released > 0 {
            if let Road::Relayed(r) = &mut stream.road {
                r.held = r.held.saturating_sub(up_released);
                r.unacked = r.unacked.saturating_add(up_released as u32);
                if let Some(up) = self.ups.iter_mut().find(|u| u.generation == r.up) {
                    up.wire.release(up_released);
                    if r.unacked >= WINDOW_UPDATE_AT && !r.ended && r.up_id != 0 {
                        frame::put_window_update(&mut up.wire.wbuf, r.up_id, r.unacked);
                        r.recv_window += r.unacked as i64;
                        r.unacked = 0;
                    }
                }
            }
        }
        if wrote_end {
            if let Some(stream) = self.streams.remove(&id) {
                if !stream.client_ended {
                    // The response is complete before the request: the rest is not wanted.
                    frame::put_rst(&mut self.client.wbuf, id, code::NO_ERROR);
                }
                self.drop_stream(id, stream);
            }
        }
    }

    /// Ends stream `id` with a gRPC status of the proxy's own (etcd lost, deadline, shutdown).
    fn fail(&mut self, id: u32, code: tonic::Code, message: &str) {
        let Some(stream) = self.streams.get_mut(&id) else { return };
        if stream.done {
            return;
        }
        let mut trailers = http::HeaderMap::new();
        let _ = tonic::Status::new(code, message).add_header(&mut trailers);
        let mut block = BytesMut::new();
        if !stream.head_sent {
            frame::encode_field(&mut block, b":status", b"200");
            frame::encode_field(&mut block, b"content-type", b"application/grpc");
        }
        for (name, value) in &trailers {
            frame::encode_field(&mut block, name.as_str().as_bytes(), value.as_bytes());
        }
        stream.head_sent = true;
        stream.done = true;
        if let Road::Relayed(r) = &mut stream.road {
            r.call.set_code(code);
        }
        // Nothing more of etcd's answer is wanted (but the rest of a message already begun, so
        // the client never sees half a message): what it sent and waits is released.
        let mut discarded = 0usize;
        let mut front = stream.partial;
        stream.queue.retain(|o| {
            let keep = front || matches!(o, Out::Head(_, false));
            front = false;
            if let (false, Out::Data(d, _, _)) = (keep, o) {
                discarded += d.len();
            }
            keep
        });
        if let Some(Out::Data(_, end, _)) = stream.queue.front_mut() {
            *end = false;
        }
        if let Road::Relayed(r) = &mut stream.road {
            r.held = r.held.saturating_sub(discarded);
            if let Some(up) = self.ups.iter_mut().find(|u| u.generation == r.up) {
                up.wire.release(discarded);
            }
        }
        stream.queue.push_back(Out::Head(block.freeze(), true));
        self.flush_to_client(id);
    }

    /// Forgets a stream that ended or was reset (etcd's side reset, a task aborted); what it
    /// held of either side's connection window is released.
    fn drop_stream(&mut self, id: u32, stream: Stream) {
        if let Some(d) = stream.deadline {
            self.deadlines.remove(&(d, id));
        }
        self.client.release(stream.held);
        match stream.road {
            Road::Relayed(r) => {
                if let Some(ui) = self.up_index(r.up) {
                    let up = &mut self.ups[ui];
                    up.wire.release(r.held);
                    up.waiting.retain(|w| *w != id);
                    if r.up_id != 0 && up.by_id.remove(&r.up_id).is_some() && !(r.ended && stream.client_ended) {
                        frame::put_rst(&mut up.wire.wbuf, r.up_id, code::CANCEL);
                    }
                    self.open_waiting(ui);
                }
            }
            Road::Terminated(h) => {
                if !stream.done {
                    h.task.abort();
                }
            }
            Road::Classifying { .. } => {}
        }
    }

    // ---- events, timers, shutdown ----

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Consumed { id, bytes } => {
                // A stream already dropped had what it held released then.
                let Some(stream) = self.streams.get_mut(&id) else { return };
                let bytes = bytes.min(stream.held);
                stream.held -= bytes;
                self.client.release(bytes);
                self.release_client_stream(id, bytes);
            }
            Event::Head { id, parts, end } => {
                let Some(stream) = self.streams.get_mut(&id) else { return };
                let mut block = BytesMut::new();
                frame::encode_field(&mut block, b":status", parts.status.as_str().as_bytes());
                for (name, value) in &parts.headers {
                    if !connection_specific(name.as_str().as_bytes()) {
                        frame::encode_field(&mut block, name.as_str().as_bytes(), value.as_bytes());
                    }
                }
                stream.head_sent = true;
                stream.done |= end;
                stream.queue.push_back(Out::Head(block.freeze(), end));
                self.flush_to_client(id);
            }
            Event::Data { id, data } => {
                let Some(stream) = self.streams.get_mut(&id) else { return };
                let credit = data.len().min(terminated::CREDIT_BYTES) as u32;
                stream.queue.push_back(Out::Data(data, false, credit));
                self.flush_to_client(id);
            }
            Event::Trailers { id, trailers } => {
                let Some(stream) = self.streams.get_mut(&id) else { return };
                let mut block = BytesMut::new();
                if !stream.head_sent {
                    // No response head yet: a trailers-only answer.
                    frame::encode_field(&mut block, b":status", b"200");
                    frame::encode_field(&mut block, b"content-type", b"application/grpc");
                    stream.head_sent = true;
                }
                for (name, value) in &trailers {
                    frame::encode_field(&mut block, name.as_str().as_bytes(), value.as_bytes());
                }
                stream.done = true;
                stream.queue.push_back(Out::Head(block.freeze(), true));
                self.flush_to_client(id);
            }
            Event::End { id } => {
                let Some(stream) = self.streams.get_mut(&id) else { return };
                stream.done = true;
                stream.queue.push_back(Out::Data(Bytes::new(), true, 0));
                self.flush_to_client(id);
            }
        }
    }

    /// Deadlines passed and PINGs due; returns the next instant something is due.
    fn on_timers(&mut self, now: Instant) -> Option<Instant> {
        while let Some(&(at, id)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.remove(&(at, id));
            if let Some(s) = self.streams.get_mut(&id) {
                s.deadline = None;
            }
            self.fail(id, tonic::Code::DeadlineExceeded, "context deadline exceeded");
        }
        let interval = self.ctx.shared.config.upstream.keepalive_interval;
        let timeout = self.ctx.shared.config.upstream.keepalive_timeout;
        let mut next = self.deadlines.first().map(|(at, _)| *at);
        let mut dead = Vec::new();
        for (ui, up) in self.ups.iter_mut().enumerate() {
            if up.by_id.is_empty() || !matches!(up.wire.io, Io::Open(_)) {
                continue;
            }
            let due = match up.pinged {
                Some(sent) if now >= sent + timeout => {
                    dead.push(ui);
                    continue;
                }
                Some(sent) => sent + timeout,
                None if now >= up.heard + interval => {
                    frame::put_ping(&mut up.wire.wbuf, *b"squeeze!", false);
                    up.pinged = Some(now);
                    now + timeout
                }
                None => up.heard + interval,
            };
            next = Some(next.map_or(due, |n: Instant| n.min(due)));
        }
        for ui in dead.into_iter().rev() {
            let url = self.ups[ui].url.clone();
            self.lose_up(ui, &format!("error reading from server: etcd-squeeze lost etcd at {url}: no PING answer within {timeout:?}"));
        }
        next
    }

    /// Ends every stream on etcd connection `ui` with UNAVAILABLE `message` and forgets it.
    fn lose_up(&mut self, ui: usize, message: &str) {
        let up = self.ups.remove(ui);
        for id in up.by_id.values().chain(up.waiting.iter()) {
            if let Some(Stream { road: Road::Relayed(r), .. }) = self.streams.get_mut(id) {
                r.up_id = 0;
            }
            self.fail(*id, tonic::Code::Unavailable, message);
        }
        // Streams not yet opened on it (queued before it connected).
        let generation = up.generation;
        let orphans: Vec<u32> = self.streams.iter().filter(|(_, s)| matches!(&s.road, Road::Relayed(r) if r.up == generation)).map(|(id, _)| *id).collect();
        for id in orphans {
            self.fail(id, tonic::Code::Unavailable, message);
        }
    }

    fn on_stop(&mut self) {
        self.going_away = true;
        frame::put_goaway(&mut self.client.wbuf, self.last_id, code::NO_ERROR, "etcd-squeeze: shutting down");
        let long: Vec<u32> = self.streams.iter().filter(|(_, s)| matches!(&s.road, Road::Relayed(r) if r.long_lived)).map(|(id, _)| *id).collect();
        for id in long {
            self.fail(id, tonic::Code::Unavailable, "etcd-squeeze: shutting down");
        }
    }

    /// Ends everything at once: the client is gone, or broke the protocol.
    fn close(&mut self) {
        self.closed = true;
        for (_, stream) in self.streams.drain() {
            if let Road::Terminated(h) = &stream.road {
                h.task.abort();
            }
        }
    }
}

impl Future for Relay {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            let mut progress = false;
            while let Poll::Ready(Some(event)) = this.events_rx.poll_recv(cx) {
                this.on_event(event);
                progress = true;
            }
            if let Some(stop) = this.stop.as_mut() {
                if stop.as_mut().poll(cx).is_ready() {
                    this.stop = None;
                    this.on_stop();
                    progress = true;
                }
            }
            // etcd's connections: connect, read, write.
            let mut ui = 0;
            while ui < this.ups.len() {
                if let Io::Connecting(connect) = &mut this.ups[ui].wire.io {
                    match connect.as_mut().poll(cx) {
                        Poll::Pending => {}
                        Poll::Ready(Ok(io)) => {
                            this.ups[ui].wire.io = Io::Open(io);
                            this.ups[ui].heard = Instant::now();
                            progress = true;
                        }
                        Poll::Ready(Err(e)) => {
                            let url = this.ups[ui].url.clone();
                            this.lose_up(ui, &format!("connection error: etcd-squeeze cannot reach etcd at {url}: {e}"));
                            progress = true;
                            continue;
                        }
                    }
                }
                // Nothing more is read from etcd while what it made the relay write piles up.
                let read = if this.ups[ui].wire.backlog() > OUTPUT_BACKLOG || this.client.backlog() > OUTPUT_BACKLOG { Poll::Pending } else { this.ups[ui].wire.poll_read(cx) };
                let failed = match read {
                    Poll::Ready(Ok(0)) => Some("etcd closed the connection".to_string()),
                    Poll::Ready(Ok(_)) => {
                        progress = true;
                        match this.up_frames(ui) {
                            Ok(()) => None,
                            Err(ConnError(c, why)) => {
                                frame::put_goaway(&mut this.ups[ui].wire.wbuf, 0, c, &why);
                                Some(format!("etcd broke the protocol: {why}"))
                            }
                        }
                    }
                    Poll::Ready(Err(e)) => Some(e.to_string()),
                    Poll::Pending => None,
                };
                if let Some(why) = failed {
                    let url = this.ups[ui].url.clone();
                    this.lose_up(ui, &format!("error reading from server: etcd-squeeze lost etcd at {url}: {why}"));
                    progress = true;
                    continue;
                }
                if let Poll::Ready(Err(e)) = this.ups[ui].wire.poll_write(cx) {
                    let url = this.ups[ui].url.clone();
                    this.lose_up(ui, &format!("error reading from server: etcd-squeeze lost etcd at {url}: {e}"));
                    progress = true;
                    continue;
                }
                // A draining connection with nothing left on it is closed.
                let up = &this.ups[ui];
                if up.draining && up.by_id.is_empty() && up.waiting.is_empty() && !up.wire.pending_output() {
                    this.ups.remove(ui);
                    continue;
                }
                ui += 1;
            }
            // The client.
            // Nor from the client while replies to it wait (PING ACKs, refusals, answers).
            let read = if this.client.backlog() > OUTPUT_BACKLOG { Poll::Pending } else { this.client.poll_read(cx) };
            match read {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    this.close();
                }
                Poll::Ready(Ok(_)) => {
                    progress = true;
                    if let Err(ConnError(c, why)) = this.client_frames() {
                        tracing::debug!(error = %why, "client connection broke the HTTP/2 protocol");
                        frame::put_goaway(&mut this.client.wbuf, this.last_id, c, &why);
                        let _ = this.client.poll_write(cx);
                        this.close();
                    }
                }
                Poll::Pending => {}
            }
            if this.closed {
                for up in &mut this.ups {
                    let _ = up.wire.poll_write(cx);
                }
                return Poll::Ready(());
            }
            // Timers.
            let now = Instant::now();
            if let Some(next) = this.on_timers(now) {
                let at = tokio::time::Instant::from_std(next);
                if this.sleep.deadline() != at {
                    this.sleep.as_mut().reset(at);
                }
                if this.sleep.as_mut().poll(cx).is_ready() {
                    progress = true;
                }
            }
            // Writes made by anything above.
            for ui in 0..this.ups.len() {
                if this.ups[ui].wire.pending_output() {
                    if let Poll::Ready(Err(_)) = this.ups[ui].wire.poll_write(cx) {
                        progress = true; // lost: found by the next read
                    }
                }
            }
            match this.client.poll_write(cx) {
                Poll::Ready(Err(_)) => {
                    this.close();
                    return Poll::Ready(());
                }
                Poll::Ready(Ok(())) if this.going_away && this.streams.is_empty() => return Poll::Ready(()),
                _ => {}
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for stream in self.streams.values() {
            if let Road::Terminated(h) = &stream.road {
                h.task.abort();
            }
        }
    }
}

/// A WINDOW_UPDATE's increment (1 ..= 2^31 - 1).
fn window_increment(payload: &[u8]) -> Result<i64, ConnError> {
    if payload.len() != 4 {
        return Err(ConnError(code::FRAME_SIZE_ERROR, "WINDOW_UPDATE".into()));
    }
    let n = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff;
    if n == 0 {
        return Err(ConnError(code::PROTOCOL_ERROR, "WINDOW_UPDATE of 0".into()));
    }
    Ok(n as i64)
}

/// The length a gRPC message prefix declares (`body` has at least 5 bytes).
fn declared(body: &[u8]) -> usize {
    u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize
}

/// Re-encodes `fields` for the other side: connection-specific headers left out, and, toward
/// etcd (`origin`), `:authority` and `:scheme` those of the etcd endpoint.
fn encode(fields: &Fields, origin: Option<(&[u8], &[u8])>) -> Bytes {
    let mut block = BytesMut::with_capacity(fields.bytes.len() + 2 * fields.spans.len() + 16);
    for (name, value) in fields.iter() {
        if connection_specific(name) {
            continue;
        }
        let value = match (origin, name) {
            (Some((authority, _)), b":authority") => authority,
            (Some((_, scheme)), b":scheme") => scheme,
            _ => value,
        };
        frame::encode_field(&mut block, name, value);
    }
    block.freeze()
}
