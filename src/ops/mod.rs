//! Operator commands: talk to etcd directly (never through the proxy) to adopt and remove
//! etcd-squeeze on a live cluster.
//!
//! - [`analyze`]: read-only report of what the proxy would save, before installing it.
//! - [`migrate`]: rewrite existing values as frames (`compress`) or back (`decompress`), each
//!   with a Txn on the key's `mod_revision`, so a concurrent writer always wins.
//! - [`get`]: one key (or a prefix) read from etcd and decoded, or its frame metadata.
//!
//! Everything that connects to etcd is in this file ([`EtcdArgs`], [`Etcd::connect`]), built on
//! [`crate::upstream::Upstream`], so the commands use exactly the connection settings of `serve`
//! (`[upstream]` of the same config file: endpoints, timeouts, TLS), with etcdctl-like overrides. Every value is encoded and decoded through
//! [`ValueCodec`], so whatever the proxy can read, these commands can read.

pub mod analyze;
pub mod dict;
pub mod get;
pub mod migrate;
pub mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;

use crate::codec::{DecodeError, PrefixRule, ValueCodec};
use crate::config::{Config, ConfigError, PrefixConfig};
use crate::delta::cache::BaseCache;
use crate::dictionary::cache::DictionaryCache;
use crate::proto::etcdserverpb::kv_client::KvClient;
use crate::proto::etcdserverpb::{RangeRequest, RangeResponse};
use crate::proto::mvccpb::KeyValue;
use crate::upstream::Upstream;

/// Keys under this prefix belong to etcd-squeeze itself (trained dictionaries): the operator
/// commands never count or rewrite them, even when a configured prefix covers them.
pub use crate::codec::RESERVED_PREFIX;

/// Keys read per Range page: 100 keys of FlyteWorkflow objects (up to 1.5 MiB each, typically
/// tens of KB) keep one response well under 200 MB even in the worst case.
pub const DEFAULT_PAGE_KEYS: i64 = 100;

/// etcd's default `--max-request-bytes`: 1.5 MiB. A Put larger than this is refused by etcd.
pub const DEFAULT_ETCD_MAX_REQUEST_BYTES: &str = "1.5MiB";

pub use crate::cli::{EtcdArgs, PrefixArgs};

/// A failure of an operator command.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The configuration file is missing, unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An etcd endpoint is not a valid URL.
    #[error(transparent)]
    Upstream(#[from] crate::upstream::UpstreamError),
    /// An etcd call failed.
    #[error("etcd {call}: {}: {}", status.code(), status.message())]
    Rpc {
        /// What was being done, with the key and revision.
        call: String,
        /// etcd's (or the transport's) status.
        status: tonic::Status,
    },
    /// A frame that cannot be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The migration state file cannot be read, written or does not match this run.
    #[error("state file {path}: {reason}")]
    State {
        /// The `--state-file` path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Arguments that do not make sense together.
    #[error("{0}")]
    Usage(String),
    /// The printed output cannot be written (closed pipe).
    #[error("output: {0}")]
    Output(#[from] std::io::Error),
    /// The endpoint is an etcd-squeeze proxy, not etcd.
    #[error("{endpoint} is {proxy}, not etcd: the operator commands read and write what etcd stores, and through the proxy every value looks as if it were stored raw (migrate compress would wrap every value twice). Point --endpoints (or upstream.endpoints of --config) at etcd itself{}", if upstream.is_empty() { String::new() } else { format!(": the proxy forwards to {}", upstream.join(", ")) })]
    PointedAtProxy {
        /// The endpoint as given.
        endpoint: String,
        /// The proxy's name and version.
        proxy: String,
        /// The proxy's own upstream endpoints (etcd).
        upstream: Vec<String>,
    },
}

/// Refuses endpoints that are etcd-squeeze proxies rather than etcd: each endpoint is asked the
/// method only the proxy answers (`server::front::IDENTIFY_PATH`); etcd answers UNIMPLEMENTED.
/// An endpoint that cannot be reached is left to the command's own calls to report.
pub async fn refuse_proxies(upstream: &Upstream) -> Result<(), OpsError> {
    use prost::Message as _;
    /// The proxy's answer (see `server::front::identify`).
    #[derive(Clone, PartialEq, prost::Message)]
    struct Identity {
        #[prost(string, tag = "1")]
        proxy: String,
        #[prost(string, repeated, tag = "2")]
        upstream: Vec<String>,
    }
    for (state, channel) in upstream.endpoints() {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        if grpc.ready().await.is_err() {
            continue;
        }
        let path = http::uri::PathAndQuery::from_static(crate::server::front::IDENTIFY_PATH);
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            grpc.unary(tonic::Request::new(bytes::Bytes::new()), path, crate::server::raw::RawCodec),
        )
        .await;
        if let Ok(Ok(response)) = answer {
            let identity = Identity::decode(response.into_inner()).unwrap_or_default();
            return Err(OpsError::PointedAtProxy { endpoint: state.url.clone(), proxy: identity.proxy, upstream: identity.upstream });
        }
    }
    Ok(())
}

impl OpsError {
    /// The process exit code: 2 for configuration and usage errors, 1 for the rest.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            OpsError::Config(_) | OpsError::Usage(_) | OpsError::Upstream(_) | OpsError::PointedAtProxy { .. } => ExitCode::from(2),
            _ => ExitCode::FAILURE,
        }
    }
}

/// Prints `command: error` on stderr and returns the matching exit code.
pub fn fail(command: &str, e: &OpsError) -> ExitCode {
    eprintln!("etcd-squeeze {command}: {e}");
    e.exit_code()
}

impl EtcdArgs {
    /// The configuration: the file (or defaults), with `--endpoints` and `prefixes` applied and
    /// validated. `prefixes` non-empty replaces the configured `[[prefixes]]`.
    pub fn config(&self, prefixes: &[String]) -> Result<Config, OpsError> {
        let mut config = self.load(prefixes)?;
        // These commands do not listen: the proxy's [server] section (its TLS files may live on
        // another host) is not theirs to check. And before adoption etcd itself is often on
        // 127.0.0.1:2379, the proxy's default listen address, which validate() would refuse as a loop.
        config.server = crate::config::ServerConfig { listen: "127.0.0.1:0".parse().expect("constant"), ..Default::default() };
        config.validate()?;
        Ok(config)
    }

    /// Loads the configuration (see [`EtcdArgs::config`]) and connects to etcd.
    /// The error of a TLS file given by a flag names the flag (`--cacert`), not the config key it replaces.
    pub fn name_flags(&self, e: OpsError) -> OpsError {
        match e {
            OpsError::Upstream(crate::upstream::UpstreamError::Tls(mut t)) => {
                let flag = match t.key {
                    "upstream.tls_ca_file" if self.cacert.is_some() => Some("--cacert"),
                    "upstream.tls_cert_file" if self.cert.is_some() => Some("--cert"),
                    "upstream.tls_key_file" if self.key.is_some() => Some("--key"),
                    _ => None,
                };
                if let Some(flag) = flag {
                    t.key = flag;
                }
                OpsError::Upstream(crate::upstream::UpstreamError::Tls(t))
            }
            other => other,
        }
    }

    /// Connects to etcd, refusing an endpoint that is an etcd-squeeze proxy ([`refuse_proxies`]).
    pub async fn connect(&self, prefixes: &PrefixArgs) -> Result<Etcd, OpsError> {
        let etcd = Etcd::connect(self.config(&prefixes.prefixes)?).map_err(|e| self.name_flags(e))?;
        refuse_proxies(&etcd.upstream).await?;
        Ok(etcd)
    }
}

/// The bases loaded for the previous and the last page read (delta frames of a page are decoded
/// after the page is read, while the next may already be loading).
type PinnedPages = (Vec<std::sync::Arc<crate::codec::delta::Base>>, Vec<std::sync::Arc<crate::codec::delta::Base>>);

/// A connection to etcd plus the codec of the configuration: everything a command needs.
#[derive(Debug, Clone)]
pub struct Etcd {
    /// The configuration the command runs with.
    pub config: Config,
    /// The codec of the configured prefixes (encoding, and which key belongs to which rule).
    pub codec: ValueCodec,
    /// Decodes every frame whatever its key: an operator reading a key wants the original bytes
    /// even when its prefix is not (or no longer) configured.
    decoder: ValueCodec,
    /// Loads the trained dictionaries that the frames of each page read name.
    dictionaries: std::sync::Arc<crate::dictionary::Dictionaries>,
    /// Loads the bases that the delta frames of each page read name.
    deltas: std::sync::Arc<crate::delta::Deltas>,
    /// The bases of the last two pages read (decoded after their page is read).
    pinned: std::sync::Arc<std::sync::Mutex<PinnedPages>>,
    kv: KvClient<Upstream>,
    upstream: Upstream,
}

impl Etcd {
    /// Installs the newest trained dictionary of each prefix that uses dictionaries, so that values
    /// this command writes get it as the proxy's would; with `train`, a prefix that has none gets
    /// one first (trained on its stored values and published, as `dict train`). Returns one line
    /// per prefix saying which dictionary its writes use.
    pub async fn prepare_dictionaries(&self, train: bool) -> Result<Vec<String>, OpsError> {
        let failed = |call: &str, e: crate::dictionary::DictionaryError| OpsError::Rpc { call: call.into(), status: tonic::Status::unavailable(e.to_string()) };
        if !self.config.dictionaries.enabled {
            return Ok(Vec::new());
        }
        self.dictionaries.sync().await.map_err(|e| failed("read the trained dictionaries", e.into()))?;
        let mut lines = Vec::new();
        for p in &self.config.prefixes {
            let Ok(prefix) = self.dictionaries.prefix(&p.prefix) else { continue };
            let mut current = self.dictionaries.cache().encoder(&prefix.prefix).map(|d| d.id);
            if current.is_none() && train {
                let report = self.dictionaries.train_prefix(prefix, &[]).await.map_err(|e| failed("train a dictionary", e))?;
                self.dictionaries.sync().await.map_err(|e| failed("read the trained dictionaries", e.into()))?;
                current = self.dictionaries.cache().encoder(&prefix.prefix).map(|d| d.id);
                if current.is_none() {
                    lines.push(format!("{}: no dictionary published (held-out gain {:.1}% is below dictionaries.min_gain)", p.prefix, report.gain() * 100.0));
                    continue;
                }
            }
            lines.push(match current {
                Some(id) => format!("{}: values written with dictionary {id}", p.prefix),
                None => format!("{}: no trained dictionary yet: values written without one (--train trains one first)", p.prefix),
            });
        }
        Ok(lines)
    }

    /// Connects (lazily) to `config.upstream` with the proxy's own channel settings and TLS.
    pub fn connect(config: Config) -> Result<Etcd, OpsError> {
        let upstream = Upstream::new(&config.upstream)?;
        // The codec is built exactly as the proxy builds its own, so whatever the proxy can
        // encode and decode (trained dictionaries included, once they exist) these commands can too.
        let dictionary_cache = std::sync::Arc::new(DictionaryCache::new());
        let codec = ValueCodec::from_config(&config).with_dictionaries(dictionary_cache.clone());
        let mut catch_all = codec.rules().to_vec();
        catch_all.push(PrefixRule::from(&PrefixConfig::new("")));
        let decoder = ValueCodec::new(catch_all, config.limits.max_value_bytes.as_u64() as usize).with_dictionaries(dictionary_cache.clone());
        let base_cache = std::sync::Arc::new(BaseCache::for_rules(decoder.rules()));
        let decoder = decoder.with_bases(base_cache.clone());
        let dictionaries = crate::dictionary::Dictionaries::new(&config, decoder.clone(), dictionary_cache, upstream.clone());
        // Operator commands announce nothing: a prefix with delta = "auto" writes per-object frames.
        let members = crate::members::Members::new(dictionaries.identity().to_string(), Vec::new(), Vec::new());
        let deltas = crate::delta::Deltas::new(decoder.clone(), base_cache, upstream.clone(), dictionaries.clone(), members);
        let kv = KvClient::new(upstream.clone()).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX);
        Ok(Etcd { config, codec, decoder, dictionaries, deltas, pinned: Default::default(), kv, upstream })
    }

    /// The connections to etcd.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// A KV client on the shared connections.
    pub fn kv(&self) -> KvClient<Upstream> {
        self.kv.clone()
    }

    /// The original bytes of a stored value (frames decoded, anything else as it is).
    pub fn decode(&self, key: &[u8], value: &Bytes) -> Result<Bytes, DecodeError> {
        let pinned = self.pinned.lock().expect("pinned bases lock");
        let bases: Vec<_> = pinned.0.iter().chain(pinned.1.iter()).cloned().collect();
        drop(pinned);
        self.decoder.decode_with_bases(key, value, &mut u64::MAX.clone(), &bases)
    }

    /// The configured prefixes, as bytes, in configuration order.
    pub fn prefixes(&self) -> Vec<Bytes> {
        self.config.prefixes.iter().map(|p| Bytes::copy_from_slice(p.prefix.as_bytes())).collect()
    }

    /// The key ranges to scan for the configured prefixes (see [`scan_ranges`]).
    pub fn ranges(&self) -> Vec<KeyRange> {
        scan_ranges(&self.prefixes())
    }

    /// One Range call; `call` describes it for the error message. The trained dictionaries its
    /// frames name are loaded, so [`Etcd::decode`] can decode them.
    pub async fn range(&self, request: RangeRequest, call: impl FnOnce() -> String) -> Result<RangeResponse, OpsError> {
        let revision = request.revision;
        let mut resp = self.kv().range(request).await.map(|r| r.into_inner());
        if let Ok(r) = &mut resp {
            if let Err(status) = self.dictionaries.prefetch(r).await {
                resp = Err(tonic::Status::from(status));
            } else {
                match self.deltas.prefetch(r, &[revision]).await {
                    Ok(bases) => {
                        let mut pinned = self.pinned.lock().expect("pinned bases lock");
                        pinned.0 = std::mem::replace(&mut pinned.1, bases);
                    }
                    Err(e) => resp = Err(tonic::Status::from(e)),
                }
            }
        }
        resp.map_err(|status| OpsError::Rpc { call: call(), status })
    }

    /// The number of keys in `range` from `start` on, at `revision` (0 = now), and the revision
    /// of the answer.
    pub async fn count(&self, range: &KeyRange, start: &[u8], revision: i64) -> Result<(u64, i64), OpsError> {
        let request = RangeRequest {
            key: Bytes::copy_from_slice(start),
            range_end: range.end.clone(),
            revision,
            count_only: true,
            ..Default::default()
        };
        let r = self.range(request, || format!("count of keys from {} at revision {revision}", crate::codec::KeyDisplay(start))).await?;
        Ok((r.count.max(0) as u64, r.header.map_or(0, |h| h.revision)))
    }

    /// The sum of [`Etcd::count`] over `ranges`, each from its start or after `after`, without
    /// the keys under [`RESERVED_PREFIX`] (the pagers leave them out, so a progress bar counting
    /// to this total ends at it).
    pub async fn count_all(&self, ranges: &[KeyRange], after: Option<&[u8]>, revision: i64) -> Result<(u64, i64), OpsError> {
        let (mut total, mut rev) = (0, revision);
        let reserved = KeyRange::of_prefix(RESERVED_PREFIX);
        for range in ranges {
            if let Some(start) = range.start_after(after) {
                let (n, r) = self.count(range, &start, rev).await?;
                total += n;
                if rev == 0 {
                    rev = r;
                }
                // The reserved keys inside [start, end): counted by etcd, never paged.
                let from = std::cmp::max(&start[..], &reserved.start[..]);
                let range_ends_after = range.end[..] == b"\0"[..] || range.end[..] > reserved.start[..];
                if range_ends_after && from < &reserved.end[..] {
                    let inside = KeyRange { prefix: reserved.prefix.clone(), start: reserved.start.clone(), end: std::cmp::min_by(reserved.end.clone(), range.end.clone(), |a, b| {
                        if &a[..] == b"\0" { std::cmp::Ordering::Greater } else if &b[..] == b"\0" { std::cmp::Ordering::Less } else { a.cmp(b) }
                    }) };
                    let (n, _) = self.count(&inside, from, rev).await?;
                    total = total.saturating_sub(n);
                }
            }
        }
        Ok((total, rev))
    }

    /// A pager over `range`, starting at `start`, reading `page_keys` keys per call at
    /// `revision` (0 = the latest revision of each page).
    pub fn pager(&self, range: &KeyRange, start: Vec<u8>, revision: i64, page_keys: i64) -> Pager<'_> {
        Pager { etcd: self, pages: crate::pager::RangePager::new(&start, &range.end, revision, page_keys).unpinned(), reserved: false }
    }
}

/// A key range `[start, end)` in etcd's convention (`end` = `"\0"`: every key from `start` on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    /// The prefix this range covers.
    pub prefix: Bytes,
    /// First key (the prefix; `"\0"` for the empty prefix, since etcd refuses an empty key).
    pub start: Bytes,
    /// End of the range, exclusive.
    pub end: Bytes,
}

impl KeyRange {
    /// The range of every key that starts with `prefix`.
    pub fn of_prefix(prefix: &[u8]) -> KeyRange {
        let start = if prefix.is_empty() { Bytes::from_static(b"\0") } else { Bytes::copy_from_slice(prefix) };
        let end = crate::codec::prefix_end(prefix).map_or(Bytes::from_static(b"\0"), Bytes::from);
        KeyRange { prefix: Bytes::copy_from_slice(prefix), start, end }
    }

    /// Where a scan of this range starts when every key up to `after` (inclusive) is done:
    /// `None` when the whole range is done.
    pub fn start_after(&self, after: Option<&[u8]>) -> Option<Vec<u8>> {
        let Some(after) = after else { return Some(self.start.to_vec()) };
        let mut next = after.to_vec();
        next.push(0);
        if next[..] <= self.start[..] {
            return Some(self.start.to_vec());
        }
        (self.end[..] == b"\0"[..] || next[..] < self.end[..]).then_some(next)
    }
}

/// The disjoint ranges that cover every key under `prefixes`, in key order: a prefix that starts
/// with another listed prefix is covered by it and dropped. Scanning them in order visits every
/// key once, in increasing order, which is what makes a migration resumable from one key.
pub fn scan_ranges(prefixes: &[Bytes]) -> Vec<KeyRange> {
    let mut sorted = prefixes.to_vec();
    sorted.sort();
    sorted.dedup();
    let mut ranges: Vec<KeyRange> = Vec::new();
    for p in sorted {
        if ranges.iter().any(|r| p.starts_with(&r.prefix)) {
            continue;
        }
        ranges.push(KeyRange::of_prefix(&p));
    }
    ranges
}

/// Reads a key range page by page (etcd's `limit` and `more`), in key order.
pub struct Pager<'a> {
    etcd: &'a Etcd,
    pages: crate::pager::RangePager,
    reserved: bool,
}

impl Pager<'_> {
    /// Also returns the keys under [`RESERVED_PREFIX`] (left out by default).
    pub fn including_reserved(mut self) -> Self {
        self.reserved = true;
        self
    }

    /// The next page of key-values, or `None` when the range is exhausted. Keys under
    /// [`RESERVED_PREFIX`] are left out unless [`Pager::including_reserved`].
    pub async fn next_page(&mut self) -> Result<Option<Vec<KeyValue>>, OpsError> {
        let Some(request) = self.pages.request() else { return Ok(None) };
        let (start, revision) = (request.key.clone(), request.revision);
        let r = self
            .etcd
            .range(request, || format!("Range from {} at revision {revision}", crate::codec::KeyDisplay(&start)))
            .await?;
        self.pages.advance(&r);
        let reserved = self.reserved;
        Ok(Some(r.kvs.into_iter().filter(|kv| reserved || !kv.key.starts_with(RESERVED_PREFIX)).collect()))
    }
}

/// A progress bar on stderr with a count, a rate and an ETA; hidden when stderr is not a terminal.
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let style = indicatif::ProgressStyle::with_template(
        "{msg:>10} [{elapsed_precise}] [{wide_bar}] {pos}/{len} keys ({rate}, ETA {eta})",
    )
    .expect("constant template")
    // Whole keys per second ("20/s"), not indicatif's "20.1271/s".
    .with_key("rate", |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
        let _ = write!(w, "{:.0}/s", state.per_sec());
    })
    .progress_chars("=> ");
    indicatif::ProgressBar::new(len).with_style(style).with_message(what.to_string())
}

/// A key for humans, JSON and state files: UTF-8 when it is, escaped bytes otherwise.
pub fn key_string(key: &[u8]) -> String {
    key.escape_ascii().to_string()
}

/// A byte count for humans: `1.5 MiB`.
pub fn human(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}

/// `part` as a percentage of `whole` (0 when `whole` is 0).
pub fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_each_key_once_in_order() {
        let ranges = scan_ranges(&[Bytes::from_static(b"/b/"), Bytes::from_static(b"/a/x/"), Bytes::from_static(b"/a/"), Bytes::from_static(b"/b/")]);
        assert_eq!(ranges.iter().map(|r| &r.prefix[..]).collect::<Vec<_>>(), vec![&b"/a/"[..], b"/b/"]);
        assert_eq!(&ranges[0].end[..], b"/a0");
        let all = scan_ranges(&[Bytes::from_static(b"/a/"), Bytes::new()]);
        assert_eq!(all, vec![KeyRange { prefix: Bytes::new(), start: Bytes::from_static(b"\0"), end: Bytes::from_static(b"\0") }]);
    }

    #[test]
    fn resume_points() {
        let r = KeyRange::of_prefix(b"/b/");
        assert_eq!(r.start_after(None), Some(b"/b/".to_vec()));
        assert_eq!(r.start_after(Some(b"/a/z")), Some(b"/b/".to_vec()));
        assert_eq!(r.start_after(Some(b"/b/k")), Some(b"/b/k\0".to_vec()));
        assert_eq!(r.start_after(Some(b"/c")), None);
        let all = KeyRange::of_prefix(b"");
        assert_eq!(all.start_after(Some(b"\xff\xff")), Some(b"\xff\xff\0".to_vec()));
    }

    #[test]
    fn endpoints_may_be_the_proxys_default_listen_address() {
        let args = EtcdArgs { endpoints: vec!["http://127.0.0.1:2379".into()], ..Default::default() };
        let config = args.config(&["/registry/x/".into()]).unwrap();
        assert_eq!(config.prefixes[0].prefix, "/registry/x/");
        let bad = EtcdArgs { endpoints: vec!["ftp://x".into()], ..Default::default() };
        assert!(bad.config(&[]).unwrap_err().to_string().contains("upstream.endpoints[0]"));
        let tls = EtcdArgs { endpoints: vec!["https://etcd:2379".into()], ..Default::default() };
        assert!(tls.config(&[]).unwrap_err().to_string().contains("upstream.tls_ca_file"), "https needs --cacert");
        let tls = EtcdArgs { cacert: Some("ca.crt".into()), server_name: Some("etcd.local".into()), ..tls };
        let u = tls.config(&[]).unwrap().upstream;
        assert_eq!((u.tls_ca_file.unwrap(), u.tls_server_name.unwrap()), ("ca.crt".into(), "etcd.local".to_string()));
    }
}
