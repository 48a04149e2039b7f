//! The crate's one Range pager: a key range read page by page with etcd's `limit` and `more`,
//! in key order, at one revision.
//!
//! Used by the operator commands ([`crate::ops::Pager`] adds their error context and hides the
//! proxy's keys), the orphan sweep (keys only), `dict`'s reference counts and the dictionary
//! trainer's sampling.

use bytes::Bytes;

use crate::proto::etcdserverpb::kv_client::KvClient;
use crate::proto::etcdserverpb::{RangeRequest, RangeResponse};
use crate::upstream::Upstream;

/// Where a paged read of `[key, range_end)` stands: the next page's first key, the revision.
#[derive(Debug, Clone)]
pub struct RangePager {
    /// The next page's first key; `None` once the range is exhausted.
    next: Option<Bytes>,
    range_end: Bytes,
    revision: i64,
    limit: i64,
    keys_only: bool,
    /// Pin every page to the first page's header revision when `revision` was 0.
    pin: bool,
}

impl RangePager {
    /// Pages of at most `limit` keys of `[key, range_end)` (etcd's convention: `range_end` `"\0"`
    /// is every key from `key` on; an empty `key` reads from `"\0"`, since etcd refuses an empty
    /// key) at `revision`; 0: the revision of the first page, which then pins the others.
    pub fn new(key: &[u8], range_end: &[u8], revision: i64, limit: i64) -> RangePager {
        let start = if key.is_empty() { Bytes::from_static(b"\0") } else { Bytes::copy_from_slice(key) };
        RangePager { next: Some(start), range_end: Bytes::copy_from_slice(range_end), revision, limit, keys_only: false, pin: true }
    }

    /// Keys (and their revisions) without values.
    pub fn keys_only(mut self) -> Self {
        self.keys_only = true;
        self
    }

    /// With revision 0, every page at the latest revision (not pinned to the first page's).
    pub fn unpinned(mut self) -> Self {
        self.pin = false;
        self
    }

    /// The revision pages are read at (0 before the first page when started at 0).
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The next page's request; `None` once the range is exhausted.
    pub fn request(&self) -> Option<RangeRequest> {
        let key = self.next.clone()?;
        Some(RangeRequest { key, range_end: self.range_end.clone(), limit: self.limit, revision: self.revision, keys_only: self.keys_only, ..Default::default() })
    }

    /// Takes the answer to [`RangePager::request`]: the revision is pinned and the next page
    /// starts right after its last key (or the range is exhausted).
    pub fn advance(&mut self, page: &RangeResponse) {
        if self.revision == 0 && self.pin {
            self.revision = page.header.as_ref().map_or(0, |h| h.revision);
        }
        self.next = match page.kvs.last() {
            Some(last) if page.more => {
                let mut next = last.key.to_vec();
                next.push(0);
                Some(Bytes::from(next))
            }
            _ => None,
        };
    }

    /// Reads the next page from `kv`; `Ok(None)` once the range is exhausted.
    ///
    /// Errors: etcd's status for the Range (a compacted revision: OUT_OF_RANGE).
    pub async fn next_page(&mut self, kv: &mut KvClient<Upstream>) -> Result<Option<RangeResponse>, tonic::Status> {
        let Some(request) = self.request() else { return Ok(None) };
        let page = kv.range(request).await?.into_inner();
        self.advance(&page);
        Ok(Some(page))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb::ResponseHeader;
    use crate::proto::mvccpb::KeyValue;

    fn page(keys: &[&str], more: bool, revision: i64) -> RangeResponse {
        RangeResponse {
            header: Some(ResponseHeader { revision, ..Default::default() }),
            kvs: keys.iter().map(|k| KeyValue { key: Bytes::copy_from_slice(k.as_bytes()), ..Default::default() }).collect(),
            more,
            count: 0,
        }
    }

    #[test]
    fn pages_follow_the_last_key_and_pin_the_first_revision() {
        let mut p = RangePager::new(b"", b"\0", 0, 2).keys_only();
        let first = p.request().unwrap();
        assert_eq!((&first.key[..], first.revision, first.keys_only), (&b"\0"[..], 0, true));
        p.advance(&page(&["a", "b"], true, 7));
        let second = p.request().unwrap();
        assert_eq!((&second.key[..], second.revision), (&b"b\0"[..], 7));
        p.advance(&page(&["c"], false, 9));
        assert!(p.request().is_none());
        assert_eq!(p.revision(), 7);
    }

    #[test]
    fn unpinned_pages_read_the_latest_revision_and_an_empty_page_ends() {
        let mut p = RangePager::new(b"/k", b"/l", 0, 10).unpinned();
        p.advance(&page(&["/k1"], true, 5));
        assert_eq!(p.request().unwrap().revision, 0);
        p.advance(&page(&[], true, 6));
        assert!(p.request().is_none());
    }
}
