//! Operator commands: `etcd-squeeze dict list | show ID | train --prefix P | gc [--yes]`.
//!
//! They talk to etcd directly, connected like the other operator commands ([`EtcdArgs`]: the
//! config's `[upstream]`, or `--endpoints` and the TLS flags). `list` and
//! `gc` read every stored value once (a page at a time) to count which dictionary each frame
//! names; `gc` also replays etcd's history since the last compaction, because a Range or Watch
//! at an older revision may still return values written with an older dictionary.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use crate::upstream::Upstream;
use tonic::Status;

use super::EtcdArgs;
use crate::dictionary::cache::DictionaryCache;
use crate::dictionary::store::{Record, Store};
use crate::dictionary::{unix_now, Dictionaries, DictionaryError, TrainReport};
use crate::codec::{frame, ValueCodec, RESERVED_PREFIX};
use crate::config::Config;
use crate::proto::etcdserverpb::kv_client::KvClient;
use crate::proto::etcdserverpb::watch_client::WatchClient;
use crate::proto::etcdserverpb::{watch_request, WatchCreateRequest, WatchRequest};

/// A superseded dictionary is kept at least this long after its successor was published: a
/// replica that has not yet seen the successor may still be writing with it.
pub const GC_GRACE: Duration = Duration::from_secs(3600);
/// A history replay that receives nothing for this long has stalled.
const HISTORY_SILENCE: Duration = Duration::from_secs(30);
/// Values read per page when counting references.
const SCAN_PAGE: i64 = 64;

/// `etcd-squeeze dict …`
#[derive(Debug, clap::Subcommand)]
pub enum DictCommand {
    /// Every stored dictionary: ID, prefix, size, created, and how many stored values use it.
    List(EtcdArgs),
    /// One dictionary's metadata, verified.
    Show {
        /// Dictionary ID.
        id: u32,
        /// Which etcd and configuration.
        #[command(flatten)]
        target: EtcdArgs,
    },
    /// Train a dictionary for a prefix from the values stored in etcd, and publish it if it beats
    /// the current one by dictionaries.min_gain.
    Train {
        /// A [[prefixes]] prefix that uses dictionaries.
        #[arg(long)]
        prefix: String,
        /// Which etcd and configuration.
        #[command(flatten)]
        target: EtcdArgs,
    },
    /// Delete dictionaries no stored value refers to (dry run unless --yes).
    Gc {
        /// Really delete.
        #[arg(long)]
        yes: bool,
        /// Which etcd and configuration.
        #[command(flatten)]
        target: EtcdArgs,
    },
}

/// Runs one `dict` command, printing to stdout; errors go to stderr.
pub async fn run(command: DictCommand) -> ExitCode {
    let result = match command {
        DictCommand::List(t) => with_config(&t, |c| async move { list(&c).await.map(|s| print!("{s}")) }).await,
        DictCommand::Show { id, target } => with_config(&target, |c| async move { show(&c, id).await.map(|s| print!("{s}")) }).await,
        DictCommand::Train { prefix, target } => {
            with_config(&target, |c| async move { train(&c, &prefix).await.map(|s| print!("{s}")) }).await
        }
        DictCommand::Gc { yes, target } => with_config(&target, |c| async move { gc(&c, yes).await.map(|s| print!("{s}")) }).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("etcd-squeeze dict: {e}");
            match e.downcast_ref::<super::OpsError>() {
                Some(ops) => ops.exit_code(),
                None => ExitCode::FAILURE,
            }
        }
    }
}

/// Runs `f` with the configuration of `target` (file, `--endpoints` and TLS flags, as the other
/// operator commands).
async fn with_config<F, Fut>(target: &EtcdArgs, f: F) -> Result<(), Box<dyn std::error::Error>>
where
    F: FnOnce(Config) -> Fut,
    Fut: std::future::Future<Output = Result<(), DictionaryError>>,
{
    let config = target.config(&[])?;
    super::refuse_proxies(&Upstream::new(&config.upstream)?).await?;
    Ok(f(config).await?)
}

fn channel(config: &Config) -> Result<Upstream, DictionaryError> {
    Upstream::new(&config.upstream).map_err(|e| DictionaryError::Etcd(Status::invalid_argument(e.to_string())))
}

fn store(config: &Config) -> Result<Store, DictionaryError> {
    Ok(Store::new(channel(config)?, config.dictionaries.key_prefix.clone()))
}

/// Counts, per dictionary ID, the stored values (outside `/etcd-squeeze/`) and the base records of
/// delta frames (`/etcd-squeeze/bases/`: a base is stored as its value would be, with the
/// prefix's dictionary) whose frame names it, at `revision` (0 = now).
pub async fn references(kv: &KvClient<Upstream>, revision: i64) -> Result<HashMap<u32, u64>, Status> {
    let mut counts = HashMap::new();
    let mut kv = kv.clone().max_decoding_message_size(usize::MAX);
    let mut pages = crate::pager::RangePager::new(b"", b"\0", revision, SCAN_PAGE);
    while let Some(page) = pages.next_page(&mut kv).await? {
        for kv in &page.kvs {
            count_reference(&mut counts, &kv.key, &kv.value);
        }
    }
    Ok(counts)
}

fn count_reference(counts: &mut HashMap<u32, u64>, key: &[u8], value: &[u8]) {
    // A base record's frame names the dictionary its content was compressed with: the delta
    // frames on that base need it as much as a value's own frame would.
    let value = if key.starts_with(crate::codec::delta::BASES_PREFIX) {
        match crate::codec::delta::record_frame(value) {
            Some(frame) => frame,
            None => return,
        }
    } else if key.starts_with(RESERVED_PREFIX) {
        return;
    } else {
        value
    };
    if !frame::is_framed(value) {
        return;
    }
    if let Ok(f) = frame::parse(value) {
        if f.dictionary_id != 0 {
            *counts.entry(f.dictionary_id).or_default() += 1;
        }
    }
}

/// Counts dictionary references in etcd's history: every value written since the last compaction
/// up to revision `until`, replayed with a watch on every key. Every revision is made by a write,
/// so the replay has reached `until` when it sees an event of that revision.
pub async fn history_references(channel: Upstream, until: i64) -> Result<HashMap<u32, u64>, Status> {
    let mut counts = HashMap::new();
    let mut start = 1;
    if until <= 1 {
        return Ok(counts); // nothing was ever written
    }
    'restart: loop {
        counts.clear();
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
                key: Bytes::from_static(b"\0"),
                range_end: Bytes::from_static(b"\0"),
                start_revision: start,
                ..Default::default()
            })),
        };
        let requests = futures::StreamExt::chain(futures::stream::iter([create]), futures::stream::pending());
        let mut client = WatchClient::new(channel.clone()).max_decoding_message_size(usize::MAX);
        let mut stream = client.watch(requests).await?.into_inner();
        loop {
            let next = tokio::time::timeout(HISTORY_SILENCE, stream.message()).await;
            let resp = next.map_err(|_| Status::deadline_exceeded("etcd's history replay stalled"))??;
            let resp = resp.ok_or_else(|| Status::unavailable("history watch ended"))?;
            if resp.canceled {
                if resp.compact_revision > 0 {
                    start = resp.compact_revision;
                    continue 'restart;
                }
                return Err(Status::aborted(format!("history watch canceled: {}", resp.cancel_reason)));
            }
            let mut reached = false;
            for kv in resp.events.into_iter().filter_map(|e| e.kv) {
                reached |= kv.mod_revision >= until;
                if kv.mod_revision <= until {
                    count_reference(&mut counts, &kv.key, &kv.value);
                }
            }
            if reached {
                return Ok(counts);
            }
        }
    }
}

fn created(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// `dict list`: one line per stored dictionary, newest first.
pub async fn list(config: &Config) -> Result<String, DictionaryError> {
    let store = store(config)?;
    let (records, revision) = store.list().await?;
    let refs = references(&store.kv(), revision).await?;
    let mut out = format!("{:>6}  {:<44}  {:>9}  {:<20}  {:>7}  {:>6}  {:>8}\n", "ID", "prefix", "size", "created", "samples", "gain", "values");
    for r in &records {
        match r {
            Ok(r) => {
                let m = &r.meta;
                let gain = 1.0 - m.heldout_after as f64 / m.heldout_before.max(1) as f64;
                out.push_str(&format!(
                    "{:>6}  {:<44}  {:>9}  {:<20}  {:>7}  {:>5.0}%  {:>8}\n",
                    m.id, m.prefix, super::human(m.size), created(m.created_unix), m.samples, gain * 100.0, refs.get(&m.id).copied().unwrap_or(0)
                ));
            }
            Err(e) => out.push_str(&format!("refused: {e}\n")),
        }
    }
    out.push_str(&format!("{} dictionaries under {} (values counted at revision {revision})\n", records.len(), store.prefix()));
    Ok(out)
}

/// `dict show ID`: the metadata of one dictionary, verified.
pub async fn show(config: &Config, id: u32) -> Result<String, DictionaryError> {
    let store = store(config)?;
    let record = store.get(id).await?.ok_or_else(|| Status::not_found(format!("no dictionary {id} (key {})", String::from_utf8_lossy(&store.key(id)))))?;
    let mut out = serde_json::to_string_pretty(&record.meta).expect("metadata serializes");
    out.push_str(&format!("\ncreated {}; checksum verified; key {}\n", created(record.meta.created_unix), String::from_utf8_lossy(&store.key(id))));
    Ok(out)
}

/// One training round for `prefix` from the values stored in etcd, published if it gains at least
/// `dictionaries.min_gain` over the prefix's newest dictionary.
pub async fn train_report(config: &Config, prefix: &str) -> Result<TrainReport, DictionaryError> {
    let cache = std::sync::Arc::new(DictionaryCache::new());
    let codec = ValueCodec::from_config(config).with_dictionaries(cache.clone());
    let dictionaries = Dictionaries::new(config, codec, cache, channel(config)?);
    let p = dictionaries.prefix(prefix)?.clone();
    dictionaries.sync().await?;
    dictionaries.train_prefix(&p, &[]).await
}

/// A gain (0.2 = 20 % fewer bytes) in words: "20.0% smaller", "0.2% larger".
pub fn gain_words(gain: f64) -> String {
    if gain < 0.0 {
        format!("{:.1}% larger", -gain * 100.0)
    } else {
        format!("{:.1}% smaller", gain * 100.0)
    }
}

/// `dict train --prefix P`: [`train_report`], described in one line.
pub async fn train(config: &Config, prefix: &str) -> Result<String, DictionaryError> {
    let report = train_report(config, prefix).await?;
    let (before, after) = report.heldout;
    Ok(match &report.published {
        Some(m) => format!(
            "published dictionary {} for {:?}: {} bytes from {} samples; held-out values {before} -> {after} bytes ({})\n",
            m.id, m.prefix, m.size, m.samples, gain_words(report.gain())
        ),
        None => format!(
            "not published: held-out values {before} -> {after} bytes ({}) is below dictionaries.min_gain = {}\n",
            gain_words(report.gain()),
            config.dictionaries.min_gain
        ),
    })
}

/// Whether gc may delete `r`: no reference now or since the last compaction, not the newest of
/// its prefix, and superseded more than [`GC_GRACE`] ago.
fn gc_verdict(r: &Record, all: &[&Record], refs: u64, now: u64) -> Result<(), String> {
    if refs > 0 {
        return Err(format!("{refs} stored values use it"));
    }
    let successor = all.iter().filter(|o| o.meta.prefix == r.meta.prefix && o.meta.id > r.meta.id).map(|o| o.meta.created_unix).min();
    match successor {
        None => Err("it is the newest dictionary of its prefix".into()),
        Some(t) if now.saturating_sub(t) < GC_GRACE.as_secs() => Err(format!("superseded less than {} ago", humantime::format_duration(GC_GRACE))),
        Some(_) => Ok(()),
    }
}

/// `dict gc [--yes]`: lists what may be deleted, and deletes it with `--yes` (each delete guarded
/// by the key's mod_revision).
pub async fn gc(config: &Config, yes: bool) -> Result<String, DictionaryError> {
    let channel = channel(config)?;
    let store = Store::new(channel.clone(), config.dictionaries.key_prefix.clone());
    let (records, revision) = store.list().await?;
    let mut refs = references(&store.kv(), revision).await?;
    for (id, n) in history_references(channel, revision).await? {
        *refs.entry(id).or_default() += n;
    }
    let valid: Vec<&Record> = records.iter().filter_map(|r| r.as_ref().ok()).collect();
    let now = unix_now();
    let mut out = String::new();
    let mut deletable = 0;
    for r in &valid {
        match gc_verdict(r, &valid, refs.get(&r.meta.id).copied().unwrap_or(0), now) {
            Err(why) => out.push_str(&format!("keep   {:>6}  {}: {why}\n", r.meta.id, r.meta.prefix)),
            Ok(()) if !yes => {
                deletable += 1;
                out.push_str(&format!("unused {:>6}  {}: would delete (run with --yes)\n", r.meta.id, r.meta.prefix));
            }
            Ok(()) => {
                let deleted = store.delete(r.meta.id, r.mod_revision).await?;
                deletable += deleted as usize;
                let what = if deleted { "deleted" } else { "changed meanwhile, kept" };
                out.push_str(&format!("unused {:>6}  {}: {what}\n", r.meta.id, r.meta.prefix));
            }
        }
    }
    for e in records.iter().filter_map(|r| r.as_ref().err()) {
        out.push_str(&format!("refused record left alone: {e}\n"));
    }
    let verb = if yes { "deleted" } else { "deletable" };
    out.push_str(&format!("{deletable} of {} dictionaries {verb}\n", records.len()));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dictionary::store::DictionaryMeta;

    fn record(id: u32, prefix: &str, created_unix: u64) -> Record {
        let meta = DictionaryMeta { id, prefix: prefix.into(), created_unix, ..Default::default() };
        Record { meta, raw: Bytes::new(), mod_revision: 1 }
    }

    #[test]
    fn gc_keeps_used_newest_and_recently_superseded() {
        let now = 10_000_000;
        let old = record(1, "/a/", now - 9000);
        let mid = record(2, "/a/", now - 5000);
        let recent = record(3, "/a/", now - 60);
        let newest = record(4, "/a/", now - 30);
        let other = record(5, "/b/", now - 9000);
        let all = [&old, &mid, &recent, &newest, &other];
        assert!(gc_verdict(&old, &all, 0, now).is_ok(), "superseded by 2 long ago, unused");
        assert!(gc_verdict(&old, &all, 1, now).unwrap_err().contains("1 stored values"));
        assert!(gc_verdict(&mid, &all, 0, now).unwrap_err().contains("superseded less than"));
        assert!(gc_verdict(&newest, &all, 0, now).unwrap_err().contains("newest"));
        assert!(gc_verdict(&other, &all, 0, now).unwrap_err().contains("newest"), "newest of its own prefix");
    }

    #[test]
    fn base_records_count_as_references_other_reserved_keys_do_not() {
        let key = b"/registry/flyte.lyft.com/flyteworkflows/ns/wf";
        let mut framed = Vec::new();
        frame::write_header(&mut framed, frame::Codec::Zstd, 7);
        framed.extend_from_slice(b"zstd frame bytes");
        let (record, _) = crate::codec::delta::encode_base(key, 42, b"content", &framed);
        let mut counts = HashMap::new();
        count_reference(&mut counts, &crate::codec::delta::base_key(key, 42), &record);
        count_reference(&mut counts, key, &framed);
        count_reference(&mut counts, b"/etcd-squeeze/dictionaries/7", &framed);
        count_reference(&mut counts, &crate::codec::delta::base_key(key, 43), b"not a record");
        assert_eq!(counts.get(&7), Some(&2), "the base record and the value; not the dictionary's own key");
    }
}
