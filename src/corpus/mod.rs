//! Deterministic generator of realistic FlyteWorkflow custom resources exactly as kube-apiserver
//! stores them in etcd (see `/work/shared/design/flyteworkflow-structure.md`).
//!
//! Each object is built from a seeded simulation: identity (project/domain, 20-char execution id,
//! uid, image sha tags, task names), a `spec`/`tasks` closure shaped like flytepropeller's compiler
//! output, and a `status` rendered at a point in time from simulated node lifecycles under
//! `maxParallelism` (pending `{}`, queued, running with a gob `pState`, succeeded collapsed to
//! `phase`/`stoppedAt`, failed with an `ExecutionError`). The same simulation rendered at successive
//! times yields the real write pattern: full-object rewrites with increasing `metadata.generation`.
//! Output is byte-identical for a given `(scenario, seed)`; nothing is read from disk at runtime.

mod apiserver_json;
mod flyte;
mod scenario;

pub use apiserver_json::to_apiserver_json;
pub use scenario::{Scenario, Topology};

use std::path::{Path, PathBuf};

/// One generated object: a file-name-safe name (e.g. `"dynamic-n2000-p100-running-30pct"`) and its
/// bytes exactly as kube-apiserver stores them in etcd (sorted keys, compact, Go HTML escaping,
/// trailing `\n`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// File-name-safe scenario name, unique within [`standard_set`] / [`small_set`]; series
    /// versions get a `.vNN` suffix.
    pub name: String,
    /// The stored value (JSON bytes with trailing newline).
    pub json: Vec<u8>,
}

/// Generates one object for `scenario` at its progress point. Deterministic in `(scenario, seed)`:
/// the same inputs give byte-identical output on every run and platform.
pub fn generate(scenario: &Scenario, seed: u64) -> Generated {
    let plan = flyte::plan(scenario, seed);
    Generated { name: scenario.name(), json: to_apiserver_json(&plan.render(plan.time_at(scenario.done_pct))) }
}

/// `versions` successive versions of one workflow — each a full-object rewrite as propeller does
/// (no status subresource) — from just after creation to completion, spread evenly over the
/// simulated state changes (ignores `done_pct`). `metadata.generation` and `resourceVersion`
/// strictly increase, `uid`/name stay fixed, timestamps advance; a dynamic fan-out goes from all
/// children pending to the whole subtree collapsed into one succeeded node. Names are
/// `series-<scenario name without progress>.v01`, `.v02`, ...; fewer versions are returned if the run has fewer changes.
pub fn update_series(scenario: &Scenario, versions: usize, seed: u64) -> Vec<Generated> {
    let plan = flyte::plan(scenario, seed);
    let state = if scenario.done_pct >= 100 { "-done".to_string() } else { format!("-running-{}pct", scenario.done_pct) };
    let base = format!("series-{}", scenario.name().replacen(&state, "", 1));
    plan.series_times(versions.max(1))
        .into_iter()
        .enumerate()
        .map(|(i, t)| Generated { name: format!("{base}.v{:02}", i + 1), json: to_apiserver_json(&plan.render(t)) })
        .collect()
}

/// `versions` consecutive writes of one workflow starting at the scenario's progress point: each the
/// next propeller round that changed something (typically a few nodes starting or finishing, one
/// second apart under load) — the byte-level delta pattern between successive values of one key.
/// Names are `<scenario name>.r01`, `.r02`, ...; fewer if the workflow completes first.
pub fn consecutive_writes(scenario: &Scenario, versions: usize, seed: u64) -> Vec<Generated> {
    let plan = flyte::plan(scenario, seed);
    let base = scenario.name();
    plan.rounds_from(plan.time_at(scenario.done_pct), versions)
        .into_iter()
        .enumerate()
        .map(|(i, t)| Generated { name: format!("{base}.r{:02}", i + 1), json: to_apiserver_json(&plan.render(t)) })
        .collect()
}

/// The etcd key kube-apiserver uses for a FlyteWorkflow:
/// `/registry/flyte.lyft.com/flyteworkflows/<metadata.namespace>/<metadata.name>`; `None` if the
/// bytes are not JSON with both fields.
pub fn etcd_key(json: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(json).ok()?;
    let md = v.get("metadata")?;
    Some(format!("/registry/flyte.lyft.com/flyteworkflows/{}/{}", md.get("namespace")?.as_str()?, md.get("name")?.as_str()?))
}

fn scenarios(large: bool) -> Vec<Scenario> {
    use Topology::*;
    let mut v = vec![
        Scenario::new(Created { tasks: 3 }, 25, 0),
        Scenario::new(Failed { tasks: 2 }, 25, 100),
        Scenario::new(StaticFanout { nodes: 20 }, 25, 40),
        Scenario::new(Dynamic { children: 100 }, 25, 30),
        Scenario::new(NestedSubworkflow { depth: 2, children: 1000 }, 50, 40),
        Scenario::new(Dynamic { children: 1000 }, 100, 20).inputs_offloaded(),
        Scenario::new(StaticFanout { nodes: 100 }, 100, 25),
        Scenario::new(ArrayNode { items: 2000 }, 200, 60),
        Scenario::new(Dynamic { children: 2000 }, 100, 45).closure_offloaded(),
        Scenario::new(Dynamic { children: 10000 }, 100, 10),
    ];
    if large {
        v.extend([
            Scenario::new(ArrayNode { items: 20000 }, 500, 50).failing(2),
            Scenario::new(StaticFanout { nodes: 300 }, 100, 100),
            Scenario::new(StaticFanout { nodes: 1000 }, 200, 50),
            Scenario::new(Dynamic { children: 50000 }, 500, 35).failing(2).debug(),
            Scenario::new(Dynamic { children: 50000 }, 2500, 85),
        ]);
    }
    v
}

fn set(large: bool, seed: u64) -> Vec<Generated> {
    scenarios(large).iter().enumerate().map(|(i, s)| generate(s, seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))).collect()
}

/// The standard demo/test set: 15 objects from ~7 KB to ~3.9 MB covering every scenario kind —
/// created, failed, static fan-out (running and done), dynamic fan-out (100 to 50,000 children,
/// incl. offloaded inputs, offloaded closure, debug metadata with failures), nested
/// sub-workflows, ArrayNodes; one of ~1.75 MB (over etcd's 1.5 MiB limit, compresses ~11x to ~150 KB)
/// and one of ~3.9 MB. Generates in ~0.25 s (release).
pub fn standard_set(seed: u64) -> Vec<Generated> {
    set(true, seed)
}

/// The first 10 objects of [`standard_set`] (each ≤ ~300 KB), for fast tests.
pub fn small_set(seed: u64) -> Vec<Generated> {
    set(false, seed)
}

/// `n` small objects (≈3–40 KB) of varied shapes — just created, failed, small static and dynamic
/// fan-outs at every progress point — each of its own seed: the stream of workflows a cluster
/// writes, for training dictionaries (the demo, the dictionary tests and benchmark).
pub fn training_set(n: u64, seed: u64) -> Vec<Generated> {
    (0..n)
        .map(|i| {
            let k = i as usize;
            let s = match i % 4 {
                0 => Scenario::new(Topology::Created { tasks: 2 + k % 6 }, 25, 0),
                1 => Scenario::new(Topology::Failed { tasks: 2 + k % 3 }, 25, 100),
                2 => Scenario::new(Topology::StaticFanout { nodes: 3 + k % 12 }, 25, (i % 101) as u8),
                _ => Scenario::new(Topology::Dynamic { children: 5 + k % 20 }, 25, (i % 101) as u8),
            };
            generate(&s, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i)
        })
        .collect()
}

/// The update series written by [`write_dir`]: [`Scenario::demo_series`] (a dynamic fan-out of 2,000
/// children at parallelism 100), 12 versions from just created to all succeeded.
pub fn standard_series(seed: u64) -> Vec<Generated> {
    update_series(&Scenario::demo_series(), 12, seed ^ 0x5EED)
}

/// Writes [`standard_set`] and [`standard_series`] into `dir` (created if missing) as
/// `<name>.json`; returns the written paths. Used by `etcd-squeeze corpus generate --out DIR --seed N`.
pub fn write_dir(dir: &Path, seed: u64) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    standard_set(seed)
        .into_iter()
        .chain(standard_series(seed))
        .map(|g| {
            let p = dir.join(format!("{}.json", g.name));
            std::fs::write(&p, &g.json)?;
            Ok(p)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::collections::BTreeSet;

    fn parse(g: &Generated) -> Value {
        serde_json::from_slice(&g.json).unwrap()
    }
    fn keys(v: &Value) -> BTreeSet<String> {
        v.as_object().unwrap().keys().cloned().collect()
    }
    fn set_of(xs: &[&str]) -> BTreeSet<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }
    fn dyn_kids(v: &Value) -> &serde_json::Map<String, Value> {
        v["status"]["nodeStatus"]["n2"]["subNodeStatus"]["dynamic-node"]["subNodeStatus"].as_object().unwrap()
    }

    #[test]
    fn deterministic_per_seed() {
        let sc = Scenario::new(Topology::Dynamic { children: 300 }, 50, 30).failing(20);
        assert_eq!(generate(&sc, 7), generate(&sc, 7));
        assert_ne!(generate(&sc, 7).json, generate(&sc, 8).json);
        assert_eq!(small_set(3), small_set(3));
    }

    #[test]
    fn reserializes_identically_and_escapes() {
        for g in small_set(11).iter().chain(&update_series(&Scenario::new(Topology::ArrayNode { items: 500 }, 50, 0), 4, 5)) {
            assert_eq!(to_apiserver_json(&parse(g)), g.json, "{}", g.name);
            assert!(g.json.ends_with(b"}\n"), "{}", g.name);
            assert!(!g.json[..g.json.len() - 1].iter().any(|b| matches!(b, b'<' | b'>' | b'&' | b'\n')), "{}", g.name);
            assert!(etcd_key(&g.json).unwrap().starts_with("/registry/flyte.lyft.com/flyteworkflows/"));
        }
    }

    #[test]
    fn go_encoder_format() {
        let v = json!({"b": "<a&b>\u{2028}\u{2029}\"\\\n\t\u{1}\u{8}\u{c}\u{7f}é", "a": [1, -2, 1.5, 1e21, 1e-7, null, true], "A": {}});
        let want = "{\"A\":{},\"a\":[1,-2,1.5,1e+21,1e-7,null,true],\"b\":\"\\u003ca\\u0026b\\u003e\\u2028\\u2029\\\"\\\\\\n\\t\\u0001\\b\\f\u{7f}é\"}\n";
        assert_eq!(String::from_utf8(to_apiserver_json(&v)).unwrap(), want);
    }

    #[test]
    fn shapes_match_reference() {
        let g = generate(&Scenario::new(Topology::Dynamic { children: 400 }, 100, 30), 42);
        let v = parse(&g);
        let mut top = keys(&v);
        top.remove("consoleUrl");
        assert_eq!(top, set_of(&["acceptedAt", "apiVersion", "executionConfig", "executionId", "inputs", "kind", "metadata", "node-defaults", "rawOutputDataConfig", "securityContext", "spec", "status", "tasks", "workflowMeta"]));
        let kids = dyn_kids(&v);
        assert_eq!(kids.len(), 402);
        let full = set_of(&["TaskNodeStatus", "laStartedAt", "lastUpdatedAt", "message", "phase", "queuedAt", "startedAt"]);
        let tfull = set_of(&["pState", "phase", "phaseVersion", "psv", "updAt"]);
        let running: Vec<&Value> = kids.values().filter(|k| k.get("phase") == Some(&json!(2))).collect();
        assert!(running.len() > 50);
        assert!(running.iter().any(|k| keys(k) == full && keys(&k["TaskNodeStatus"]) == tfull));
        let first = running[0]["TaskNodeStatus"]["pState"].as_str().unwrap();
        for k in &running {
            let (ks, ts) = (keys(k), keys(&k["TaskNodeStatus"]));
            assert!(ks.iter().all(|x| full.contains(x) || x == "attempts" || x == "systemFailures"), "{ks:?}");
            assert!(ts.iter().all(|x| tfull.contains(x) || x == "checkpointPath"), "{ts:?}");
            let p = k["TaskNodeStatus"]["pState"].as_str().unwrap();
            assert_eq!(p[..200], first[..200]);
            assert!((230..=280).contains(&p.len()), "{p}");
        }
        assert!(kids.values().any(|k| k == &json!({})));
        assert!(kids.values().any(|k| keys(k) == set_of(&["phase", "stoppedAt"]) && k["phase"] == 5));
        assert_eq!(v["metadata"]["labels"]["execution-id"], v["metadata"]["name"]);
        let id = v["metadata"]["name"].as_str().unwrap();
        assert!(id.len() == 20 && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
    }

    #[test]
    fn variants_and_special_shapes() {
        let c = parse(&generate(&Scenario::new(Topology::Dynamic { children: 50 }, 10, 50).closure_offloaded().inputs_offloaded(), 1));
        assert!(c["spec"].is_null() && c["tasks"].is_null() && c.get("subWorkflows").is_none() && c.get("inputs").is_none());
        assert!(c["workflowClosureReference"].as_str().unwrap().starts_with("s3://") && c["offloadedInputs"].is_string());
        let a = parse(&generate(&Scenario::new(Topology::ArrayNode { items: 3000 }, 300, 40), 2));
        let st = &a["status"]["nodeStatus"]["n0"]["arrayNodeStatus"];
        assert_eq!(st["subphase"]["count"], 3000);
        assert_eq!(st["subphase"]["item"], 4);
        assert_eq!(st["subtimestamps"]["item"], 18);
        assert!(st["subphase"]["BitSet"].as_array().unwrap().len() >= 94);
        let n = parse(&generate(&Scenario::new(Topology::NestedSubworkflow { depth: 3, children: 100 }, 20, 50), 3));
        assert_eq!(n["subWorkflows"].as_object().unwrap().len(), 3);
        let deep = &n["status"]["nodeStatus"]["n0"]["subNodeStatus"]["n0"]["subNodeStatus"]["n0"]["subNodeStatus"]["n0"]["subNodeStatus"]["dynamic-node"]["subNodeStatus"];
        assert_eq!(deep.as_object().unwrap().len(), 102);
        let f = parse(&generate(&Scenario::new(Topology::Failed { tasks: 2 }, 25, 100), 4));
        assert_eq!(f["status"]["phase"], 5);
        assert!(f["status"]["error"]["message"].is_string() && f["metadata"].get("finalizers").is_none());
        let cr = parse(&generate(&Scenario::new(Topology::Created { tasks: 3 }, 25, 0), 5));
        assert_eq!(cr["status"], json!({"phase": 0}));
        assert_eq!(cr["metadata"]["generation"], 1);
        let d = parse(&generate(&Scenario::new(Topology::Dynamic { children: 200 }, 50, 60).failing(30).debug(), 6));
        assert!(dyn_kids(&d).values().any(|k| k["phase"] == 6 && k.get("TaskNodeStatus").is_some() && k["error"]["errorUri"].as_str().unwrap().ends_with("error.pb")));
    }

    #[test]
    fn update_series_progresses() {
        let s = update_series(&Scenario::new(Topology::Dynamic { children: 500 }, 50, 0), 10, 9);
        assert_eq!(s.len(), 10);
        let vs: Vec<Value> = s.iter().map(parse).collect();
        for w in vs.windows(2) {
            let g = |v: &Value| v["metadata"]["generation"].as_i64().unwrap();
            let rv = |v: &Value| v["metadata"]["resourceVersion"].as_str().unwrap().parse::<i64>().unwrap();
            assert!(g(&w[1]) > g(&w[0]) && rv(&w[1]) > rv(&w[0]));
            assert!(w[1]["status"]["lastUpdatedAt"].as_str() >= w[0]["status"]["lastUpdatedAt"].as_str());
            assert_eq!(w[0]["metadata"]["uid"], w[1]["metadata"]["uid"]);
        }
        let last = vs.last().unwrap();
        assert_eq!(last["status"]["phase"], 3);
        assert_eq!(last["status"]["nodeStatus"]["n2"]["phase"], 5);
        assert_eq!(last["metadata"]["labels"]["termination-status"], "terminated");
        assert!(s.last().unwrap().json.len() < s[s.len() / 2].json.len());
    }

    #[test]
    fn consecutive_writes_differ_a_little() {
        let s = consecutive_writes(&Scenario::new(Topology::Dynamic { children: 2000 }, 100, 40), 20, 4);
        assert_eq!(s.len(), 20);
        let gens: Vec<i64> = s.iter().map(|g| parse(g)["metadata"]["generation"].as_i64().unwrap()).collect();
        assert!(gens.windows(2).all(|w| w[1] == w[0] + 1), "{gens:?}");
        for w in s.windows(2) {
            let (a, b) = (&w[0].json, &w[1].json);
            let same = a.iter().zip(b.iter()).take_while(|(x, y)| x == y).count();
            assert!(same > 300 && a != b && a.len().abs_diff(b.len()) < 5000, "{same} {} {}", a.len(), b.len());
        }
    }

    #[test]
    fn sizes_and_compressibility() {
        let small = small_set(1);
        let mut all = small.clone();
        all.extend(standard_set(1).into_iter().skip(small.len()));
        assert_eq!(all.len(), 15);
        let names: BTreeSet<&str> = all.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names.len(), all.len());
        assert!(small.iter().all(|g| g.json.len() <= 310_000));
        let max = all.iter().map(|g| g.json.len()).max().unwrap();
        assert!((3_500_000..=4_600_000).contains(&max), "{max}");
        assert!(all.iter().any(|g| g.json.len() < 10_000));
        for g in &all {
            let z = zstd::bulk::compress(&g.json, 3).unwrap().len();
            let ratio = g.json.len() as f64 / z as f64;
            let (lo, hi) = match g.json.len() {
                _ if g.name.starts_with("array") => (2.0, 5.0),
                0..=20_000 => (2.3, 5.0),
                20_001..=200_000 => (5.0, 16.0),
                _ if g.name.starts_with("static") => (7.0, 24.0),
                _ => (7.0, 16.0),
            };
            assert!(ratio >= lo && ratio <= hi, "{} {} bytes ratio {ratio:.2}", g.name, g.json.len());
            if g.json.len() >= 1_600_000 {
                assert!(z < 1_500_000, "{}", g.name);
            }
        }
    }
}
