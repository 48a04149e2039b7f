//! A stream the relay does not carry to etcd itself: served by the proxy's gRPC services (KV
//! calls that touch compressed keys, Watch, Compact, health, unknown methods) or by
//! [`crate::server::etcd_http`] (HTTP requests that are not gRPC), as a task of its own.
//!
//! The task gets an `http::Request` whose body is fed by the relay with the client's DATA
//! frames, and hands back the response as [`Event`]s; a per-stream credit (bytes) bounds what it
//! may hand back before the relay has written it to the client.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::sync::{mpsc, Semaphore};
use tonic::body::Body;
use tower::ServiceExt;

use crate::server::etcd_http::EtcdHttp;
use crate::server::front::GrpcService;

/// Bytes of response a stream's task may hand the relay before the relay has written them to
/// the client: 1 MiB (a slow client holds at most this much per stream in the proxy).
pub const CREDIT_BYTES: usize = 1 << 20;

/// What a stream's task tells the relay.
pub enum Event {
    /// The response head; `end` when the response has no body (a trailers-only gRPC answer).
    Head { id: u32, parts: http::response::Parts, end: bool },
    /// A chunk of the response body (credit for its length was taken).
    Data { id: u32, data: Bytes },
    /// The response's trailers: the stream's end.
    Trailers { id: u32, trailers: http::HeaderMap },
    /// The response body ended without trailers.
    End { id: u32 },
    /// The task read `bytes` of the request body: the client may send that much more.
    Consumed { id: u32, bytes: usize },
}

/// Who serves a terminated stream.
#[derive(Clone)]
pub struct Services {
    /// The gRPC services, with their layers (metrics, etcd's statuses).
    pub grpc: GrpcService,
    /// etcd's HTTP endpoints.
    pub http: Arc<EtcdHttp>,
}

/// The relay's end of a terminated stream.
pub struct Handle {
    /// Feeds the request body; `None` once the client ended it.
    pub body: Option<mpsc::UnboundedSender<Result<Frame<Bytes>, tonic::Status>>>,
    /// Response credit, given back as the relay writes the response.
    pub credit: Arc<Semaphore>,
    /// The task; aborted when the client resets the stream or goes away.
    pub task: tokio::task::AbortHandle,
}

/// Starts serving `request` (its body fed through the returned handle) on a task of its own.
pub fn spawn(
    id: u32,
    request: http::request::Parts,
    grpc: bool,
    services: &Services,
    events: mpsc::UnboundedSender<Event>,
) -> Handle {
    let (body_tx, body_rx) = mpsc::unbounded_channel();
    let body = Body::new(Fed { rx: body_rx, id, events: events.clone() });
    let request = http::Request::from_parts(request, body);
    let credit = Arc::new(Semaphore::new(CREDIT_BYTES));
    let services = services.clone();
    let task_credit = credit.clone();
    let task = tokio::spawn(async move {
        // A task that ends without the stream's end (a panic in a service) ends the stream with
        // INTERNAL instead of leaving the client waiting (an aborted task's stream is gone).
        let mut guard = Unfinished { id, events: Some(events.clone()) };
        let response = if grpc {
            match services.grpc.oneshot(request).await {
                Ok(r) => r.map(Body::new),
                Err(never) => match never {},
            }
        } else {
            services.http.serve(request).await
        };
        let (parts, mut body) = response.into_parts();
        let end = http_body::Body::is_end_stream(&body);
        if events.send(Event::Head { id, parts, end }).is_err() || end {
            guard.events = None;
            return;
        }
        loop {
            let event = match body.frame().await {
                None => Event::End { id },
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => continue,
                    Ok(data) => {
                        let n = data.len().min(CREDIT_BYTES) as u32;
                        match task_credit.acquire_many(n).await {
                            Ok(permit) => permit.forget(),
                            Err(_) => return,
                        }
                        Event::Data { id, data }
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => Event::Trailers { id, trailers },
                        Err(_) => continue,
                    },
                },
                // A body that fails ends the call with its status, as tonic's server does.
                Some(Err(status)) => {
                    let mut trailers = http::HeaderMap::new();
                    let _ = status.add_header(&mut trailers);
                    Event::Trailers { id, trailers }
                }
            };
            let last = !matches!(event, Event::Data { .. });
            if events.send(event).is_err() || last {
                guard.events = None;
                return;
            }
        }
    });
    Handle { body: Some(body_tx), credit, task: task.abort_handle() }
}

/// Ends a stream with INTERNAL when its task stops before the stream's end.
struct Unfinished {
    id: u32,
    events: Option<mpsc::UnboundedSender<Event>>,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(events) = self.events.take() {
            let mut trailers = http::HeaderMap::new();
            let _ = tonic::Status::internal("etcd-squeeze: internal error serving this call").add_header(&mut trailers);
            let _ = events.send(Event::Trailers { id: self.id, trailers });
        }
    }
}

/// A request body fed by the relay; tells the relay what it consumed (flow control).
struct Fed {
    rx: mpsc::UnboundedReceiver<Result<Frame<Bytes>, tonic::Status>>,
    id: u32,
    events: mpsc::UnboundedSender<Event>,
}

impl http_body::Body for Fed {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let frame = std::task::ready!(self.rx.poll_recv(cx));
        if let Some(Ok(Some(data))) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
            let _ = self.events.send(Event::Consumed { id: self.id, bytes: data.len() });
        }
        Poll::Ready(frame)
    }
}
