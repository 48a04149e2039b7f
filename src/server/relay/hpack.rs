//! HPACK decoding (RFC 7541) of the header blocks the relay reads: the static table, a dynamic
//! table per peer, integers, literals; Huffman-coded strings are decoded by `httlib-huffman`.
//!
//! Every malformed block is an error ([`HpackError`]), never a panic: the relay then ends the
//! connection with COMPRESSION_ERROR, as RFC 9113 §4.3 asks.

use std::collections::VecDeque;

/// Why a header block cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    /// The block ends inside a field.
    #[error("the header block ends inside a field")]
    Truncated,
    /// An integer of more than 5 continuation bytes (over 2^28).
    #[error("an integer too large")]
    IntegerTooLarge,
    /// An index 0, or past the static and dynamic tables.
    #[error("index {0} is in neither table")]
    BadIndex(usize),
    /// A Huffman-coded string that does not decode.
    #[error("a Huffman-coded string does not decode")]
    Huffman,
    /// The decoded fields add up to more than the limit (name + value + 32 bytes each, as
    /// SETTINGS_MAX_HEADER_LIST_SIZE counts them).
    #[error("the decoded header list is over {0} bytes")]
    TooLarge(usize),
    /// A dynamic table size update over the size the relay allows, or after the first field.
    #[error("a dynamic table size update to {0} bytes (allowed: {1}, and only at the start of a block)")]
    TableSize(usize, usize),
}

/// RFC 7541 Appendix A: the static table, indices 1 to 61.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// One peer's decoding context: its dynamic table.
pub struct Decoder {
    /// Newest first.
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    /// Bytes the entries take (RFC 7541 §4.1: name + value + 32 each).
    size: usize,
    /// The table's current maximum (set by the peer's size updates).
    max: usize,
    /// The most the relay allows (its SETTINGS_HEADER_TABLE_SIZE).
    allowed: usize,
}

impl Decoder {
    /// A decoder whose peer may use up to `allowed` bytes of dynamic table.
    pub fn new(allowed: usize) -> Decoder {
        Decoder { table: VecDeque::new(), size: 0, max: allowed, allowed }
    }

    /// Decodes one whole header block, calling `field(name, value)` for each field in order;
    /// fails once the fields add up to more than `limit` bytes (RFC 9113 §6.5.2's count), so a
    /// small block of indexed references cannot expand without bound.
    pub fn decode(&mut self, mut block: &[u8], limit: usize, mut field: impl FnMut(&[u8], &[u8])) -> Result<(), HpackError> {
        let mut first = true;
        let mut total = 0usize;
        let mut count = |n: &[u8], v: &[u8]| {
            total += n.len() + v.len() + 32;
            if total > limit {
                Err(HpackError::TooLarge(limit))
            } else {
                Ok(())
            }
        };
        let mut name_buf = Vec::new();
        let mut value_buf = Vec::new();
        while let Some(&b) = block.first() {
            if b & 0x80 != 0 {
                let index = integer(&mut block, 7)?;
                let (n, v) = self.entry(index)?;
                count(n, v)?;
                field(n, v);
            } else if b & 0xe0 == 0x20 {
                let size = integer(&mut block, 5)?;
                if !first || size > self.allowed {
                    return Err(HpackError::TableSize(size, self.allowed));
                }
                self.max = size;
                self.evict(0);
                continue; // several updates may open a block
            } else {
                // Literal: with incremental indexing (01), without (0000) or never indexed (0001).
                let (prefix, indexing) = if b & 0xc0 == 0x40 { (6, true) } else { (4, false) };
                let index = integer(&mut block, prefix)?;
                name_buf.clear();
                if index == 0 {
                    string(&mut block, &mut name_buf)?;
                } else {
                    name_buf.extend_from_slice(self.entry(index)?.0);
                }
                value_buf.clear();
                string(&mut block, &mut value_buf)?;
                count(&name_buf, &value_buf)?;
                field(&name_buf, &value_buf);
                if indexing {
                    self.insert(name_buf.clone(), value_buf.clone());
                }
            }
            first = false;
        }
        Ok(())
    }

    fn entry(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        match index {
            0 => Err(HpackError::BadIndex(0)),
            1..=61 => {
                let (n, v) = STATIC[index - 1];
                Ok((n.as_bytes(), v.as_bytes()))
            }
            _ => self.table.get(index - 62).map(|(n, v)| (n.as_slice(), v.as_slice())).ok_or(HpackError::BadIndex(index)),
        }
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = name.len() + value.len() + 32;
        if size > self.max {
            // An entry larger than the table empties it (RFC 7541 §4.4).
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.size += size;
        self.table.push_front((name, value));
    }

    /// Evicts the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + 32,
                None => break,
            }
        }
    }
}

/// An HPACK integer with a `prefix`-bit prefix (RFC 7541 §5.1), at most 2^28.
fn integer(block: &mut &[u8], prefix: u8) -> Result<usize, HpackError> {
    let (&first, mut rest) = block.split_first().ok_or(HpackError::Truncated)?;
    let max = (1usize << prefix) - 1;
    let mut value = first as usize & max;
    if value == max {
        let mut shift = 0;
        loop {
            let (&b, r) = rest.split_first().ok_or(HpackError::Truncated)?;
            rest = r;
            if shift > 21 {
                return Err(HpackError::IntegerTooLarge);
            }
            value += ((b & 0x7f) as usize) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
    }
    *block = rest;
    Ok(value)
}

/// A string literal (RFC 7541 §5.2), appended to `out`.
fn string(block: &mut &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    let huffman = block.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = integer(block, 7)?;
    if len > block.len() {
        return Err(HpackError::Truncated);
    }
    let (bytes, rest) = block.split_at(len);
    *block = rest;
    if huffman {
        httlib_huffman::decode(bytes, out, httlib_huffman::DecoderSpeed::FourBits).map_err(|_| HpackError::Huffman)?;
    } else {
        out.extend_from_slice(bytes);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(d: &mut Decoder, block: &[u8]) -> Result<Vec<(String, String)>, HpackError> {
        let mut out = Vec::new();
        d.decode(block, 1 << 20, |n, v| out.push((String::from_utf8_lossy(n).into_owned(), String::from_utf8_lossy(v).into_owned())))?;
        Ok(out)
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    #[test]
    fn rfc_7541_c3_requests_without_huffman() {
        let mut d = Decoder::new(4096);
        let c31 = [0x82, 0x86, 0x84, 0x41, 0x0f, b'w', b'w', b'w', b'.', b'e', b'x', b'a', b'm', b'p', b'l', b'e', b'.', b'c', b'o', b'm'];
        assert_eq!(decode(&mut d, &c31).unwrap(), pairs(&[(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com")]));
        let c32 = [0x82, 0x86, 0x84, 0xbe, 0x58, 0x08, b'n', b'o', b'-', b'c', b'a', b'c', b'h', b'e'];
        assert_eq!(
            decode(&mut d, &c32).unwrap(),
            pairs(&[(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com"), ("cache-control", "no-cache")])
        );
        assert_eq!(d.size, 110);
    }

    #[test]
    fn rfc_7541_c4_requests_with_huffman() {
        let mut d = Decoder::new(4096);
        let c41 = [0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff];
        assert_eq!(decode(&mut d, &c41).unwrap(), pairs(&[(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com")]));
        let c42 = [0x82, 0x86, 0x84, 0xbe, 0x58, 0x86, 0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf];
        assert_eq!(decode(&mut d, &c42).unwrap()[4], ("cache-control".to_string(), "no-cache".to_string()));
    }

    #[test]
    fn eviction_and_size_updates() {
        // A table of 60 bytes holds one small entry at a time.
        let mut d = Decoder::new(4096);
        assert!(decode(&mut d, &[0x3f, 0x1d]).is_ok()); // size update to 60 (31 + 29)
        decode(&mut d, &[0x40, 0x01, b'a', 0x01, b'1']).unwrap();
        decode(&mut d, &[0x40, 0x01, b'b', 0x01, b'2']).unwrap();
        assert_eq!(decode(&mut d, &[0xbe]).unwrap(), pairs(&[("b", "2")]));
        assert_eq!(decode(&mut d, &[0xbf]), Err(HpackError::BadIndex(63)));
        // Over the allowed size, and an update after a field, are refused.
        assert!(matches!(decode(&mut d, &[0x3f, 0xe2, 0x1f]), Err(HpackError::TableSize(4097, 4096))));
        assert!(matches!(decode(&mut d, &[0x82, 0x20]), Err(HpackError::TableSize(0, 4096))));
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut d = Decoder::new(4096);
        for _ in 0..50_000 {
            let len = (next() % 48) as usize;
            let block: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = d.decode(&block, 1 << 20, |_, _| {});
        }
        // Huffman strings of every length and content.
        for _ in 0..50_000 {
            let len = (next() % 40) as usize;
            let mut block = vec![0x00, 0x80 | len as u8];
            block.extend((0..len).map(|_| next() as u8));
            block.push(0x00);
            let _ = d.decode(&block, 1 << 20, |_, _| {});
        }
        assert_eq!(d.decode(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01], 1 << 20, |_, _| {}), Err(HpackError::IntegerTooLarge));
        // A 4 KB entry referenced over and over: refused at the limit, not expanded.
        let mut block = vec![0x40, 0x01, b'a', 0x7f];
        let mut len = Vec::new();
        let mut n = 4000 - 127;
        while n >= 128 {
            len.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        len.push(n as u8);
        block.extend(len);
        block.extend(std::iter::repeat_n(b'x', 4000));
        block.extend(std::iter::repeat_n(0xbe, 10_000));
        assert_eq!(Decoder::new(4096).decode(&block, 1 << 20, |_, _| {}), Err(HpackError::TooLarge(1 << 20)));
    }
}
