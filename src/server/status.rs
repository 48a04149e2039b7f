//! The statuses the proxy itself answers with — a response over `limits.max_response_bytes`, a
//! value etcd would refuse as too large (etcd's own message) — and its policy for a stored value
//! it cannot decode (passed on as stored, [`keep_stored`]).

use tonic::Status;

use crate::codec::{DecodeError, DecodeReason, EncodeError, EncodeReason, KeyDisplay};

/// The one conversion of the request path's errors into the client's status.
impl From<crate::error::RequestError> for Status {
    fn from(e: crate::error::RequestError) -> Status {
        use crate::error::RequestError;
        match e {
            RequestError::Etcd(status) => status,
            RequestError::Stored(e) => decode_status(e),
            RequestError::Refused(e) => encode_status(e),
            RequestError::Internal(message) => {
                tracing::error!(error = %message, "internal error on the request path");
                Status::internal(format!("etcd-squeeze: {message}"))
            }
        }
    }
}

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

/// The proxy's policy for a stored value it cannot decode, as the `undecodable` of
/// [`crate::rewrite::decode_with`]: the client gets the stored bytes, as etcd itself would
/// return them, and only that object is affected — kube-apiserver's decoder fails on it (a
/// frame's magic `FF 53 51 5A` parses as neither JSON, protobuf nor CBOR) and its own machinery
/// for corrupt objects takes over (KEP-3926: it names the object and can delete it unsafely).
/// Counted in `etcd_squeeze_decode_errors_total{reason}` and logged with the key (never the bytes).
///
/// A response over `limits.max_response_bytes` still fails a read (`RESOURCE_EXHAUSTED`: the
/// client should page), but never a write etcd applied (`applied`): a committed write is never
/// reported as failed.
pub fn keep_stored(applied: bool) -> impl FnMut(DecodeError) -> Result<(), DecodeError> {
    move |e: DecodeError| {
        if let DecodeReason::ResponseTooLarge { .. } = e.reason {
            if !applied {
                return Err(e); // counted by decode_status
            }
            crate::metrics::get().decode_errors.with_label_values(&[e.reason.kind()]).inc();
            tracing::warn!(key = %KeyDisplay(&e.key), reason = %e.reason, "prev_kv of an applied write passed on as stored");
            return Ok(());
        }
        crate::metrics::get().decode_errors.with_label_values(&[e.reason.kind()]).inc();
        tracing::error!(key = %KeyDisplay(&e.key), reason = %e.reason,
            "stored value cannot be decoded: passed to the client as stored, as etcd would return it");
        Ok(())
    }
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
