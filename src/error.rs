//! The request path's one error type: what went wrong, by where it came from. Modules below the
//! server (delta frames, dictionaries) return it; the server turns it into the client's
//! `tonic::Status` in one place (`From<RequestError> for tonic::Status` in
//! `server/status.rs`), as pingora's `ErrorSource` separates upstream, downstream and internal.

use crate::codec::{DecodeError, EncodeError};

/// Why a call on the request path failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// etcd's own answer to a call the proxy made on the client's behalf (loading a base or a
    /// dictionary), or the transport's failure to reach it: passed to the client unchanged, so
    /// it retries as it would against etcd.
    #[error("etcd: {0}")]
    Etcd(tonic::Status),
    /// A stored value that cannot be decoded (`DATA_LOSS` naming the key), or a response that
    /// would decode beyond `limits.max_response_bytes` (`RESOURCE_EXHAUSTED`).
    #[error(transparent)]
    Stored(DecodeError),
    /// A value refused by a limit before it reached etcd (over `limits.max_value_bytes`: etcd's own
    /// "etcdserver: request is too large").
    #[error(transparent)]
    Refused(EncodeError),
    /// The proxy's own failure, or an answer from etcd that cannot happen (`INTERNAL`).
    #[error("etcd-squeeze: {0}")]
    Internal(String),
}

impl From<crate::wire::WireError> for RequestError {
    /// etcd's response bytes are not a message of the shape its method answers with.
    fn from(e: crate::wire::WireError) -> Self {
        RequestError::Internal(format!("etcd's response cannot be read: {e}"))
    }
}

impl From<tonic::Status> for RequestError {
    fn from(status: tonic::Status) -> Self {
        RequestError::Etcd(status)
    }
}
