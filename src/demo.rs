//! The driver behind `scripts/demo`: writes FlyteWorkflow objects through the proxy exactly as
//! kube-apiserver does (create = Txn on mod_revision == 0; status update = GuaranteedUpdate, a
//! Txn on mod_revision == rev with a Range in the else branch), reads them back through the
//! proxy, checks they are byte-identical, and measures what etcd actually stores. Before that it
//! trains a shared dictionary from a population of other workflows, as `etcd-squeeze dict train`
//! does, and waits until the proxy compresses with it; the table compares what etcd stores with
//! what plain zstd (no dictionary) would store.

use std::path::Path;

use bytes::Bytes;
use tonic::transport::Channel;

use crate::codec::{frame, ValueCodec};
use crate::config::{Config, FLYTEWORKFLOW_PREFIX};
use crate::corpus::{self, Generated};
use crate::proto::etcdserverpb::kv_client::KvClient;
use crate::proto::etcdserverpb::maintenance_client::MaintenanceClient;
use crate::proto::etcdserverpb::{request_op, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, StatusRequest, TxnRequest};

/// One row of the savings table.
#[derive(Debug, Clone)]
pub struct Row {
    /// Object (or series) name.
    pub name: String,
    /// Versions written (1 for a single object).
    pub versions: usize,
    /// JSON bytes (summed over every version for a series).
    pub json_bytes: usize,
    /// Bytes etcd stores, read directly from etcd (summed over every version for a series).
    pub stored_bytes: usize,
    /// Bytes plain zstd (no dictionary) would store at the same level, frame included.
    pub plain_bytes: usize,
}

/// Training population written before the measured objects: this many small workflows.
pub const TRAINING_OBJECTS: u64 = 96;

/// Writes a population of other workflows through `proxy`, trains a dictionary for the
/// FlyteWorkflow prefix from what etcd stores (as `etcd-squeeze dict train` does) and waits until
/// the proxy compresses with it. Returns its ID and a one-line description.
pub async fn train_dictionary(proxy: &str, etcd: &str, population: &[Generated]) -> Result<(u32, String), DemoError> {
    let mut via = client(proxy).await?;
    for (i, obj) in population.iter().enumerate() {
        let key = Bytes::from(format!("{FLYTEWORKFLOW_PREFIX}demo-training/{i:03}"));
        via.put(PutRequest { key, value: Bytes::from(obj.json.clone()), ..Default::default() }).await?;
    }
    let mut config = Config::default();
    config.upstream.endpoints = vec![etcd.to_string()];
    let report = crate::ops::dict::train_report(&config, FLYTEWORKFLOW_PREFIX).await?;
    let written = population.len() as u64;
    let mut line = format!(
        "trained a dictionary from {} of the {written} workflows (the other {} held out to measure it): held-out values {} -> {} bytes ({} than plain zstd)",
        report.candidate_samples,
        written.saturating_sub(report.candidate_samples),
        report.heldout.0,
        report.heldout.1,
        crate::ops::dict::gain_words(report.gain())
    );
    if report.published.is_none() {
        line.push_str("; the dictionary already in etcd is as good, kept");
    }
    // The proxy learns of it through its watch on the dictionary store: probe until it uses it.
    let mut direct = client(etcd).await?;
    let probe = Bytes::from(format!("{FLYTEWORKFLOW_PREFIX}demo-training/probe"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut first = true;
    loop {
        if !first {
            // Deleted and written again: a create, whose new base uses the dictionary the
            // proxy has now (an update of the key would keep its first base, made without it).
            via.delete_range(DeleteRangeRequest { key: probe.clone(), ..Default::default() }).await?;
        }
        first = false;
        via.put(PutRequest { key: probe.clone(), value: Bytes::from(population[0].json.clone()), ..Default::default() }).await?;
        let (stored, _) = read(&mut direct, &probe).await?;
        let mut id = frame::parse(&stored).map(|f| f.dictionary_id).unwrap_or(0);
        // A delta frame (delta = "auto"): its base record's frame names the dictionary.
        if let Some(base) = frame::parse(&stored).ok().and_then(|f| f.base) {
            let record = read(&mut direct, &crate::codec::delta::base_key(&probe, base.id)).await.map(|(r, _)| r).unwrap_or_default();
            id = crate::codec::delta::record_frame(&record).and_then(|f| frame::parse(f).ok()).map_or(0, |f| f.dictionary_id);
        }
        if id != 0 && report.published.as_ref().is_none_or(|m| m.id == id) {
            return Ok((id, format!("{line}; the proxy compresses with dictionary {id}")));
        }
        if std::time::Instant::now() > deadline {
            return Err("the proxy did not start using the trained dictionary within 15 s".into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The workflows the shared dictionary is trained from: `TRAINING_OBJECTS` generated ones, or
/// the `--corpus` objects themselves when the demo runs on a corpus.
pub fn training_population(corpus: Option<&[Generated]>, seed: u64) -> Vec<Generated> {
    match corpus {
        Some(objects) => objects.to_vec(),
        None => corpus::training_set(TRAINING_OBJECTS, seed.wrapping_add(100)),
    }
}

/// Writes what the demo wrote through the proxy — the training population, the objects, the
/// update series — as plain Puts of the same keys straight into `reference` (an etcd without the
/// proxy), so that the two etcd databases can be compared.
/// Returns how many writes etcd refused as too large (objects only the proxy can store).
pub async fn write_reference(reference: &str, population: &[Generated], objects: &[Generated], series: &[Generated]) -> Result<usize, DemoError> {
    let mut kv = client(reference).await?;
    let mut writes: Vec<(String, &[u8])> = Vec::new();
    for (i, obj) in population.iter().enumerate() {
        writes.push((format!("{FLYTEWORKFLOW_PREFIX}demo-training/{i:03}"), &obj.json));
    }
    for (i, obj) in objects.iter().enumerate() {
        writes.push((format!("{FLYTEWORKFLOW_PREFIX}demo/{i:03}-{}", obj.name), &obj.json));
    }
    if let Some(first) = series.first() {
        for v in series {
            writes.push((format!("{FLYTEWORKFLOW_PREFIX}demo/series-{}", first.name), &v.json));
        }
    }
    let mut too_large = 0;
    for (key, value) in writes {
        let put = PutRequest { key: Bytes::from(key), value: Bytes::copy_from_slice(value), ..Default::default() };
        match kv.put(put).await {
            Ok(_) => {}
            // etcd's "request is too large" (over --max-request-bytes), or grpc-go's receive limit above it.
            Err(s) if s.code() == tonic::Code::InvalidArgument && s.message().contains("request is too large") => too_large += 1,
            Err(s) if s.code() == tonic::Code::ResourceExhausted && s.message().contains("larger than max") => too_large += 1,
            Err(s) => return Err(s.into()),
        }
    }
    Ok(too_large)
}

/// A demo failure: a connection or RPC error, or a value that did not read back identical.
pub type DemoError = Box<dyn std::error::Error + Send + Sync>;

async fn client(url: &str) -> Result<KvClient<Channel>, DemoError> {
    let channel = Channel::from_shared(url.to_string())?.connect().await?;
    Ok(KvClient::new(channel).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX))
}

fn mod_compare(key: &Bytes, rev: i64) -> Compare {
    Compare::mod_equal(key.clone(), rev)
}

/// kube-apiserver's write: create when `rev == 0`, else GuaranteedUpdate. Returns the new revision.
async fn write(kv: &mut KvClient<Channel>, key: &Bytes, value: Bytes, rev: i64) -> Result<i64, DemoError> {
    let put = RequestOp { request: Some(request_op::Request::RequestPut(PutRequest { key: key.clone(), value, ..Default::default() })) };
    let get = RequestOp { request: Some(request_op::Request::RequestRange(RangeRequest { key: key.clone(), ..Default::default() })) };
    let txn = TxnRequest { compare: vec![mod_compare(key, rev)], success: vec![put], failure: if rev == 0 { vec![] } else { vec![get] } };
    let resp = kv.txn(txn).await?.into_inner();
    if !resp.succeeded {
        return Err(format!("write of {} lost a mod_revision race", String::from_utf8_lossy(key)).into());
    }
    Ok(resp.header.map_or(0, |h| h.revision))
}

async fn read(kv: &mut KvClient<Channel>, key: &Bytes) -> Result<(Bytes, i64), DemoError> {
    let resp = kv.range(RangeRequest { key: key.clone(), ..Default::default() }).await?.into_inner();
    let kv = resp.kvs.into_iter().next().ok_or_else(|| format!("{} not found", String::from_utf8_lossy(key)))?;
    Ok((kv.value, kv.mod_revision))
}

/// Objects from `dir` (every `*.json`, recursively), or the generated standard set.
pub fn load_objects(dir: Option<&Path>, seed: u64) -> Result<Vec<Generated>, DemoError> {
    let Some(dir) = dir else { return Ok(corpus::standard_set(seed)) };
    json_files(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .into_iter()
        .map(|p| {
            let json = std::fs::read(&p)?;
            let name = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            Ok(Generated { name, json })
        })
        .collect()
}

/// Every `*.json` file under `dir`, recursively, sorted by path.
pub fn json_files(dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let p = entry?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "json") {
                files.push(p);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Writes every object (and one 20-version update series) through `proxy`, verifies reads, and
/// returns one row per object plus the series. `etcd` is the real etcd, read directly.
pub async fn run(proxy: &str, etcd: &str, objects: Vec<Generated>, series: Vec<Generated>) -> Result<Vec<Row>, DemoError> {
    let mut via = client(proxy).await?;
    let mut direct = client(etcd).await?;
    let plain = ValueCodec::from_config(&Config::default());
    let mut rows = Vec::new();
    for (i, obj) in objects.iter().enumerate() {
        let key = Bytes::from(format!("{}demo/{i:03}-{}", crate::config::FLYTEWORKFLOW_PREFIX, obj.name));
        let json = Bytes::from(obj.json.clone());
        let rev = match read(&mut via, &key).await {
            Ok((_, rev)) => rev,
            Err(_) => 0,
        };
        write(&mut via, &key, json.clone(), rev).await?;
        let mut row = verify(&mut via, &mut direct, &plain, &key, &obj.name, &json).await?;
        row.stored_bytes += base_bytes(&mut direct, &key).await?.1;
        rows.push(row);
    }
    if let Some(first) = series.first() {
        // One workflow's whole history: every status change rewrites the object, and etcd keeps
        // every revision until compaction. Sum the JSON and the stored bytes over all versions.
        let key = Bytes::from(format!("{}demo/series-{}", crate::config::FLYTEWORKFLOW_PREFIX, first.name));
        let mut rev = read(&mut via, &key).await.map(|(_, r)| r).unwrap_or(0);
        let name = format!("{} history ({} versions)", first.name.split('.').next().unwrap_or(&first.name), series.len());
        let mut total = Row { name, versions: series.len(), json_bytes: 0, stored_bytes: 0, plain_bytes: 0 };
        for version in &series {
            let json = Bytes::from(version.json.clone());
            rev = write(&mut via, &key, json.clone(), rev).await?;
            let row = verify(&mut via, &mut direct, &plain, &key, &version.name, &json).await?;
            total.json_bytes += row.json_bytes;
            total.stored_bytes += row.stored_bytes;
            total.plain_bytes += row.plain_bytes;
        }
        // Every base the history was written against (nothing is compacted in the demo).
        total.stored_bytes += base_bytes(&mut direct, &key).await?.1;
        rows.push(total);
    }
    Ok(rows)
}

/// The delta-frame bases of `key` in etcd: how many, and their stored bytes.
async fn base_bytes(direct: &mut KvClient<Channel>, key: &Bytes) -> Result<(usize, usize), DemoError> {
    let dir = Bytes::from(crate::codec::delta::bases_dir(key));
    let end = Bytes::from(crate::codec::prefix_end(&dir).expect("a directory ends in '/'"));
    let bases = direct.range(RangeRequest { key: dir, range_end: end, ..Default::default() }).await?.into_inner();
    Ok((bases.kvs.len(), bases.kvs.iter().map(|kv| kv.value.len()).sum()))
}

async fn verify(via: &mut KvClient<Channel>, direct: &mut KvClient<Channel>, plain: &ValueCodec, key: &Bytes, name: &str, json: &Bytes) -> Result<Row, DemoError> {
    let (back, _) = read(via, key).await?;
    if back != *json {
        return Err(format!("{name}: read back through the proxy differs from what was written").into());
    }
    let (stored, _) = read(direct, key).await?;
    let plain_bytes = plain.encode(key, json)?.0.len();
    Ok(Row { name: name.to_string(), versions: 1, json_bytes: json.len(), stored_bytes: stored.len(), plain_bytes })
}

/// One series written through a proxy with delta frames: what the history costs etcd.
#[derive(Debug, Clone)]
pub struct DeltaRow {
    /// Series name.
    pub name: String,
    /// JSON bytes summed over every version.
    pub json_bytes: usize,
    /// Bytes plain zstd would store for the same versions (frame included).
    pub plain_bytes: usize,
    /// Delta frames stored for every version, read directly from etcd at each revision.
    pub delta_bytes: usize,
    /// The bases still stored for the key, in bytes, and how many.
    pub base_bytes: usize,
    /// Number of bases.
    pub bases: usize,
}

/// Starts a second, in-process proxy on `etcd` with delta frames on for the FlyteWorkflow prefix
/// (dictionaries off) and writes each series through it as kube-apiserver does; every version is
/// read back byte-identical at its own revision. Keys are under `demo-delta/`.
pub async fn run_delta(etcd: &str, series: Vec<(String, Vec<Generated>)>) -> Result<Vec<DeltaRow>, DemoError> {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse()?;
    config.metrics.listen = "127.0.0.1:0".parse()?;
    config.upstream.endpoints = vec![etcd.to_string()];
    config.dictionaries.enabled = false;
    config.prefixes[0].delta = Some(true.into());
    config.prefixes[0].dictionary = Some(false);
    let proxy = crate::server::spawn(config).await?;
    let mut via = client(&format!("http://{}", proxy.addr)).await?;
    let mut direct = client(etcd).await?;
    let plain = ValueCodec::from_config(&Config::default());
    let mut rows = Vec::new();
    for (name, versions) in series {
        let key = Bytes::from(format!("{FLYTEWORKFLOW_PREFIX}demo-delta/{name}"));
        let mut row = DeltaRow { name, json_bytes: 0, plain_bytes: 0, delta_bytes: 0, base_bytes: 0, bases: 0 };
        let mut rev = read(&mut via, &key).await.map(|(_, r)| r).unwrap_or(0);
        for v in &versions {
            let json = Bytes::from(v.json.clone());
            rev = write(&mut via, &key, json.clone(), rev).await?;
            let at = |k: &Bytes| RangeRequest { key: k.clone(), revision: rev, ..Default::default() };
            let back = via.range(at(&key)).await?.into_inner().kvs.into_iter().next().map(|kv| kv.value);
            if back.as_ref() != Some(&json) {
                return Err(format!("{}: read back through the delta proxy differs", v.name).into());
            }
            let stored = direct.range(at(&key)).await?.into_inner().kvs.into_iter().next().map_or(0, |kv| kv.value.len());
            row.json_bytes += json.len();
            row.plain_bytes += plain.encode(&key, &json)?.0.len();
            row.delta_bytes += stored;
        }
        (row.bases, row.base_bytes) = base_bytes(&mut direct, &key).await?;
        rows.push(row);
    }
    drop(proxy);
    Ok(rows)
}

/// Renders the delta-frames table: the history of each series as JSON, as plain zstd would store
/// it, and as delta frames plus their bases.
pub fn delta_table(rows: &[DeltaRow]) -> String {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(6).max(6);
    let mut out = format!(
        "{:<width$}  {:>12}  {:>12}  {:>7}  {:>18}  {:>7}  {:>10}\n",
        "history (every version)", "JSON bytes", "plain zstd", "ratio", "deltas + bases", "ratio", "vs zstd"
    );
    out.push_str(&format!("{}\n", "-".repeat(width + 78)));
    for r in rows {
        let stored = r.delta_bytes + r.base_bytes;
        out.push_str(&format!(
            "{:<width$}  {:>12}  {:>12}  {:>6.1}x  {:>18}  {:>6.1}x  {:>9.1}x\n",
            r.name,
            r.json_bytes,
            r.plain_bytes,
            r.json_bytes as f64 / r.plain_bytes.max(1) as f64,
            format!("{} + {} ({})", r.delta_bytes, r.base_bytes, r.bases),
            r.json_bytes as f64 / stored.max(1) as f64,
            r.plain_bytes as f64 / stored.max(1) as f64,
        ));
    }
    out
}

/// etcd's database size in bytes (Maintenance.Status.db_size), read directly from etcd.
pub async fn db_size(etcd: &str) -> Result<i64, DemoError> {
    // etcd commits its backend in batches (every 100 ms): let the last writes land first.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let channel = Channel::from_shared(etcd.to_string())?.connect().await?;
    Ok(MaintenanceClient::new(channel).status(StatusRequest {}).await?.into_inner().db_size)
}

/// Renders the savings table: JSON, what plain zstd would store, what etcd stores (with the
/// dictionary), the ratio and the dictionary's gain over plain zstd.
pub fn table(rows: &[Row]) -> String {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(6).max(6);
    let line = |name: &str, json: usize, plain: usize, stored: usize| {
        format!(
            "{name:<width$}  {json:>12}  {plain:>12}  {stored:>13}  {:>6.1}x  {:>8.2}x\n",
            json as f64 / stored.max(1) as f64,
            plain as f64 / stored.max(1) as f64
        )
    };
    let rule = format!("{}\n", "-".repeat(width + 62));
    let mut out = format!("{:<width$}  {:>12}  {:>12}  {:>13}  {:>7}  {:>9}\n", "object", "JSON bytes", "plain zstd", "stored (dict)", "ratio", "dict gain");
    out.push_str(&rule);
    let (mut json, mut plain, mut stored) = (0, 0, 0);
    for r in rows {
        out.push_str(&line(&r.name, r.json_bytes, r.plain_bytes, r.stored_bytes));
        json += r.json_bytes;
        plain += r.plain_bytes;
        stored += r.stored_bytes;
    }
    out.push_str(&rule);
    out.push_str(&line("total", json, plain, stored));
    let saved = json.saturating_sub(stored);
    out.push_str(&format!(
        "\nsaved {saved} of {json} bytes ({:.1}%) for these objects.\n\
         stored: what etcd holds for the object with the default configuration (delta = \"auto\"): its value, a delta frame,\n\
         plus the base record it is a delta against (one per object here; the history shares a few).\n\
         ratio: JSON bytes / stored bytes. dict gain: plain zstd bytes / stored bytes, what the shared dictionary (and, for\n\
         the history, delta frames) add (objects over 1 MiB are compressed without a dictionary: their own content already\n\
         holds every match it would give).\n",
        saved as f64 * 100.0 / json.max(1) as f64
    ));
    out
}
