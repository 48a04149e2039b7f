//! `etcd-squeeze analyze`: what the proxy would save, measured on the live data, before
//! installing it. Read-only: it only ever sends Range requests.
//!
//! Every key under the prefixes is read page by page at one pinned revision (the first answer's),
//! so the report is a consistent snapshot however long the scan takes. Each value is decoded if it
//! is already a frame, then encoded with the configured codec exactly as the proxy would store it
//! on its next write. A second pass, at the same revision, compresses every value again with a
//! zstd dictionary trained on a sample of the first pass, to show what a dictionary would add.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Instant;

use bytes::Bytes;
use bytesize::ByteSize;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::{human, key_string, percent, Etcd, EtcdArgs, OpsError, PrefixArgs, DEFAULT_ETCD_MAX_REQUEST_BYTES, DEFAULT_PAGE_KEYS};
use crate::codec::{frame, EncodeOutcome, PrefixRule};
use crate::proto::mvccpb::KeyValue;

/// Values sampled per prefix to train the projected dictionary. 500 samples of at most
/// [`SAMPLE_HEAD_BYTES`] keep training under a few seconds and 32 MiB of memory.
pub const DEFAULT_DICTIONARY_SAMPLES: usize = 500;
/// Only the first 64 KiB of a sampled value goes into training: the boilerplate a dictionary
/// can learn (metadata, spec, field names) is at the start, and zstd's trainer is made for
/// small samples.
pub const SAMPLE_HEAD_BYTES: usize = 64 << 10;
/// The reservoir sample is seeded, so two runs on the same data print the same report.
const SAMPLE_SEED: u64 = 0x5A17_D1C7;

/// `etcd-squeeze analyze`
#[derive(Debug, Clone, clap::Args)]
pub struct AnalyzeArgs {
    /// How to reach etcd.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Which prefixes to analyze.
    #[command(flatten)]
    pub prefixes: PrefixArgs,
    /// etcd's --max-request-bytes: values closest to it are listed, before and after compression.
    #[arg(long, default_value = DEFAULT_ETCD_MAX_REQUEST_BYTES)]
    pub max_request_bytes: ByteSize,
    /// Keys read per Range request.
    #[arg(long, default_value_t = DEFAULT_PAGE_KEYS, value_parser = clap::value_parser!(i64).range(1..))]
    pub page_size: i64,
    /// How many of the largest values to list per prefix.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// Values sampled per prefix to train a dictionary for the projection; 0 skips it.
    #[arg(long, default_value_t = DEFAULT_DICTIONARY_SAMPLES)]
    pub dictionary_samples: usize,
    /// Size of the trained dictionary; by default the proxy's own (`dictionaries.size` of
    /// `--config`, 64 KiB unless set), so the projection is what the proxy would store.
    #[arg(long)]
    pub dictionary_size: Option<ByteSize>,
    /// Print the report as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The whole report: one section per configured prefix.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// etcd's endpoints.
    pub endpoints: Vec<String>,
    /// The revision every key was read at.
    pub revision: i64,
    /// etcd's `--max-request-bytes` the sizes are compared with.
    pub max_request_bytes: u64,
    /// One section per configured prefix, in configuration order.
    pub prefixes: Vec<PrefixReport>,
    /// Delta-frame bases no value needs once compaction passes them (src/delta/sweep.rs).
    pub orphans: Orphans,
    /// How long the scan took, in seconds.
    pub seconds: f64,
}

/// What the orphan sweep's survey finds under `/etcd-squeeze/bases/` (at its own revision, just
/// after the scan's): the bases a replica's sweep deletes once compaction passes them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Orphans {
    /// Base keys listed.
    pub bases: u64,
    /// Bases of existing keys that a newer base of the same key superseded.
    pub superseded: u64,
    /// Bases of keys that no longer exist (deleted by a range, a lease, or directly in etcd).
    pub key_gone: u64,
    /// Base directories whose key could not be resolved (left alone).
    pub unresolved: u64,
}

/// What one prefix holds and what it would hold behind the proxy.
#[derive(Debug, Clone, Serialize)]
pub struct PrefixReport {
    /// The key prefix.
    pub prefix: String,
    /// Its zstd level.
    pub level: i32,
    /// Keys under the prefix (and under no longer configured prefix).
    pub keys: u64,
    /// Bytes of values as etcd stores them now (the bases of delta frames are in `base_bytes`).
    pub stored_bytes: u64,
    /// Bytes of the original values (frames decoded).
    pub original_bytes: u64,
    /// The largest value as stored now.
    pub largest: Option<KeySize>,
    /// Values that already are frames.
    pub framed: u64,
    /// Of those, delta frames (their bases are counted in `bases`/`base_bytes`).
    pub delta_frames: u64,
    /// Delta frames' bases (`/etcd-squeeze/bases/`) of keys under the prefix.
    pub bases: u64,
    /// Their stored size in bytes (not in `stored_bytes`).
    pub base_bytes: u64,
    /// Values the codec stores as they are (`k8s:enc:` values, `compress = false`).
    pub stored_as_is: u64,
    /// Frames that cannot be decoded (counted at their stored size everywhere).
    pub undecodable: u64,
    /// The first undecodable key, with the reason.
    pub first_undecodable: Option<String>,
    /// Values the proxy refuses to store (over `limits.max_value_bytes`): counted at their stored size.
    pub refused: u64,
    /// Bytes etcd would store once every value is written through the proxy.
    pub projected_bytes: u64,
    /// `stored_bytes + base_bytes - projected_bytes` (negative if the proxy would store more).
    pub projected_savings_bytes: i64,
    /// The same projection with a trained dictionary; `None` when not asked for.
    pub dictionary: Option<DictionaryProjection>,
    /// Original values larger than `max_request_bytes` (etcd refuses them without the proxy).
    pub over_limit_before: u64,
    /// Projected values larger than `max_request_bytes`.
    pub over_limit_after: u64,
    /// The largest original values: the closest to `max_request_bytes` without the proxy.
    pub largest_before: Vec<KeySizes>,
    /// The largest projected values: the closest to `max_request_bytes` behind the proxy.
    pub largest_after: Vec<KeySizes>,
}

/// A key and a size in bytes.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KeySize {
    /// The key (escaped when not UTF-8).
    pub key: String,
    /// Bytes.
    pub bytes: u64,
}

/// One key's sizes, in bytes.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KeySizes {
    /// The key (escaped when not UTF-8).
    pub key: String,
    /// The original value.
    pub original: u64,
    /// As stored now.
    pub stored: u64,
    /// As the proxy would store it.
    pub projected: u64,
}

/// The projection with a dictionary trained on a sample of the prefix's values.
#[derive(Debug, Clone, Serialize)]
pub struct DictionaryProjection {
    /// Values in the training sample.
    pub samples: u64,
    /// Bytes of training data (each sample cut to its first 64 KiB).
    pub sample_bytes: u64,
    /// The trained dictionary's size (stored once, not counted in `projected_bytes`).
    pub dictionary_bytes: u64,
    /// Bytes etcd would store with the dictionary; `None` when training failed.
    pub projected_bytes: Option<u64>,
    /// Why there is no projection (too few or too similar samples).
    pub error: Option<String>,
}

/// Runs `analyze` and prints the report; the exit code for `main`.
pub async fn cli(args: AnalyzeArgs) -> ExitCode {
    let result = async {
        let etcd = args.etcd.connect(&args.prefixes).await?;
        let report = run(&etcd, &args).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report).expect("plain data"));
        } else {
            print!("{}", report.render());
        }
        Ok::<_, OpsError>(())
    };
    match result.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => super::fail("analyze", &e),
    }
}

/// Per-prefix accumulation during the scan.
struct Tally {
    report: PrefixReport,
    rule: PrefixRule,
    before: TopN,
    after: TopN,
    /// Reservoir sample of the values zstd compresses, cut to [`SAMPLE_HEAD_BYTES`].
    samples: Vec<Vec<u8>>,
    eligible: u64,
    dictionary: Option<zstd::bulk::Compressor<'static>>,
    dict_projected: u64,
}

/// Scans every configured prefix at one revision and builds the report. Never writes.
pub async fn run(etcd: &Etcd, args: &AnalyzeArgs) -> Result<Report, OpsError> {
    let started = Instant::now();
    let limit = args.max_request_bytes.as_u64();
    let ranges = etcd.ranges();
    let (total, revision) = etcd.count_all(&ranges, None, 0).await?;
    let mut tallies: Vec<Tally> = etcd.config.prefixes.iter().map(|p| Tally::new(PrefixRule::from(p), args.top)).collect();
    let index: HashMap<Bytes, usize> = tallies.iter().enumerate().map(|(i, t)| (t.rule.prefix.clone(), i)).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(SAMPLE_SEED);
    let bar = super::progress_bar(total, "scan");

    for range in &ranges {
        let mut pager = etcd.pager(range, range.start.to_vec(), revision, args.page_size);
        while let Some(page) = pager.next_page().await? {
            for kv in page {
                bar.inc(1);
                let Some(tally) = etcd.codec.rule_for(&kv.key).and_then(|r| index.get(&r.prefix)).map(|&i| &mut tallies[i]) else {
                    continue;
                };
                tally.add(etcd, &kv, limit, args.dictionary_samples, &mut rng);
            }
        }
    }

    // Delta frames' bases, attributed to the prefix of the key they belong to.
    let bases = super::KeyRange::of_prefix(crate::codec::delta::BASES_PREFIX);
    let mut pager = etcd.pager(&bases, bases.start.to_vec(), revision, args.page_size.min(100)).including_reserved();
    while let Some(page) = pager.next_page().await? {
        for kv in page {
            let Some(key) = crate::codec::delta::record_key(&kv.value) else { continue };
            if let Some(tally) = etcd.codec.rule_for(key).and_then(|r| index.get(&r.prefix)).map(|&i| &mut tallies[i]) {
                tally.report.bases += 1;
                tally.report.base_bytes += kv.value.len() as u64;
            }
        }
    }

    if args.dictionary_samples > 0 {
        let dict_size = args.dictionary_size.unwrap_or(etcd.config.dictionaries.size).as_u64() as usize;
        let mut second_pass = 0;
        for tally in &mut tallies {
            second_pass += tally.train(dict_size);
        }
        if second_pass > 0 {
            bar.set_message("dictionary");
            bar.set_position(0);
            bar.set_length(second_pass);
            for range in &ranges {
                let mut pager = etcd.pager(range, range.start.to_vec(), revision, args.page_size);
                while let Some(page) = pager.next_page().await? {
                    for kv in page {
                        let Some(tally) = etcd.codec.rule_for(&kv.key).and_then(|r| index.get(&r.prefix)).map(|&i| &mut tallies[i]) else {
                            continue;
                        };
                        if tally.dictionary.is_some() {
                            bar.inc(1);
                            tally.add_with_dictionary(etcd, &kv);
                        }
                    }
                }
            }
        }
    }
    bar.finish_and_clear();

    let mut kv = etcd.kv();
    let survey = crate::delta::sweep::survey(&mut kv, &etcd.prefixes(), &mut HashMap::new())
        .await
        .map_err(|e| OpsError::Rpc { call: e.call, status: e.status })?;
    let orphans = Orphans { bases: survey.bases, superseded: survey.superseded.len() as u64, key_gone: survey.gone_bases(), unresolved: survey.unresolved };

    Ok(Report {
        endpoints: etcd.config.upstream.endpoints.clone(),
        revision,
        max_request_bytes: limit,
        prefixes: tallies.into_iter().map(Tally::finish).collect(),
        orphans,
        seconds: started.elapsed().as_secs_f64(),
    })
}

impl Tally {
    fn new(rule: PrefixRule, top: usize) -> Tally {
        Tally {
            report: PrefixReport {
                prefix: key_string(&rule.prefix),
                level: rule.level,
                keys: 0,
                stored_bytes: 0,
                original_bytes: 0,
                largest: None,
                framed: 0,
                delta_frames: 0,
                bases: 0,
                base_bytes: 0,
                stored_as_is: 0,
                undecodable: 0,
                first_undecodable: None,
                refused: 0,
                projected_bytes: 0,
                projected_savings_bytes: 0,
                dictionary: None,
                over_limit_before: 0,
                over_limit_after: 0,
                largest_before: Vec::new(),
                largest_after: Vec::new(),
            },
            rule,
            before: TopN::new(top),
            after: TopN::new(top),
            samples: Vec::new(),
            eligible: 0,
            dictionary: None,
            dict_projected: 0,
        }
    }

    /// First pass: counts, sizes, the configured codec's projection, and the sample.
    fn add(&mut self, etcd: &Etcd, kv: &KeyValue, limit: u64, max_samples: usize, rng: &mut impl Rng) {
        let r = &mut self.report;
        let stored = kv.value.len() as u64;
        r.keys += 1;
        r.stored_bytes += stored;
        if r.largest.as_ref().is_none_or(|l| stored > l.bytes) {
            r.largest = Some(KeySize { key: key_string(&kv.key), bytes: stored });
        }
        let framed = frame::is_framed(&kv.value);
        r.framed += framed as u64;
        r.delta_frames += frame::parse(&kv.value).is_ok_and(|f| f.base.is_some()) as u64;
        let (original, projected) = match etcd.decode(&kv.key, &kv.value) {
            Ok(original) => {
                let (encoded, outcome) = match etcd.codec.encode(&kv.key, &original) {
                    Ok((encoded, outcome)) => (encoded.len() as u64, outcome),
                    Err(_) => {
                        r.refused += 1;
                        (stored, EncodeOutcome::StoredAsIs)
                    }
                };
                r.stored_as_is += (outcome == EncodeOutcome::StoredAsIs && !framed) as u64;
                if outcome == EncodeOutcome::Compressed && max_samples > 0 {
                    self.eligible += 1;
                    let head = original[..original.len().min(SAMPLE_HEAD_BYTES)].to_vec();
                    if self.samples.len() < max_samples {
                        self.samples.push(head);
                    } else {
                        let j = rng.random_range(0..self.eligible) as usize;
                        if j < max_samples {
                            self.samples[j] = head;
                        }
                    }
                }
                (original.len() as u64, encoded)
            }
            Err(e) => {
                r.undecodable += 1;
                r.first_undecodable.get_or_insert_with(|| e.to_string());
                (stored, stored)
            }
        };
        r.original_bytes += original;
        r.projected_bytes += projected;
        r.over_limit_before += (original > limit) as u64;
        r.over_limit_after += (projected > limit) as u64;
        let sizes = KeySizes { key: key_string(&kv.key), original, stored, projected };
        self.before.offer(original, &sizes);
        self.after.offer(projected, &sizes);
    }

    /// Trains the dictionary on the sample; returns how many keys the second pass will read.
    fn train(&mut self, dict_size: usize) -> u64 {
        if self.samples.is_empty() {
            return 0;
        }
        let sample_bytes = self.samples.iter().map(|s| s.len() as u64).sum();
        let mut projection = DictionaryProjection {
            samples: self.samples.len() as u64,
            sample_bytes,
            dictionary_bytes: 0,
            projected_bytes: None,
            error: None,
        };
        let trained = zstd::dict::from_samples(&self.samples, dict_size).and_then(|dict| {
            let mut c = zstd::bulk::Compressor::with_dictionary(self.rule.level, &dict)?;
            c.include_checksum(true)?;
            c.include_contentsize(true)?;
            Ok((dict.len(), c))
        });
        self.samples = Vec::new();
        match trained {
            Ok((len, compressor)) => {
                projection.dictionary_bytes = len as u64;
                self.dictionary = Some(compressor);
                self.report.dictionary = Some(projection);
                self.report.keys
            }
            Err(e) => {
                projection.error = Some(format!("zstd could not train a dictionary: {e}"));
                self.report.dictionary = Some(projection);
                0
            }
        }
    }

    /// Second pass: the size of one value with the dictionary, by the codec's own rules: what
    /// it stores as is or in a raw frame stays so; a compressed frame uses the dictionary
    /// unless that does not shrink the value.
    fn add_with_dictionary(&mut self, etcd: &Etcd, kv: &KeyValue) {
        let encoded = etcd.decode(&kv.key, &kv.value).ok().and_then(|original| {
            let (encoded, outcome) = etcd.codec.encode(&kv.key, &original).ok()?;
            Some((original, encoded, outcome))
        });
        let Some((original, encoded, outcome)) = encoded else {
            // Undecodable or refused: counted at its stored size, as in the first pass.
            self.dict_projected += kv.value.len() as u64;
            return;
        };
        let mut size = encoded.len();
        if outcome == EncodeOutcome::Compressed {
            let c = self.dictionary.as_mut().expect("second pass only with a dictionary");
            if let Ok(compressed) = c.compress(&original) {
                size = frame::HEADER_LEN + compressed.len().min(original.len());
            }
        }
        self.dict_projected += size as u64;
    }

    fn finish(mut self) -> PrefixReport {
        if let (Some(d), Some(_)) = (self.report.dictionary.as_mut(), self.dictionary.as_ref()) {
            d.projected_bytes = Some(self.dict_projected);
        }
        let r = &mut self.report;
        r.projected_savings_bytes = (r.stored_bytes + r.base_bytes) as i64 - r.projected_bytes as i64;
        r.largest_before = self.before.into_sorted();
        r.largest_after = self.after.into_sorted();
        self.report
    }
}

/// The `n` entries with the largest size seen so far (ties: the first seen stays).
struct TopN {
    n: usize,
    entries: Vec<(u64, KeySizes)>,
}

impl TopN {
    fn new(n: usize) -> TopN {
        TopN { n, entries: Vec::with_capacity(n + 1) }
    }

    fn offer(&mut self, size: u64, sizes: &KeySizes) {
        if self.n == 0 || (self.entries.len() == self.n && self.entries.last().is_some_and(|(s, _)| *s >= size)) {
            return;
        }
        let at = self.entries.partition_point(|(s, _)| *s >= size);
        self.entries.insert(at, (size, sizes.clone()));
        self.entries.truncate(self.n);
    }

    fn into_sorted(self) -> Vec<KeySizes> {
        self.entries.into_iter().map(|(_, k)| k).collect()
    }
}

impl Report {
    /// The report as text for a terminal.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let keys: u64 = self.prefixes.iter().map(|p| p.keys).sum();
        let _ = writeln!(
            out,
            "etcd-squeeze analyze: {} at revision {}: {keys} keys read in {:.1}s (read-only)",
            self.endpoints.join(","),
            self.revision,
            self.seconds
        );
        let limit = self.max_request_bytes;
        for p in &self.prefixes {
            let _ = writeln!(out, "\nprefix {:?} (zstd level {})", p.prefix, p.level);
            let _ = writeln!(
                out,
                "  keys              {:>10}   already framed {}, stored as is {}, undecodable {}{}",
                p.keys,
                p.framed,
                p.stored_as_is,
                p.undecodable,
                if p.refused > 0 { format!(", over limits.max_value_bytes {}", p.refused) } else { String::new() }
            );
            if let Some(reason) = &p.first_undecodable {
                let _ = writeln!(out, "                                 first undecodable: {reason}");
            }
            let largest = p.largest.as_ref().map_or(String::new(), |l| format!("   largest {} {}", human(l.bytes), l.key));
            // What etcd holds now: the values, plus the bases their delta frames need.
            let stored = p.stored_bytes + p.base_bytes;
            if p.delta_frames + p.bases > 0 {
                let _ = writeln!(out, "  stored now        {:>10}   values {} + delta bases {}{largest}", human(stored), human(p.stored_bytes), human(p.base_bytes));
                let _ = writeln!(out, "                                 {} bases; {} values are delta frames against them", p.bases, p.delta_frames);
            } else {
                let _ = writeln!(out, "  stored now        {:>10}{largest}", human(stored));
            }
            let now = if stored < p.original_bytes {
                format!("   stored now is {:.1}x smaller", p.original_bytes as f64 / stored.max(1) as f64)
            } else {
                String::new()
            };
            let _ = writeln!(out, "  original values   {:>10}{now}", human(p.original_bytes));
            let _ = writeln!(out, "  projected (zstd)  {:>10}   {}", human(p.projected_bytes), savings(stored, p.projected_bytes));
            match &p.dictionary {
                Some(DictionaryProjection { projected_bytes: Some(d), dictionary_bytes, samples, .. }) => {
                    let _ = writeln!(
                        out,
                        "  with dictionary   {:>10}   {}; {} dictionary trained on {samples} sampled values",
                        human(*d),
                        savings(stored, *d),
                        human(*dictionary_bytes)
                    );
                }
                Some(DictionaryProjection { error: Some(e), .. }) => {
                    let _ = writeln!(out, "  with dictionary   {:>10}   {e}", "-");
                }
                _ => {}
            }
            let _ = writeln!(
                out,
                "  over --max-request-bytes ({}): {} without the proxy, {} behind it",
                human(limit),
                p.over_limit_before,
                p.over_limit_after
            );
            for (title, list) in [("largest original values (closest to the limit without the proxy)", &p.largest_before), ("largest projected values (closest to the limit behind the proxy)", &p.largest_after)] {
                if list.is_empty() {
                    continue;
                }
                let _ = writeln!(out, "  {title}:");
                let _ = writeln!(out, "    {:>10} {:>6}  {:>10} {:>6}  key", "original", "%limit", "projected", "%limit");
                for k in list {
                    let _ = writeln!(
                        out,
                        "    {:>10} {:>5.1}%  {:>10} {:>5.1}%  {}",
                        human(k.original),
                        percent(k.original, limit),
                        human(k.projected),
                        percent(k.projected, limit),
                        k.key
                    );
                }
            }
        }
        let o = &self.orphans;
        if o.bases > 0 {
            let _ = writeln!(
                out,
                "\ndelta bases        {:>10}   superseded {} and of deleted keys {}: the sweep deletes them once compaction passes them{}",
                o.bases,
                o.superseded,
                o.key_gone,
                if o.unresolved > 0 { format!("; {} directories unresolved", o.unresolved) } else { String::new() }
            );
        }
        out
    }
}

fn savings(stored: u64, projected: u64) -> String {
    if projected > stored {
        return format!("{} more than now", human(projected - stored));
    }
    format!(
        "saves {} ({:.1}%), {:.1}x",
        human(stored - projected),
        percent(stored - projected, stored),
        stored as f64 / projected.max(1) as f64
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(key: &str, n: u64) -> KeySizes {
        KeySizes { key: key.into(), original: n, stored: n, projected: n }
    }

    #[test]
    fn top_n_keeps_the_largest_first_seen_on_ties() {
        let mut t = TopN::new(3);
        for (k, n) in [("a", 5), ("b", 9), ("c", 1), ("d", 9), ("e", 7), ("f", 2), ("g", 7)] {
            t.offer(n, &sizes(k, n));
        }
        assert_eq!(t.into_sorted().iter().map(|k| k.key.as_str()).collect::<Vec<_>>(), ["b", "d", "e"]);
        let mut none = TopN::new(0);
        none.offer(1, &sizes("a", 1));
        assert!(none.into_sorted().is_empty());
    }

    #[test]
    fn too_few_samples_is_reported_not_fatal() {
        let rule = PrefixRule::from(&crate::config::PrefixConfig::new("/a/"));
        let mut t = Tally::new(rule, 5);
        t.samples = vec![b"{\"a\":1}".to_vec()];
        assert_eq!(t.train(4096), 0, "no second pass");
        let report = t.finish();
        let d = report.dictionary.unwrap();
        assert_eq!((d.samples, d.projected_bytes), (1, None));
        assert!(d.error.unwrap().contains("could not train"));
    }

    #[tokio::test]
    async fn values_the_proxy_refuses_are_counted_at_their_stored_size() {
        let mut config = crate::config::Config::default();
        config.prefixes = vec![crate::config::PrefixConfig::new("/a/")];
        config.limits.max_value_bytes = ByteSize::mib(2);
        let etcd = Etcd::connect(config).unwrap();
        let mut t = Tally::new(PrefixRule::from(&etcd.config.prefixes[0]), 5);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for (key, size) in [("/a/big", 3 << 20), ("/a/ok", 4096)] {
            let kv = KeyValue { key: Bytes::from(key), value: Bytes::from(vec![b'x'; size]), ..Default::default() };
            t.add(&etcd, &kv, 1 << 20, 10, &mut rng);
        }
        let r = t.finish();
        assert_eq!((r.keys, r.refused, r.over_limit_before, r.over_limit_after), (2, 1, 1, 1));
        assert_eq!(r.largest_after[0].projected, 3 << 20);
        assert!(r.projected_bytes < (3 << 20) + 4096);
    }

    #[test]
    fn savings_text() {
        assert_eq!(savings(1000, 100), "saves 900 B (90.0%), 10.0x");
        assert_eq!(savings(100, 110), "10 B more than now");
    }
}
