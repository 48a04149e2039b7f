//! One story for addresses and paths: etcd stays where it is installed (2379, kubeadm's and
//! Debian's), the proxy listens on the default `server.listen` (12379), the operator commands talk
//! to etcd itself, and every doc, manifest, unit and example says so with the same numbers and the
//! same config path as the binary's defaults.

use std::path::{Path, PathBuf};

use etcd_squeeze::config::Config;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The one config file path the docs and units use.
const CONFIG_PATH: &str = "/etc/etcd-squeeze/etcd-squeeze.toml";

/// README, docs, deploy files (units, manifests), the example config and the scripts.
fn documents() -> Vec<PathBuf> {
    let mut out = vec![Path::new(ROOT).join("README.md"), Path::new(ROOT).join("config/etcd-squeeze.toml")];
    let mut dirs = vec![Path::new(ROOT).join("docs"), Path::new(ROOT).join("deploy"), Path::new(ROOT).join("scripts")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if !path.to_string_lossy().contains("etcd-squeeze-rules.test") {
                out.push(path);
            }
        }
    }
    out
}

/// The port after `host:` in `url`-like text (`http://127.0.0.1:2379/x` → 2379).
fn port_after(text: &str) -> Option<u16> {
    let digits: String = text.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// Every number that looks like an etcd-family port (contains "2379") following a ':' in `line`.
fn etcd_like_ports(line: &str) -> Vec<u16> {
    line.match_indices(':').filter_map(|(i, _)| port_after(&line[i + 1..])).filter(|p| p.to_string().contains("2379")).collect()
}

#[test]
fn docs_manifests_and_defaults_tell_one_story_for_ports_and_paths() {
    let defaults = Config::default();
    let proxy = defaults.server.listen.port();
    let etcd: u16 = defaults.upstream.endpoints[0].rsplit(':').next().unwrap().trim_end_matches('/').parse().unwrap();
    assert_eq!((proxy, etcd), (12379, 2379), "the layout the docs describe");
    // The example config is the defaults.
    let example = Config::load(&Path::new(ROOT).join("config/etcd-squeeze.toml")).unwrap();
    assert_eq!(example.server.listen, defaults.server.listen);
    assert_eq!(example.upstream.endpoints, defaults.upstream.endpoints);
    assert_eq!(example.metrics.listen, defaults.metrics.listen);

    let mut problems = Vec::new();
    for path in documents() {
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        let name = path.strip_prefix(ROOT).unwrap().display().to_string();
        for (n, line) in text.lines().enumerate() {
            let at = format!("{name}:{}", n + 1);
            for port in etcd_like_ports(line) {
                if port != proxy && port != etcd {
                    problems.push(format!("{at}: port {port} is neither the proxy's ({proxy}) nor etcd's ({etcd}): {line}"));
                }
            }
            if let Some(i) = line.find("--etcd-servers=") {
                let url = &line[i..];
                if !etcd_like_ports(url).iter().all(|p| *p == proxy) {
                    problems.push(format!("{at}: kube-apiserver must point at the proxy ({proxy}): {line}"));
                }
            }
            let operator = ["etcd-squeeze analyze", "etcd-squeeze migrate", "etcd-squeeze get", "etcd-squeeze dict"].iter().any(|c| line.contains(c));
            if operator && line.contains("--endpoints") && etcd_like_ports(line).contains(&proxy) {
                problems.push(format!("{at}: operator commands talk to etcd itself ({etcd}), never the proxy: {line}"));
            }
            for (i, _) in line.match_indices("/etc/etcd-squeeze") {
                let rest = &line[i..];
                let path: String = rest.chars().take_while(|c| !c.is_whitespace() && !"`\"',)]".contains(*c)).collect();
                if path.ends_with(".toml") && path != CONFIG_PATH {
                    problems.push(format!("{at}: config path {path}, not {CONFIG_PATH}"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "docs and manifests disagree with the defaults:\n{}", problems.join("\n"));
}
