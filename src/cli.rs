//! The command line's shared argument types and config overrides: how `serve` and the
//! operator commands (`analyze`, `migrate`, `get`, `dict`, `status`) find their configuration
//! file, reach etcd and choose prefixes, with the same flags and the same precedence (a flag
//! replaces the file's value, the file replaces the default).

use std::path::PathBuf;

use crate::config::{Config, ConfigError, PrefixConfig};

/// How to reach etcd: the same configuration file as `serve` (its `[upstream]` section,
/// TLS included), and overrides named like etcdctl's flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EtcdArgs {
    /// The proxy's TOML configuration (prefixes, levels, limits, [upstream]); defaults without one.
    #[arg(long, env = "ETCD_SQUEEZE_CONFIG")]
    pub config: Option<PathBuf>,
    /// etcd's own client URL (repeatable or comma-separated), replacing upstream.endpoints.
    /// Point it at etcd itself, never at the proxy: through the proxy every value looks raw.
    #[arg(long = "endpoints", alias = "upstream", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// PEM CA bundle that signed etcd's certificate (https endpoints), replacing upstream.tls_ca_file.
    #[arg(long, value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// PEM client certificate presented to etcd, replacing upstream.tls_cert_file.
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert, replacing upstream.tls_key_file.
    #[arg(long = "key", id = "tls_key", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Name checked in etcd's certificate instead of each endpoint's host, replacing
    /// upstream.tls_server_name.
    #[arg(long)]
    pub server_name: Option<String>,
}

/// Which key prefixes a command works on.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PrefixArgs {
    /// Key prefix (repeatable), replacing the configured [[prefixes]] with default settings.
    #[arg(long = "prefix")]
    pub prefixes: Vec<String>,
}

impl EtcdArgs {
    /// The configuration file (or the defaults) with these flags and `prefixes` applied, not yet
    /// validated: `prefixes` non-empty replaces the configured `[[prefixes]]`.
    ///
    /// Errors: the file cannot be read or parsed ([`ConfigError`] names the key and value).
    pub fn load(&self, prefixes: &[String]) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        let u = &mut config.upstream;
        if !self.endpoints.is_empty() {
            u.endpoints = self.endpoints.clone();
        }
        for (field, flag) in [(&mut u.tls_ca_file, &self.cacert), (&mut u.tls_cert_file, &self.cert), (&mut u.tls_key_file, &self.key)] {
            if flag.is_some() {
                field.clone_from(flag);
            }
        }
        if self.server_name.is_some() {
            u.tls_server_name.clone_from(&self.server_name);
        }
        if !prefixes.is_empty() {
            config.prefixes = prefixes.iter().map(PrefixConfig::new).collect();
        }
        Ok(config)
    }
}
