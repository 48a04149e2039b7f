//! Configuration: one TOML file (`--config`), a few CLI overrides, and `validate()`.
//!
//! Every key is documented in `config/etcd-squeeze.toml`. Unknown keys are refused
//! (`deny_unknown_fields`), and every semantic error names the key it is about.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use crate::codec::{DeltaRule, PrefixRule, ValueCodec, RESERVED_PREFIX};

/// The key prefix kube-apiserver stores FlyteWorkflow custom resources under.
pub const FLYTEWORKFLOW_PREFIX: &str = "/registry/flyte.lyft.com/flyteworkflows/";
/// Where the proxy listens by default: loopback port 12379, beside an etcd installed the usual
/// way (kubeadm's and Debian's etcd keep 2379; kube-apiserver's `--etcd-servers` moves to 12379).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:12379";
/// The etcd the proxy forwards to by default: etcd's own client port on this host.
pub const DEFAULT_UPSTREAM: &str = "http://127.0.0.1:2379";
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
/// Where `/metrics`, `/healthz` and `/readyz` are served by default: loopback, next to etcd's
/// own ports (etcd's `--listen-metrics-urls` is usually 2381).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9379";
/// How long in-flight unary calls may run after SIGTERM: 10 s, well inside Kubernetes' default
/// 30 s `terminationGracePeriodSeconds` and systemd's 90 s stop timeout.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// A TLS handshake that takes longer than 10 s is a stuck or hostile client: drop it.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Readiness probe period: 2 s, as often as kube-apiserver's own etcd health checks (one per
/// timeout/2 with a 2 s timeout), and cheap (one count-only Range).
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// Readiness probe timeout: 2 s, kube-apiserver's `--etcd-healthcheck-timeout` default.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
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
    /// `[metrics]`: the Prometheus and health-check listener.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// `[health]`: the readiness probe toward etcd.
    #[serde(default)]
    pub health: HealthConfig,
    /// `[dictionaries]`: trained zstd dictionaries shared through etcd.
    #[serde(default)]
    pub dictionaries: DictionariesConfig,
    /// The frame codecs this replica announces it reads (`serve --announce-codecs`, hidden: a
    /// test pretending to be an older build); `None`: every codec it reads ([`crate::members::CODECS`]).
    #[serde(skip)]
    pub announce_codecs: Option<Vec<String>>,
    /// Announce this replica under `/etcd-squeeze/members/` (default true). Off only in tests
    /// that compare revisions with a second etcd given the same writes: the announcement is a
    /// write of its own. Off, `delta = "auto"` writes per-object frames and no superseded base is
    /// collected.
    #[serde(skip, default = "announce_default")]
    pub announce: bool,
    /// How often the elected replica sweeps orphaned delta-frame bases ([`crate::delta::sweep`];
    /// default [`DEFAULT_SWEEP_INTERVAL`]; shorter in tests).
    #[serde(skip, default = "sweep_interval_default")]
    pub sweep_interval: Duration,
}

fn announce_default() -> bool {
    true
}

/// The default of [`Config::sweep_interval`].
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

fn sweep_interval_default() -> Duration {
    DEFAULT_SWEEP_INTERVAL
}

/// `[server]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// `server.listen`: address:port for the etcd v3 gRPC API. Default `127.0.0.1:2379`.
    pub listen: SocketAddr,
    /// `server.allow_non_loopback`: must be true to listen on a non-loopback address in plain text
    /// (a warning is logged when it is used).
    pub allow_non_loopback: bool,
    /// `server.max_concurrent_streams`: HTTP/2 streams per client connection. Default u32::MAX,
    /// as etcd: kube-apiserver multiplexes many watches on one connection.
    pub max_concurrent_streams: u32,
    /// `server.tls_cert_file`: PEM certificate chain served to clients. With `tls_key_file`,
    /// turns TLS on (ALPN `h2` for gRPC, `http/1.1` for etcd's `/version`, `/health`, `/metrics`). Reloaded when the file changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// `server.tls_key_file`: PEM private key of `tls_cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// `server.tls_client_ca_file`: PEM CA bundle; when set, every client must present a
    /// certificate signed by it (kube-apiserver's `--etcd-certfile`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca_file: Option<PathBuf>,
    /// `server.tls_handshake_timeout`: a client that has not finished its TLS handshake by then
    /// (or, after it, not sent its first request bytes) is disconnected. Default 10s.
    #[serde(with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    /// `server.shutdown_grace`: on SIGTERM, how long in-flight unary calls may still run. Watch
    /// and LeaseKeepAlive streams end at once with UNAVAILABLE. Default 10s.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

/// `[upstream]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// `upstream.endpoints`: etcd client URLs (`http://host:port` or `https://host:port`);
    /// requests are balanced across them and skip one that is down.
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
    /// `upstream.tls_ca_file`: PEM CA bundle that signed etcd's server certificate (etcd's
    /// `--trusted-ca-file` side). Required for `https://` endpoints. Reloaded when it changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// `upstream.tls_cert_file`: PEM client certificate presented to etcd (etcd's
    /// `--client-cert-auth`); kube-apiserver's `--etcd-certfile` is the usual one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// `upstream.tls_key_file`: PEM private key of `tls_cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// `upstream.tls_server_name`: the name checked in etcd's certificate instead of each
    /// endpoint's host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// `upstream.user`: the etcd user (etcd authentication) the proxy uses for what it does on
    /// its own behalf — reading and watching `/etcd-squeeze/` (dictionaries, delta-frame bases),
    /// training, the trainer election, readiness probes. Clients' calls always carry the
    /// client's own credentials (its `token`, or its TLS identity). Needs `upstream.password_file`.
    /// Its role needs readwrite on the prefix `/etcd-squeeze/` (docs/operations.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `upstream.password_file`: a file holding `upstream.user`'s password (trailing newline
    /// ignored), read at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `metrics.listen`: address:port serving `/metrics` (Prometheus text), `/healthz` and
    /// `/readyz` over plain HTTP. Default `127.0.0.1:9379`.
    pub listen: SocketAddr,
}

/// `[health]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// `health.probe_interval`: how often etcd's reachability (a count-only Range on the
    /// dictionary store) is probed for `/readyz` and the gRPC health service. Default 2s.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// `health.probe_timeout`: a probe slower than this counts as a failure. Default 2s.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// `limits.max_request_bytes`: largest decoded gRPC message accepted from a client. Default 32 MiB.
    pub max_request_bytes: ByteSize,
    /// `limits.max_value_bytes`: largest value under a compressed prefix. A larger write gets
    /// etcd's own `etcdserver: request is too large`; a stored frame declaring more is never
    /// decompressed (passed on as stored, logged naming the key). Default 16 MiB.
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
#[derive(Debug, Clone, Deserialize, Serialize)]
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dictionary: Option<bool>,
    /// `prefixes[].allow_sensitive_dictionary`: lets `dictionary = true` apply to a prefix that
    /// overlaps a sensitive prefix (accepting the compression side channel). Default false.
    #[serde(default)]
    pub allow_sensitive_dictionary: bool,
    /// `prefixes[].delta`: store each new version of a key as a delta frame against a base (an
    /// earlier version of the same key kept under `/etcd-squeeze/bases/`): `true`, `false`, or
    /// `"auto"`: delta frames while every announced replica reads them ([`crate::members`]),
    /// per-object frames otherwise. Unset: `"auto"` for the FlyteWorkflow prefix, `false` for
    /// others ([`PrefixConfig::delta_mode`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<DeltaMode>,
    /// `prefixes[].delta_rebase_fraction`: a new base is written when the delta against the current
    /// one is larger than this fraction of the value compressed on its own. Default 0.5.
    #[serde(default = "default_rebase_fraction")]
    pub delta_rebase_fraction: f64,
    /// `prefixes[].delta_base_cache`: bases kept in memory for this prefix, shared by every
    /// request (bases are immutable: never stale): decompressed bases, values lately decoded
    /// and base records share it ([`crate::delta::cache`]). Default 64 MiB.
    #[serde(default = "default_base_cache")]
    pub delta_base_cache: ByteSize,
}

/// `prefixes[].delta`: `true`, `false` or `"auto"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DeltaMode {
    /// `false`: every version stored on its own.
    Off,
    /// `true`: delta frames always (every replica must read them).
    On,
    /// `"auto"`: delta frames while every replica announced under `/etcd-squeeze/members/` reads
    /// them; per-object frames otherwise (and while that is not known).
    #[default]
    Auto,
}

impl DeltaMode {
    /// True unless `false`: the prefix may hold delta frames and bases.
    pub fn enabled(self) -> bool {
        self != DeltaMode::Off
    }
}

impl From<bool> for DeltaMode {
    fn from(on: bool) -> Self {
        if on {
            DeltaMode::On
        } else {
            DeltaMode::Off
        }
    }
}

impl Serialize for DeltaMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            DeltaMode::Off => s.serialize_bool(false),
            DeltaMode::On => s.serialize_bool(true),
            DeltaMode::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for DeltaMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        let accepted = "accepted: true, false or \"auto\"";
        match Raw::deserialize(d).map_err(|_| serde::de::Error::custom(format!("invalid value; {accepted}")))? {
            Raw::Bool(on) => Ok(on.into()),
            Raw::Text(t) if t == "auto" => Ok(DeltaMode::Auto),
            Raw::Text(t) => Err(serde::de::Error::custom(format!("invalid value \"{t}\"; {accepted}"))),
        }
    }
}

/// `prefixes[].codec`
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CodecName {
    /// Zstandard (RFC 8878).
    #[default]
    Zstd,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `log.level`: a tracing filter such as `info` or `etcd_squeeze=debug`; `RUST_LOG` overrides it.
    pub level: String,
    /// `log.format`: `text` or `json`.
    pub format: LogFormat,
}

/// `log.format`
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
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
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            tls_handshake_timeout: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
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
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_server_name: None,
            user: None,
            password_file: None,
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: DEFAULT_METRICS_LISTEN.parse().expect("constant") }
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig { probe_interval: DEFAULT_PROBE_INTERVAL, probe_timeout: DEFAULT_PROBE_TIMEOUT }
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
            metrics: MetricsConfig::default(),
            announce_codecs: None,
            announce: true,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            health: HealthConfig::default(),
            dictionaries: DictionariesConfig::default(),
        }
    }
}

impl PrefixConfig {
    /// `delta` as set, else its default: `"auto"` for the FlyteWorkflow prefix (whose objects are
    /// rewritten whole on every status change), `false` for other prefixes.
    pub fn delta_mode(&self) -> DeltaMode {
        self.delta.unwrap_or(if self.prefix == FLYTEWORKFLOW_PREFIX { DeltaMode::Auto } else { DeltaMode::Off })
    }

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
            delta: None,
            delta_rebase_fraction: default_rebase_fraction(),
            delta_base_cache: default_base_cache(),
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
fn default_rebase_fraction() -> f64 {
    0.5
}
fn default_base_cache() -> ByteSize {
    ByteSize::mib(64)
}
fn default_true() -> bool {
    true
}

impl Config {
    /// Parses TOML text; `origin` names the source in errors. Does not validate.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let mut message = e.to_string();
            // serde's words for a value of the wrong form say nothing of the form expected.
            let hint = if message.contains("expected parsable string") {
                Some("sizes are a number and a unit without a space: \"256B\", \"64KiB\", \"32MiB\", \"2GiB\"")
            } else if message.contains("invalid socket address syntax") {
                Some("addresses are IP:port, e.g. \"127.0.0.1:12379\" or \"[::1]:12379\" (a host name such as localhost is not accepted)")
            } else if message.contains("invalid duration") || message.contains("unknown time unit") || message.contains("expected number at") {
                Some("durations are a number and a unit: \"500ms\", \"5s\", \"1m\", \"1h\"")
            } else {
                None
            };
            if let Some(hint) = hint {
                message = format!("{}\naccepted: {hint}", message.trim_end());
            }
            ConfigError::Parse { path: origin.to_string(), message }
        })
    }

    /// Reads and parses a file. Does not validate.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Checks every value; the error names the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_server()?;
        self.validate_upstream()?;
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
        if self.limits.value_compare_attempts == 0 {
            return invalid("limits.value_compare_attempts", "must be at least 1".into());
        }
        for (i, p) in self.prefixes.iter().enumerate() {
            let key = format!("prefixes[{i}].prefix");
            if p.prefix != p.prefix.trim() {
                return invalid(&key, format!("{:?} has leading or trailing spaces (etcd keys are matched byte for byte)", p.prefix));
            }
            if !p.prefix.is_empty() && !p.prefix.starts_with('/') {
                return invalid(&key, format!("{:?} does not start with '/': kube-apiserver's keys do (\"/registry/…/\"); \"\" means every key", p.prefix));
            }
            if p.prefix.starts_with("/etcd-squeeze/") {
                return invalid(&key, format!("{:?} is (inside) the proxy's own /etcd-squeeze/, which is never compressed", p.prefix));
            }
            if !(1..=22).contains(&p.level) {
                return invalid(&format!("prefixes[{i}].level"), format!("{} is not a zstd level (1..=22)", p.level));
            }
            if self.prefixes[..i].iter().any(|q| q.prefix == p.prefix) {
                return invalid(&format!("prefixes[{i}].prefix"), format!("{:?} is listed twice", p.prefix));
            }
            if !(p.delta_rebase_fraction > 0.0 && p.delta_rebase_fraction <= 10.0) {
                return invalid(&format!("prefixes[{i}].delta_rebase_fraction"), format!("{} is not in (0, 10]", p.delta_rebase_fraction));
            }
            if p.delta_base_cache.as_u64() < (1 << 20) {
                return invalid(&format!("prefixes[{i}].delta_base_cache"), format!("{} is below 1 MiB", p.delta_base_cache));
            }
        }
        // A bare word is a level; a target needs `target=level` (tracing would read "verbose" as a
        // target at TRACE and then log nothing the operator expects).
        const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];
        let bare_non_level = self.log.level.split(',').map(str::trim).find(|d| !d.contains('=') && !LEVELS.contains(&d.to_ascii_lowercase().as_str()));
        if bare_non_level.is_some() || tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return invalid(
                "log.level",
                format!("{:?} is not a level (trace, debug, info, warn, error, off) or a list of target=level directives such as \"etcd_squeeze=debug,info\"", self.log.level),
            );
        }
        if self.metrics.listen == self.server.listen && self.metrics.listen.port() != 0 {
            return invalid("metrics.listen", format!("{} is also server.listen", self.metrics.listen));
        }
        if self.health.probe_interval < Duration::from_millis(100) {
            return invalid("health.probe_interval", format!("{:?} is below 100ms", self.health.probe_interval));
        }
        if self.health.probe_timeout.is_zero() {
            return invalid("health.probe_timeout", "must be more than 0s".into());
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
/// Fewest samples a dictionary is trained from: zstd's trainer refuses fewer than 5 training
/// samples, and a fifth is held out to judge the result (`dictionaries.samples` may not be lower).
pub const MIN_SAMPLES: usize = 16;

/// `[dictionaries]`
#[derive(Debug, Clone, Deserialize, Serialize)]
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
        let reserved = std::str::from_utf8(RESERVED_PREFIX).expect("ASCII");
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
        if d.samples < MIN_SAMPLES {
            return invalid("dictionaries.samples", format!("{} is below {}", d.samples, MIN_SAMPLES));
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

    fn validate_server(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if !s.listen.ip().is_loopback() && !s.allow_non_loopback && !s.tls_enabled() {
            return invalid(
                "server.listen",
                format!(
                    "{} is not a loopback address; serve TLS (server.tls_cert_file, server.tls_key_file) or set \
                     server.allow_non_loopback = true to serve plain text beyond this host",
                    s.listen
                ),
            );
        }
        if s.max_concurrent_streams < 1000 {
            return invalid(
                "server.max_concurrent_streams",
                format!("{} is too low: kube-apiserver runs many watches on one connection", s.max_concurrent_streams),
            );
        }
        match (&s.tls_cert_file, &s.tls_key_file) {
            (Some(_), None) => return invalid("server.tls_key_file", "required with server.tls_cert_file".into()),
            (None, Some(_)) => return invalid("server.tls_cert_file", "required with server.tls_key_file".into()),
            _ => {}
        }
        if s.tls_client_ca_file.is_some() && !s.tls_enabled() {
            return invalid(
                "server.tls_client_ca_file",
                "client certificates need TLS: set server.tls_cert_file and server.tls_key_file".into(),
            );
        }
        if s.tls_handshake_timeout.is_zero() {
            return invalid("server.tls_handshake_timeout", "must be more than 0s".into());
        }
        Ok(())
    }

    fn validate_upstream(&self) -> Result<(), ConfigError> {
        let u = &self.upstream;
        if u.endpoints.is_empty() {
            return invalid("upstream.endpoints", "at least one etcd endpoint is needed".into());
        }
        let mut any_https = false;
        for (i, e) in u.endpoints.iter().enumerate() {
            let key = format!("upstream.endpoints[{i}]");
            let uri: http::Uri = match e.parse() {
                Ok(u) => u,
                Err(err) => return invalid(&key, format!("{e:?} is not a URL: {err}")),
            };
            let https = uri.scheme_str() == Some("https");
            if !(https || uri.scheme_str() == Some("http")) || uri.port_u16().is_none() {
                return invalid(&key, format!("{e:?} must be http://host:port or https://host:port"));
            }
            any_https |= https;
            if https && u.tls_ca_file.is_none() {
                return invalid("upstream.tls_ca_file", format!("required for the https endpoint {e:?}"));
            }
            if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
                return invalid(&key, format!("{e:?} has a path or query; etcd endpoints are scheme://host:port"));
            }
            if u.endpoints[..i].contains(e) {
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
        for (key, d) in [
            ("upstream.connect_timeout", u.connect_timeout),
            ("upstream.keepalive_interval", u.keepalive_interval),
            ("upstream.keepalive_timeout", u.keepalive_timeout),
        ] {
            if d.is_zero() {
                return invalid(key, "must be greater than 0s".into());
            }
        }
        match (&u.user, &u.password_file) {
            (Some(_), None) => return invalid("upstream.password_file", "required with upstream.user".into()),
            (None, Some(_)) => return invalid("upstream.user", "required with upstream.password_file".into()),
            (Some(user), Some(_)) if user.is_empty() => return invalid("upstream.user", "must not be empty".into()),
            _ => {}
        }
        match (&u.tls_cert_file, &u.tls_key_file) {
            (Some(_), None) => return invalid("upstream.tls_key_file", "required with upstream.tls_cert_file".into()),
            (None, Some(_)) => return invalid("upstream.tls_cert_file", "required with upstream.tls_key_file".into()),
            _ => {}
        }
        let tls_keys = [
            ("upstream.tls_ca_file", u.tls_ca_file.is_some()),
            ("upstream.tls_cert_file", u.tls_cert_file.is_some()),
            ("upstream.tls_server_name", u.tls_server_name.is_some()),
        ];
        if let Some((key, _)) = tls_keys.iter().find(|(_, set)| *set && !any_https) {
            return invalid(key, "set, but no upstream.endpoints entry is https://".into());
        }
        if let Some(name) = &u.tls_server_name {
            if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
                return invalid("upstream.tls_server_name", format!("{name:?} is not a DNS name or IP address"));
            }
        }
        Ok(())
    }
}

fn invalid(key: &str, reason: String) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid { key: key.to_string(), reason })
}

impl ValueCodec {
    /// Builds the codec from a validated [`Config`] (no dictionaries or bases yet: the server
    /// hands it those it loads).
    pub fn from_config(config: &Config) -> Self {
        let rules = config.prefixes.iter().map(PrefixRule::from).collect();
        Self::new(rules, config.limits.max_value_bytes.as_u64() as usize)
            .with_max_response_bytes(config.limits.max_response_bytes.as_u64())
    }
}

impl From<&PrefixConfig> for PrefixRule {
    fn from(p: &PrefixConfig) -> Self {
        PrefixRule {
            prefix: Bytes::copy_from_slice(p.prefix.as_bytes()),
            compress: p.compress,
            level: p.level,
            min_size: p.min_size.as_u64() as usize,
            delta: p.delta_mode().enabled().then(|| DeltaRule {
                rebase_fraction: p.delta_rebase_fraction,
                base_cache_bytes: p.delta_base_cache.as_u64(),
                auto: p.delta_mode() == DeltaMode::Auto,
            }),
        }
    }
}

impl ServerConfig {
    /// True when the gRPC listener serves TLS (`tls_cert_file` and `tls_key_file` set).
    pub fn tls_enabled(&self) -> bool {
        self.tls_cert_file.is_some() && self.tls_key_file.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../config/etcd-squeeze.toml");
    const REFERENCE: &str = include_str!("../docs/configuration.md");

    /// A config with every key set, written as exhaustive struct literals (no `..Default`): a new
    /// field does not compile until it is added here, and then the tests below require its
    /// documentation.
    fn every_key() -> Config {
        let path = || Some(PathBuf::from("/x"));
        Config {
            server: ServerConfig {
                listen: DEFAULT_LISTEN.parse().unwrap(),
                allow_non_loopback: false,
                max_concurrent_streams: u32::MAX,
                tls_cert_file: path(),
                tls_key_file: path(),
                tls_client_ca_file: path(),
                tls_handshake_timeout: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
                shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            },
            upstream: UpstreamConfig {
                endpoints: vec![DEFAULT_UPSTREAM.into()],
                connect_timeout: Duration::from_secs(5),
                keepalive_interval: Duration::from_secs(30),
                keepalive_timeout: Duration::from_secs(10),
                tls_ca_file: path(),
                tls_cert_file: path(),
                tls_key_file: path(),
                tls_server_name: Some("etcd".into()),
                user: Some("etcd-squeeze".into()),
                password_file: path(),
            },
            limits: LimitsConfig {
                max_request_bytes: ByteSize::b(DEFAULT_MAX_REQUEST_BYTES),
                max_value_bytes: ByteSize::b(DEFAULT_MAX_VALUE_BYTES),
                max_response_bytes: ByteSize::b(DEFAULT_MAX_RESPONSE_BYTES),
                value_compare_attempts: 16,
                max_txn_ops: 128,
            },
            prefixes: vec![PrefixConfig {
                prefix: FLYTEWORKFLOW_PREFIX.into(),
                codec: CodecName::Zstd,
                level: DEFAULT_LEVEL,
                min_size: ByteSize::b(DEFAULT_MIN_SIZE),
                compress: true,
                dictionary: Some(true),
                allow_sensitive_dictionary: false,
                delta: Some(DeltaMode::On),
                delta_rebase_fraction: 0.5,
                delta_base_cache: ByteSize::mib(64),
            }],
            log: LogConfig { level: "info".into(), format: LogFormat::Text },
            metrics: MetricsConfig { listen: DEFAULT_METRICS_LISTEN.parse().unwrap() },
            health: HealthConfig { probe_interval: DEFAULT_PROBE_INTERVAL, probe_timeout: DEFAULT_PROBE_TIMEOUT },
            dictionaries: DictionariesConfig::default(),
            announce_codecs: None,
            announce: true,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
        }
    }

    /// Every dotted key of a serialized config: `server.listen`, `prefixes[].level`, …
    fn dotted_keys(value: &toml::Value, path: &str, out: &mut Vec<String>) {
        match value {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    dotted_keys(v, &p, out);
                }
            }
            toml::Value::Array(a) if a.first().is_some_and(toml::Value::is_table) => dotted_keys(&a[0], &format!("{path}[]"), out),
            _ => out.push(path.to_string()),
        }
    }

    fn all_keys() -> Vec<String> {
        let mut keys = Vec::new();
        dotted_keys(&toml::Value::try_from(every_key()).unwrap(), "", &mut keys);
        keys
    }

    #[test]
    fn every_key_is_documented_in_the_reference_and_the_example() {
        let keys = all_keys();
        assert!(keys.len() >= 29, "{keys:?}");
        for key in &keys {
            let row = format!("| `{key}` |");
            assert!(REFERENCE.lines().any(|l| l.starts_with(&row)), "docs/configuration.md has no row {row}");
            let leaf = key.rsplit(['.', ']']).next().unwrap();
            let section = key.split(['.', '[']).next().unwrap();
            let header = if key.contains("[]") { format!("[[{section}]]") } else { format!("[{section}]") };
            let body = EXAMPLE.split(&header).nth(1).unwrap_or_else(|| panic!("config/etcd-squeeze.toml has no {header}"));
            let body = body.split("\n[").next().unwrap();
            assert!(
                body.lines().any(|l| l.trim_start_matches("# ").starts_with(&format!("{leaf} ="))),
                "config/etcd-squeeze.toml does not document {key} under {header}"
            );
        }
        // And the reference documents nothing that does not exist.
        for line in REFERENCE.lines().filter(|l| l.starts_with("| `")) {
            let key = line.split('`').nth(1).unwrap();
            assert!(keys.iter().any(|k| k == key), "docs/configuration.md documents {key}, which is not a key");
        }
    }

    #[test]
    fn example_file_is_valid_and_shows_the_defaults() {
        let c = Config::parse(EXAMPLE, "config/etcd-squeeze.toml").unwrap();
        c.validate().unwrap();
        assert_eq!(toml::Value::try_from(&c).unwrap(), toml::Value::try_from(Config::default()).unwrap());
    }

    #[test]
    fn reference_shows_the_defaults() {
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        let mut keys = Vec::new();
        dotted_keys(&defaults, "", &mut keys);
        for key in keys {
            let mut v = &defaults;
            for part in key.split('.') {
                v = match part.strip_suffix("[]") {
                    Some(p) => &v[p][0],
                    None => &v[part],
                };
            }
            let row = REFERENCE.lines().find(|l| l.starts_with(&format!("| `{key}` |"))).unwrap();
            let shown = row.split('|').nth(2).unwrap().trim();
            let shown = shown.trim_matches('`');
            let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {shown}"))
                .unwrap_or_else(|e| panic!("docs/configuration.md: {key}: default {shown:?} is not TOML: {e}"))["v"]
                .clone();
            let reparsed = |v: &toml::Value| toml::Value::try_from(Config::parse(&table_for(&key, v), "t").unwrap()).unwrap();
            assert_eq!(reparsed(&parsed), reparsed(v), "docs/configuration.md: {key}: default {shown} is not the default");
        }
    }

    /// A one-key config file setting `key` (dotted, `[]` for the prefixes array) to `v`.
    fn table_for(key: &str, v: &toml::Value) -> String {
        let (section, leaf) = key.rsplit_once('.').unwrap();
        match section.strip_suffix("[]") {
            Some(s) if leaf == "prefix" => format!("[[{s}]]\nprefix = {v}\n"),
            Some(s) => format!("[[{s}]]\nprefix = \"/p/\"\n{leaf} = {v}\n"),
            None => format!("[{section}]\n{leaf} = {v}\n"),
        }
    }

    #[test]
    fn defaults() {
        let c = Config::parse("", "empty").unwrap();
        c.validate().unwrap();
        assert_eq!(c.prefixes.len(), 1);
        assert_eq!(c.prefixes[0].prefix, FLYTEWORKFLOW_PREFIX);
        assert_eq!(c.limits.max_request_bytes.as_u64(), 32 << 20);
        assert!(!c.server.tls_enabled());
        assert!(c.metrics.listen.ip().is_loopback());
    }

    #[test]
    fn tls_configs_validate() {
        let server = "[server]\nlisten = \"0.0.0.0:12379\"\ntls_cert_file = \"a\"\ntls_key_file = \"b\"\ntls_client_ca_file = \"c\"\n";
        Config::parse(server, "t").unwrap().validate().unwrap();
        let upstream = "[upstream]\nendpoints = [\"https://10.0.0.1:2379\", \"http://127.0.0.1:22379\"]\ntls_ca_file = \"ca\"\n\
                        tls_cert_file = \"c\"\ntls_key_file = \"k\"\ntls_server_name = \"etcd.local\"\n";
        Config::parse(upstream, "t").unwrap().validate().unwrap();
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
            ("[server]\ntls_cert_file = \"a\"\n", "server.tls_key_file"),
            ("[server]\ntls_key_file = \"a\"\n", "server.tls_cert_file"),
            ("[server]\ntls_client_ca_file = \"a\"\n", "server.tls_client_ca_file"),
            ("[server]\nshutdown_grace = \"later\"\n", "shutdown_grace"),
            ("[[prefixes]]\nprefix = \"/a/\"\nlevel = 40\n", "prefixes[0].level"),
            ("[[prefixes]]\nprefix = \"/a/\"\n[[prefixes]]\nprefix = \"/a/\"\n", "prefixes[1].prefix"),
            ("[upstream]\nendpoints = []\n", "upstream.endpoints"),
            ("[upstream]\nendpoints = [\"ftp://x\"]\n", "upstream.endpoints[0]"),
            ("[upstream]\nendpoints = [\"http://127.0.0.1:12379\"]\n", "upstream.endpoints[0]"),
            ("[[prefixes]]\nprefix = \"registry/flyte/\"\n", "prefixes[0].prefix"),
            ("[[prefixes]]\nprefix = \" /x/\"\n", "prefixes[0].prefix"),
            ("[[prefixes]]\nprefix = \"/etcd-squeeze/bases/\"\n", "prefixes[0].prefix"),
            ("[log]\nlevel = \"verbose\"\n", "log.level"),
            ("[server]\nlisten = \"[::1]:2379\"\n[upstream]\nendpoints = [\"http://[::1]:2379\"]\n", "upstream.endpoints[0]"),
            ("[upstream]\nendpoints = [\"http://127.0.0.1:1/foo?x=1\"]\n", "upstream.endpoints[0]"),
            ("[upstream]\nendpoints = [\"http://127.0.0.1:1\", \"http://127.0.0.1:1\"]\n", "upstream.endpoints[1]"),
            ("[upstream]\nconnect_timeout = \"0s\"\n", "upstream.connect_timeout"),
            ("[limits]\nmax_response_bytes = \"3MiB\"\n", "limits.max_response_bytes"),
            ("[upstream]\nendpoints = [\"https://127.0.0.1:2\"]\n", "upstream.tls_ca_file"),
            ("[upstream]\ntls_ca_file = \"ca\"\n", "upstream.tls_ca_file"),
            ("[upstream]\nendpoints = [\"https://127.0.0.1:2\"]\ntls_ca_file = \"ca\"\ntls_cert_file = \"c\"\n", "upstream.tls_key_file"),
            ("[upstream]\nendpoints = [\"https://127.0.0.1:2\"]\ntls_ca_file = \"ca\"\ntls_server_name = \"a b\"\n", "upstream.tls_server_name"),
            ("[limits]\nmax_request_bytes = \"1MiB\"\n", "limits.max_request_bytes"),
            ("[server]\nlistne = \"127.0.0.1:1\"\n", "listne"),
            ("[[prefixes]]\nprefix = \"/a/\"\ncodec = \"lz4\"\n", "lz4"),
            ("[upstream]\nconnect_timeout = \"soon\"\n", "connect_timeout"),
            ("[metrics]\nlisten = \"127.0.0.1:12379\"\n", "metrics.listen"),
            ("[metrics]\nport = 1\n", "port"),
            ("[[prefixes]]\nprefix = \"/a/\"\nmin_size = \"256 bytes\"\n", "\"256B\""),
            ("[server]\nlisten = \"localhost:2379\"\n", "IP:port"),
            ("[server]\nshutdown_grace = \"10 secs please\"\n", "shutdown_grace"),
            ("[health]\nprobe_interval = \"1ms\"\n", "health.probe_interval"),
            ("[health]\nprobe_timeout = \"0s\"\n", "health.probe_timeout"),
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
