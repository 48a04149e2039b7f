//! Configuration: one TOML file (`--config`), a few CLI overrides, and `validate()`.
//!
//! Every key is documented in `config/etcd-squeeze.toml`. Unknown keys are refused
//! (`deny_unknown_fields`), and every semantic error names the key it is about.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

/// The key prefix kube-apiserver stores FlyteWorkflow custom resources under.
pub const FLYTEWORKFLOW_PREFIX: &str = "/registry/flyte.lyft.com/flyteworkflows/";
/// Where the proxy listens by default: etcd's client port, on loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:2379";
/// The etcd the proxy forwards to by default (etcd moved off 2379 so the proxy can take it).
pub const DEFAULT_UPSTREAM: &str = "http://127.0.0.1:22379";
/// Largest gRPC message accepted from clients: 32 MiB, so a 5 MB FlyteWorkflow that compresses
/// below etcd's 1.5 MiB `--max-request-bytes` can be stored (apiserver itself sends ≤ 2 MiB).
pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 32 << 20;
/// Largest value under a compressed prefix: 16 MiB (room for 5 MB FlyteWorkflows and more).
/// Larger writes get etcd's `request is too large`; larger frames are refused as decompression bombs.
pub const DEFAULT_MAX_VALUE_BYTES: u64 = 16 << 20;
/// Largest total of decompressed values in one response: 1 GiB. A LIST of 10,000 100 KB objects
/// (kube-apiserver's watch-cache sync page) is 1 GB of JSON; more is refused with RESOURCE_EXHAUSTED.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 1 << 30;
/// zstd level 3: zstd's own default, ~10x on status-heavy FlyteWorkflow objects at >100 MB/s.
pub const DEFAULT_LEVEL: i32 = 3;
/// Below 256 bytes a zstd frame rarely pays for itself; such values go in a raw frame.
pub const DEFAULT_MIN_SIZE: u64 = 256;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[server]`: the gRPC listener kube-apiserver talks to.
    #[serde(default)]
    pub server: ServerConfig,
    /// `[upstream]`: the real etcd.
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// `[limits]`: message and value size bounds.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// `[[prefixes]]`: the key prefixes whose values are compressed.
    #[serde(default = "default_prefixes")]
    pub prefixes: Vec<PrefixConfig>,
    /// `[log]`: tracing output.
    #[serde(default)]
    pub log: LogConfig,
    /// `[dictionaries]`: trained zstd dictionaries shared through etcd.
    #[serde(default)]
    pub dictionaries: DictionariesConfig,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// `server.listen`: address:port for the etcd v3 gRPC API. Default `127.0.0.1:2379`.
    pub listen: SocketAddr,
    /// `server.allow_non_loopback`: must be true to listen on a non-loopback address in plain text.
    pub allow_non_loopback: bool,
    /// `server.max_concurrent_streams`: HTTP/2 streams per client connection. Default u32::MAX,
    /// as etcd: kube-apiserver multiplexes many watches on one connection.
    pub max_concurrent_streams: u32,
}

/// `[upstream]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// `upstream.endpoints`: etcd client URLs (`http://host:port`); requests are balanced across
    /// them and fail over when one is down.
    pub endpoints: Vec<String>,
    /// `upstream.connect_timeout`: TCP + HTTP/2 connect timeout. Default 5s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// `upstream.keepalive_interval`: HTTP/2 PING interval toward etcd. Default 30s
    /// (etcd's `--grpc-keepalive-min-time` is 5s).
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// `upstream.keepalive_timeout`: how long to wait for a PING ack before the connection is
    /// considered dead. Default 10s.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// `limits.max_request_bytes`: largest decoded gRPC message accepted from a client. Default 32 MiB.
    pub max_request_bytes: ByteSize,
    /// `limits.max_value_bytes`: largest value under a compressed prefix. A larger write gets
    /// etcd's own `etcdserver: request is too large`; a stored frame declaring more is refused with
    /// DATA_LOSS naming the key. Default 16 MiB.
    pub max_value_bytes: ByteSize,
    /// `limits.max_response_bytes`: largest total of decompressed values in one response (a
    /// Range page, a Txn, a watch response). Beyond it the call fails with RESOURCE_EXHAUSTED naming
    /// the key, before decompressing: a few small frames cannot make the proxy allocate gigabytes.
    /// Default 1 GiB.
    pub max_response_bytes: ByteSize,
    /// `limits.value_compare_attempts`: how often a Txn with a VALUE compare on a compressed key
    /// is retried when the key changes between the proxy's read and its guarded Txn. Default 16.
    pub value_compare_attempts: u32,
    /// `limits.max_txn_ops`: etcd's `--max-txn-ops` (default 128). A VALUE compare over a range of
    /// compressed keys needs one guard compare per key read; beyond this the proxy refuses the
    /// Txn with a clear INVALID_ARGUMENT instead of sending it.
    pub max_txn_ops: u32,
}

/// One `[[prefixes]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixConfig {
    /// `prefixes[].prefix`: etcd key prefix; `""` means every key.
    pub prefix: String,
    /// `prefixes[].codec`: only `"zstd"` today.
    #[serde(default)]
    pub codec: CodecName,
    /// `prefixes[].level`: zstd level 1..=22. Default 3.
    #[serde(default = "default_level")]
    pub level: i32,
    /// `prefixes[].min_size`: values smaller than this are stored in a raw frame. Default 256 B.
    #[serde(default = "default_min_size")]
    pub min_size: ByteSize,
    /// `prefixes[].compress`: false stops compressing new writes but keeps decoding existing
    /// frames (the first step of removing a prefix). Default true.
    #[serde(default = "default_true")]
    pub compress: bool,
    /// `prefixes[].dictionary`: compress with (and train) a shared dictionary. Unset: yes, unless
    /// the prefix overlaps `dictionaries.sensitive_prefixes`. See [`PrefixConfig::uses_dictionary`].
    #[serde(default)]
    pub dictionary: Option<bool>,
    /// `prefixes[].allow_sensitive_dictionary`: lets `dictionary = true` apply to a prefix that
    /// overlaps a sensitive prefix (accepting the compression side channel). Default false.
    #[serde(default)]
    pub allow_sensitive_dictionary: bool,
}

/// `prefixes[].codec`
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CodecName {
    /// Zstandard (RFC 8878).
    #[default]
    Zstd,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `log.level`: a tracing filter such as `info` or `etcd_squeeze=debug`; `RUST_LOG` overrides it.
    pub level: String,
    /// `log.format`: `text` or `json`.
    pub format: LogFormat,
}

/// `log.format`
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// An invalid configuration: names the key and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path given with `--config`.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key or a value of the wrong type (toml's message names the key).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The path given with `--config`.
        path: String,
        /// toml's message, with line and column.
        message: String,
    },
    /// A value that parses but makes no sense.
    #[error("invalid config: {key}: {reason}")]
    Invalid {
        /// The dotted key, e.g. `prefixes[1].level`.
        key: String,
        /// Why it is refused.
        reason: String,
    },
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: DEFAULT_LISTEN.parse().expect("constant"),
            allow_non_loopback: false,
            max_concurrent_streams: u32::MAX,
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            endpoints: vec![DEFAULT_UPSTREAM.to_string()],
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_request_bytes: ByteSize::b(DEFAULT_MAX_REQUEST_BYTES),
            max_value_bytes: ByteSize::b(DEFAULT_MAX_VALUE_BYTES),
            max_response_bytes: ByteSize::b(DEFAULT_MAX_RESPONSE_BYTES),
            value_compare_attempts: 16,
            max_txn_ops: 128,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".into(), format: LogFormat::Text }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            upstream: UpstreamConfig::default(),
            limits: LimitsConfig::default(),
            prefixes: default_prefixes(),
            log: LogConfig::default(),
            dictionaries: DictionariesConfig::default(),
        }
    }
}

impl PrefixConfig {
    /// A prefix rule with every default (zstd level 3, 256 B minimum, compressing).
    pub fn new(prefix: impl Into<String>) -> Self {
        PrefixConfig {
            prefix: prefix.into(),
            codec: CodecName::Zstd,
            level: DEFAULT_LEVEL,
            min_size: ByteSize::b(DEFAULT_MIN_SIZE),
            compress: true,
            dictionary: None,
            allow_sensitive_dictionary: false,
        }
    }
}

fn default_prefixes() -> Vec<PrefixConfig> {
    vec![PrefixConfig::new(FLYTEWORKFLOW_PREFIX)]
}
fn default_level() -> i32 {
    DEFAULT_LEVEL
}
fn default_min_size() -> ByteSize {
    ByteSize::b(DEFAULT_MIN_SIZE)
}
fn default_true() -> bool {
    true
}

impl Config {
    /// Parses TOML text; `origin` names the source in errors. Does not validate.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: origin.to_string(), message: e.to_string() })
    }

    /// Reads and parses a file. Does not validate.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Checks every value; the error names the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: String| Err(ConfigError::Invalid { key: key.to_string(), reason });
        if !self.server.listen.ip().is_loopback() && !self.server.allow_non_loopback {
            return invalid(
                "server.listen",
                format!(
                    "{} is not a loopback address; set server.allow_non_loopback = true to serve plain text beyond this host",
                    self.server.listen
                ),
            );
        }
        if self.server.max_concurrent_streams < 1000 {
            return invalid(
                "server.max_concurrent_streams",
                format!("{} is too low: kube-apiserver runs many watches on one connection", self.server.max_concurrent_streams),
            );
        }
        if self.upstream.endpoints.is_empty() {
            return invalid("upstream.endpoints", "at least one etcd endpoint is needed".into());
        }
        for (i, e) in self.upstream.endpoints.iter().enumerate() {
            let key = format!("upstream.endpoints[{i}]");
            let uri: http::Uri = match e.parse() {
                Ok(u) => u,
                Err(err) => return invalid(&key, format!("{e:?} is not a URL: {err}")),
            };
            if uri.scheme_str() != Some("http") || uri.port_u16().is_none() {
                return invalid(&key, format!("{e:?} must be http://host:port (TLS toward etcd is not supported yet)"));
            }
            if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
                return invalid(&key, format!("{e:?} has a path or query; etcd endpoints are http://host:port"));
            }
            if self.upstream.endpoints[..i].contains(e) {
                return invalid(&key, format!("{e:?} is listed twice"));
            }
            if let (Some(host), Some(port)) = (uri.host(), uri.port_u16()) {
                let listen = self.server.listen;
                let host_ip = host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().ok();
                let local = host == "localhost" || host_ip.is_some_and(|ip| ip.is_loopback() || ip.is_unspecified());
                let same_host = host_ip == Some(listen.ip()) || (local && (listen.ip().is_loopback() || listen.ip().is_unspecified()));
                if port == listen.port() && same_host {
                    return invalid(&key, format!("{e:?} is the proxy's own listen address (server.listen)"));
                }
            }
        }
        if self.limits.max_request_bytes.as_u64() < 2 << 20 {
            return invalid(
                "limits.max_request_bytes",
                format!("{} is below 2 MiB, the size kube-apiserver's etcd client may send", self.limits.max_request_bytes),
            );
        }
        if self.limits.max_value_bytes.as_u64() < 2 << 20 {
            return invalid("limits.max_value_bytes", format!("{} is below 2 MiB", self.limits.max_value_bytes));
        }
        if self.limits.max_value_bytes.as_u64() > 1 << 30 {
            return invalid("limits.max_value_bytes", format!("{} is over 1 GiB", self.limits.max_value_bytes));
        }
        if self.limits.max_response_bytes < self.limits.max_value_bytes {
            return invalid(
                "limits.max_response_bytes",
                format!("{} is below limits.max_value_bytes ({})", self.limits.max_response_bytes, self.limits.max_value_bytes),
            );
        }
        if self.limits.max_txn_ops == 0 {
            return invalid("limits.max_txn_ops", "must be at least 1 (etcd's default is 128)".into());
        }
        for (key, d) in [
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.keepalive_interval", self.upstream.keepalive_interval),
            ("upstream.keepalive_timeout", self.upstream.keepalive_timeout),
        ] {
            if d.is_zero() {
                return invalid(key, "must be greater than 0s".into());
            }
        }
        if self.limits.value_compare_attempts == 0 {
            return invalid("limits.value_compare_attempts", "must be at least 1".into());
        }
        for (i, p) in self.prefixes.iter().enumerate() {
            if !(1..=22).contains(&p.level) {
                return invalid(&format!("prefixes[{i}].level"), format!("{} is not a zstd level (1..=22)", p.level));
            }
            if self.prefixes[..i].iter().any(|q| q.prefix == p.prefix) {
                return invalid(&format!("prefixes[{i}].prefix"), format!("{:?} is listed twice", p.prefix));
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return invalid("log.level", format!("{:?} is not a tracing filter (try \"info\")", self.log.level));
        }
        self.validate_dictionaries()
    }
}

// ---- [dictionaries] -------------------------------------------------------------------------

/// Where dictionaries are stored: under etcd-squeeze's reserved prefix, outside `/registry/`.
pub const DEFAULT_DICTIONARY_KEY_PREFIX: &str = "/etcd-squeeze/dictionaries/";
/// The trainer election key (one training replica at a time).
pub const DEFAULT_ELECTION_KEY: &str = "/etcd-squeeze/trainer";
/// 10 s election lease: a dead trainer is replaced within 10 s; keepalives every ~3 s.
pub const DEFAULT_ELECTION_TTL: Duration = Duration::from_secs(10);
/// 64 KiB dictionaries: FlyteWorkflow objects share field names, task names, URIs and phase
/// strings that fit in far less; 32 KiB and 112 KiB do no better on the corpus (docs/benchmarks.md).
pub const DEFAULT_DICTIONARY_SIZE: u64 = 64 << 10;
/// 256 samples per prefix: enough variety for zstd's trainer; the reservoir holds at most
/// 256 × 64 KiB = 16 MiB per prefix.
pub const DEFAULT_SAMPLES: usize = 256;
/// Each sample is the first 64 KiB of a value: a dictionary learns the shared structure, which the
/// start of a large object shows as well as its whole.
pub const DEFAULT_SAMPLE_MAX_BYTES: u64 = 64 << 10;
/// Retrain at most every 6 h: FlyteWorkflow shapes change with deployments, not minutes.
pub const DEFAULT_RETRAIN_INTERVAL: Duration = Duration::from_secs(6 * 3600);
/// Publish a new dictionary only when it stores held-out values at least 5% smaller.
pub const DEFAULT_MIN_GAIN: f64 = 0.05;
/// Keys whose values must never share a dictionary with other values.
pub const DEFAULT_SENSITIVE_PREFIXES: &[&str] = &["/registry/secrets/"];

/// `[dictionaries]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DictionariesConfig {
    /// `dictionaries.enabled`: compress new values with the current dictionary of their prefix and
    /// train dictionaries. Values written with a dictionary stay readable when false. Default true.
    pub enabled: bool,
    /// `dictionaries.key_prefix`: where dictionaries live in etcd; must be under `/etcd-squeeze/`.
    pub key_prefix: String,
    /// `dictionaries.train`: this replica may be elected trainer. Default true.
    pub train: bool,
    /// `dictionaries.election_key`: the trainer election key; must be under `/etcd-squeeze/`.
    pub election_key: String,
    /// `dictionaries.election_ttl`: lease TTL of the elected trainer. Default 10s.
    #[serde(with = "humantime_serde")]
    pub election_ttl: Duration,
    /// `dictionaries.size`: largest trained dictionary. Default 64 KiB.
    pub size: ByteSize,
    /// `dictionaries.samples`: values sampled per prefix (reservoir size). Default 256.
    pub samples: usize,
    /// `dictionaries.sample_max_bytes`: each sample is cut to this size. Default 64 KiB.
    pub sample_max_bytes: ByteSize,
    /// `dictionaries.retrain_interval`: time between training rounds of a prefix. Default 6h.
    #[serde(with = "humantime_serde")]
    pub retrain_interval: Duration,
    /// `dictionaries.min_gain`: a new dictionary is published only if it stores held-out samples
    /// at least this fraction smaller than the current one (or than no dictionary). Default 0.05.
    pub min_gain: f64,
    /// `dictionaries.sensitive_prefixes`: prefixes never served by a dictionary unless a
    /// `[[prefixes]]` table says `allow_sensitive_dictionary = true`. Default `["/registry/secrets/"]`.
    pub sensitive_prefixes: Vec<String>,
}

impl Default for DictionariesConfig {
    fn default() -> Self {
        DictionariesConfig {
            enabled: true,
            key_prefix: DEFAULT_DICTIONARY_KEY_PREFIX.into(),
            train: true,
            election_key: DEFAULT_ELECTION_KEY.into(),
            election_ttl: DEFAULT_ELECTION_TTL,
            size: ByteSize::b(DEFAULT_DICTIONARY_SIZE),
            samples: DEFAULT_SAMPLES,
            sample_max_bytes: ByteSize::b(DEFAULT_SAMPLE_MAX_BYTES),
            retrain_interval: DEFAULT_RETRAIN_INTERVAL,
            min_gain: DEFAULT_MIN_GAIN,
            sensitive_prefixes: DEFAULT_SENSITIVE_PREFIXES.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl PrefixConfig {
    /// The sensitive prefix this prefix overlaps (contains it, or lies inside it), if any.
    pub fn sensitive_overlap<'a>(&self, dictionaries: &'a DictionariesConfig) -> Option<&'a str> {
        dictionaries
            .sensitive_prefixes
            .iter()
            .find(|s| self.prefix.starts_with(s.as_str()) || s.starts_with(self.prefix.as_str()))
            .map(String::as_str)
    }

    /// True when new values of this prefix are compressed with (and train) a shared dictionary:
    /// dictionaries enabled, the prefix compresses, `dictionary` is not false, and it does not
    /// overlap a sensitive prefix unless `allow_sensitive_dictionary` is set.
    pub fn uses_dictionary(&self, dictionaries: &DictionariesConfig) -> bool {
        dictionaries.enabled
            && self.compress
            && self.dictionary != Some(false)
            && (self.allow_sensitive_dictionary || self.sensitive_overlap(dictionaries).is_none())
    }
}

impl Config {
    fn validate_dictionaries(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: String| Err(ConfigError::Invalid { key: key.to_string(), reason });
        let d = &self.dictionaries;
        let reserved = std::str::from_utf8(crate::codec::RESERVED_PREFIX).expect("ASCII");
        for (key, value) in [("dictionaries.key_prefix", &d.key_prefix), ("dictionaries.election_key", &d.election_key)] {
            if !value.starts_with(reserved) || value.len() == reserved.len() {
                return invalid(key, format!("{value:?} must be a key under {reserved:?}, which is never compressed"));
            }
        }
        if d.election_key.starts_with(&d.key_prefix) {
            return invalid("dictionaries.election_key", format!("{:?} is inside dictionaries.key_prefix", d.election_key));
        }
        if d.election_ttl < Duration::from_secs(1) {
            return invalid("dictionaries.election_ttl", "must be at least 1s (etcd leases count in seconds)".into());
        }
        if !(1024..=(16 << 20)).contains(&d.size.as_u64()) {
            return invalid("dictionaries.size", format!("{} is outside 1 KiB..=16 MiB", d.size));
        }
        if d.samples < crate::dictionary::training::MIN_SAMPLES {
            return invalid("dictionaries.samples", format!("{} is below {}", d.samples, crate::dictionary::training::MIN_SAMPLES));
        }
        if d.sample_max_bytes.as_u64() < 256 {
            return invalid("dictionaries.sample_max_bytes", format!("{} is below 256 B", d.sample_max_bytes));
        }
        if d.retrain_interval < Duration::from_millis(100) {
            return invalid("dictionaries.retrain_interval", "must be at least 100ms".into());
        }
        if !(0.0..1.0).contains(&d.min_gain) {
            return invalid("dictionaries.min_gain", format!("{} is not a fraction in 0..1", d.min_gain));
        }
        for (i, p) in self.prefixes.iter().enumerate() {
            if let (Some(true), false, Some(s)) = (p.dictionary, p.allow_sensitive_dictionary, p.sensitive_overlap(d)) {
                return invalid(
                    &format!("prefixes[{i}].dictionary"),
                    format!(
                        "{:?} overlaps the sensitive prefix {s:?}: a shared dictionary leaks its training values through the \
                         compressed size of other values; set allow_sensitive_dictionary = true to accept that",
                        p.prefix
                    ),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_is_valid_and_documents_every_key() {
        let text = include_str!("../config/etcd-squeeze.toml");
        let c = Config::parse(text, "config/etcd-squeeze.toml").unwrap();
        c.validate().unwrap();
        for key in [
            "listen", "allow_non_loopback", "max_concurrent_streams", "endpoints", "connect_timeout",
            "keepalive_interval", "keepalive_timeout", "max_request_bytes", "max_value_bytes",
            "value_compare_attempts", "max_response_bytes", "max_txn_ops", "prefix", "codec", "level", "min_size", "compress", "format",
            // [dictionaries] and the per-prefix dictionary keys
            "dictionary", "allow_sensitive_dictionary", "enabled", "key_prefix", "train", "election_key",
            "election_ttl", "size", "samples", "sample_max_bytes", "retrain_interval", "min_gain", "sensitive_prefixes",
        ] {
            assert!(text.contains(&format!("{key} =")), "config/etcd-squeeze.toml does not document {key}");
        }
    }

    #[test]
    fn defaults() {
        let c = Config::parse("", "empty").unwrap();
        c.validate().unwrap();
        assert_eq!(c.prefixes.len(), 1);
        assert_eq!(c.prefixes[0].prefix, FLYTEWORKFLOW_PREFIX);
        assert_eq!(c.limits.max_request_bytes.as_u64(), 32 << 20);
    }

    #[test]
    fn sensitive_prefixes_get_no_dictionary_unless_allowed() {
        let d = DictionariesConfig::default();
        let mut p = PrefixConfig::new(FLYTEWORKFLOW_PREFIX);
        assert!(p.uses_dictionary(&d));
        for prefix in ["/registry/secrets/", "/registry/secrets/ns/", "/registry/", ""] {
            p.prefix = prefix.into();
            assert!(!p.uses_dictionary(&d), "{prefix:?}");
        }
        p.dictionary = Some(true);
        p.allow_sensitive_dictionary = true;
        assert!(p.uses_dictionary(&d));
        p.dictionary = Some(false);
        assert!(!p.uses_dictionary(&d));
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[server]\nlisten = \"0.0.0.0:2379\"\n", "server.listen"),
            ("[[prefixes]]\nprefix = \"/a/\"\nlevel = 40\n", "prefixes[0].level"),
            ("[[prefixes]]\nprefix = \"/a/\"\n[[prefixes]]\nprefix = \"/a/\"\n", "prefixes[1].prefix"),
            ("[upstream]\nendpoints = []\n", "upstream.endpoints"),
            ("[upstream]\nendpoints = [\"ftp://x\"]\n", "upstream.endpoints[0]"),
            ("[upstream]\nendpoints = [\"http://127.0.0.1:2379\"]\n", "upstream.endpoints[0]"),
            ("[server]\nlisten = \"[::1]:2379\"\n[upstream]\nendpoints = [\"http://[::1]:2379\"]\n", "upstream.endpoints[0]"),
            ("[upstream]\nendpoints = [\"http://127.0.0.1:1/foo?x=1\"]\n", "upstream.endpoints[0]"),
            ("[upstream]\nendpoints = [\"http://127.0.0.1:1\", \"http://127.0.0.1:1\"]\n", "upstream.endpoints[1]"),
            ("[upstream]\nconnect_timeout = \"0s\"\n", "upstream.connect_timeout"),
            ("[limits]\nmax_response_bytes = \"3MiB\"\n", "limits.max_response_bytes"),
            ("[limits]\nmax_request_bytes = \"1MiB\"\n", "limits.max_request_bytes"),
            ("[server]\nlistne = \"127.0.0.1:1\"\n", "listne"),
            ("[[prefixes]]\nprefix = \"/a/\"\ncodec = \"lz4\"\n", "lz4"),
            ("[upstream]\nconnect_timeout = \"soon\"\n", "connect_timeout"),
            ("[dictionaries]\nkey_prefix = \"/registry/dicts/\"\n", "dictionaries.key_prefix"),
            ("[dictionaries]\nmin_gain = 1.5\n", "dictionaries.min_gain"),
            ("[[prefixes]]\nprefix = \"/registry/secrets/\"\ndictionary = true\n", "prefixes[0].dictionary"),
            ("[[prefixes]]\nprefix = \"\"\ndictionary = true\n", "prefixes[0].dictionary"),
        ];
        for (text, key) in cases {
            let err = Config::parse(text, "t.toml").and_then(|c| c.validate()).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?}: {err}");
        }
    }
}
