//! `etcd-squeeze migrate compress | decompress`: rewrite the values already in etcd, for adoption
//! (raw → frames) and removal (frames → original bytes).
//!
//! Safety rules, in the order they apply to each key:
//! - Keys are read page by page at etcd's latest revision, in key order.
//! - Each rewrite is one Txn: `MOD(key) == mod_revision read` → `Put(key, new value, same lease)`.
//!   If anyone wrote or deleted the key in between, the Txn does nothing: the conflict is counted
//!   and the key is left to that writer, never retried over newer data.
//! - Writes are paced (writes per second and bytes per second).
//! - Without `--yes` nothing is written: the command prints what it would do.
//! - After each write the last key is saved to `--state-file`; a run killed at any point resumes
//!   after it. Every rewrite is idempotent (a frame is not compressed again, a raw value is not
//!   decompressed), so re-running from the start is always safe too.
//! - `decompress` ends with a scan that checks that no frame remains under the prefixes.

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use super::{human, key_string, Etcd, EtcdArgs, KeyRange, OpsError, PrefixArgs, DEFAULT_ETCD_MAX_REQUEST_BYTES, DEFAULT_PAGE_KEYS};
use crate::codec::{frame, EncodeOutcome};
use crate::proto::etcdserverpb::{DeleteRangeRequest, RangeRequest, request_op, Compare, PutRequest, RequestOp, TxnRequest};
use crate::proto::mvccpb::KeyValue;

/// Default write rate: 100 rewrites per second is a small fraction of what one etcd member
/// commits, and spreads the watch events the rewrites cause over time.
pub const DEFAULT_WRITES_PER_SEC: f64 = 100.0;
/// Default byte rate: 8 MiB/s of written values, well under etcd's raft and fsync throughput.
pub const DEFAULT_BYTES_PER_SEC: &str = "8MiB";
/// How many problem keys (too large, undecodable) are listed in the summary.
const LISTED_PROBLEMS: usize = 20;

/// `etcd-squeeze migrate`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum MigrateCommand {
    /// Rewrite the raw values under the prefixes as frames (adoption; run with the proxy installed).
    Compress(MigrateArgs),
    /// Rewrite every frame under the prefixes back to its original bytes, then verify that none
    /// remains (removal; run with `compress = false` on the proxy's prefixes).
    Decompress(MigrateArgs),
}

/// Options of `migrate compress` and `migrate decompress`.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {
    /// How to reach etcd.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Which prefixes to migrate.
    #[command(flatten)]
    pub prefixes: PrefixArgs,
    /// Write. Without it the command is a dry run.
    #[arg(long)]
    pub yes: bool,
    /// Print what would be rewritten and write nothing (the default without --yes).
    #[arg(long)]
    pub dry_run: bool,
    /// Keys read per Range request (and saved per progress step).
    #[arg(long, default_value_t = DEFAULT_PAGE_KEYS, value_parser = clap::value_parser!(i64).range(1..))]
    pub batch_size: i64,
    /// Rewrites per second at most; 0 = unlimited.
    #[arg(long, default_value_t = DEFAULT_WRITES_PER_SEC)]
    pub max_writes_per_sec: f64,
    /// Bytes of rewritten values per second at most; 0 = unlimited.
    #[arg(long, default_value = DEFAULT_BYTES_PER_SEC)]
    pub max_bytes_per_sec: ByteSize,
    /// Start after this key (the last key a previous run reported).
    #[arg(long, conflicts_with = "state_file")]
    pub resume_from: Option<String>,
    /// Save progress here after every write, and resume from it if it exists. Removed when the
    /// run completes.
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// etcd's --max-request-bytes: a dry run of `decompress` flags values that etcd would refuse.
    #[arg(long, default_value = DEFAULT_ETCD_MAX_REQUEST_BYTES)]
    pub max_request_bytes: ByteSize,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Print one line per rewritten key (a dry run always does).
    #[arg(short, long)]
    pub verbose: bool,
    /// compress: a prefix that uses trained dictionaries but has none yet gets one first, trained
    /// on its stored values and published as the proxy's trainer does (`dict train`), so migrated
    /// values get the dictionary's gain. Without it, values are written with the prefix's current
    /// dictionary, or none.
    #[arg(long)]
    pub train: bool,
}

/// Which way values are rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Raw values become frames.
    Compress,
    /// Frames become their original bytes.
    Decompress,
}

impl Direction {
    fn verb(self) -> &'static str {
        match self {
            Direction::Compress => "compress",
            Direction::Decompress => "decompress",
        }
    }
}

/// What a run did (or, in a dry run, would do). Carried over in the state file when resumed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Keys read.
    pub scanned: u64,
    /// Keys rewritten.
    pub rewritten: u64,
    /// Keys already in the target form (compress: framed; decompress: not framed).
    pub already_done: u64,
    /// Keys the codec stores as they are (compress only: too small to gain, incompressible,
    /// `k8s:enc:`, or a prefix with `compress = false`).
    pub left_as_is: u64,
    /// Keys changed or deleted by someone else between the read and the rewrite: left to them.
    pub conflicts: u64,
    /// Keys whose rewritten value etcd refuses as too large (decompress: the proxy is needed).
    pub too_large: u64,
    /// Frames that cannot be decoded, or originals that can only be stored framed.
    pub failed: u64,
    /// Bytes of the rewritten keys' values before.
    pub bytes_before: u64,
    /// Bytes of the rewritten keys' values after.
    pub bytes_after: u64,
}

/// The end of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// compress or decompress.
    pub direction: Direction,
    /// Nothing was written.
    pub dry_run: bool,
    /// The prefixes migrated.
    pub prefixes: Vec<String>,
    /// The counters, including those of the runs this one resumed.
    pub counters: Counters,
    /// The key this run started after, if it resumed.
    pub resumed_after: Option<String>,
    /// The last key processed.
    pub last_key: Option<String>,
    /// Stopped by Ctrl-C before the end.
    pub interrupted: bool,
    /// The first keys that could not be rewritten, with the reason.
    pub problems: Vec<String>,
    /// decompress: the final scan.
    pub verify: Option<Verification>,
    /// Duration of this run, in seconds.
    pub seconds: f64,
}

/// `decompress`'s final scan for frames left under the prefixes.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// Keys scanned.
    pub scanned: u64,
    /// Frames found.
    pub frames: u64,
    /// The first keys that still hold a frame.
    pub examples: Vec<String>,
    /// Bases (delta frames' `/etcd-squeeze/bases/` keys) of keys under the prefixes, deleted
    /// once no frame remained.
    pub bases_deleted: u64,
    /// Bases of keys under the prefixes still there (a current value still needs them, or the
    /// key changed while the base was being deleted).
    pub bases_left: u64,
}

impl Summary {
    /// True when the run did (or, dry, would do) all it was asked: not interrupted, no key too large or failed, and
    /// (decompress) no frame left.
    pub fn complete(&self) -> bool {
        !self.interrupted
            && self.counters.too_large == 0
            && self.counters.failed == 0
            && self.verify.as_ref().is_none_or(|v| v.frames == 0)
    }
}

/// Runs a migration and prints its summary; the exit code for `main` (130 when interrupted).
pub async fn cli(command: MigrateCommand) -> ExitCode {
    let (direction, args) = match command {
        MigrateCommand::Compress(a) => (Direction::Compress, a),
        MigrateCommand::Decompress(a) => (Direction::Decompress, a),
    };
    let name = format!("migrate {}", direction.verb());
    let etcd = match args.etcd.connect(&args.prefixes).await {
        Ok(e) => e,
        Err(e) => return super::fail(&name, &e),
    };
    let stop = Box::pin(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    // With --json, stdout holds only the summary; per-key lines and notices go to stderr.
    let mut out: Box<dyn Write + Send> = if args.json { Box::new(std::io::stderr()) } else { Box::new(std::io::stdout()) };
    match run(&etcd, direction, &args, &mut out, stop).await {
        Ok(summary) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&summary).expect("plain data"));
            } else {
                if summary.dry_run || args.verbose {
                    println!();
                }
                print!("{}", summary.render());
            }
            if summary.interrupted {
                ExitCode::from(130)
            } else if summary.complete() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => super::fail(&name, &e),
    }
}

/// Migrates every key under the configured prefixes. Per-key lines (dry run, `--verbose`) and
/// notices go to `out`; the summary is returned. `stop` resolving ends the run cleanly between
/// two keys (the state file then holds the last one).
pub async fn run(
    etcd: &Etcd,
    direction: Direction,
    args: &MigrateArgs,
    out: &mut (impl Write + Send),
    mut stop: Pin<Box<dyn Future<Output = ()> + Send + '_>>,
) -> Result<Summary, OpsError> {
    let started = Instant::now();
    let dry_run = args.dry_run || !args.yes;
    let ranges = etcd.ranges();
    let prefixes: Vec<String> = etcd.prefixes().iter().map(|p| key_string(p)).collect();
    let state = StateFile::open(args.state_file.as_deref(), direction, &prefixes)?;
    let after: Option<Vec<u8>> = match (&state, &args.resume_from) {
        (Some(s), _) => s.resume.as_ref().map(|r| r.last_key.clone()),
        (None, Some(key)) => Some(key.as_bytes().to_vec()),
        (None, None) => None,
    };
    if direction == Direction::Compress {
        for line in etcd.prepare_dictionaries(args.train && !dry_run).await? {
            let _ = writeln!(out, "{line}");
        }
    }
    let mut m = Migration {
        etcd,
        direction,
        dry_run,
        verbose: args.verbose || dry_run,
        max_request_bytes: args.max_request_bytes.as_u64() as usize,
        counters: state.as_ref().and_then(|s| s.resume.as_ref()).map(|r| r.counters.clone()).unwrap_or_default(),
        problems: Vec::new(),
        pacer: Pacer::new(args.max_writes_per_sec, args.max_bytes_per_sec.as_u64()),
        state,
        last_key: after.clone(),
    };

    if let Some(after) = &after {
        writeln!(out, "resuming after key {}", key_string(after))?;
    }
    if dry_run {
        writeln!(out, "dry run: nothing will be written; re-run with --yes to {} for real", direction.verb())?;
    }

    let (total, _) = etcd.count_all(&ranges, after.as_deref(), 0).await?;
    let bar = super::progress_bar(total, direction.verb());
    let mut interrupted = false;
    'ranges: for range in &ranges {
        let Some(start) = range.start_after(after.as_deref()) else { continue };
        let mut pager = etcd.pager(range, start, 0, args.batch_size);
        while let Some(page) = pager.next_page().await? {
            for kv in page {
                if futures::poll!(stop.as_mut()).is_ready() {
                    interrupted = true;
                    break 'ranges;
                }
                let line = m.migrate_key(&kv, &mut stop).await?;
                bar.inc(1);
                match line {
                    Line::Interrupted => {
                        interrupted = true;
                        break 'ranges;
                    }
                    Line::Print(text) if m.verbose => bar.suspend(|| writeln!(out, "{text}"))?,
                    _ => {}
                }
            }
            m.save()?;
        }
    }
    bar.finish_and_clear();

    let verify = if direction == Direction::Decompress && !dry_run && !interrupted {
        let mut v = verify(etcd, &ranges, args.batch_size).await?;
        if v.frames == 0 {
            (v.bases_deleted, v.bases_left) = delete_bases(etcd, &ranges, args.batch_size, false).await?;
        }
        Some(v)
    } else {
        None
    };
    if direction == Direction::Decompress && dry_run && !interrupted {
        let (bases, _) = delete_bases(etcd, &ranges, args.batch_size, true).await?;
        if bases > 0 {
            writeln!(out, "would then delete the {bases} delta-frame bases of these keys (under /etcd-squeeze/bases/)")?;
        }
    }
    if !interrupted && !dry_run {
        if let Some(state) = &m.state {
            state.remove()?;
        }
    }
    if !dry_run && m.counters.rewritten > 0 {
        eprintln!(
            "etcd-squeeze migrate {}: each of the {} rewrites was a Put on {}: it created a new revision, and every watcher \
             (kube-apiserver's watch cache, informers, controllers) saw an update event whose object content is unchanged.",
            direction.verb(),
            m.counters.rewritten,
            etcd.config.upstream.endpoints.join(","),
        );
    }
    Ok(Summary {
        direction,
        dry_run,
        prefixes,
        counters: m.counters,
        resumed_after: after.map(|k| key_string(&k)),
        last_key: m.last_key.map(|k| key_string(&k)),
        interrupted,
        problems: m.problems,
        verify,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The state of one run.
struct Migration<'a> {
    etcd: &'a Etcd,
    direction: Direction,
    dry_run: bool,
    verbose: bool,
    max_request_bytes: usize,
    counters: Counters,
    problems: Vec<String>,
    pacer: Pacer,
    state: Option<StateFile>,
    last_key: Option<Vec<u8>>,
}

/// What to do with one key.
enum Plan {
    /// Nothing: already in the target form.
    AlreadyDone,
    /// Nothing: the codec keeps this value as it is.
    LeftAsIs,
    /// Cannot be rewritten.
    Fail(String),
    /// etcd would refuse the rewritten value.
    TooLarge(String),
    /// Write this value.
    Rewrite(Bytes),
}

/// What [`Migration::migrate_key`] has to say.
enum Line {
    Silent,
    Print(String),
    Interrupted,
}

impl Migration<'_> {
    fn plan(&self, kv: &KeyValue) -> Plan {
        let framed = frame::is_framed(&kv.value);
        match self.direction {
            Direction::Compress => {
                if framed {
                    return Plan::AlreadyDone;
                }
                match self.etcd.codec.encode(&kv.key, &kv.value) {
                    Ok((stored, EncodeOutcome::Compressed)) => Plan::Rewrite(stored),
                    Ok(_) => Plan::LeftAsIs,
                    Err(e) => Plan::Fail(e.to_string()),
                }
            }
            Direction::Decompress => {
                if !framed {
                    return Plan::AlreadyDone;
                }
                let original = match self.etcd.decode(&kv.key, &kv.value) {
                    Ok(v) => v,
                    Err(e) => return Plan::Fail(e.to_string()),
                };
                if frame::is_framed(&original) {
                    return Plan::Fail(format!(
                        "{}: the original value begins with the frame magic, so it can only be stored framed",
                        key_string(&kv.key)
                    ));
                }
                if self.dry_run && original.len() + kv.key.len() > self.max_request_bytes {
                    return Plan::TooLarge(format!(
                        "{}: the original value ({}) would exceed etcd's --max-request-bytes ({})",
                        key_string(&kv.key),
                        human(original.len() as u64),
                        human(self.max_request_bytes as u64)
                    ));
                }
                Plan::Rewrite(original)
            }
        }
    }

    async fn migrate_key(&mut self, kv: &KeyValue, stop: &mut Pin<Box<dyn Future<Output = ()> + Send + '_>>) -> Result<Line, OpsError> {
        let plan = self.plan(kv);
        let c = &mut self.counters;
        c.scanned += 1;
        let verb = self.direction.verb();
        let value = match plan {
            Plan::AlreadyDone => {
                c.already_done += 1;
                return self.done(kv, Line::Silent);
            }
            Plan::LeftAsIs => {
                c.left_as_is += 1;
                return self.done(kv, Line::Silent);
            }
            Plan::Fail(reason) => {
                c.failed += 1;
                return self.problem(kv, reason);
            }
            Plan::TooLarge(reason) => {
                c.too_large += 1;
                return self.problem(kv, reason);
            }
            Plan::Rewrite(value) => value,
        };
        let sizes = format!("{} → {}", human(kv.value.len() as u64), human(value.len() as u64));
        if self.dry_run {
            self.rewritten(kv, &value);
            return self.done(kv, Line::Print(format!("would {verb} {} ({sizes})", key_string(&kv.key))));
        }
        if !self.pacer.admit(value.len(), stop).await {
            return Ok(Line::Interrupted);
        }
        let len = value.len();
        match self.etcd.kv().txn(rewrite_txn(kv, value)).await {
            Ok(r) if r.get_ref().succeeded => {
                self.counters.bytes_before += kv.value.len() as u64;
                self.counters.bytes_after += len as u64;
                self.counters.rewritten += 1;
                self.done(kv, Line::Print(format!("{verb}ed {} ({sizes})", key_string(&kv.key))))
            }
            Ok(_) => {
                self.counters.conflicts += 1;
                self.done(kv, Line::Print(format!("conflict: {} changed since it was read; left as the other writer made it", key_string(&kv.key))))
            }
            // The key's lease expired between the read and the write: etcd deletes the key with it.
            Err(s) if s.code() == tonic::Code::NotFound && s.message().contains("lease not found") => {
                self.counters.conflicts += 1;
                self.done(kv, Line::Print(format!("conflict: the lease of {} expired", key_string(&kv.key))))
            }
            Err(s) if s.code() == tonic::Code::InvalidArgument && s.message().contains("request is too large") => {
                self.counters.too_large += 1;
                let reason = format!("{}: etcd refuses the {} value: {}", key_string(&kv.key), human(len as u64), s.message());
                self.problem(kv, reason)
            }
            Err(status) => {
                // Stop: the state file resumes at this key, which was not rewritten.
                self.save()?;
                Err(OpsError::Rpc { call: format!("Txn rewriting {}", key_string(&kv.key)), status })
            }
        }
    }

    fn rewritten(&mut self, kv: &KeyValue, value: &Bytes) {
        self.counters.rewritten += 1;
        self.counters.bytes_before += kv.value.len() as u64;
        self.counters.bytes_after += value.len() as u64;
    }

    fn problem(&mut self, kv: &KeyValue, reason: String) -> Result<Line, OpsError> {
        if self.problems.len() < LISTED_PROBLEMS {
            self.problems.push(reason.clone());
        }
        self.done(kv, Line::Print(reason))
    }

    /// Marks `kv` as processed (saved after a write so that a kill resumes after it).
    fn done(&mut self, kv: &KeyValue, line: Line) -> Result<Line, OpsError> {
        self.last_key = Some(kv.key.to_vec());
        if !self.dry_run && matches!(line, Line::Print(_)) {
            self.save()?;
        }
        Ok(line)
    }

    fn save(&mut self) -> Result<(), OpsError> {
        match (&mut self.state, &self.last_key) {
            (Some(state), Some(last)) if !self.dry_run => state.save(last, &self.counters),
            _ => Ok(()),
        }
    }
}

/// `MOD(key) == mod_revision` → `Put(key, value, same lease)`; no else branch.
fn rewrite_txn(kv: &KeyValue, value: Bytes) -> TxnRequest {
    let compare = Compare::mod_equal(kv.key.clone(), kv.mod_revision);
    let put = PutRequest { key: kv.key.clone(), value, lease: kv.lease, ..Default::default() };
    TxnRequest { compare: vec![compare], success: vec![RequestOp { request: Some(request_op::Request::RequestPut(put)) }], failure: vec![] }
}

/// Deletes the bases of the keys under `ranges` (read from each base record's header) that no
/// current value needs: each in a Txn guarded by `MOD(K) == m`, where K at m was read and is not
/// a delta frame naming that base. Returns (deleted, left). Older revisions of K that are delta
/// frames stay readable through the proxy until compaction passes them (the base is still in
/// etcd's history).
/// With `dry_run`, only counts the bases of keys under `ranges` (as deleted) and writes nothing.
pub async fn delete_bases(etcd: &Etcd, ranges: &[KeyRange], page_keys: i64, dry_run: bool) -> Result<(u64, u64), OpsError> {
    let (mut deleted, mut left) = (0, 0);
    let bases = KeyRange::of_prefix(crate::codec::delta::BASES_PREFIX);
    let mut pager = etcd.pager(&bases, bases.start.to_vec(), 0, page_keys.min(100)).including_reserved();
    while let Some(page) = pager.next_page().await? {
        for base in page {
            let Some(key) = crate::codec::delta::record_key(&base.value) else { continue };
            if !ranges.iter().any(|r| key >= &r.start[..] && (r.end[..] == b"\0"[..] || key < &r.end[..])) {
                continue;
            }
            if dry_run {
                deleted += 1;
                continue;
            }
            let key = Bytes::copy_from_slice(key);
            let id = crate::codec::delta::id_of_base_key(&base.key);
            let read = RangeRequest { key: key.clone(), ..Default::default() };
            let current = etcd.range(read, || format!("Range of {}", key_string(&key))).await?;
            let (m, needed) = match current.kvs.first() {
                Some(kv) => (kv.mod_revision, frame::parse(&kv.value).ok().and_then(|f| f.base).is_some_and(|b| Some(b.id) == id)),
                None => (0, false),
            };
            if needed {
                left += 1;
                continue;
            }
            let guard = Compare::mod_equal(key.clone(), m);
            let delete = DeleteRangeRequest { key: base.key.clone(), ..Default::default() };
            let txn = TxnRequest {
                compare: vec![guard],
                success: vec![RequestOp { request: Some(request_op::Request::RequestDeleteRange(delete)) }],
                failure: vec![],
            };
            match etcd.kv().txn(txn).await {
                Ok(r) if r.get_ref().succeeded => deleted += 1,
                Ok(_) => left += 1,
                Err(status) => return Err(OpsError::Rpc { call: format!("Txn deleting base {}", key_string(&base.key)), status }),
            }
        }
    }
    Ok((deleted, left))
}

/// Scans every range at the latest revision for frames.
pub async fn verify(etcd: &Etcd, ranges: &[KeyRange], page_keys: i64) -> Result<Verification, OpsError> {
    let mut v = Verification { scanned: 0, frames: 0, examples: Vec::new(), bases_deleted: 0, bases_left: 0 };
    for range in ranges {
        let mut pager = etcd.pager(range, range.start.to_vec(), 0, page_keys);
        while let Some(page) = pager.next_page().await? {
            for kv in page {
                v.scanned += 1;
                if frame::is_framed(&kv.value) {
                    v.frames += 1;
                    if v.examples.len() < 5 {
                        v.examples.push(key_string(&kv.key));
                    }
                }
            }
        }
    }
    Ok(v)
}

/// Paces writes: each write takes `max(1 / writes_per_sec, bytes / bytes_per_sec)` of a
/// virtual clock, and a write may start only when the clock has caught up (no burst credit).
struct Pacer {
    per_write: Duration,
    per_byte_sec: Option<f64>,
    next: Instant,
}

impl Pacer {
    fn new(writes_per_sec: f64, bytes_per_sec: u64) -> Pacer {
        let per_write = if writes_per_sec > 0.0 { Duration::from_secs_f64(1.0 / writes_per_sec) } else { Duration::ZERO };
        let per_byte_sec = (bytes_per_sec > 0).then(|| 1.0 / bytes_per_sec as f64);
        Pacer { per_write, per_byte_sec, next: Instant::now() }
    }

    /// Waits until a write of `bytes` may start; false when `stop` resolved first.
    async fn admit(&mut self, bytes: usize, stop: &mut Pin<Box<dyn Future<Output = ()> + Send + '_>>) -> bool {
        let now = Instant::now();
        if self.next > now {
            tokio::select! {
                _ = tokio::time::sleep_until(self.next) => {}
                _ = stop.as_mut() => return false,
            }
        }
        let cost = self.per_write.max(Duration::from_secs_f64(self.per_byte_sec.map_or(0.0, |s| s * bytes as f64)));
        self.next = self.next.max(now) + cost;
        true
    }
}

/// The `--state-file`: the last key processed and the counters so far, rewritten (atomically,
/// through a temporary file) after every write.
struct StateFile {
    path: PathBuf,
    direction: Direction,
    prefixes: Vec<String>,
    resume: Option<Resume>,
}

/// What a state file says about the previous run.
struct Resume {
    last_key: Vec<u8>,
    counters: Counters,
}

#[derive(Serialize, Deserialize)]
struct StateJson {
    direction: Direction,
    prefixes: Vec<String>,
    /// The last key processed, hex-encoded (keys are bytes).
    last_key_hex: String,
    /// The same, for people.
    last_key: String,
    counters: Counters,
}

impl StateFile {
    /// Opens `path` if given; a previous run's file must be for the same direction and prefixes.
    fn open(path: Option<&Path>, direction: Direction, prefixes: &[String]) -> Result<Option<StateFile>, OpsError> {
        let Some(path) = path else { return Ok(None) };
        let err = |reason: String| OpsError::State { path: path.to_path_buf(), reason };
        let resume = match std::fs::read(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(err(e.to_string())),
            Ok(bytes) => {
                let s: StateJson = serde_json::from_slice(&bytes).map_err(|e| err(format!("not a migration state file: {e}")))?;
                if s.direction != direction || s.prefixes != prefixes {
                    return Err(err(format!(
                        "it is the state of `migrate {}` over {:?}, not of this run (`migrate {}` over {:?}); remove it to start over",
                        s.direction.verb(),
                        s.prefixes,
                        direction.verb(),
                        prefixes
                    )));
                }
                let last_key = from_hex(&s.last_key_hex).ok_or_else(|| err("last_key_hex is not hex".into()))?;
                Some(Resume { last_key, counters: s.counters })
            }
        };
        Ok(Some(StateFile { path: path.to_path_buf(), direction, prefixes: prefixes.to_vec(), resume }))
    }

    fn save(&self, last_key: &[u8], counters: &Counters) -> Result<(), OpsError> {
        let json = StateJson {
            direction: self.direction,
            prefixes: self.prefixes.clone(),
            last_key_hex: to_hex(last_key),
            last_key: key_string(last_key),
            counters: counters.clone(),
        };
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let err = |e: std::io::Error| OpsError::State { path: self.path.clone(), reason: e.to_string() };
        std::fs::write(&tmp, serde_json::to_vec_pretty(&json).expect("plain data")).map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)
    }

    fn remove(&self) -> Result<(), OpsError> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(OpsError::State { path: self.path.clone(), reason: e.to_string() }),
            _ => Ok(()),
        }
    }
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

impl Summary {
    /// The summary as text for a terminal.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let c = &self.counters;
        let verb = self.direction.verb();
        let mut out = String::new();
        let status = if self.interrupted {
            "INTERRUPTED"
        } else if self.dry_run && self.complete() {
            "dry run, nothing written"
        } else if self.dry_run {
            "dry run, nothing written; PROBLEMS found"
        } else if self.complete() {
            "done"
        } else {
            "INCOMPLETE"
        };
        let _ = writeln!(out, "migrate {verb} ({status}) over {}", self.prefixes.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(", "));
        if let Some(after) = &self.resumed_after {
            let _ = writeln!(out, "  resumed after {after} (counts include the earlier runs)");
        }
        let done = match self.direction {
            Direction::Compress => "already framed",
            Direction::Decompress => "not framed",
        };
        let rewritten = if self.dry_run { "would rewrite" } else { "rewritten" };
        let rows = [
            ("scanned", c.scanned, ""),
            (rewritten, c.rewritten, ""),
            (done, c.already_done, ""),
            ("left as is", c.left_as_is, "too small to gain, incompressible, k8s:enc:, or compress = false"),
            ("conflicts", c.conflicts, "changed by another writer meanwhile: left to it"),
            ("too large", c.too_large, "etcd's --max-request-bytes"),
            ("failed", c.failed, ""),
        ];
        for (name, n, note) in rows {
            if n > 0 || matches!(name, "scanned" | "rewritten" | "would rewrite" | "conflicts") {
                let note = if note.is_empty() || n == 0 { String::new() } else { format!("  ({note})") };
                let _ = writeln!(out, "  {name:<15} {n:>8}{note}");
            }
        }
        let _ = writeln!(out, "  {:<15} {} → {}", "bytes", human(c.bytes_before), human(c.bytes_after));
        for p in &self.problems {
            let _ = writeln!(out, "  problem: {p}");
        }
        if let Some(last) = &self.last_key {
            let _ = writeln!(out, "  {:<15} {last}", "last key");
        }
        if self.interrupted {
            let _ = writeln!(out, "  resume with the same --state-file, or --resume-from '{}'", self.last_key.as_deref().unwrap_or(""));
        }
        if let Some(v) = &self.verify {
            if v.frames == 0 {
                let _ = writeln!(out, "verified: {} keys scanned, no frame remains; etcd can be used without the proxy", v.scanned);
                if v.bases_deleted + v.bases_left > 0 {
                    let _ = writeln!(out, "  delta bases     {} deleted, {} left (still needed by a current value)", v.bases_deleted, v.bases_left);
                }
            } else if self.counters.too_large > 0 {
                // The cause is known: values etcd refuses without compression stay framed.
                let _ = writeln!(
                    out,
                    "NOT verified: {} of {} keys still hold a frame (e.g. {}): {} values are too large for etcd's \
                     --max-request-bytes without compression (listed above). Keep the proxy for them, or make them \
                     smaller (or raise etcd's --max-request-bytes) and re-run.",
                    v.frames,
                    v.scanned,
                    v.examples.join(", "),
                    self.counters.too_large
                );
            } else {
                let _ = writeln!(
                    out,
                    "NOT verified: {} of {} keys still hold a frame (e.g. {}). Either this run skipped them (resumed \
                     after them, or listed above as problems), or a proxy with compress = true still writes frames. Keep \
                     the proxy, set compress = false on its prefixes, and re-run from the start.",
                    v.frames,
                    v.scanned,
                    v.examples.join(", ")
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let key = b"/registry/\x00\xff/a";
        assert_eq!(from_hex(&to_hex(key)).unwrap(), key);
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
    }

    #[tokio::test]
    async fn pacer_honours_both_limits() {
        let mut never: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(std::future::pending());
        // 100 writes/s, 10 kB/s: ten 50-byte writes are write-bound (the 10th starts after 90 ms),
        // ten 500-byte writes byte-bound (450 ms). Upper bounds are loose: the machine may be busy.
        for (bytes, secs) in [(50, 0.09), (500, 0.45)] {
            let mut p = Pacer::new(100.0, 10_000);
            let start = Instant::now();
            for _ in 0..10 {
                assert!(p.admit(bytes, &mut never).await);
            }
            let took = start.elapsed().as_secs_f64();
            assert!(took >= secs - 0.005 && took < secs * 3.0, "{bytes} B: {took}");
        }
        let mut unlimited = Pacer::new(0.0, 0);
        let start = Instant::now();
        for _ in 0..100 {
            unlimited.admit(1 << 20, &mut never).await;
        }
        assert!(start.elapsed() < Duration::from_millis(50));
    }

    #[test]
    fn state_file_round_trip_and_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let prefixes = vec!["/a/".to_string()];
        let fresh = StateFile::open(Some(&path), Direction::Compress, &prefixes).unwrap().unwrap();
        assert!(fresh.resume.is_none());
        let counters = Counters { scanned: 3, rewritten: 2, ..Default::default() };
        fresh.save(b"/a/\xffk", &counters).unwrap();
        let again = StateFile::open(Some(&path), Direction::Compress, &prefixes).unwrap().unwrap();
        let resume = again.resume.as_ref().unwrap();
        assert_eq!((resume.last_key.as_slice(), &resume.counters), (&b"/a/\xffk"[..], &counters));
        let err = StateFile::open(Some(&path), Direction::Decompress, &prefixes).err().unwrap().to_string();
        assert!(err.contains("migrate compress") && err.contains("remove it to start over"), "{err}");
        assert!(StateFile::open(Some(&path), Direction::Compress, &["/b/".into()]).is_err());
        again.remove().unwrap();
        assert!(!path.exists());
        assert!(StateFile::open(None, Direction::Compress, &prefixes).unwrap().is_none());
    }

    #[tokio::test]
    async fn pacer_stops() {
        let mut stop: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(std::future::ready(()));
        let mut p = Pacer::new(1.0, 0);
        assert!(p.admit(1, &mut stop).await, "the first write is not delayed");
        assert!(!p.admit(1, &mut stop).await);
    }
}
