//! Byte-exact re-implementation of how kube-apiserver writes a custom resource to etcd:
//! `json.NewEncoder(w).Encode(map[string]interface{})` over the `unstructured.Unstructured` content.

use serde_json::Value;

/// Serializes `v` exactly as kube-apiserver stores a custom resource in etcd (Go `json.Encoder`
/// with its default `SetEscapeHTML(true)` over an unstructured map):
///
/// * object keys sorted byte-wise at every level (Go sorts `map[string]interface{}` keys),
///   independent of the `serde_json::Map` ordering in use;
/// * compact separators (no whitespace);
/// * Go string escaping: `"` `\` → `\"` `\\`; `\n` `\r` `\t` `\b` `\f` → two-char escapes (Go ≥ 1.22);
///   other control characters → `\u00XX` (lowercase hex); HTML-sensitive `<` `>` `&` →
///   `\u003c` `\u003e` `\u0026`; U+2028/U+2029 → `\u2028`/`\u2029`; everything else (incl. DEL and
///   non-ASCII) verbatim UTF-8;
/// * integers in decimal; non-integral floats like Go's `float64` encoder (shortest repr,
///   exponent form below 1e-6 or from 1e21 on, e.g. `1e+21`, `1e-7`);
/// * a trailing `\n` (added by `Encoder.Encode`).
pub fn to_apiserver_json(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(4096);
    write_value(&mut out, v);
    out.push(b'\n');
    out
}

fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_str(out, s),
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, x);
            }
            out.push(b']');
        }
        Value::Object(m) => {
            let mut entries: Vec<(&String, &Value)> = m.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (k, x)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, k);
                out.push(b':');
                write_value(out, x);
            }
            out.push(b'}');
        }
    }
}

fn write_number(out: &mut Vec<u8>, n: &serde_json::Number) {
    if let Some(i) = n.as_i64() {
        out.extend_from_slice(i.to_string().as_bytes());
    } else if let Some(u) = n.as_u64() {
        out.extend_from_slice(u.to_string().as_bytes());
    } else {
        let f = n.as_f64().unwrap_or(0.0);
        let a = f.abs();
        let s = if a != 0.0 && !(1e-6..1e21).contains(&a) {
            // Go: strconv 'e' format with at least two exponent digits, then "e-07" -> "e-7".
            let e = format!("{f:e}");
            match e.split_once('e') {
                Some((m, x)) if !x.starts_with('-') => format!("{m}e+{x}"),
                _ => e,
            }
        } else {
            format!("{f}")
        };
        out.extend_from_slice(s.as_bytes());
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, c) in s.char_indices() {
        let esc: Option<&[u8]> = match c {
            '"' => Some(b"\\\""),
            '\\' => Some(b"\\\\"),
            '\n' => Some(b"\\n"),
            '\r' => Some(b"\\r"),
            '\t' => Some(b"\\t"),
            '\u{8}' => Some(b"\\b"),
            '\u{c}' => Some(b"\\f"),
            '\u{2028}' => Some(b"\\u2028"),
            '\u{2029}' => Some(b"\\u2029"),
            _ => None,
        };
        let needs_u = c < ' ' || c == '<' || c == '>' || c == '&';
        if esc.is_none() && !needs_u {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        match esc {
            Some(e) => out.extend_from_slice(e),
            None => {
                let b = c as usize;
                out.extend_from_slice(b"\\u00");
                out.push(HEX[b >> 4]);
                out.push(HEX[b & 15]);
            }
        }
        start = i + c.len_utf8();
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}
