//! Keys: how they are printed, and the range of keys under a prefix.

use std::fmt;

/// A key, printed for humans and logs: UTF-8 when it is, otherwise escaped bytes.
/// Only keys are printed this way, never values.
pub struct KeyDisplay<'a>(pub &'a [u8]);

impl fmt::Display for KeyDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0.escape_ascii())
    }
}

/// etcd's `GetPrefixRangeEnd`: the smallest key greater than every key starting with `prefix`;
/// `None` when there is none (empty prefix or all `0xFF`), i.e. the range is open-ended.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}
