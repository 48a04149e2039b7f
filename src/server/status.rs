//! The statuses the proxy itself answers with: a stored value that cannot be decoded
//! (DATA_LOSS naming the key), a response over `limits.max_response_bytes`, a value etcd would
//! refuse as too large (etcd's own message).

use tonic::Status;

use crate::codec::{DecodeError, DecodeReason, EncodeError, EncodeReason, KeyDisplay};
use crate::proto::etcdserverpb::ResponseHeader;

/// A stored frame that cannot be decoded: `DATA_LOSS` naming the key and the reason; a
/// response that would decompress beyond `limits.max_response_bytes`: `RESOURCE_EXHAUSTED`.
pub fn decode_status(e: DecodeError) -> Status {
    crate::metrics::get().decode_errors.with_label_values(&[e.reason.kind()]).inc();
    if let DecodeReason::ResponseTooLarge { .. } = e.reason {
        tracing::warn!(key = %KeyDisplay(&e.key), reason = %e.reason, "response too large");
        return Status::resource_exhausted(e.to_string());
    }
    tracing::error!(key = %KeyDisplay(&e.key), reason = %e.reason, "cannot decode stored value");
    Status::data_loss(e.to_string())
}

/// [`decode_status`] for a response whose write etcd has already applied (a `prev_kv` that
/// cannot be decoded): the status says so, so a client does not take the write for failed.
pub fn applied_decode_status(e: DecodeError, header: Option<&ResponseHeader>) -> Status {
    let status = decode_status(e);
    let revision = header.map_or(0, |h| h.revision);
    Status::new(status.code(), format!("{} (the write itself was applied at revision {revision})", status.message()))
}

/// A value that cannot be stored. Over `limits.max_value_bytes`: etcd's own
/// `InvalidArgument "etcdserver: request is too large"`, byte-exact, so kube-apiserver (and
/// Flyte) react as they do to etcd. A zstd failure (not expected): `INTERNAL` naming the key.
pub fn encode_status(e: EncodeError) -> Status {
    match e.reason {
        EncodeReason::TooLarge { .. } => {
            tracing::info!(key = %KeyDisplay(&e.key), reason = %e.reason, "refused: value too large");
            Status::invalid_argument(ETCD_REQUEST_TOO_LARGE)
        }
        EncodeReason::Zstd(_) => {
            tracing::error!(key = %KeyDisplay(&e.key), reason = %e.reason, "cannot compress value");
            Status::internal(e.to_string())
        }
    }
}

/// etcd's `rpctypes.ErrGRPCRequestTooLarge` message (code INVALID_ARGUMENT).
pub const ETCD_REQUEST_TOO_LARGE: &str = "etcdserver: request is too large";
