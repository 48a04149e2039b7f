//! The etcd-squeeze frame: a small self-describing header in front of a stored value.
//!
//! ```text
//! offset  size  field
//! 0       4     magic            FF 53 51 5A  ("\xFFSQZ")
//! 4       1     format version   1
//! 5       1     codec            0 = stored raw, 1 = zstd, 2 = zstd delta
//! 6       4     dictionary ID    u32 little-endian, 0 = no dictionary (always 0 for codec 2)
//! 10      ...   payload          raw: the value itself; zstd: exactly one zstd frame
//!                                with Frame_Content_Size and a content checksum
//!
//! codec 2 (delta) only:
//! 10      8     base ID          u64 little-endian
//! 18      8     base checksum    u64 little-endian (see `super::delta`)
//! 26      ...   payload          one zstd frame compressed against the base content
//! ```
//!
//! `0xFF` never occurs in UTF-8, so the magic cannot begin a JSON document, a Kubernetes
//! protobuf value (`k8s\x00`) or an encrypted one (`k8s:enc:`). The full description is in
//! `docs/frame-format.md`. Everything here is a pure function over bytes.

use std::fmt;

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = [0xFF, b'S', b'Q', b'Z'];
/// The only format version this build writes and reads.
pub const VERSION: u8 = 1;
/// Length of the fixed header in bytes (magic, version, codec, dictionary ID).
pub const HEADER_LEN: usize = 10;
/// Bytes a delta frame has after the common frame header: base ID (u64) and base checksum (u64).
pub const DELTA_REF_LEN: usize = 16;

/// How the payload of a frame is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// The payload is the original value, unchanged (it did not shrink, was below the
    /// prefix's `min_size`, or the prefix does not compress).
    Raw = 0,
    /// The payload is one zstd frame.
    Zstd = 1,
    /// The payload is one zstd frame compressed with a base (an earlier version of the same key)
    /// as its prefix; the header names the base (`super::delta`).
    Delta = 2,
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Codec::Raw => "raw",
            Codec::Zstd => "zstd",
            Codec::Delta => "delta",
        })
    }
}

/// The base a delta frame names (the base records themselves are in `super::delta`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseRef {
    /// The base ID.
    pub id: u64,
    /// The base content's checksum.
    pub checksum: u64,
}

/// A parsed frame header plus a borrowed payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Format version (always [`VERSION`] for frames this build accepts).
    pub version: u8,
    /// Payload codec.
    pub codec: Codec,
    /// zstd dictionary ID the payload was compressed with; 0 = none.
    pub dictionary_id: u32,
    /// The base a delta frame (codec 2) names; `None` for the other codecs.
    pub base: Option<BaseRef>,
    /// The bytes after the header (after the base reference for a delta frame).
    pub payload: &'a [u8],
}

/// Why bytes that start with [`MAGIC`] are not a valid frame header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer than [`HEADER_LEN`] bytes (26 for a delta frame).
    #[error("truncated frame header ({0} bytes)")]
    Truncated(usize),
    /// A format version this build does not know.
    #[error("unknown frame format version {0} (this build reads version {VERSION})")]
    UnknownVersion(u8),
    /// A codec byte this build does not know.
    #[error("unknown codec {0}")]
    UnknownCodec(u8),
}

/// True when `value` begins with [`MAGIC`], i.e. it must be read as a frame.
pub fn is_framed(value: &[u8]) -> bool {
    value.starts_with(&MAGIC)
}

/// Parses the header of a value that [`is_framed`].
///
/// Errors: [`HeaderError`] for a short header, an unknown version or an unknown codec.
pub fn parse(value: &[u8]) -> Result<Frame<'_>, HeaderError> {
    if value.len() < HEADER_LEN {
        return Err(HeaderError::Truncated(value.len()));
    }
    let version = value[4];
    if version != VERSION {
        return Err(HeaderError::UnknownVersion(version));
    }
    let codec = match value[5] {
        0 => Codec::Raw,
        1 => Codec::Zstd,
        2 => Codec::Delta,
        other => return Err(HeaderError::UnknownCodec(other)),
    };
    let dictionary_id = u32::from_le_bytes([value[6], value[7], value[8], value[9]]);
    if codec != Codec::Delta {
        return Ok(Frame { version, codec, dictionary_id, base: None, payload: &value[HEADER_LEN..] });
    }
    let end = HEADER_LEN + DELTA_REF_LEN;
    let reference = value.get(HEADER_LEN..end).ok_or(HeaderError::Truncated(value.len()))?;
    let id = u64::from_le_bytes(reference[..8].try_into().expect("8 bytes"));
    let checksum = u64::from_le_bytes(reference[8..].try_into().expect("8 bytes"));
    let base = Some(BaseRef { id, checksum });
    Ok(Frame { version, codec, dictionary_id, base, payload: &value[end..] })
}

/// Writes a header for `codec` and `dictionary_id` into `out` (which should be empty),
/// ready for the payload to be appended.
pub fn write_header(out: &mut Vec<u8>, codec: Codec, dictionary_id: u32) {
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(codec as u8);
    out.extend_from_slice(&dictionary_id.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let mut v = Vec::new();
        write_header(&mut v, Codec::Zstd, 0xDEAD_BEEF);
        v.extend_from_slice(b"payload");
        assert!(is_framed(&v));
        let f = parse(&v).unwrap();
        assert_eq!(f, Frame { version: 1, codec: Codec::Zstd, dictionary_id: 0xDEAD_BEEF, base: None, payload: b"payload" });
        let mut d = Vec::new();
        write_header(&mut d, Codec::Delta, 0);
        assert_eq!(parse(&d), Err(HeaderError::Truncated(HEADER_LEN)), "a delta frame needs its base reference");
    }

    #[test]
    fn magic_never_begins_json_or_kubernetes_values() {
        for v in [&b"{\"a\":1}"[..], b"[1]", b" {}", b"k8s\x00\x0a", b"k8s:enc:aescbc:v1:key:", b"\"s\"", b""] {
            assert!(!is_framed(v), "{v:?}");
        }
    }

    #[test]
    fn bad_headers() {
        assert_eq!(parse(&MAGIC), Err(HeaderError::Truncated(4)));
        let mut v = Vec::new();
        write_header(&mut v, Codec::Raw, 0);
        v[4] = 9;
        assert_eq!(parse(&v), Err(HeaderError::UnknownVersion(9)));
        v[4] = VERSION;
        v[5] = 7;
        assert_eq!(parse(&v), Err(HeaderError::UnknownCodec(7)));
    }
}
