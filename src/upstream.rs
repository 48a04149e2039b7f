//! The connection to the real etcd: one HTTP/2 channel balanced across every endpoint, with
//! reconnect and failover. All connection code lives here.
//!
//! With several endpoints, a background task probes each one (a TCP connect) every
//! [`PROBE_INTERVAL`] and keeps only the reachable ones in tonic's balancer
//! (`Channel::balance_channel`): tonic's static `balance_list` would keep routing calls to an
//! endpoint that refuses connections. When none is reachable, all are kept, so calls fail fast
//! with etcd-like UNAVAILABLE instead of waiting.

use std::time::Duration;

use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};

use crate::config::UpstreamConfig;

/// HTTP/2 stream window toward etcd: 4 MiB, so a 1.5 MiB Put or a large Range page flows
/// without waiting for WINDOW_UPDATEs.
const STREAM_WINDOW_BYTES: u32 = 4 << 20;
/// HTTP/2 connection window toward etcd: 16 MiB, room for ~4 such streams at full speed.
const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;

/// An invalid upstream endpoint.
#[derive(Debug, thiserror::Error)]
#[error("upstream.endpoints: {endpoint:?}: {source}")]
pub struct UpstreamError {
    /// The endpoint URL as configured.
    pub endpoint: String,
    /// tonic's error.
    pub source: tonic::transport::Error,
}

/// Builds the lazily-connecting channel to etcd. Connections are made on first use and
/// re-made after failures; a call is routed to an endpoint that is up.
///
/// Errors: an endpoint that is not a valid URI.
pub fn channel(config: &UpstreamConfig) -> Result<Channel, UpstreamError> {
    let endpoints = config
        .endpoints
        .iter()
        .map(|e| {
            Endpoint::from_shared(e.clone())
                .map(|ep| {
                    ep.connect_timeout(config.connect_timeout)
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(config.keepalive_interval)
                        .keep_alive_timeout(config.keepalive_timeout)
                        .keep_alive_while_idle(false)
                        .initial_stream_window_size(STREAM_WINDOW_BYTES)
                        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
                })
                .map_err(|source| UpstreamError { endpoint: e.clone(), source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if endpoints.len() == 1 {
        return Ok(endpoints.into_iter().next().expect("one").connect_lazy());
    }
    let (channel, changes) = Channel::balance_channel(endpoints.len());
    tokio::spawn(probe_loop(endpoints, changes, config.connect_timeout));
    Ok(channel)
}

/// How often each endpoint's reachability is checked when there are several.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Keeps the balancer's endpoint set equal to the reachable endpoints (all of them when none
/// is). Ends when the channel is dropped.
async fn probe_loop(endpoints: Vec<Endpoint>, changes: tokio::sync::mpsc::Sender<Change<usize, Endpoint>>, timeout: Duration) {
    let mut member = vec![false; endpoints.len()];
    loop {
        let probes = endpoints.iter().map(|e| reachable(e, timeout));
        let up: Vec<bool> = futures::future::join_all(probes).await;
        let any_up = up.iter().any(|u| *u);
        for (i, endpoint) in endpoints.iter().enumerate() {
            let want = up[i] || !any_up;
            if want == member[i] {
                continue;
            }
            let change = if want { Change::Insert(i, endpoint.clone()) } else { Change::Remove(i) };
            if want != up[i] || !want {
                tracing::warn!(endpoint = %endpoint.uri(), reachable = up[i], "upstream endpoint state changed");
            } else {
                tracing::info!(endpoint = %endpoint.uri(), "upstream endpoint reachable");
            }
            if changes.send(change).await.is_err() {
                return;
            }
            member[i] = want;
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// True when a TCP connection to the endpoint's host and port succeeds within `timeout`.
async fn reachable(endpoint: &Endpoint, timeout: Duration) -> bool {
    let uri = endpoint.uri();
    let (Some(host), Some(port)) = (uri.host(), uri.port_u16()) else { return false };
    matches!(tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port))).await, Ok(Ok(_)))
}
