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
        ];
        for (text, key) in cases {
            let err = Config::parse(text, "t.toml").and_then(|c| c.validate()).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?}: {err}");
        }
    }
}
