//! FlyteWorkflow model: per-object identity, `spec`/`tasks` templates (shaped like the flytepropeller
//! compiler goldens), a slot scheduler that simulates execution under `maxParallelism`, and status
//! rendering at any point in time following flytepropeller v1alpha1 (`NodeStatus`, collapse rules).

use super::scenario::{Scenario, Topology};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::OnceLock;

const NEVER: i64 = i64::MAX / 4;

/// splitmix64: per-node derived randomness that does not depend on rendering order.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// metav1.Time (`RFC3339`, second precision) for unix seconds; with `ns > 0` Go's RFC3339Nano
/// (fraction with trailing zeros trimmed).
pub(crate) fn rfc3339(t: i64, ns: u32) -> String {
    let (days, s) = (t.div_euclid(86400), t.rem_euclid(86400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let mut out = format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60);
    if ns > 0 {
        out.push('.');
        out.push_str(format!("{ns:09}").trim_end_matches('0'));
    }
    out.push('Z');
    out
}

fn ts(t: i64) -> Value {
    Value::String(rfc3339(t, 0))
}

// ---------------------------------------------------------------- gob pState, base64, bit arrays

/// Type descriptors gob emits first on every fresh encoder for propeller's k8s `PluginState`
/// (PluginState{Phase; K8sPluginState{Phase,PhaseVersion,Reason}; LastEventUpdate time.Time}).
const GOB_HEADER: &str = "4cff810301010b506c7567696e537461746501ff8200010301055068617365010600010e4b3873506c7567696e537461746501ff8400010f4c6173744576656e7455706461746501ff860000003fff830301010b506c7567696e537461746501ff8400010301055068617365010400010c506861736556657273696f6e0106000106526561736f6e010c00000010ff850501010454696d6501ff86000000";

fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for k in 0..4 {
            s.push(if k <= c.len() { A[(n >> (18 - 6 * k)) as usize & 63] as char } else { '=' });
        }
    }
    s
}

/// base64(gob) `pState` as propeller's k8s plugin writes it: fixed type descriptors (~208 identical
/// base64 chars) + a value message whose phase/reason/timestamp bytes differ per node.
fn p_state(plugin: u8, k8s: u8, pv: u8, reason: &str, t: i64, ns: u32) -> String {
    static HDR: OnceLock<Vec<u8>> = OnceLock::new();
    let hdr = HDR.get_or_init(|| (0..GOB_HEADER.len()).step_by(2).map(|i| u8::from_str_radix(&GOB_HEADER[i..i + 2], 16).unwrap()).collect());
    let mut body = vec![0xff, 0x82, 0x01, plugin, 0x01, 0x01, k8s << 1];
    if pv > 0 {
        body.extend([0x01, pv]);
    }
    if !reason.is_empty() {
        body.extend([if pv > 0 { 1 } else { 2 }, reason.len() as u8]);
        body.extend(reason.as_bytes());
    }
    body.extend([0x00, 0x01, 0x0f, 0x01]);
    body.extend(((t + 62_135_596_800) as u64).to_be_bytes());
    body.extend(ns.to_be_bytes());
    body.extend([0xff, 0xff, 0x00]);
    let mut all = hdr.clone();
    all.push(body.len() as u8);
    all.extend(body);
    b64(&all)
}

/// flytestdlib `bitarray.CompactArray`, including its quirks: the BitSet starts with ceil(count/32)
/// words (sized by item count, not bits), `Set` past the end appends `i/32+1` words, and each item's
/// least-significant bit is stored at its highest bit index.
struct CompactArray {
    bits: Vec<u32>,
    item: usize,
    count: usize,
}

impl CompactArray {
    fn new(count: usize, max: u64) -> Self {
        CompactArray { bits: vec![0; count.div_ceil(32)], item: (64 - max.leading_zeros()) as usize, count }
    }
    fn set(&mut self, idx: usize, v: u64) {
        let mut x = 1u64;
        for i in (0..self.item).rev() {
            let b = idx * self.item + i;
            if v & x != 0 {
                if self.bits.len() < b / 32 + 1 {
                    self.bits.resize(self.bits.len() + b / 32 + 1, 0);
                }
                self.bits[b / 32] |= 1 << (b % 32);
            } else if self.bits.len() > b / 32 {
                self.bits[b / 32] &= !(1 << (b % 32));
            }
            x <<= 1;
        }
    }
    fn json(&self) -> Value {
        json!({"BitSet": self.bits, "count": self.count, "item": self.item})
    }
}

// ---------------------------------------------------------------- identity

/// A uniformly chosen element.
fn pick<'a>(r: &mut ChaCha8Rng, xs: &[&'a str]) -> &'a str {
    xs[r.random_range(0..xs.len())]
}
/// `n` random lowercase hex digits.
fn hex(r: &mut ChaCha8Rng, n: usize) -> String {
    (0..n).map(|_| char::from_digit(r.random_range(0..16), 16).unwrap()).collect()
}

const WORDS: &[&str] = &["partition", "batch", "features", "table", "shard", "metrics", "rows", "raw", "embeddings", "labels", "events", "sessions", "users", "snapshot", "cohort"];
const VERBS: &[&str] = &["load", "score", "merge", "export", "train", "compute", "validate", "featurize", "aggregate", "split", "fetch", "clean", "encode", "rank", "join"];

/// Everything that identifies one execution and its registered workflow version.
struct Ident {
    project: String,
    domain: String,
    exec: String,
    uid: String,
    bucket: String,
    module: String,
    wf_id: String,
    version: String,
    image: String,
    fast: Option<String>,
    ss_c: String,
    flytekit: String,
    py: u32,
    test_cfg: bool,
    new_errors: bool,
    t_create: i64,
    rv_base: i64,
    rv_rate: i64,
    data_dir: String,
    top: Map<String, Value>,
    labels: Map<String, Value>,
    annotations: Option<Value>,
}

impl Ident {
    fn new(r: &mut ChaCha8Rng, sc: &Scenario) -> Self {
        let project = pick(r, &["flytesnacks", "ml-platform", "search-relevance", "ads-ranking", "pricing", "vision", "data-eng", "fraud-detection", "recsys"]).to_string();
        let domain = pick(r, &["development", "staging", "production", "production"]).to_string();
        const AL: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let exec: String = (0..20).map(|i| AL[r.random_range(0..if i == 0 { 26 } else { 36 })] as char).collect();
        let uid = format!("{}-{}-4{}-{}{}-{}", hex(r, 8), hex(r, 4), hex(r, 3), pick(r, &["8", "9", "a", "b"]), hex(r, 3), hex(r, 12));
        let bucket = pick(r, &["my-s3-bucket", "flyte-prod-metadata", "ml-artifacts-prod", "flyte-userdata-7b21", "acme-flyte-data-us-east-1"]).to_string();
        let team = pick(r, &["fraud", "vision", "ads", "search", "risk", "platform", "growth", "acme"]);
        let area = pick(r, &["daily", "labeling", "ranking", "embeddings", "training", "scoring", "eval", "export"]);
        let module = format!("{team}.{area}.{}", pick(r, &["custom_objects", "map_task", "dynamics", "structured_dataset", "task_cache", "pipelines", "batch_jobs"]));
        let wf = format!("{module}.{}", pick(r, &["wf", "my_wf", "main_wf", "pipeline", "nightly_wf"]));
        let t_create = r.random_range(1_704_067_200..1_761_955_200);
        let version = match r.random_range(0..3) {
            0 => hex(r, 40),
            1 => format!("v{}.{}.{}", r.random_range(1..9), r.random_range(0..30), r.random_range(0..10)),
            _ => format!("{}-{}", rfc3339(t_create - r.random_range(0..2_592_000), 0)[..10].replace('-', ""), hex(r, 7)),
        };
        let py = r.random_range(9..13);
        let image = match r.random_range(0..3) {
            0 => format!("ghcr.io/{team}/{area}-runner:py3.{py}-{}", hex(r, 8)),
            1 => format!("registry.gitlab.com/{team}/ml/{area}:{}", hex(r, 12)),
            _ => format!("{}.dkr.ecr.us-east-1.amazonaws.com/flyte/{project}:{}", r.random_range(100_000_000_000u64..999_999_999_999), hex(r, 40)),
        };
        let fast = r.random_bool(0.5).then(|| format!("s3://{bucket}/{project}/{domain}/{}======/fast{}.tar.gz", hex(r, 26).to_uppercase(), hex(r, 32)));
        let ss_c = format!("H4sIAAAAAAAC/{}", b64(&(0..290).map(|_| r.random()).collect::<Vec<u8>>()));
        let ns = format!("{project}-{domain}");
        let data_dir = format!("s3://{bucket}/metadata/propeller/{ns}-{exec}");
        let mp = sc.max_parallelism as i64;
        let (cpu, mem) = *[("0", "0"), ("500m", "1Gi"), ("1", "2Gi")].get(r.random_range(0..3)).unwrap();
        let lim = |x: &str, f: &str| if x == "0" { "0".to_string() } else { f.to_string() };
        let mut top = Map::new();
        top.insert("acceptedAt".into(), ts(t_create - r.random_range(0..2)));
        top.insert("apiVersion".into(), json!("flyte.lyft.com/v1alpha1"));
        top.insert("executionConfig".into(), json!({"EnvironmentVariables": if r.random_bool(0.3) { json!({"LOG_LEVEL": "INFO"}) } else { Value::Null },
            "Interruptible": null, "MaxParallelism": mp, "OverwriteCache": false, "RecoveryExecution": {}, "TaskPluginImpls": null,
            "TaskResources": {"Limits": {"CPU": lim(cpu, "4"), "EphemeralStorage": "0", "GPU": "0", "Memory": lim(mem, "8Gi"), "Storage": "0"},
                "Requests": {"CPU": cpu, "EphemeralStorage": "0", "GPU": "0", "Memory": mem, "Storage": "0"}}}));
        top.insert("executionId".into(), json!({"domain": domain, "name": exec, "project": project}));
        top.insert("kind".into(), json!("FlyteWorkflow"));
        top.insert("node-defaults".into(), if r.random_bool(0.2) { json!({"interruptible": true}) } else { json!({}) });
        top.insert("rawOutputDataConfig".into(), json!({"rawOutputDataPrefix": format!("s3://{bucket}/data")}));
        top.insert("securityContext".into(), json!({"runAs": {"k8sServiceAccount": pick(r, &["default", "default", "flyte-worker"])}}));
        top.insert("workflowMeta".into(), json!({"eventVersion": 2}));
        if r.random_bool(0.4) {
            let host = pick(r, &["flyte.data-platform.internal", "flyte.risk.internal", "flyte.example.com"]);
            top.insert("consoleUrl".into(), json!(format!("https://{host}/console/projects/{project}/domains/{domain}/executions/{exec}")));
        }
        if sc.offloaded_inputs {
            top.insert("offloadedInputs".into(), json!(format!("s3://{bucket}/metadata/{project}/{domain}/{exec}/inputs")));
        }
        if sc.offloaded_closure {
            top.insert("workflowClosureReference".into(), json!(format!("s3://{bucket}/metadata/admin/{project}/{domain}/{wf}/{version}")));
        }
        let mut labels = Map::new();
        for (k, v) in [("domain", &domain), ("execution-id", &exec), ("project", &project)] {
            labels.insert(k.into(), json!(v));
        }
        labels.insert("shard-key".into(), json!(r.random_range(0..32).to_string()));
        let mut wl: String = wf.replace(['.', '_'], "-");
        wl.truncate(63);
        labels.insert("workflow-name".into(), json!(wl.trim_end_matches('-')));
        if r.random_bool(0.5) {
            let (k, v) = *[("team", team), ("trigger", "schedule"), ("trigger", "manual"), ("cost-center", "cc-1293")].get(r.random_range(0..4)).unwrap();
            labels.insert(k.into(), json!(v));
        }
        let annotations = r.random_bool(0.4).then(|| {
            json!({"cluster-autoscaler.kubernetes.io/safe-to-evict": "false", "iam.amazonaws.com/role": format!("arn:aws:iam::{}:role/flyte-{team}", r.random_range(100_000_000_000u64..999_999_999_999))})
        });
        Ident {
            wf_id: format!("{project}:{domain}:{wf}"),
            flytekit: format!("1.{}.{}", r.random_range(10..16), r.random_range(0..8)),
            test_cfg: r.random_bool(0.5),
            new_errors: r.random_bool(0.5),
            rv_base: r.random_range(100_000_000..1_900_000_000),
            rv_rate: r.random_range(40..400),
            project, domain, exec, uid, bucket, module, version, image, fast, ss_c, py, t_create, data_dir, top, labels, annotations,
        }
    }

    fn task_key(&self, short: &str) -> String {
        format!("resource_type:TASK project:\"{}\" domain:\"{}\" name:\"{}.{short}\" version:\"{}\" ", self.project, self.domain, self.module, self.version)
    }

    /// A flytekit task template (protobuf-JSON `TaskTemplate`), ~1.2–1.6 KB.
    fn task(&self, r: &mut ChaCha8Rng, short: &str, ins: &[(&str, Value)], out: Value, map: bool) -> Value {
        let mut args: Vec<String> = Vec::new();
        if let Some(d) = &self.fast {
            args.extend(["pyflyte-fast-execute", "--additional-distribution", d, "--dest-dir", ".", "--"].map(String::from));
        }
        args.push(if map { "pyflyte-map-execute" } else { "pyflyte-execute" }.into());
        for a in ["--inputs", "{{.input}}", "--output-prefix", "{{.outputPrefix}}", "--raw-output-data-prefix", "{{.rawOutputDataPrefix}}", "--checkpoint-path", "{{.checkpointOutputPrefix}}", "--prev-checkpoint", "{{.prevCheckpointPrefix}}", "--resolver"] {
            args.push(a.into());
        }
        if map {
            args.extend(["flytekit.core.array_node_map_task.ArrayNodeMapTaskResolver", "--", "vars", "", "resolver", "flytekit.core.python_auto_container.default_task_resolver"].map(String::from));
        } else {
            args.extend(["flytekit.core.python_auto_container.default_task_resolver".to_string(), "--".to_string()]);
        }
        args.extend(["task-module".to_string(), self.module.clone(), "task-name".to_string(), short.to_string()]);
        let mut c = json!({"args": args, "env": [{"key": "_F_SS_C", "value": self.ss_c}], "image": self.image, "resources": {}});
        if r.random_bool(0.4) {
            let (cpu, mem) = (r.random_range(1..9).to_string(), format!("{}Gi", r.random_range(1..33)));
            c["resources"] = json!({"limits": [{"name": "CPU", "value": cpu}, {"name": "MEMORY", "value": mem}], "requests": [{"name": "CPU", "value": cpu}, {"name": "MEMORY", "value": mem}]});
        }
        if self.test_cfg {
            c["config"] = json!([{"key": "testKey1", "value": "testValue1"}, {"key": "testKey2", "value": "testValue2"}, {"key": "testKey3", "value": "testValue3"}]);
        }
        let mut md = json!({"retries": {}, "runtime": {"flavor": "python", "type": "FLYTE_SDK", "version": self.flytekit}});
        if r.random_bool(0.4) {
            md["retries"] = json!({"retries": r.random_range(1..4)});
        }
        if r.random_bool(0.3) {
            md["discoverable"] = json!(true);
            md["discoveryVersion"] = json!(format!("{}.0", r.random_range(1..4)));
        }
        if r.random_bool(0.3) {
            md["timeout"] = json!(format!("{}s", 600 * r.random_range(1..13)));
        }
        let vars: Map<String, Value> = ins.iter().map(|(n, t)| (n.to_string(), json!({"type": t}))).collect();
        json!({"container": c, "id": {"domain": self.domain, "name": format!("{}.{short}", self.module), "project": self.project, "resourceType": "TASK", "version": self.version},
            "interface": {"inputs": {"variables": vars}, "outputs": {"variables": {"o0": {"type": out}}}}, "metadata": md, "type": "python-task"})
    }
}

/// A protobuf-JSON `LiteralType` for task interfaces.
fn lit_type(r: &mut ChaCha8Rng) -> Value {
    match r.random_range(0..8) {
        0 => json!({"simple": "STRING"}),
        1 => json!({"simple": "FLOAT"}),
        2 => json!({"collectionType": {"simple": "STRING"}}),
        3 => json!({"blob": {"format": "csv"}}),
        4 => json!({"structuredDatasetType": {"columns": [{"literalType": {"simple": "STRING"}, "name": "Name"}, {"literalType": {"simple": "INTEGER"}, "name": "Age"}], "format": "parquet"}}),
        5 => json!({"simple": "STRUCT"}),
        _ => json!({"simple": "INTEGER"}),
    }
}

fn promise(node: &str, var: &str) -> Value {
    json!({"promise": {"nodeId": node, "var": var}})
}

/// `spec` (WorkflowSpec) builder: nodes plus the graph stored three times (connections, edges).
struct SpecB {
    nodes: Map<String, Value>,
    edges: Vec<(String, String)>,
}

impl SpecB {
    fn new() -> Self {
        let mut nodes = Map::new();
        nodes.insert("start-node".into(), json!({"id": "start-node", "kind": "start", "resources": {}}));
        SpecB { nodes, edges: Vec::new() }
    }
    fn add(&mut self, v: Value, ups: &[&str]) {
        let id = v["id"].as_str().unwrap_or_default().to_string();
        self.edges.extend(ups.iter().map(|u| (u.to_string(), id.clone())));
        self.nodes.insert(id, v);
    }
    /// A task node `id` calling task `short` (template added to `tasks` once); binds `x` from the
    /// first upstream's output (or workflow input `a`), sometimes a literal `seed`.
    fn task(&mut self, short: &str, id: &str, ups: &[&str], r: &mut ChaCha8Rng, idn: &Ident, tasks: &mut Map<String, Value>) {
        let key = idn.task_key(short);
        let (xt, ot) = (lit_type(r), lit_type(r));
        let mut ins = vec![("x", xt)];
        let src = ups.first().copied().unwrap_or("start-node");
        let mut binds = vec![json!({"binding": promise(src, if src == "start-node" { "a" } else { "o0" }), "var": "x"})];
        if r.random_bool(0.4) {
            ins.push(("seed", json!({"simple": "INTEGER"})));
            binds.push(json!({"binding": {"scalar": {"primitive": {"integer": r.random_range(1..99_999).to_string()}}}, "var": "seed"}));
        }
        if !tasks.contains_key(&key) {
            tasks.insert(key.clone(), idn.task(r, short, &ins, ot, false));
        }
        let mut n = json!({"id": id, "inputBindings": binds, "kind": "task", "name": short, "resources": {}, "task": key});
        if r.random_bool(0.25) {
            n["retry"] = json!({"minAttempts": r.random_range(2..5)});
        }
        if r.random_bool(0.15) {
            n["interruptible"] = json!(true);
        }
        self.add(n, ups);
    }
    fn finish(mut self, id: &str, last: &[&str], fail_after: bool) -> Value {
        let binds: Vec<Value> = last.iter().enumerate().map(|(i, n)| json!({"binding": promise(n, "o0"), "var": format!("o{i}")})).collect();
        let outs: Map<String, Value> = (0..last.len()).map(|i| (format!("o{i}"), json!({"type": {"simple": "STRING"}}))).collect();
        self.add(json!({"id": "end-node", "inputBindings": binds, "kind": "end", "resources": {}}), last);
        let (mut down, mut up) = (BTreeMap::<String, Vec<String>>::new(), BTreeMap::<String, Vec<String>>::new());
        for (a, b) in &self.edges {
            down.entry(a.clone()).or_default().push(b.clone());
            up.entry(b.clone()).or_default().push(a.clone());
        }
        down.values_mut().chain(up.values_mut()).for_each(|v| v.sort());
        let mut s = json!({"connections": down, "edges": {"downstream": down, "upstream": up}, "id": id, "nodes": self.nodes, "outputBindings": binds, "outputs": {"variables": outs}});
        if fail_after {
            s["onFailurePolicy"] = json!("FAIL_AFTER_EXECUTABLE_NODES_COMPLETE");
        }
        s
    }
}

// ---------------------------------------------------------------- simulation

/// Lifecycle of one node execution (unix seconds). `la` = start of the last attempt.
#[derive(Clone, Copy, Default)]
struct Life {
    visit: i64,
    queued: i64,
    started: i64,
    la: i64,
    stopped: i64,
    attempts: u8,
    sysf: u8,
    cached: bool,
    failed: bool,
    h: u64,
}

/// Right-skewed (log-normal-like) task duration around `median`; plain IEEE arithmetic only, so
/// results are identical on every platform (no libm).
fn dur(r: &mut ChaCha8Rng, median: i64) -> i64 {
    let f = (0.3 + 1.4 * r.random::<f64>()) * (0.3 + 1.4 * r.random::<f64>()) * (0.4 + 1.2 * r.random::<f64>());
    ((median as f64) * f).max(4.0) as i64
}

/// A task node execution queued at `queued`: ~3% cache hits (done at once), ~7% retried (1–2
/// attempts, some counted as system failures), `fail_pm`/1000 fail permanently after 2 attempts.
fn life(r: &mut ChaCha8Rng, visit: i64, queued: i64, median: i64, fail_pm: u16) -> Life {
    let started = queued + r.random_range(1..3);
    let mut l = Life { visit, queued, started, la: started, h: r.random(), ..Default::default() };
    if r.random_bool(0.03) {
        l.cached = true;
        (l.started, l.la, l.stopped) = (queued + 1, queued + 1, queued + 1);
        return l;
    }
    l.failed = r.random_range(0..1000) < fail_pm;
    let x: f64 = r.random();
    if x < 0.07 || l.failed {
        l.attempts = if x < 0.02 || l.failed { 2 } else { 1 };
        l.la = started + dur(r, median) * i64::from(l.attempts) / 2 + 5;
        l.sysf = u8::from(r.random_bool(0.3));
    }
    l.stopped = l.la + dur(r, median);
    l
}

/// `n` siblings competing for `p` slots (propeller's maxParallelism): each starts when a slot frees.
fn sched(r: &mut ChaCha8Rng, n: usize, p: usize, t0: i64, median: i64, fail_pm: u16) -> Vec<Life> {
    let mut heap: BinaryHeap<Reverse<i64>> = (0..p.clamp(1, n.max(1))).map(|s| Reverse(t0 + s as i64 / 40)).collect();
    (0..n)
        .map(|_| {
            let Reverse(free) = heap.pop().unwrap_or(Reverse(t0));
            let q = free + r.random_range(0..2);
            let l = life(r, t0 - 1, q, median, fail_pm);
            heap.push(Reverse(l.stopped + r.random_range(1..3)));
            l
        })
        .collect()
}

/// What a node is, for status rendering (the node's own lifecycle is in [`Node::life`]).
enum Kind {
    Task,
    Dynamic { t_spec: i64, kids: Vec<Node> },
    SubWf { kids: Vec<Node>, end: Life },
    Array { items: Vec<Life> },
}

/// A node of the executed graph (top level, inside a sub-workflow, or a dynamic child).
struct Node {
    id: String,
    life: Life,
    kind: Kind,
}

impl Node {
    fn task(id: &str, life: Life) -> Node {
        Node { id: id.into(), life, kind: Kind::Task }
    }
    fn kids(&self) -> &[Node] {
        match &self.kind {
            Kind::Dynamic { kids, .. } | Kind::SubWf { kids, .. } => kids,
            _ => &[],
        }
    }
    fn lives<'a>(&'a self, out: &mut Vec<&'a Life>) {
        out.push(&self.life);
        self.kids().iter().for_each(|k| k.lives(out));
        if let Kind::Array { items } = &self.kind {
            out.extend(items.iter());
        }
    }
}

/// One execution: static parts plus simulated lifecycles; `render(t)` gives the object at time t.
pub(crate) struct Plan {
    idn: Ident,
    sc: Scenario,
    spec: Value,
    tasks: Value,
    subwfs: Option<Value>,
    inputs: Value,
    top: Vec<Node>,
    end: Life,
    t_start: i64,
    t_end: i64,
    fail_err: Option<Value>,
    main_stops: Vec<i64>,
    main_first: i64,
    events: Vec<i64>,
}

/// A task short name such as `merge_features`.
fn tname(r: &mut ChaCha8Rng) -> String {
    format!("{}_{}", pick(r, VERBS), pick(r, WORDS))
}

/// A control node's own lifecycle (no cache hit, no retries); the caller sets `stopped`.
fn ctl(r: &mut ChaCha8Rng, visit: i64, queued: i64) -> Life {
    let mut l = life(r, visit, queued, 30, 0);
    (l.cached, l.attempts, l.sysf, l.la) = (false, 0, 0, l.started);
    l
}

/// A dynamic parent (`@dynamic` task) whose children are scheduled after its spec is produced.
fn dyn_node(r: &mut ChaCha8Rng, id: &str, visit: i64, queued: i64, n: usize, sc: &Scenario) -> Node {
    let mut l = ctl(r, visit, queued);
    let t_spec = l.started + r.random_range(20..200);
    let median = r.random_range(90..900);
    let kids: Vec<Node> = sched(r, n, sc.max_parallelism, t_spec + 2, median, sc.failed_permille).into_iter().enumerate().map(|(i, k)| Node::task(&format!("dn{i}"), Life { visit: t_spec + 1, ..k })).collect();
    l.stopped = kids.iter().map(|k| k.life.stopped).max().unwrap_or(t_spec) + r.random_range(2..5);
    l.failed = kids.iter().any(|k| k.life.failed);
    Node { id: id.into(), life: l, kind: Kind::Dynamic { t_spec, kids } }
}

/// Sequential successor: visible once `prev` started, queued after it finished (never if it failed).
fn after(r: &mut ChaCha8Rng, prev: &Life, median: i64) -> Life {
    let q = if prev.failed { NEVER } else { prev.stopped + r.random_range(1..3) };
    let mut l = life(r, prev.started, q, median, 0);
    if prev.failed {
        (l.started, l.la, l.stopped) = (NEVER, NEVER, NEVER);
    }
    l
}

/// Sub-workflow `sub_k` (workflow node `n0` + side task `n1`); the innermost level runs the dynamic
/// fan-out. Returns the workflow node and the fan-out children's lifecycles.
#[allow(clippy::too_many_arguments)]
fn level(r: &mut ChaCha8Rng, idn: &Ident, tasks: &mut Map<String, Value>, subs: &mut Map<String, Value>, k: usize, d: usize, t: (i64, i64), sc: &Scenario, n: usize) -> (Node, Vec<Life>) {
    let mut sb = SpecB::new();
    let sub_id = |k: usize| format!("{}:{}:{}.sub_{k}", idn.project, idn.domain, idn.module);
    let mut l = ctl(r, t.0, t.1);
    let side = life(r, l.started + 1, l.started + 2, 90, 0);
    let (inner, main) = if k + 1 < d {
        sb.add(json!({"id": "n0", "kind": "workflow", "name": tname(r), "resources": {}, "workflow": {"subWorkflowRef": sub_id(k + 1)}}), &["start-node"]);
        level(r, idn, tasks, subs, k + 1, d, (l.started + 1, l.started + 2), sc, n)
    } else {
        sb.task(&format!("{}_dynamic", tname(r)), "n0", &["start-node"], r, idn, tasks);
        let dn = dyn_node(r, "n0", l.started + 1, l.started + 2, n, sc);
        let main = dn.kids().iter().map(|k| k.life).collect();
        (dn, main)
    };
    sb.task(&tname(r), "n1", &["start-node"], r, idn, tasks);
    subs.insert(sub_id(k), sb.finish(&sub_id(k), &["n0", "n1"], false));
    let fin = inner.life.stopped.max(side.stopped) + 1;
    let end = Life { visit: inner.life.started.max(side.started), queued: fin, started: fin, la: fin, stopped: fin, ..Default::default() };
    (l.stopped, l.failed) = (fin + 1, inner.life.failed);
    (Node { id: "n0".into(), life: l, kind: Kind::SubWf { kids: vec![inner, Node::task("n1", side)], end } }, main)
}

/// Builds identity, spec/tasks and the simulated execution for `sc`, deterministically from `seed`.
pub(crate) fn plan(sc: &Scenario, seed: u64) -> Plan {
    let r = &mut ChaCha8Rng::seed_from_u64(seed);
    let idn = Ident::new(r, sc);
    let t_start = idn.t_create + r.random_range(1..3);
    let t0 = t_start + r.random_range(1..3);
    let (mut tasks, mut sb, mut subwfs) = (Map::new(), SpecB::new(), None);
    let (top, last, main): (Vec<Node>, Vec<&str>, Vec<Life>) = match sc.topology {
        Topology::Created { tasks: k } | Topology::Failed { tasks: k } => {
            let mut nodes: Vec<Node> = Vec::new();
            for i in 0..k.max(1) {
                let (id, up) = (format!("n{i}"), if i == 0 { "start-node".into() } else { format!("n{}", i - 1) });
                sb.task(&tname(r), &id, &[&up], r, &idn, &mut tasks);
                let mut l = match nodes.last() { Some(p) => after(r, &p.life, 90), None => life(r, t_start, t0, 90, 0) };
                if i == 0 && matches!(sc.topology, Topology::Failed { .. }) {
                    (l.cached, l.failed, l.attempts, l.sysf) = (false, true, 2, 0);
                    (l.la, l.stopped) = (l.started + r.random_range(60..600), l.started + r.random_range(700..1500));
                }
                nodes.push(Node::task(&id, l));
            }
            (nodes, vec!["last"], Vec::new())
        }
        Topology::StaticFanout { nodes: n } => {
            let kinds: Vec<String> = (0..r.random_range(3..9)).map(|_| tname(r)).collect();
            let median = r.random_range(30..300);
            let lifes = sched(r, n, sc.max_parallelism, t0, median, sc.failed_permille);
            let mut nodes = Vec::new();
            for (i, l) in lifes.iter().enumerate() {
                sb.task(&kinds[i % kinds.len()], &format!("n{i}"), &["start-node"], r, &idn, &mut tasks);
                nodes.push(Node::task(&format!("n{i}"), *l));
            }
            let key = idn.task_key("collect_results");
            tasks.insert(key.clone(), idn.task(r, "collect_results", &[("xs", json!({"collectionType": {"simple": "STRING"}}))], json!({"simple": "STRING"}), false));
            let ups: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
            let binds: Vec<Value> = ups.iter().map(|u| promise(u, "o0")).collect();
            let agg = json!({"id": format!("n{n}"), "inputBindings": [{"binding": {"collection": {"bindings": binds}}, "var": "xs"}], "kind": "task", "name": "collect_results", "resources": {}, "task": key});
            sb.add(agg, &ups.iter().map(String::as_str).collect::<Vec<_>>());
            let slowest = lifes.iter().copied().max_by_key(|l| l.stopped).unwrap_or_default();
            let l = after(r, &Life { failed: lifes.iter().any(|l| l.failed), ..slowest }, 60);
            nodes.push(Node::task(&format!("n{n}"), Life { visit: t_start, ..l }));
            (nodes, vec!["last"], lifes)
        }
        Topology::Dynamic { children } => {
            for (i, up) in ["start-node", "n0", "n1", "n2"].into_iter().enumerate() {
                let short = if i == 2 { format!("{}_dynamic", tname(r)) } else { tname(r) };
                sb.task(&short, &format!("n{i}"), &[up], r, &idn, &mut tasks);
            }
            let n0 = life(r, t_start, t0, 60, 0);
            let n1 = after(r, &n0, 60);
            let n2 = dyn_node(r, "n2", n1.started, n1.stopped + 1, children, sc);
            let n3 = after(r, &n2.life, 60);
            let main = n2.kids().iter().map(|k| k.life).collect();
            (vec![Node::task("n0", n0), Node::task("n1", n1), n2, Node::task("n3", n3)], vec!["n3"], main)
        }
        Topology::NestedSubworkflow { depth, children } => {
            let mut subs = Map::new();
            let (n0, main) = level(r, &idn, &mut tasks, &mut subs, 0, depth.max(1), (t_start, t0), sc, children);
            sb.add(json!({"id": "n0", "kind": "workflow", "name": tname(r), "resources": {}, "workflow": {"subWorkflowRef": format!("{}:{}:{}.sub_0", idn.project, idn.domain, idn.module)}}), &["start-node"]);
            sb.task(&tname(r), "n1", &["n0"], r, &idn, &mut tasks);
            sb.task(&tname(r), "n2", &["start-node"], r, &idn, &mut tasks);
            let (n1, n2) = (after(r, &n0.life, 60), life(r, t_start, t0, 40, 0));
            subwfs = Some(Value::Object(subs));
            (vec![n0, Node::task("n1", n1), Node::task("n2", n2)], vec!["n1", "n2"], main)
        }
        Topology::ArrayNode { items } => {
            let short = format!("mapper_{}_0", tname(r));
            let key = idn.task_key(&short);
            tasks.insert(key.clone(), idn.task(r, &short, &[("x", json!({"collectionType": {"simple": "INTEGER"}}))], json!({"collectionType": {"simple": "STRING"}}), true));
            let sub = json!({"id": format!("n0-{}", hex(r, 6)), "inputBindings": [{"binding": promise("start-node", "a"), "var": "x"}], "kind": "task", "name": short,
                "resources": {"limits": {"memory": "500Mi"}, "requests": {"memory": "300Mi"}}, "retry": {"minAttempts": 2}, "task": key});
            sb.add(json!({"array": {"BoundInputs": null, "MinSuccessRatio": 1, "MinSuccesses": null, "Parallelism": null, "SubNodeSpec": sub}, "id": "n0",
                "inputBindings": [{"binding": promise("start-node", "a"), "var": "x"}], "kind": "array", "name": short, "resources": {}}), &["start-node"]);
            sb.task("coalesce", "n1", &["n0"], r, &idn, &mut tasks);
            let mut l = ctl(r, t_start, t0);
            let median = r.random_range(20..200);
            let its = sched(r, items, sc.max_parallelism, l.started + 1, median, sc.failed_permille);
            l.stopped = its.iter().map(|x| x.stopped).max().unwrap_or(l.started) + 2;
            l.failed = its.iter().any(|x| x.failed);
            let n1 = after(r, &l, 40);
            (vec![Node { id: "n0".into(), life: l, kind: Kind::Array { items: its.clone() } }, Node::task("n1", n1)], vec!["n1"], its)
        }
    };
    let last_id = top.last().map(|n| n.id.clone()).unwrap_or_default();
    let last: Vec<&str> = last.into_iter().map(|s| if s == "last" { last_id.as_str() } else { s }).collect();
    let spec = sb.finish(&idn.wf_id, &last, sc.failed_permille > 0);
    let finals = || top.iter().filter(|n| last.contains(&n.id.as_str()));
    let failed = top.iter().find(|n| n.life.failed);
    let (end, t_end) = if failed.is_some() {
        (Life { visit: NEVER, ..Default::default() }, top.iter().map(|n| n.life.stopped).filter(|&s| s < NEVER).max().unwrap_or(t0) + 1)
    } else {
        let e = finals().map(|n| n.life.stopped).max().unwrap_or(t0) + 1;
        (Life { visit: finals().map(|n| n.life.started).max().unwrap_or(t0), queued: e, started: e, la: e, stopped: e, ..Default::default() }, e + 1)
    };
    fn culprit(n: &Node) -> &Node {
        match &n.kind {
            Kind::Dynamic { kids, .. } | Kind::SubWf { kids, .. } => kids.iter().find(|k| k.life.failed).map_or(n, culprit),
            _ => n,
        }
    }
    let fail_err = failed.map(|f| (f, culprit(f))).map(|(f, c)| error(&idn, c.life.h, &c.id, &f.id, c.life.attempts, c.life.stopped));
    let mut all = Vec::new();
    top.iter().for_each(|n| n.lives(&mut all));
    let mut events: Vec<i64> = all.iter().flat_map(|l| [l.queued, l.started, l.la, l.stopped]).filter(|&t| t < t_end && t > 0).chain([t_end]).collect();
    events.sort_unstable();
    events.dedup();
    let mut main_stops: Vec<i64> = main.iter().map(|l| l.stopped).collect();
    main_stops.sort_unstable();
    let off = sc.offloaded_closure;
    Plan {
        spec: if off { Value::Null } else { spec },
        tasks: if off { Value::Null } else { Value::Object(tasks) },
        subwfs: if off { None } else { subwfs },
        inputs: json!({"literals": {"a": {"scalar": {"primitive": {"integer": r.random_range(1..5000).to_string()}}}}}),
        main_first: main.iter().map(|l| l.started).min().unwrap_or(t_start),
        sc: sc.clone(),
        idn,
        top,
        end,
        t_start,
        t_end,
        fail_err,
        main_stops,
        events,
    }
}

/// protobuf-JSON `core.ExecutionError` for a failed attempt (user traceback, OOM or eviction).
fn error(idn: &Ident, h: u64, id: &str, dir: &str, attempt: u8, t: i64) -> Value {
    let g = |k: u64| mix(h ^ k.wrapping_mul(0x51_7CC1_B727_220A));
    let w = |k: u64| WORDS[(g(k) % WORDS.len() as u64) as usize];
    let worker = format!("{}-{id}-{attempt}", idn.exec);
    let (code, kind, msg) = match h % 10 {
        0..=5 => {
            let exc = ["ValueError", "KeyError", "AssertionError", "RuntimeError", "FileNotFoundError", "IndexError", "TypeError"][(g(1) % 7) as usize];
            let detail = match g(2) % 5 {
                0 => format!("shard {} of 4096: expected {} rows, got {}", g(3) % 4096, 100_000 + g(4) % 900_000, 99_000 + g(4) % 900_000),
                1 => format!("missing column '{}_{}' in partition dt={}", w(5), w(6), &rfc3339(t, 0)[..10]),
                2 => format!("expected len(batch) > 0 && no null keys, got {} nulls in <{}>", g(7) % 5000, w(8)),
                3 => format!("metric auc=0.{:04} < threshold 0.{} for cohort {:08x}", g(9) % 10_000, 50 + g(10) % 49, g(11) as u32),
                _ => format!("s3://{}/data/{:02x}/{:016x}.parquet does not exist", idn.bucket, g(12) as u8, g(13)),
            };
            let m = format!("Traceback (most recent call last):\n\n      File \"/usr/local/lib/python3.{}/site-packages/flytekit/exceptions/scopes.py\", line 206, in user_entry_point\n        return wrapped(*args, **kwargs)\n      File \"/root/{}.py\", line {}, in {}_{}\n        raise {exc}(msg)\n\nMessage:\n\n    {exc}: {detail}\n\nUser error.",
                idn.py, idn.module.replace('.', "/"), 20 + g(14) % 900, VERBS[(g(15) % VERBS.len() as u64) as usize], w(16));
            (format!("USER:{exc}"), "USER", m)
        }
        6 | 7 => {
            let tail = if g(17) % 2 == 0 { ".".to_string() } else { format!("Memory cgroup out of memory: Killed process {} (python) total-vm:{}kB.", g(18) % 99_999, g(19) % 90_000_000) };
            ("OOMKilled".into(), "USER", format!("[primary] terminated with exit code (137). Reason [OOMKilled]. Message: \n{tail}"))
        }
        _ => ("Interrupted".into(), "SYSTEM", format!("The node was low on resource: ephemeral-storage. Container primary was using {}Ki, which exceeds its request of 0. Pod {worker} was evicted.", g(20) % 99_000_000)),
    };
    let mut e = json!({"code": code, "errorUri": format!("{}/{dir}/data/{attempt}/error.pb", idn.data_dir), "kind": kind, "message": msg});
    if idn.new_errors {
        e["timestamp"] = json!(rfc3339(t, (g(21) % 1_000_000_000) as u32));
        e["worker"] = json!(worker);
    }
    e
}

/// A JSON object from key/value pairs.
fn obj(kv: Vec<(&str, Value)>) -> Value {
    Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

impl Plan {
    /// Time at which `pct` % of the fan-out children (dynamic children, static nodes, array items)
    /// have finished; 100 means the whole workflow has completed.
    pub(crate) fn time_at(&self, pct: u8) -> i64 {
        let n = self.main_stops.len();
        let k = n * pct.min(100) as usize / 100;
        match self.sc.topology {
            Topology::Created { .. } => self.idn.t_create,
            Topology::Failed { .. } => self.t_end,
            _ if pct >= 100 || n == 0 => self.t_end,
            _ if k == 0 => self.main_first + 20,
            _ => self.main_stops[k - 1],
        }
    }

    /// `versions` distinct write times from just after creation to completion, evenly spread over
    /// the state-change rounds (so they follow progress, not wall-clock).
    pub(crate) fn series_times(&self, versions: usize) -> Vec<i64> {
        let (ev, n) = (&self.events, self.events.len());
        let mut out: Vec<i64> = (0..versions).map(|i| if versions == 1 { ev[n - 1] } else { ev[i * (n - 1) / (versions - 1)] }).collect();
        out.dedup();
        out
    }

    /// Up to `versions` consecutive write rounds starting at `t` (each the next time something changed).
    pub(crate) fn rounds_from(&self, t: i64, versions: usize) -> Vec<i64> {
        let i = self.events.partition_point(|&e| e < t);
        self.events[i.min(self.events.len() - 1)..].iter().copied().take(versions).collect()
    }

    /// `metadata.generation`: one write per propeller round that changed something (distinct
    /// event second), plus flyteadmin's create.
    fn generation(&self, t: i64) -> i64 {
        if matches!(self.sc.topology, Topology::Created { .. }) {
            return 1;
        }
        1 + self.events.partition_point(|&e| e <= t) as i64
    }

    /// A task node's `NodeStatus` at `t`: absent (not visited), `{}` (blocked), queued, running
    /// (TaskNodeStatus + pState), or collapsed when terminal (full when failed with debug metadata).
    fn leaf(&self, l: &Life, t: i64, id: &str, dir: &str) -> Option<Value> {
        if t < l.visit {
            return None;
        }
        if t < l.queued {
            return Some(json!({}));
        }
        if t < l.started {
            return Some(obj(vec![("lastUpdatedAt", ts(l.queued)), ("message", json!("node queued")), ("phase", json!(1)), ("queuedAt", ts(l.queued))]));
        }
        let h = l.h;
        if t < l.stopped {
            let (att, la) = if t >= l.la { (l.attempts, l.la) } else { (0, l.started) };
            let e1 = la + 1 + (h % 3) as i64;
            let e2 = e1 + 2 + ((h >> 8) % 9) as i64;
            let e3 = e2 + 5 + ((h >> 16) % 40) as i64;
            let (tp, plug, reason, pv, et, ei) = if t < e1 {
                (3, 1, "task submitted to K8s", 0, la, 0)
            } else if t < e2 {
                (4, 2, "ContainerCreating", 0, e1, 1)
            } else if t < e3 || (h >> 24) % 3 == 0 {
                (5, 2, "", 0, e2, 2)
            } else {
                (5, 2, "", 1 + ((h >> 26) % 2) as u8, e3, 3)
            };
            let ns = (mix(h ^ ei) % 1_000_000_000) as u32;
            let mut tn = vec![("pState", json!(p_state(plug, tp, pv, reason, et, ns))), ("phase", json!(tp)), ("psv", json!(1)), ("updAt", json!(rfc3339(et, ns)))];
            if pv > 0 {
                tn.push(("phaseVersion", json!(pv)));
            }
            if att > 0 {
                tn.push(("checkpointPath", json!(format!("s3://{}/{:02x}/{}-{id}-{att}/_flytecheckpoints", self.idn.bucket, (h >> 40) as u8, self.idn.exec))));
            }
            let mut m = vec![("TaskNodeStatus", obj(tn)), ("laStartedAt", ts(la)), ("lastUpdatedAt", ts(la)), ("phase", json!(2)), ("queuedAt", ts(l.queued)), ("startedAt", ts(l.started))];
            match (h >> 32) % 5 {
                0 | 1 => m.push(("message", json!("running"))),
                2 | 3 => m.push(("message", json!("task submitted to K8s"))),
                _ => {}
            }
            if att > 0 {
                m.push(("attempts", json!(att)));
                if l.sysf > 0 {
                    m.push(("systemFailures", json!(l.sysf)));
                }
            }
            return Some(obj(m));
        }
        let mut m = vec![("phase", json!(if l.failed { 6 } else { 5 })), ("stoppedAt", ts(l.stopped))];
        if l.attempts > 0 {
            m.push(("attempts", json!(l.attempts)));
        }
        if l.sysf > 0 {
            m.push(("systemFailures", json!(l.sysf)));
        }
        if l.cached {
            m.push(("cached", json!(true)));
        }
        if l.failed {
            let e = error(&self.idn, h, id, dir, l.attempts, l.stopped);
            if self.sc.debug_metadata {
                let ns = (mix(h ^ 9) % 1_000_000_000) as u32;
                let tn = obj(vec![("pState", json!(p_state(2, 8, 1, "Error", l.stopped, ns))), ("phase", json!(8)), ("phaseVersion", json!(1)), ("psv", json!(1)), ("updAt", json!(rfc3339(l.stopped, ns)))]);
                m.extend([("TaskNodeStatus", tn), ("laStartedAt", ts(l.la)), ("lastUpdatedAt", ts(l.stopped)), ("message", e["message"].clone()), ("queuedAt", ts(l.queued)), ("startedAt", ts(l.started))]);
            }
            m.push(("error", e));
        }
        Some(obj(m))
    }

    /// Any node's status at `t`, recursing into dynamic and sub-workflow children; `pre` is the
    /// parent's data-dir path (for `errorUri`).
    fn node(&self, n: &Node, t: i64, pre: &str) -> Option<Value> {
        let dir = if pre.is_empty() { n.id.clone() } else { format!("{pre}/{}", n.id) };
        let l = &n.life;
        let active = t >= l.started && t < l.stopped;
        match &n.kind {
            Kind::Dynamic { t_spec, kids } if active && t >= *t_spec => {
                let ns = (mix(l.h) % 1_000_000_000) as u32;
                let tn = obj(vec![("pState", json!(p_state(2, 6, 0, "", *t_spec, ns))), ("phase", json!(6)), ("psv", json!(1)), ("updAt", json!(rfc3339(*t_spec, ns)))]);
                let kp = format!("{dir}/data/0/dynamic-node/data/0");
                let mut sub: Map<String, Value> = kids.iter().filter_map(|k| Some((k.id.clone(), self.node(k, t, &kp)?))).collect();
                sub.insert("start-node".into(), obj(vec![("phase", json!(5)), ("stoppedAt", ts(t_spec + 1))]));
                sub.insert("end-node".into(), json!({}));
                let d = t_spec + 1;
                let dn = obj(vec![("laStartedAt", ts(d)), ("lastUpdatedAt", ts(d)), ("message", json!("node queued")), ("phase", json!(2)), ("queuedAt", ts(d)), ("startedAt", ts(d)), ("subNodeStatus", Value::Object(sub))]);
                Some(obj(vec![("TaskNodeStatus", tn), ("dynamicNodeStatus", json!({"phase": 1})), ("laStartedAt", ts(l.started)), ("lastUpdatedAt", ts(*t_spec)), ("message", json!("Executing dynamic subworkflow")), ("phase", json!(11)),
                    ("queuedAt", ts(l.queued)), ("startedAt", ts(l.started)), ("subNodeStatus", json!({"dynamic-node": dn}))]))
            }
            Kind::SubWf { kids, end } if active => {
                let kp = format!("{dir}/data/0");
                let mut sub: Map<String, Value> = kids.iter().filter_map(|k| Some((k.id.clone(), self.node(k, t, &kp)?))).collect();
                sub.insert("start-node".into(), obj(vec![("phase", json!(5)), ("stoppedAt", ts(l.started + 1))]));
                if let Some(e) = self.leaf(end, t, "end-node", &kp) {
                    sub.insert("end-node".into(), e);
                }
                Some(obj(vec![("laStartedAt", ts(l.started)), ("lastUpdatedAt", ts(l.started)), ("phase", json!(2)), ("queuedAt", ts(l.queued)), ("startedAt", ts(l.started)), ("subNodeStatus", Value::Object(sub)), ("workflowNodeStatus", json!({"phase": 1}))]))
            }
            Kind::Array { items } if t >= l.started => {
                let c = items.len();
                let max_att = 1 + (l.h % 3) * 2;
                let mut arr = [CompactArray::new(c, 12), CompactArray::new(c, 10), CompactArray::new(c, max_att), CompactArray::new(c, 3), CompactArray::new(c, 259_200)];
                let mut changes = 0;
                for (i, it) in items.iter().enumerate() {
                    let (p, tp) = if t < it.queued { (0, 0) } else if t < it.started { (1, 0) } else if t < it.stopped { (2, if t < it.started + 3 { 3 } else { 5 }) } else if it.failed { (6, 8) } else { (5, 6) };
                    let a = if t >= it.la { it.attempts } else { 0 };
                    let stamp = if t < it.started { 0 } else if t < it.stopped { it.la.min(t) - l.started } else { it.stopped - l.started };
                    changes += u64::from(p > 0) + u64::from(p > 2);
                    for (k, v) in [p, tp, u64::from(a).min(max_att), if p > 2 { u64::from(it.sysf) } else { 0 }, stamp.clamp(0, 259_200) as u64].into_iter().enumerate() {
                        arr[k].set(i, v);
                    }
                }
                let done = t >= l.stopped;
                let ph = if done { if l.failed { 2 } else { 3 } } else { 1 };
                let names = ["subphase", "subtphase", "subattempts", "subsysfailures", "subtimestamps"];
                let mut st: Map<String, Value> = names.iter().zip(arr.iter()).map(|(k, a)| (k.to_string(), a.json())).collect();
                st.insert("phase".into(), json!(ph));
                st.insert("taskPhaseVersion".into(), json!(changes));
                let mut m = if done { self.leaf(l, t, &n.id, &dir)?.as_object()?.clone() } else {
                    obj(vec![("laStartedAt", ts(l.started)), ("lastUpdatedAt", ts(t.min(l.stopped))), ("phase", json!(2)), ("queuedAt", ts(l.queued)), ("startedAt", ts(l.started))]).as_object()?.clone()
                };
                m.insert("arrayNodeStatus".into(), Value::Object(st));
                Some(Value::Object(m))
            }
            _ => self.leaf(l, t, &n.id, &dir),
        }
    }

    /// The full object at time `t`, as a JSON value (serialize with `to_apiserver_json`).
    pub(crate) fn render(&self, t: i64) -> Value {
        let idn = &self.idn;
        let created = matches!(self.sc.topology, Topology::Created { .. });
        let done = t >= self.t_end && !created;
        let mut top = idn.top.clone();
        let gen = self.generation(t);
        let mut labels = idn.labels.clone();
        let te = rfc3339(self.t_end, 0);
        if done {
            labels.insert("completed-time".into(), json!(format!("{}.{}", &te[..10], &te[11..13])));
            labels.insert("termination-status".into(), json!("terminated"));
        }
        let rv = (idn.rv_base + (t - idn.t_create) * idn.rv_rate + gen).to_string();
        let ns = format!("{}-{}", idn.project, idn.domain);
        let mut md = json!({"creationTimestamp": ts(idn.t_create), "generation": gen, "labels": labels, "name": idn.exec, "namespace": ns, "resourceVersion": rv, "uid": idn.uid});
        let md = md.as_object_mut().expect("object");
        if !done {
            md.insert("finalizers".into(), json!(["flyte.org/finalizer"]));
        }
        if let Some(a) = &idn.annotations {
            md.insert("annotations".into(), a.clone());
        }
        top.insert("spec".into(), self.spec.clone());
        top.insert("tasks".into(), self.tasks.clone());
        if let Some(s) = &self.subwfs {
            top.insert("subWorkflows".into(), s.clone());
        }
        if !self.sc.offloaded_inputs {
            top.insert("inputs".into(), self.inputs.clone());
        }
        let status = if created {
            json!({"phase": 0})
        } else {
            let mut ns: Map<String, Value> = self.top.iter().filter_map(|n| Some((n.id.clone(), self.node(n, t, "")?))).collect();
            ns.insert("start-node".into(), obj(vec![("phase", json!(5)), ("stoppedAt", ts(self.t_start))]));
            if let Some(e) = self.leaf(&self.end, t, "end-node", "end-node") {
                ns.insert("end-node".into(), e);
            }
            let mut s = vec![("dataDir", json!(idn.data_dir)), ("defVersion", json!(1)), ("lastUpdatedAt", ts(t.min(self.t_end))), ("nodeStatus", Value::Object(ns)), ("phase", json!(1)), ("startedAt", ts(self.t_start))];
            if done {
                s[4].1 = json!(if self.fail_err.is_some() { 5 } else { 3 });
                s.push(("stoppedAt", ts(self.t_end)));
                match &self.fail_err {
                    Some(e) => s.extend([("error", e.clone()), ("message", e["message"].clone())]),
                    None => s.push(("outputRef", json!(format!("{}/end-node/data/0/outputs.pb", idn.data_dir)))),
                }
            }
            obj(s)
        };
        if created {
            md.insert("managedFields".into(), json!([{"apiVersion": "flyte.lyft.com/v1alpha1", "fieldsType": "FieldsV1", "fieldsV1": managed(&top, md),
                "manager": "flyteadmin", "operation": "Update", "time": ts(idn.t_create)}]));
        }
        top.insert("metadata".into(), Value::Object(std::mem::take(md)));
        top.insert("status".into(), status);
        Value::Object(top)
    }
}

/// managedFields `fieldsV1` for flyteadmin's create: every non-empty map gets a "." entry, leaves and
/// lists are atomic `{}`; metadata lists only annotations/finalizers/labels.
fn managed(top: &Map<String, Value>, md: &Map<String, Value>) -> Value {
    fn f(m: &Map<String, Value>) -> Map<String, Value> {
        m.iter()
            .map(|(k, v)| {
                let inner = match v {
                    Value::Object(o) if !o.is_empty() => {
                        let mut x = f(o);
                        x.insert(".".into(), json!({}));
                        Value::Object(x)
                    }
                    _ => json!({}),
                };
                (format!("f:{k}"), inner)
            })
            .collect()
    }
    let mut root = f(&top.iter().filter(|(k, _)| *k != "apiVersion" && *k != "kind").map(|(k, v)| (k.clone(), v.clone())).collect());
    let mut m = Map::new();
    for k in ["annotations", "labels"] {
        if let Some(Value::Object(o)) = md.get(k) {
            let mut x = f(&o.iter().map(|(k, _)| (k.clone(), json!(null))).collect());
            x.insert(".".into(), json!({}));
            m.insert(format!("f:{k}"), Value::Object(x));
        }
    }
    m.insert("f:finalizers".into(), json!({".": {}, "v:\"flyte.org/finalizer\"": {}}));
    root.insert("f:metadata".into(), Value::Object(m));
    root.insert("f:status".into(), json!({".": {}, "f:phase": {}}));
    Value::Object(root)
}
