//! The alerts docs/operations.md recommends, shipped as Prometheus rules: `promtool check rules`
//! accepts them, `promtool test rules` shows each firing on series that should fire it and quiet on
//! series that should not, the PrometheusRule manifest holds the same groups, and every metric an
//! alert reads is one the proxy exports.

use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn yaml_docs(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text).map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{path}: {e}"))).collect()
}

#[test]
fn alert_rules_pass_promtool_and_match_the_prometheusrule() {
    let dir = Path::new(ROOT).join("deploy/prometheus");
    let promtool = |args: &[&str]| Command::new("promtool").args(args).current_dir(&dir).output();
    let Ok(check) = promtool(&["check", "rules", "etcd-squeeze-rules.yaml"]) else {
        crate::harness::skip_unless_ci("alert_rules_pass_promtool_and_match_the_prometheusrule", "no `promtool` (Debian package `prometheus`)");
        return;
    };
    assert!(check.status.success(), "{}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
    let test = promtool(&["test", "rules", "etcd-squeeze-rules.test.yaml"]).unwrap();
    assert!(test.status.success(), "{}{}", String::from_utf8_lossy(&test.stdout), String::from_utf8_lossy(&test.stderr));

    let rules = &yaml_docs("deploy/prometheus/etcd-squeeze-rules.yaml")[0];
    let manifest = &yaml_docs("deploy/kubernetes/prometheusrule.yaml")[0];
    assert_eq!(manifest["kind"], "PrometheusRule");
    assert_eq!(manifest["spec"]["groups"], rules["groups"], "deploy/kubernetes/prometheusrule.yaml and deploy/prometheus/etcd-squeeze-rules.yaml differ");

    // Every alert is tested, and every metric an alert reads is in the proxy's metrics reference.
    let tests = std::fs::read_to_string(dir.join("etcd-squeeze-rules.test.yaml")).unwrap();
    let reference = std::fs::read_to_string(Path::new(ROOT).join("docs/operations.md")).unwrap();
    for rule in rules["groups"][0]["rules"].as_array().unwrap() {
        let name = rule["alert"].as_str().unwrap();
        assert!(tests.contains(&format!("alertname: {name}")), "{name} has no promtool test");
        let expr = rule["expr"].as_str().unwrap();
        for metric in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("etcd_squeeze_")) {
            assert!(reference.contains(&format!("`{metric}`")), "{name} reads {metric}, which docs/operations.md does not list");
        }
    }
}
