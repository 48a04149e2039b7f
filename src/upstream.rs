//! The connection to the real etcd: one HTTP/2 channel balanced across every endpoint, with
//! reconnect and failover (tonic's `Channel::balance_list`). All connection code lives here.

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
    Ok(if endpoints.len() == 1 {
        endpoints.into_iter().next().expect("one").connect_lazy()
    } else {
        Channel::balance_list(endpoints.into_iter())
    })
}
