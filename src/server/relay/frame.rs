//! HTTP/2 frames as the relay reads and writes them (RFC 9113 §4, §6): the 9-byte frame header,
//! the frames the relay makes itself, SETTINGS, and header blocks encoded without the dynamic
//! table (RFC 7541 §6.2.2: literal fields "without indexing", so a block the relay writes never
//! changes the peer's decoding context).

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The connection preface a client sends first (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types (RFC 9113 §6).
pub mod kind {
    /// DATA.
    pub const DATA: u8 = 0;
    /// HEADERS.
    pub const HEADERS: u8 = 1;
    /// PRIORITY.
    pub const PRIORITY: u8 = 2;
    /// RST_STREAM.
    pub const RST_STREAM: u8 = 3;
    /// SETTINGS.
    pub const SETTINGS: u8 = 4;
    /// PUSH_PROMISE.
    pub const PUSH_PROMISE: u8 = 5;
    /// PING.
    pub const PING: u8 = 6;
    /// GOAWAY.
    pub const GOAWAY: u8 = 7;
    /// WINDOW_UPDATE.
    pub const WINDOW_UPDATE: u8 = 8;
    /// CONTINUATION.
    pub const CONTINUATION: u8 = 9;
}

/// Frame flags.
pub mod flag {
    /// END_STREAM (DATA, HEADERS).
    pub const END_STREAM: u8 = 0x1;
    /// ACK (SETTINGS, PING).
    pub const ACK: u8 = 0x1;
    /// END_HEADERS (HEADERS, CONTINUATION).
    pub const END_HEADERS: u8 = 0x4;
    /// PADDED (DATA, HEADERS).
    pub const PADDED: u8 = 0x8;
    /// PRIORITY (HEADERS).
    pub const PRIORITY: u8 = 0x20;
}

/// Error codes (RFC 9113 §7).
pub mod code {
    /// NO_ERROR.
    pub const NO_ERROR: u32 = 0x0;
    /// PROTOCOL_ERROR.
    pub const PROTOCOL_ERROR: u32 = 0x1;
    /// INTERNAL_ERROR.
    pub const INTERNAL_ERROR: u32 = 0x2;
    /// FLOW_CONTROL_ERROR.
    pub const FLOW_CONTROL_ERROR: u32 = 0x3;
    /// STREAM_CLOSED.
    pub const STREAM_CLOSED: u32 = 0x5;
    /// FRAME_SIZE_ERROR.
    pub const FRAME_SIZE_ERROR: u32 = 0x6;
    /// REFUSED_STREAM.
    pub const REFUSED_STREAM: u32 = 0x7;
    /// CANCEL.
    pub const CANCEL: u32 = 0x8;
    /// COMPRESSION_ERROR.
    pub const COMPRESSION_ERROR: u32 = 0x9;
    /// ENHANCE_YOUR_CALM.
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;
}

/// SETTINGS identifiers (RFC 9113 §6.5.2).
pub mod setting {
    /// SETTINGS_HEADER_TABLE_SIZE.
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    /// SETTINGS_ENABLE_PUSH.
    pub const ENABLE_PUSH: u16 = 0x2;
    /// SETTINGS_MAX_CONCURRENT_STREAMS.
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    /// SETTINGS_INITIAL_WINDOW_SIZE.
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    /// SETTINGS_MAX_FRAME_SIZE.
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    /// SETTINGS_MAX_HEADER_LIST_SIZE.
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// The default (and smallest) SETTINGS_MAX_FRAME_SIZE: 16 KiB.
pub const DEFAULT_MAX_FRAME: u32 = 16_384;
/// The initial flow-control window of every stream and connection: 65,535 bytes.
pub const DEFAULT_WINDOW: i64 = 65_535;
/// The largest flow-control window: 2^31 - 1 bytes.
pub const MAX_WINDOW: i64 = (1 << 31) - 1;

/// A frame header: payload length (bytes), type, flags, stream identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Payload length in bytes (at most the receiver's SETTINGS_MAX_FRAME_SIZE).
    pub len: usize,
    /// Frame type ([`kind`]).
    pub kind: u8,
    /// Flags ([`flag`]).
    pub flags: u8,
    /// Stream identifier (0: the connection); the reserved bit is cleared.
    pub stream: u32,
}

impl Head {
    /// Parses the 9-byte header at the start of `buf` (`None`: fewer than 9 bytes).
    pub fn parse(buf: &[u8]) -> Option<Head> {
        if buf.len() < 9 {
            return None;
        }
        let len = (buf[0] as usize) << 16 | (buf[1] as usize) << 8 | buf[2] as usize;
        let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
        Some(Head { len, kind: buf[3], flags: buf[4], stream })
    }

    /// Whether `flag` is set.
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// Appends a frame header.
pub fn put_head(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    out.reserve(9 + len);
    out.put_uint(len as u64, 3);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream & 0x7fff_ffff);
}

/// Appends a DATA frame carrying `data` (at most the peer's max frame size).
pub fn put_data(out: &mut BytesMut, stream: u32, data: &[u8], end_stream: bool) {
    put_head(out, data.len(), kind::DATA, if end_stream { flag::END_STREAM } else { 0 }, stream);
    out.put_slice(data);
}

/// Appends a header block as one HEADERS frame and as many CONTINUATION frames as
/// `max_frame` requires.
pub fn put_headers(out: &mut BytesMut, stream: u32, block: &[u8], end_stream: bool, max_frame: usize) {
    let mut chunks = block.chunks(max_frame.max(1));
    let first = chunks.next().unwrap_or(&[]);
    let last = first.len() == block.len();
    let flags = if end_stream { flag::END_STREAM } else { 0 } | if last { flag::END_HEADERS } else { 0 };
    put_head(out, first.len(), kind::HEADERS, flags, stream);
    out.put_slice(first);
    let mut sent = first.len();
    for chunk in chunks {
        sent += chunk.len();
        put_head(out, chunk.len(), kind::CONTINUATION, if sent == block.len() { flag::END_HEADERS } else { 0 }, stream);
        out.put_slice(chunk);
    }
}

/// Appends a SETTINGS frame with `values` (an empty, ACK-less frame when empty).
pub fn put_settings(out: &mut BytesMut, values: &[(u16, u32)]) {
    put_head(out, values.len() * 6, kind::SETTINGS, 0, 0);
    for &(id, value) in values {
        out.put_u16(id);
        out.put_u32(value);
    }
}

/// Appends a SETTINGS acknowledgement.
pub fn put_settings_ack(out: &mut BytesMut) {
    put_head(out, 0, kind::SETTINGS, flag::ACK, 0);
}

/// Appends a WINDOW_UPDATE of `increment` bytes (1 ..= 2^31 - 1) for `stream` (0: the connection).
pub fn put_window_update(out: &mut BytesMut, stream: u32, increment: u32) {
    put_head(out, 4, kind::WINDOW_UPDATE, 0, stream);
    out.put_u32(increment & 0x7fff_ffff);
}

/// Appends an RST_STREAM with error `code`.
pub fn put_rst(out: &mut BytesMut, stream: u32, code: u32) {
    put_head(out, 4, kind::RST_STREAM, 0, stream);
    out.put_u32(code);
}

/// Appends a PING (or its ACK) carrying `payload`.
pub fn put_ping(out: &mut BytesMut, payload: [u8; 8], ack: bool) {
    put_head(out, 8, kind::PING, if ack { flag::ACK } else { 0 }, 0);
    out.put_slice(&payload);
}

/// Appends a GOAWAY naming `last_stream` with error `code` and a debug text.
pub fn put_goaway(out: &mut BytesMut, last_stream: u32, code: u32, debug: &str) {
    put_head(out, 8 + debug.len(), kind::GOAWAY, 0, 0);
    out.put_u32(last_stream & 0x7fff_ffff);
    out.put_u32(code);
    out.put_slice(debug.as_bytes());
}

/// The payload of a DATA or HEADERS frame without its padding (and, for HEADERS, without the
/// priority fields): `None` when the padding is longer than the payload (PROTOCOL_ERROR).
pub fn unpadded(head: &Head, mut payload: Bytes) -> Option<Bytes> {
    let mut pad = 0usize;
    if head.has(flag::PADDED) {
        if payload.is_empty() {
            return None;
        }
        pad = payload.get_u8() as usize;
    }
    if head.kind == kind::HEADERS && head.has(flag::PRIORITY) {
        if payload.len() < 5 {
            return None;
        }
        payload.advance(5);
    }
    if pad > payload.len() {
        return None;
    }
    payload.truncate(payload.len() - pad);
    Some(payload)
}

/// Peer settings the relay honours when it writes to that peer.
#[derive(Debug, Clone, Copy)]
pub struct PeerSettings {
    /// SETTINGS_INITIAL_WINDOW_SIZE: each new stream's send window, in bytes.
    pub initial_window: i64,
    /// SETTINGS_MAX_FRAME_SIZE, in bytes.
    pub max_frame: usize,
    /// SETTINGS_MAX_CONCURRENT_STREAMS (streams the relay may open; unlimited by default).
    pub max_streams: u32,
    /// SETTINGS_HEADER_TABLE_SIZE: the peer's HPACK dynamic table, in bytes (default 4,096).
    pub header_table_size: usize,
}

impl Default for PeerSettings {
    fn default() -> Self {
        PeerSettings { initial_window: DEFAULT_WINDOW, max_frame: DEFAULT_MAX_FRAME as usize, max_streams: u32::MAX, header_table_size: 4096 }
    }
}

impl PeerSettings {
    /// Applies one SETTINGS frame's payload. Returns the change of the initial window (to
    /// apply to every open stream), or the error code of an invalid value.
    pub fn apply(&mut self, mut payload: &[u8]) -> Result<i64, u32> {
        if payload.len() % 6 != 0 {
            return Err(code::FRAME_SIZE_ERROR);
        }
        let mut delta = 0;
        while payload.len() >= 6 {
            let id = payload.get_u16();
            let value = payload.get_u32();
            match id {
                setting::INITIAL_WINDOW_SIZE => {
                    if value as i64 > MAX_WINDOW {
                        return Err(code::FLOW_CONTROL_ERROR);
                    }
                    delta += value as i64 - self.initial_window;
                    self.initial_window = value as i64;
                }
                setting::MAX_FRAME_SIZE => {
                    if !(DEFAULT_MAX_FRAME..=(1 << 24) - 1).contains(&value) {
                        return Err(code::PROTOCOL_ERROR);
                    }
                    self.max_frame = value as usize;
                }
                setting::MAX_CONCURRENT_STREAMS => self.max_streams = value,
                setting::HEADER_TABLE_SIZE => self.header_table_size = value as usize,
                setting::ENABLE_PUSH if value > 1 => return Err(code::PROTOCOL_ERROR),
                _ => {}
            }
        }
        Ok(delta)
    }
}

/// HPACK's static table entries the relay's encoder refers to by index (RFC 7541 Appendix A):
/// `(index, name, value)`; an empty value means "name only".
const STATIC: &[(u8, &[u8], &[u8])] = &[
    (2, b":method", b"GET"),
    (3, b":method", b"POST"),
    (4, b":path", b"/"),
    (6, b":scheme", b"http"),
    (7, b":scheme", b"https"),
    (8, b":status", b"200"),
    (1, b":authority", b""),
    (4, b":path", b""),
    (6, b":scheme", b""),
    (8, b":status", b""),
    (31, b"content-type", b""),
    (58, b"user-agent", b""),
    (28, b"content-length", b""),
];

/// Appends one header field to an HPACK block: an indexed field when the static table holds
/// the pair, else a literal "without indexing" (with the name indexed when the static table
/// holds it). No Huffman coding: the bytes cost less to write and to read.
pub fn encode_field(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    if let Some(&(i, _, _)) = STATIC.iter().find(|(_, n, v)| !v.is_empty() && *n == name && *v == value) {
        out.put_u8(0x80 | i);
        return;
    }
    match STATIC.iter().find(|(_, n, v)| v.is_empty() && *n == name) {
        Some(&(i, _, _)) => put_int(out, i as usize, 4, 0x00),
        None => {
            out.put_u8(0x00);
            put_int(out, name.len(), 7, 0x00);
            out.put_slice(name);
        }
    }
    put_int(out, value.len(), 7, 0x00);
    out.put_slice(value);
}

/// An HPACK integer with an `prefix`-bit prefix, the other bits of the first byte `high`.
fn put_int(out: &mut BytesMut, mut value: usize, prefix: u8, high: u8) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.put_u8(high | value as u8);
        return;
    }
    out.put_u8(high | max as u8);
    value -= max;
    while value >= 128 {
        out.put_u8((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.put_u8(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_round_trip() {
        let mut out = BytesMut::new();
        put_head(&mut out, 70_000, kind::DATA, flag::END_STREAM, 0x8000_0003);
        assert_eq!(Head::parse(&out), Some(Head { len: 70_000, kind: kind::DATA, flags: 1, stream: 3 }));
        assert_eq!(Head::parse(&out[..8]), None);
    }

    #[test]
    fn header_blocks_decode_and_never_touch_the_dynamic_table() {
        let fields: Vec<(&[u8], Vec<u8>)> = vec![
            (b":status", b"200".to_vec()),
            (b":method", b"POST".to_vec()),
            (b":path", b"/etcdserverpb.KV/Range".to_vec()),
            (b"content-type", b"application/grpc".to_vec()),
            (b"grpc-status", b"0".to_vec()),
            (b"x-long", vec![b'a'; 300]),
        ];
        let mut block = BytesMut::new();
        for (n, v) in &fields {
            encode_field(&mut block, n, v);
        }
        // A dynamic table of 0 bytes: any field the block indexed would be refused.
        let mut decoder = super::super::hpack::Decoder::new(0);
        let want: Vec<(Vec<u8>, Vec<u8>)> = fields.iter().map(|(n, v)| (n.to_vec(), v.clone())).collect();
        let mut decoded = Vec::new();
        decoder.decode(&block, 1 << 20, |n, v| decoded.push((n.to_vec(), v.to_vec()))).unwrap();
        assert_eq!(decoded, want);
    }

    #[test]
    fn long_blocks_are_split_into_continuations() {
        let block = vec![7u8; 40_000];
        let mut out = BytesMut::new();
        put_headers(&mut out, 5, &block, true, 16_384);
        let mut buf = out.freeze();
        let mut joined = Vec::new();
        let mut kinds = Vec::new();
        while let Some(h) = Head::parse(&buf) {
            buf.advance(9);
            joined.extend_from_slice(&buf[..h.len]);
            buf.advance(h.len);
            kinds.push((h.kind, h.flags));
        }
        assert_eq!(joined, block);
        assert_eq!(kinds, vec![(kind::HEADERS, flag::END_STREAM), (kind::CONTINUATION, 0), (kind::CONTINUATION, flag::END_HEADERS)]);
    }

    #[test]
    fn padding_and_priority_are_stripped_and_bad_padding_refused() {
        let head = Head { len: 0, kind: kind::HEADERS, flags: flag::PADDED | flag::PRIORITY, stream: 1 };
        let payload = Bytes::from_static(&[2, 0, 0, 0, 0, 9, b'x', b'y', 0, 0]);
        assert_eq!(&unpadded(&head, payload).unwrap()[..], b"xy");
        let data = Head { len: 0, kind: kind::DATA, flags: flag::PADDED, stream: 1 };
        assert!(unpadded(&data, Bytes::from_static(&[5, 1])).is_none());
        assert!(unpadded(&data, Bytes::new()).is_none());
    }

    #[test]
    fn settings_change_windows_and_refuse_bad_values() {
        let mut s = PeerSettings::default();
        let mut payload = BytesMut::new();
        payload.put_u16(setting::INITIAL_WINDOW_SIZE);
        payload.put_u32(1 << 20);
        payload.put_u16(setting::MAX_FRAME_SIZE);
        payload.put_u32(1 << 20);
        assert_eq!(s.apply(&payload), Ok((1 << 20) - DEFAULT_WINDOW));
        assert_eq!(s.max_frame, 1 << 20);
        assert_eq!(s.apply(&[0, 4, 0x80, 0, 0, 0]), Err(code::FLOW_CONTROL_ERROR));
        assert_eq!(s.apply(&[0, 5, 0, 0, 0, 1]), Err(code::PROTOCOL_ERROR));
        assert_eq!(s.apply(&[0, 5, 0]), Err(code::FRAME_SIZE_ERROR));
    }
}
