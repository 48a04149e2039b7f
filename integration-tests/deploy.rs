//! The deployment files agree with each other and with the binary: the ConfigMap's TOML is a
//! valid configuration whose addresses, files and grace period match the static pod, the
//! monitors scrape the port the sidecar exposes, and the systemd unit's command lines run.

use std::path::Path;
use std::process::Command;

use etcd_squeeze::config::Config;
use serde::Deserialize;
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Every YAML document of `deploy/kubernetes/NAME`, as JSON values.
fn yaml(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("deploy/kubernetes").join(name)).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{name}: {e}")))
        .collect()
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array().unwrap_or_else(|| panic!("not a list: {v}")).iter().map(|s| s.as_str().unwrap()).collect()
}

/// The value of `--flag=value` in a command line.
fn flag<'a>(args: &[&'a str], name: &str) -> Option<&'a str> {
    args.iter().find_map(|a| a.strip_prefix(&format!("--{name}=")))
}

/// The ConfigMap's configuration.
fn configmap_config() -> Config {
    let docs = yaml("configmap.yaml");
    let toml = docs[0]["data"]["etcd-squeeze.toml"].as_str().expect("data.etcd-squeeze.toml");
    let config = Config::parse(toml, "deploy/kubernetes/configmap.yaml").unwrap();
    config.validate().unwrap();
    config
}

#[test]
fn static_pod_configmap_and_monitors_agree() {
    let config = configmap_config();
    let pod = &yaml("kube-apiserver.yaml")[0];
    assert_eq!(pod["kind"], "Pod");
    assert_eq!(pod["spec"]["hostNetwork"], true);
    let sidecar = pod["spec"]["initContainers"].as_array().unwrap().iter().find(|c| c["name"] == "etcd-squeeze").expect("sidecar");
    assert_eq!(sidecar["restartPolicy"], "Always", "a native sidecar: started before kube-apiserver, stopped after it");
    let apiserver = pod["spec"]["containers"].as_array().unwrap().iter().find(|c| c["name"] == "kube-apiserver").unwrap();
    let api_args = strs(&apiserver["command"]);

    // kube-apiserver talks TLS to the sidecar's listen address, with the CA that signs the
    // proxy's certificate and a client certificate from the CA the proxy requires.
    assert_eq!(flag(&api_args, "etcd-servers"), Some(format!("https://{}", config.server.listen).as_str()));
    assert!(config.server.listen.ip().is_loopback());
    assert_eq!(flag(&api_args, "etcd-cafile").map(Path::new), config.server.tls_client_ca_file.as_deref());
    assert_eq!(flag(&api_args, "etcd-certfile").map(Path::new), config.upstream.tls_cert_file.as_deref());

    // Every file the configuration names is mounted into the sidecar, and the config itself too.
    let mounts: Vec<(&str, &str)> = sidecar["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), m["mountPath"].as_str().unwrap()))
        .collect();
    let volumes: Vec<&str> = pod["spec"]["volumes"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    let mounted = |path: &Path| mounts.iter().any(|(name, at)| path.starts_with(at) && volumes.contains(name));
    let side_args = strs(&sidecar["command"]);
    assert_eq!(&side_args[1..2], ["serve"]);
    let config_path = flag(&side_args, "config").expect("--config");
    assert!(mounted(Path::new(config_path)), "{config_path} is not mounted");
    let files = [&config.server.tls_cert_file, &config.server.tls_key_file, &config.server.tls_client_ca_file, &config.upstream.tls_ca_file]
        .into_iter()
        .chain([&config.upstream.tls_cert_file, &config.upstream.tls_key_file]);
    for f in files {
        let f = f.as_deref().expect("TLS on both sides");
        assert!(mounted(f), "{} is not mounted into the sidecar", f.display());
    }

    // Probes and the metrics port are the configured metrics listener; shutdown fits the grace period.
    let port = config.metrics.listen.port() as u64;
    let ports = sidecar["ports"].as_array().unwrap();
    assert!(ports.iter().any(|p| p["name"] == "squeeze-metrics" && p["containerPort"] == port));
    for (probe, path) in [("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(sidecar[probe]["httpGet"]["port"], port, "{probe}");
        assert_eq!(sidecar[probe]["httpGet"]["path"], path, "{probe}");
    }
    let grace = pod["spec"]["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(config.server.shutdown_grace.as_secs() < grace);

    // The monitors select these pods and scrape that port.
    let labels = &pod["metadata"]["labels"];
    let selects = |selector: &Value| selector.as_object().unwrap().iter().all(|(k, v)| &labels[k] == v);
    let pm = &yaml("podmonitor.yaml")[0];
    assert_eq!(pm["kind"], "PodMonitor");
    assert!(selects(&pm["spec"]["selector"]["matchLabels"]));
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "squeeze-metrics");
    let sm = yaml("servicemonitor.yaml");
    let (svc, monitor) = (&sm[0], &sm[1]);
    assert_eq!((svc["kind"].as_str(), monitor["kind"].as_str()), (Some("Service"), Some("ServiceMonitor")));
    assert!(selects(&svc["spec"]["selector"]));
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "squeeze-metrics");
    assert!(monitor["spec"]["selector"]["matchLabels"].as_object().unwrap().iter().all(|(k, v)| &svc["metadata"]["labels"][k] == v));
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], svc["spec"]["ports"][0]["name"]);
}

/// The systemd unit's ExecStartPre and ExecStart run the binary with flags it knows (checked
/// with `--check-config` against the example configuration), and it stops within the grace.
#[test]
fn systemd_unit_runs_the_binary() {
    let unit = std::fs::read_to_string(Path::new(ROOT).join("deploy/systemd/etcd-squeeze.service")).unwrap();
    let value = |key: &str| unit.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).unwrap_or_else(|| panic!("no {key}="));
    assert_eq!(value("KillSignal"), "SIGTERM");
    let stop_timeout: u64 = value("TimeoutStopSec").parse().unwrap();
    assert!(Config::default().server.shutdown_grace.as_secs() < stop_timeout);
    let example = Path::new(ROOT).join("config/etcd-squeeze.toml");
    for key in ["ExecStartPre", "ExecStart"] {
        let mut words = value(key).split_whitespace();
        assert_eq!(words.next(), Some("/usr/local/bin/etcd-squeeze"));
        let mut args: Vec<String> = words.map(|w| if w.ends_with(".toml") { example.display().to_string() } else { w.to_string() }).collect();
        if !args.iter().any(|a| a == "--check-config") {
            args.push("--check-config".into());
        }
        let out = Command::new(env!("CARGO_BIN_EXE_etcd-squeeze")).args(&args).output().unwrap();
        assert!(out.status.success(), "{key}: {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    // Where systemd is installed, its own parser must accept the unit without a warning.
    if Command::new("systemd-analyze").arg("--version").output().is_ok_and(|o| o.status.success()) {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("etcd-squeeze.service");
        let unit = unit.replace("/usr/local/bin/etcd-squeeze", env!("CARGO_BIN_EXE_etcd-squeeze"));
        std::fs::write(&copy, unit.replace("/etc/etcd-squeeze/etcd-squeeze.toml", &example.display().to_string())).unwrap();
        let out = Command::new("systemd-analyze").arg("verify").arg(&copy).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let complaints: Vec<&str> = stderr.lines().filter(|l| l.contains("etcd-squeeze.service")).collect();
        assert!(out.status.success() && complaints.is_empty(), "systemd-analyze verify:\n{stderr}");
    } else {
        eprintln!("systemd-analyze not found: the unit's syntax is checked by the assertions above only");
    }
}

/// docs/operations.md covers the lifecycle, and the README points to it.
#[test]
fn operations_guide_covers_the_lifecycle() {
    let ops = std::fs::read_to_string(Path::new(ROOT).join("docs/operations.md")).unwrap();
    for section in ["## Install", "## Verify", "## Upgrade", "## Roll back", "## Remove"] {
        assert!(ops.contains(section), "docs/operations.md has no {section:?}");
    }
    assert!(ops.contains("decompress"), "removal must say that values are decompressed first");
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    assert!(readme.contains("docs/operations.md"));
    let names = etcd_squeeze::metrics::get().names();
    assert!(names.len() >= 20, "{names:?}");
    for name in names {
        assert!(ops.contains(&format!("`{name}`")), "docs/operations.md does not list the metric {name}");
    }
}
